//! deploy/k8s/ (standalone) and deploy/k8s-kafka/ (the cluster-mode overlay
//! on it), as `kubectl kustomize` renders them: they pass schema validation
//! (deploy/validate/k8s.py), fit together (selectors, port names, the
//! ConfigMap's keys, volumes) and run what exists: the image the compose file
//! builds, flags `gradguard serve` takes, a rules file it accepts. The
//! standalone base, run as its pod runs it, is ready with nothing else running.
//!
//! The tools (kubectl, kubernetes-validate, the Prometheus Operator's models)
//! come from the venv of deploy/validate/requirements.txt; without it these
//! tests fail saying how to make it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use yaml_rust2::{Yaml, YamlLoader};

use crate::containers::{dockerfile_stages, flag_value, gradguard_image, listen_port};
use crate::support::{ServeFlags, list, repo, scalar, str_at, strings, yaml};

/// Standalone: `kubectl apply -k deploy/k8s`.
pub const BASE: &str = "deploy/k8s";
/// Cluster mode over Kafka: `kubectl apply -k deploy/k8s-kafka`.
pub const KAFKA: &str = "deploy/k8s-kafka";

/// A tool of the validation venv (deploy/validate/requirements.txt). Missing,
/// it fails the test with how to make the venv: never passes by skipping.
pub fn venv_tool(name: &str) -> PathBuf {
    let path = repo("deploy/validate/.venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: the Kubernetes manifest tests need the venv of deploy/validate/requirements.txt \
         (kubectl, kubernetes-validate, the Prometheus Operator's models), which .ci/run makes: \
         python3 -m venv deploy/validate/.venv && \
         deploy/validate/.venv/bin/pip install -r deploy/validate/requirements.txt",
        path.display()
    );
    path
}

/// The objects `kubectl apply -k DIR` would apply, as `kubectl kustomize` renders them.
pub fn render(dir: &str) -> Vec<Yaml> {
    let out = Command::new(venv_tool("kubectl"))
        .arg("kustomize")
        .arg(repo(dir))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("kubectl kustomize {dir}: not YAML: {e}"))
}

/// The `.yaml` files of a folder of the repository, but its kustomization.
fn manifest_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

#[test]
fn each_kustomization_lists_every_manifest_of_its_folder() {
    // The base: every manifest a resource.
    let base = yaml(&repo(&format!("{BASE}/kustomization.yaml")));
    let mut resources = strings(list(&base, "resources"));
    resources.sort();
    assert_eq!(
        resources,
        manifest_files(BASE),
        "{BASE}: resources, every manifest and only those"
    );
    // The overlay: the base, then every other manifest a patch. (Kustomize
    // refuses a base that contains its overlay, so the overlay is a sibling.)
    let overlay = yaml(&repo(&format!("{KAFKA}/kustomization.yaml")));
    let rel = format!("../{}", BASE.rsplit('/').next().unwrap());
    assert_eq!(strings(list(&overlay, "resources")), [rel], "{KAFKA}: the base, only");
    let mut patches: Vec<String> = list(&overlay, "patches")
        .iter()
        .map(|p| str_at(p, "path", "a patch").to_owned())
        .collect();
    patches.sort();
    assert_eq!(
        patches,
        manifest_files(KAFKA),
        "{KAFKA}: patches, every manifest and only those"
    );
}

