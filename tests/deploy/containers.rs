//! deploy/docker/: the Dockerfile's stages and the compose file refer to
//! files, stages, images, flags and ports that exist. Nothing here needs
//! Docker: the files are parsed, not built.

use std::path::{Path, PathBuf};

use yaml_rust2::Yaml;

use crate::support::{ServeFlags, list, read, repo, scalar, str_at, strings, yaml};

pub const DOCKERFILE: &str = "deploy/docker/Dockerfile";
pub const COMPOSE: &str = "deploy/docker/compose.yaml";

/// The image the compose file builds and the manifests run.
pub fn gradguard_image() -> String {
    format!("gradguard:{}", env!("CARGO_PKG_VERSION"))
}

/// One `FROM image AS name` stage and its instructions (continuations joined).
pub struct Stage {
    pub from: String,
    pub name: String,
    pub instructions: Vec<String>,
}

impl Stage {
    /// The arguments of every instruction of this kind (`USER`, `EXPOSE`, ...).
    pub fn all(&self, kind: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter_map(|i| {
                let (k, rest) = i.split_once(' ')?;
                k.eq_ignore_ascii_case(kind).then_some(rest.trim())
            })
            .collect()
    }
}

pub fn dockerfile_stages() -> Vec<Stage> {
    let text = read(&repo(DOCKERFILE));
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(line);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for i in joined {
        if let Some(rest) = i.strip_prefix("FROM ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            assert!(
                words.len() == 3 && words[1].eq_ignore_ascii_case("AS"),
                "{DOCKERFILE}: every stage is named: {i}"
            );
            stages.push(Stage {
                from: words[0].to_owned(),
                name: words[2].to_owned(),
                instructions: Vec::new(),
            });
        } else {
            stages
                .last_mut()
                .unwrap_or_else(|| panic!("{DOCKERFILE}: {i} before FROM"))
                .instructions
                .push(i);
        }
    }
    stages
}

fn stage<'a>(stages: &'a [Stage], name: &str) -> &'a Stage {
    stages
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{DOCKERFILE} has no stage {name}"))
}

/// Fails unless an image from outside the project names a fixed version (a
/// number, or a Debian release for Debian's own images).
pub fn assert_pinned(image: &str, context: &str) {
    let (_, tag) = image
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{context}: image {image} has no tag"));
    let debian_release = image.starts_with("debian:") && ["bookworm", "trixie"].iter().any(|r| tag.starts_with(r));
    assert!(
        tag != "latest" && (tag.chars().any(|c| c.is_ascii_digit()) || debian_release),
        "{context}: image {image} is not pinned to a version"
    );
}

/// A `major.minor` version as a comparable pair.
fn version(v: &str) -> (u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
    (parts.next().unwrap(), parts.next().unwrap_or(0))
}

