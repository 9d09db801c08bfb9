//! Paths, YAML, external tools and the service's own flags, for the deploy tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

/// A path under the repository root.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every document of a YAML file.
pub fn yaml_docs(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path)).unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()))
}

/// The one document of a YAML file.
pub fn yaml(path: &Path) -> Yaml {
    let mut docs = yaml_docs(path);
    assert_eq!(docs.len(), 1, "{}: one YAML document expected", path.display());
    docs.remove(0)
}

/// A string field, failing with where it was looked for.
pub fn str_at<'a>(node: &'a Yaml, key: &str, what: &str) -> &'a str {
    node[key]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no string {key:?} in {node:?}"))
}

/// A list field (empty when absent).
pub fn list<'a>(node: &'a Yaml, key: &str) -> &'a [Yaml] {
    node[key].as_vec().map_or(&[], Vec::as_slice)
}

/// The strings of a list of scalars (numbers as their text).
pub fn strings(items: &[Yaml]) -> Vec<String> {
    items.iter().map(scalar).collect()
}

/// A scalar as text (`9464` and `"9464"` alike).
pub fn scalar(y: &Yaml) -> String {
    match y {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

/// An external tool from Debian's `prometheus` package. Missing, it fails the
/// test with what to install: these checks never pass by being skipped.
pub fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed: this test needs Debian's prometheus package \
             (apt-get install -y --no-install-recommends prometheus), which .ci/run installs"
        )
    })
}

/// Runs a tool to completion; fails the test with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// The long flags and environment variables `gradguard serve` accepts, from
/// its own `--help`.
pub struct ServeFlags {
    pub flags: Vec<String>,
    pub env: Vec<String>,
    pub help: String,
}

impl ServeFlags {
    pub fn load() -> Self {
        let help = run_ok(Command::new(env!("CARGO_BIN_EXE_gradguard")).args(["serve", "--help"]));
        // Option lines start with the flag (`      --data-dir <DIR>`, `  -h, --help`).
        let mut flags: Vec<String> = help
            .lines()
            .filter_map(|l| l.trim_start().trim_start_matches("-h, ").strip_prefix("--"))
            .map(|rest| format!("--{}", rest.split([' ', '=']).next().unwrap()))
            .collect();
        flags.sort();
        let mut env: Vec<String> = help
            .split("[env: ")
            .skip(1)
            .map(|rest| rest.split('=').next().unwrap().to_owned())
            .collect();
        env.sort();
        assert!(flags.iter().any(|f| f == "--metrics-addr"), "{help}");
        Self { flags, env, help }
    }

    /// Fails unless `flag` (`--name` or `--name=value`) is one `serve` takes.
    pub fn check_flag(&self, flag: &str, context: &str) {
        let name = flag.split('=').next().unwrap();
        assert!(
            self.flags.iter().any(|f| f == name),
            "{context}: `gradguard serve` has no flag {name}; it has {:?}",
            self.flags
        );
    }

    /// Fails unless `var` is an environment variable `serve` reads.
    pub fn check_env(&self, var: &str, context: &str) {
        assert!(
            self.env.iter().any(|e| e == var),
            "{context}: `gradguard serve` reads no {var}; it reads {:?}",
            self.env
        );
    }

    /// The port of a listen flag's default (`--metrics-addr` → 9464).
    pub fn default_port(&self, flag: &str) -> u16 {
        let at = self.help.find(&format!("{flag} <")).expect("the flag in --help");
        let rest = &self.help[at..];
        let default = rest
            .split("[default: ")
            .nth(1)
            .and_then(|d| d.split(']').next())
            .unwrap_or_else(|| panic!("no default for {flag}"));
        default.rsplit(':').next().unwrap().parse().expect("a port")
    }
}