#[test]
fn the_readmes_apply_both_kustomizations_and_no_other() {
    for readme in ["README.md", "deploy/README.md"] {
        let text = crate::support::read(&repo(readme));
        let code: String = text.split("```").skip(1).step_by(2).collect::<Vec<_>>().join("\n");
        let mut applied: Vec<&str> = code
            .lines()
            .filter_map(|l| l.split("kubectl apply -k ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap().trim_end_matches('/'))
            .collect();
        applied.sort();
        applied.dedup();
        assert_eq!(applied, [BASE, KAFKA], "{readme}: the `kubectl apply -k` commands");
    }
}

#[test]
fn both_renderings_pass_schema_validation() {
    let out = Command::new(venv_tool("python"))
        .arg(repo("deploy/validate/k8s.py"))
        .args([repo(BASE), repo(KAFKA)])
        .output()
        .expect("run deploy/validate/k8s.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "deploy/validate/k8s.py {BASE} {KAFKA} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every object of both was validated, none let through.
    let objects = render(BASE).len() + render(KAFKA).len();
    assert_eq!(text.lines().filter(|l| l.starts_with("ok ")).count(), objects, "{text}");
}

/// Runs deploy/validate/k8s.py on YAML text; (success, its output).
fn validate_text(text: &str) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(venv_tool("python"))
        .arg(repo("deploy/validate/k8s.py"))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run deploy/validate/k8s.py");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_validator_refuses_what_a_cluster_would() {
    // (name, kind, apiVersion, spec): a valid object of each checked sort;
    // then each broken in one place, its name saying how.
    let service = "{ports: [{name: grpc, port: 50051}]}";
    let monitor = "{selector: {matchLabels: {app: x}}, endpoints: [{port: metrics, interval: 15s}]}";
    let doc = |name: &str, kind: &str, api: &str, spec: &str| {
        format!("---\napiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}}}\nspec: {spec}\n")
    };
    let sm = "monitoring.coreos.com/v1";
    let valid = [
        doc("ok", "Service", "v1", service),
        doc("ok", "ServiceMonitor", sm, monitor),
    ]
    .concat();
    let (ok, text) = validate_text(&valid);
    assert!(ok, "{text}");
    let broken = [
        (
            "Service/unknown-field",
            doc("unknown-field", "Service", "v1", &service.replace("name:", "nmae:")),
        ),
        (
            "Service/wrong-type",
            doc("wrong-type", "Service", "v1", &service.replace("50051", "grpc")),
        ),
        (
            "ServiceMonitor/unknown-field",
            doc(
                "unknown-field",
                "ServiceMonitor",
                sm,
                &monitor.replace("}]}", ", honourLabels: true}]}"),
            ),
        ),
        (
            "ServiceMonitor/bad-duration",
            doc(
                "bad-duration",
                "ServiceMonitor",
                sm,
                &monitor.replace("15s", "15 seconds"),
            ),
        ),
        ("Servic/unknown-kind", doc("unknown-kind", "Servic", "v1", service)),
        (
            "ServiceMonitor/unknown-version",
            doc("unknown-version", "ServiceMonitor", "monitoring.coreos.com/v2", monitor),
        ),
    ];
    let (ok, text) = validate_text(&broken.iter().map(|(_, d)| d.as_str()).collect::<String>());
    assert!(!ok, "broken objects accepted:\n{text}");
    for (object, _) in &broken {
        assert!(
            text.lines()
                .any(|l| l.starts_with("FAIL ") && l.contains(&format!(" {object}:"))),
            "{object} was not refused:\n{text}"
        );
    }
}

fn one<'a>(docs: &'a [Yaml], kind: &str, what: &str) -> &'a Yaml {
    let found: Vec<&Yaml> = docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect();
    assert_eq!(found.len(), 1, "{what}: one {kind} expected");
    found[0]
}

/// Fails unless every label of `selector` is on `labels`.
fn assert_selects(selector: &Yaml, labels: &Yaml, what: &str) {
    let selector = selector.as_hash().unwrap_or_else(|| panic!("{what}: no selector"));
    assert!(!selector.is_empty(), "{what}: an empty selector");
    for (k, v) in selector {
        assert_eq!(&labels[k.as_str().unwrap()], v, "{what}: label {k:?}");
    }
}

/// A rendered deployment that passed the checks both pass.
pub struct Deployment {
    pub docs: Vec<Yaml>,
    /// The gradguard container's arguments.
    pub args: Vec<String>,
}

impl Deployment {
    pub fn kind(&self, kind: &str) -> &Yaml {
        one(&self.docs, kind, "the rendering")
    }

    pub fn container(&self) -> &Yaml {
        &list(&self.kind("StatefulSet")["spec"]["template"]["spec"], "containers")[0]
    }

    pub fn replicas(&self) -> i64 {
        self.kind("StatefulSet")["spec"]["replicas"].as_i64().unwrap_or(1)
    }

    pub fn config(&self) -> &Yaml {
        &self.kind("ConfigMap")["data"]
    }
}

