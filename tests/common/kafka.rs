//! A real Kafka-compatible broker (tansu) on loopback for cluster-mode tests.
//! `.ci/run` installs it (`cargo install tansu --locked --features dynostore`);
//! a test that needs it fails with that hint when it is missing.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    child: Option<Child>,
    pub addr: SocketAddr,
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
                 `cargo install tansu --locked --features dynostore` (.ci/run does), or set TANSU"
        )
    })
}

impl Broker {
    /// Starts a broker with in-memory storage on a free loopback port and
    /// waits until it accepts connections.
    pub fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut broker = Self { child: None, addr };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let url = format!("tcp://{}", self.addr);
        let child = Command::new(tansu())
            .args(["broker", "--storage-engine", "memory://tansu/"])
            .env("LISTENER_URL", &url)
            .env("ADVERTISED_LISTENER_URL", &url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("tansu exited at start: {status}");
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
        self.addr.to_string()
    }

    /// Kills the broker (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
