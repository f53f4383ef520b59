//! Image references (`[domain/]path[:tag][@digest]`), parsed by the grammar of distribution's
//! `reference` package, with Docker Hub's normalization.

use oci_client::Reference;

const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const OFFICIAL_IMAGES: &str = "library";
const DEFAULT_TAG: &str = "latest";
/// The longest repository name (distribution's limit).
const MAX_NAME: usize = 255;

/// Parses `s`; the error says what is wrong with it.
pub(crate) fn parse(s: &str) -> Result<Reference, &'static str> {
    if s.is_empty() {
        return Err("repository name must have at least one component");
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(check_digest(digest)?)),
        None => (s, None),
    };
    // A tag is after the last ':' that follows the last '/' (a ':' before it is a port).
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[slash..].rfind(':') {
        Some(i) => {
            let tag = &rest[slash + i + 1..];
            if !valid_tag(tag) {
                return Err("invalid tag format");
            }
            (&rest[..slash + i], Some(tag))
        }
        None => (rest, None),
    };
    let (domain, path) = split_domain(name)?;
    if path.is_empty() || !path.split('/').all(valid_path_component) {
        return Err("invalid reference format");
    }
    let (domain, path) = normalize(domain, path);
    if path.len() > MAX_NAME {
        return Err("repository name must not be more than 255 characters");
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => Reference::with_tag_and_digest(domain, path, t.into(), d.into()),
        (None, Some(d)) => Reference::with_digest(domain, path, d.into()),
        (t, None) => Reference::with_tag(domain, path, t.unwrap_or(DEFAULT_TAG).into()),
    })
}

/// The domain (if the first component is one: it has a `.` or a `:`, or is `localhost`) and
/// the path.
fn split_domain(name: &str) -> Result<(Option<&str>, &str), &'static str> {
    match name.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            if !valid_domain(first) {
                return Err("invalid reference format");
            }
            Ok((Some(first), path))
        }
        _ => Ok((None, name)),
    }
}

/// Docker Hub's spelling: `docker.io` (not `index.docker.io`), `library/` before one-word names.
fn normalize(domain: Option<&str>, path: &str) -> (String, String) {
    let domain = match domain {
        None | Some(DOCKER_HUB_LEGACY) => DOCKER_HUB,
        Some(d) => d,
    };
    let path = if domain == DOCKER_HUB && !path.contains('/') {
        format!("{OFFICIAL_IMAGES}/{path}")
    } else {
        path.to_string()
    };
    (domain.to_string(), path)
}

/// `host[:port]`: dot-separated labels of letters, digits and inner hyphens.
fn valid_domain(domain: &str) -> bool {
    let (host, port) = match domain.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (domain, None),
    };
    let label = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `[a-z0-9]+` runs joined by one separator each: `.`, `_`, `__`, or any number of `-`.
fn valid_path_component(c: &str) -> bool {
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-')) {
            return false;
        }
    }
    true
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
}

/// `algorithm:hex`, with the hex length of the algorithms registries use.
fn check_digest(digest: &str) -> Result<&str, &'static str> {
    let Some((algorithm, hex)) = digest.split_once(':') else {
        return Err("invalid checksum digest format");
    };
    if hex.len() < 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("invalid checksum digest format");
    }
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != want {
        return Err("invalid checksum digest length");
    }
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(s: &str) -> String {
        parse(s).unwrap_or_else(|e| panic!("{s}: {e}")).whole()
    }

    #[test]
    fn normalizes_as_docker_does() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        for (given, want) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            (
                "index.docker.io/busybox",
                "docker.io/library/busybox:latest",
            ),
            ("docker.io/team/app", "docker.io/team/app:latest"),
            ("team/app:v1", "docker.io/team/app:v1"),
            ("test.com:tag", "docker.io/library/test.com:tag"),
            ("localhost/app", "localhost/app:latest"),
            ("127.0.0.1:5000/tests/x:y", "127.0.0.1:5000/tests/x:y"),
            ("reg:5000/a/b/c", "reg:5000/a/b/c:latest"),
            ("Registry.Example.com/a", "Registry.Example.com/a:latest"),
            (
                "ghcr.io/o/n_a-m__e.x---y:Tag_1.0-rc",
                "ghcr.io/o/n_a-m__e.x---y:Tag_1.0-rc",
            ),
        ] {
            assert_eq!(whole(given), want, "{given}");
        }
        let pinned = parse(&format!("reg:5000/app@{d}")).unwrap();
        assert_eq!(pinned.digest(), Some(d.as_str()));
        assert_eq!(pinned.tag(), None);
        assert_eq!(pinned.whole(), format!("reg:5000/app@{d}"));
        let both = parse(&format!("app:1@{d}")).unwrap();
        assert_eq!((both.tag(), both.digest()), (Some("1"), Some(d.as_str())));
        let p = parse("127.0.0.1:5000/tests/x:y").unwrap();
        assert_eq!(
            (p.registry(), p.repository()),
            ("127.0.0.1:5000", "tests/x")
        );
    }

    #[test]
    fn refuses_what_docker_refuses() {
        for bad in [
            "",
            ":tag",
            "@sha256:abc",
            "Uppercase:tag",
            "reg:5000/Upper/x",
            "a:b/c",
            "app:",
            "app:-tag",
            "a//b",
            "a/",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "app@md5:0123456789abcdef0123456789abcdef",
            "app@sha256:0123456789abcdef0123456789abcdef",
            "aa/asdf$$^/aa",
            "reg:port/app",
            "-reg.com/app",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(parse(&"a".repeat(256)).is_err());
    }
}
