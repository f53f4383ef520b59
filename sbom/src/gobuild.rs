//! Go build info: the module list the Go toolchain (1.18 and later) writes into every
//! binary it builds.
//!
//! Layout: a 32-byte header at a 16-byte boundary (`\xff Go buildinf:`, pointer size, flags);
//! with flag bit 2 the two strings follow inline, each a uvarint length then bytes: the Go
//! version (`go1.22.1`) and the module info, framed by 16 sentinel bytes on each side, whose
//! tab-separated lines are `path`, `mod`, `dep` and `=>` (a replacement for the line before).

use crate::package::{Findings, Kind, Package};
use crate::purl::Purl;

/// How Go marks its build info.
pub(crate) const MAGIC: &[u8] = b"\xff Go buildinf:";
const HEADER_LEN: usize = 32;
const ALIGN: usize = 16;
const FLAG_INLINE_STRINGS: u8 = 0x2;
/// The sentinels around the module info are 16 bytes each.
const SENTINEL_LEN: usize = 16;

/// Adds the Go standard library, the main module and every dependency in `data` (the build
/// info section, or the start of the data segment).
pub(crate) fn scan(rel: &str, data: &[u8], findings: &mut Findings) {
    match parse(data) {
        Ok(Some((version, modinfo))) => add_modules(rel, &version, &modinfo, findings),
        Ok(None) => {}
        Err(e) => findings.warn(rel, format!("Go build info: {e}")),
    }
}

/// The Go version and module info text; `None` when there is no build info.
fn parse(data: &[u8]) -> Result<Option<(String, String)>, String> {
    let Some(start) = (0..data.len())
        .step_by(ALIGN)
        .find(|&i| data[i..].starts_with(MAGIC))
    else {
        return Ok(None);
    };
    let header = data
        .get(start..start + HEADER_LEN)
        .ok_or("header cut short")?;
    if header[15] & FLAG_INLINE_STRINGS == 0 {
        return Err("written by Go before 1.18 (strings behind pointers), not read".into());
    }
    let rest = &data[start + HEADER_LEN..];
    let (version, rest) = inline_string(rest).ok_or("version string cut short")?;
    let (modinfo, _) = inline_string(rest).ok_or("module info cut short")?;
    // The module info is framed by sentinels; without them (no modules: GOPATH builds) it is
    // empty.
    let modinfo =
        if modinfo.len() > 2 * SENTINEL_LEN && modinfo[modinfo.len() - SENTINEL_LEN - 1] == b'\n' {
            &modinfo[SENTINEL_LEN..modinfo.len() - SENTINEL_LEN]
        } else {
            &[][..]
        };
    Ok(Some((
        String::from_utf8_lossy(version).into_owned(),
        String::from_utf8_lossy(modinfo).into_owned(),
    )))
}

/// A uvarint length and that many bytes.
fn inline_string(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut len: u64 = 0;
    for (i, byte) in data.iter().enumerate().take(10) {
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let body = &data[i + 1..];
            let len = usize::try_from(len).ok()?;
            return (len <= body.len()).then(|| body.split_at(len));
        }
    }
    None
}

struct Module {
    path: String,
    version: String,
}

fn add_modules(rel: &str, go_version: &str, modinfo: &str, findings: &mut Findings) {
    // `go1.22.1 X:boringcrypto`: the experiment list is not part of the version.
    let go_version = go_version.split_whitespace().next().unwrap_or_default();
    if !go_version.is_empty() {
        push(rel, "stdlib", go_version, findings);
    }
    let mut modules: Vec<Module> = Vec::new();
    for line in modinfo.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["mod" | "dep", path, version, ..] => modules.push(Module {
                path: path.to_string(),
                version: version.to_string(),
            }),
            ["=>", path, rest @ ..] => {
                let Some(last) = modules.last_mut() else {
                    continue;
                };
                // A replacement by a directory keeps the module's name; the code is whatever
                // was in that directory, so it has no version.
                if path.starts_with('.') || path.starts_with('/') {
                    last.version = "(devel)".into();
                } else {
                    last.path = path.to_string();
                    last.version = rest.first().map(|v| v.to_string()).unwrap_or_default();
                }
            }
            _ => {}
        }
    }
    for module in modules {
        push(rel, &module.path, &module.version, findings);
    }
}

