//! Property tests: no panic on any input, and `.dockerignore` laws.

use ossb_dockerfile::dockerignore::Dockerignore;
use ossb_dockerfile::shell::{Lexer, NoEnv};
use proptest::prelude::*;

fn segment() -> impl Strategy<Value = String> {
    "[a-z]{1,3}"
}

fn rel_path() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(), 1..4)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parser_never_panics(src in "(?s).{0,200}") {
        if let Ok(df) = ossb_dockerfile::parse(&src, "Dockerfile") {
            let _ = ossb_dockerfile::dump(&df);
            let _ = ossb_dockerfile::plan(&df, &Default::default(), &Default::default());
        }
    }

    #[test]
    fn parser_never_panics_on_dockerfile_like_text(
        lines in prop::collection::vec(
            "(FROM|RUN|COPY|ENV|ARG|ONBUILD|HEALTHCHECK|LABEL|EXPOSE|# escape=|#) ?(--[a-z]+=?[a-z$]*)? ?[a-z$<{}\"'\\\\\\[\\]:=/ -]{0,12}\\\\?",
            0..8),
    ) {
        let src = lines.join("\n");
        if let Ok(df) = ossb_dockerfile::parse(&src, "Dockerfile") {
            let _ = ossb_dockerfile::dump(&df);
            let _ = ossb_dockerfile::plan(&df, &Default::default(), &Default::default());
        }
    }

    #[test]
    fn expansion_never_panics(word in "[a-z$#%/:?*+{}\\\\'\" -]{0,24}") {
        let env = vec![("a".to_string(), "x*y/z".to_string())];
        let _ = Lexer::new('\\').process(&word, &env);
        let _ = Lexer::new('`').process_words(&word, &NoEnv);
    }

    #[test]
    fn ignore_never_panics(pats in "(?s).{0,60}", path in "(?s).{0,30}") {
        if let Ok(i) = Dockerignore::parse(&pats) {
            let _ = i.is_excluded(&path);
            let _ = i.may_include_below(&path);
        }
    }

    #[test]
    fn a_literal_pattern_excludes_the_path_and_everything_below(p in rel_path(), below in rel_path()) {
        let pat = p.join("/");
        let i = Dockerignore::parse(&pat).unwrap();
        prop_assert!(i.is_excluded(&pat));
        let child = format!("{pat}/{}", below.join("/"));
        prop_assert!(i.is_excluded(&child));
    }

    #[test]
    fn patterns_are_anchored_at_the_root(p in rel_path(), prefix in segment()) {
        let pat = p.join("/");
        let i = Dockerignore::parse(&pat).unwrap();
        let nested = format!("{prefix}/{pat}");
        // Only excluded if the nested path itself starts with the pattern.
        prop_assert_eq!(i.is_excluded(&nested), nested.starts_with(&format!("{pat}/")) || nested == pat);
    }

    #[test]
    fn double_star_matches_at_any_depth(dirs in prop::collection::vec(segment(), 0..4), name in segment()) {
        let i = Dockerignore::parse(&format!("**/{name}.tmp")).unwrap();
        let mut path = dirs.join("/");
        if !path.is_empty() { path.push('/'); }
        path.push_str(&format!("{name}.tmp"));
        prop_assert!(i.is_excluded(&path));
    }

    #[test]
    fn an_exception_after_a_pattern_reincludes(p in rel_path(), child in segment()) {
        let pat = p.join("/");
        let inner = format!("{pat}/{child}");
        let i = Dockerignore::parse(&format!("{pat}\n!{inner}\n")).unwrap();
        prop_assert!(!i.is_excluded(&inner));
        prop_assert!(i.is_excluded(&pat));
        prop_assert!(i.may_include_below(&pat));
        // The last pattern wins: excluding again after the exception excludes.
        let j = Dockerignore::parse(&format!("{pat}\n!{inner}\n{inner}\n")).unwrap();
        prop_assert!(j.is_excluded(&inner));
    }

    #[test]
    fn trailing_slash_and_leading_slash_do_not_matter(p in rel_path(), probe in rel_path()) {
        let pat = p.join("/");
        let a = Dockerignore::parse(&pat).unwrap();
        let b = Dockerignore::parse(&format!("/{pat}/")).unwrap();
        let probe = probe.join("/");
        prop_assert_eq!(a.is_excluded(&probe), b.is_excluded(&probe));
    }
}
