//! Golden tests: bake files with the `--print` output buildx gives for them, taken from
//! buildx's documentation and integration tests or from real projects (see each
//! directory's README). Each case is a directory under `tests/data/` holding the bake
//! files, `args` (one line: targets, then `--set X` pairs, `--env K=V`), and `expected.json`.

use std::path::Path;

use ossb_bake::{load, print_json, resolve_with, Clock, Request, SourceFile, DEFAULT_FILES};

fn run_case(dir: &Path) -> Result<String, String> {
    let args = std::fs::read_to_string(dir.join("args")).unwrap_or_default();
    let mut targets = Vec::new();
    let mut sets = Vec::new();
    let mut env = Vec::new();
    let mut files: Vec<String> = Vec::new();
    let mut words = args.split_whitespace();
    while let Some(w) = words.next() {
        match w {
            "--set" => sets.push(words.next().unwrap_or_default().to_string()),
            "--env" => env.push(words.next().unwrap_or_default().to_string()),
            "-f" => files.push(words.next().unwrap_or_default().to_string()),
            other => targets.push(other.to_string()),
        }
    }
    let names: Vec<String> = if files.is_empty() {
        DEFAULT_FILES
            .iter()
            .map(|s| s.to_string())
            .filter(|f| dir.join(f).exists())
            .collect()
    } else {
        files
    };
    let sources: Vec<SourceFile> = names
        .iter()
        .map(|n| SourceFile {
            name: n.clone(),
            text: std::fs::read_to_string(dir.join(n)).expect("bake file"),
        })
        .collect();
    let def = load(&sources).map_err(|e| e.to_string())?;
    let lookup = move |k: &str| {
        env.iter().find_map(|kv| {
            kv.split_once('=')
                .filter(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        })
    };
    let req = Request {
        targets: &targets,
        overrides: &sets,
        env: &lookup,
        builtins: ossb_bake::default_builtins(),
        clock: Clock {
            now: 1_700_000_000,
            home: "/home/user".into(),
        },
    };
    let r = resolve_with(&def, &req).map_err(|e| e.to_string())?;
    Ok(print_json(&r))
}

#[test]
fn print_matches_buildx() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut failures = Vec::new();
    let mut count = 0;
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .expect("data dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for project in dirs.into_iter().filter(|p| p.is_dir()) {
        let mut cases: Vec<_> = std::fs::read_dir(&project)
            .expect("project")
            .flatten()
            .map(|e| e.path())
            .collect();
        cases.sort();
        for case in cases
            .into_iter()
            .filter(|p| p.join("expected.json").exists())
        {
            count += 1;
            let want = std::fs::read_to_string(case.join("expected.json")).expect("expected");
            let got = run_case(&case);
            let ok = match &got {
                Ok(g) => {
                    let a: serde_json::Value = serde_json::from_str(g).expect("our output is JSON");
                    let b: serde_json::Value =
                        serde_json::from_str(&want).expect("expected is JSON");
                    a == b
                }
                Err(_) => false,
            };
            if !ok {
                failures.push(format!(
                    "{}:\n got {:?}\nwant {}",
                    case.display(),
                    got,
                    want
                ));
            }
        }
    }
    assert!(count > 0);
    assert!(
        failures.is_empty(),
        "{} of {count} cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
