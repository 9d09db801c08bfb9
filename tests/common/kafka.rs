//! A real Kafka-compatible broker (tansu) on loopback for cluster-mode tests.
//! `.ci/run` installs it (`cargo install tansu --locked --features dynostore,libsql`);
//! a test that needs it fails with that hint when it is missing.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Broker {
    child: Option<Child>,
    /// Where tansu listens.
    pub addr: SocketAddr,
    /// Where clients connect (the proxy when there is one).
    advertised: SocketAddr,
    proxy: Option<Proxy>,
    /// tansu's `--storage-engine`.
    storage: String,
    /// tansu's working directory (its SQLite file and stderr log), when it
    /// keeps its data on disk.
    dir: Option<PathBuf>,
    /// tansu's `--authentication`: every client must authenticate with SASL.
    sasl: bool,
}

/// The tansu binary: `$TANSU`, else on the PATH, else in cargo's bin directory.
fn tansu() -> PathBuf {
    if let Some(p) = std::env::var_os("TANSU") {
        return p.into();
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin").join("tansu"));
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("tansu"))
            .find(|p| p.is_file())
    });
    on_path.or(cargo_bin.filter(|p| p.is_file())).unwrap_or_else(|| {
        panic!(
            "the cluster-mode tests need a Kafka-compatible broker: install tansu with \
                 `cargo install tansu --locked --features dynostore,libsql` (.ci/run does), or set TANSU"
        )
    })
}

impl Broker {
    /// Starts a broker with in-memory storage on a free loopback port and
    /// waits until it accepts connections.
    pub fn start() -> Self {
        Self::launch(free_addr(), None, "memory://tansu/", None)
    }

    /// A broker that keeps its topics in a SQLite file under `dir`, so that
    /// it can be stopped and started again ([`Broker::restart`]) with its
    /// data. Needs tansu built with the `libsql` feature.
    pub fn start_on_disk(dir: &std::path::Path) -> Self {
        // tansu reads the path relative to its working directory.
        Self::launch(free_addr(), None, "sqlite://tansu.db", Some(dir.to_owned()))
    }

    /// A broker that requires SASL of every client (tansu's
    /// `--authentication`), knowing `user` with `password` for SCRAM-SHA-512.
    /// The user is created on a broker without authentication first (tansu's
    /// `user create` does not authenticate), so the broker keeps its data in
    /// a SQLite file under `dir` as [`Broker::start_on_disk`]. tansu 0.6
    /// checks SCRAM passwords; with PLAIN it takes any.
    pub fn start_with_sasl(dir: &std::path::Path, user: &str, password: &str) -> Self {
        let mut broker = Self::start_on_disk(dir);
        let out = Command::new(tansu())
            .args(["user", "create", "--broker", &format!("tcp://{}", broker.addr)])
            .args(["--mechanism", "scram512", user, password])
            .output()
            .expect("run tansu user create");
        assert!(
            out.status.success(),
            "tansu user create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        broker.stop();
        broker.sasl = true;
        broker.spawn();
        broker
    }

    /// A broker that clients reach through a TCP proxy the test can cut
    /// ([`Broker::cut`]) and restore: a network outage that keeps the
    /// broker's data.
    pub fn start_behind_proxy() -> Self {
        let addr = free_addr();
        Self::launch(addr, Some(Proxy::start(free_addr(), addr)), "memory://tansu/", None)
    }

    fn launch(addr: SocketAddr, proxy: Option<Proxy>, storage: &str, dir: Option<PathBuf>) -> Self {
        let mut broker = Self {
            child: None,
            addr,
            advertised: proxy.as_ref().map_or(addr, |p| p.addr),
            proxy,
            storage: storage.into(),
            dir,
            sasl: false,
        };
        broker.spawn();
        broker
    }

    /// Kills the broker (SIGKILL) and starts it again on the same port and
    /// storage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Cuts every connection to the broker and refuses new ones.
    pub fn cut(&mut self) {
        self.proxy.as_mut().expect("a broker behind a proxy").cut();
    }

    /// Lets clients reach the broker again.
    pub fn restore(&mut self) {
        self.proxy.as_mut().expect("a broker behind a proxy").restore();
    }

    fn spawn(&mut self) {
        let listener = format!("tcp://{}", self.addr);
        let advertised = format!("tcp://{}", self.advertised);
        let log = self.dir.as_ref().map(|d| d.join("tansu.log"));
        let stderr = match &log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open the broker's log"),
            ),
            None => Stdio::null(),
        };
        let mut command = Command::new(tansu());
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        let child = command
            .args(["broker", "--storage-engine", &self.storage])
            .args(self.sasl.then_some("--authentication"))
            .env("LISTENER_URL", &listener)
            .env("ADVERTISED_LISTENER_URL", &advertised)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = log.as_ref().and_then(|p| std::fs::read_to_string(p).ok());
                panic!(
                    "tansu exited at start ({status}) with storage {}: {}\n(a sqlite:// storage needs tansu \
                     installed with `--features dynostore,libsql`)",
                    self.storage,
                    log.unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {} within 30 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` for `--kafka-brokers`.
    pub fn brokers(&self) -> String {
        self.advertised.to_string()
    }

    /// Kills the broker (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// A TCP forwarder from `addr` to `target`, one thread per direction of each
/// connection.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    running: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(addr: SocketAddr, target: SocketAddr) -> Self {
        let mut proxy = Self {
            addr,
            target,
            running: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
            acceptor: None,
        };
        proxy.restore();
        proxy
    }

    fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr).expect("bind the proxy port again");
        self.running.store(true, Ordering::SeqCst);
        let (running, open, target) = (self.running.clone(), self.open.clone(), self.target);
        self.acceptor = Some(std::thread::spawn(move || {
            for client in listener.incoming() {
                if !running.load(Ordering::SeqCst) {
                    return; // the listener closes with this thread
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let pairs = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ];
                open.lock().unwrap().extend([client, server]);
                for (mut from, mut to) in pairs {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        }));
    }

    fn cut(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}
