//! `Field: value` blocks with indented continuation lines: Debian's control paragraphs (dpkg
//! status) and the RFC 822 headers of Python's METADATA and PKG-INFO.

/// One paragraph's fields, in file order.
#[derive(Debug, Default)]
pub(crate) struct Stanza<'a> {
    /// The 1-based line the paragraph starts on, for messages.
    pub line: usize,
    fields: Vec<(&'a str, String)>,
}

impl Stanza<'_> {
    /// The first field named `key` (field names are case-insensitive in both formats), with
    /// continuation lines joined by newlines.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// The first of `keys` that is present and not blank.
    pub fn first_of(&self, keys: &[&str]) -> Option<&str> {
        keys.iter()
            .filter_map(|k| self.get(k))
            .map(str::trim)
            .find(|v| !v.is_empty())
    }

    fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }
}

/// Splits `text` into paragraphs separated by blank lines (dpkg's status file).
pub(crate) fn paragraphs(text: &str) -> Vec<Stanza<'_>> {
    let mut out = Vec::new();
    let mut current = Stanza::default();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        if current.is_empty() {
            current.line = index + 1;
        }
        add_line(&mut current, line);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The header block of an RFC 822 message: every field up to the first blank line (Python's
/// METADATA puts the long description after it).
pub(crate) fn headers(text: &str) -> Stanza<'_> {
    let mut stanza = Stanza {
        line: 1,
        fields: Vec::new(),
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            break;
        }
        add_line(&mut stanza, line);
    }
    stanza
}

fn add_line<'a>(stanza: &mut Stanza<'a>, line: &'a str) {
    if line.starts_with([' ', '\t']) {
        // A continuation of the previous field; one before any field is ignored, as dpkg does
        // not write one and a stray line should not end the scan.
        if let Some((_, value)) = stanza.fields.last_mut() {
            value.push('\n');
            value.push_str(line.trim());
        }
    } else if let Some((key, value)) = line.split_once(':') {
        stanza.fields.push((key.trim(), value.trim().to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_keep_continuations_and_line_numbers() {
        let text = "Package: a\nDescription: short\n long line\n .\n more\n\n\nPackage: b\nstatus: install ok installed\n";
        let p = paragraphs(text);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].get("description"), Some("short\nlong line\n.\nmore"));
        assert_eq!(p[1].line, 8);
        assert_eq!(p[1].get("Status"), Some("install ok installed"));
    }

    #[test]
    fn headers_stop_at_the_body() {
        let h = headers("Metadata-Version: 2.1\nName: x\n\nName: not-a-header\n");
        assert_eq!(h.get("name"), Some("x"));
        assert_eq!(h.first_of(&["Author", "Name"]), Some("x"));
    }
}
