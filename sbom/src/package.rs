//! What a scan finds: packages, who supplied them, and the warnings about files it skipped.

use std::fmt;

/// The ecosystem a package was found in; decides its purl type and its SPDX id prefix.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    /// A Debian or Ubuntu package from dpkg's status database.
    Deb,
    /// An Alpine package from apk's installed database.
    Apk,
    /// An RPM package from the rpmdb.
    Rpm,
    /// A Python distribution (`*.dist-info` or `*.egg-info`).
    Python,
    /// An npm package under `node_modules`.
    Npm,
    /// A Go module (or the Go standard library) compiled into a binary.
    GoModule,
    /// A Rust crate compiled into a binary built with cargo-auditable.
    Cargo,
}

impl Kind {
    /// The short lowercase name used in SPDX ids and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deb => "deb",
            Kind::Apk => "apk",
            Kind::Rpm => "rpm",
            Kind::Python => "python",
            Kind::Npm => "npm",
            Kind::GoModule => "go-module",
            Kind::Cargo => "cargo",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who distributed a package, as its metadata names them (SPDX's `supplier`).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Supplier {
    /// A person or a team named in a maintainer or author field.
    Person { name: String, email: Option<String> },
    /// An organization, e.g. an RPM vendor or the registry a crate came from.
    Organization { name: String, email: Option<String> },
}

impl Supplier {
    /// Parses a `Name <email>` contact as package metadata writes it; `None` when it holds
    /// no name and no address.
    pub fn person(contact: &str) -> Option<Supplier> {
        let (name, email) = split_contact(contact)?;
        Some(Supplier::Person { name, email })
    }

    /// As [`Supplier::person`], for an organization.
    pub fn organization(contact: &str) -> Option<Supplier> {
        let (name, email) = split_contact(contact)?;
        Some(Supplier::Organization { name, email })
    }

    /// The SPDX 2.3 spelling: `Person: name (email)` or `Organization: name (email)`.
    pub fn to_spdx(&self) -> String {
        let (prefix, name, email) = match self {
            Supplier::Person { name, email } => ("Person", name, email),
            Supplier::Organization { name, email } => ("Organization", name, email),
        };
        match email {
            Some(email) => format!("{prefix}: {name} ({email})"),
            None => format!("{prefix}: {name}"),
        }
    }
}

/// `Jane Doe <jane@example.org>` → (`Jane Doe`, `jane@example.org`). Parentheses would end
/// SPDX's `(email)` early, so they become brackets; a contact that is only an address is
/// named by it.
fn split_contact(contact: &str) -> Option<(String, Option<String>)> {
    let contact = contact.trim();
    let (name, email) = match (contact.find('<'), contact.rfind('>')) {
        (Some(open), Some(close)) if open < close => (
            contact[..open].trim(),
            Some(contact[open + 1..close].trim()),
        ),
        _ if contact.contains('@') && !contact.contains(' ') => ("", Some(contact)),
        _ => (contact, None),
    };
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| match c {
                '(' => '[',
                ')' => ']',
                c if c.is_control() => ' ',
                c => c,
            })
            .collect::<String>()
            .trim()
            .to_string()
    };
    let email = email.map(clean).filter(|e| !e.is_empty());
    let name = clean(name);
    match (name.is_empty(), email) {
        (true, None) => None,
        (true, Some(email)) => Some((email, None)),
        (false, email) => Some((name, email)),
    }
}

/// One package found in the root filesystem.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Package {
    /// The ecosystem it belongs to.
    pub kind: Kind,
    /// The name as its package manager spells it.
    pub name: String,
    /// The version as its package manager spells it (with a Debian epoch, `1:2.3-4`); empty
    /// when the metadata had none.
    pub version: String,
    /// The package URL, when the package can be named by one.
    pub purl: Option<String>,
    /// The license as the metadata declares it, verbatim: an SPDX expression or not (the SPDX
    /// writer keeps it only when it is one).
    pub license: Option<String>,
    /// Who distributed it, when its metadata says.
    pub supplier: Option<Supplier>,
    /// The source package it was built from (dpkg `Source`, apk origin, the source RPM).
    pub source: Option<String>,
    /// Where it was found: paths relative to the root, `/`-separated, sorted.
    pub found_at: Vec<String>,
}

/// A file the scan skipped or read only in part, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Warning {
    /// The path relative to the root.
    pub path: String,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}: {}", self.path, self.message)
    }
}

/// What scanners add to as they go: the packages found and the warnings about what was skipped.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    pub packages: Vec<Package>,
    pub warnings: Vec<Warning>,
}

impl Findings {
    pub fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(Warning {
            path: path.to_string(),
            message: message.into(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contact_with_address_becomes_spdx_person() {
        let s =
            Supplier::person("Debian Perl Group <pkg-perl-maintainers@lists.alioth.debian.org>")
                .expect("a contact");
        assert_eq!(
            s.to_spdx(),
            "Person: Debian Perl Group (pkg-perl-maintainers@lists.alioth.debian.org)"
        );
    }

    #[test]
    fn contact_without_name_or_with_parentheses() {
        assert_eq!(
            Supplier::person("dev@example.org").map(|s| s.to_spdx()),
            Some("Person: dev@example.org".to_string())
        );
        assert_eq!(
            Supplier::organization("Acme (EU)").map(|s| s.to_spdx()),
            Some("Organization: Acme [EU]".to_string())
        );
        assert_eq!(Supplier::person("  "), None);
        assert_eq!(Supplier::person("<>"), None);
    }
}
