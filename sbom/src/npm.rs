//! npm packages: the `package.json` at the top of every package directory under a
//! `node_modules` (`node_modules/name/` or `node_modules/@scope/name/`), at any depth.

use serde::Deserialize;
use serde_json::Value;

use crate::package::{Findings, Kind, Package, Supplier};
use crate::purl::Purl;

/// Whether `rel` is a package's own manifest, not one of the many `package.json` files deeper
/// inside packages (test fixtures, `"type": "module"` markers).
pub(crate) fn is_manifest(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.as_slice() {
        [.., "node_modules", scope, _, "package.json"] if scope.starts_with('@') => true,
        [.., "node_modules", name, "package.json"] => {
            !name.starts_with('@') && !name.starts_with('.')
        }
        _ => false,
    }
}

#[derive(Deserialize)]
struct Manifest {
    name: Option<String>,
    version: Option<String>,
    license: Option<Value>,
    licenses: Option<Value>,
    author: Option<Value>,
    maintainers: Option<Value>,
    contributors: Option<Value>,
}

/// Reads one package's manifest.
pub(crate) fn scan_manifest(rel: &str, bytes: &[u8], findings: &mut Findings) {
    let manifest: Manifest = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(e) => return findings.warn(rel, format!("not a valid package.json: {e}")),
    };
    let Some(name) = manifest.name.filter(|n| !n.is_empty()) else {
        return findings.warn(rel, "package.json without a name");
    };
    let version = manifest.version.unwrap_or_default();
    let (namespace, short) = match name.split_once('/') {
        Some((scope, short)) if scope.starts_with('@') => (Some(scope), short),
        _ => (None, name.as_str()),
    };
    let purl = Purl {
        ty: "npm",
        namespace,
        name: short,
        version: Some(&version),
        qualifiers: Vec::new(),
    }
    .encode();
    let supplier = manifest
        .author
        .as_ref()
        .and_then(contact)
        .or_else(|| first_contact(manifest.maintainers.as_ref()))
        .or_else(|| first_contact(manifest.contributors.as_ref()));
    findings.packages.push(Package {
        kind: Kind::Npm,
        version,
        purl: Some(purl),
        license: license(manifest.license.as_ref(), manifest.licenses.as_ref()),
        supplier,
        source: None,
        found_at: vec![rel.to_string()],
        name,
    });
}

/// `"MIT"`, the old `{"type": "MIT"}`, or the older `"licenses": [{"type": ...}, ...]`, which
/// meant any of them.
fn license(license: Option<&Value>, licenses: Option<&Value>) -> Option<String> {
    fn one(v: &Value) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("type").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    }
    if let Some(l) = license.and_then(one) {
        return Some(l);
    }
    let list: Vec<String> = licenses?.as_array()?.iter().filter_map(one).collect();
    match list.len() {
        0 => None,
        1 => list.into_iter().next(),
        _ => Some(format!("({})", list.join(" OR "))),
    }
}

fn first_contact(list: Option<&Value>) -> Option<Supplier> {
    list?.as_array()?.iter().find_map(contact)
}

/// `"Name <email> (url)"` or `{"name": ..., "email": ...}`.
fn contact(v: &Value) -> Option<Supplier> {
    match v {
        Value::String(s) => {
            let without_url = match (s.find('('), s.rfind(')')) {
                (Some(open), Some(_)) => &s[..open],
                _ => s.as_str(),
            };
            Supplier::person(without_url)
        }
        Value::Object(o) => {
            let name = o.get("name").and_then(Value::as_str).unwrap_or_default();
            match o.get("email").and_then(Value::as_str) {
                Some(email) => Supplier::person(&format!("{name} <{email}>")),
                None => Supplier::person(name),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scoped_package_as_npm_installs_it() {
        let rel = "app/node_modules/@babel/core/package.json";
        assert!(is_manifest(rel));
        let json = r#"{
  "name": "@babel/core",
  "version": "7.24.0",
  "description": "Babel compiler core.",
  "main": "./lib/index.js",
  "author": "The Babel Team (https://babel.dev/team)",
  "license": "MIT",
  "publishConfig": { "access": "public" },
  "repository": { "type": "git", "url": "https://github.com/babel/babel.git", "directory": "packages/babel-core" },
  "dependencies": { "@ampproject/remapping": "^2.2.0" }
}"#;
        let mut findings = Findings::default();
        scan_manifest(rel, json.as_bytes(), &mut findings);
        let p = &findings.packages[0];
        assert_eq!(p.name, "@babel/core");
        assert_eq!(p.purl.as_deref(), Some("pkg:npm/%40babel/core@7.24.0"));
        assert_eq!(p.license.as_deref(), Some("MIT"));
        assert_eq!(
            p.supplier.as_ref().map(Supplier::to_spdx).as_deref(),
            Some("Person: The Babel Team")
        );
    }

    #[test]
    fn legacy_license_forms_and_maintainers() {
        let json = r#"{"name":"old","version":"0.1.0","licenses":[{"type":"MIT"},{"type":"Apache-2.0"}],
            "maintainers":[{"name":"Ann","email":"ann@example.org"}]}"#;
        let mut findings = Findings::default();
        scan_manifest(
            "node_modules/old/package.json",
            json.as_bytes(),
            &mut findings,
        );
        let p = &findings.packages[0];
        assert_eq!(p.license.as_deref(), Some("(MIT OR Apache-2.0)"));
        assert_eq!(
            p.supplier.as_ref().map(Supplier::to_spdx).as_deref(),
            Some("Person: Ann (ann@example.org)")
        );
    }

    #[test]
    fn only_package_roots_count_and_bad_json_warns() {
        assert!(is_manifest("usr/lib/node_modules/npm/package.json"));
        assert!(is_manifest("a/node_modules/x/node_modules/y/package.json"));
        assert!(!is_manifest("a/node_modules/x/lib/package.json"));
        assert!(!is_manifest("a/node_modules/@scope/package.json"));
        assert!(!is_manifest("a/node_modules/.package-lock.json"));
        assert!(!is_manifest("a/package.json"));
        let mut findings = Findings::default();
        scan_manifest("node_modules/x/package.json", b"{\"name\": ", &mut findings);
        assert!(findings.packages.is_empty());
        assert_eq!(findings.warnings.len(), 1);
    }
}
