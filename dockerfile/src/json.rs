//! The JSON (exec) form of instructions: `["a", "b"]`.
//!
//! Only what Dockerfiles need: a top-level array. Anything that is not valid JSON makes
//! the caller fall back to the shell form; a valid array holding a non-string is an error,
//! as in BuildKit (which uses Go's `encoding/json`, so invalid UTF-8 and lone surrogates
//! become U+FFFD rather than errors).

/// The outcome of reading text as a JSON array of strings.
#[derive(Debug, PartialEq, Eq)]
pub enum JsonArray {
    /// A valid array of strings.
    Strings(Vec<String>),
    /// Valid JSON array with an element that is not a string.
    NotStrings,
    /// Not JSON (or not an array): use the shell form.
    Invalid,
}

/// Reads `text` (leading whitespace allowed) as a JSON array of strings.
pub fn parse_array(text: &str) -> JsonArray {
    let text = text.trim_start_matches(char::is_whitespace);
    if !text.starts_with('[') {
        return JsonArray::Invalid;
    }
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        depth: 0,
    };
    p.ws();
    let Some(v) = p.value() else {
        return JsonArray::Invalid;
    };
    p.ws();
    if p.i != p.s.len() {
        return JsonArray::Invalid;
    }
    match v {
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for it in items {
                match it {
                    Value::Str(s) => out.push(s),
                    _ => return JsonArray::NotStrings,
                }
            }
            JsonArray::Strings(out)
        }
        _ => JsonArray::Invalid,
    }
}

enum Value {
    Str(String),
    Array(Vec<Value>),
    Other,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while matches!(self.s.get(self.i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn lit(&mut self, word: &[u8]) -> Option<Value> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Some(Value::Other)
        } else {
            None
        }
    }

    fn value(&mut self) -> Option<Value> {
        match *self.s.get(self.i)? {
            b'[' => self.array(),
            b'{' => self.object(),
            b'"' => self.string().map(Value::Str),
            b't' => self.lit(b"true"),
            b'f' => self.lit(b"false"),
            b'n' => self.lit(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn array(&mut self) -> Option<Value> {
        self.depth += 1;
        if self.depth > 10_000 {
            return None;
        }
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.s.get(self.i) == Some(&b']') {
            self.i += 1;
            self.depth -= 1;
            return Some(Value::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value()?);
            self.ws();
            match self.s.get(self.i)? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Some(Value::Array(items));
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self) -> Option<Value> {
        self.depth += 1;
        if self.depth > 10_000 {
            return None;
        }
        self.i += 1;
        self.ws();
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            self.depth -= 1;
            return Some(Value::Other);
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return None;
            }
            self.string()?;
            self.ws();
            if self.s.get(self.i) != Some(&b':') {
                return None;
            }
            self.i += 1;
            self.ws();
            self.value()?;
            self.ws();
            match self.s.get(self.i)? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    self.depth -= 1;
                    return Some(Value::Other);
                }
                _ => return None,
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.s.get(self.i), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Option<Value> {
        if self.s[self.i] == b'-' {
            self.i += 1;
        }
        match self.s.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(Value::Other)
    }

    fn hex4(&mut self) -> Option<u32> {
        let h = self.s.get(self.i..self.i + 4)?;
        let h = std::str::from_utf8(h).ok()?;
        let v = u32::from_str_radix(h, 16).ok()?;
        if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.i += 4;
        Some(v)
    }

    fn string(&mut self) -> Option<String> {
        self.i += 1;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let b = *self.s.get(self.i)?;
            match b {
                b'"' => {
                    self.i += 1;
                    return Some(String::from_utf8_lossy(&out).into_owned());
                }
                b'\\' => {
                    self.i += 1;
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\x08',
                        b'f' => '\x0c',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let u = self.hex4()?;
                            if (0xD800..0xDC00).contains(&u) {
                                // A high surrogate: pair it with a following low one if present.
                                let save = self.i;
                                if self.s.get(self.i) == Some(&b'\\')
                                    && self.s.get(self.i + 1) == Some(&b'u')
                                {
                                    self.i += 2;
                                    if let Some(lo) = self.hex4() {
                                        if (0xDC00..0xE000).contains(&lo) {
                                            let cp = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                                            char::from_u32(cp).unwrap_or('\u{fffd}')
                                        } else {
                                            self.i = save;
                                            '\u{fffd}'
                                        }
                                    } else {
                                        self.i = save;
                                        '\u{fffd}'
                                    }
                                } else {
                                    '\u{fffd}'
                                }
                            } else {
                                char::from_u32(u).unwrap_or('\u{fffd}')
                            }
                        }
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                0..=0x1f => return None,
                _ => {
                    out.push(b);
                    self.i += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_arrays_like_go() {
        assert_eq!(
            parse_array(r#"["a", "b"]"#),
            JsonArray::Strings(vec!["a".into(), "b".into()])
        );
        assert_eq!(parse_array("[]"), JsonArray::Strings(vec![]));
        assert_eq!(parse_array(r#"["a", 1]"#), JsonArray::NotStrings);
        assert_eq!(parse_array(r#"["a", ["b"]]"#), JsonArray::NotStrings);
        assert_eq!(parse_array("['a']"), JsonArray::Invalid);
        assert_eq!(parse_array(r#"["a"] # c"#), JsonArray::Invalid);
        assert_eq!(
            parse_array(r#"["\u0000 \/"]"#),
            JsonArray::Strings(vec!["\0 /".into()])
        );
    }
}
