//! The Dockerfile parser: text to a list of instruction [`Node`]s, as BuildKit's parser does.
//!
//! It handles parser directives (`# syntax=`, `# escape=`, `# check=`, only before anything
//! else), the escape character, line continuations (with comments and empty lines inside
//! them), a BOM, CRLF, JSON and shell forms, flags, heredocs and ONBUILD. It knows nothing
//! of what instructions mean: that is [`crate::instruction`]'s job. Every node keeps the
//! lines it came from.

use crate::error::Error;
use crate::json::{parse_array, JsonArray};
use crate::shell::{Lexer, NoEnv};

/// The longest line BuildKit accepts (Go's `bufio.MaxScanTokenSize`, newline included).
const MAX_LINE: usize = 64 * 1024;

/// A parsed Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    /// The name given to [`parse`], used in messages.
    pub file_name: String,
    /// Parser directives found at the top of the file, in order.
    pub directives: Vec<Directive>,
    /// The escape character in force: `\` or `` ` ``.
    pub escape: char,
    /// The instructions in source order.
    pub instructions: Vec<Node>,
    /// Non-fatal findings (empty continuation lines).
    pub warnings: Vec<Warning>,
    /// The physical lines of the source, for error messages.
    pub source_lines: Vec<String>,
}

/// A parser directive such as `# syntax=docker/dockerfile:1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    /// Lower-cased name: `syntax`, `escape` or `check`.
    pub name: String,
    /// The value, trimmed.
    pub value: String,
    /// 1-based line.
    pub line: usize,
}

/// A non-fatal finding of the parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// What was found, e.g. "Empty continuation line found in: RUN a b".
    pub message: String,
    /// The line it is reported at.
    pub line: usize,
}

/// A heredoc attached to an instruction (`RUN <<EOF`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heredoc {
    /// The delimiter word with quotes removed; also the file name for COPY/ADD.
    pub name: String,
    /// The file descriptor written before `<<` (`3<<EOF`), 0 when none.
    pub fd: u32,
    /// Whether variables in the body are expanded (the delimiter was not quoted).
    pub expand: bool,
    /// `<<-`: leading tabs are removed from the body's lines.
    pub chomp: bool,
    /// The body exactly as written, every line with its newline; not yet chomped.
    pub content: String,
}

/// One instruction as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The keyword as written (`run`, `RUN`, `Copy`); compare it case-insensitively.
    pub keyword: String,
    /// The `--flag[=value]` words right after the keyword, unquoted, `--` excluded.
    pub flags: Vec<String>,
    /// The arguments, split per instruction as BuildKit splits them (see [`crate::dump`]).
    pub args: Vec<String>,
    /// The arguments were written in JSON (exec) form.
    pub json: bool,
    /// For ONBUILD: the trigger instruction.
    pub child: Option<Box<Node>>,
    /// Heredocs of this instruction (for ONBUILD: of its trigger), in order.
    pub heredocs: Vec<Heredoc>,
    /// The logical line (continuations joined, comments removed).
    pub original: String,
    /// The comment lines right before the instruction, as BuildKit keeps them for
    /// descriptions (`# name what it is`) and per-instruction `# check=` settings: each
    /// without its `#` and trimmed; an empty comment (`#` alone) drops those above it, blank
    /// lines do not; parser directives are not among them.
    pub comments: Vec<String>,
    /// 1-based first line.
    pub start_line: usize,
    /// 1-based last line (heredoc bodies included).
    pub end_line: usize,
}

impl Node {
    /// The keyword upper-cased, e.g. `RUN`.
    pub fn name(&self) -> String {
        self.keyword.to_uppercase()
    }
}

