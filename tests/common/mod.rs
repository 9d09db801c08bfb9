//! A real `gradguard serve` process for integration tests: started on port 0,
//! ready once it prints its `listening` line, killed when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gradguard::client::{self, StreamReceiver, StreamSender, WorkerStream};
use gradguard::proto;
use gradguard::scenario::{FaultPlan, Scenario, ScenarioConfig};
use gradguard::wire;

pub mod kafka;

pub struct Server {
    child: Child,
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// The data directory (a fresh temporary one unless given).
    pub data_dir: std::path::PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts the server with extra flags and waits for its `listening` line.
    pub fn start_with(args: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("a temporary data directory");
        let dir = temp.path().to_owned();
        let mut server = Self::start_in(&dir, args);
        server._temp = Some(temp);
        server
    }

    /// Starts the server on a given data directory (it outlives the server).
    pub fn start_in(data_dir: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn(Command::new(env!("CARGO_BIN_EXE_gradguard")), data_dir, args)
    }

    /// Starts the server on a given gRPC address (to restart it where its
    /// clients look for it) and data directory.
    pub fn start_at(grpc: SocketAddr, data_dir: &std::path::Path) -> Self {
        let command = Command::new(env!("CARGO_BIN_EXE_gradguard"));
        Self::spawn_on(command, &grpc.to_string(), data_dir, &[])
    }

    /// Starts the server under an open-file limit of `files` descriptors
    /// (soft and hard: it cannot raise it).
    pub fn start_with_file_limit(files: u64, args: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("a temporary data directory");
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {files} && exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_gradguard"),
        ]);
        let mut server = Self::spawn(command, temp.path(), args);
        server._temp = Some(temp);
        server
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(command: Command, data_dir: &std::path::Path, args: &[&str]) -> Self {
        Self::spawn_on(command, "127.0.0.1:0", data_dir, args)
    }

    fn spawn_on(mut command: Command, grpc: &str, data_dir: &std::path::Path, args: &[&str]) -> Self {
        let mut child = command
            .args(["serve", "--grpc-addr", grpc, "--metrics-addr", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start gradguard serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let field = |name: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .parse()
                .expect("an address")
        };
        let (grpc, metrics) = (field("grpc="), field("metrics="));
        Self {
            child,
            grpc,
            metrics,
            data_dir: data_dir.to_owned(),
            _temp: None,
        }
    }

    /// Kills the server with SIGKILL (no chance to flush anything) and waits.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server with SIGTERM (its graceful shutdown) and waits.
    pub fn stop(mut self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {pid} failed");
        let _ = self.child.wait();
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The `/metrics` text (blocking; call from `spawn_blocking` in async tests).
    pub fn scrape(&self) -> String {
        ureq::get(&format!("http://{}/metrics", self.metrics))
            .call()
            .expect("scrape /metrics")
            .body_mut()
            .read_to_string()
            .expect("metrics text")
    }

    /// The value of one sample (`name{labels}` exactly as exposed), if present.
    pub fn sample(&self, series: &str) -> Option<f64> {
        sample(&self.scrape(), series)
    }

    /// Scrapes until `check` holds, failing after 10 s. For effects the server
    /// applies asynchronously (a disconnect, an expiry): no fixed sleeps.
    pub fn wait_for(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.scrape();
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; metrics:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One server-backed test at a time within a test binary: a paced simulation
/// only keeps its closed loop while the server keeps up with the workers.
pub fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a finished `gradguard` command printed, and its exit status.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Self {
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "stdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// The JSON lines of a successful `--json` run.
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.assert_code(0);
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    }
}

/// The value of one sample in Prometheus text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A Hello for `rank` of `job` with `layers` layers named `layer0..`.
pub fn hello(job: &str, rank: u32, world_size: u32, layers: usize) -> proto::Hello {
    proto::Hello {
        job: job.into(),
        rank,
        world_size,
        layer_names: (0..layers).map(|i| format!("layer{i}")).collect(),
        client_version: "test".into(),
        rule_profile: String::new(),
        report_progress: false,
        layout: None,
    }
}

/// One stream per rank of a scenario's job, opened and welcomed.
pub async fn open_job(url: &str, cfg: &ScenarioConfig) -> (Scenario, Vec<StreamSender>, Vec<StreamReceiver>) {
    let scenario = Scenario::new(cfg.clone());
    let names = scenario.layer_names();
    let (mut senders, mut receivers) = (Vec::new(), Vec::new());
    for rank in 0..cfg.workers {
        let mut c = client::connect(url).await.expect("connect");
        let h = proto::Hello {
            layer_names: names.clone(),
            ..hello(&cfg.job, rank, cfg.workers, 0)
        };
        let stream = WorkerStream::open(&mut c, h).await.expect("open");
        assert_eq!(stream.welcome.server_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(stream.welcome.last_step, None);
        senders.push(stream.sender);
        receivers.push(stream.receiver);
    }
    (scenario, senders, receivers)
}

/// Sends every step of the scenario, each rank on its own stream.
pub async fn send_all(scenario: &mut Scenario, senders: &[StreamSender]) {
    while let Some(step) = scenario.next_step() {
        for s in &step {
            senders[s.worker as usize]
                .summary(wire::summary_to_proto(s))
                .await
                .expect("send");
        }
    }
}

/// Plays a whole scenario and returns what each rank received, in order, once
/// every stream has ended, and the fault the scenario drew.
pub async fn play(url: &str, cfg: ScenarioConfig) -> (Vec<Vec<proto::Advice>>, FaultPlan) {
    let (mut scenario, senders, receivers) = open_job(url, &cfg).await;
    let readers: Vec<_> = receivers
        .into_iter()
        .map(|mut r| tokio::spawn(async move { r.drain().await }))
        .collect();
    send_all(&mut scenario, &senders).await;
    drop(senders);
    let mut received = Vec::new();
    for r in readers {
        received.push(r.await.unwrap().expect("stream ended cleanly"));
    }
    (received, scenario.plan().clone())
}

/// One HTTP/1.1 GET over TLS, the whole response as text.
pub fn https_get(addr: std::net::SocketAddr, roots: rustls::RootCertStore, path: &str) -> String {
    use std::io::{Read, Write};
    let config =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}
