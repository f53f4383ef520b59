//! Words built from substitution tokens, so that nesting thousands of levels deep is a few
//! bytes of input away (a 15 KB `${A:-${A:-...}}` once overflowed the stack): expanded alone
//! and as the value of ENV and ARG in a parsed and planned Dockerfile. No panic, no stack
//! overflow, no hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ossb_dockerfile::shell::Lexer;

/// What each input byte adds; the high bits repeat it, so depth grows fast.
const TOKENS: &[&str] = &[
    "${A:-", "${B:+", "${A-", "${B+", "${A:?", "${#A", "${A%", "${A%%", "${A#", "${A##", "${A/",
    "${A//", "${A:1:", "}", "}", "}", "$A", "$B", "${A}", "x", "*", "?", "[", "]", "\\", "`", "'",
    "\"", " ", "$", "{", "$(", ":", "/",
];

fn word(data: &[u8]) -> String {
    let mut out = String::new();
    for &b in data {
        let token = TOKENS[(b & 0x3f) as usize % TOKENS.len()];
        let times = 1 << (b >> 6) * 3; // 1, 8, 64 or 512
        for _ in 0..times {
            out.push_str(token);
        }
        if out.len() > 64 << 10 {
            break;
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let word = word(data);
    let env = vec![
        ("A".to_string(), "a*b".to_string()),
        ("B".to_string(), String::new()),
    ];
    for escape in ['\\', '`'] {
        let _ = Lexer::new(escape).process(&word, &env);
    }
    let text = format!("FROM scratch\nARG C={word}\nENV D={word} E=$C\nRUN echo $D\n");
    if let Ok(df) = ossb_dockerfile::parse(&text, "Dockerfile") {
        let opts = ossb_dockerfile::PlanOptions::default();
        let _ = ossb_dockerfile::plan(&df, &opts, &Default::default());
    }
});
