//! `.dockerignore` with Docker's own semantics (moby's `patternmatcher`), which differ from
//! `.gitignore`: patterns are anchored at the context root (`foo` does not match `a/foo`),
//! `**` matches any number of directories, a trailing `/` is ignored, later patterns win,
//! and `!pattern` re-includes paths, also below an excluded directory.
//!
//! ```
//! use ossb_dockerfile::dockerignore::Dockerignore;
//! let ig = Dockerignore::parse("node_modules\n**/*.log\n!keep.log\n").unwrap();
//! assert!(ig.is_excluded("node_modules/x/y.js"));
//! assert!(ig.is_excluded("a/b/debug.log"));
//! assert!(!ig.is_excluded("keep.log"));
//! assert!(!ig.is_excluded("src/node_modules"));
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

/// A compiled `.dockerignore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerignore {
    patterns: Vec<Pattern>,
}

/// A pattern Docker would refuse (an unterminated `[` class).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternError {
    /// The pattern as cleaned.
    pub pattern: String,
    /// 1-based line in the ignore file.
    pub line: usize,
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            ".dockerignore:{}: syntax error in pattern {:?}: unterminated [ class",
            self.line, self.pattern
        )
    }
}

impl std::error::Error for PatternError {}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    text: String,
    exclusion: bool,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// The path equals the pattern.
    Exact,
    /// `literal/**`: the path starts with `literal/`.
    Prefix(String),
    /// `**/literal`: the path ends with `/literal` or is `literal`.
    Suffix(String),
    /// Anything else, matched token by token.
    Tokens(Vec<Tok>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Lit(char),
    /// `?`: one character but `/`.
    One,
    /// `*`: any run without `/`.
    Star,
    /// `**` not at the end: `(.*/)?`.
    AnyDirs,
    /// `**` at the end: `.*`.
    Rest,
    /// `[...]`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

impl Dockerignore {
    /// Reads the text of a `.dockerignore`: one pattern a line, `#` comments, blank lines
    /// skipped, each pattern trimmed and cleaned like a path.
    pub fn parse(text: &str) -> Result<Dockerignore, PatternError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let mut p = line.trim();
            if p.is_empty() {
                continue;
            }
            let exclusion = p.starts_with('!');
            if exclusion {
                p = p[1..].trim();
            }
            if p.is_empty() {
                continue;
            }
            let mut cleaned = ossb_protocol::clean_path(p);
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let kind = compile(&cleaned).ok_or(PatternError {
                pattern: cleaned.clone(),
                line: i + 1,
            })?;
            patterns.push(Pattern {
                text: cleaned,
                exclusion,
                kind,
            });
        }
        Ok(Dockerignore { patterns })
    }

    /// The patterns, cleaned, with `!` for exceptions.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| {
                if p.exclusion {
                    format!("!{}", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }

    /// Whether `path` (relative to the context root, `/`-separated) is left out of the
    /// context: the last pattern matching it or one of its parent directories decides.
    pub fn is_excluded(&self, path: &str) -> bool {
        let path = clean_relative(path);
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            if p.exclusion != matched {
                continue;
            }
            let mut m = p.matches(&path);
            if !m {
                let mut prefix = String::new();
                for (i, d) in parents.iter().enumerate() {
                    if i > 0 {
                        prefix.push('/');
                    }
                    prefix.push_str(d);
                    if p.matches(&prefix) {
                        m = true;
                        break;
                    }
                }
            }
            if m {
                matched = !p.exclusion;
            }
        }
        matched
    }

    /// Whether a walk of the context must still look inside the excluded directory `dir`
    /// because an exception (`!pattern`) could re-include something below it.
    pub fn may_include_below(&self, dir: &str) -> bool {
        let dir = clean_relative(dir);
        let dparts: Vec<&str> = dir.split('/').filter(|s| !s.is_empty()).collect();
        self.patterns.iter().filter(|p| p.exclusion).any(|p| {
            let pparts: Vec<&str> = p.text.split('/').collect();
            for (i, d) in dparts.iter().enumerate() {
                let Some(pp) = pparts.get(i) else { return true };
                if pp.contains("**") {
                    return true;
                }
                if pp.contains(['*', '?', '[', '\\']) {
                    let one = Dockerignore::parse(pp).ok();
                    if one.is_some_and(|o| o.patterns.first().is_some_and(|x| x.matches(d))) {
                        continue;
                    }
                    return false;
                }
                if pp != d {
                    return false;
                }
            }
            true
        })
    }
}

impl Pattern {
    fn matches(&self, path: &str) -> bool {
        match &self.kind {
            Kind::Exact => path == self.text,
            Kind::Prefix(p) => path.starts_with(p.as_str()),
            Kind::Suffix(s) => {
                path.ends_with(s.as_str()) || (s.starts_with('/') && path == &s[1..])
            }
            Kind::Tokens(t) => {
                let chars: Vec<char> = path.chars().collect();
                match_tokens(t, &chars)
            }
        }
    }
}

