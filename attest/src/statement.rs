//! in-toto statements: the envelope every attestation shares, their subjects, and the SBOM
//! statement (an SPDX document as the predicate).

use std::collections::BTreeMap;

use ossb_image::oci::Descriptor;
use ossb_image::registry::parse_reference;
use ossb_protocol::{Digest, Platform};
use serde_json::{json, Value};

use crate::json::to_canonical;
use crate::purl::image_purl;
use crate::AttestError;

/// The statement type BuildKit writes since v0.32 for every predicate (v0.1 before).
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The predicate type of an SPDX SBOM.
pub const PREDICATE_SPDX: &str = "https://spdx.dev/Document";
/// BuildKit's cap on one attestation's bytes (`attestation-storage.md`); we hold ours to it.
pub const MAX_PREDICATE_BYTES: usize = 40 << 20;

/// What a statement is about: a name and the sha256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    /// For an image, its package URL per tag; for an exported file, its path.
    pub name: String,
    /// The image manifest's (or the file's) digest.
    pub digest: Digest,
}

/// One serialized statement and what an attestation manifest or export needs to know of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The `predicateType` inside, repeated as the layer's annotation.
    pub predicate_type: String,
    /// The file name in a `local`/`tar` export (BuildKit's attestation path).
    pub file_name: String,
    /// The canonical JSON bytes.
    pub bytes: Vec<u8>,
}

/// The subjects of an image's statements, as BuildKit names them: one per tag in `names`, its
/// package URL with `platform`, all with the image manifest's digest.
///
/// With no names BuildKit writes an empty subject list, which in-toto v1 forbids and which
/// leaves the statement about nothing; we write one subject named `_` instead (the name
/// BuildKit itself uses for an unnamed subject).
pub fn subjects(
    names: &[String],
    platform: &Platform,
    manifest: &Descriptor,
) -> Result<Vec<Subject>, AttestError> {
    let mut out = Vec::with_capacity(names.len().max(1));
    for name in names.iter().filter(|n| !n.is_empty()) {
        let reference = parse_reference(name).map_err(|e| AttestError::BadName {
            name: name.clone(),
            detail: e.to_string(),
        })?;
        out.push(Subject {
            name: image_purl(&reference, Some(platform)),
            digest: manifest.digest,
        });
    }
    if out.is_empty() {
        out.push(Subject {
            name: "_".into(),
            digest: manifest.digest,
        });
    }
    Ok(out)
}

/// The subjects of a `local`/`tar` export's statements, as BuildKit names them: every regular
/// file written, by its path relative to the output and its digest. Sorted by path.
pub fn file_subjects(files: &[(String, Digest)]) -> Vec<Subject> {
    let mut out: Vec<Subject> = files
        .iter()
        .map(|(path, digest)| Subject {
            name: path.clone(),
            digest: *digest,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The statement of `predicate` about `subjects`, as canonical JSON.
pub(crate) fn statement(subjects: &[Subject], predicate_type: &str, predicate: Value) -> Vec<u8> {
    let subject: Vec<Value> = subjects
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "digest": BTreeMap::from([("sha256", s.digest.hex())]),
            })
        })
        .collect();
    to_canonical(&json!({
        "_type": STATEMENT_TYPE,
        "predicateType": predicate_type,
        "subject": subject,
        "predicate": predicate,
    }))
}

/// The SBOM statement: `spdx_document` (SPDX JSON, as the scanner wrote it) as the predicate,
/// re-serialized canonically so the statement's digest depends only on the document.
pub fn sbom_statement(
    subjects: &[Subject],
    spdx_document: &[u8],
) -> Result<Statement, AttestError> {
    spdx_statement(subjects, spdx_document, crate::local::SBOM_FILE.into())
}

/// The statement of an extra SBOM (`BUILDKIT_SBOM_SCAN_STAGE`: a stage's name;
/// `BUILDKIT_SBOM_SCAN_CONTEXT`: `context`), about the image as the core SBOM is, written to
/// `sbom-NAME.spdx.json` by a local export, as BuildKit's scanner protocol names it.
pub fn extra_sbom_statement(
    subjects: &[Subject],
    name: &str,
    spdx_document: &[u8],
) -> Result<Statement, AttestError> {
    spdx_statement(subjects, spdx_document, format!("sbom-{name}.spdx.json"))
}

