//! Shell-word expansion with BuildKit's rules: quotes, escapes, `$V`, `${V}` and the
//! `${V:-w}`-style modifiers, plus word splitting for the instructions that split.
//!
//! This is not a shell: there is no command substitution, no globbing, no arithmetic.
//! Behaviour follows BuildKit's `shell.Lex` case by case (the conformance data in
//! `testdata/buildkit-shell` is run by the tests), including its quirks, such as
//! `${V#p}` patterns knowing only `*`, `?` and escapes, and `?`/`*` not crossing newlines.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// How deeply `${...}` substitutions may nest (`${A:-${B:-...}}`). BuildKit has no limit (Go
/// stacks grow); ours are fixed, and a hostile Dockerfile must not overflow them. Real
/// Dockerfiles nest two or three levels.
pub const MAX_NESTING: usize = 64;

/// The longest result one expansion may produce, in bytes. Variables that repeat each other
/// grow geometrically (`ARG B=$A$A$A...`); this stops them long before memory runs out.
pub const MAX_EXPANDED_LEN: usize = 1 << 20;

/// The most work a `${V#pattern}` or `${V/pattern/...}` may take: pattern length times value
/// length.
const MAX_PATTERN_WORK: usize = 1 << 26;

/// Where expansion looks variables up.
pub trait Env {
    /// The value of `name`, or `None` when it is not set (set-but-empty is `Some("")`).
    fn get(&self, name: &str) -> Option<&str>;
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        HashMap::get(self, name).map(String::as_str)
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<&str> {
        BTreeMap::get(self, name).map(String::as_str)
    }
}

/// An ordered list of `(name, value)`; the last entry of a name wins.
impl Env for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Env for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        Env::get(self.as_slice(), name)
    }
}

/// No variables at all.
pub struct NoEnv;

impl Env for NoEnv {
    fn get(&self, _: &str) -> Option<&str> {
        None
    }
}

/// Why a word could not be expanded, e.g. an unterminated quote or `${V:?message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellError {
    /// What went wrong, in BuildKit's words.
    pub message: String,
}

impl fmt::Display for ShellError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ShellError {}

fn err<T>(message: impl Into<String>) -> Result<T, ShellError> {
    Err(ShellError {
        message: message.into(),
    })
}

/// The result of one expansion.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expansion {
    /// The word with quotes removed and variables substituted, spaces kept.
    pub result: String,
    /// The result split on unquoted whitespace (what `ProcessWords` returns).
    pub words: Vec<String>,
    /// Variables that were looked up and found.
    pub matched: BTreeSet<String>,
    /// Variables that were looked up and not found.
    pub unmatched: BTreeSet<String>,
}

/// A configured expander. `Lexer::new('\\')` is what Dockerfile instructions use
/// (with the file's escape character).
#[derive(Debug, Clone, Copy)]
pub struct Lexer {
    /// The escape character: `\` or `` ` ``.
    pub escape: char,
    /// Keep quote characters in the output.
    pub raw_quotes: bool,
    /// Keep escape characters in the output.
    pub raw_escapes: bool,
    /// Leave references to unset variables as written (`$X`, `${X:-y}`).
    pub skip_unset_env: bool,
    /// Treat quotes as ordinary characters.
    pub skip_process_quotes: bool,
}

impl Lexer {
    /// A lexer with the given escape character and every option off.
    pub fn new(escape: char) -> Lexer {
        Lexer {
            escape,
            raw_quotes: false,
            raw_escapes: false,
            skip_unset_env: false,
            skip_process_quotes: false,
        }
    }

    /// Expands `word` as one word (BuildKit's `ProcessWord`).
    pub fn process_word(&self, word: &str, env: &dyn Env) -> Result<String, ShellError> {
        self.process(word, env).map(|e| e.result)
    }

    /// Expands `word` and splits the result on unquoted whitespace (BuildKit's `ProcessWords`).
    pub fn process_words(&self, word: &str, env: &dyn Env) -> Result<Vec<String>, ShellError> {
        self.process(word, env).map(|e| e.words)
    }