#[test]
fn the_dockerfile_builds_a_non_root_runtime_with_a_supported_toolchain() {
    let stages = dockerfile_stages();
    let builder = stage(&stages, "builder");
    let runtime = stage(&stages, "runtime");
    stage(&stages, "tansu");
    for s in &stages {
        if !stages.iter().any(|other| other.name == s.from) {
            assert_pinned(&s.from, &format!("{DOCKERFILE} stage {}", s.name));
        }
    }

    // rust:1.95-bookworm: at least the crate's rust-version, on the runtime's Debian.
    let (rust, debian) = builder
        .from
        .strip_prefix("rust:")
        .and_then(|t| t.split_once('-'))
        .unwrap_or_else(|| panic!("the builder is not a rust:VERSION-DEBIAN image: {}", builder.from));
    assert!(
        version(rust) >= version(env!("CARGO_PKG_RUST_VERSION")),
        "rust {rust} is older than the crate's rust-version {}",
        env!("CARGO_PKG_RUST_VERSION")
    );
    assert_eq!(
        runtime.from,
        format!("debian:{debian}-slim"),
        "the runtime's glibc must be the builder's"
    );
    assert!(
        builder
            .all("RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the builder builds with the lock file"
    );

    // Non-root, the binary from the builder, the service's own ports.
    let user = runtime.all("USER");
    let user = user.last().expect("the runtime sets USER");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("a numeric USER");
    assert_ne!(uid, 0, "the runtime runs as root");
    assert!(runtime.all("COPY").iter().any(|c| c.starts_with("--from=builder")));
    assert_eq!(runtime.all("ENTRYPOINT"), [r#"["gradguard"]"#]);
    let serve = ServeFlags::load();
    let exposed: Vec<u16> = runtime
        .all("EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.parse().unwrap())
        .collect();
    for flag in ["--grpc-addr", "--metrics-addr"] {
        assert!(
            exposed.contains(&serve.default_port(flag)),
            "{flag} not exposed: {exposed:?}"
        );
    }
    for var in runtime.all("ENV").iter().flat_map(|e| e.split_whitespace()) {
        let name = var.split('=').next().unwrap();
        if name.starts_with("GRADGUARD_") {
            serve.check_env(name, DOCKERFILE);
        }
    }

    let ignore = read(&repo("deploy/docker/Dockerfile.dockerignore"));
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        "the build context leaves out target/"
    );
    // The secrets never reach an image, not even the builder's `COPY . .`,
    // nor git.
    assert!(
        ignore.lines().any(|l| l.trim() == format!("{SECRETS_DIR}/")),
        "the build context leaves out {SECRETS_DIR}/"
    );
    let gitignore = read(&repo(".gitignore"));
    assert!(
        gitignore.lines().any(|l| l.trim() == format!("/{SECRETS_DIR}/")),
        ".gitignore leaves out {SECRETS_DIR}/"
    );
}

/// Where deploy/make-secrets.sh writes by default, and compose reads secrets.
pub const SECRETS_DIR: &str = "deploy/docker/secrets";

/// The secrets a compose service mounts: (secret, path in the container).
fn mounted_secrets(s: &Yaml) -> Vec<(String, String)> {
    list(s, "secrets")
        .iter()
        .map(|m| match m.as_str() {
            Some(name) => (name.to_owned(), format!("/run/secrets/{name}")),
            None => {
                let source = str_at(m, "source", "a secret").to_owned();
                let target = m["target"].as_str().unwrap_or(&source);
                let target = if target.starts_with('/') {
                    target.to_owned()
                } else {
                    format!("/run/secrets/{target}")
                };
                (source, target)
            }
        })
        .collect()
}

pub fn compose() -> Yaml {
    yaml(&repo(COMPOSE))
}

/// A compose service by name.
pub fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &compose["services"][name];
    assert!(!s.is_badvalue(), "{COMPOSE} has no service {name}");
    s
}

/// `host:container` of a port mapping, as numbers.
fn port_mapping(p: &Yaml) -> (u16, u16) {
    let text = scalar(p);
    let (host, container) = text.split_once(':').unwrap_or_else(|| panic!("{COMPOSE}: port {text}"));
    (host.parse().unwrap(), container.parse().unwrap())
}

/// Where a bind mount's source is, relative to the compose file.
fn bind_source(volume: &str) -> Option<PathBuf> {
    let source = volume.split(':').next().unwrap();
    source.starts_with('.').then(|| repo("deploy/docker").join(source))
}

/// The container path a host path of the repository is mounted at.
pub fn mount_target(service: &Yaml, host: &Path) -> String {
    let host = host.canonicalize().unwrap();
    strings(list(service, "volumes"))
        .iter()
        .find(|v| bind_source(v).is_some_and(|s| s.canonicalize().ok() == Some(host.clone())))
        .map(|v| v.split(':').nth(1).unwrap().to_owned())
        .unwrap_or_else(|| panic!("{} is not mounted", host.display()))
}

/// The value following a flag in a command (`--flag value` or `--flag=value`).
pub fn flag_value(args: &[String], flag: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == flag {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{flag}=")).map(str::to_owned)
        }
    })
}

/// The port a listen flag is given, or its default.
pub fn listen_port(args: &[String], flag: &str, serve: &ServeFlags) -> u16 {
    flag_value(args, flag).map_or_else(
        || serve.default_port(flag),
        |v| v.rsplit(':').next().unwrap().parse().unwrap(),
    )
}

