//! BuildKit's parser test data: every `testfiles/*/result` byte for byte, every negative
//! case refused, line ranges of `testfile-line`, and the heredoc expectations.

use std::fs;
use std::path::{Path, PathBuf};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/buildkit-parser")
}

fn read(p: &Path) -> String {
    String::from_utf8(fs::read(p).unwrap()).expect("test files are UTF-8")
}

#[test]
fn dumps_every_testfile_like_buildkit() {
    let mut failures = Vec::new();
    let mut count = 0;
    for entry in fs::read_dir(testdata().join("testfiles")).unwrap() {
        let dir = entry.unwrap().path();
        let src = read(&dir.join("Dockerfile"));
        let expected = read(&dir.join("result")).replace("\r\n", "\n");
        count += 1;
        match ossb_dockerfile::parse(&src, "Dockerfile") {
            Ok(df) => {
                let got = ossb_dockerfile::dump(&df);
                if got != expected {
                    failures.push(format!(
                        "{}:\n--- expected\n{expected}--- got\n{got}",
                        dir.display()
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", dir.display())),
        }
    }
    assert_eq!(count, 33);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn refuses_every_negative_testfile() {
    for entry in fs::read_dir(testdata().join("testfiles-negative")).unwrap() {
        let dir = entry.unwrap().path();
        let src = read(&dir.join("Dockerfile"));
        assert!(
            ossb_dockerfile::parse(&src, "Dockerfile").is_err(),
            "{} parsed",
            dir.display()
        );
    }
}

#[test]
fn reports_line_ranges() {
    let src = read(&testdata().join("testfile-line/Dockerfile"));
    let df = ossb_dockerfile::parse(&src, "Dockerfile").unwrap();
    let lines: Vec<_> = df
        .instructions
        .iter()
        .map(|n| (n.start_line, n.end_line))
        .collect();
    assert_eq!(lines, vec![(5, 5), (11, 12), (17, 31)]);
}

/// A tiny reader for the expected.json files: only what they hold.
mod json {
    #[derive(Debug, Clone, PartialEq)]
    pub enum V {
        Null,
        Bool(bool),
        Num(f64),
        Str(String),
        Arr(Vec<V>),
        Obj(Vec<(String, V)>),
    }
    impl V {
        pub fn get(&self, k: &str) -> &V {
            match self {
                V::Obj(o) => o
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v)
                    .unwrap_or(&V::Null),
                _ => &V::Null,
            }
        }
        pub fn arr(&self) -> &[V] {
            match self {
                V::Arr(a) => a,
                _ => &[],
            }
        }
        pub fn str(&self) -> &str {
            match self {
                V::Str(s) => s,
                _ => panic!("not a string: {self:?}"),
            }
        }
        pub fn num(&self) -> f64 {
            match self {
                V::Num(n) => *n,
                _ => panic!("not a number"),
            }
        }
        pub fn bool(&self) -> bool {
            matches!(self, V::Bool(true))
        }
    }
    pub fn parse(s: &str) -> V {
        let c: Vec<char> = s.chars().collect();
        let mut i = 0;
        value(&c, &mut i)
    }
    fn ws(c: &[char], i: &mut usize) {
        while *i < c.len() && c[*i].is_whitespace() {
            *i += 1;
        }
    }
    fn value(c: &[char], i: &mut usize) -> V {
        ws(c, i);
        match c[*i] {
            '{' => {
                *i += 1;
                let mut o = Vec::new();
                loop {
                    ws(c, i);
                    if c[*i] == '}' {
                        *i += 1;
                        return V::Obj(o);
                    }
                    if c[*i] == ',' {
                        *i += 1;
                        continue;
                    }
                    let V::Str(k) = value(c, i) else { panic!() };
                    ws(c, i);
                    *i += 1; // :
                    o.push((k, value(c, i)));
                }
            }
            '[' => {
                *i += 1;
                let mut a = Vec::new();
                loop {
                    ws(c, i);
                    if c[*i] == ']' {
                        *i += 1;
                        return V::Arr(a);
                    }
                    if c[*i] == ',' {
                        *i += 1;
                        continue;
                    }
                    a.push(value(c, i));
                }
            }
            '"' => {
                *i += 1;
                let mut s = String::new();
                while c[*i] != '"' {
                    if c[*i] == '\\' {
                        *i += 1;
                        match c[*i] {
                            'n' => s.push('\n'),
                            't' => s.push('\t'),
                            'r' => s.push('\r'),
                            'b' => s.push('\x08'),
                            'f' => s.push('\x0c'),
                            'u' => {
                                let h: String = c[*i + 1..*i + 5].iter().collect();
                                s.push(
                                    char::from_u32(u32::from_str_radix(&h, 16).unwrap()).unwrap(),
                                );
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
                V::Str(s)
            }
            't' => {
                *i += 4;
                V::Bool(true)
            }
            'f' => {
                *i += 5;
                V::Bool(false)
            }
            'n' => {
                *i += 4;
                V::Null
            }
            _ => {
                let st = *i;
                while *i < c.len() && (c[*i].is_ascii_digit() || "+-.eE".contains(c[*i])) {
                    *i += 1;
                }
                V::Num(c[st..*i].iter().collect::<String>().parse().unwrap())
            }
        }
    }
}

#[test]
fn matches_heredoc_and_continuation_expectations() {
    for case in [
        "heredoc-extract",
        "heredoc-json",
        "empty-continuation-warnings",
    ] {
        let dir = testdata().join("extra-from-go-tests").join(case);
        let src = read(&dir.join("Dockerfile"));
        let expected = json::parse(&read(&dir.join("expected.json")));
        let df = ossb_dockerfile::parse(&src, "Dockerfile").unwrap();
        let instrs = expected.get("instructions").arr();
        assert_eq!(df.instructions.len(), instrs.len(), "{case}");
        for (node, exp) in df.instructions.iter().zip(instrs) {
            let ctx = format!("{case} #{}", exp.get("index").num());
            assert_eq!(
                ossb_dockerfile::dump_node(node),
                exp.get("dump").str(),
                "{ctx}"
            );
            assert_eq!(node.start_line as f64, exp.get("start_line").num(), "{ctx}");
            assert_eq!(node.end_line as f64, exp.get("end_line").num(), "{ctx}");
            let docs = exp.get("heredocs").arr();
            assert_eq!(node.heredocs.len(), docs.len(), "{ctx}");
            for (h, e) in node.heredocs.iter().zip(docs) {
                assert_eq!(h.name, e.get("Name").str(), "{ctx}");
                assert_eq!(h.fd as f64, e.get("FileDescriptor").num(), "{ctx}");
                assert_eq!(h.expand, e.get("Expand").bool(), "{ctx}");
                assert_eq!(h.chomp, e.get("Chomp").bool(), "{ctx}");
                assert_eq!(h.content, e.get("Content").str(), "{ctx}");
            }
        }
        let warnings: Vec<&str> = expected
            .get("expected_warnings")
            .arr()
            .iter()
            .map(|w| w.str())
            .collect();
        if !warnings.is_empty() {
            assert_eq!(df.warnings.len(), warnings.len(), "{case}");
            for (w, e) in df.warnings.iter().zip(warnings) {
                assert!(
                    w.message.contains(e),
                    "{case}: {} does not contain {e}",
                    w.message
                );
            }
        }
    }
}
