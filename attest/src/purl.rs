//! Package URLs for images, spelled as BuildKit spells them (its `util/purl`, which formats
//! with packageurl-go): `pkg:docker/NAMESPACE/NAME@TAG?digest=...&platform=OS%2FARCH`.
//!
//! The escaping follows Go's `net/url`, which packageurl-go uses: namespace segments and the
//! name with `QueryEscape`, the version and qualifier values with `PathEscape`. Matching it
//! byte for byte matters: tools compare subject names as strings.

use ossb_image::Reference;
use ossb_protocol::Platform;

/// The package URL of `reference` (a parsed image name) for `platform`.
pub fn image_purl(reference: &Reference, platform: Option<&Platform>) -> String {
    let familiar = familiar_name(reference);
    let (namespace, name) = match familiar.rsplit_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, familiar.as_str()),
    };
    let mut out = String::from("pkg:docker/");
    if let Some(ns) = namespace {
        for segment in ns.split('/') {
            out.push_str(&query_escape(segment));
            out.push('/');
        }
    }
    out.push_str(&query_escape(name));
    // As distribution's TagNameOnly: a name without tag or digest is `latest`; a name with a
    // digest and no tag has no version, only the digest qualifier.
    let version = match (reference.tag(), reference.digest()) {
        (Some(tag), _) => Some(tag),
        (None, Some(_)) => None,
        (None, None) => Some("latest"),
    };
    if let Some(version) = version {
        out.push('@');
        out.push_str(&path_escape(version));
    }
    let mut qualifiers = Vec::new();
    if let Some(digest) = reference.digest() {
        qualifiers.push(format!("digest={}", path_escape(digest)));
    }
    if let Some(platform) = platform {
        qualifiers.push(format!("platform={}", path_escape(&platform.to_string())));
    }
    if !qualifiers.is_empty() {
        out.push('?');
        out.push_str(&qualifiers.join("&"));
    }
    out
}

/// Docker's short name: Docker Hub's host and its `library/` left out.
fn familiar_name(reference: &Reference) -> String {
    match reference.registry() {
        "docker.io" | "index.docker.io" => reference
            .repository()
            .strip_prefix("library/")
            .filter(|rest| !rest.contains('/'))
            .unwrap_or(reference.repository())
            .to_string(),
        host => format!("{host}/{}", reference.repository()),
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    escape(s, unreserved, true)
}

/// Go's `url.PathEscape` (a path segment: `/`, `;`, `,` and `?` are escaped, `$&+:=@` kept).
fn path_escape(s: &str) -> String {
    escape(
        s,
        |b| unreserved(b) || matches!(b, b'$' | b'&' | b'+' | b':' | b'=' | b'@'),
        false,
    )
}

fn escape(s: &str, keep: impl Fn(u8) -> bool, space_as_plus: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if keep(b) {
            out.push(b as char);
        } else if b == b' ' && space_as_plus {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ossb_image::registry::parse_reference;

    fn purl(name: &str, platform: &str) -> String {
        let platform: Platform = platform.parse().unwrap();
        image_purl(&parse_reference(name).unwrap(), Some(&platform))
    }

    #[test]
    fn docker_hub_names_are_familiar() {
        assert_eq!(
            purl("alpine", "linux/amd64"),
            "pkg:docker/alpine@latest?platform=linux%2Famd64"
        );
        assert_eq!(
            purl("docker.io/user/app:1.0", "linux/arm64"),
            "pkg:docker/user/app@1.0?platform=linux%2Farm64"
        );
    }

    #[test]
    fn registry_host_is_a_query_escaped_namespace_segment() {
        assert_eq!(
            purl("localhost:5000/team/app:v2", "linux/arm/v7"),
            "pkg:docker/localhost%3A5000/team/app@v2?platform=linux%2Farm%2Fv7"
        );
    }

    #[test]
    fn digest_reference_has_a_digest_qualifier_and_no_version() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            purl(&format!("ghcr.io/o/app@{d}"), "linux/amd64"),
            format!("pkg:docker/ghcr.io/o/app?digest={d}&platform=linux%2Famd64")
        );
    }
}