/// The 18 instructions.
pub const INSTRUCTIONS: [&str; 18] = [
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

struct Directives {
    escape: char,
    done: bool,
    seen: Vec<Directive>,
}

impl Directives {
    /// Looks at a (left-trimmed when first of an instruction) line for a parser directive.
    fn consider(&mut self, line: &str, lineno: usize) -> Result<bool, String> {
        if self.done {
            return Ok(false);
        }
        let Some(rest) = line.strip_prefix('#') else {
            self.done = true;
            return Ok(false);
        };
        let rest = rest.trim_start_matches(char::is_whitespace);
        let Some((key, value)) = directive_parts(rest) else {
            self.done = true;
            return Ok(false);
        };
        let key = key.to_lowercase();
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            self.done = true;
            return Ok(false);
        }
        if self.seen.iter().any(|d| d.name == key) {
            return Err(format!("only one {key} parser directive can be used"));
        }
        if key == "escape" {
            match value {
                "\\" => self.escape = '\\',
                "`" => self.escape = '`',
                v => return Err(format!("invalid escape token '{v}' does not match ` or \\")),
            }
        }
        self.seen.push(Directive {
            name: key,
            value: value.to_string(),
            line: lineno,
        });
        Ok(true)
    }
}

/// Matches `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` (Go's `\s`: ASCII blanks, no `\v`).
fn directive_parts(s: &str) -> Option<(&str, &str)> {
    let is_s = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c');
    let first = s.chars().next()?;
    if !first.is_ascii_alphabetic() {
        return None;
    }
    let key_end = s
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(s.len());
    let key = &s[..key_end];
    let rest = s[key_end..].trim_start_matches(is_s);
    let rest = rest.strip_prefix('=')?;
    let value = rest.trim_start_matches(is_s).trim_end_matches(is_s);
    if value.is_empty() {
        return None;
    }
    Some((key, value))
}