/// Renders `dir` and checks what holds for the base and the overlay alike:
/// selectors, ports, flags `gradguard serve` takes, ConfigMap keys, volumes,
/// the image, TLS, the Secrets, the ServiceMonitor, the rules file.
fn check_deployment(dir: &str) -> Deployment {
    let docs = render(dir);
    for d in &docs {
        assert!(d["apiVersion"].as_str().is_some(), "{dir}: no apiVersion in {d:?}");
        assert!(
            d["metadata"]["name"].as_str().is_some(),
            "{dir}: no metadata.name in {d:?}"
        );
    }
    let sts = one(&docs, "StatefulSet", dir);
    let svc = one(&docs, "Service", dir);
    let cm = one(&docs, "ConfigMap", dir);
    let monitor = one(&docs, "ServiceMonitor", dir);
    one(&docs, "PrometheusRule", dir);
    let serve = ServeFlags::load();

    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_selects(&sts["spec"]["selector"]["matchLabels"], labels, "the StatefulSet");
    assert_selects(&svc["spec"]["selector"], labels, "the Service");
    assert_eq!(sts["spec"]["serviceName"], svc["metadata"]["name"]);
    let containers = list(&pod["spec"], "containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // The image compose builds, run as the Dockerfile's user.
    assert_eq!(str_at(c, "image", "the container"), gradguard_image());
    let stages = dockerfile_stages();
    let runtime = stages.iter().find(|s| s.name == "runtime").unwrap();
    let uid = runtime
        .all("USER")
        .last()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(scalar(&pod["spec"]["securityContext"]["runAsUser"]), uid);

    // Flags serve takes; $(VAR)s the container defines; ConfigMap keys that exist.
    let args = strings(list(c, "args"));
    assert_eq!(args.first().map(String::as_str), Some("serve"));
    for a in args.iter().filter(|a| a.starts_with("--")) {
        serve.check_flag(a, "the StatefulSet's args");
    }
    let env = list(c, "env");
    let env_names: Vec<&str> = env.iter().map(|e| str_at(e, "name", "an env var")).collect();
    for a in &args {
        if let Some(var) = a.strip_prefix("$(").and_then(|v| v.strip_suffix(')')) {
            assert!(env_names.contains(&var), "{a} is not defined in env");
        }
    }
    let cm_name = str_at(&cm["metadata"], "name", "the ConfigMap");
    let cm_data = cm["data"].as_hash().expect("ConfigMap data");
    let has_key = |key: &str| cm_data.contains_key(&Yaml::String(key.to_owned()));
    for e in env {
        let name = str_at(e, "name", "an env var");
        if name.starts_with("GRADGUARD_") {
            serve.check_env(name, "the StatefulSet's env");
        }
        let r = &e["valueFrom"]["configMapKeyRef"];
        if !r.is_badvalue() {
            assert_eq!(str_at(r, "name", name), cm_name);
            assert!(has_key(str_at(r, "key", name)), "{name}: no such key in the ConfigMap");
        }
    }
    // Volumes: the rules from the ConfigMap where --rules looks, the data
    // claim where --data-dir points.
    let volumes = list(&pod["spec"], "volumes");
    let claims = list(&sts["spec"], "volumeClaimTemplates");
    for m in list(c, "volumeMounts") {
        let name = str_at(m, "name", "a volumeMount");
        let known = volumes.iter().any(|v| v["name"].as_str() == Some(name))
            || claims.iter().any(|v| v["metadata"]["name"].as_str() == Some(name));
        assert!(known, "volumeMount {name} has no volume");
    }
    let mount_of = |volume: &str| -> String {
        let m = list(c, "volumeMounts")
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .unwrap_or_else(|| panic!("volume {volume} is not mounted"));
        str_at(m, "mountPath", volume).to_owned()
    };
    let config_volume = volumes
        .iter()
        .find(|v| !v["configMap"].is_badvalue())
        .expect("a ConfigMap volume");
    assert_eq!(
        str_at(&config_volume["configMap"], "name", "the config volume"),
        cm_name
    );
    let items = list(&config_volume["configMap"], "items");
    for item in items {
        assert!(has_key(str_at(item, "key", "an item")), "{item:?}");
    }
    let config = flag_value(&args, "--rules").expect("--rules");
    let config_dir = mount_of(str_at(config_volume, "name", "the config volume"));
    let file = config
        .strip_prefix(&format!("{config_dir}/"))
        .unwrap_or_else(|| panic!("--rules {config} is not in the config volume at {config_dir}"));
    let item = items
        .iter()
        .find(|i| i["path"].as_str() == Some(file))
        .unwrap_or_else(|| panic!("the config volume has no {file}"));
    let rules_key = str_at(item, "key", "the config item");
    assert_eq!(claims.len(), 1);
    let claim = str_at(&claims[0]["metadata"], "name", "the claim");
    assert_eq!(flag_value(&args, "--data-dir"), Some(mount_of(claim)));
    // Retention keeps the store below the claim.
    let storage = str_at(&claims[0]["spec"]["resources"]["requests"], "storage", "the claim");
    let gib: u64 = storage.strip_suffix("Gi").expect("a size in Gi").parse().unwrap();
    let max_mib: u64 = flag_value(&args, "--store-max-mib").map_or(10240, |v| v.parse().unwrap());
    assert!(max_mib < gib * 1024, "--store-max-mib {max_mib} does not fit {storage}");

    // Ports: the ones serve listens on, named; the Service and the probes use them.
    let ports = list(c, "ports");
    let port_named = |name: &str| -> u16 {
        let p = ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no container port {name}"));
        p["containerPort"].as_i64().unwrap() as u16
    };
    assert_eq!(port_named("grpc"), listen_port(&args, "--grpc-addr", &serve));
    assert_eq!(port_named("metrics"), listen_port(&args, "--metrics-addr", &serve));
    let svc_ports = list(&svc["spec"], "ports");
    for p in svc_ports {
        port_named(str_at(p, "targetPort", "a Service port"));
    }
    // TLS on gRPC: the kubelet's gRPC probe cannot speak it, so readiness
    // asks /readyz (gRPC health's status) and liveness /healthz on the
    // metrics port; over HTTPS when the metrics port is TLS.
    let tls = flag_value(&args, "--tls-cert").is_some();
    let metrics_tls = args.iter().any(|a| a == "--metrics-tls");
    assert!(tls && metrics_tls, "{dir}: the replicas run with TLS on both ports");
    let probes: &[&str] = if tls {
        assert!(c["readinessProbe"]["grpc"].is_badvalue(), "a gRPC probe on a TLS port");
        &["readinessProbe", "livenessProbe"]
    } else {
        assert_eq!(
            scalar(&c["readinessProbe"]["grpc"]["port"]),
            port_named("grpc").to_string()
        );
        &["livenessProbe"]
    };
    for probe in probes {
        let get = &c[*probe]["httpGet"];
        let path = if *probe == "readinessProbe" {
            "/readyz"
        } else {
            "/healthz"
        };
        assert_eq!(str_at(get, "path", probe), path);
        assert_eq!(port_named(str_at(get, "port", probe)), port_named("metrics"));
        assert_eq!(
            get["scheme"].as_str().unwrap_or("HTTP"),
            if metrics_tls { "HTTPS" } else { "HTTP" },
            "{probe}"
        );
    }

    // The certificate, its key and the principals come from Secrets mounted
    // whole (a subPath mount never sees a renewed certificate), under the
    // names and keys deploy/README.md creates them with.
    let secret_of = |flag: &str| -> (String, String) {
        let path = flag_value(&args, flag).unwrap_or_else(|| panic!("no {flag}"));
        let (dir, file) = path.rsplit_once('/').unwrap();
        let m = list(c, "volumeMounts")
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(dir))
            .unwrap_or_else(|| panic!("{flag} {path}: nothing is mounted at {dir}"));
        assert!(m["subPath"].is_badvalue(), "{flag}: a subPath mount");
        let name = str_at(m, "name", "a volumeMount");
        let v = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        let secret = &v["secret"];
        assert!(!secret.is_badvalue(), "{flag}: volume {name} is not a Secret");
        let key = list(secret, "items")
            .iter()
            .find(|i| i["path"].as_str() == Some(file))
            .map_or(file, |i| str_at(i, "key", "an item"));
        (str_at(secret, "secretName", name).to_owned(), key.to_owned())
    };
    let created = readme_secrets();
    for (flag, want) in [
        ("--tls-cert", ("gradguard-tls", "tls.crt")),
        ("--tls-key", ("gradguard-tls", "tls.key")),
        ("--auth", ("gradguard-auth", "auth.toml")),
    ] {
        let (secret, key) = secret_of(flag);
        assert_eq!((secret.as_str(), key.as_str()), want, "{flag}");
        assert!(
            created.iter().any(|(s, k, _)| *s == secret && *k == key),
            "deploy/README.md creates no key {key} in Secret {secret}: {created:?}"
        );
    }

    // The ServiceMonitor scrapes the Service's metrics port as prometheus.yml does.
    assert_selects(
        &monitor["spec"]["selector"]["matchLabels"],
        &svc["metadata"]["labels"],
        "the ServiceMonitor",
    );
    let endpoints = list(&monitor["spec"], "endpoints");
    assert_eq!(endpoints.len(), 1);
    let port = str_at(&endpoints[0], "port", "the endpoint");
    assert!(svc_ports.iter().any(|p| p["name"].as_str() == Some(port)));
    assert!(
        endpoints[0]["honorLabels"].is_badvalue(),
        "the training job is `training_job`: no honorLabels"
    );
    assert_eq!(str_at(&endpoints[0], "path", "the endpoint"), "/metrics");
    // Over HTTPS when the metrics port is TLS, trusting the CA in the TLS
    // Secret, and checking a name the certificate carries (Prometheus
    // scrapes pod IPs, which it does not).
    let ep = &endpoints[0];
    assert_eq!(
        ep["scheme"].as_str().unwrap_or("http"),
        if metrics_tls { "https" } else { "http" }
    );
    if metrics_tls {
        let ca = &ep["tlsConfig"]["ca"]["secret"];
        let ca = (str_at(ca, "name", "the CA secret"), str_at(ca, "key", "the CA secret"));
        assert_eq!(ca, ("gradguard-tls", "ca.crt"));
        assert!(
            created.iter().any(|(s, k, _)| s == ca.0 && k == ca.1),
            "deploy/README.md creates no {ca:?}"
        );
        let server_name = str_at(&ep["tlsConfig"], "serverName", "the endpoint's tlsConfig");
        let names = crate::secrets::Secrets::make().server_names();
        assert!(
            names.iter().any(|n| n == server_name),
            "serverName {server_name} is not in the certificate deploy/make-secrets.sh makes: {names:?}"
        );
    }
    // The service alerts expect job="gradguard": the job is named after the Service.
    assert_eq!(str_at(&svc["metadata"], "name", "the Service"), "gradguard");
    assert!(monitor["spec"]["jobLabel"].is_badvalue());

    // The rules file in the ConfigMap is one `gradguard serve --rules` accepts.
    let rules = cm_data[&Yaml::String(rules_key.to_owned())].as_str().unwrap();
    assert_serve_accepts(rules);
    Deployment { docs, args }
}

