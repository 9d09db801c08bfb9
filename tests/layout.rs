//! The layout stays readable: no import cycle between the library's
//! top-level modules, the service never reaches into the dev tools, and no
//! source file outgrows what a newcomer reads in one sitting.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest non-test source file, in lines (tests below `#[cfg(test)]` and
/// files named `tests.rs` do not count).
const MAX_LINES: usize = 600;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's code before its unit tests, without its comment lines (a doc
/// comment may name any module).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The top-level module a path of `src/` belongs to (`src/engine/rules/x.rs` → `engine`).
fn top_module(src: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_owned())
}

/// Every name that follows `prefix` in the code, including those of a
/// `prefix{a, b::c}` group.
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect() };
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(group.split(',').map(|s| ident(s.trim())).filter(|s| !s.is_empty()));
        } else {
            names.insert(ident(rest));
        }
    }
    names
}

/// A cycle in the graph, as the path around it, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut around = path[i..].to_vec();
            around.push(node.to_owned());
            return Some(around);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_librarys_top_level_modules_form_no_cycle() {
    let src = root().join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|p| top_module(&src, p)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files.iter().filter(|p| !p.ends_with("tests.rs")) {
        let Some(module) = top_module(&src, path) else { continue };
        let uses = referenced(&code(path), "crate::");
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(uses.into_iter().filter(|u| *u != module && modules.contains(u)));
    }
    // The check itself works: these modules depend on each other one way.
    assert!(
        graph["service"].contains("intake") && graph["cluster"].contains("intake"),
        "{graph:?}"
    );
    if let Some(c) = cycle(&graph) {
        panic!("import cycle between top-level modules: {}\n{graph:#?}", c.join(" -> "));
    }
    // The intake and the engine know nothing of the transports.
    for inner in ["engine", "intake", "model", "config", "store"] {
        for outer in ["service", "cluster", "recorder"] {
            assert!(!graph[inner].contains(outer), "{inner} imports {outer}");
        }
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), BTreeSet::from([v.to_owned()])))
        .collect();
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        referenced("use crate::{engine::X, model};\nlet x = crate::wire::f();", "crate::"),
        BTreeSet::from(["engine".into(), "model".into(), "wire".into()])
    );
}

#[test]
fn the_service_does_not_reach_into_the_dev_tools() {
    let services = root().join("services");
    let dev = services.join("dev");
    if !dev.is_dir() {
        return;
    }
    let mut files = Vec::new();
    rust_files(&services, &mut files);
    for path in files.iter().filter(|p| !p.starts_with(&dev)) {
        let uses = referenced(&code(path), "crate::");
        // The command table (cli.rs) names their flags; main.rs runs them.
        let table = path.ends_with("main.rs") || path.ends_with("cli.rs");
        assert!(
            table || !uses.contains("dev"),
            "{} imports the dev tools",
            path.display()
        );
    }
    // Nor does the library: the dev tools are the binary's.
    let mut lib = Vec::new();
    rust_files(&root().join("src"), &mut lib);
    for path in lib {
        assert!(!code(&path).contains("crate::dev"), "{}", path.display());
    }
}

#[test]
fn no_source_file_is_longer_than_a_sitting() {
    let mut files = Vec::new();
    for dir in ["src", "services"] {
        rust_files(&root().join(dir), &mut files);
    }
    let long: Vec<String> = files
        .iter()
        .filter(|p| !p.ends_with("tests.rs"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            let lines = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or("")
                .lines()
                .count();
            (lines > MAX_LINES).then(|| format!("{}: {lines} lines", p.display()))
        })
        .collect();
    assert!(long.is_empty(), "over {MAX_LINES} lines: {long:#?}");
}