    /// Expands `word`, returning the result, the split words and the variables used.
    pub fn process(&self, word: &str, env: &dyn Env) -> Result<Expansion, ShellError> {
        let mut sw = ShellWord {
            lex: *self,
            chars: word.chars().collect(),
            pos: 0,
            env,
            raw_escapes: self.raw_escapes,
            depth: 0,
            over_limit: false,
            matched: BTreeSet::new(),
            unmatched: BTreeSet::new(),
        };
        match sw.process_stop_on(None, self.raw_escapes) {
            Ok((result, words)) => Ok(Expansion {
                result,
                words,
                matched: sw.matched,
                unmatched: sw.unmatched,
            }),
            Err(e) => err(format!(
                "failed to process {}: {}",
                crate::dump::go_quote(&crate::clip(word, 120)),
                e.message
            )),
        }
    }
}

/// Expands `word` with the default lexer (escape `\`) and no splitting.
pub fn expand(word: &str, env: &dyn Env) -> Result<String, ShellError> {
    Lexer::new('\\').process_word(word, env)
}

struct Words {
    buf: String,
    words: Vec<String>,
    in_word: bool,
}

impl Words {
    fn add_char(&mut self, ch: char) {
        if ch.is_whitespace() {
            if self.in_word && !self.buf.is_empty() {
                self.words.push(std::mem::take(&mut self.buf));
                self.in_word = false;
            }
        } else {
            self.add_raw_char(ch);
        }
    }
    fn add_raw_char(&mut self, ch: char) {
        self.buf.push(ch);
        self.in_word = true;
    }
    fn add_string(&mut self, s: &str) {
        for ch in s.chars() {
            self.add_char(ch);
        }
    }
    fn add_raw_string(&mut self, s: &str) {
        self.buf.push_str(s);
        self.in_word = true;
    }
    fn finish(mut self) -> Vec<String> {
        if !self.buf.is_empty() {
            self.words.push(std::mem::take(&mut self.buf));
        }
        self.words
    }
}

struct ShellWord<'a> {
    lex: Lexer,
    chars: Vec<char>,
    pos: usize,
    env: &'a dyn Env,
    raw_escapes: bool,
    /// How many `${...}` enclose the current position.
    depth: usize,
    /// A limit was hit: the error says so and must not become "missing '}'".
    over_limit: bool,
    matched: BTreeSet<String>,
    unmatched: BTreeSet<String>,
}

