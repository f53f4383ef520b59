//! Debian and Ubuntu packages: dpkg's `var/lib/dpkg/status`, and distroless images'
//! `var/lib/dpkg/status.d/<package>` files (one control paragraph each, no dpkg database).

use crate::osrelease::OsRelease;
use crate::package::{Findings, Kind, Package, Supplier};
use crate::purl::Purl;
use crate::rootfs::Root;
use crate::stanza;

/// Where dpkg keeps what is installed.
pub(crate) const STATUS: &str = "var/lib/dpkg/status";
const STATUS_D: &str = "var/lib/dpkg/status.d/";
/// A status file of a large image is a few MiB; more is not one.
pub(crate) const LIMIT: u64 = crate::METADATA_LIMIT;

/// Scans `var/lib/dpkg/status`.
pub(crate) fn scan_status(root: &Root, os: &OsRelease, findings: &mut Findings) {
    match root.read_file(STATUS, LIMIT) {
        Ok(Some(bytes)) => scan_text(STATUS, &bytes, os, true, findings),
        Ok(None) => {}
        Err(e) => findings.warn(STATUS, e.to_string()),
    }
}

/// Whether `rel` is a distroless per-package status file (not its `.md5sums` companion).
pub(crate) fn is_status_d_file(rel: &str) -> bool {
    rel.strip_prefix(STATUS_D)
        .is_some_and(|name| !name.contains('/') && !name.ends_with(".md5sums"))
}

/// Parses the paragraphs of a status file. Distroless files carry no `Status` field (their
/// presence means installed), so `need_status` is false for them.
pub(crate) fn scan_text(
    path: &str,
    bytes: &[u8],
    os: &OsRelease,
    need_status: bool,
    findings: &mut Findings,
) {
    let text = String::from_utf8_lossy(bytes);
    for para in stanza::paragraphs(&text) {
        if !installed(para.get("Status"), need_status) {
            continue;
        }
        let Some(name) = para.first_of(&["Package"]) else {
            findings.warn(
                path,
                format!("paragraph at line {} has no Package field", para.line),
            );
            continue;
        };
        let version = para.first_of(&["Version"]).unwrap_or_default();
        let arch = para.first_of(&["Architecture"]).unwrap_or_default();
        // `Source: glibc (2.36-9)` names the source package and, when it differs, its version.
        let source = para
            .first_of(&["Source"])
            .and_then(|s| s.split_whitespace().next())
            .filter(|s| *s != name)
            .map(str::to_string);
        let namespace = os.id.as_deref().unwrap_or("debian");
        let purl = Purl {
            ty: "deb",
            namespace: Some(namespace),
            name,
            version: Some(version),
            qualifiers: vec![
                ("arch", arch.to_string()),
                ("distro", os.distro().unwrap_or_default()),
                ("upstream", source.clone().unwrap_or_default()),
            ],
        };
        findings.packages.push(Package {
            kind: Kind::Deb,
            name: name.to_string(),
            version: version.to_string(),
            purl: Some(purl.encode()),
            // Debian's licenses live in free-form copyright files; not guessed here.
            license: None,
            supplier: para.first_of(&["Maintainer"]).and_then(Supplier::person),
            source,
            found_at: vec![path.to_string()],
        });
    }
}

/// dpkg's `Status: want flag state`. The state says what is on disk: `installed` whatever the
/// wish (`install`, or `hold` for a pinned package, or `deinstall` not yet carried out).
/// Half-installed, unpacked-only and config-files-only packages are not counted.
fn installed(status: Option<&str>, need_status: bool) -> bool {
    match status {
        Some(status) => status.split_whitespace().nth(2) == Some("installed"),
        None => !need_status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two paragraphs as dpkg writes them (from a Debian 12 image), with a multi-line
    /// description and conffiles, plus a removed package that left its configuration behind.
    const STATUS_TEXT: &str = "\
Package: libc6
Status: install ok installed
Priority: optional
Section: libs
Installed-Size: 12988
Maintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>
Architecture: amd64
Multi-Arch: same
Source: glibc
Version: 2.36-9+deb12u4
Replaces: libc6-amd64
Depends: libgcc-s1
Recommends: libidn2-0 (>= 2.0.5~)
Breaks: aide (<< 0.17.3-4+b3), busybox (<< 1.30.1-6)
Conffiles:
 /etc/ld.so.conf.d/x86_64-linux-gnu.conf d4e7a7b88a71b5ffd9e2644e71a0cfab
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system. This package includes shared versions of the standard C library
 and the standard math library, as well as many others.
Homepage: https://www.gnu.org/software/libc/libc.html

Package: login
Status: hold ok installed
Priority: required
Section: admin
Maintainer: Shadow package maintainers <pkg-shadow-devel@lists.alioth.debian.org>
Architecture: amd64
Source: shadow (1:4.13+dfsg1-1)
Version: 1:4.13+dfsg1-1+b1
Description: system login tools
 This package provides some required infrastructure for logins.

Package: old-thing
Status: deinstall ok config-files
Architecture: all
Version: 1.0

";

    #[test]
    fn reads_installed_packages_with_source_and_maintainer() {
        let os = OsRelease {
            id: Some("debian".into()),
            version_id: Some("12".into()),
        };
        let mut findings = Findings::default();
        scan_text(STATUS, STATUS_TEXT.as_bytes(), &os, true, &mut findings);
        assert!(findings.warnings.is_empty());
        let p = &findings.packages;
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].name, "libc6");
        assert_eq!(p[0].version, "2.36-9+deb12u4");
        assert_eq!(
            p[0].purl.as_deref(),
            Some(
                "pkg:deb/debian/libc6@2.36-9%2Bdeb12u4?arch=amd64&distro=debian-12&upstream=glibc"
            )
        );
        assert_eq!(
            p[0].supplier.as_ref().map(Supplier::to_spdx).as_deref(),
            Some("Person: GNU Libc Maintainers (debian-glibc@lists.debian.org)")
        );
        assert_eq!(p[1].name, "login");
        assert_eq!(p[1].source.as_deref(), Some("shadow"));
        assert_eq!(
            p[1].purl.as_deref(),
            Some("pkg:deb/debian/login@1:4.13%2Bdfsg1-1%2Bb1?arch=amd64&distro=debian-12&upstream=shadow")
        );
    }

    #[test]
    fn distroless_files_need_no_status_and_paragraph_without_name_warns() {
        let mut findings = Findings::default();
        let text =
            "Package: base-files\nVersion: 12.4+deb12u5\nArchitecture: amd64\n\nVersion: 1\n";
        scan_text(
            "var/lib/dpkg/status.d/base-files",
            text.as_bytes(),
            &OsRelease::default(),
            false,
            &mut findings,
        );
        assert_eq!(findings.packages.len(), 1);
        assert_eq!(
            findings.packages[0].purl.as_deref(),
            Some("pkg:deb/debian/base-files@12.4%2Bdeb12u5?arch=amd64")
        );
        assert_eq!(findings.warnings.len(), 1);
        assert!(is_status_d_file("var/lib/dpkg/status.d/base-files"));
        assert!(!is_status_d_file(
            "var/lib/dpkg/status.d/base-files.md5sums"
        ));
        assert!(!is_status_d_file("var/lib/dpkg/status"));
    }
}
