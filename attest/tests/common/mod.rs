//! One fixed build's facts, shared by the golden and the in-toto tests.

// Each test binary uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;

use ossb_attest::{BuildStep, Material, Mode, Provenance, SourceFile, StepInput, Subject};
use ossb_protocol::{Digest, Platform};

pub fn subjects() -> Vec<Subject> {
    vec![Subject {
        name: "pkg:docker/registry.example/team/app@1.0?platform=linux%2Famd64".into(),
        digest: Digest::of(b"image manifest"),
    }]
}

pub fn provenance(mode: Mode) -> Provenance {
    let linux: Platform = "linux/amd64".parse().unwrap();
    Provenance {
        builder_id: "https://ci.example/runs/42".into(),
        build_type: None,
        config_source: Some(Material::git(
            "https://git.example/team/app.git",
            "0123456789abcdef0123456789abcdef01234567",
        )),
        entry_point: "Dockerfile".into(),
        build_args: BTreeMap::from([("VERSION".into(), "1.0".into())]),
        labels: BTreeMap::new(),
        target: None,
        secret_ids: vec!["npm_token".into()],
        ssh_ids: vec![],
        locals: vec!["context".into(), "dockerfile".into()],
        contexts: BTreeMap::new(),
        builder_platform: linux.clone(),
        materials: vec![
            Material::sha256(
                "pkg:docker/debian@bookworm?platform=linux%2Famd64",
                &Digest::of(b"debian manifest"),
            ),
            Material::sha256("https://example.com/tool.tar.gz", &Digest::of(b"tool")),
        ],
        vcs: BTreeMap::from([
            ("source".into(), "https://git.example/team/app.git".into()),
            (
                "revision".into(),
                "0123456789abcdef0123456789abcdef01234567".into(),
            ),
        ]),
        invocation_id: "b1x2y3".into(),
        started: Some(1_700_000_000),
        finished: Some(1_700_000_061),
        reproducible: false,
        hermetic: false,
        parameters_complete: true,
        materials_complete: false,
        mode,
        steps: vec![
            BuildStep {
                instruction: "FROM debian:bookworm".into(),
                inputs: vec![StepInput::Material(0)],
                platform: linux.clone(),
                layer: None,
                worker: Some("worker-1".into()),
            },
            BuildStep {
                instruction: "ADD https://example.com/tool.tar.gz /opt/".into(),
                inputs: vec![StepInput::Step(0), StepInput::Material(1)],
                platform: linux.clone(),
                layer: Some(Digest::of(b"layer 1")),
                worker: Some("worker-1".into()),
            },
            BuildStep {
                instruction: "RUN --mount=type=secret,id=npm_token make VERSION=1.0".into(),
                inputs: vec![StepInput::Step(1)],
                platform: linux,
                layer: Some(Digest::of(b"layer 2")),
                worker: Some("worker-2".into()),
            },
        ],
        source: Some(SourceFile {
            filename: "Dockerfile".into(),
            data: b"FROM debian:bookworm\nADD https://example.com/tool.tar.gz /opt/\n".to_vec(),
        }),
    }
}

/// A small SPDX 2.3 document, as the scanner would write it.
pub const SPDX: &[u8] = br#"{
  "spdxVersion": "SPDX-2.3",
  "dataLicense": "CC0-1.0",
  "SPDXID": "SPDXRef-DOCUMENT",
  "name": "registry.example/team/app",
  "documentNamespace": "https://ossb.dev/spdx/app-1",
  "creationInfo": {"created": "2023-11-14T22:13:20Z", "creators": ["Tool: ossb"]},
  "packages": [{"name": "jq", "SPDXID": "SPDXRef-Package-deb-jq", "versionInfo": "1.6-2.1",
                "downloadLocation": "NOASSERTION"}]
}"#;
