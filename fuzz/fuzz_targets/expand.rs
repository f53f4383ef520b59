//! Expand arbitrary words with both escape characters: no panic, no hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ossb_dockerfile::shell::Lexer;

fuzz_target!(|data: &[u8]| {
    let word = String::from_utf8_lossy(data);
    let env = vec![
        ("A".to_string(), "x*y/z?".to_string()),
        ("E".to_string(), String::new()),
        ("P".to_string(), "/usr/local/bin".to_string()),
    ];
    for escape in ['\\', '`'] {
        let lex = Lexer::new(escape);
        let _ = lex.process(&word, &env);
        let raw = Lexer {
            raw_quotes: true,
            raw_escapes: true,
            skip_unset_env: true,
            ..lex
        };
        let _ = raw.process_words(&word, &env);
    }
});
