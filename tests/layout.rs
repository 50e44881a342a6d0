//! The shape of the workspace, checked from its sources: no import cycle between the modules of
//! any crate, and no source file longer than a reader can hold (tests aside).
//!
//! A module's imports are what its code names outside itself: `crate::a::b` paths, `super::`
//! paths and the paths it takes from its own child modules (`use child::Item`, a re-export
//! included). So a parent that re-exports its children must not also define what they use: that
//! goes in a sibling module of theirs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest a source file may be, not counting its `#[cfg(test)]` module.
const MAX_LINES: usize = 800;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The crates under crates/, each with its source files.
fn crates() -> Vec<(String, Vec<PathBuf>)> {
    let dir = root().join("crates");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("crates/ is there")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        names.len() >= 5,
        "expected the workspace's crates under {}, found {names:?}",
        dir.display()
    );
    names
        .into_iter()
        .map(|name| {
            let mut files = Vec::new();
            rust_files(&dir.join(&name).join("src"), &mut files);
            (name, files)
        })
        .collect()
}

/// The source without its test module (by convention the last item of a file).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// `a::b` for src/a/b.rs or src/a/b/mod.rs; "" for the crate root.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.join("::")
}

fn join(parent: &str, child: &str) -> String {
    if parent.is_empty() {
        child.to_string()
    } else {
        format!("{parent}::{child}")
    }
}

fn parent_of(module: &str) -> String {
    module.rsplit_once("::").map_or("", |(p, _)| p).to_string()
}

/// Every `prefix` path in `text`, as its `::`-separated lower-case segments.
fn paths_after<'a>(text: &'a str, prefix: &'a str) -> impl Iterator<Item = Vec<&'a str>> + 'a {
    text.match_indices(prefix).filter_map(move |(i, _)| {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            return None;
        }
        let rest = &text[i + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        Some(rest[..end].split("::").filter(|s| !s.is_empty()).collect())
    })
}

/// The longest prefix of `base::segments` that is a module of the crate.
fn deepest_module(modules: &BTreeSet<String>, base: &str, segments: &[&str]) -> String {
    let mut best = base.to_string();
    let mut current = base.to_string();
    for s in segments {
        current = join(&current, s);
        if modules.contains(&current) {
            best = current.clone();
        } else {
            break;
        }
    }
    best
}

/// Module -> the modules it imports from.
fn import_graph(src: &Path, files: &[PathBuf]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in files {
        let module = module_of(src, file);
        let text = std::fs::read_to_string(file).unwrap();
        // Comment lines name paths too (doc links) without importing anything.
        let code: String = without_tests(&text)
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let code = code.as_str();
        let mut targets = BTreeSet::new();
        for segments in paths_after(code, "crate::") {
            targets.insert(deepest_module(&modules, "", &segments));
        }
        for segments in paths_after(code, "super::") {
            targets.insert(deepest_module(&modules, &parent_of(&module), &segments));
        }
        for child in modules
            .iter()
            .filter(|m| parent_of(m) == module && *m != &module)
        {
            let name = child.rsplit("::").next().unwrap();
            let named = format!("{name}::");
            if paths_after(code, &named).next().is_some() {
                targets.insert(child.clone());
            }
        }
        targets.remove(&module);
        graph.insert(module, targets);
    }
    graph
}

/// A cycle through `start`, if there is one (as the modules along it).
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        at: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, next, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn no_module_imports_from_a_module_that_imports_from_it() {
    let mut cycles = Vec::new();
    for (name, files) in crates() {
        let src = root().join("crates").join(&name).join("src");
        let graph = import_graph(&src, &files);
        assert!(
            graph.len() == files.len() && !graph.is_empty(),
            "crate {name}: no modules read"
        );
        for module in graph.keys() {
            if let Some(cycle) = cycle_from(&graph, module) {
                let shown: Vec<_> = cycle
                    .iter()
                    .map(|m| if m.is_empty() { "<crate root>" } else { m })
                    .collect();
                cycles.push(format!("crate {name}: {}", shown.join(" -> ")));
                break;
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules import each other in a circle (move what both use into a module of its own):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // The check must be able to fail: a parent that re-exports a child which uses the parent.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(
        src.join("lib.rs"),
        "mod a;\npub use a::Thing;\npub struct Shared;\n",
    )
    .unwrap();
    std::fs::write(
        src.join("a.rs"),
        "use crate::Shared;\npub struct Thing(Shared);\n",
    )
    .unwrap();
    std::fs::write(src.join("b.rs"), "use crate::a::Thing;\n").unwrap();
    let files = vec![src.join("a.rs"), src.join("b.rs"), src.join("lib.rs")];
    let graph = import_graph(src, &files);
    assert_eq!(
        cycle_from(&graph, "a"),
        Some(vec!["a".to_string(), String::new()])
    );
    assert_eq!(cycle_from(&graph, "b"), None);
}

#[test]
fn no_source_file_is_longer_than_a_reader_can_hold() {
    let mut too_long = Vec::new();
    let mut files = Vec::new();
    for (_, crate_files) in crates() {
        files.extend(crate_files);
    }
    rust_files(&root().join("src"), &mut files);
    assert!(files.len() > 20, "read only {} source files", files.len());
    for file in &files {
        let rel = file
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(file).unwrap();
        let lines = without_tests(&text).lines().count();
        if lines > MAX_LINES {
            too_long.push(format!("{rel}: {lines} lines"));
        }
    }
    assert!(
        too_long.is_empty(),
        "longer than {MAX_LINES} lines (tests aside): split by concern:\n{}",
        too_long.join("\n")
    );
}
