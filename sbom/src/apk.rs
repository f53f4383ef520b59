//! Alpine (and Wolfi, Chainguard) packages: apk's `lib/apk/db/installed`, one record per
//! package, records separated by blank lines, each line a one-letter key, a colon, a value.

use crate::osrelease::OsRelease;
use crate::package::{Findings, Kind, Package, Supplier};
use crate::purl::Purl;
use crate::rootfs::Root;

/// Where apk keeps what is installed.
pub(crate) const INSTALLED: &str = "lib/apk/db/installed";

/// Scans `lib/apk/db/installed`.
pub(crate) fn scan_installed(root: &Root, os: &OsRelease, findings: &mut Findings) {
    match root.read_file(INSTALLED, crate::METADATA_LIMIT) {
        Ok(Some(bytes)) => scan_text(&String::from_utf8_lossy(&bytes), os, findings),
        Ok(None) => {}
        Err(e) => findings.warn(INSTALLED, e.to_string()),
    }
}

#[derive(Default)]
struct Record<'a> {
    line: usize,
    name: Option<&'a str>,
    version: Option<&'a str>,
    arch: Option<&'a str>,
    license: Option<&'a str>,
    origin: Option<&'a str>,
    maintainer: Option<&'a str>,
}

fn scan_text(text: &str, os: &OsRelease, findings: &mut Findings) {
    let mut record = Record::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            finish(std::mem::take(&mut record), os, findings);
            continue;
        }
        if record.line == 0 {
            record.line = index + 1;
        }
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "P" => &mut record.name,
            "V" => &mut record.version,
            "A" => &mut record.arch,
            "L" => &mut record.license,
            "o" => &mut record.origin,
            "m" => &mut record.maintainer,
            // The file list (R:, Z:, F: ...) and the rest are not needed for the SBOM.
            _ => continue,
        };
        if slot.is_none() {
            *slot = Some(value.trim()).filter(|v| !v.is_empty());
        }
    }
    finish(record, os, findings);
}

fn finish(record: Record, os: &OsRelease, findings: &mut Findings) {
    if record.line == 0 {
        return;
    }
    let Some(name) = record.name else {
        let message = format!("record at line {} has no P: (package name)", record.line);
        return findings.warn(INSTALLED, message);
    };
    let version = record.version.unwrap_or_default();
    let source = record.origin.filter(|o| *o != name).map(str::to_string);
    let purl = Purl {
        ty: "apk",
        namespace: Some(os.id.as_deref().unwrap_or("alpine")),
        name,
        version: Some(version),
        qualifiers: vec![
            ("arch", record.arch.unwrap_or_default().to_string()),
            ("distro", os.distro().unwrap_or_default()),
            ("upstream", source.clone().unwrap_or_default()),
        ],
    };
    findings.packages.push(Package {
        kind: Kind::Apk,
        name: name.to_string(),
        version: version.to_string(),
        purl: Some(purl.encode()),
        license: record.license.map(str::to_string),
        supplier: record.maintainer.and_then(Supplier::person),
        source,
        found_at: vec![INSTALLED.to_string()],
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two records as Alpine 3.19 writes them, file lists included.
    const INSTALLED_TEXT: &str = "C:Q1lhYqM+LQ0mYKO/6Cxh5Gb3W0FTg=
P:musl
V:1.2.4_git20230717-r4
A:x86_64
S:407278
I:667648
T:the musl c library (libc) implementation
U:https://musl.libc.org/
L:MIT
o:musl
m:Timo Teräs <timo.teras@iki.fi>
t:1705420848
c:ca7f2ab5e88794e4e654b40776f8a92256f50639
p:so:libc.musl-x86_64.so.1=1
F:lib
R:ld-musl-x86_64.so.1
a:0:0:755
Z:Q1Gg8mpx7NOIzyAzm1RJDmtUKWZ0A=
R:libc.musl-x86_64.so.1
a:0:0:777
Z:Q17yJ3JFNypA4mxhJJr0ou6CzsJVI=

C:Q1H+FD0LG8Gd0+W2A7p1VbJ2kx3s4=
P:libcrypto3
V:3.1.4-r5
A:x86_64
L:Apache-2.0
o:openssl
m:Ariadne Conill <ariadne@dereferenced.org>
D:so:libc.musl-x86_64.so.1
F:usr/lib
R:libcrypto.so.3

V:9
";

    #[test]
    fn reads_records_with_origin_and_maintainer() {
        let os = OsRelease {
            id: Some("alpine".into()),
            version_id: Some("3.19.1".into()),
        };
        let mut findings = Findings::default();
        scan_text(INSTALLED_TEXT, &os, &mut findings);
        let p = &findings.packages;
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0].purl.as_deref(),
            Some("pkg:apk/alpine/musl@1.2.4_git20230717-r4?arch=x86_64&distro=alpine-3.19.1")
        );
        assert_eq!(p[0].license.as_deref(), Some("MIT"));
        assert_eq!(
            p[0].supplier.as_ref().map(Supplier::to_spdx).as_deref(),
            Some("Person: Timo Teräs (timo.teras@iki.fi)")
        );
        assert_eq!(
            p[1].purl.as_deref(),
            Some("pkg:apk/alpine/libcrypto3@3.1.4-r5?arch=x86_64&distro=alpine-3.19.1&upstream=openssl")
        );
        assert_eq!(findings.warnings.len(), 1, "the record without P:");
    }
}
