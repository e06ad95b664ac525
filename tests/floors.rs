//! The library's modules stand on floors (ARCHITECTURE.md): a module imports only
//! from its own floor or below, two modules never import each other, no source file
//! is over 600 lines, and no module is mounted by a path attribute. Read from the sources'
//! `crate::` paths, so a new upward import fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of `src/` and its floor.
const FLOORS: &[(&str, u8)] = &[
    ("error", 0),
    ("kv", 0),
    ("math", 0),
    ("sampling", 0),
    ("stats", 0),
    ("model", 1),
    ("grammar", 1),
    ("engine", 2),
    ("agent", 3),
    ("workflow", 4),
    ("loadtest", 4),
    ("bench", 4),
    ("serve", 4),
    ("mcp", 4),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The modules a source text names through `crate::`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::X, b::Y}`: every first segment in the group.
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if item.trim().starts_with(&format!("{name}::")) {
                    out.insert(name);
                }
            }
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if rest[name.len()..].starts_with("::") {
            out.insert(name);
        }
    }
    out
}

#[test]
fn no_module_imports_a_higher_floor_and_none_import_each_other() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let floors: BTreeMap<&str, u8> = FLOORS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let module = module_of(&src, f);
        if module == "lib" || module == "testing" {
            continue;
        }
        assert!(
            floors.contains_key(module.as_str()),
            "module `{module}` has no floor in this test (and ARCHITECTURE.md)"
        );
        let text = std::fs::read_to_string(f).unwrap();
        for m in imports(&text) {
            if m != module && floors.contains_key(m.as_str()) {
                edges.entry(module.clone()).or_default().insert(m);
            }
        }
    }
    let mut wrong = Vec::new();
    for (from, tos) in &edges {
        for to in tos {
            if floors[to.as_str()] > floors[from.as_str()] {
                wrong.push(format!(
                    "{from} (floor {}) imports {to} (floor {})",
                    floors[from.as_str()],
                    floors[to.as_str()]
                ));
            }
            if edges.get(to).is_some_and(|back| back.contains(from)) && from < to {
                wrong.push(format!("{from} and {to} import each other"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\nedges: {edges:#?}");
    // The check reads what it should: the engine does import the model.
    assert!(edges["engine"].contains("model"), "{edges:#?}");
}

#[test]
fn no_source_file_is_over_600_lines_or_mounted_by_path() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "agents/src", "cli/src"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 40, "{} files", files.len());
    let mut wrong = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let lines = text.lines().count();
        if lines > 600 {
            wrong.push(format!("{}: {lines} lines", f.display()));
        }
        // The attribute's text is built here so that this file does not hold it.
        let path_attr = format!("#[{}", "path");
        if text.lines().any(|l| l.trim_start().starts_with(&path_attr)) {
            wrong.push(format!("{}: a path attribute", f.display()));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn imports_are_read_from_use_lines_and_paths() {
    let text = "use crate::kv::KvCache;\nuse crate::{model::Model, Error};\n// crate::agent::X\nlet x = crate::stats::median(&v);";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(got, ["kv", "model", "stats"]);
}
