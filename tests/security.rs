//! TLS, mutual TLS, principals and scopes, against a real `gradguard serve`
//! over real sockets. Every certificate and key is made here, at test time
//! (rcgen); nothing is checked in.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, hello, https_get};
use gradguard::client::{self, ClientError, ClientSecurity, GrpcChannel, WorkerStream};
use gradguard::proto::{self, query_client::QueryClient};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::Code;

/// A CA and what it signed, written as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let pki = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let ca = pki.ca("ca", "gradguard test CA");
        pki.leaf(&ca, "server", &["localhost", "127.0.0.1"], false);
        pki.leaf(&ca, "client", &["trainer.example.internal"], false);
        pki.leaf(&ca, "expired", &["localhost", "127.0.0.1"], true);
        let other = pki.ca("other-ca", "someone else's CA");
        pki.leaf(&other, "stranger", &["trainer.example.internal"], false);
        pki.leaf(&other, "other-server", &["localhost", "127.0.0.1"], false);
        pki
    }

    fn ca(&self, name: &str, cn: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), ca.pem()).unwrap();
        ca
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by `ca`,
    /// as `<name>.pem` and `<name>.key`; one that expired in 2020 when `expired`.
    fn leaf(&self, ca: &CertifiedIssuer<'static, KeyPair>, name: &str, names: &[&str], expired: bool) {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, ca).unwrap();
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    /// `serve` flags for TLS with the server certificate.
    fn serve_tls(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.arg("server.pem"),
            "--tls-key".into(),
            self.arg("server.key"),
        ]
    }

    /// A client that trusts `ca` and presents `cert` (a `<name>.pem`/`.key` pair).
    fn client(&self, ca: &str, cert: Option<&str>, token: Option<&str>) -> ClientSecurity {
        ClientSecurity {
            tls_ca: Some(self.path(ca)),
            tls_cert: cert.map(|c| self.path(&format!("{c}.pem"))),
            tls_key: cert.map(|c| self.path(&format!("{c}.key"))),
            token: token.map(str::to_owned),
        }
    }
}

/// Runs the `gradguard` CLI with no credentials from the environment but `env`.
fn cli(args: &[&str], env: &[(&str, &str)]) -> common::Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gradguard"));
    for var in [
        "GRADGUARD_SERVER",
        "GRADGUARD_TOKEN",
        "GRADGUARD_TOKEN_FILE",
        "GRADGUARD_TLS_CA",
        "GRADGUARD_TLS_CLIENT_CERT",
        "GRADGUARD_TLS_CLIENT_KEY",
    ] {
        command.env_remove(var);
    }
    command.args(args).envs(env.iter().copied()).output().unwrap().into()
}

fn start(args: &[String]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with(&args)
}

fn https(server: &Server) -> String {
    format!("https://{}", server.grpc)
}