impl ShellWord<'_> {
    /// Fails once an expansion's result passes [`MAX_EXPANDED_LEN`].
    fn check_len(&mut self, result: &str) -> Result<(), ShellError> {
        if result.len() > MAX_EXPANDED_LEN {
            self.over_limit = true;
            return err(format!(
                "the expansion is longer than {} MiB: variables that repeat each other grow without bound",
                MAX_EXPANDED_LEN >> 20
            ));
        }
        Ok(())
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    fn get_env(&mut self, name: &str) -> Option<String> {
        match self.env.get(name) {
            Some(v) => {
                self.matched.insert(name.to_string());
                Some(v.to_string())
            }
            None => {
                self.unmatched.insert(name.to_string());
                None
            }
        }
    }

    /// Processes up to `stop` (consumed) or the end of input when `stop` is `None`.
    fn process_stop_on(
        &mut self,
        stop: Option<char>,
        raw_escapes: bool,
    ) -> Result<(String, Vec<String>), ShellError> {
        if self.depth >= MAX_NESTING {
            self.over_limit = true;
            return err(format!(
                "substitutions nest deeper than {MAX_NESTING} levels"
            ));
        }
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        self.depth += 1;
        let r = self.process_stop_on_inner(stop);
        self.depth -= 1;
        self.raw_escapes = saved;
        r
    }

    fn process_stop_on_inner(
        &mut self,
        stop: Option<char>,
    ) -> Result<(String, Vec<String>), ShellError> {
        let mut result = String::new();
        let mut words = Words {
            buf: String::new(),
            words: Vec::new(),
            in_word: false,
        };
        while let Some(ch) = self.peek() {
            if Some(ch) == stop {
                self.next();
                return Ok((result, words.finish()));
            }
            let special = match ch {
                '$' => Some(self.process_dollar()?),
                '<' => Some(self.process_possible_heredoc()),
                '\'' if !self.lex.skip_process_quotes => Some(self.process_single_quote()?),
                '"' if !self.lex.skip_process_quotes => Some(self.process_double_quote()?),
                _ => None,
            };
            if let Some(tmp) = special {
                result.push_str(&tmp);
                self.check_len(&result)?;
                if ch == '$' {
                    words.add_string(&tmp);
                } else {
                    words.add_raw_string(&tmp);
                }
                continue;
            }
            let mut ch = self.next().unwrap_or(ch);
            if ch == self.lex.escape {
                if self.raw_escapes {
                    words.add_raw_char(ch);
                    result.push(ch);
                }
                match self.next() {
                    None => break,
                    Some(c) => ch = c,
                }
                words.add_raw_char(ch);
            } else {
                words.add_char(ch);
            }
            result.push(ch);
        }
        if let Some(stop) = stop {
            return err(format!(
                "unexpected end of statement while looking for matching {stop}"
            ));
        }
        Ok((result, words.finish()))
    }

    fn process_single_quote(&mut self) -> Result<String, ShellError> {
        let mut result = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.next() {
                None => {
                    return err(
                        "unexpected end of statement while looking for matching single-quote",
                    )
                }
                Some('\'') => {
                    if self.lex.raw_quotes {
                        result.push('\'');
                    }
                    return Ok(result);
                }
                Some(c) => result.push(c),
            }
        }
    }

    fn process_double_quote(&mut self) -> Result<String, ShellError> {
        let mut result = String::new();
        let open = self.next();
        if self.lex.raw_quotes {
            result.extend(open);
        }
        loop {
            match self.peek() {
                None => {
                    return err(
                        "unexpected end of statement while looking for matching double-quote",
                    )
                }
                Some('"') => {
                    self.next();
                    if self.lex.raw_quotes {
                        result.push('"');
                    }
                    return Ok(result);
                }
                Some('$') => {
                    let v = self.process_dollar()?;
                    result.push_str(&v);
                    self.check_len(&result)?;
                }
                Some(_) => {
                    let mut ch = self.next().unwrap_or_default();
                    if ch == self.lex.escape {
                        if self.raw_escapes {
                            result.push(ch);
                        }
                        match self.peek() {
                            None => continue,
                            Some(c) if c == '"' || c == '$' || c == self.lex.escape => {
                                ch = c;
                                self.next();
                            }
                            Some(_) => {}
                        }
                    }
                    result.push(ch);
                }
            }
        }
    }

    fn process_possible_heredoc(&mut self) -> String {
        self.next();
        if self.peek() != Some('<') {
            return "<".to_string();
        }
        self.next();
        let mut result = "<<".to_string();
        while let Some(c @ ('\t' | '\r' | ' ')) = self.peek() {
            result.push(c);
            self.next();
        }
        result
    }

    fn process_name(&mut self) -> String {
        let mut name = String::new();
        while let Some(ch) = self.peek() {
            if name.is_empty() && is_digit(ch) {
                while let Some(c) = self.peek().filter(|c| is_digit(*c)) {
                    name.push(c);
                    self.next();
                }
                return name;
            }
            if name.is_empty() && matches!(ch, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return ch.to_string();
            }
            if !(ch.is_alphabetic() || is_digit(ch) || ch == '_') {
                break;
            }
            name.push(ch);
            self.next();
        }
        name
    }

    fn process_dollar(&mut self) -> Result<String, ShellError> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.process_name();
            if name.is_empty() {
                return Ok("$".into());
            }
            return Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${name}"),
                None => String::new(),
            });
        }
        self.next();
        match self.peek() {
            None => return err("syntax error: missing '}'"),
            Some('{' | '}' | ':') => return err("syntax error: bad substitution"),
            _ => {}
        }
        let name = self.process_name();
        let ch = self.next();
        let mut chs: String = ch.map(String::from).unwrap_or_else(|| "\u{fffd}".into());
        match ch {
            Some('}') => Ok(match self.get_env(&name) {
                Some(v) => v,
                None if self.lex.skip_unset_env => format!("${{{name}}}"),
                None => String::new(),
            }),
            Some(':' | '+' | '-' | '?' | '#' | '%') => {
                let mut ch = ch;
                let null_is_unset = ch == Some(':');
                if null_is_unset {
                    ch = self.next();
                    chs.push(ch.unwrap_or('\u{fffd}'));
                }
                let raw = matches!(ch, Some('#' | '%'));
                if null_is_unset && raw {
                    return err(format!("unsupported modifier ({chs}) in substitution"));
                }
                let word = match self.process_stop_on(Some('}'), raw) {
                    Ok((w, _)) => w,
                    Err(_) if self.peek().is_none() && !self.over_limit => {
                        return err("syntax error: missing '}'");
                    }
                    Err(e) => return Err(e),
                };
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}{chs}{word}}}"));
                }
                let unset = value.is_none() || (null_is_unset && value.as_deref() == Some(""));
                match ch {
                    Some('-') => Ok(if unset {
                        word
                    } else {
                        value.unwrap_or_default()
                    }),
                    Some('+') => Ok(if unset { String::new() } else { word }),
                    Some('?') => match value {
                        None => err(format!(
                            "{name}: {}",
                            if word.is_empty() {
                                "is not allowed to be unset"
                            } else {
                                &word
                            }
                        )),
                        Some(v) if null_is_unset && v.is_empty() => err(format!(
                            "{name}: {}",
                            if word.is_empty() {
                                "is not allowed to be empty"
                            } else {
                                &word
                            }
                        )),
                        Some(v) => Ok(v),
                    },
                    Some(c @ ('#' | '%')) => {
                        let (greedy, pat) = match word.strip_prefix(c) {
                            Some(rest) => (true, rest.to_string()),
                            None => (false, word),
                        };
                        let value = value.unwrap_or_default();
                        if c == '%' {
                            trim_suffix(&pat, &value, greedy)
                        } else {
                            trim_prefix(&pat, &value, greedy)
                        }
                    }
                    _ => err(format!("unsupported modifier ({chs}) in substitution")),
                }
            }
            Some('/') => {
                let replace_all = self.peek() == Some('/');
                if replace_all {
                    self.next();
                }
                let pattern = match self.process_stop_on(Some('/'), true) {
                    Ok((w, _)) => w,
                    Err(_) if self.peek().is_none() && !self.over_limit => {
                        return err("syntax error: missing '/' in ${}")
                    }
                    Err(e) => return Err(e),
                };
                let replacement = match self.process_stop_on(Some('}'), true) {
                    Ok((w, _)) => w,
                    Err(_) if self.peek().is_none() && !self.over_limit => {
                        return err("syntax error: missing '}'")
                    }
                    Err(e) => return Err(e),
                };
                let value = self.get_env(&name);
                if self.lex.skip_unset_env && value.is_none() {
                    return Ok(format!("${{{name}/{pattern}/{replacement}}}"));
                }
                let value = value.unwrap_or_default();
                let pat = Pattern::compile(&pattern, true).map_err(|e| ShellError {
                    message: format!("invalid pattern ({pattern}) in substitution: {e}"),
                })?;
                pat.replace(&value, &replacement, replace_all)
            }
            _ => err(format!("unsupported modifier ({chs}) in substitution")),
        }
    }
}

