//! Our statements checked by the in-toto project's own models (the `in-toto-attestation`
//! Python package), in a venv at `.testenv/venv-attest`, made on first use. Without Python or
//! PyPI the test is skipped with a message, except under `CI=true`, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ossb_attest::{provenance_statement, sbom_statement, subjects, Mode, SlsaVersion};
use ossb_image::oci::{media_type, Descriptor};
use ossb_protocol::{Digest, Platform};

/// Pinned so a new release cannot change what "valid" means under us.
const PACKAGE: &str = "in-toto-attestation==0.9.3";

fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.testenv/venv-attest")
}

fn ready(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import in_toto_attestation.v1.statement"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The venv's python with the package installed, or why not.
fn python() -> Result<PathBuf, String> {
    let python = venv().join("bin/python");
    if ready(&python) {
        return Ok(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(venv())
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !made.status.success() {
        return Err(format!(
            "python3 -m venv: {}",
            String::from_utf8_lossy(&made.stderr)
        ));
    }
    let pip = Command::new(venv().join("bin/pip"))
        .args(["install", "--quiet", PACKAGE])
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !pip.status.success() || !ready(&python) {
        return Err(format!(
            "pip install {PACKAGE}: {}",
            String::from_utf8_lossy(&pip.stderr)
        ));
    }
    Ok(python)
}

#[test]
fn statements_validate_with_in_toto_attestation() {
    let python = match python() {
        Ok(p) => p,
        Err(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("CI=true and the in-toto validator is unavailable: {why}")
        }
        Err(why) => {
            eprintln!("skipped: the in-toto validator is unavailable ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut files = Vec::new();
    let mut write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write statement");
        files.push(path);
    };
    for (version, v) in [(SlsaVersion::V02, "v0.2"), (SlsaVersion::V1, "v1")] {
        for (mode, m) in [(Mode::Min, "min"), (Mode::Max, "max")] {
            let st = provenance_statement(version, &common::subjects(), &common::provenance(mode))
                .expect("provenance");
            write(&format!("provenance-{v}-{m}.json"), &st.bytes);
        }
    }
    write(
        "sbom.json",
        &sbom_statement(&common::subjects(), common::SPDX)
            .expect("sbom")
            .bytes,
    );
    // An unnamed image: BuildKit's empty subject list would fail here; our `_` must not.
    let manifest = Descriptor {
        media_type: media_type::OCI_MANIFEST.into(),
        digest: Digest::of(b"m"),
        size: 1,
        platform: None,
        annotations: None,
    };
    let linux: Platform = "linux/arm64".parse().expect("platform");
    let unnamed = subjects(&[], &linux, &manifest).expect("subjects");
    let st = provenance_statement(SlsaVersion::V1, &unnamed, &common::provenance(Mode::Min))
        .expect("provenance");
    write("unnamed.json", &st.bytes);

    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/validate.py");
    let out = Command::new(&python)
        .arg(script)
        .args(&files)
        .output()
        .expect("run validate.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "in-toto validation failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("valid ")).count(),
        files.len()
    );
}
