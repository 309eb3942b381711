//! Every example configuration the project ships, and every TOML snippet in its documentation,
//! goes through the real configuration loaders: a key or check name that does not exist, or an
//! example that would refuse to start, fails here rather than at an operator's first deploy.

use std::path::{Path, PathBuf};

use relay_edge::{ConfigError, EdgeConfig};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_example_config_parses_and_resolves() {
    let dir = root().join("deploy/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("edge") && name.ends_with(".toml") {
            let settings = EdgeConfig::load(&path).unwrap().resolve().unwrap();
            assert_eq!(settings.routes.len(), 3, "{name}");
            relay_edge::protected_mode(&settings).unwrap_or_else(|e| panic!("{name} would not start: {e}"));
            seen += 1;
        } else if name.starts_with("agent") && name.ends_with(".toml") {
            relay_agent::AgentConfig::load(&path).unwrap().resolve().unwrap();
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the edge and agent examples in {}", dir.display());
}

/// The `edge.toml: |` blocks of Kubernetes manifests (a ConfigMap's data), with their line.
fn manifest_configs(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((number, line)) = lines.next() {
        if line.trim() != "edge.toml: |" {
            continue;
        }
        let key_indent = line.len() - line.trim_start().len();
        let mut block = String::new();
        while let Some((_, next)) = lines.peek() {
            let indent = next.len() - next.trim_start().len();
            if !next.trim().is_empty() && indent <= key_indent {
                break;
            }
            block.push_str(next.trim_start());
            block.push('\n');
            lines.next();
        }
        blocks.push((number + 1, block));
    }
    blocks
}

#[test]
fn every_edge_configuration_in_the_kubernetes_manifests_resolves_and_would_start() {
    let mut checked = 0;
    for entry in std::fs::read_dir(root().join("deploy/k8s")).unwrap() {
        let path = entry.unwrap().path();
        for (line, block) in manifest_configs(&std::fs::read_to_string(&path).unwrap()) {
            let place = format!("{}:{line}", path.display());
            // The manifests set the state directory and listeners in the environment.
            let text = format!("state_dir = \"/var/lib/acs-relay\"\nlisten = \"0.0.0.0:8080\"\n{block}");
            let settings = EdgeConfig::parse(&text, Path::new("edge.toml"))
                .and_then(EdgeConfig::resolve)
                .unwrap_or_else(|e| panic!("{place}: {e}"));
            relay_edge::protected_mode(&settings).unwrap_or_else(|e| panic!("{place}: {e}"));
            checked += 1;
        }
    }
    assert!(checked >= 1, "the edge's ConfigMap was not found");
}

/// The ```toml blocks of a Markdown file, with the line each starts on.
fn toml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (number, line) in text.lines().enumerate() {
        match (&mut current, line.trim_start()) {
            (None, fence) if fence.starts_with("```toml") => current = Some((number + 1, String::new())),
            (Some(_), fence) if fence.starts_with("```") => blocks.extend(current.take()),
            (Some((_, block)), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn every_toml_snippet_in_the_docs_goes_through_the_real_loader() {
    let mut docs = vec![root().join("README.md")];
    if let Ok(entries) = std::fs::read_dir(root().join("docs")) {
        docs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "md")));
    }
    let mut checked = 0;
    for doc in docs {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (line, block) in toml_blocks(&text) {
            let place = format!("{}:{line}", doc.display());
            let path = Path::new("snippet.toml");
            let is_agent = block.lines().any(|l| l.trim_start().starts_with("upstream"));
            if is_agent {
                let config = relay_agent::AgentConfig::parse(&block, path).unwrap_or_else(|e| panic!("{place}: {e}"));
                if let Err(e) = config.resolve() {
                    assert!(matches!(e, relay_agent::ConfigError::Read { .. }), "{place}: {e}");
                }
            } else {
                let config = EdgeConfig::parse(&block, path).unwrap_or_else(|e| panic!("{place}: {e}"));
                match config.resolve() {
                    Ok(settings) => relay_edge::protected_mode(&settings)
                        .unwrap_or_else(|e| panic!("{place}: this configuration would not start: {e}")),
                    // Files named in a snippet (service tags, secrets) live on the operator's host.
                    Err(ConfigError::Read { .. }) => {}
                    Err(e) => panic!("{place}: {e}"),
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 1, "the README's configuration example was not found");
}
