//! Whether a base image name is a valid image reference, as distribution's
//! `reference.ParseNormalizedNamed` decides (for `InvalidDefaultArgInFrom`). The registry
//! client has its own parser; this crate depends on nothing that talks to registries.

/// Whether `s` parses as `[domain/]path[:tag][@digest]` with Docker Hub's normalization.
pub(crate) fn valid(s: &str) -> bool {
    if s.is_empty() || s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return false;
    }
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (s, None),
    };
    if digest.is_some_and(|d| !valid_digest(d)) {
        return false;
    }
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    let name = match rest[slash..].rfind(':') {
        Some(i) => {
            if !valid_tag(&rest[slash + i + 1..]) {
                return false;
            }
            &rest[..slash + i]
        }
        None => rest,
    };
    let path = match name.split_once('/') {
        Some((first, path))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first != first.to_lowercase() =>
        {
            if !valid_domain(first) {
                return false;
            }
            path
        }
        _ => name,
    };
    !path.is_empty() && path.len() <= 255 && path.split('/').all(valid_component)
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// `host[:port]`, the host dot-separated labels (or a bracketed IPv6 address).
fn valid_domain(d: &str) -> bool {
    let (host, port) = if let Some(v6) = d.strip_prefix('[') {
        match v6.split_once(']') {
            Some((addr, rest)) => {
                if addr.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, rest.strip_prefix(':'))
            }
            None => return false,
        }
    } else {
        match d.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    if port.is_some_and(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit())) {
        return false;
    }
    host.is_none_or(|h| {
        !h.is_empty()
            && h.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            })
    })
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// `algorithm:encoded`, e.g. `sha256:` and 64 hex digits.
fn valid_digest(d: &str) -> bool {
    let Some((alg, enc)) = d.split_once(':') else {
        return false;
    };
    let alg_ok = alg.split(['-', '_', '+', '.']).all(|p| {
        p.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && p.bytes().all(|b| b.is_ascii_alphanumeric())
    });
    alg_ok && enc.len() >= 32 && enc.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::valid;

    #[test]
    fn accepts_and_refuses_as_distribution() {
        for ok in [
            "busybox",
            "scratch",
            "busybox:latest",
            "busybox:stable-musl",
            "library/busybox",
            "localhost:5000/a/b:1.0",
            "127.0.0.1:5000/library/busybox",
            "ghcr.io/owner/repo@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "build_amd64",
            "a__b",
            "a---b",
            // An upper-case first component is taken for a registry host.
            "UPPER/repo",
        ] {
            assert!(valid(ok), "{ok}");
        }
        for bad in [
            "",
            "busybox:",
            "Busybox",
            "alpine:3.20:",
            ":latest",
            "a/",
            "a..b",
            "-a",
            "a@sha256:abc",
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(!valid(bad), "{bad}");
        }
    }
}