pub const REPLICAS: [&str; 2] = ["gradguard-1", "gradguard-2"];

#[test]
fn the_compose_file_refers_to_what_exists() {
    let compose = compose();
    let stages = dockerfile_stages();
    let serve = ServeFlags::load();
    let services = compose["services"].as_hash().expect("services");
    let names: Vec<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    for wanted in ["broker", "gradguard-1", "gradguard-2", "prometheus", "grafana"] {
        assert!(names.contains(&wanted), "{COMPOSE}: no service {wanted}");
    }
    let volumes: Vec<&str> = compose["volumes"]
        .as_hash()
        .map(|h| h.keys().map(|k| k.as_str().unwrap()).collect())
        .unwrap_or_default();

    for (name, s) in services {
        let name = name.as_str().unwrap();
        let image = str_at(s, "image", name);
        let build = &s["build"];
        if build.is_badvalue() {
            assert_pinned(image, &format!("{COMPOSE} service {name}"));
        } else {
            let context = repo("deploy/docker").join(str_at(build, "context", name));
            assert!(
                context.join("Cargo.toml").is_file(),
                "{name}: the context is not the repository root"
            );
            let dockerfile = context.join(str_at(build, "dockerfile", name));
            assert_eq!(
                dockerfile.canonicalize().unwrap(),
                repo(DOCKERFILE).canonicalize().unwrap()
            );
            let target = str_at(build, "target", name);
            stage(&stages, target);
            if target == "runtime" {
                assert_eq!(
                    image,
                    gradguard_image(),
                    "{name}: the image is tagged with the crate's version"
                );
            }
        }
        for v in strings(list(s, "volumes")) {
            match bind_source(&v) {
                Some(source) => assert!(source.exists(), "{name}: {v}: no {}", source.display()),
                None => {
                    let volume = v.split(':').next().unwrap();
                    assert!(volumes.contains(&volume), "{name}: volume {volume} is not declared");
                }
            }
        }
        for dep in strings(list(s, "depends_on")) {
            assert!(names.contains(&dep.as_str()), "{name} depends on an unknown {dep}");
        }
    }

    // Secrets: files deploy/make-secrets.sh writes, in the folder git and the
    // build context leave out; every /run/secrets/ path a service is given
    // is one it mounts.
    let declared = compose["secrets"].as_hash().expect("top-level secrets");
    let secret_file = |name: &str| -> String {
        let s = &declared[&Yaml::String(name.to_owned())];
        assert!(!s.is_badvalue(), "{name}: no such top-level secret");
        let file = str_at(s, "file", name);
        let base = file
            .strip_prefix("./secrets/")
            .unwrap_or_else(|| panic!("secret {name}: {file} is not in {SECRETS_DIR}/"));
        assert!(
            crate::secrets::FILES.contains(&base),
            "secret {name}: deploy/make-secrets.sh writes no {base}"
        );
        base.to_owned()
    };
    for (name, s) in services {
        let name = name.as_str().unwrap();
        let mounted = mounted_secrets(s);
        for (secret, _) in &mounted {
            secret_file(secret);
        }
        for word in strings(list(s, "command")) {
            if word.starts_with("/run/secrets/") {
                assert!(
                    mounted.iter().any(|(_, path)| *path == word),
                    "{name} is given {word}, which it does not mount"
                );
            }
        }
    }

    // The broker listens where the replicas look for it.
    let broker = service(&compose, "broker");
    let listener = str_at(&broker["environment"], "LISTENER_URL", "broker");
    let advertised = str_at(&broker["environment"], "ADVERTISED_LISTENER_URL", "broker");
    let broker_port = listener.rsplit(':').next().unwrap();
    assert_eq!(advertised, format!("tcp://broker:{broker_port}"));

    let scrape_targets = prometheus_targets();
    for replica in REPLICAS {
        let s = service(&compose, replica);
        let command = strings(list(s, "command"));
        assert_eq!(command.first().map(String::as_str), Some("serve"), "{replica}");
        for arg in command.iter().filter(|a| a.starts_with("--")) {
            serve.check_flag(arg, &format!("{COMPOSE} {replica}"));
        }
        assert_eq!(
            flag_value(&command, "--kafka-brokers"),
            Some(format!("broker:{broker_port}")),
            "{replica} runs in cluster mode against the broker"
        );
        for key in s["environment"].as_hash().into_iter().flat_map(|h| h.keys()) {
            let key = key.as_str().unwrap();
            if key.starts_with("GRADGUARD_") {
                serve.check_env(key, replica);
            }
        }
        let ports: Vec<(u16, u16)> = list(s, "ports").iter().map(port_mapping).collect();
        let metrics = listen_port(&command, "--metrics-addr", &serve);
        for flag in ["--grpc-addr", "--metrics-addr"] {
            let port = listen_port(&command, flag, &serve);
            assert!(
                ports.iter().any(|p| p.1 == port),
                "{replica}: {flag} port {port} not published"
            );
        }
        assert!(
            scrape_targets.contains(&format!("{replica}:{metrics}")),
            "deploy/prometheus/prometheus.yml does not scrape {replica}:{metrics}: {scrape_targets:?}"
        );
        // TLS with the certificate and key make-secrets.sh made, metrics
        // over TLS too, principals from the auth file.
        let mounted = mounted_secrets(s);
        let file_of = |flag: &str| -> String {
            let path = flag_value(&command, flag).unwrap_or_else(|| panic!("{replica}: no {flag}"));
            let (secret, _) = mounted
                .iter()
                .find(|(_, p)| *p == path)
                .unwrap_or_else(|| panic!("{replica}: {flag} {path} is not a mounted secret"));
            secret_file(secret)
        };
        assert_eq!(file_of("--tls-cert"), "server.crt");
        assert_eq!(file_of("--tls-key"), "server.key");
        assert_eq!(file_of("--auth"), "auth.toml");
        assert!(
            command.iter().any(|a| a == "--metrics-tls"),
            "{replica}: no --metrics-tls"
        );
    }
    assert_eq!(scrape_targets.len(), REPLICAS.len(), "{scrape_targets:?}");

    // Prometheus reads the project's config where it is mounted.
    let prometheus = service(&compose, "prometheus");
    let config_dir = mount_target(prometheus, &repo("deploy/prometheus"));
    let command = strings(list(prometheus, "command"));
    assert!(
        command.contains(&format!("--config.file={config_dir}/prometheus.yml")),
        "{command:?}"
    );
    assert!(command.contains(&format!("--web.listen-address=0.0.0.0:{}", PROMETHEUS_PORT)));
    // It scrapes over HTTPS, trusting the CA make-secrets.sh made.
    let job = prometheus_job();
    assert_eq!(job["scheme"].as_str(), Some("https"), "the replicas run --metrics-tls");
    let ca = str_at(&job["tls_config"], "ca_file", "the gradguard scrape job");
    let (secret, _) = mounted_secrets(prometheus)
        .into_iter()
        .find(|(_, p)| p == ca)
        .unwrap_or_else(|| panic!("prometheus does not mount the ca_file {ca}"));
    assert_eq!(secret_file(&secret), "ca.crt");
}

/// The `gradguard` scrape job of deploy/prometheus/prometheus.yml.
pub fn prometheus_job() -> Yaml {
    let config = yaml(&repo("deploy/prometheus/prometheus.yml"));
    list(&config, "scrape_configs")
        .iter()
        .find(|c| c["job_name"].as_str() == Some("gradguard"))
        .expect("a gradguard scrape job")
        .clone()
}

/// The port Prometheus listens on in the compose file.
pub const PROMETHEUS_PORT: u16 = 9090;

/// The targets of the `gradguard` scrape job in deploy/prometheus/prometheus.yml.
pub fn prometheus_targets() -> Vec<String> {
    let job = prometheus_job();
    list(&job, "static_configs")
        .iter()
        .flat_map(|c| strings(list(c, "targets")))
        .collect()
}
