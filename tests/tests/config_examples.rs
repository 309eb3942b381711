//! Every example configuration under `deploy/config/` parses and validates.

use std::path::Path;

#[test]
fn every_example_config_parses_and_resolves() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("edge") && name.ends_with(".toml") {
            let settings = relay_edge::EdgeConfig::load(&path).unwrap().resolve().unwrap();
            assert_eq!(settings.routes.len(), 3, "{name}");
            seen += 1;
        } else if name.starts_with("agent") && name.ends_with(".toml") {
            relay_agent::AgentConfig::load(&path).unwrap().resolve().unwrap();
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected the edge and agent examples in {}", dir.display());
}
