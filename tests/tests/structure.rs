//! The code's shape, as the README's layout table states it: crates depend only on crates below
//! them (proto, pki and the listener guards at the bottom, then transport, the tunnel protocol,
//! the runtime, the two binaries, and the tools on top), and inside a crate no module uses a module that uses it back.
//! Read from the sources and manifests, so a change that breaks the picture fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's product crates from the bottom up, each with the crates it may use.
const LAYERS: &[(&str, &[&str])] = &[
    ("crates/relay-proto", &[]),
    ("crates/relay-pki", &[]),
    ("crates/relay-guard", &[]),
    ("crates/relay-transport", &["relay-proto", "relay-pki"]),
    ("crates/relay-tunnel", &["relay-proto", "relay-transport"]),
    ("crates/relay-runtime", &["relay-proto", "relay-transport", "relay-tunnel"]),
    ("crates/relay-record", &[]),
    ("relay-edge", &["relay-proto", "relay-pki", "relay-guard", "relay-transport", "relay-tunnel", "relay-runtime"]),
    ("relay-agent", &["relay-proto", "relay-pki", "relay-transport", "relay-tunnel", "relay-runtime", "relay-record"]),
];

/// Crates whose modules are checked for cycles (the tools too).
const CRATES: &[&str] = &[
    "crates/relay-proto",
    "crates/relay-pki",
    "crates/relay-guard",
    "crates/relay-transport",
    "crates/relay-tunnel",
    "crates/relay-runtime",
    "crates/relay-record",
    "relay-edge",
    "relay-agent",
    "crates/relay-testkit",
    "crates/relay-bench",
    "crates/relay-demo",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The `relay-*` crates a manifest's `[dependencies]` names.
fn relay_dependencies(manifest: &str) -> BTreeSet<String> {
    let table: toml::Table = toml::from_str(manifest).expect("Cargo.toml parses");
    table
        .get("dependencies")
        .and_then(toml::Value::as_table)
        .map(|deps| deps.keys().filter(|name| name.starts_with("relay-")).cloned().collect())
        .unwrap_or_default()
}

#[test]
fn each_crate_depends_only_on_the_crates_below_it() {
    let root = workspace();
    for (dir, allowed) in LAYERS {
        let manifest = std::fs::read_to_string(root.join(dir).join("Cargo.toml")).expect("manifest readable");
        let used = relay_dependencies(&manifest);
        let allowed: BTreeSet<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        let extra: Vec<_> = used.difference(&allowed).collect();
        assert!(extra.is_empty(), "{dir} depends on {extra:?}, which sit above it or beside it");
    }
}

/// Every `.rs` file under `dir`, recursively.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`None` for the crate root).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.trim_end_matches(".rs").to_owned();
    (!["lib", "main"].contains(&first.as_str())).then_some(first)
}

/// The top-level modules `text` names as `crate::module`, ignoring comments. A `use crate::{`
/// group may span lines (rustfmt puts one item per line); its items count until it closes.
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut in_group = false;
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with("//")) {
        if in_group {
            let items = line.split('}').next().unwrap_or_default();
            found.extend(items.split(',').map(|item| ident(item.trim())));
            in_group = !line.contains('}');
            continue;
        }
        for (at, _) in line.match_indices("crate::") {
            let rest = line.get(at + "crate::".len()..).unwrap_or_default();
            match rest.strip_prefix('{') {
                Some(group) => {
                    let items = group.split('}').next().unwrap_or_default();
                    found.extend(items.split(',').map(|item| ident(item.trim())));
                    in_group = !group.contains('}');
                }
                None => {
                    found.insert(ident(rest));
                }
            }
        }
    }
    found.retain(|name| !name.is_empty());
    found
}

fn ident(text: &str) -> String {
    text.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

/// Module cycles in one crate, as lists of module names.
fn cycles(crate_dir: &Path) -> Vec<Vec<String>> {
    let src = crate_dir.join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    let mut uses: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = top_module(&src, file) else { continue };
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let refs: Vec<String> =
            crate_references(&text).into_iter().filter(|r| modules.contains(r) && *r != module).collect();
        uses.entry(module).or_default().extend(refs);
    }
    // A cycle exists where a module reaches itself.
    let mut found = Vec::new();
    for start in &modules {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for next in uses.get(&at).into_iter().flatten() {
                if next == start {
                    found.push(path.clone());
                } else if seen.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    found
}

#[test]
fn no_module_uses_a_module_that_uses_it_back() {
    let root = workspace();
    for dir in CRATES {
        let found = cycles(&root.join(dir));
        assert!(found.is_empty(), "{dir}: module cycles {found:?}");
    }
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::thing;\n").unwrap();
    std::fs::write(src.join("b.rs"), "use crate::{\n    a,\n    c,\n};\n// crate::nothing\n").unwrap();
    let found = cycles(dir.path());
    assert!(found.iter().any(|c| c.contains(&"a".to_owned()) && c.contains(&"b".to_owned())), "{found:?}");
    std::fs::write(src.join("b.rs"), "// use crate::a;\n").unwrap();
    assert!(cycles(dir.path()).is_empty());
}
