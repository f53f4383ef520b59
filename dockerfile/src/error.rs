//! Errors of this crate, printed as users expect from BuildKit: where, what, and a hint.

use ossb_protocol::clip;
use std::fmt;

/// A Dockerfile error: a parse error, a bad instruction, a failed expansion, a missing stage.
///
/// `Display` prints `file:line:column: message`, then the line with a caret under the
/// column, then the hint, e.g.
/// ```text
/// Dockerfile:3:1: unknown instruction: COPPY
///   3 | COPPY . /app
///     | ^
///   hint: did you mean COPY?
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// The Dockerfile's name as given to [`crate::parse`].
    pub file: String,
    /// 1-based line, 0 when the error is not about a line (e.g. an unknown `--target`).
    pub line: usize,
    /// 1-based column of the caret, 0 when unknown.
    pub column: usize,
    /// The text of the line, when known.
    pub line_text: Option<String>,
    /// What went wrong.
    pub message: String,
    /// What the user probably meant or should do.
    pub hint: Option<String>,
}

impl Error {
    /// An error not tied to a line.
    pub fn new(file: &str, message: impl Into<String>) -> Error {
        Error {
            file: file.to_string(),
            line: 0,
            column: 0,
            line_text: None,
            message: message.into(),
            hint: None,
        }
    }

    /// An error at `line` (1-based), with the line's text from `source_lines` when available.
    pub fn at(
        file: &str,
        line: usize,
        source_lines: &[String],
        message: impl Into<String>,
    ) -> Error {
        let line_text = line
            .checked_sub(1)
            .and_then(|i| source_lines.get(i))
            .cloned();
        let column = line_text.as_ref().map(|t| first_non_space(t)).unwrap_or(0);
        Error {
            file: file.to_string(),
            line,
            column,
            line_text,
            message: message.into(),
            hint: None,
        }
    }

    /// The same error with a hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Error {
        self.hint = Some(hint.into());
        self
    }

    /// The same error with the caret under the first occurrence of `needle` on the line.
    pub fn pointing_at(mut self, needle: &str) -> Error {
        if let Some(t) = &self.line_text {
            if let Some(i) = t.find(needle).filter(|_| !needle.is_empty()) {
                self.column = t[..i].chars().count() + 1;
            }
        }
        self
    }
}

fn first_non_space(t: &str) -> usize {
    t.chars()
        .position(|c| !c.is_whitespace())
        .map(|i| i + 1)
        .unwrap_or(1)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (0, _) => write!(f, "{}: {}", self.file, self.message)?,
            (l, 0) => write!(f, "{}:{}: {}", self.file, l, self.message)?,
            (l, c) => write!(f, "{}:{}:{}: {}", self.file, l, c, self.message)?,
        }
        if let (Some(text), true) = (&self.line_text, self.line > 0) {
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            let shown: String = clip(text, MAX_SHOWN_LINE)
                .chars()
                .map(|c| if c == '\t' { ' ' } else { c })
                .collect();
            write!(f, "\n {num} | {}", shown.trim_end())?;
            if self.column > 0 && self.column <= MAX_SHOWN_LINE {
                write!(f, "\n {pad} | {}^", " ".repeat(self.column - 1))?;
            }
        }
        if let Some(h) = &self.hint {
            write!(f, "\n hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// How much of a line an error shows: a hostile line of megabytes must not flood a log.
const MAX_SHOWN_LINE: usize = 200;

/// The closest of `candidates` to `word` (case-insensitive edit distance at most 2 or a
/// third of the word), for "did you mean" hints.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let w = word.to_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = distance(&w, &c.to_lowercase());
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let limit = (w.chars().count() / 3).max(2);
    best.filter(|(d, _)| *d <= limit && *d > 0).map(|(_, c)| c)
}

/// Damerau-Levenshtein distance (optimal string alignment), so `chwon` is 1 from `chown`.
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let (n, m) = (a.len(), b.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[n][m]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_caret_and_hint() {
        let lines = vec!["FROM a".to_string(), "  COPPY . /".to_string()];
        let e = Error::at("Dockerfile", 2, &lines, "unknown instruction: COPPY")
            .with_hint("did you mean COPY?");
        assert_eq!(
            e.to_string(),
            "Dockerfile:2:3: unknown instruction: COPPY\n 2 |   COPPY . /\n   |   ^\n hint: did you mean COPY?"
        );
    }

    #[test]
    fn long_lines_are_clipped_in_messages() {
        let line = format!("ENV A={}", "x".repeat(100_000));
        let e = Error::at("Dockerfile", 1, &[line], "too long");
        let shown = e.to_string();
        assert!(shown.len() < 400, "{} bytes shown", shown.len());
        assert!(shown.contains("… (99806 more bytes)"), "{shown}");
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("ééé", 2), "éé… (2 more bytes)");
    }

    #[test]
    fn suggests_close_words() {
        assert_eq!(closest("chwon", ["chown", "chmod", "from"]), Some("chown"));
        assert_eq!(closest("biulder", ["builder", "base"]), Some("builder"));
        assert_eq!(closest("zzzzzz", ["builder"]), None);
    }
}