#[test]
fn the_standalone_base_is_one_replica_with_its_own_store_and_no_broker() {
    let d = check_deployment(BASE);
    assert_eq!(d.replicas(), 1, "{BASE}: one replica");
    assert_eq!(
        flag_value(&d.args, "--kafka-brokers"),
        None,
        "{BASE}: standalone, no --kafka-brokers"
    );
    let env = strings(
        &list(d.container(), "env")
            .iter()
            .map(|e| e["name"].clone())
            .collect::<Vec<_>>(),
    );
    assert!(
        !env.iter().any(|e| e.contains("KAFKA")),
        "{BASE}: Kafka settings {env:?}"
    );
    assert!(
        d.config()["kafka-brokers"].is_badvalue(),
        "{BASE}: the ConfigMap names brokers nothing reads"
    );
    // The store on the claim (checked with the volumes), not --no-store.
    assert!(!d.args.iter().any(|a| a == "--no-store"), "{BASE}: {:?}", d.args);
}

#[test]
fn the_kafka_overlay_runs_replicas_in_cluster_mode_and_changes_nothing_else() {
    let d = check_deployment(KAFKA);
    assert!(d.replicas() > 1, "{KAFKA}: {} replica", d.replicas());
    // --kafka-brokers from the ConfigMap (the generic checks followed
    // $(VAR) to the env and its configMapKeyRef to a key that exists).
    let brokers = flag_value(&d.args, "--kafka-brokers").expect("--kafka-brokers in the overlay");
    let var = brokers.strip_prefix("$(").and_then(|v| v.strip_suffix(')'));
    let var = var.unwrap_or_else(|| panic!("--kafka-brokers {brokers}: not from the ConfigMap"));
    let env = list(d.container(), "env")
        .iter()
        .find(|e| e["name"].as_str() == Some(var))
        .unwrap();
    let key = str_at(&env["valueFrom"]["configMapKeyRef"], "key", var);
    let value = str_at(d.config(), key, "the ConfigMap");
    for broker in value.split(',') {
        let (host, port) = broker
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{key}: {broker} is not host:port"));
        assert!(!host.is_empty() && port.parse::<u16>().is_ok(), "{key}: {broker}");
    }

    // The base, but for the brokers and the replica count.
    let base = check_deployment(BASE);
    for kind in ["Service", "ServiceMonitor", "PrometheusRule"] {
        assert_eq!(d.kind(kind), base.kind(kind), "{KAFKA} changes the {kind}");
    }
    let mut extra: Vec<&str> = d.args.iter().map(String::as_str).collect();
    for a in &base.args {
        let at = extra
            .iter()
            .position(|e| e == a)
            .unwrap_or_else(|| panic!("{KAFKA} drops {a}"));
        extra.remove(at);
    }
    assert_eq!(
        extra,
        ["--kafka-brokers", brokers.as_str()],
        "{KAFKA}: arguments beyond the base's"
    );
    for field in [
        "volumeMounts",
        "ports",
        "readinessProbe",
        "livenessProbe",
        "image",
        "securityContext",
    ] {
        assert_eq!(d.container()[field], base.container()[field], "{KAFKA} changes {field}");
    }
    let (sts, base_sts) = (d.kind("StatefulSet"), base.kind("StatefulSet"));
    for field in ["selector", "serviceName", "volumeClaimTemplates"] {
        assert_eq!(sts["spec"][field], base_sts["spec"][field], "{KAFKA} changes {field}");
    }
    let pod = |s: &Yaml| s["spec"]["template"]["spec"]["volumes"].clone();
    assert_eq!(pod(sts), pod(base_sts), "{KAFKA} changes the volumes");
}

