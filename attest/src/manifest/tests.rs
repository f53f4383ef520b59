use super::*;
use serde_json::Value;

fn image() -> Descriptor {
    Descriptor {
        media_type: media_type::OCI_MANIFEST.into(),
        digest: Digest::of(b"image manifest"),
        size: 1234,
        platform: None,
        annotations: None,
    }
}

fn statements() -> Vec<Statement> {
    vec![
        Statement {
            predicate_type: "https://slsa.dev/provenance/v0.2".into(),
            file_name: "provenance.json".into(),
            bytes: br#"{"_type":"p"}"#.to_vec(),
        },
        Statement {
            predicate_type: "https://spdx.dev/Document".into(),
            file_name: "sbom.spdx.json".into(),
            bytes: br#"{"_type":"s"}"#.to_vec(),
        },
    ]
}

fn read(store: &BlobStore, digest: &Digest) -> Value {
    serde_json::from_slice(&store.read(digest).unwrap()).unwrap()
}

#[test]
fn index_entry_is_unknown_platform_annotated_with_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    for layout in [Layout::Artifact, Layout::Image] {
        let d =
            write_attestation_manifest(&store, &image(), &statements(), MediaTypes::Oci, layout)
                .unwrap();
        let entry = serde_json::to_value(&d).unwrap();
        assert_eq!(
            entry["mediaType"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            entry["platform"],
            serde_json::json!({"architecture": "unknown", "os": "unknown"})
        );
        assert_eq!(
            entry["annotations"],
            serde_json::json!({
                "vnd.docker.reference.digest": Digest::of(b"image manifest").to_string(),
                "vnd.docker.reference.type": "attestation-manifest",
            })
        );
        assert!(is_attestation_manifest(&d));
        assert_eq!(d.size, store.size(&d.digest).unwrap());
        assert_eq!(Digest::of(&store.read(&d.digest).unwrap()), d.digest);
    }
}

#[test]
fn layers_are_the_statements_with_their_predicate_types() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let d = write_attestation_manifest(
        &store,
        &image(),
        &statements(),
        MediaTypes::Oci,
        Layout::Artifact,
    )
    .unwrap();
    let m = read(&store, &d.digest);
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for (layer, st) in layers.iter().zip(statements()) {
        assert_eq!(layer["mediaType"], "application/vnd.in-toto+json");
        assert_eq!(layer["digest"], Digest::of(&st.bytes).to_string());
        assert_eq!(layer["size"], st.bytes.len());
        assert_eq!(
            layer["annotations"],
            serde_json::json!({"in-toto.io/predicate-type": st.predicate_type})
        );
        assert_eq!(store.read(&Digest::of(&st.bytes)).unwrap(), st.bytes);
    }
}

#[test]
fn artifact_layout_has_artifact_type_empty_config_and_subject() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let d = write_attestation_manifest(
        &store,
        &image(),
        &statements(),
        MediaTypes::Oci,
        Layout::Artifact,
    )
    .unwrap();
    let m = read(&store, &d.digest);
    assert_eq!(m["schemaVersion"], 2);
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["artifactType"],
        "application/vnd.docker.attestation.manifest.v1+json"
    );
    // The OCI spec's empty descriptor, byte for byte.
    assert_eq!(
        m["config"],
        serde_json::json!({
            "mediaType": "application/vnd.oci.empty.v1+json",
            "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
            "size": 2,
            "data": "e30=",
        })
    );
    assert_eq!(store.read(&Digest::of(b"{}")).unwrap(), b"{}");
    assert_eq!(
        m["subject"],
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": Digest::of(b"image manifest").to_string(),
            "size": 1234,
        })
    );
}

#[test]
fn image_layout_config_is_unknown_platform_with_statement_diff_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let d = write_attestation_manifest(
        &store,
        &image(),
        &statements(),
        MediaTypes::Oci,
        Layout::Image,
    )
    .unwrap();
    let m = read(&store, &d.digest);
    assert!(m.get("artifactType").is_none() && m.get("subject").is_none());
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    let config_digest: Digest = m["config"]["digest"].as_str().unwrap().parse().unwrap();
    let config = read(&store, &config_digest);
    let diff_ids: Vec<String> = statements()
        .iter()
        .map(|s| Digest::of(&s.bytes).to_string())
        .collect();
    assert_eq!(
        config,
        serde_json::json!({
            "architecture": "unknown",
            "os": "unknown",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
    );
}

#[test]
fn same_statements_give_the_same_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    let a = write_attestation_manifest(
        &store,
        &image(),
        &statements(),
        MediaTypes::Oci,
        Layout::Artifact,
    )
    .unwrap();
    let b = write_attestation_manifest(
        &store,
        &image(),
        &statements(),
        MediaTypes::Oci,
        Layout::Artifact,
    )
    .unwrap();
    assert_eq!(a, b);
}

#[test]
fn refuses_docker_media_types_and_no_statements() {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path()).unwrap();
    assert!(matches!(
        write_attestation_manifest(
            &store,
            &image(),
            &statements(),
            MediaTypes::Docker,
            Layout::Image
        ),
        Err(AttestError::DockerMediaTypes)
    ));
    assert!(matches!(
        write_attestation_manifest(&store, &image(), &[], MediaTypes::Oci, Layout::Artifact),
        Err(AttestError::NoStatements)
    ));
}
