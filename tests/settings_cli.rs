//! How `gradguard serve` and `simulate` are configured: the settings file
//! (`--settings`, versioned, flags over it) apart from the rules file, which
//! is `--rules` on every command (`--config`, its old name, still works with
//! a note on stderr, and so does a `[kafka]` section left in the rules file).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_gradguard");

/// Runs `gradguard serve` with these flags (and environment variables) until it
/// prints its `listening` line, then kills it. Returns the line and stderr.
fn serve_up(args: &[&str], env: &[(&str, &str)]) -> (String, String) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env_remove("GRADGUARD_CONFIG")
        .env_remove("GRADGUARD_RULES")
        .env_remove("GRADGUARD_SETTINGS")
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start gradguard serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(line.starts_with("listening "), "serve did not come up:\n{stderr}");
    (line, stderr)
}

/// Runs `gradguard ARGS` to completion (it must fail) and returns its exit
/// code and stderr.
fn fails(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("GRADGUARD_CONFIG")
        .env_remove("GRADGUARD_RULES")
        .env_remove("GRADGUARD_SETTINGS")
        .envs(env.iter().copied())
        .output()
        .expect("run gradguard");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

const LOCAL: [&str; 5] = [
    "--no-store",
    "--grpc-addr",
    "127.0.0.1:0",
    "--metrics-addr",
    "127.0.0.1:0",
];

#[test]
fn serve_reads_the_rules_file_from_rules_and_still_from_config_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "good.toml", "[grad_spike]\nz = 3.0\n");
    let bad = write(dir.path(), "bad.toml", "[grad_spike]\nz = -1.0\n");

    let (_, err) = serve_up(&[&LOCAL[..], &["--rules", &good]].concat(), &[]);
    assert!(!err.contains("deprecated"), "{err}");
    let (_, err) = serve_up(&LOCAL, &[("GRADGUARD_RULES", &good)]);
    assert!(!err.contains("deprecated"), "{err}");
    // The old environment variable works, and says so.
    let (_, err) = serve_up(&LOCAL, &[("GRADGUARD_CONFIG", &good)]);
    assert!(
        err.contains("GRADGUARD_CONFIG is deprecated") && err.contains("GRADGUARD_RULES"),
        "{err}"
    );
    let (code, err) = fails(&["serve"], &[("GRADGUARD_CONFIG", &bad)]);
    assert_eq!(code, 2, "GRADGUARD_CONFIG is read: {err}");
    // A --rules flag beats the old variable, silently.
    let (_, err) = serve_up(
        &[&LOCAL[..], &["--rules", &good]].concat(),
        &[("GRADGUARD_CONFIG", &bad)],
    );
    assert!(!err.contains("deprecated"), "{err}");

    // The old name works, and says so.
    let (_, err) = serve_up(&[&LOCAL[..], &["--config", &good]].concat(), &[]);
    assert!(
        err.contains("--config is deprecated") && err.contains(&format!("use --rules {good}")),
        "{err}"
    );
    let (code, err) = fails(&["serve", "--config", &bad], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("grad_spike.z = -1"), "{err}");

    // A --config flag beats the environment variable of --rules, as any flag does;
    // two flags for one file are a usage error.
    let (code, err) = fails(&["serve", "--config", &bad], &[("GRADGUARD_RULES", &good)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("grad_spike.z = -1"), "{err}");
    let (code, err) = fails(&["serve", "--rules", &good, "--config", &good], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give only --rules"), "{err}");
}

#[test]
fn simulate_takes_rules_and_still_config_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(dir.path(), "bad.toml", "[grad_spike]\nz = -1.0\n");
    // The rules file is read before any broker is contacted.
    let kafka = ["simulate", "--scenario", "healthy", "--kafka-brokers", "127.0.0.1:9"];

    let (code, err) = fails(&[&kafka[..], &["--rules", &bad]].concat(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("--rules {bad}")) && err.contains("grad_spike.z = -1"),
        "{err}"
    );
    assert!(!err.contains("deprecated"), "{err}");

    let (code, err) = fails(&[&kafka[..], &["--config", &bad]].concat(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("grad_spike.z = -1"), "{err}");
    assert!(err.contains("--config is deprecated"), "{err}");
}

/// The address of a `listening` line's field (`grpc=`, `metrics=`).
fn listening(line: &str, field: &str) -> std::net::SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn serve_runs_on_a_settings_file_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap();
    let store = dir.path().join("store");
    let settings = write(
        dir.path(),
        "settings.toml",
        &format!(
            "version = 1\n[listen]\ngrpc = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\n\
             [limits]\nmax_jobs = 10\njob_ttl = \"1m\"\n[store]\ndir = {:?}\nsync = \"normal\"\nretention = \"7d\"\n",
            store.to_str().unwrap()
        ),
    );

    // Addresses and store from the file alone.
    let (line, err) = serve_up(&["--settings", &settings], &[]);
    assert!(!err.contains("warning"), "{err}");
    assert!(listening(&line, "grpc=").ip().is_loopback(), "{line}");
    assert_ne!(listening(&line, "metrics=").port(), 0, "{line}");
    assert!(
        store.join("gradguard.db").exists(),
        "the store is where [store] dir says"
    );

    // The environment variable names the file too.
    serve_up(&[], &[("GRADGUARD_SETTINGS", &settings)]);

    // A flag beats the file; a flag left at its default does not.
    let on_taken = write(
        dir.path(),
        "taken.toml",
        &format!("version = 1\n[listen]\ngrpc = \"{taken}\"\nmetrics = \"127.0.0.1:0\"\n[store]\nenabled = false\n"),
    );
    serve_up(&["--settings", &on_taken, "--grpc-addr", "127.0.0.1:0"], &[]);
    let (code, err) = fails(&["serve", "--settings", &on_taken], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot bind listen.grpc (--settings {on_taken}) {taken}")),
        "{err}"
    );
    let (code, err) = fails(
        &["serve", "--settings", &on_taken],
        &[("GRADGUARD_GRPC_ADDR", &taken.to_string())],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot bind --grpc-addr {taken}")), "{err}");
}

#[test]
fn a_bad_settings_file_is_a_usage_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (name, text, expected) in [
        (
            "unknown.toml",
            "version = 1\n[listen]\ngrcp = \"127.0.0.1:0\"\n",
            "unknown field `grcp`",
        ),
        (
            "rules.toml",
            "version = 1\n[grad_spike]\nz = 3.0\n",
            "unknown field `grad_spike`",
        ),
        (
            "noversion.toml",
            "[listen]\ngrpc = \"127.0.0.1:0\"\n",
            "version is missing",
        ),
        ("v2.toml", "version = 2\n", "version = 2 is not supported"),
        (
            "range.toml",
            "version = 1\n[limits]\nmax_jobs = 0\n",
            "limits.max_jobs = 0: must be between 1 and 1000000",
        ),
        (
            "ttl.toml",
            "version = 1\n[limits]\njob_ttl = \"soon\"\n",
            "\"soon\" is not a duration",
        ),
    ] {
        let path = write(dir.path(), name, text);
        let (code, err) = fails(&["serve", "--settings", &path], &[]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(
            err.contains(&format!("--settings {path}")) && err.contains(expected),
            "{name}: {err}"
        );
    }
    let (code, err) = fails(&["serve", "--settings", "/no/such/settings.toml"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("cannot read settings file /no/such/settings.toml"),
        "{err}"
    );
}

#[test]
fn a_kafka_section_in_the_rules_file_still_works_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    // No brokers: the section is read (and checked), the service runs embedded.
    let rules = write(
        dir.path(),
        "rules.toml",
        "[grad_spike]\nz = 3.0\n[kafka]\npartitions = 3\n",
    );
    let (_, err) = serve_up(&[&LOCAL[..], &["--rules", &rules]].concat(), &[]);
    assert!(
        err.contains(&format!("the [kafka] section of the rules file {rules} is deprecated"))
            && err.contains("move it to the settings file"),
        "{err}"
    );

    // In both files: which one is meant is not guessed.
    let settings = write(dir.path(), "settings.toml", "version = 1\n[kafka]\npartitions = 3\n");
    let (code, err) = fails(&["serve", "--rules", &rules, "--settings", &settings], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("[kafka] is in both"), "{err}");

    // simulate reads it too, before contacting any broker.
    let bad = write(dir.path(), "bad.toml", "[kafka]\npartitions = 0\n");
    let kafka = ["simulate", "--scenario", "healthy", "--kafka-brokers", "127.0.0.1:9"];
    let (code, err) = fails(&[&kafka[..], &["--rules", &bad]].concat(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is deprecated") && err.contains("kafka.partitions: 0"),
        "{err}"
    );
    let (code, err) = fails(
        &[&kafka[..], &["--rules", &rules, "--settings", &settings]].concat(),
        &[],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("[kafka] is in both"), "{err}");
    let bad_settings = write(
        dir.path(),
        "bad-settings.toml",
        "version = 1\n[kafka]\ngroupp = \"g\"\n",
    );
    let (code, err) = fails(&[&kafka[..], &["--settings", &bad_settings]].concat(), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("--settings {bad_settings}")) && err.contains("groupp"),
        "{err}"
    );
}

/// The README's example settings file is valid, and its values are the defaults.
#[test]
fn the_readme_example_is_a_valid_settings_file_of_the_defaults() {
    use gradguard::service::SettingsFile;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let at = readme
        .find("**Settings file.**")
        .expect("the README's Settings file paragraph");
    let block = readme[at..].split("```toml\n").nth(1).unwrap();
    let example = block.split("```").next().unwrap();
    let file = SettingsFile::parse_str(example, "README.md").unwrap();
    let example = file.resolve(None).unwrap();
    let defaults = SettingsFile::parse_str("version = 1", "defaults")
        .unwrap()
        .resolve(None)
        .unwrap();
    assert_eq!(example.grpc_addr, defaults.grpc_addr);
    assert_eq!(example.metrics_addr, defaults.metrics_addr);
    let (e, d) = (&example.service, &defaults.service);
    assert_eq!(e.limits.max_jobs, d.limits.max_jobs);
    assert_eq!(e.limits.job_ttl, d.limits.job_ttl);
    assert_eq!(e.queries.timeout, d.queries.timeout);
    assert_eq!(
        (e.max_message_bytes, e.stream_queue),
        (d.max_message_bytes, d.stream_queue)
    );
    let (es, ds) = (e.store.as_ref().unwrap(), d.store.as_ref().unwrap());
    assert_eq!((&es.dir, es.sync, es.retention), (&ds.dir, ds.sync, ds.retention));
    assert_eq!(e.kafka.as_ref().unwrap().brokers.as_deref(), Some("broker1:9092"));
}

#[test]
fn every_serve_flag_reads_an_environment_variable() {
    let out = Command::new(BIN).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    // Each option's block: from its `--flag` line to the next one.
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let flag = trimmed
            .strip_prefix("-h, ")
            .unwrap_or(trimmed)
            .strip_prefix("--")
            .filter(|_| line.starts_with("  "));
        match flag {
            Some(rest) => blocks.push((rest.split_whitespace().next().unwrap().to_owned(), line.to_owned())),
            None => {
                if let Some((_, text)) = blocks.last_mut() {
                    text.push_str(line);
                }
            }
        }
    }
    let flags: Vec<&str> = blocks.iter().map(|(f, _)| f.as_str()).collect();
    assert!(flags.len() >= 25 && flags.contains(&"threads"), "{flags:?}");
    for (flag, text) in &blocks {
        if flag == "help" {
            continue;
        }
        let wanted = format!("[env: GRADGUARD_{}=", flag.to_uppercase().replace('-', "_"));
        assert!(text.contains(&wanted), "--{flag} reads no {wanted}...]: {text}");
    }
}

