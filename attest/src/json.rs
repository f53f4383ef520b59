//! Canonical JSON: object keys sorted, no insignificant whitespace.
//!
//! Written here rather than relying on `serde_json::Value`'s map order, which becomes insertion
//! order as soon as any crate in the build enables serde_json's `preserve_order`; an
//! attestation's digest must not depend on that.

use serde_json::Value;

/// The canonical bytes of `value`.
pub(crate) fn to_canonical(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(key.clone()), out);
                out.push(b':');
                write(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // A scalar has no map inside: serde_json cannot fail on it.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_at_every_depth_and_drops_whitespace() {
        let v = json!({"b": [ {"z": 1, "a": "x"} ], "a": {"d": null, "c": true}});
        assert_eq!(
            String::from_utf8(to_canonical(&v)).unwrap(),
            r#"{"a":{"c":true,"d":null},"b":[{"a":"x","z":1}]}"#
        );
    }

    #[test]
    fn escapes_strings_as_json() {
        let v = json!({"k\"": "line\nbreak"});
        assert_eq!(to_canonical(&v), br#"{"k\"":"line\nbreak"}"#.to_vec());
    }
}
