//! Attestations beside the files of a `local` or `tar` export, named as BuildKit names them.

use std::collections::BTreeSet;

use ossb_protocol::Platform;

use crate::statement::Statement;
use crate::AttestError;

/// The provenance statement's file name.
pub const PROVENANCE_FILE: &str = "provenance.json";
/// The SBOM statement's file name (the core SBOM's, as BuildKit's scanner protocol names it).
pub const SBOM_FILE: &str = "sbom.spdx.json";

/// The files to write beside an export's own: each statement (whole, not just its predicate)
/// under its file name. `platform` is given for a multi-platform export written without a
/// directory per platform: BuildKit then puts the platform before the last extension
/// (`provenance.linux_amd64.json`). The statements' subjects should be the exported files
/// ([`crate::file_subjects`]), as BuildKit's.
pub fn local_files(
    statements: &[Statement],
    platform: Option<&Platform>,
) -> Result<Vec<(String, Vec<u8>)>, AttestError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(statements.len());
    for st in statements {
        let mut name = st.file_name.clone();
        if let Some(platform) = platform {
            let key = platform.to_string().replace('/', "_");
            name = match name.rsplit_once('.') {
                Some((stem, ext)) => format!("{stem}.{key}.{ext}"),
                None => format!("{name}.{key}"),
            };
        }
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(AttestError::BadFileName(name));
        }
        if !seen.insert(name.clone()) {
            return Err(AttestError::DuplicateFile(name));
        }
        out.push((name, st.bytes.clone()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(file_name: &str) -> Statement {
        Statement {
            predicate_type: "p".into(),
            file_name: file_name.into(),
            bytes: b"{}".to_vec(),
        }
    }

    #[test]
    fn names_files_as_buildkit() {
        let files = local_files(&[st(PROVENANCE_FILE), st(SBOM_FILE)], None).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(names, ["provenance.json", "sbom.spdx.json"]);
    }

    #[test]
    fn puts_the_platform_before_the_last_extension() {
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        let files = local_files(&[st(PROVENANCE_FILE), st(SBOM_FILE)], Some(&arm)).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "provenance.linux_arm_v7.json",
                "sbom.spdx.linux_arm_v7.json"
            ]
        );
    }

    #[test]
    fn refuses_duplicate_and_escaping_names() {
        assert!(matches!(
            local_files(&[st("a.json"), st("a.json")], None),
            Err(AttestError::DuplicateFile(_))
        ));
        for bad in ["../x", "", "..", "a/b"] {
            assert!(local_files(&[st(bad)], None).is_err(), "{bad}");
        }
    }
}
