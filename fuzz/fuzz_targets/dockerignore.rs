//! Compile arbitrary .dockerignore text and match a path against it: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ossb_dockerfile::dockerignore::Dockerignore;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (patterns, path) = text.split_once('\0').unwrap_or((&text, "a/b/c"));
    if let Ok(ig) = Dockerignore::parse(patterns) {
        let _ = ig.is_excluded(path);
        let _ = ig.may_include_below(path);
    }
});
