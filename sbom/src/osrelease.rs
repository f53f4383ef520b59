//! `/etc/os-release`: which distribution the image is, for the purl's namespace and `distro`
//! qualifier (`pkg:deb/debian/...?distro=debian-12`, as syft and BuildKit's scanner write).

use crate::package::Findings;
use crate::rootfs::Root;

/// os-release is a few lines; a larger one is not what it claims to be.
const LIMIT: u64 = 64 * 1024;

/// The distribution's `ID` and `VERSION_ID`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct OsRelease {
    pub id: Option<String>,
    pub version_id: Option<String>,
}

impl OsRelease {
    /// Reads `etc/os-release`, else `usr/lib/os-release` (the fallback systemd documents).
    pub fn read(root: &Root, findings: &mut Findings) -> OsRelease {
        for path in ["etc/os-release", "usr/lib/os-release"] {
            match root.read_file(path, LIMIT) {
                Ok(Some(bytes)) => return OsRelease::parse(&String::from_utf8_lossy(&bytes)),
                Ok(None) => {}
                Err(e) => findings.warn(path, e.to_string()),
            }
        }
        OsRelease::default()
    }

    /// Parses the shell-like `KEY=value` lines; quotes and backslash escapes are undone.
    pub fn parse(text: &str) -> OsRelease {
        let mut release = OsRelease::default();
        for line in text.lines() {
            let Some((key, value)) = line.trim().split_once('=') else {
                continue;
            };
            let value = unquote(value.trim());
            let slot = match key.trim() {
                "ID" => &mut release.id,
                "VERSION_ID" => &mut release.version_id,
                _ => continue,
            };
            if !value.is_empty() {
                *slot = Some(value);
            }
        }
        release
    }

    /// The `distro` qualifier: `ID-VERSION_ID`, or the ID alone (Debian sid has no VERSION_ID).
    pub fn distro(&self) -> Option<String> {
        let id = self.id.as_deref()?;
        Some(match &self.version_id {
            Some(v) => format!("{id}-{v}"),
            None => id.to_string(),
        })
    }
}

fn unquote(value: &str) -> String {
    let inner = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(value);
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_and_alpine_files() {
        let debian = OsRelease::parse(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nID=debian\n",
        );
        assert_eq!(debian.distro().as_deref(), Some("debian-12"));
        let alpine = OsRelease::parse("NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.19.1\n");
        assert_eq!(alpine.distro().as_deref(), Some("alpine-3.19.1"));
        let sid = OsRelease::parse("ID='debian'\n");
        assert_eq!(sid.distro().as_deref(), Some("debian"));
    }
}
