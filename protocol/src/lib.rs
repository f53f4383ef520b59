//! Types shared by every ossb node: content digests, platforms, and the cluster's wire
//! protocol.
//!
//! This crate holds plain data, its parsing and its encoding, never I/O. Everything else in
//! the workspace names blobs with [`Digest`] and architectures with [`Platform`]; the cluster's
//! nodes exchange [`wire::Envelope`]s, framed by [`frame`] (the transport that moves them is
//! `ossb-net`).

pub mod cluster;
mod digest;
pub mod frame;
mod platform;
mod time;
pub mod wire;

pub use digest::{Digest, DigestError, Sha256Writer};
pub use platform::{Platform, PlatformError};
pub use time::{parse_rfc3339, rfc3339};

/// `text` cut to its first `max_chars` characters, saying how much was left out, for messages
/// and logs that may quote user input of any length.
pub fn clip(text: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        None => std::borrow::Cow::Borrowed(text),
        Some((cut, _)) => std::borrow::Cow::Owned(format!(
            "{}… ({} more bytes)",
            &text[..cut],
            text.len() - cut
        )),
    }
}

/// Appends `s` as a JSON string the way Go's `encoding/json` writes it (HTML-safe: `<`, `>`,
/// `&`, U+2028 and U+2029 escaped): buildx's outputs, reproduced byte for byte.
pub fn go_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A boolean as Go's `strconv.ParseBool` spells it: what buildx accepts in its options and
/// bake in its overrides.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A `/`-separated path cleaned as Go's `path.Clean` does: `.` and empty parts dropped, `..`
/// applied lexically (kept at the front of a relative path), `.` for nothing. Dockerignore
/// patterns and bake's functions follow Go, so their paths are cleaned alike.
pub fn clean_path(p: &str) -> String {
    let rooted = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in p.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod clean_path_tests {
    #[test]
    fn cleans_as_go_does() {
        for (input, want) in [
            ("", "."),
            ("a/b/../c", "a/c"),
            ("../../a", "../../a"),
            ("/../a/./b/", "/a/b"),
            ("a/..", "."),
            ("//", "/"),
        ] {
            assert_eq!(super::clean_path(input), want, "{input:?}");
        }
    }
}