/// Compiles a cleaned pattern as moby's patternmatcher does; `None` on a bad class.
fn compile(p: &str) -> Option<Kind> {
    #[derive(PartialEq, Clone, Copy)]
    enum M {
        Exact,
        Prefix,
        Suffix,
        Regexp,
    }
    let chars: Vec<char> = p.chars().collect();
    let mut toks = Vec::new();
    let mut mt = M::Exact;
    let mut i = 0;
    let mut first = true;
    while i < chars.len() {
        let ch = chars[i];
        i += 1;
        let at_start = first;
        first = false;
        match ch {
            '*' if chars.get(i) == Some(&'*') => {
                i += 1;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                if i == chars.len() {
                    if mt == M::Exact {
                        mt = M::Prefix;
                    } else {
                        toks.push(Tok::Rest);
                        mt = M::Regexp;
                    }
                } else {
                    toks.push(Tok::AnyDirs);
                    mt = M::Regexp;
                }
                if at_start {
                    mt = M::Suffix;
                }
            }
            '*' => {
                toks.push(Tok::Star);
                mt = M::Regexp;
            }
            '?' => {
                toks.push(Tok::One);
                mt = M::Regexp;
            }
            '\\' => {
                if i < chars.len() {
                    toks.push(Tok::Lit(chars[i]));
                    i += 1;
                    mt = M::Regexp;
                } else {
                    toks.push(Tok::Lit('\\'));
                }
            }
            '[' => {
                let (tok, next) = class(&chars, i)?;
                toks.push(tok);
                i = next;
                mt = M::Regexp;
            }
            c => toks.push(Tok::Lit(c)),
        }
    }
    Some(match mt {
        M::Exact => Kind::Exact,
        M::Prefix => Kind::Prefix(p[..p.len() - 2].to_string()),
        M::Suffix => Kind::Suffix(p[2..].to_string()),
        M::Regexp => Kind::Tokens(toks),
    })
}

/// Reads a `[...]` class starting after the `[`; returns it and the index after `]`.
fn class(chars: &[char], mut i: usize) -> Option<(Tok, usize)> {
    let mut negated = false;
    if chars.get(i) == Some(&'^') {
        negated = true;
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *chars.get(i)?;
        i += 1;
        if c == ']' && !first {
            return Some((Tok::Class { negated, ranges }, i));
        }
        first = false;
        let lo = if c == '\\' {
            let e = *chars.get(i)?;
            i += 1;
            e
        } else {
            c
        };
        if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|c| *c != ']') {
            let mut hi = chars[i + 1];
            i += 2;
            if hi == '\\' {
                hi = *chars.get(i)?;
                i += 1;
            }
            if hi < lo {
                return None;
            }
            ranges.push((lo, hi));
        } else {
            ranges.push((lo, lo));
        }
    }
}

/// Whether the tokens match all of `s`. Whether tokens `ti..` match `s[si..]` depends only on
/// `ti` and `si`, so the answers are filled token by token from the last, each column from the
/// next: no recursion (a pattern of any length cannot overflow the stack), time and memory
/// linear in each of the two lengths.
fn match_tokens(t: &[Tok], s: &[char]) -> bool {
    let n = s.len();
    // After the last token: only the end of the path matches.
    let mut next: Vec<bool> = (0..=n).map(|si| si == n).collect();
    let mut col = vec![false; n + 1];
    for tok in t.iter().rev() {
        let one = |si: usize, ok: &dyn Fn(char) -> bool| -> bool {
            s.get(si).is_some_and(|c| ok(*c)) && next[si + 1]
        };
        match tok {
            Tok::Lit(c) => (0..=n).for_each(|si| col[si] = one(si, &|x| x == *c)),
            Tok::One => (0..=n).for_each(|si| col[si] = one(si, &|x| x != '/')),
            Tok::Class { negated, ranges } => (0..=n).for_each(|si| {
                col[si] = one(si, &|x| {
                    ranges.iter().any(|(lo, hi)| *lo <= x && x <= *hi) != *negated
                })
            }),
            Tok::Star => {
                // `[^/]*`: the rest matches somewhere between here and the next `/`.
                let mut any = false;
                for si in (0..=n).rev() {
                    if s.get(si) == Some(&'/') {
                        any = false;
                    }
                    any |= next[si];
                    col[si] = any;
                }
            }
            Tok::Rest => col.iter_mut().for_each(|c| *c = true),
            Tok::AnyDirs => {
                // `(.*/)?`: nothing, or anything ending with a `/`.
                let mut after_a_slash = false;
                for si in (0..=n).rev() {
                    if s.get(si) == Some(&'/') && next[si + 1] {
                        after_a_slash = true;
                    }
                    col[si] = next[si] || after_a_slash;
                }
            }
        }
        std::mem::swap(&mut next, &mut col);
    }
    next[0]
}