fn push(rel: &str, path: &str, version: &str, findings: &mut Findings) {
    let (namespace, name) = match path.rsplit_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, path),
    };
    // `(devel)` is Go's word for "built from a checkout": not a version a purl can name.
    let purl_version = Some(version).filter(|v| *v != "(devel)");
    let purl = Purl {
        ty: "golang",
        namespace,
        name,
        version: purl_version,
        qualifiers: Vec::new(),
    };
    findings.packages.push(Package {
        kind: Kind::GoModule,
        name: path.to_string(),
        version: version.to_string(),
        purl: Some(purl.encode()),
        license: None,
        // Go binaries record module paths, not who published them.
        supplier: None,
        source: None,
        found_at: vec![rel.to_string()],
    });
}

/// Build info bytes as the Go 1.18+ linker lays them out, for tests here and in `tests/`.
#[cfg(test)]
pub(crate) fn encode_for_test(go_version: &str, modinfo: &str) -> Vec<u8> {
    fn uvarint(out: &mut Vec<u8>, mut n: usize) {
        while n >= 0x80 {
            out.push((n as u8) | 0x80);
            n >>= 7;
        }
        out.push(n as u8);
    }
    let mut out = MAGIC.to_vec();
    out.push(8); // pointer size
    out.push(FLAG_INLINE_STRINGS); // little-endian, inline strings
    out.resize(HEADER_LEN, 0);
    uvarint(&mut out, go_version.len());
    out.extend_from_slice(go_version.as_bytes());
    let mut framed = b"0w\xaf\x0c\x92t\x08\x02A\xe1\xc1\x07\xe6\xd6\x18\xe6".to_vec();
    framed.extend_from_slice(modinfo.as_bytes());
    framed.extend_from_slice(b"\xf92C1\x86\x18 r\x00\x82B\x10A\x16\xd8\xf2");
    uvarint(&mut out, framed.len());
    out.extend_from_slice(&framed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The module info of a small cobra-based tool, as `go version -m` shows it.
    pub(crate) const MODINFO: &str = "path\texample.com/tool/cmd/tool
mod\texample.com/tool\tv1.2.3\th1:abc=
dep\tgithub.com/spf13/cobra\tv1.8.0\th1:7aJaZx1B85qltLMc546zn58BxxfZdR/W22ej9CFmIfo=
dep\tgithub.com/spf13/pflag\tv1.0.5\th1:iy+VFUOCP1a+8yFto/drg2CJ5u0yRoB7fZw3DKv/JXA=
dep\tgolang.org/x/sys\tv0.1.0
=>\tgolang.org/x/sys\tv0.15.0\th1:h48lPFYpsTvQJZF4EKyI4aLHaev3CxivZmv7yZig9pc=
dep\texample.com/local\tv0.0.0
=>\t../local\t
build\t-compiler=gc
build\tGOOS=linux
";

    #[test]
    fn reads_modules_replacements_and_stdlib() {
        let mut data = vec![0u8; 48];
        data.extend(encode_for_test("go1.22.1 X:boringcrypto", MODINFO));
        let mut findings = Findings::default();
        scan("usr/bin/tool", &data, &mut findings);
        assert!(findings.warnings.is_empty(), "{:?}", findings.warnings);
        let got: Vec<(&str, &str, &str)> = findings
            .packages
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.version.as_str(),
                    p.purl.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("stdlib", "go1.22.1", "pkg:golang/stdlib@go1.22.1"),
                (
                    "example.com/tool",
                    "v1.2.3",
                    "pkg:golang/example.com/tool@v1.2.3"
                ),
                (
                    "github.com/spf13/cobra",
                    "v1.8.0",
                    "pkg:golang/github.com/spf13/cobra@v1.8.0"
                ),
                (
                    "github.com/spf13/pflag",
                    "v1.0.5",
                    "pkg:golang/github.com/spf13/pflag@v1.0.5"
                ),
                (
                    "golang.org/x/sys",
                    "v0.15.0",
                    "pkg:golang/golang.org/x/sys@v0.15.0"
                ),
                (
                    "example.com/local",
                    "(devel)",
                    "pkg:golang/example.com/local"
                ),
            ]
        );
    }

    #[test]
    fn truncated_and_old_format_warn() {
        let full = encode_for_test("go1.21.0", MODINFO);
        for cut in [20, 33, 40, full.len() - 1] {
            let mut findings = Findings::default();
            scan("bin/x", &full[..cut], &mut findings);
            assert!(findings.packages.is_empty(), "cut at {cut}");
            assert_eq!(findings.warnings.len(), 1, "cut at {cut}");
        }
        let mut old = full.clone();
        old[15] = 0;
        let mut findings = Findings::default();
        scan("bin/x", &old, &mut findings);
        assert!(findings.warnings[0].message.contains("before 1.18"));
        let mut findings = Findings::default();
        scan("bin/x", b"no build info here", &mut findings);
        assert!(findings.packages.is_empty() && findings.warnings.is_empty());
    }
}