fn trim_newline(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

fn is_comment(s: &str) -> bool {
    s.trim_start_matches(char::is_whitespace).starts_with('#')
}

/// Adds the comment line `raw` to `comments` as BuildKit does: its first character (the `#`,
/// or the indentation before it) dropped and the rest trimmed; an empty one clears the list.
fn keep_comment(raw: &str, comments: &mut Vec<String>) {
    let mut chars = raw.chars();
    chars.next();
    let text = chars.as_str().trim();
    if text.is_empty() {
        comments.clear();
    } else {
        comments.push(text.to_string());
    }
}

/// Removes a trailing line-continuation escape. Returns the line and whether it ended
/// the instruction (no continuation). BuildKit's rule: the escape, optionally followed by
/// blanks, at the end, not itself preceded by an escape (or alone on the line).
fn trim_continuation(line: &str, escape: char) -> (&str, bool) {
    let t = line.trim_end_matches([' ', '\t']);
    if let Some(before) = t.strip_suffix(escape) {
        if before.is_empty() || !before.ends_with(escape) {
            return (before, false);
        }
    }
    (line, true)
}

/// Parses a Dockerfile. `file_name` is only used in messages.
pub fn parse(source: &str, file_name: &str) -> Result<Dockerfile, Error> {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let raw_lines: Vec<&str> = split_lines(source);
    let source_lines: Vec<String> = raw_lines
        .iter()
        .map(|l| trim_newline(l).to_string())
        .collect();
    let fail = |line: usize, msg: String| Error::at(file_name, line, &source_lines, msg);

    let mut d = Directives {
        escape: '\\',
        done: false,
        seen: Vec::new(),
    };
    let mut instructions = Vec::new();
    let mut warnings = Vec::new();
    let mut comments: Vec<String> = Vec::new();
    let mut i = 0; // index of the next physical line
    while i < raw_lines.len() {
        let raw = raw_lines[i];
        if raw.len() > MAX_LINE {
            return Err(fail(
                i + 1,
                format!(
                    "dockerfile line greater than max allowed size of {}",
                    MAX_LINE - 1
                ),
            ));
        }
        let token = trim_newline(raw).trim_start_matches(char::is_whitespace);
        if is_comment(raw) {
            keep_comment(raw, &mut comments);
        }
        if d.consider(token, i + 1).map_err(|m| fail(i + 1, m))? {
            comments.pop();
        }
        let token = if is_comment(token) { "" } else { token };
        i += 1;
        let start_line = i;
        let (first, mut eol) = trim_continuation(token, d.escape);
        if eol && first.is_empty() {
            continue;
        }
        let mut line = first.to_string();
        let mut has_empty = false;
        while !eol && i < raw_lines.len() {
            let raw = raw_lines[i];
            if raw.len() > MAX_LINE {
                return Err(fail(
                    i + 1,
                    format!(
                        "dockerfile line greater than max allowed size of {}",
                        MAX_LINE - 1
                    ),
                ));
            }
            let token = trim_newline(raw);
            d.consider(token, i + 1).map_err(|m| fail(i + 1, m))?;
            i += 1;
            if is_comment(raw) {
                continue;
            }
            if token.trim_start_matches(char::is_whitespace).is_empty() {
                has_empty = true;
                continue;
            }
            let (part, end) = trim_continuation(token, d.escape);
            eol = end;
            line.push_str(part);
        }
        if has_empty {
            warnings.push(Warning {
                message: format!("Empty continuation line found in: {line}"),
                line: i,
            });
        }
        let mut node = node_from_line(&line, d.escape).map_err(|m| fail(start_line, m))?;
        if can_contain_heredoc(&node) && line.contains("<<") {
            for mut heredoc in heredocs_from_line(&line) {
                let mut terminated = false;
                let mut content = String::new();
                while i < raw_lines.len() {
                    let raw = raw_lines[i];
                    i += 1;
                    let mut candidate = trim_newline(raw);
                    if heredoc.chomp {
                        candidate = candidate.trim_start_matches('\t');
                    }
                    if candidate == heredoc.name {
                        terminated = true;
                        break;
                    }
                    content.push_str(raw);
                }
                if !terminated {
                    return Err(fail(start_line, "unterminated heredoc".into()).with_hint(
                        format!("end the heredoc with a line holding only {}", heredoc.name),
                    ));
                }
                heredoc.content = content;
                node.heredocs.push(heredoc);
            }
        }
        node.start_line = start_line;
        node.end_line = i;
        node.comments = std::mem::take(&mut comments);
        instructions.push(node);
    }
    if instructions.is_empty() {
        return Err(Error::at(
            file_name,
            raw_lines.len(),
            &source_lines,
            "file with no instructions",
        )
        .with_hint("a Dockerfile needs at least a FROM instruction"));
    }
    Ok(Dockerfile {
        file_name: file_name.to_string(),
        directives: d.seen,
        escape: d.escape,
        instructions,
        warnings,
        source_lines,
    })
}

/// Splits on `\n`, keeping each line's terminator (as BuildKit's scanner does).
fn split_lines(s: &str) -> Vec<&str> {
    s.split_inclusive('\n').collect()
}

fn can_contain_heredoc(node: &Node) -> bool {
    let mut n = node;
    if n.keyword.eq_ignore_ascii_case("onbuild") {
        if let Some(c) = &n.child {
            n = c;
        }
    }
    let k = n.keyword.to_lowercase();
    matches!(k.as_str(), "add" | "copy" | "run") && !n.json
}

/// Every heredoc opened on `line`, in order, without bodies.
pub(crate) fn heredocs_from_line(line: &str) -> Vec<Heredoc> {
    let lex = Lexer {
        raw_quotes: true,
        raw_escapes: true,
        skip_unset_env: true,
        ..Lexer::new('\\')
    };
    let words = lex.process_words(line, &NoEnv).unwrap_or_default();
    words.iter().filter_map(|w| parse_heredoc(w)).collect()
}

/// Reads a word such as `<<EOF`, `3<<-'EOF'` as the start of a heredoc
/// (BuildKit's `^(\d*)<<(-?)\s*([^<]*)$`).
pub fn parse_heredoc(word: &str) -> Option<Heredoc> {
    let digits = word
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(word.len());
    let rest = word[digits..].strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    let rest = rest.trim_start_matches([' ', '\t', '\n', '\r', '\x0c']);
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let fd: u32 = if digits == 0 {
        0
    } else {
        word[..digits].parse().unwrap_or(0)
    };
    let lex = Lexer {
        skip_unset_env: true,
        ..Lexer::new('\\')
    };
    let words = lex.process_words(rest, &NoEnv).ok()?;
    if words.len() != 1 {
        return None;
    }
    let raw = Lexer {
        raw_quotes: true,
        ..lex
    }
    .process_words(rest, &NoEnv)
    .ok()?;
    if raw.len() != 1 {
        return None;
    }
    let quotes = |s: &str| s.chars().filter(|c| *c == '\'' || *c == '"').count();
    let expand = quotes(&words[0]) == quotes(&raw[0]);
    Some(Heredoc {
        name: words[0].clone(),
        fd,
        expand,
        chomp,
        content: String::new(),
    })
}

/// Go's `strings.TrimSpace`.
fn trim_space(s: &str) -> &str {
    s.trim_matches(char::is_whitespace)
}

fn is_blank(c: char) -> bool {
    matches!(c, '\t' | '\x0b' | '\x0c' | '\r' | ' ')
}

/// Splits on runs of `[\t\v\f\r ]` like Go's `regexp.Split(s, -1)` (empty edges kept).
fn split_blanks(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if is_blank(c) {
            while chars.peek().is_some_and(|c| is_blank(*c)) {
                chars.next();
            }
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Splits on the first run of blanks into at most two parts.
fn split_blanks2(s: &str) -> (&str, Option<&str>) {
    match s.find(is_blank) {
        None => (s, None),
        Some(i) => {
            let rest = s[i..].trim_start_matches(is_blank);
            (&s[..i], Some(rest))
        }
    }
}

fn node_from_line(line: &str, escape: char) -> Result<Node, String> {
    let (cmd, rest) = split_blanks2(trim_space(line));
    let (flags, args) = match rest {
        Some(rest) => {
            let (args, flags) = extract_flags(rest, escape);
            (flags, trim_space(&args).to_string())
        }
        None => (Vec::new(), String::new()),
    };
    let mut node = Node {
        keyword: cmd.to_string(),
        flags,
        args: Vec::new(),
        json: false,
        child: None,
        heredocs: Vec::new(),
        original: line.to_string(),
        comments: Vec::new(),
        start_line: 0,
        end_line: 0,
    };
    let a = args.as_str();
    match cmd.to_lowercase().as_str() {
        "add" | "copy" | "volume" => (node.args, node.json) = maybe_json_to_list(a)?,
        "arg" => node.args = parse_words(a, escape),
        "cmd" | "entrypoint" | "run" | "shell" => (node.args, node.json) = maybe_json(a)?,
        "env" => node.args = parse_name_val(a, "ENV", escape)?,
        "label" => node.args = parse_name_val(a, "LABEL", escape)?,
        "expose" | "from" => node.args = whitespace_delimited(a),
        "healthcheck" => (node.args, node.json) = health_config(a)?,
        "maintainer" | "stopsignal" | "user" | "workdir" => {
            if !a.is_empty() {
                node.args = vec![a.to_string()];
            }
        }
        "onbuild" => {
            if !a.is_empty() {
                node.child = Some(Box::new(node_from_line(a, escape)?));
            }
        }
        _ => node.args = vec![String::new()],
    }
    Ok(node)
}

/// BuildKit's flag lexer: `--name[=value]` words before the arguments, quotes removed,
/// byte by byte (so non-ASCII bytes are handled one at a time, as BuildKit does).
fn extract_flags(line: &str, escape: char) -> (String, Vec<String>) {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let b = line.as_bytes();
    let esc = if escape.is_ascii() {
        escape as u8
    } else {
        b'\\'
    };
    let is_space = |c: u8| matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0);
    let rest_from = |pos: usize| String::from_utf8_lossy(&b[pos..]).into_owned();
    let to_string = |w: &[u8]| String::from_utf8_lossy(w).into_owned();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut word: Vec<u8> = Vec::new();
    let mut quote = 0u8;
    let mut blank_ok = false;
    let mut pos = 0;
    while pos <= b.len() {
        let at_end = pos == b.len();
        let mut ch = if at_end { 0 } else { b[pos] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if is_space(ch) {
                pos += 1;
                continue;
            }
            if ch != b'-' || pos + 1 == b.len() || b[pos + 1] != b'-' {
                return (rest_from(pos), words);
            }
            phase = Phase::Word;
        }
        if at_end {
            if word != b"--" && (blank_ok || !word.is_empty()) {
                words.push(to_string(&word));
            }
            break;
        }
        if phase == Phase::Word {
            if is_space(ch) {
                phase = Phase::Spaces;
                if word == b"--" {
                    return (rest_from(pos), words);
                }
                if blank_ok || !word.is_empty() {
                    words.push(to_string(&word));
                }
                word.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == b'\'' || ch == b'"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
                pos += 1;
                continue;
            }
            if ch == esc {
                if pos + 1 == b.len() {
                    pos += 1;
                    continue;
                }
                pos += 1;
                ch = b[pos];
            }
            word.push(ch);
            pos += 1;
            continue;
        }
        // In a quote.
        if ch == quote {
            phase = Phase::Word;
            pos += 1;
            continue;
        }
        if ch == esc {
            if pos + 1 == b.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            ch = b[pos];
        }
        word.push(ch);
        pos += 1;
    }
    (String::new(), words)
}

/// BuildKit's `parseWords`: splits on whitespace, keeping quotes and escapes as written.
fn parse_words(rest: &str, escape: char) -> Vec<String> {
    #[derive(PartialEq)]
    enum Phase {
        Spaces,
        Word,
        Quote,
    }
    let chars: Vec<char> = rest.chars().collect();
    let mut words = Vec::new();
    let mut phase = Phase::Spaces;
    let mut quote = '\0';
    let mut blank_ok = false;
    let mut w = String::new();
    let mut pos = 0;
    loop {
        let at_end = pos == chars.len();
        let mut ch = if at_end { '\0' } else { chars[pos] };
        if phase == Phase::Spaces {
            if at_end {
                break;
            }
            if ch.is_whitespace() {
                pos += 1;
                continue;
            }
            phase = Phase::Word;
        }
        if at_end {
            if blank_ok || !w.is_empty() {
                words.push(w);
            }
            break;
        }
        if phase == Phase::Word {
            if ch.is_whitespace() {
                phase = Phase::Spaces;
                if blank_ok || !w.is_empty() {
                    words.push(std::mem::take(&mut w));
                }
                w.clear();
                blank_ok = false;
                pos += 1;
                continue;
            }
            if ch == '\'' || ch == '"' {
                quote = ch;
                blank_ok = true;
                phase = Phase::Quote;
            }
            if ch == escape {
                if pos + 1 == chars.len() {
                    pos += 1;
                    continue;
                }
                w.push(ch);
                pos += 1;
                ch = chars[pos];
            }
            w.push(ch);
            pos += 1;
            continue;
        }
        // In a quote.
        if ch == quote {
            phase = Phase::Word;
        }
        if ch == escape && quote != '\'' {
            if pos + 1 == chars.len() {
                phase = Phase::Word;
                pos += 1;
                continue;
            }
            pos += 1;
            w.push(ch);
            ch = chars[pos];
        }
        w.push(ch);
        pos += 1;
    }
    words
}

fn parse_name_val(rest: &str, key: &str, escape: char) -> Result<Vec<String>, String> {
    let words = parse_words(rest, escape);
    if words.is_empty() {
        return Ok(Vec::new());
    }
    if !words[0].contains('=') {
        let (k, v) = split_blanks2(rest);
        return match v {
            Some(v) => Ok(vec![k.to_string(), v.to_string(), String::new()]),
            None => Err(format!("{key} must have two arguments")),
        };
    }
    let mut out = Vec::with_capacity(words.len() * 3);
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            return Err(format!(
                "Syntax error - can't find = in {}. Must be of the form: name=value",
                crate::dump::go_quote(&w)
            ));
        };
        out.extend([k.to_string(), v.to_string(), "=".to_string()]);
    }
    Ok(out)
}