/// `statement` (canonical statement bytes) about `subjects` instead: how a statement about an
/// image becomes one about the files a local export wrote.
pub fn with_subjects(statement: &[u8], subjects: &[Subject]) -> Result<Vec<u8>, AttestError> {
    let bad = |e: String| AttestError::BadStatement(e);
    let value: Value = serde_json::from_slice(statement).map_err(|e| bad(e.to_string()))?;
    let (Some(predicate_type), Some(predicate)) = (
        value.get("predicateType").and_then(Value::as_str),
        value.get("predicate"),
    ) else {
        return Err(bad("no predicateType or predicate".into()));
    };
    Ok(self::statement(subjects, predicate_type, predicate.clone()))
}

fn spdx_statement(
    subjects: &[Subject],
    spdx_document: &[u8],
    file_name: String,
) -> Result<Statement, AttestError> {
    if spdx_document.len() > MAX_PREDICATE_BYTES {
        return Err(AttestError::TooLarge {
            size: spdx_document.len(),
            limit: MAX_PREDICATE_BYTES,
        });
    }
    let document: Value =
        serde_json::from_slice(spdx_document).map_err(|e| AttestError::BadSpdx(e.to_string()))?;
    if !document.is_object() {
        return Err(AttestError::BadSpdx("not a JSON object".into()));
    }
    Ok(Statement {
        predicate_type: PREDICATE_SPDX.into(),
        file_name,
        bytes: statement(subjects, PREDICATE_SPDX, document),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ossb_image::oci::media_type;

    fn manifest() -> Descriptor {
        Descriptor {
            media_type: media_type::OCI_MANIFEST.into(),
            digest: Digest::of(b"manifest"),
            size: 8,
            platform: None,
            annotations: None,
        }
    }

    #[test]
    fn one_subject_per_tag_with_the_manifest_digest() {
        let linux: Platform = "linux/amd64".parse().unwrap();
        let names = vec!["reg.example:5000/app:1".to_string(), "app:latest".into()];
        let s = subjects(&names, &linux, &manifest()).unwrap();
        assert_eq!(
            s.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            [
                "pkg:docker/reg.example%3A5000/app@1?platform=linux%2Famd64",
                "pkg:docker/app@latest?platform=linux%2Famd64"
            ]
        );
        assert!(s.iter().all(|s| s.digest == Digest::of(b"manifest")));
    }

    #[test]
    fn an_unnamed_image_is_subject_underscore() {
        let linux: Platform = "linux/amd64".parse().unwrap();
        let s = subjects(&[], &linux, &manifest()).unwrap();
        assert_eq!(
            s,
            [Subject {
                name: "_".into(),
                digest: Digest::of(b"manifest")
            }]
        );
    }

    #[test]
    fn a_bad_name_is_an_error() {
        let linux: Platform = "linux/amd64".parse().unwrap();
        let err = subjects(&["UPPER/Case".into()], &linux, &manifest()).unwrap_err();
        assert!(matches!(err, AttestError::BadName { .. }), "{err}");
    }

    #[test]
    fn sbom_statement_embeds_the_document_canonically() {
        let subject = [Subject {
            name: "_".into(),
            digest: Digest::of(b"m"),
        }];
        let doc = br#"{ "spdxVersion": "SPDX-2.3", "SPDXID": "SPDXRef-DOCUMENT" }"#;
        let st = sbom_statement(&subject, doc).unwrap();
        let text = String::from_utf8(st.bytes).unwrap();
        assert_eq!(
            text,
            format!(
                r#"{{"_type":"https://in-toto.io/Statement/v1","predicate":{{"SPDXID":"SPDXRef-DOCUMENT","spdxVersion":"SPDX-2.3"}},"predicateType":"https://spdx.dev/Document","subject":[{{"digest":{{"sha256":"{}"}},"name":"_"}}]}}"#,
                Digest::of(b"m").hex()
            )
        );
        assert_eq!(st.file_name, "sbom.spdx.json");
    }

    #[test]
    fn sbom_statement_refuses_what_is_not_a_json_object() {
        let subject = [Subject {
            name: "_".into(),
            digest: Digest::of(b"m"),
        }];
        for bad in [&b"[1]"[..], b"{", b"\xff", b""] {
            assert!(sbom_statement(&subject, bad).is_err());
        }
    }

    #[test]
    fn file_subjects_are_sorted_by_path() {
        let files = vec![
            ("b".to_string(), Digest::of(b"b")),
            ("a".into(), Digest::of(b"a")),
        ];
        let s = file_subjects(&files);
        assert_eq!(s[0].name, "a");
        assert_eq!(s[1].digest, Digest::of(b"b"));
    }
}
