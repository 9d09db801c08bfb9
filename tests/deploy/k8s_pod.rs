//! The standalone base (deploy/k8s) run as its pod would run it: the
//! container's arguments, the ConfigMap and the Secrets (made by
//! deploy/make-secrets.sh, created as deploy/README.md creates them) where
//! its volumes mount them, an empty store volume, nothing else running. It
//! passes its readiness and liveness probes, asked as the kubelet asks them.

use std::path::{Path, PathBuf};

use yaml_rust2::Yaml;

use crate::common::{Server, https_get};
use crate::k8s::{BASE, readme_secrets, render};
use crate::secrets::Secrets;
use crate::support::{list, str_at, strings};

/// Writes what each volume of the pod holds under `root`, at its mount
/// path; the store's directory.
fn lay_out_volumes(docs: &[Yaml], root: &Path, secrets: &Secrets) -> PathBuf {
    let of_kind = |kind: &str| docs.iter().find(|d| d["kind"].as_str() == Some(kind)).unwrap();
    let sts = of_kind("StatefulSet");
    let config = &of_kind("ConfigMap")["data"];
    let pod = &sts["spec"]["template"]["spec"];
    let container = &list(pod, "containers")[0];
    let created = readme_secrets();
    let mut store = None;
    for m in list(container, "volumeMounts") {
        let name = str_at(m, "name", "a volumeMount");
        let dir = root.join(str_at(m, "mountPath", name).trim_start_matches('/'));
        std::fs::create_dir_all(&dir).unwrap();
        let Some(v) = list(pod, "volumes").iter().find(|v| v["name"].as_str() == Some(name)) else {
            store = Some(dir); // the volumeClaimTemplate: a new, empty volume
            continue;
        };
        for (source, items) in [(&v["configMap"], "configMap"), (&v["secret"], "secret")] {
            for item in list(source, "items") {
                let key = str_at(item, "key", items);
                let to = dir.join(str_at(item, "path", key));
                if items == "configMap" {
                    std::fs::write(&to, str_at(config, key, "the ConfigMap")).unwrap();
                } else {
                    let secret = str_at(source, "secretName", name);
                    let (_, _, file) = created
                        .iter()
                        .find(|(s, k, _)| s == secret && k == key)
                        .unwrap_or_else(|| panic!("deploy/README.md creates no {key} in {secret}"));
                    std::fs::copy(secrets.path(file), &to).unwrap();
                }
            }
        }
    }
    store.expect("a store volume")
}

#[test]
fn the_standalone_pod_is_ready_and_live_with_nothing_else_running() {
    let _turn = crate::common::turn();
    let docs = render(BASE);
    let secrets = Secrets::make();
    let root = tempfile::tempdir().unwrap();
    let store = lay_out_volumes(&docs, root.path(), &secrets);

    // Its arguments, the paths moved under `root`; the listen addresses and
    // the store's directory are the test's to give.
    let sts = docs.iter().find(|d| d["kind"].as_str() == Some("StatefulSet")).unwrap();
    let container = &list(&sts["spec"]["template"]["spec"], "containers")[0];
    let mut given = strings(list(container, "args")).into_iter();
    assert_eq!(given.next().as_deref(), Some("serve"));
    let mut args = Vec::new();
    while let Some(a) = given.next() {
        if ["--data-dir", "--grpc-addr", "--metrics-addr"].contains(&a.as_str()) {
            given.next();
        } else if let Some(path) = a.strip_prefix('/') {
            args.push(root.path().join(path).display().to_string());
        } else {
            args.push(a);
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_in(&store, &args);

    let roots = gradguard::auth::tls::read_roots(&secrets.path("ca.crt"), "ca").unwrap();
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["scheme"].as_str(), Some("HTTPS"), "{probe}");
        assert_eq!(get["port"].as_str(), Some("metrics"), "{probe}");
        let path = str_at(get, "path", probe);
        let answer = https_get(server.metrics, roots.clone(), path);
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{probe} {path} of a standalone replica: {answer}"
        );
    }
    // The store is where the claim is mounted.
    assert!(
        std::fs::read_dir(&store).unwrap().next().is_some(),
        "nothing in the store volume"
    );
}
