//! Python distributions: `*.dist-info/METADATA` (wheels, pip) and `*.egg-info/PKG-INFO` or a
//! bare `*.egg-info` file (setuptools, Debian's python3-* packages), under any `site-packages`
//! or `dist-packages` directory.

use crate::package::{Findings, Kind, Package, Supplier};
use crate::purl::Purl;
use crate::stanza;

/// Whether the file at `rel` is Python distribution metadata.
pub(crate) fn is_metadata(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let [dirs @ .., parent, name] = parts.as_slice() else {
        return false;
    };
    let in_site = dirs
        .iter()
        .chain(std::iter::once(parent))
        .any(|d| *d == "site-packages" || *d == "dist-packages");
    in_site
        && ((*name == "METADATA" && parent.ends_with(".dist-info"))
            || (*name == "PKG-INFO" && parent.ends_with(".egg-info"))
            || name.ends_with(".egg-info"))
}

/// Reads one METADATA or PKG-INFO file (RFC 822 headers; the body is the long description).
pub(crate) fn scan_metadata(rel: &str, bytes: &[u8], findings: &mut Findings) {
    let text = String::from_utf8_lossy(bytes);
    let headers = stanza::headers(&text);
    let (Some(name), Some(version)) = (headers.first_of(&["Name"]), headers.first_of(&["Version"]))
    else {
        findings.warn(rel, "Python metadata without Name or Version");
        return;
    };
    // PEP 639's License-Expression is SPDX by definition; the older License field is often a
    // whole license text, kept only when it is one line (the SPDX writer checks it further).
    let license = headers
        .first_of(&["License-Expression"])
        .or_else(|| headers.first_of(&["License"]).filter(|l| !l.contains('\n')))
        .map(str::to_string);
    let purl = Purl {
        ty: "pypi",
        namespace: None,
        name: &normalize(name),
        version: Some(version),
        qualifiers: Vec::new(),
    };
    findings.packages.push(Package {
        kind: Kind::Python,
        name: name.to_string(),
        version: version.to_string(),
        purl: Some(purl.encode()),
        license,
        supplier: supplier(&headers),
        source: None,
        found_at: vec![rel.to_string()],
    });
}

/// The author, else the maintainer: a name field, an email field (`"A" <a@x>, B <b@x>`), or
/// both.
fn supplier(headers: &stanza::Stanza) -> Option<Supplier> {
    for (name_key, email_key) in [
        ("Author", "Author-email"),
        ("Maintainer", "Maintainer-email"),
    ] {
        let name = headers
            .first_of(&[name_key])
            .filter(|n| !n.eq_ignore_ascii_case("UNKNOWN"));
        let email = headers
            .first_of(&[email_key])
            .and_then(|e| e.split(',').next())
            .map(|e| e.trim().replace('"', ""));
        // An email field may name the person too: `Jane Doe <jane@example.org>`.
        let (email_name, address) = match email.as_deref().map(|e| (e.find('<'), e)) {
            Some((Some(open), e)) => (Some(e[..open].trim()), Some(e[open..].trim())),
            Some((None, e)) => (None, Some(e)),
            None => (None, None),
        };
        let who = name.or(email_name.filter(|n| !n.is_empty()));
        let contact = match (who, address) {
            (Some(who), Some(a)) if a.starts_with('<') => format!("{who} {a}"),
            (Some(who), Some(a)) => format!("{who} <{a}>"),
            (Some(who), None) => who.to_string(),
            (None, Some(a)) => a.to_string(),
            (None, None) => continue,
        };
        if let Some(s) = Supplier::person(&contact) {
            return Some(s);
        }
    }
    None
}

/// PEP 503's normal form, which the pypi purl type asks for: lowercase, runs of `-`, `_` and
/// `.` as one `-`.
pub(crate) fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut in_run = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !in_run {
                out.push('-');
            }
            in_run = true;
        } else {
            out.extend(c.to_lowercase());
            in_run = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head of requests 2.31.0's METADATA as pip installs it.
    const METADATA: &str = "Metadata-Version: 2.1
Name: requests
Version: 2.31.0
Summary: Python HTTP for Humans.
Home-page: https://requests.readthedocs.io
Author: Kenneth Reitz
Author-email: me@kennethreitz.org
License: Apache 2.0
Project-URL: Documentation, https://requests.readthedocs.io
Classifier: License :: OSI Approved :: Apache Software License
Requires-Python: >=3.7
Description-Content-Type: text/markdown
License-File: LICENSE
Requires-Dist: charset-normalizer (<4,>=2)
Requires-Dist: idna (<4,>=2.5)

# Requests

**Requests** is a simple, yet elegant, HTTP library.
Name: not-this
";

    #[test]
    fn dist_info_metadata_gives_a_pypi_purl() {
        let rel = "usr/local/lib/python3.11/site-packages/requests-2.31.0.dist-info/METADATA";
        assert!(is_metadata(rel));
        let mut findings = Findings::default();
        scan_metadata(rel, METADATA.as_bytes(), &mut findings);
        let p = &findings.packages[0];
        assert_eq!(
            (p.name.as_str(), p.version.as_str()),
            ("requests", "2.31.0")
        );
        assert_eq!(p.purl.as_deref(), Some("pkg:pypi/requests@2.31.0"));
        assert_eq!(
            p.license.as_deref(),
            Some("Apache 2.0"),
            "kept verbatim; not SPDX"
        );
        assert_eq!(
            p.supplier.as_ref().map(Supplier::to_spdx).as_deref(),
            Some("Person: Kenneth Reitz (me@kennethreitz.org)")
        );
    }

    #[test]
    fn pep639_expression_and_email_only_author() {
        let text = "Metadata-Version: 2.4\nName: Zope.Interface_Extra\nVersion: 7.0\nLicense-Expression: MIT OR Apache-2.0\nAuthor-email: \"Jane Doe\" <jane@example.org>, Bob <b@x.org>\n";
        let mut findings = Findings::default();
        scan_metadata(
            "usr/lib/python3/dist-packages/x.egg-info/PKG-INFO",
            text.as_bytes(),
            &mut findings,
        );
        let p = &findings.packages[0];
        assert_eq!(p.purl.as_deref(), Some("pkg:pypi/zope-interface-extra@7.0"));
        assert_eq!(p.license.as_deref(), Some("MIT OR Apache-2.0"));
        assert_eq!(
            p.supplier.as_ref().map(Supplier::to_spdx).as_deref(),
            Some("Person: Jane Doe (jane@example.org)")
        );
    }

    #[test]
    fn which_paths_are_metadata() {
        assert!(is_metadata(
            "usr/lib/python3/dist-packages/six-1.16.0.egg-info"
        ));
        assert!(is_metadata(
            "opt/venv/lib/python3.12/site-packages/a.egg-info/PKG-INFO"
        ));
        assert!(
            !is_metadata("home/u/src/a.dist-info/METADATA"),
            "not installed"
        );
        assert!(!is_metadata(
            "usr/lib/python3/dist-packages/a.dist-info/RECORD"
        ));
        assert_eq!(normalize("Foo__Bar.-baz"), "foo-bar-baz");
    }

    #[test]
    fn metadata_without_version_warns() {
        let mut findings = Findings::default();
        scan_metadata("x", b"Name: a\n", &mut findings);
        assert!(findings.packages.is_empty());
        assert_eq!(findings.warnings.len(), 1);
    }
}
