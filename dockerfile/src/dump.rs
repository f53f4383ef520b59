//! BuildKit's parse-tree dump format (`Node.Dump`), as printed by `ossb debug parse`.
//!
//! One line per instruction: `(keyword ["--flag" ...] "arg" ...)`, keyword lower-cased,
//! values quoted as Go's `strconv.Quote` does. Heredoc bodies, comments and line numbers
//! are not part of the format.

use crate::syntax::{Dockerfile, Node};

/// The dump of a whole file, with the final newline BuildKit's test files have.
pub fn dump(df: &Dockerfile) -> String {
    let mut out = String::new();
    for node in &df.instructions {
        out.push('(');
        out.push_str(&dump_node(node));
        out.push_str(")\n");
    }
    let mut s = out.trim_matches(char::is_whitespace).to_string();
    s.push('\n');
    s
}

/// The dump of one instruction, without the surrounding parentheses.
pub fn dump_node(node: &Node) -> String {
    let mut s = node.keyword.to_lowercase();
    if !node.flags.is_empty() {
        s.push_str(" [");
        let quoted: Vec<String> = node.flags.iter().map(|f| go_quote(&latin1(f))).collect();
        s.push_str(&quoted.join(" "));
        s.push(']');
    }
    if let Some(child) = &node.child {
        s.push_str(" (");
        s.push_str(&dump_node(child));
        s.push(')');
    }
    for a in &node.args {
        s.push(' ');
        s.push_str(&go_quote(a));
    }
    s.trim_matches(char::is_whitespace).to_string()
}

/// BuildKit lexes flags byte by byte, turning every byte into the rune of the same value;
/// this reproduces what it then prints for non-ASCII text.
fn latin1(s: &str) -> String {
    s.bytes().map(char::from).collect()
}

/// Go's `strconv.Quote`.
pub fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0c' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x0b' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if is_print(c) => out.push(c),
            c if (c as u32) < 0x10000 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push('"');
    out
}

/// Go's `unicode.IsPrint` approximated without tables: letters, marks, numbers,
/// punctuation, symbols and ASCII space. Controls, separators other than space,
/// common format characters, private use and non-characters are not printable.
fn is_print(c: char) -> bool {
    let u = c as u32;
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let format = matches!(u,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x890..=0x891 | 0x8E2 | 0x180E
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF
        | 0xFFF9..=0xFFFB | 0x110BD | 0x110CD | 0x13430..=0x1343F | 0x1BCA0..=0x1BCA3
        | 0x1D173..=0x1D17A | 0xE0001 | 0xE0020..=0xE007F);
    let private = matches!(u, 0xE000..=0xF8FF | 0xF0000..=0x10FFFF);
    let nonchar = (0xFDD0..=0xFDEF).contains(&u) || (u & 0xFFFE) == 0xFFFE;
    !(format || private || nonchar)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_like_go() {
        assert_eq!(go_quote("a\"b\\c\n\u{0}"), "\"a\\\"b\\\\c\\n\\x00\"");
        assert_eq!(go_quote("♥\u{a0}"), "\"♥\\u00a0\"");
        assert_eq!(go_quote("\u{7f}"), "\"\\x7f\"");
    }
}
