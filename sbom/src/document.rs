//! The SPDX 2.3 JSON document.
//!
//! The serde structs are ours: the SPDX model crates we looked at are unmaintained
//! (`spdx-rs`, last release 2023, pulls chrono, nom and uuid) or generate their types from the
//! schema at build time and no longer build on docs.rs (`serde-spdx`). We write a dozen fields,
//! and owning their order keeps the output byte-for-byte stable.
//!
//! Determinism: the time comes from the caller (`SOURCE_DATE_EPOCH`), SPDX ids are hashes of
//! what identifies a package, and the document namespace is a hash of the document itself.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::package::{Package, Supplier};

/// What the caller knows about the image the document describes.
#[derive(Debug, Clone)]
pub struct DocumentInfo {
    /// The document's and the image package's name, e.g. the image reference.
    pub name: String,
    /// When the SBOM was made: the build's `SOURCE_DATE_EPOCH` for reproducible output.
    pub created: SystemTime,
    /// The image's version (a tag, or the manifest digest); NTIA asks for one on every
    /// component, the image included.
    pub version: Option<String>,
    /// Who supplies the image (e.g. from the `org.opencontainers.image.vendor` label).
    pub supplier: Option<Supplier>,
}

/// The SPDX id of the package that stands for the image itself.
pub const IMAGE_SPDX_ID: &str = "SPDXRef-Image";
const NOASSERTION: &str = "NOASSERTION";
const NAMESPACE_BASE: &str = "https://ossb.dev/spdxdocs/";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document<'a> {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: &'a str,
    document_namespace: String,
    creation_info: CreationInfo,
    packages: Vec<SpdxPackage<'a>>,
    relationships: Vec<Relationship>,
}