fn clean_relative(p: &str) -> String {
    let c = ossb_protocol::clean_path(p);
    c.trim_start_matches('/').to_string()
}

/// The ignore file for a build: `<Dockerfile>.dockerignore` next to the Dockerfile when
/// it exists (e.g. `app.Dockerfile.dockerignore`), else `.dockerignore` at the context
/// root, else none.
pub fn ignore_file(context: &Path, dockerfile: &Path) -> Option<PathBuf> {
    if let Some(name) = dockerfile.file_name() {
        let mut n = name.to_os_string();
        n.push(".dockerignore");
        let beside = dockerfile.with_file_name(n);
        if beside.is_file() {
            return Some(beside);
        }
    }
    let root = context.join(".dockerignore");
    root.is_file().then_some(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ig(s: &str) -> Dockerignore {
        Dockerignore::parse(s).unwrap()
    }

    #[test]
    fn anchors_at_the_root() {
        let i = ig("foo\n/bar/\n");
        assert!(i.is_excluded("foo"));
        assert!(i.is_excluded("foo/x"));
        assert!(!i.is_excluded("a/foo"));
        assert!(i.is_excluded("bar/y"));
        assert_eq!(i.patterns(), vec!["foo", "bar"]);
    }

    #[test]
    fn double_star() {
        let i = ig("**/*.go\n");
        assert!(i.is_excluded("a.go"));
        assert!(i.is_excluded("x/y/a.go"));
        assert!(!i.is_excluded("x/y/a.gox"));
        let i = ig("a/**/b\n");
        assert!(i.is_excluded("a/b"));
        assert!(i.is_excluded("a/x/y/b"));
        let i = ig("**\n!keep\n");
        assert!(i.is_excluded("anything/at/all"));
        assert!(!i.is_excluded("keep"));
    }

    #[test]
    fn exceptions_reinclude_below_excluded_dirs() {
        let i = ig("docs\n!docs/README.md\n");
        assert!(i.is_excluded("docs/a.md"));
        assert!(!i.is_excluded("docs/README.md"));
        assert!(i.may_include_below("docs"));
        assert!(!i.may_include_below("other"));
    }

    #[test]
    fn classes_and_escapes() {
        let i = ig("[a-c].txt\nx\\*y\n?.md\n");
        assert!(i.is_excluded("b.txt"));
        assert!(!i.is_excluded("d.txt"));
        assert!(i.is_excluded("x*y"));
        assert!(!i.is_excluded("xzy"));
        assert!(i.is_excluded("a.md"));
        assert!(!i.is_excluded("ab.md"));
        assert!(Dockerignore::parse("[abc\n").is_err());
    }

    #[test]
    fn comments_and_blank_lines() {
        let i = ig("# comment\n\n   \n  spaced  \n");
        assert_eq!(i.patterns(), vec!["spaced"]);
    }

    /// Whether the tokens match the whole path, by plain backtracking: the reference the
    /// table of `match_tokens` is checked against.
    fn backtrack(t: &[Tok], ti: usize, s: &[char], si: usize) -> bool {
        match t.get(ti) {
            None => si == s.len(),
            Some(Tok::Lit(c)) => s.get(si) == Some(c) && backtrack(t, ti + 1, s, si + 1),
            Some(Tok::One) => {
                s.get(si).is_some_and(|c| *c != '/') && backtrack(t, ti + 1, s, si + 1)
            }
            Some(Tok::Class { negated, ranges }) => {
                s.get(si)
                    .is_some_and(|c| ranges.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negated)
                    && backtrack(t, ti + 1, s, si + 1)
            }
            Some(Tok::Star) => {
                let stop = (si..s.len()).find(|&e| s[e] == '/').unwrap_or(s.len());
                (si..=stop).any(|e| backtrack(t, ti + 1, s, e))
            }
            Some(Tok::Rest) => true,
            Some(Tok::AnyDirs) => {
                backtrack(t, ti + 1, s, si)
                    || (si..s.len()).any(|e| s[e] == '/' && backtrack(t, ti + 1, s, e + 1))
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn token_table_agrees_with_backtracking(
            pattern in "[ab/*?]{0,3}(\\*\\*/?)?[ab/*?\\[\\]^-]{0,4}",
            path in "[ab/]{0,8}",
        ) {
            if let Some(Kind::Tokens(t)) = compile(&pattern) {
                let s: Vec<char> = path.chars().collect();
                proptest::prop_assert_eq!(match_tokens(&t, &s), backtrack(&t, 0, &s, 0));
            }
        }
    }

    #[test]
    fn a_pattern_of_any_length_neither_overflows_nor_exhausts() {
        let pattern = format!("*{}", "a".repeat(20_000));
        let ig = ig(&pattern);
        let path = format!("x{}", "a".repeat(5000));
        let matched = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || ig.is_excluded(&path))
            .unwrap()
            .join()
            .unwrap();
        assert!(!matched);
    }
}
