//! EXPOSE port specs as BuildKit reads them (`[ip:][hostPort:]containerPort[/proto]`), for
//! `ExposeProtoCasing` and `ExposeInvalidFormat`.

/// What the checks see in one port spec.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Found {
    /// The protocol is not in lower case (`80/TCP`).
    pub proto_casing: bool,
    /// An IP address or a host port is given (`127.0.0.1:80:80`, `80:80`).
    pub host_mapping: bool,
}

/// Reads `raw`; fails as BuildKit does on a spec with no port or an unknown protocol (before
/// it looks at the rest). The port numbers themselves are the planner's to check.
pub(crate) fn check(raw: &str) -> Result<Found, String> {
    let parts: Vec<&str> = raw.split(':').collect();
    let n = parts.len();
    let (ip, host, container) = match n {
        1 => ("".to_string(), "", parts[0]),
        2 => ("".to_string(), parts[0], parts[1]),
        _ => (parts[..n - 2].join(":"), parts[n - 2], parts[n - 1]),
    };
    let (port, proto) = container.split_once('/').unwrap_or((container, ""));
    let fail = |why: String| Err(format!("invalid port: {}: {why}", crate::go_quote(raw)));
    if port.is_empty() {
        return fail("no port specified".into());
    }
    if !matches!(proto.to_lowercase().as_str(), "" | "tcp" | "udp" | "sctp") {
        return fail(format!("invalid proto: {proto}"));
    }
    Ok(Found {
        proto_casing: proto != proto.to_lowercase(),
        host_mapping: !ip.is_empty() || !host.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_port_specs_as_buildkit() {
        assert_eq!(check("80").unwrap(), Found::default());
        assert_eq!(check("80/udp").unwrap(), Found::default());
        assert!(check("80/TcP").unwrap().proto_casing);
        assert!(check("80:80").unwrap().host_mapping);
        assert!(check("127.0.0.1:80:80").unwrap().host_mapping);
        assert!(
            check("[::1]:80:80/UDP").unwrap()
                == Found {
                    proto_casing: true,
                    host_mapping: true
                }
        );
        assert_eq!(
            check("80/foo").unwrap_err(),
            "invalid port: \"80/foo\": invalid proto: foo"
        );
        assert_eq!(
            check("/tcp").unwrap_err(),
            "invalid port: \"/tcp\": no port specified"
        );
    }
}