#[derive(Serialize)]
struct CreationInfo {
    created: String,
    creators: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxPackage<'a> {
    name: &'a str,
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_info: Option<&'a str>,
    supplier: String,
    download_location: &'static str,
    files_analyzed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_info: Option<String>,
    license_concluded: &'static str,
    license_declared: String,
    copyright_text: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_refs: Vec<ExternalRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_package_purpose: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalRef {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Relationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

/// Writes `packages` as an SPDX 2.3 JSON document: the image is a package that the document
/// DESCRIBES and that CONTAINS every package found. Same input, same bytes.
pub fn spdx_json(doc: &DocumentInfo, packages: &[Package]) -> Vec<u8> {
    let mut ids = std::collections::BTreeSet::new();
    let mut spdx_packages = vec![SpdxPackage {
        name: &doc.name,
        spdx_id: IMAGE_SPDX_ID.to_string(),
        version_info: doc.version.as_deref().filter(|v| !v.is_empty()),
        supplier: supplier(doc.supplier.as_ref()),
        download_location: NOASSERTION,
        files_analyzed: false,
        source_info: None,
        license_concluded: NOASSERTION,
        license_declared: NOASSERTION.to_string(),
        copyright_text: NOASSERTION,
        external_refs: Vec::new(),
        primary_package_purpose: Some("CONTAINER"),
    }];
    let mut relationships = vec![Relationship {
        spdx_element_id: "SPDXRef-DOCUMENT".to_string(),
        relationship_type: "DESCRIBES",
        related_spdx_element: IMAGE_SPDX_ID.to_string(),
    }];
    for package in packages {
        let id = unique(&mut ids, package_id(package));
        relationships.push(Relationship {
            spdx_element_id: IMAGE_SPDX_ID.to_string(),
            relationship_type: "CONTAINS",
            related_spdx_element: id.clone(),
        });
        spdx_packages.push(SpdxPackage {
            name: &package.name,
            spdx_id: id,
            version_info: Some(package.version.as_str()).filter(|v| !v.is_empty()),
            supplier: supplier(package.supplier.as_ref()),
            download_location: NOASSERTION,
            files_analyzed: false,
            source_info: source_info(package),
            license_concluded: NOASSERTION,
            license_declared: declared_license(package.license.as_deref()),
            copyright_text: NOASSERTION,
            external_refs: package
                .purl
                .iter()
                .map(|purl| ExternalRef {
                    reference_category: "PACKAGE-MANAGER",
                    reference_type: "purl",
                    reference_locator: purl.clone(),
                })
                .collect(),
            primary_package_purpose: None,
        });
    }
    let mut document = Document {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: &doc.name,
        document_namespace: String::new(),
        creation_info: CreationInfo {
            created: rfc3339(doc.created),
            creators: vec![format!("Tool: ossb-{}", env!("CARGO_PKG_VERSION"))],
        },
        packages: spdx_packages,
        relationships,
    };
    // The namespace must be unique per document and never random: a hash of everything else.
    let digest = Sha256::digest(to_json(&document));
    document.document_namespace = format!(
        "{NAMESPACE_BASE}{}-{}",
        id_safe(&doc.name, 64),
        hex::encode(digest)
    );
    to_json(&document)
}

fn to_json(document: &Document) -> Vec<u8> {
    // Only strings, booleans and vectors: serializing cannot fail.
    serde_json::to_vec(document).unwrap_or_default()
}

fn supplier(supplier: Option<&Supplier>) -> String {
    supplier.map_or_else(|| NOASSERTION.to_string(), Supplier::to_spdx)
}

fn source_info(package: &Package) -> Option<String> {
    if package.found_at.is_empty() {
        return None;
    }
    let paths: Vec<String> = package.found_at.iter().map(|p| format!("/{p}")).collect();
    Some(format!(
        "{} package metadata found in: {}",
        package.kind,
        paths.join(", ")
    ))
}

/// The declared license when it is a valid SPDX expression of listed licenses. A
/// `LicenseRef-` would need its text in the document, which we do not have.
fn declared_license(license: Option<&str>) -> String {
    let Some(license) = license.map(str::trim).filter(|l| !l.is_empty()) else {
        return NOASSERTION.to_string();
    };
    if license.contains("LicenseRef-") || license.contains("DocumentRef-") {
        return NOASSERTION.to_string();
    }
    match spdx::Expression::parse(license) {
        Ok(_) => license.to_string(),
        Err(_) => NOASSERTION.to_string(),
    }
}

/// `SPDXRef-Package-<kind>-<name>-<hash>`: readable, and stable because the hash covers what
/// identifies the package (two libc6 of two architectures differ in their purl).
fn package_id(package: &Package) -> String {
    let mut hasher = Sha256::new();
    for part in [
        package.kind.as_str(),
        &package.name,
        &package.version,
        package.purl.as_deref().unwrap_or_default(),
    ] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    for path in &package.found_at {
        hasher.update(path.as_bytes());
        hasher.update([0]);
    }
    let hash = hex::encode(&hasher.finalize()[..8]);
    format!(
        "SPDXRef-Package-{}-{}-{hash}",
        package.kind,
        id_safe(&package.name, 64)
    )
}

/// Keeps what SPDX ids allow (letters, digits, `.`, `-`), at most `max` characters.
fn id_safe(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A scan merges identical packages, so ids collide only for packages that differ in fields
/// the hash leaves out; they get a counter.
fn unique(ids: &mut std::collections::BTreeSet<String>, id: String) -> String {
    if ids.insert(id.clone()) {
        return id;
    }
    (2..)
        .map(|n| format!("{id}-{n}"))
        .find(|candidate| ids.insert(candidate.clone()))
        .unwrap_or(id)
}

/// `time` as RFC 3339 UTC; a time before 1970 (no such build) is the epoch.
fn rfc3339(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    ossb_protocol::rfc3339(secs).unwrap_or_else(|| "9999-12-31T23:59:59Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::package::Kind;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(at(951_782_400)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(at(1_709_251_199)), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(at(4_102_444_800)), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn licenses_are_kept_only_when_valid_spdx() {
        assert_eq!(
            declared_license(Some("MIT OR Apache-2.0")),
            "MIT OR Apache-2.0"
        );
        assert_eq!(declared_license(Some("GPLv2+")), "NOASSERTION");
        assert_eq!(
            declared_license(Some("LicenseRef-Proprietary")),
            "NOASSERTION"
        );
        assert_eq!(declared_license(None), "NOASSERTION");
    }

    #[test]
    fn same_input_same_bytes_and_namespace_follows_content() {
        let package = Package {
            kind: Kind::Npm,
            name: "@babel/core".into(),
            version: "7.24.0".into(),
            purl: Some("pkg:npm/%40babel/core@7.24.0".into()),
            license: Some("MIT".into()),
            supplier: Supplier::person("The Babel Team <team@babeljs.io>"),
            source: None,
            found_at: vec!["app/node_modules/@babel/core/package.json".into()],
        };
        let info = DocumentInfo {
            name: "registry.example/app:1".into(),
            created: at(1_700_000_000),
            version: Some("1".into()),
            supplier: Supplier::organization("Example"),
        };
        let a = spdx_json(&info, std::slice::from_ref(&package));
        assert_eq!(a, spdx_json(&info, std::slice::from_ref(&package)));
        let later = DocumentInfo {
            created: at(1_700_000_001),
            ..info.clone()
        };
        let b = spdx_json(&later, std::slice::from_ref(&package));
        let ns = |bytes: &[u8]| -> String {
            let v: serde_json::Value = serde_json::from_slice(bytes).expect("json");
            v["documentNamespace"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        assert_ne!(ns(&a), ns(&b));
        let v: serde_json::Value = serde_json::from_slice(&a).expect("json");
        let id = v["packages"][1]["SPDXID"].as_str().unwrap_or_default();
        assert!(id.starts_with("SPDXRef-Package-npm--babel-core-"), "{id}");
        assert_eq!(v["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(v["relationships"][1]["relatedSpdxElement"], id);
    }
}
