//! buildx's attestation flags: `--provenance`, `--sbom` and `--attest`, with its spellings
//! and its default (a `mode=min` provenance on every pushed image, unless
//! `BUILDX_NO_DEFAULT_ATTESTATIONS` is set).

use ossb_engine::attestations::{Attestations, ProvenanceMode, ProvenanceOptions, SlsaVersion};

/// The attestations the flags ask for, and warnings for options ossb takes but does not use.
/// `default_provenance`: the build pushes and `BUILDX_NO_DEFAULT_ATTESTATIONS` is not set.
pub fn parse(
    provenance: Option<&str>,
    sbom: Option<&str>,
    attest: &[String],
    default_provenance: bool,
) -> Result<(Attestations, Vec<String>), String> {
    let mut out = Attestations {
        provenance: default_provenance.then(ProvenanceOptions::default),
        ..Default::default()
    };
    let mut warnings = Vec::new();
    for spec in attest {
        let fields = fields("--attest", spec)?;
        let kind = fields
            .iter()
            .find(|(k, _)| k == "type")
            .map(|(_, v)| v.as_str());
        let rest: Vec<(String, String)> = fields
            .iter()
            .filter(|(k, _)| k != "type")
            .cloned()
            .collect();
        match kind {
            Some("provenance") => apply_provenance(&mut out, "--attest", &rest)?,
            Some("sbom") => apply_sbom(&mut out, "--attest", &rest, &mut warnings)?,
            Some(other) => {
                return Err(format!(
                    "--attest {spec:?}: unknown type {other:?} (ossb writes type=provenance and type=sbom)"
                ))
            }
            None => {
                return Err(format!(
                    "--attest {spec:?}: name the attestation's type, e.g. --attest type=provenance,mode=max"
                ))
            }
        }
    }
    if let Some(value) = provenance {
        match ossb_protocol::parse_bool(value) {
            Some(true) => {
                out.provenance.get_or_insert_with(Default::default);
            }
            Some(false) => out.provenance = None,
            None => apply_provenance(&mut out, "--provenance", &fields("--provenance", value)?)?,
        }
    }
    if let Some(value) = sbom {
        match ossb_protocol::parse_bool(value) {
            Some(on) => out.sbom = on,
            None => apply_sbom(&mut out, "--sbom", &fields("--sbom", value)?, &mut warnings)?,
        }
    }
    Ok((out, warnings))
}

/// Whether `BUILDX_NO_DEFAULT_ATTESTATIONS` turns the default provenance off (a true value,
/// as buildx reads it).
pub fn no_default_from_env() -> bool {
    std::env::var("BUILDX_NO_DEFAULT_ATTESTATIONS")
        .ok()
        .and_then(|v| ossb_protocol::parse_bool(&v))
        .unwrap_or(false)
}

/// `key=value,key=value`.
fn fields(flag: &str, spec: &str) -> Result<Vec<(String, String)>, String> {
    spec.split(',')
        .map(|field| {
            field
                .split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| format!("{flag}={spec}: expected KEY=VALUE, got {field:?}"))
        })
        .collect()
}

fn apply_provenance(
    out: &mut Attestations,
    flag: &str,
    fields: &[(String, String)],
) -> Result<(), String> {
    let mut options = out.provenance.clone().unwrap_or_default();
    let mut disabled = false;
    for (key, value) in fields {
        match key.as_str() {
            "mode" => {
                options.mode = match value.as_str() {
                    "min" => ProvenanceMode::Min,
                    "max" => ProvenanceMode::Max,
                    _ => return Err(format!("{flag}: mode={value}: expected min or max")),
                }
            }
            "version" => {
                options.version = match value.as_str() {
                    "v0.2" => SlsaVersion::V02,
                    "v1" | "v1.0" => SlsaVersion::V1,
                    _ => return Err(format!("{flag}: version={value}: expected v0.2 or v1")),
                }
            }
            "builder-id" => options.builder_id = Some(value.clone()),
            "disabled" => {
                disabled = ossb_protocol::parse_bool(value).ok_or_else(|| {
                    format!("{flag}: disabled={value}: expected true or false")
                })?
            }
            _ => {
                return Err(format!(
                    "{flag}: unknown provenance option {key:?} (ossb knows mode, version, builder-id, disabled)"
                ))
            }
        }
    }
    out.provenance = (!disabled).then_some(options);
    Ok(())
}

