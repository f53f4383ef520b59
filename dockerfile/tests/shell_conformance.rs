//! BuildKit's shell-expansion test data: envVarTest, wordsTest, processWithMatches.json.

use std::fs;
use std::path::{Path, PathBuf};

use ossb_dockerfile::shell::Lexer;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/buildkit-shell")
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn passes_env_var_test() {
    let text = fs::read_to_string(testdata().join("envVarTest")).unwrap();
    let e = env(&[
        ("PWD", "/home"),
        ("SHELL", "bash"),
        ("KOREAN", "한국어"),
        ("NULL", ""),
    ]);
    let lex = Lexer::new('\\');
    let mut failures = Vec::new();
    let mut count = 0;
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let parts: Vec<&str> = line.splitn(3, '|').collect();
        let (platform, input, expected) = (parts[0].trim(), parts[1].trim(), parts[2].trim());
        if platform == "W" {
            continue;
        }
        count += 1;
        match (lex.process_word(input, &e), expected) {
            (Err(_), "error") => {}
            (Ok(got), exp) if got == exp && exp != "error" => {}
            (got, exp) => failures.push(format!("{input:?}: expected {exp:?}, got {got:?}")),
        }
    }
    assert_eq!(count, 228);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn passes_words_test() {
    let text = fs::read_to_string(testdata().join("wordsTest")).unwrap();
    let lex = Lexer::new('\\');
    let mut e: Vec<(String, String)> = Vec::new();
    let mut failures = Vec::new();
    let mut count = 0;
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(kv) = line.strip_prefix("ENV ") {
            let (k, v) = kv.split_once('=').unwrap();
            e.push((k.to_string(), v.to_string()));
            continue;
        }
        let (input, expected) = line.split_once('|').unwrap();
        let input = input.trim();
        let expected = expected.trim_start();
        count += 1;
        match lex.process_words(input, &e) {
            Err(_) if expected == "error" => {}
            Ok(words)
                if expected != "error" && words == expected.split(',').collect::<Vec<_>>() => {}
            got => failures.push(format!("{input:?}: expected {expected:?}, got {got:?}")),
        }
    }
    assert_eq!(count, 24);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A tiny reader for processWithMatches.json: objects of strings, arrays, bools, null.
fn cases() -> Vec<Vec<(String, String)>> {
    // Each case flattened to (key, value) with arrays/objects as "\u{1}"-joined items.
    let text = fs::read_to_string(testdata().join("processWithMatches.json")).unwrap();
    let c: Vec<char> = text.chars().collect();
    let start = text.find("\"cases\"").unwrap();
    let mut i = c.iter().take(start).count();
    while c[i] != '[' {
        i += 1;
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        while c[i].is_whitespace() || c[i] == ',' {
            i += 1;
        }
        if c[i] == ']' {
            break;
        }
        out.push(object(&c, &mut i));
    }
    out
}

fn string(c: &[char], i: &mut usize) -> String {
    *i += 1;
    let mut s = String::new();
    while c[*i] != '"' {
        if c[*i] == '\\' {
            *i += 1;
            match c[*i] {
                'n' => s.push('\n'),
                't' => s.push('\t'),
                'u' => {
                    let h: String = c[*i + 1..*i + 5].iter().collect();
                    s.push(char::from_u32(u32::from_str_radix(&h, 16).unwrap()).unwrap());
                    *i += 4;
                }
                o => s.push(o),
            }
        } else {
            s.push(c[*i]);
        }
        *i += 1;
    }
    *i += 1;
    s
}

fn object(c: &[char], i: &mut usize) -> Vec<(String, String)> {
    assert_eq!(c[*i], '{');
    *i += 1;
    let mut out = Vec::new();
    loop {
        while c[*i].is_whitespace() || c[*i] == ',' {
            *i += 1;
        }
        if c[*i] == '}' {
            *i += 1;
            return out;
        }
        let k = string(c, i);
        while c[*i].is_whitespace() || c[*i] == ':' {
            *i += 1;
        }
        let v = match c[*i] {
            '"' => string(c, i),
            '{' => object(c, i)
                .into_iter()
                .map(|(k, v)| format!("{k}\u{2}{v}"))
                .collect::<Vec<_>>()
                .join("\u{1}"),
            '[' => {
                *i += 1;
                let mut items = Vec::new();
                loop {
                    while c[*i].is_whitespace() || c[*i] == ',' {
                        *i += 1;
                    }
                    if c[*i] == ']' {
                        *i += 1;
                        break;
                    }
                    items.push(string(c, i));
                }
                items.join("\u{1}")
            }
            _ => {
                let st = *i;
                while c[*i].is_alphanumeric() {
                    *i += 1;
                }
                c[st..*i].iter().collect()
            }
        };
        out.push((k, v));
    }
}

#[test]
fn passes_process_with_matches() {
    let lex = Lexer::new('\\');
    let mut count = 0;
    for case in cases() {
        let get = |k: &str| case.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let input = get("input").unwrap();
        let envs: Vec<(String, String)> = get("envs")
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.split('\u{1}')
                    .map(|kv| {
                        let (k, v) = kv.split_once('\u{2}').unwrap();
                        (k.to_string(), v.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let set = |k: &str| -> Vec<String> {
            match get(k) {
                None => vec![],
                Some(s) if s == "null" || s.is_empty() => vec![],
                Some(s) => {
                    let mut v: Vec<String> = s.split('\u{1}').map(str::to_string).collect();
                    v.sort();
                    v
                }
            }
        };
        count += 1;
        let r = lex.process(&input, &envs);
        if get("expectedErr").as_deref() == Some("true") {
            assert!(r.is_err(), "{input:?} should fail, got {r:?}");
            continue;
        }
        let r = r.unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(r.result, get("expected").unwrap(), "{input:?}");
        assert_eq!(
            r.matched.into_iter().collect::<Vec<_>>(),
            set("matches"),
            "{input:?}"
        );
        assert_eq!(
            r.unmatched.into_iter().collect::<Vec<_>>(),
            set("unmatched"),
            "{input:?}"
        );
    }
    assert_eq!(count, 47);
}
