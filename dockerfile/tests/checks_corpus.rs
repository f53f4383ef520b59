//! The build checks over the 208 official-image Dockerfiles of `testdata/official-images`, as
//! `ossb build --check` runs them (every stage): every warning they give is listed in
//! `testdata/checks/official-images.txt`, where each was checked by hand against its rule's
//! documentation. A new warning, or one gone, fails the test.
//!
//! Every base image is taken to define only PATH in its config (what Debian, Ubuntu, Alpine
//! and buildpack-deps define; a real base defines at least as much, so a variable reported
//! undefined here would be reported with it too, and none is). Dockerfiles under a `windows`
//! directory are checked for windows/amd64, the rest for linux/amd64.
//!
//! `OSSB_UPDATE_CHECKS=1 cargo test -p ossb-dockerfile --test checks_corpus` rewrites the
//! list's entries (keeping its header) for review.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use ossb_dockerfile::checks::{base_images, check, BaseImage, CheckOptions};
use ossb_dockerfile::{parse, BaseImageInfo, DEFAULT_PATH};

fn dockerfiles(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            dockerfiles(&p, out);
        } else if p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("Dockerfile"))
        {
            out.push(p);
        }
    }
}

/// `path:line: Rule: message` for every warning of every Dockerfile.
fn warnings(root: &Path) -> (usize, Vec<String>) {
    let mut files = Vec::new();
    dockerfiles(root, &mut files);
    let mut out = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        let src = fs::read_to_string(f).unwrap();
        let df = parse(&src, &rel).unwrap();
        let platform = if rel.contains("/windows/") {
            "windows/amd64"
        } else {
            "linux/amd64"
        };
        let mut opts = CheckOptions {
            all_stages: true,
            target_platform: platform.parse().unwrap(),
            build_platform: "linux/amd64".parse().unwrap(),
            ..CheckOptions::default()
        };
        let mut bases = HashMap::new();
        for (name, p) in base_images(&df, &opts) {
            let info = BaseImageInfo {
                env: vec![("PATH".into(), DEFAULT_PATH.into())],
                ..BaseImageInfo::default()
            };
            let platform = Some(p);
            bases.insert(name, BaseImage { info, platform });
        }
        opts.bases = bases;
        let report = check(&df, &opts).unwrap();
        assert!(report.error.is_none(), "{rel}: {:?}", report.error);
        for w in report.warnings {
            out.push(format!(
                "{rel}:{}: {}: {}",
                w.start_line, w.rule.name, w.message
            ));
        }
    }
    (files.len(), out)
}

#[test]
fn every_warning_of_the_official_images_is_known_and_checked() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let (files, got) = warnings(&here.join("official-images"));
    assert!(files >= 208, "{files} Dockerfiles");
    let list = here.join("checks/official-images.txt");
    let text = fs::read_to_string(&list).unwrap_or_default();
    let expected: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    if std::env::var_os("OSSB_UPDATE_CHECKS").is_some() {
        let header: String = text
            .lines()
            .take_while(|l| l.starts_with('#') || l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write(&list, format!("{header}{}\n", got.join("\n"))).unwrap();
        return;
    }
    let missing: Vec<&&str> = expected
        .iter()
        .filter(|e| !got.iter().any(|g| g == **e))
        .collect();
    let new: Vec<&String> = got
        .iter()
        .filter(|g| !expected.contains(&g.as_str()))
        .collect();
    assert!(
        missing.is_empty() && new.is_empty() && got.len() == expected.len(),
        "warnings listed but not given: {missing:#?}\nwarnings given but not listed (check each against its rule's page): {new:#?}"
    );
}