#[test]
fn the_cli_talks_tls_and_each_wrong_setup_gets_a_clear_error() {
    let pki = Pki::new();
    let server = start(&pki.serve_tls());
    let url = https(&server);
    let ok = cli(&["jobs", "--server", &url, "--tls-ca", &pki.arg("ca.pem")], &[]);
    ok.assert_code(0);
    assert!(ok.stdout.contains("No jobs"), "{}", ok.stdout);
    // The same through the environment.
    cli(&["jobs", "--server", &url], &[("GRADGUARD_TLS_CA", &pki.arg("ca.pem"))]).assert_code(0);

    let wrong_ca = cli(&["jobs", "--server", &url, "--tls-ca", &pki.arg("other-ca.pem")], &[]);
    wrong_ca.assert_code(1);
    assert!(
        wrong_ca.stderr.contains("invalid peer certificate: UnknownIssuer")
            && wrong_ca.stderr.contains("does --tls-ca hold the CA"),
        "{}",
        wrong_ca.stderr
    );
    let plaintext = cli(&["jobs", "--server", &format!("http://{}", server.grpc)], &[]);
    plaintext.assert_code(1);
    assert!(
        plaintext
            .stderr
            .contains("is the server serving TLS? Then use https://"),
        "{}",
        plaintext.stderr
    );
    let mixed = cli(
        &[
            "jobs",
            "--server",
            &format!("http://{}", server.grpc),
            "--tls-ca",
            &pki.arg("ca.pem"),
        ],
        &[],
    );
    mixed.assert_code(2);
    assert!(
        mixed.stderr.contains("TLS files were given: use https://"),
        "{}",
        mixed.stderr
    );
    drop(server);

    let expired = start(&[
        "--tls-cert".into(),
        pki.arg("expired.pem"),
        "--tls-key".into(),
        pki.arg("expired.key"),
    ]);
    let run = cli(
        &["jobs", "--server", &https(&expired), "--tls-ca", &pki.arg("ca.pem")],
        &[],
    );
    run.assert_code(1);
    assert!(
        run.stderr.contains("invalid peer certificate: certificate expired"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_worker_streams_over_tls_and_gets_its_advice() {
    let pki = Pki::new();
    let server = start(&pki.serve_tls());
    let mut c = client::connect_with(&https(&server), &pki.client("ca.pem", None, None))
        .await
        .unwrap();
    let advice = play_nan(&mut c, "tls/job", 0).await;
    assert!(!advice.is_empty(), "a NaN loss over TLS drew no advice");
}

#[test]
fn mutual_tls_wants_a_certificate_the_ca_signed() {
    let pki = Pki::new();
    let mut args = pki.serve_tls();
    args.extend(["--tls-client-ca".into(), pki.arg("ca.pem")]);
    let server = start(&args);
    let url = https(&server);
    let ca = pki.arg("ca.pem");
    let with = |cert: &str| {
        cli(
            &[
                "jobs",
                "--server",
                &url,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &pki.arg(&format!("{cert}.pem")),
                "--tls-key",
                &pki.arg(&format!("{cert}.key")),
            ],
            &[],
        )
    };
    with("client").assert_code(0);
    let none = cli(&["jobs", "--server", &url, "--tls-ca", &ca], &[]);
    none.assert_code(1);
    assert!(none.stderr.to_lowercase().contains("certificate"), "{}", none.stderr);
    let stranger = with("stranger");
    stranger.assert_code(1);
    assert!(
        stranger.stderr.to_lowercase().contains("certificate"),
        "{}",
        stranger.stderr
    );
}

/// Two teams, an intruder who may ingest team A's jobs under another name,
/// and operators known by their client certificate.
fn auth_file(dir: &Path, with_ops: bool) -> PathBuf {
    let mut text = String::new();
    for (name, token, scopes) in [
        ("team-a", "token-a", r#"["ingest:team-a/*", "query:team-a/*"]"#),
        ("team-b", "token-b", r#"["ingest:team-b/*", "query:team-b/*"]"#),
        ("intruder", "token-i", r#"["ingest:team-a/*"]"#),
        ("ops", "token-ops", r#"["admin"]"#),
    ] {
        if name == "ops" && !with_ops {
            continue;
        }
        text.push_str(&format!(
            "[[principal]]\nname = \"{name}\"\ntoken_sha256 = \"{}\"\nscopes = {scopes}\n\n",
            gradguard::auth::sha256_hex(token)
        ));
    }
    text.push_str("[[principal]]\nname = \"trainer\"\nclient_cert_name = \"trainer.example.internal\"\nscopes = [\"query:team-a/*\"]\n");
    let path = dir.join("auth.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn token(t: &str) -> ClientSecurity {
    ClientSecurity {
        token: Some(t.into()),
        ..Default::default()
    }
}

async fn query(url: &str, t: Option<&str>) -> QueryClient<GrpcChannel> {
    let security = t.map(token).unwrap_or_default();
    QueryClient::new(client::channel(url, &security).await.unwrap())
}

/// Streams three healthy steps and a NaN loss as `rank` of `job`, ends the
/// stream, and returns the advice it got (all stored once it ends).
async fn play_nan(c: &mut proto::ingest_client::IngestClient<GrpcChannel>, job: &str, rank: u32) -> Vec<proto::Advice> {
    let mut stream = WorkerStream::open(c, hello(job, rank, 1, 0)).await.unwrap();
    for step in 1..=4u64 {
        let loss = if step == 4 { f64::NAN } else { 2.0 };
        stream.sender.summary(summary(step, loss)).await.unwrap();
    }
    drop(stream.sender);
    stream.receiver.drain().await.unwrap()
}

fn summary(step: u64, loss: f64) -> proto::Summary {
    proto::Summary {
        step,
        time: 1.7e9 + step as f64,
        loss: Some(loss),
        grad_norm: Some(1.0),
        ..Default::default()
    }
}

/// The status a worker stream for `job` is refused with.
async fn stream_refusal(url: &str, t: Option<&str>, job: &str) -> tonic::Status {
    let security = t.map(token).unwrap_or_default();
    let mut c = client::connect_with(url, &security).await.unwrap();
    match WorkerStream::open(&mut c, hello(job, 0, 1, 0)).await {
        Err(ClientError::Status(s)) => s,
        Ok(s) => panic!("stream for {job} was welcomed: {:?}", s.welcome),
        Err(e) => panic!("stream for {job}: {e}"),
    }
}

/// The code every Query method answers with, for `job`.
async fn query_codes(url: &str, t: Option<&str>, job: &str) -> Vec<(&'static str, Code)> {
    let mut q = query(url, t).await;
    let filter = Some(proto::Filter {
        job: job.into(),
        ..Default::default()
    });
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    vec![
        (
            "ListJobs",
            code(q.list_jobs(proto::ListJobsRequest::default()).await.map(drop)),
        ),
        (
            "GetJob",
            code(q.get_job(proto::GetJobRequest { job: job.into() }).await.map(drop)),
        ),
        (
            "ListAnomalies",
            code(
                q.list_anomalies(proto::ListAnomaliesRequest {
                    filter: filter.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "ListAdvice",
            code(
                q.list_advice(proto::ListAdviceRequest {
                    filter,
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "WatchAnomalies",
            code(
                q.watch_anomalies(proto::WatchAnomaliesRequest {
                    job: job.into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "GetRules",
            code(q.get_rules(proto::GetRulesRequest { job: job.into() }).await.map(drop)),
        ),
    ]
}

#[tokio::test]
async fn tokens_and_scopes_decide_every_method() {
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(dir.path(), true);
    let server = Server::start_with(&["--auth", auth.to_str().unwrap()]);
    let url = server.url();

    // Each team streams its own job; what they got is stored when the streams end.
    let mut a = client::connect_with(&url, &token("token-a")).await.unwrap();
    assert!(!play_nan(&mut a, "team-a/llm", 0).await.is_empty());
    let mut b = client::connect_with(&url, &token("token-b")).await.unwrap();
    assert!(!play_nan(&mut b, "team-b/llm", 0).await.is_empty());

    // No token, a wrong one: UNAUTHENTICATED everywhere, ingest included.
    for t in [None, Some("token-x")] {
        let s = stream_refusal(&url, t, "team-a/llm").await;
        assert_eq!(s.code(), Code::Unauthenticated, "{t:?}: {s:?}");
        for (method, code) in query_codes(&url, t, "team-a/llm").await {
            assert_eq!(code, Code::Unauthenticated, "{method} with {t:?}");
        }
    }
    // Out of scope: PERMISSION_DENIED naming the job, whether it exists or not.
    let s = stream_refusal(&url, Some("token-a"), "team-b/llm").await;
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message().contains("may not ingest job \"team-b/llm\""),
        "{}",
        s.message()
    );
    for job in ["team-b/llm", "team-b/no-such-job"] {
        for (method, code) in query_codes(&url, Some("token-a"), job).await {
            let want = if method == "ListJobs" {
                Code::Ok
            } else {
                Code::PermissionDenied
            };
            assert_eq!(code, want, "{method} of {job} as team-a");
        }
    }
    for (method, code) in query_codes(&url, Some("token-a"), "team-a/llm").await {
        assert_eq!(code, Code::Ok, "{method} of team-a/llm as team-a");
    }
    // The intruder may ingest team A's jobs but not read them.
    let s = query(&url, Some("token-i"))
        .await
        .get_job(proto::GetJobRequest {
            job: "team-a/llm".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);

    // Listings without a job hold only the jobs in scope.
    let mut q = query(&url, Some("token-a")).await;
    let jobs: Vec<String> = q
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.job)
        .collect();
    assert_eq!(jobs, ["team-a/llm"]);
    let anomalies = q
        .list_anomalies(proto::ListAnomaliesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .anomalies;
    assert!(!anomalies.is_empty() && anomalies.iter().all(|a| a.job == "team-a/llm"));
    let advice = q
        .list_advice(proto::ListAdviceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .advice;
    assert!(!advice.is_empty() && advice.iter().all(|a| a.advice.as_ref().unwrap().job == "team-a/llm"));
    let mut ops = query(&url, Some("token-ops")).await;
    let all = ops
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(all.len(), 2, "admin sees every job");
    let intruder = query(&url, Some("token-i"))
        .await
        .list_jobs(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(intruder.is_empty(), "no query scope, no jobs: {intruder:?}");

    // A watch without a job sees only the jobs in scope: B's anomaly is
    // skipped, A's arrives.
    let mut watch = q
        .watch_anomalies(proto::WatchAnomaliesRequest::default())
        .await
        .unwrap()
        .into_inner();
    play_nan(&mut b, "team-b/second", 0).await;
    play_nan(&mut a, "team-a/second", 0).await;
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("an anomaly within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(first.job, "team-a/second");

    // The CLI, with the token from the environment, shows the same.
    let jobs = cli(&["jobs", "--server", &url, "--json"], &[("GRADGUARD_TOKEN", "token-a")]).json();
    let names: Vec<&str> = jobs.iter().map(|j| j["job"].as_str().unwrap()).collect();
    assert_eq!(names, ["team-a/llm", "team-a/second"]);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token-a\n").unwrap();
    for command in ["anomalies", "advice"] {
        let rows = cli(
            &[
                command,
                "--server",
                &url,
                "--json",
                "--token-file",
                token_file.to_str().unwrap(),
            ],
            &[],
        )
        .json();
        assert!(!rows.is_empty() && rows.iter().all(|r| r["job"].as_str().unwrap().starts_with("team-a/")));
    }
    let refused = cli(
        &["anomalies", "--server", &url, "--job", "team-b/llm"],
        &[("GRADGUARD_TOKEN", "token-a")],
    );
    refused.assert_code(1);
    assert!(refused.stderr.contains("PermissionDenied"), "{}", refused.stderr);

    let metrics = tokio::task::spawn_blocking(move || server.scrape()).await.unwrap();
    for reason in ["no_credentials", "bad_token", "out_of_scope"] {
        let n = common::sample(
            &metrics,
            &format!("gradguard_auth_failures_total{{reason=\"{reason}\"}}"),
        )
        .unwrap();
        assert!(n > 0.0, "{reason}: {n}");
    }
}

#[tokio::test]
async fn another_principal_cannot_take_over_a_rank() {
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(dir.path(), true);
    let server = Server::start_with(&["--auth", auth.to_str().unwrap()]);
    let url = server.url();
    let job = "team-a/llm-70b";

    let mut a = client::connect_with(&url, &token("token-a")).await.unwrap();
    let mut real = WorkerStream::open(&mut a, hello(job, 1, 2, 0)).await.unwrap();
    for step in 1..=3 {
        real.sender.summary(summary(step, 2.0)).await.unwrap();
    }
    // The intruder may ingest team-a/* but is another principal: refused
    // before any Welcome, so it learns nothing of the job.
    let mut i = client::connect_with(&url, &token("token-i")).await.unwrap();
    let refused = match WorkerStream::open(&mut i, hello(job, 1, 2, 0)).await {
        Err(ClientError::Status(s)) => s,
        other => panic!("the takeover was not refused: {other:?}"),
    };
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().contains("streamed by another principal"),
        "{}",
        refused.message()
    );

    // The real stream goes on and gets its advice.
    real.sender.summary(summary(4, f64::NAN)).await.unwrap();
    drop(real.sender);
    let advice = real.receiver.drain().await.expect("the real stream ends cleanly");
    assert!(!advice.is_empty(), "the real stream lost its advice");
    let metrics = tokio::task::spawn_blocking(move || server.scrape()).await.unwrap();
    assert_eq!(
        common::sample(&metrics, "gradguard_auth_failures_total{reason=\"takeover\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn sighup_rereads_the_principals() {
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(dir.path(), true);
    let server = Server::start_with(&["--auth", auth.to_str().unwrap()]);
    let url = server.url();
    let list = |t: &'static str| {
        let url = url.clone();
        async move {
            query(&url, Some(t))
                .await
                .list_jobs(proto::ListJobsRequest::default())
                .await
                .map(drop)
        }
    };
    list("token-ops").await.unwrap();
    let hup = || {
        let status = Command::new("kill")
            .args(["-HUP", &server.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    // A broken file is refused and the principals stay.
    std::fs::write(&auth, "[[principal]]\nname = 1\n").unwrap();
    hup();
    // A file without ops: ops' next calls are refused, team A's go on.
    auth_file(dir.path(), false);
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match list("token-ops").await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            Ok(()) => assert!(Instant::now() < deadline, "ops still let in 10 s after SIGHUP"),
            Err(s) => panic!("ops refused with {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    list("token-a").await.unwrap();
}

#[test]
fn a_bad_auth_file_stops_serve_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("auth.toml");
    let hash = gradguard::auth::sha256_hex("t");
    std::fs::write(
        &path,
        format!("[[principal]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"admin\"]\n\n[[principal]]\nname = \"a\"\nclient_cert_name = \"x\"\nscopes = [\"query:\"]\n"),
    )
    .unwrap();
    let run = cli(&["serve", "--auth", path.to_str().unwrap(), "--no-store"], &[]);
    run.assert_code(2);
    assert!(
        run.stderr.contains(&format!(
            "{}:7: principal name \"a\" is used twice (first at line 1)",
            path.display()
        )),
        "{}",
        run.stderr
    );
    std::fs::write(
        &path,
        format!("[[principal]]\nname = \"a\"\ntoken_sha256 = \"{hash}\"\nscopes = [\"write:a/*\"]\n"),
    )
    .unwrap();
    let run = cli(&["serve", "--auth", path.to_str().unwrap(), "--no-store"], &[]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains(":4: principal \"a\": scope \"write:a/*\": unknown kind"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_rotated_certificate_is_served_without_a_restart() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.pem"), dir.path().join("tls.key"));
    std::fs::copy(pki.path("server.pem"), &cert).unwrap();
    std::fs::copy(pki.path("server.key"), &key).unwrap();
    let server = start(&[
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ]);
    let url = https(&server);
    let jobs = |ca: &str| cli(&["jobs", "--server", &url, "--tls-ca", &pki.arg(ca)], &[]);
    jobs("ca.pem").assert_code(0);
    jobs("other-ca.pem").assert_code(1);
    // Rotate: new files moved into place, as a secret mount or cert-manager does.
    for (from, to) in [("other-server.key", &key), ("other-server.pem", &cert)] {
        let tmp = dir.path().join("incoming");
        std::fs::copy(pki.path(from), &tmp).unwrap();
        std::fs::rename(&tmp, to).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while jobs("other-ca.pem").code != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served within 20 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    jobs("ca.pem").assert_code(1);
}

#[test]
fn the_metrics_port_serves_tls_when_asked() {
    let pki = Pki::new();
    let mut args = pki.serve_tls();
    args.push("--metrics-tls".into());
    let server = start(&args);
    let roots = gradguard::auth::tls::read_roots(&pki.path("ca.pem"), "ca").unwrap();
    let text = https_get(server.metrics, roots, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("gradguard_auth_failures_total"), "{text}");
    // Plaintext gets no answer.
    let plain = ureq::get(&format!("http://{}/healthz", server.metrics)).call();
    assert!(plain.is_err(), "plaintext /healthz answered: {plain:?}");
}

#[test]
fn without_auth_serve_warns_and_tokens_never_reach_its_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--no-store",
        ])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains("no --auth")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("anyone who can reach the gRPC port can read and steer every job"));

    // With --auth, a wrong token is refused and logged without the token.
    let auth = auth_file(dir.path(), true);
    let mut child = Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .args([
            "serve",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--no-store",
        ])
        .arg("--auth")
        .arg(&auth)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        cli(
            &["jobs", "--server", &grpc],
            &[("GRADGUARD_TOKEN", "hunter2-secret-token")],
        )
        .assert_code(1);
    }
    cli(&["jobs", "--server", &grpc], &[("GRADGUARD_TOKEN", "token-a")]).assert_code(0);
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("hunter2") && !stderr.contains("token-a"), "{stderr}");
    assert!(!stderr.contains("no --auth"), "{stderr}");
    // Three refusals of one reason, logged once.
    assert_eq!(stderr.matches("reason=\"bad_token\"").count(), 1, "{stderr}");
}

/// `follow` carries the client credentials: a token the job is in scope of
/// streams the log; none, or one of another team, is refused and exits 1.
#[test]
fn follow_streams_with_a_token_in_scope_and_exits_on_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(dir.path(), false);
    let server = Server::start_with(&["--auth", auth.to_str().unwrap()]);
    let url = server.url();
    let log = dir.path().join("run.jsonl");
    let lines: String = (0..5).map(|s| format!("{{\"step\": {s}, \"loss\": 2.0}}\n")).collect();
    std::fs::write(&log, lines).unwrap();
    let follow = |job: &str| -> Vec<String> {
        [
            "follow",
            "--server",
            &url,
            "--poll",
            "20ms",
            "--job",
            job,
            log.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let run = |args: &[String], env: &[(&str, &str)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&args, env)
    };

    let refused = run(&follow("team-b/run"), &[("GRADGUARD_TOKEN", "token-a")]);
    refused.assert_code(1);
    assert!(refused.stderr.contains("PermissionDenied"), "{}", refused.stderr);
    let anonymous = run(&follow("team-a/run"), &[]);
    anonymous.assert_code(1);
    assert!(anonymous.stderr.contains("Unauthenticated"), "{}", anonymous.stderr);

    let mut child = Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .args(follow("team-a/run"))
        .env("GRADGUARD_TOKEN", "token-a")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = cli(&["jobs", "--server", &url, "--json"], &[("GRADGUARD_TOKEN", "token-a")]).json();
        if jobs.iter().any(|j| j["job"] == "team-a/run" && j["last_step"] == 4) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follow did not stream with its token: {jobs:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
