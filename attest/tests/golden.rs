//! The provenance of one fixed build, compared with checked-in JSON, so a renamed or moved
//! field shows up as a diff. `OSSB_UPDATE_GOLDEN=1` rewrites the files.

mod common;

use std::path::PathBuf;

use ossb_attest::{provenance_statement, Mode, SlsaVersion};
use serde_json::Value;

fn check(version: SlsaVersion, file: &str) {
    let st = provenance_statement(version, &common::subjects(), &common::provenance(Mode::Max))
        .expect("statement");
    let got: Value = serde_json::from_slice(&st.bytes).expect("JSON");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file);
    if std::env::var_os("OSSB_UPDATE_GOLDEN").is_some() {
        let pretty = serde_json::to_string_pretty(&got).expect("pretty") + "\n";
        std::fs::write(&path, pretty).expect("write golden");
    }
    let text = std::fs::read_to_string(&path).expect("golden file");
    let want: Value = serde_json::from_str(&text).expect("golden JSON");
    assert_eq!(
        got,
        want,
        "{file} differs; if the change is meant, rerun with OSSB_UPDATE_GOLDEN=1 and review:\n{}",
        serde_json::to_string_pretty(&got).unwrap_or_default()
    );
}

#[test]
fn slsa_v02_max_provenance_matches_golden() {
    check(SlsaVersion::V02, "provenance-v0.2-max.json");
}

#[test]
fn slsa_v1_max_provenance_matches_golden() {
    check(SlsaVersion::V1, "provenance-v1-max.json");
}
