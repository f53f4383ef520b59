//! Package URLs (<https://github.com/package-url/purl-spec>), written by us: a purl is a few
//! percent-encoded parts, and writing it here keeps its bytes fixed (qualifiers sorted by key,
//! one escaping rule) where a crate's formatting could change under us.

use std::fmt::Write;

/// A package URL before encoding: `pkg:type/namespace/name@version?qualifiers`.
pub(crate) struct Purl<'a> {
    pub ty: &'static str,
    /// `/`-separated segments, each encoded on its own.
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    pub version: Option<&'a str>,
    /// Key and value; empty values are left out, keys are sorted when written.
    pub qualifiers: Vec<(&'static str, String)>,
}

impl Purl<'_> {
    /// The canonical string.
    pub fn encode(&self) -> String {
        let mut out = format!("pkg:{}/", self.ty);
        if let Some(ns) = self.namespace.filter(|ns| !ns.is_empty()) {
            for segment in ns.split('/').filter(|s| !s.is_empty()) {
                escape(&mut out, segment);
                out.push('/');
            }
        }
        escape(&mut out, self.name);
        if let Some(v) = self.version.filter(|v| !v.is_empty()) {
            out.push('@');
            escape(&mut out, v);
        }
        let mut qualifiers: Vec<_> = self
            .qualifiers
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
        qualifiers.sort();
        for (i, (k, v)) in qualifiers.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.push_str(k);
            out.push('=');
            escape(&mut out, v);
        }
        out
    }
}

/// Percent-encodes all but the unreserved characters and `:` (which the purl spec leaves
/// unencoded, and which Debian epochs and Go versions use).
fn escape(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(b as char);
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_npm_name_escapes_the_at_sign() {
        let p = Purl {
            ty: "npm",
            namespace: Some("@babel"),
            name: "core",
            version: Some("7.24.0"),
            qualifiers: vec![],
        };
        assert_eq!(p.encode(), "pkg:npm/%40babel/core@7.24.0");
    }

    #[test]
    fn qualifiers_are_sorted_and_values_escaped() {
        let p = Purl {
            ty: "deb",
            namespace: Some("debian"),
            name: "libstdc++6",
            version: Some("1:12.2.0-14+deb12u1"),
            qualifiers: vec![
                ("upstream", "gcc-12".into()),
                ("distro", "debian-12".into()),
                ("arch", "amd64".into()),
                ("epoch", String::new()),
            ],
        };
        assert_eq!(
            p.encode(),
            "pkg:deb/debian/libstdc%2B%2B6@1:12.2.0-14%2Bdeb12u1?arch=amd64&distro=debian-12&upstream=gcc-12"
        );
    }

    #[test]
    fn go_module_path_segments_keep_their_slashes() {
        let p = Purl {
            ty: "golang",
            namespace: Some("github.com/spf13"),
            name: "cobra",
            version: Some("v1.8.0"),
            qualifiers: vec![],
        };
        assert_eq!(p.encode(), "pkg:golang/github.com/spf13/cobra@v1.8.0");
        let odd = Purl {
            ty: "generic",
            namespace: None,
            name: "a b/c?d#e@f",
            version: Some("1 0"),
            qualifiers: vec![],
        };
        assert_eq!(odd.encode(), "pkg:generic/a%20b%2Fc%3Fd%23e%40f@1%200");
    }
}