#[test]
fn serve_logs_json_lines_when_asked() {
    for (args, env) in [
        (vec!["--log-format", "json"], vec![]),
        (vec![], vec![("GRADGUARD_LOG_FORMAT", "json")]),
    ] {
        let (_, err) = serve_up(&[&LOCAL[..], &args].concat(), &env);
        let lines: Vec<serde_json::Value> = err
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        let warning = lines
            .iter()
            .find(|l| l["level"] == "WARN")
            .unwrap_or_else(|| panic!("no warning logged: {err}"));
        assert!(warning["message"].as_str().unwrap().contains("no --auth"), "{warning}");
        assert!(
            warning["timestamp"].is_string() && warning["target"].is_string(),
            "{warning}"
        );
    }
    let (code, err) = fails(&["serve", "--log-format", "xml"], &[]);
    assert_eq!(code, 2, "{err}");
}

/// `gradguard completions bash` is a script bash accepts, and completes the
/// commands and the flags.
#[test]
fn bash_completes_commands_and_flags() {
    let out = Command::new(BIN).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "gradguard.bash", &String::from_utf8(out.stdout).unwrap());
    let complete = |words: &str| -> String {
        // As bash calls it: the command, the word being completed, the one before.
        let all: Vec<&str> = words.split_whitespace().collect();
        let n = all.len();
        let program = format!(
            "source {script}; COMP_WORDS=({words}); COMP_CWORD={}; _gradguard gradguard {} {}; echo \"${{COMPREPLY[@]}}\"",
            n - 1,
            all[n - 1],
            all[n - 2]
        );
        let out = Command::new("bash").args(["-c", &program]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(complete("gradguard fol"), "follow");
    assert_eq!(complete("gradguard serve --log-f"), "--log-format");
    assert!(complete("gradguard replay --sev").contains("--severity"));
    let (code, err) = fails(&["completions", "tcsh"], &[]);
    assert_eq!(code, 2, "{err}");
}