/// Go's `unicode.IsDigit` is the Nd category; `is_numeric` is close enough outside ASCII.
fn is_digit(c: char) -> bool {
    c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric())
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(char),
    Any,
    Star,
}

/// A shell pattern (`*`, `?`, `\x`) matched with the same preferences as the regular
/// expression BuildKit builds from it: leftmost match, stars greedy or lazy.
struct Pattern {
    toks: Vec<Tok>,
    greedy: bool,
}

impl Pattern {
    fn compile(pattern: &str, greedy: bool) -> Result<Pattern, String> {
        let chars: Vec<char> = pattern.chars().collect();
        let mut toks = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            i += 1;
            match c {
                '*' => toks.push(Tok::Star),
                '?' => toks.push(Tok::Any),
                '\\' => {
                    // `\}` and `\/` were needed inside `${}`; the escape is not part of the pattern.
                    if matches!(chars.get(i), Some('}' | '/')) {
                        continue;
                    }
                    match chars.get(i) {
                        Some(&n @ ('*' | '?' | '\\')) => {
                            toks.push(Tok::Lit(n));
                            i += 1;
                        }
                        Some(&n) => return Err(format!("invalid escape '\\{n}'")),
                        None => return Err("invalid escape '\\\u{fffd}'".into()),
                    }
                }
                c => toks.push(Tok::Lit(c)),
            }
        }
        Ok(Pattern { toks, greedy })
    }

    /// For every start position in `s`, the end of the pattern's preferred match there
    /// (`NO_MATCH` when none). The preferred match from a position depends only on the token
    /// and the position, so the table is filled token by token from the last, each column
    /// from the next one: no recursion, time and memory linear in each of the two lengths.
    fn match_ends(&self, s: &[char]) -> Result<Vec<usize>, ShellError> {
        if self.toks.len().saturating_mul(s.len() + 1) > MAX_PATTERN_WORK {
            return err(format!(
                "the pattern ({} characters) is too long for a value of {} characters",
                self.toks.len(),
                s.len()
            ));
        }
        // After the last token: the match ends where it is.
        let mut next: Vec<usize> = (0..=s.len()).collect();
        let mut col = vec![NO_MATCH; s.len() + 1];
        for tok in self.toks.iter().rev() {
            match tok {
                Tok::Lit(c) => {
                    for si in 0..=s.len() {
                        col[si] = if s.get(si) == Some(c) {
                            next[si + 1]
                        } else {
                            NO_MATCH
                        };
                    }
                }
                Tok::Any => {
                    for si in 0..=s.len() {
                        col[si] = match s.get(si) {
                            Some(&c) if c != '\n' => next[si + 1],
                            _ => NO_MATCH,
                        };
                    }
                }
                Tok::Star => {
                    // `.*` cannot cross a newline (Go's `.`): a star starting at `si` may end
                    // anywhere up to the line's end. Greedy prefers the furthest end whose rest
                    // matches, lazy the nearest; scanning right to left finds both, starting
                    // afresh at each newline.
                    let mut chosen = NO_MATCH;
                    for si in (0..=s.len()).rev() {
                        if s.get(si) == Some(&'\n') {
                            chosen = NO_MATCH;
                        }
                        if next[si] != NO_MATCH && (!self.greedy || chosen == NO_MATCH) {
                            chosen = next[si];
                        }
                        col[si] = chosen;
                    }
                }
            }
            std::mem::swap(&mut next, &mut col);
        }
        Ok(next)
    }

    /// `value` without the pattern's match at its start, or unchanged when it does not match.
    fn strip_from_start(&self, value: &str) -> Result<String, ShellError> {
        let s: Vec<char> = value.chars().collect();
        Ok(match self.match_ends(&s)?[0] {
            NO_MATCH => value.to_string(),
            end => s[end..].iter().collect(),
        })
    }

    /// The first match at or after `from`, as (start, end).
    fn find(ends: &[usize], from: usize) -> Option<(usize, usize)> {
        (from..ends.len()).find_map(|st| (ends[st] != NO_MATCH).then(|| (st, ends[st])))
    }

    fn replace(&self, value: &str, replacement: &str, all: bool) -> Result<String, ShellError> {
        let s: Vec<char> = value.chars().collect();
        let ends = self.match_ends(&s)?;
        if !all {
            return Ok(match Self::find(&ends, 0) {
                Some((a, b)) => {
                    let mut out: String = s[..a].iter().collect();
                    out.push_str(replacement);
                    out.extend(&s[b..]);
                    out
                }
                None => value.to_string(),
            });
        }
        // Go's Regexp.ReplaceAllString: `$` in the replacement refers to groups.
        let mut out = String::new();
        let mut pos = 0;
        let mut last_end: Option<usize> = None;
        let mut search = 0;
        while search <= s.len() {
            let Some((a, b)) = Self::find(&ends, search) else {
                break;
            };
            // An empty match right after a previous match is not allowed.
            if a == b && last_end == Some(a) {
                if a >= s.len() {
                    break;
                }
                search = a + 1;
                continue;
            }
            out.extend(&s[pos..a]);
            out.push_str(&expand_template(
                replacement,
                &s[a..b].iter().collect::<String>(),
            ));
            pos = b;
            last_end = Some(b);
            search = if b > a { b } else { b + 1 };
        }
        out.extend(&s[pos.min(s.len())..]);
        Ok(out)
    }
}