/// (Secret, key, file) of every `kubectl create secret` command in
/// deploy/README.md's code blocks, each key from a file deploy/make-secrets.sh
/// writes.
pub fn readme_secrets() -> Vec<(String, String, String)> {
    let readme = crate::support::read(&repo("deploy/README.md"));
    let code: String = readme.split("```").skip(1).step_by(2).collect::<Vec<_>>().join("\n");
    let joined = code.replace("\\\n", " ");
    let mut found = Vec::new();
    for line in joined
        .lines()
        .filter(|l| l.trim_start().starts_with("kubectl ") && l.contains(" create secret "))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "secret").unwrap();
        let name = words[at + 2];
        for w in &words[at + 3..] {
            if let Some(spec) = w.strip_prefix("--from-file=") {
                let (key, path) = spec.split_once('=').unwrap_or_else(|| panic!("{spec}: no key="));
                let file = path.rsplit('/').next().unwrap();
                assert!(
                    crate::secrets::FILES.contains(&file),
                    "deploy/README.md: {file} is not a file deploy/make-secrets.sh writes"
                );
                found.push((name.to_owned(), key.to_owned(), file.to_owned()));
            }
        }
    }
    found
}

/// Starts `gradguard serve --rules` with this rules file on free ports and
/// fails unless it comes up.
fn assert_serve_accepts(rules: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_gradguard"))
        .args([
            "serve",
            "--no-store",
            "--grpc-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .arg("--rules")
        .arg(&path)
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
    assert!(
        line.starts_with("listening "),
        "gradguard serve refused the ConfigMap's rules file:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