fn whitespace_delimited(rest: &str) -> Vec<String> {
    if rest.is_empty() {
        return Vec::new();
    }
    split_blanks(rest)
}

fn json_form(rest: &str) -> Result<Option<Vec<String>>, String> {
    match parse_array(rest) {
        JsonArray::Strings(v) => Ok(Some(v)),
        JsonArray::NotStrings => Err(
            "when using JSON array syntax, arrays must be comprised of strings only".to_string(),
        ),
        JsonArray::Invalid => Ok(None),
    }
}

fn maybe_json(rest: &str) -> Result<(Vec<String>, bool), String> {
    if rest.is_empty() {
        return Ok((Vec::new(), false));
    }
    Ok(match json_form(rest)? {
        Some(v) => (v, true),
        None => (vec![rest.to_string()], false),
    })
}

fn maybe_json_to_list(rest: &str) -> Result<(Vec<String>, bool), String> {
    Ok(match json_form(rest)? {
        Some(v) => (v, true),
        None => (whitespace_delimited(rest), false),
    })
}

fn health_config(rest: &str) -> Result<(Vec<String>, bool), String> {
    let b = rest.as_bytes();
    let is_space = |c: u8| matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0x85 | 0xa0);
    let sep = b.iter().position(|c| is_space(*c)).unwrap_or(b.len());
    if sep == 0 {
        return Ok((Vec::new(), false));
    }
    let next = b[sep..]
        .iter()
        .position(|c| !is_space(*c))
        .map(|p| sep + p)
        .unwrap_or(b.len());
    let typ = String::from_utf8_lossy(&b[..sep]).into_owned();
    let cmd = String::from_utf8_lossy(&b[next..]).into_owned();
    let (mut args, json) = maybe_json(&cmd)?;
    args.insert(0, typ);
    Ok((args, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexes_flags_like_buildkit() {
        let (rest, flags) = extract_flags("--mount=type=\"cache\" --x -- foo bar", '\\');
        assert_eq!(flags, vec!["--mount=type=cache", "--x"]);
        assert_eq!(rest, " foo bar");
    }

    #[test]
    fn keeps_lines_of_every_node() {
        let df = parse(
            "FROM a\n\nRUN a \\\n  b\nCOPY <<EOF /x\nhi\nEOF\n",
            "Dockerfile",
        )
        .unwrap();
        let lines: Vec<_> = df
            .instructions
            .iter()
            .map(|n| (n.start_line, n.end_line))
            .collect();
        assert_eq!(lines, vec![(1, 1), (3, 4), (5, 7)]);
        assert_eq!(df.instructions[2].heredocs[0].content, "hi\n");
    }

    #[test]
    fn directives_only_at_the_top() {
        let df = parse("# escape=`\nFROM a\nRUN a `\n b\n", "D").unwrap();
        assert_eq!(df.escape, '`');
        assert_eq!(df.instructions[1].args, vec!["a  b"]);
        let df = parse("FROM a\n# escape=`\n", "D").unwrap();
        assert_eq!(df.escape, '\\');
        assert!(parse("# escape=x\nFROM a\n", "D").is_err());
        assert!(parse("# syntax=a\n# syntax=b\nFROM a\n", "D").is_err());
    }
}
