//! Rust binaries built with cargo-auditable: the `.dep-v0` section holds zlib-compressed JSON,
//! `{"packages": [{"name", "version", "source", "kind", "dependencies", "root"}]}`, one entry
//! per crate compiled in.

use std::io::Read;

use serde::Deserialize;

use crate::package::{Findings, Kind, Package, Supplier};
use crate::purl::Purl;

/// cargo-auditable caps what it writes well below this; more is not its data.
const JSON_LIMIT: u64 = 64 << 20;

#[derive(Deserialize)]
struct VersionInfo {
    packages: Vec<Dependency>,
}

#[derive(Deserialize)]
struct Dependency {
    name: String,
    version: String,
    source: String,
}

/// Adds every crate listed in a `.dep-v0` section.
pub(crate) fn scan(rel: &str, compressed: &[u8], findings: &mut Findings) {
    let mut json = Vec::new();
    let read = flate2::read::ZlibDecoder::new(compressed)
        .take(JSON_LIMIT + 1)
        .read_to_end(&mut json);
    if let Err(e) = read {
        return findings.warn(rel, format!("cargo-auditable data: cannot decompress: {e}"));
    }
    if json.len() as u64 > JSON_LIMIT {
        return findings.warn(
            rel,
            format!("cargo-auditable data larger than {JSON_LIMIT} bytes"),
        );
    }
    let info: VersionInfo = match serde_json::from_slice(&json) {
        Ok(info) => info,
        Err(e) => return findings.warn(rel, format!("cargo-auditable data: {e}")),
    };
    for dep in info.packages {
        // Only a crate whose source is crates.io is the crate a `pkg:cargo` purl names; a
        // path or git crate of the same name is other code, and naming it as the registry's
        // would match the wrong advisories. Such crates are listed without a purl (syft gives
        // them one; we prefer no identifier to a wrong one). crates.io is also who supplied
        // them, in SPDX's sense of the supplier: the distribution source.
        let from_crates_io = dep.source == "crates.io";
        let purl = from_crates_io.then(|| {
            Purl {
                ty: "cargo",
                namespace: None,
                name: &dep.name,
                version: Some(&dep.version),
                qualifiers: Vec::new(),
            }
            .encode()
        });
        findings.packages.push(Package {
            kind: Kind::Cargo,
            purl,
            license: None,
            supplier: from_crates_io.then(|| Supplier::Organization {
                name: "crates.io".into(),
                email: None,
            }),
            source: None,
            found_at: vec![rel.to_string()],
            name: dep.name,
            version: dep.version,
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// What cargo-auditable 0.6 embeds for a binary crate with two dependencies.
    pub(crate) const DEP_JSON: &str = r#"{"packages":[{"name":"anyhow","version":"1.0.86","source":"crates.io"},{"name":"mytool","version":"0.1.0","source":"local","dependencies":[0,2],"root":true},{"name":"serde","version":"1.0.203","source":"crates.io","kind":"runtime"}]}"#;

    pub(crate) fn compress(bytes: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        let _ = z.write_all(bytes);
        z.finish().unwrap_or_default()
    }

    #[test]
    fn crates_io_crates_get_purls_and_local_ones_do_not() {
        let mut findings = Findings::default();
        scan(
            "usr/local/bin/mytool",
            &compress(DEP_JSON.as_bytes()),
            &mut findings,
        );
        let got: Vec<(&str, Option<&str>)> = findings
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.purl.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("anyhow", Some("pkg:cargo/anyhow@1.0.86")),
                ("mytool", None),
                ("serde", Some("pkg:cargo/serde@1.0.203")),
            ]
        );
    }

    #[test]
    fn garbage_warns() {
        let mut findings = Findings::default();
        scan("bin/x", b"not zlib", &mut findings);
        scan("bin/x", &compress(b"{\"packages\": 3}"), &mut findings);
        assert!(findings.packages.is_empty());
        assert_eq!(findings.warnings.len(), 2);
    }
}