fn apply_sbom(
    out: &mut Attestations,
    flag: &str,
    fields: &[(String, String)],
    warnings: &mut Vec<String>,
) -> Result<(), String> {
    let mut on = true;
    for (key, value) in fields {
        match key.as_str() {
            "generator" => warnings.push(format!(
                "{flag}: generator={value} is not run: ossb scans the image with its own scanner"
            )),
            "disabled" => {
                on = !ossb_protocol::parse_bool(value)
                    .ok_or_else(|| format!("{flag}: disabled={value}: expected true or false"))?
            }
            _ => {
                return Err(format!(
                    "{flag}: unknown SBOM option {key:?} (ossb knows generator, disabled)"
                ))
            }
        }
    }
    out.sbom = on;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(p: Option<&str>, s: Option<&str>, a: &[&str], default: bool) -> Attestations {
        let attest: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        parse(p, s, &attest, default).unwrap().0
    }

    #[test]
    fn a_push_gets_a_minimal_provenance_unless_turned_off() {
        let min = Some(ProvenanceOptions::default());
        assert_eq!(parsed(None, None, &[], true).provenance, min);
        assert_eq!(parsed(None, None, &[], false).provenance, None);
        assert_eq!(parsed(Some("false"), None, &[], true).provenance, None);
        assert_eq!(parsed(Some("0"), None, &[], true).provenance, None);
        assert_eq!(parsed(Some("true"), None, &[], false).provenance, min);
        assert_eq!(
            parsed(None, None, &["type=provenance,disabled=true"], true).provenance,
            None
        );
        assert!(!parsed(None, None, &[], true).sbom);
    }

    #[test]
    fn reads_buildx_spellings() {
        let p = parsed(Some("mode=max,version=v1"), Some("true"), &[], false);
        assert_eq!(
            p.provenance,
            Some(ProvenanceOptions {
                mode: ProvenanceMode::Max,
                version: SlsaVersion::V1,
                builder_id: None
            })
        );
        assert!(p.sbom);
        let a = parsed(
            None,
            None,
            &[
                "type=provenance,mode=max,builder-id=https://ci/run/1",
                "type=sbom",
            ],
            false,
        );
        assert_eq!(a.provenance.as_ref().unwrap().mode, ProvenanceMode::Max);
        assert_eq!(
            a.provenance.unwrap().builder_id.as_deref(),
            Some("https://ci/run/1")
        );
        assert!(a.sbom);
        let (s, warnings) = parse(
            None,
            Some("generator=docker/buildkit-syft-scanner"),
            &[],
            false,
        )
        .unwrap();
        assert!(s.sbom);
        assert!(warnings[0].contains("own scanner"), "{warnings:?}");
        assert!(!parsed(None, Some("false"), &["type=sbom"], false).sbom);
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (p, s, a, want) in [
            (Some("mode=full"), None, vec![], "expected min or max"),
            (Some("version=v3"), None, vec![], "expected v0.2 or v1"),
            (
                Some("inline-only=true"),
                None,
                vec![],
                "unknown provenance option",
            ),
            (None, Some("scan=all"), vec![], "unknown SBOM option"),
            (None, None, vec!["type=vex".to_string()], "unknown type"),
            (
                None,
                None,
                vec!["mode=max".to_string()],
                "name the attestation's type",
            ),
            (Some("max"), None, vec![], "expected KEY=VALUE"),
        ] {
            let err = parse(p, s, &a, false).unwrap_err();
            assert!(err.contains(want), "{err}");
        }
    }
}