/// No match from this position.
const NO_MATCH: usize = usize::MAX;

/// Go's `Regexp.Expand` for a pattern with no capture groups: `$0` is the match,
/// `$$` is `$`, other names are empty.
fn expand_template(template: &str, whole: &str) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
            continue;
        }
        let (name, after) = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(j) if j > 0 && r[..j].chars().all(|c| c == '_' || c.is_alphanumeric()) => {
                    (Some(&r[..j]), &r[j + 1..])
                }
                _ => (None, rest),
            }
        } else {
            let n = rest
                .find(|c: char| !(c == '_' || c.is_alphanumeric()))
                .unwrap_or(rest.len());
            if n == 0 {
                (None, rest)
            } else {
                (Some(&rest[..n]), &rest[n..])
            }
        };
        match name {
            None => out.push('$'),
            Some(n) => {
                if n.parse::<u64>().ok() == Some(0) {
                    out.push_str(whole);
                }
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn trim_prefix(pattern: &str, value: &str, greedy: bool) -> Result<String, ShellError> {
    let pat = Pattern::compile(pattern, greedy).map_err(|e| ShellError {
        message: format!("invalid pattern ({pattern}) in substitution: {e}"),
    })?;
    pat.strip_from_start(value)
}

/// Reverses a pattern keeping each `\x` escape pair in order.
fn reverse_pattern(pattern: &str) -> String {
    let p: Vec<char> = pattern.chars().collect();
    let mut out = vec!['\0'; p.len()];
    let last = p.len().wrapping_sub(1);
    let mut i = 0;
    while i < p.len() {
        let o = last - i;
        if p[i] == '\\' && i != last {
            out[o - 1] = '\\';
            out[o] = p[i + 1];
            i += 2;
        } else {
            out[o] = p[i];
            i += 1;
        }
    }
    out.into_iter().collect()
}

fn trim_suffix(pattern: &str, value: &str, greedy: bool) -> Result<String, ShellError> {
    let pat = Pattern::compile(&reverse_pattern(pattern), greedy).map_err(|_| ShellError {
        message: format!("invalid pattern ({pattern}) in substitution"),
    })?;
    let reversed: String = value.chars().rev().collect();
    Ok(pat.strip_from_start(&reversed)?.chars().rev().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_defaults_and_alternatives() {
        let e = env(&[("A", "x"), ("E", "")]);
        let l = Lexer::new('\\');
        assert_eq!(
            l.process_word("${A:-d}${B:-d}${E:-d}${E-d}", &e).unwrap(),
            "xdd"
        );
        assert_eq!(l.process_word("${A:+y}${E+y}${E:+y}", &e).unwrap(), "yy");
        assert!(l.process_word("${B:?}", &e).is_err());
    }

    #[test]
    fn trims_patterns() {
        let e = env(&[("P", "/usr/local/bin/app.tar.gz")]);
        let l = Lexer::new('\\');
        assert_eq!(l.process_word("${P##*/}", &e).unwrap(), "app.tar.gz");
        assert_eq!(
            l.process_word("${P#*/}", &e).unwrap(),
            "usr/local/bin/app.tar.gz"
        );
        assert_eq!(
            l.process_word("${P%.*}", &e).unwrap(),
            "/usr/local/bin/app.tar"
        );
        assert_eq!(
            l.process_word("${P%%.*}", &e).unwrap(),
            "/usr/local/bin/app"
        );
        assert_eq!(
            l.process_word("${P/local/opt}", &e).unwrap(),
            "/usr/opt/bin/app.tar.gz"
        );
        assert_eq!(
            l.process_word("${P//a/A}", &e).unwrap(),
            "/usr/locAl/bin/App.tAr.gz"
        );
    }

    /// The preferred match end as a backtracking matcher finds it (what Go's regexp prefers):
    /// the reference the table of `Pattern::match_ends` is checked against.
    fn backtrack(p: &Pattern, s: &[char], ti: usize, si: usize) -> Option<usize> {
        match p.toks.get(ti) {
            None => Some(si),
            Some(Tok::Lit(c)) => (s.get(si) == Some(c))
                .then(|| backtrack(p, s, ti + 1, si + 1))
                .flatten(),
            Some(Tok::Any) => s
                .get(si)
                .filter(|c| **c != '\n')
                .and_then(|_| backtrack(p, s, ti + 1, si + 1)),
            Some(Tok::Star) => {
                let max = (si..s.len()).find(|&i| s[i] == '\n').unwrap_or(s.len());
                if p.greedy {
                    (si..=max).rev().find_map(|e| backtrack(p, s, ti + 1, e))
                } else {
                    (si..=max).find_map(|e| backtrack(p, s, ti + 1, e))
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn pattern_table_agrees_with_backtracking(
            pattern in "[ab*?\\n]{0,6}",
            value in "[ab\n]{0,10}",
            greedy in proptest::bool::ANY,
        ) {
            let pattern = pattern.replace("\\n", "\n");
            let p = Pattern::compile(&pattern, greedy).unwrap();
            let s: Vec<char> = value.chars().collect();
            let ends = p.match_ends(&s).unwrap();
            for (start, end) in ends.iter().enumerate() {
                let want = backtrack(&p, &s, 0, start).unwrap_or(NO_MATCH);
                proptest::prop_assert_eq!(*end, want, "start {}", start);
            }
        }
    }

    #[test]
    fn hostile_words_fail_with_a_limit_not_a_crash() {
        let l = Lexer::new('\\');
        // 10,000 nested defaults: refused at the limit, whatever the stack.
        let deep = format!("{}x{}", "${A:-".repeat(10_000), "}".repeat(10_000));
        let e = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || l.process_word(&deep, &NoEnv).unwrap_err())
            .unwrap()
            .join()
            .unwrap();
        assert!(e.message.contains("nest deeper than 64 levels"), "{e}");
        assert!(e.message.len() < 400, "the message quotes the whole word");
        // The deepest allowed nesting still expands.
        let ok = format!(
            "{}x{}",
            "${A:-".repeat(MAX_NESTING - 1),
            "}".repeat(MAX_NESTING - 1)
        );
        assert_eq!(l.process_word(&ok, &NoEnv).unwrap(), "x");
        // Growth by repetition is cut at the size limit.
        let big = env(&[("A", &"x".repeat(100_000))]);
        let e = l.process_word(&"$A".repeat(20), &big).unwrap_err();
        assert!(e.message.contains("longer than 1 MiB"), "{e}");
        let e = l.process_word(&"\"$A\"".repeat(20), &big).unwrap_err();
        assert!(e.message.contains("longer than 1 MiB"), "{e}");
        // A long pattern on a long value is refused rather than ground through.
        let long = env(&[("A", &"a".repeat(300_000))]);
        let pattern = format!("${{A//{}*b/x}}", "a".repeat(300));
        let e = l.process_word(&pattern, &long).unwrap_err();
        assert!(e.message.contains("too long for a value"), "{e}");
        // A long pattern on a short value works, without recursion.
        let short = env(&[("A", "ab")]);
        let pattern = format!("${{A#{}}}", "?".repeat(100_000));
        assert_eq!(l.process_word(&pattern, &short).unwrap(), "ab");
    }

    #[test]
    fn backtick_escape() {
        let l = Lexer::new('`');
        assert_eq!(l.process_word("a`$b\\c", &NoEnv).unwrap(), "a$b\\c");
    }
}
