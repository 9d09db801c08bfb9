//! deploy/make-secrets.sh: the CA, the server certificate (for every name
//! the compose file and the manifests reach gradguard by), the tokens and
//! the auth file it writes, and a `gradguard serve` run as the compose file
//! runs it, on those files: TLS, tokens, scopes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{Run, Server};
use crate::containers::{REPLICAS, compose, service};
use crate::support::{list, repo, run_ok, strings};

pub const SCRIPT: &str = "deploy/make-secrets.sh";

/// The files the script writes.
pub const FILES: [&str; 7] = [
    "ca.crt",
    "ca.key",
    "server.crt",
    "server.key",
    "worker.token",
    "ops.token",
    "auth.toml",
];

/// The openssl command, which the script needs. Missing, it fails the test
/// with what to install.
pub fn openssl() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("openssl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`openssl` is not installed: {SCRIPT} needs it \
                 (apt-get install -y --no-install-recommends openssl), which .ci/run installs"
            )
        })
}

/// What the script made, in a temporary directory of its own.
pub struct Secrets {
    _temp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl Secrets {
    pub fn make() -> Self {
        openssl();
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("secrets");
        let secrets = Self { _temp: temp, dir };
        secrets.run(&[]);
        secrets
    }

    /// Runs the script again on the same directory; its output.
    pub fn run(&self, args: &[&str]) -> String {
        run_ok(Command::new("sh").arg(repo(SCRIPT)).args(args).arg(&self.dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn read(&self, name: &str) -> String {
        crate::support::read(&self.path(name))
    }

    /// The subjectAltNames of the server certificate (`gradguard`, `127.0.0.1`).
    pub fn server_names(&self) -> Vec<String> {
        let out = run_ok(
            Command::new(openssl())
                .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
                .arg(self.path("server.crt")),
        );
        out.lines()
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(|n| {
                let n = n.trim();
                n.strip_prefix("DNS:")
                    .or_else(|| n.strip_prefix("IP Address:"))
                    .unwrap_or(n)
                    .to_owned()
            })
            .collect()
    }

    /// The `token_sha256` of a principal of the auth file.
    pub fn principal(&self, name: &str) -> toml::Value {
        let auth: toml::Value = toml::from_str(&self.read("auth.toml")).expect("auth.toml is TOML");
        auth["principal"]
            .as_array()
            .expect("[[principal]] tables")
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no principal {name} in auth.toml"))
            .clone()
    }

    /// `gradguard serve` arguments as the compose file gives them to
    /// `replica`, its secrets taken from here; standalone (no broker here)
    /// and without a store.
    pub fn compose_serve_args(&self, replica: &str) -> Vec<String> {
        let compose = compose();
        let command = strings(list(service(&compose, replica), "command"));
        let mut args = Vec::new();
        let mut words = command.iter().skip(1); // serve
        while let Some(w) = words.next() {
            match w.as_str() {
                "--kafka-brokers" | "--data-dir" => {
                    words.next();
                }
                _ => args.push(match w.strip_prefix("/run/secrets/") {
                    Some(name) => self.path(name).display().to_string(),
                    None => w.clone(),
                }),
            }
        }
        args.push("--no-store".into());
        args
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn make_secrets_makes_a_ca_a_certificate_for_every_name_and_hashed_tokens() {
    let s = Secrets::make();
    for f in FILES {
        assert!(s.path(f).is_file(), "{SCRIPT} made no {f}");
    }
    // Only the owner opens the folder; inside, what the containers read is
    // readable by their user, the CA key and the tokens by the owner only.
    assert_eq!(mode(&s.dir), 0o700);
    for f in ["ca.crt", "server.crt", "server.key", "auth.toml"] {
        assert_eq!(mode(&s.path(f)), 0o644, "{f}");
    }
    for f in ["ca.key", "worker.token", "ops.token"] {
        assert_eq!(mode(&s.path(f)), 0o600, "{f}");
    }

    run_ok(
        Command::new(openssl())
            .args(["verify", "-CAfile"])
            .arg(s.path("ca.crt"))
            .arg(s.path("server.crt")),
    );
    // Every name the deployment reaches gradguard by: the compose replicas
    // (Prometheus scrapes them by name), the ServiceMonitor's serverName,
    // the Service in the default namespace, loopback for published ports.
    let names = s.server_names();
    for name in REPLICAS
        .iter()
        .copied()
        .chain(["gradguard", "gradguard.gradguard.svc", "localhost", "127.0.0.1"])
    {
        assert!(names.iter().any(|n| n == name), "no {name} in {names:?}");
    }

    // auth.toml holds the tokens' SHA-256 (as `gradguard auth hash-token`
    // prints it), never the tokens, and is a file `serve --auth` takes.
    let auth = s.read("auth.toml");
    for (principal, token, scopes) in [
        ("trainers", "worker.token", ["ingest:*"]),
        ("ops", "ops.token", ["admin"]),
    ] {
        let token_text = s.read(token);
        assert!(token_text.trim().len() >= 32, "{token}: {token_text:?}");
        assert!(!auth.contains(token_text.trim()), "auth.toml holds the {token} itself");
        let out = Command::new(env!("CARGO_BIN_EXE_gradguard"))
            .args(["auth", "hash-token"])
            .stdin(std::fs::File::open(s.path(token)).unwrap())
            .output()
            .unwrap();
        let hash = String::from_utf8(out.stdout).unwrap();
        let p = s.principal(principal);
        assert_eq!(p["token_sha256"].as_str(), Some(hash.trim()), "{principal}");
        let got: Vec<&str> = p["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(got, scopes, "{principal}");
    }
    let checked = run_ok(
        Command::new(env!("CARGO_BIN_EXE_gradguard"))
            .args(["auth", "check"])
            .arg(s.path("auth.toml")),
    );
    assert!(checked.contains("trainers") && checked.contains("ops"), "{checked}");
}

#[test]
fn make_secrets_keeps_what_exists_and_renews_the_certificate_in_place() {
    let s = Secrets::make();
    let before: Vec<String> = FILES.iter().map(|f| s.read(f)).collect();
    let out = s.run(&[]);
    assert!(out.contains("made: nothing"), "{out}");
    let again: Vec<String> = FILES.iter().map(|f| s.read(f)).collect();
    assert_eq!(before, again, "a second run changed something");

    // --renew: a new key and certificate from the same CA, written over the
    // old files (same inode: a compose bind mount of the file sees them).
    let inode = |f: &str| std::fs::metadata(s.path(f)).unwrap().ino();
    let inodes = (inode("server.crt"), inode("server.key"));
    s.run(&["--renew"]);
    for (i, f) in FILES.iter().enumerate() {
        let renewed = ["server.crt", "server.key"].contains(f);
        assert_eq!(s.read(f) != before[i], renewed, "{f}");
    }
    assert_eq!((inode("server.crt"), inode("server.key")), inodes);
    run_ok(
        Command::new(openssl())
            .args(["verify", "-CAfile"])
            .arg(s.path("ca.crt"))
            .arg(s.path("server.crt")),
    );

    // A new token: auth.toml follows.
    std::fs::remove_file(s.path("ops.token")).unwrap();
    s.run(&[]);
    assert_ne!(
        s.read("ops.token"),
        before[FILES.iter().position(|f| *f == "ops.token").unwrap()]
    );
    assert_ne!(s.read("auth.toml"), before[6]);
    assert_eq!(s.read("worker.token"), before[4]);
}

/// A CLI command against the server, with extra arguments; its result.
fn cli(args: &[&str], extra: &[&str]) -> Run {
    Run::from(
        Command::new(env!("CARGO_BIN_EXE_gradguard"))
            .args(args)
            .args(extra)
            .output()
            .expect("run gradguard"),
    )
}

#[test]
fn a_replica_run_as_compose_runs_it_serves_tls_and_checks_tokens_and_scopes() {
    let _turn = crate::common::turn();
    let s = Secrets::make();
    let args = s.compose_serve_args(REPLICAS[0]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(args.contains(&"--auth") && args.contains(&"--tls-cert"), "{args:?}");
    let server = Server::start_with(&args);
    let url = format!("https://{}", server.grpc);
    let ca = s.path("ca.crt").display().to_string();
    let worker = s.path("worker.token").display().to_string();
    let ops = s.path("ops.token").display().to_string();
    let tls = ["--server", url.as_str(), "--tls-ca", ca.as_str()];

    // A training job with the worker token.
    let job = [
        "simulate",
        "--scenario",
        "explode",
        "--workers",
        "2",
        "--steps",
        "300",
        "--fault-at",
        "150",
        "--step-interval",
        "0",
        "--job",
        "team-a/run-1",
    ];
    cli(&job, &[&tls[..], &["--token-file", &worker]].concat()).assert_code(0);
    // Without a token, or over plain text, nothing.
    let refused = cli(&job, &tls);
    assert_ne!(refused.code, Some(0), "a worker without a token was let in");
    let plain = cli(&["jobs", "--server", &format!("http://{}", server.grpc)], &[]);
    assert_ne!(plain.code, Some(0), "plain text was answered");
    // The trainers may ingest, not read; ops reads everything.
    let as_worker = cli(&["jobs", "--json"], &[&tls[..], &["--token-file", &worker]].concat());
    assert!(
        as_worker.code != Some(0) || !as_worker.stdout.contains("team-a/run-1"),
        "the worker token reads jobs: {}",
        as_worker.stdout
    );
    let as_ops = cli(&["jobs", "--json"], &[&tls[..], &["--token-file", &ops]].concat());
    let jobs = as_ops.json();
    assert!(jobs.iter().any(|j| j["job"] == "team-a/run-1"), "{}", as_ops.stdout);
}
