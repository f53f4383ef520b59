//! Every real-world Dockerfile of the corpus parses and plans without error.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use ossb_dockerfile::{base_images, parse, plan, PlanOptions};

fn dockerfiles(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            dockerfiles(&p, out);
        } else if is_dockerfile(&p) {
            out.push(p);
        }
    }
}

fn check_all(sub: &str, args: &[(&str, &str)], min: usize) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(sub);
    let mut files = Vec::new();
    dockerfiles(&root, &mut files);
    assert!(files.len() >= min, "{} files under {sub}", files.len());
    let mut opts = PlanOptions::default();
    for (k, v) in args {
        opts.build_args.insert(k.to_string(), v.to_string());
    }
    let mut failures = Vec::new();
    for f in &files {
        let src = fs::read_to_string(f).unwrap();
        let r = parse(&src, &f.display().to_string())
            .and_then(|df| base_images(&df, &opts).map(|b| (df, b)))
            .and_then(|(df, _)| plan(&df, &opts, &HashMap::new()));
        if let Err(e) = r {
            failures.push(e.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn plans_every_official_image() {
    check_all("official-images", &[], 200);
}

#[test]
fn plans_every_kaniko_dockerfile() {
    // The build args kaniko's integration harness passes (integration/images.go).
    check_all(
        "kaniko",
        &[
            ("file", "/file"),
            ("image", "scratch"),
            ("SSH_PRIVATE_KEY", "x"),
            ("SSH_PUBLIC_KEY", "y"),
        ],
        80,
    );
}

fn is_dockerfile(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_string_lossy();
    name.starts_with("Dockerfile") && !name.ends_with(".dockerignore")
}
