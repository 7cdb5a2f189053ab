//! The house rules `cargo test` keeps: no import cycle between the modules
//! of `host/src` or `registry/src` (read from their `crate::` paths), and
//! no `Result<_, String>` where a typed error belongs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `src`, by module path (`model::queue`).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let relative = path
                .strip_prefix(src)
                .expect("under src")
                .with_extension("");
            let mut parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            if parts == ["lib"] || parts == ["main"] {
                continue;
            }
            found.insert(parts.join("::"), path);
        }
    }
    found
}

/// The code of a file before its unit tests, without line comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("readable");
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which modules each module names through `crate::` paths (groups in
/// `use crate::{a, b::c}` expanded one level).
fn edges(modules: &BTreeMap<String, PathBuf>) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for (module, path) in modules {
        let text = code(path);
        let mut paths: Vec<String> = Vec::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or_default();
                paths.extend(group.split(',').map(|item| item.trim().to_string()));
            } else {
                let path: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                paths.push(path);
            }
        }
        let mut targets = BTreeSet::new();
        for path in paths {
            let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
            let target = (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|candidate| modules.contains_key(candidate));
            if let Some(target) = target {
                let nested = module.starts_with(&format!("{target}::"))
                    || target.starts_with(&format!("{module}::"));
                if &target != module && !nested {
                    targets.insert(target);
                }
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

/// A cycle through `start`, if any: the path back to it.
fn cycle_through(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.get(&node).into_iter().flatten() {
            if next == start {
                return Some(path.clone());
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

fn crate_src(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn no_module_imports_its_way_back_to_itself() {
    for src in ["src", "../registry/src"] {
        let modules = modules(&crate_src(src));
        assert!(modules.len() > 5, "found the modules of {src}");
        let graph = edges(&modules);
        let cycles: Vec<String> = graph
            .keys()
            .filter_map(|m| cycle_through(&graph, m))
            .map(|path| path.join(" -> "))
            .collect();
        assert!(cycles.is_empty(), "{src}: import cycles: {cycles:#?}");
    }
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["a".to_string()].into()),
        ("c".to_string(), ["a".to_string()].into()),
    ]
    .into();
    assert_eq!(
        cycle_through(&graph, "a"),
        Some(vec!["a".into(), "b".into()])
    );
    assert_eq!(cycle_through(&graph, "c"), None);
}

#[test]
fn errors_are_types_not_strings() {
    for src in ["src", "../registry/src"] {
        for (module, path) in modules(&crate_src(src)) {
            let text = code(&path);
            for line in text.lines() {
                let stringly = line
                    .find("Result<")
                    .map(|at| &line[at..])
                    .and_then(|rest| rest.split('>').next())
                    .is_some_and(|inside| inside.ends_with(", String"));
                assert!(!stringly, "{src} {module}: {}", line.trim());
            }
        }
    }
}
