//! The source tree keeps its layers: inside every crate, no file imports a
//! file that imports it back (directly or through others). A parent module
//! may wire its children and children may use what their parent defines;
//! everything else is a one-way street. ARCHITECTURE.md relies on it.
//!
//! This reads the sources as text (no compiler involved): it follows
//! `crate::`, `super::` and `self::` paths and `pub use` re-exports, and
//! ignores comments and `#[cfg(test)]` modules.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type ModPath = Vec<String>;

/// A crate's modules: path (`["proxy", "hbone", "client"]`) → source text
/// without comments and tests.
fn modules(src: &Path) -> BTreeMap<ModPath, String> {
    let mut found = BTreeMap::new();
    let mut pending = vec![src.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read source directory") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n != "bin") {
                    pending.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                found.insert(module_path(src, &path), code_of(&text));
            }
        }
    }
    found
}

fn module_path(src: &Path, file: &Path) -> ModPath {
    let relative = file.strip_prefix(src).expect("inside src");
    let mut parts: ModPath = relative
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file: no test module, no comment lines.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path used after `crate::`, `super::` or `self::`, expanded from
/// brace groups, as (anchor, segments).
fn paths(code: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for anchor in ["crate::", "super::", "self::"] {
        let mut rest = code;
        while let Some(at) = rest.find(anchor) {
            let before = rest[..at].chars().last();
            rest = &rest[at + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            for segments in expand(rest) {
                found.push((anchor.trim_end_matches("::").to_string(), segments));
            }
        }
    }
    found
}

/// `a::b::{c, d::e}` → `[a, b, c]`, `[a, b, d, e]`.
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            if let Some(inner) = rest.strip_prefix('{') {
                let close = matching_brace(inner);
                return split_top_level(&inner[..close])
                    .into_iter()
                    .flat_map(|item| {
                        expand(item.trim())
                            .into_iter()
                            .map(|tail| prefix.iter().cloned().chain(tail).collect())
                            .collect::<Vec<Vec<String>>>()
                    })
                    .collect();
            }
            return vec![prefix];
        }
        rest = &rest[name.len()..];
        prefix.push(name);
        match rest.strip_prefix("::") {
            Some(after) => rest = after,
            None => return vec![prefix],
        }
    }
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top_level(text: &str) -> Vec<&str> {
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

/// Names a module re-exports (`pub use child::{A, B}`) → the child.
fn reexports(modules: &BTreeMap<ModPath, String>) -> BTreeMap<ModPath, BTreeMap<String, ModPath>> {
    let mut all = BTreeMap::new();
    for (module, code) in modules {
        let mut names = BTreeMap::new();
        for line in code.lines() {
            let Some(rest) = line.trim().strip_prefix("pub use ") else {
                continue;
            };
            for segments in expand(rest) {
                if let (Some(first), Some(last)) = (segments.first(), segments.last()) {
                    let mut child = module.clone();
                    child.push(first.clone());
                    if modules.contains_key(&child) {
                        names.insert(last.clone(), child);
                    }
                }
            }
        }
        all.insert(module.clone(), names);
    }
    all
}

/// The module a path lands in: the deepest existing module along it, or
/// the module a re-exported item comes from.
fn resolve(
    base: &ModPath,
    segments: &[String],
    modules: &BTreeMap<ModPath, String>,
    reexports: &BTreeMap<ModPath, BTreeMap<String, ModPath>>,
) -> ModPath {
    let mut at = base.clone();
    for segment in segments {
        let mut next = at.clone();
        next.push(segment.clone());
        if modules.contains_key(&next) {
            at = next;
        } else if let Some(target) = reexports.get(&at).and_then(|names| names.get(segment)) {
            return target.clone();
        } else {
            break;
        }
    }
    at
}

fn is_ancestor(ancestor: &ModPath, of: &ModPath) -> bool {
    ancestor.len() < of.len() && of[..ancestor.len()] == ancestor[..]
}

/// Imports between files, leaving out a child's use of its ancestors.
fn import_graph(src: &Path) -> BTreeMap<ModPath, BTreeSet<ModPath>> {
    let modules = modules(src);
    let reexports = reexports(&modules);
    let mut graph = BTreeMap::new();
    for (module, code) in &modules {
        let mut targets = BTreeSet::new();
        for (anchor, segments) in paths(code) {
            let base = match anchor.as_str() {
                "crate" => Vec::new(),
                "super" => module[..module.len().saturating_sub(1)].to_vec(),
                _ => module.clone(),
            };
            targets.insert(resolve(&base, &segments, &modules, &reexports));
        }
        for child in reexports.get(module).into_iter().flat_map(|n| n.values()) {
            targets.insert(child.clone());
        }
        targets.retain(|target| target != module && !is_ancestor(target, module));
        graph.insert(module.clone(), targets);
    }
    graph
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<ModPath, BTreeSet<ModPath>>) -> Option<Vec<ModPath>> {
    fn visit(
        node: &ModPath,
        graph: &BTreeMap<ModPath, BTreeSet<ModPath>>,
        done: &mut BTreeSet<ModPath>,
        stack: &mut Vec<ModPath>,
    ) -> Option<Vec<ModPath>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            return Some(stack[at..].to_vec());
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.clone());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

#[test]
fn no_crate_has_a_circle_of_imports() {
    let root = workspace();
    let mut circles = Vec::new();
    let mut crates = 0;
    for entry in std::fs::read_dir(&root).expect("workspace") {
        let src = entry.expect("entry").path().join("src");
        if !src.is_dir() {
            continue;
        }
        crates += 1;
        if let Some(cycle) = find_cycle(&import_graph(&src)) {
            let names: Vec<String> = cycle
                .iter()
                .map(|m| {
                    if m.is_empty() {
                        "lib".into()
                    } else {
                        m.join("::")
                    }
                })
                .collect();
            circles.push(format!("{}: {}", src.display(), names.join(" → ")));
        }
    }
    assert!(
        crates >= 10,
        "found only {crates} crates under {}",
        root.display()
    );
    assert!(
        circles.is_empty(),
        "circles of imports:\n{}",
        circles.join("\n")
    );
}

#[test]
fn the_checker_sees_a_circle_when_there_is_one() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\nmod c;\n").expect("write");
    std::fs::write(src.join("a.rs"), "use crate::b::Thing;\n").expect("write");
    std::fs::write(
        src.join("b.rs"),
        "use crate::{c::{self, Other}};\npub struct Thing;\n",
    )
    .expect("write");
    std::fs::write(
        src.join("c.rs"),
        "// use crate::b;\npub fn f() { super::a::g() }\n",
    )
    .expect("write");
    let cycle = find_cycle(&import_graph(src)).expect("a → b → c → a");
    assert_eq!(cycle.len(), 3, "{cycle:?}");
    // Without the last edge there is none: comments do not count.
    std::fs::write(src.join("c.rs"), "// use crate::a;\npub fn f() {}\n").expect("write");
    assert_eq!(find_cycle(&import_graph(src)), None);
}
