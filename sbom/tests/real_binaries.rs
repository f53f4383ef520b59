//! Binaries built by the real toolchains, when they are installed: a Go program (checked
//! against `go version -m`) and a Rust program built with `cargo auditable`. Skipped, with a
//! message, where the toolchain is missing (neither is part of the test environment).

use std::path::Path;
use std::process::Command;

use ossb_sbom::Kind;

fn have(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, text).expect("write");
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Outside CI a missing toolchain skips the test with a message; under CI=true it fails: a
/// test that does not run must not pass there.
fn skip(why: &str) {
    assert!(std::env::var("CI").map_or(true, |v| v != "true"), "{why}");
    eprintln!("skipped: {why}");
}

#[test]
fn go_binary_modules_match_go_version_m() {
    if !have("go", &["version"]) {
        return skip("no go toolchain on PATH (scripts/testenv.sh installs golang-go)");
    }
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    // Two modules, the dependency replaced by a directory: builds with no network.
    write(
        &src.join("go.mod"),
        "module example.com/hello\n\ngo 1.19\n\nrequire example.com/greet v0.1.0\n\nreplace example.com/greet => ./greet\n",
    );
    write(
        &src.join("main.go"),
        "package main\n\nimport \"example.com/greet\"\n\nfunc main() { greet.Hello() }\n",
    );
    write(
        &src.join("greet/go.mod"),
        "module example.com/greet\n\ngo 1.19\n",
    );
    write(
        &src.join("greet/greet.go"),
        "package greet\n\nimport \"fmt\"\n\nfunc Hello() { fmt.Println(\"hello\") }\n",
    );
    let root = work.path().join("rootfs");
    let bin = root.join("usr/local/bin/hello");
    for (out, flags) in [
        (&bin, ""),
        (&root.join("usr/local/bin/hello-stripped"), "-s -w"),
    ] {
        run(Command::new("go")
            .current_dir(&src)
            .args(["build", "-trimpath", &format!("-ldflags={flags}"), "-o"])
            .arg(out)
            .arg(".")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-mod=mod")
            .env("GOCACHE", work.path().join("cache"))
            .env("GOPATH", work.path().join("gopath"))
            .env("CGO_ENABLED", "0"));
    }
    let listed = run(Command::new("go").arg("version").arg("-m").arg(&bin));
    eprintln!("{listed}");
    let go_version = listed
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default();

    let scan = ossb_sbom::scan_with_warnings(&root).expect("scan");
    assert!(scan.warnings.is_empty(), "{:?}", scan.warnings);
    let found: Vec<(String, String, Vec<String>)> = scan
        .packages
        .iter()
        .filter(|p| p.kind == Kind::GoModule)
        .map(|p| (p.name.clone(), p.version.clone(), p.found_at.clone()))
        .collect();
    let both = vec![
        "usr/local/bin/hello".to_string(),
        "usr/local/bin/hello-stripped".to_string(),
    ];
    assert!(
        found.contains(&("stdlib".into(), go_version.into(), both.clone())),
        "{found:?}"
    );
    assert!(
        found.contains(&("example.com/hello".into(), "(devel)".into(), both.clone())),
        "{found:?}"
    );
    assert!(
        found.contains(&("example.com/greet".into(), "(devel)".into(), both)),
        "{found:?}"
    );
    assert!(listed.contains("dep\texample.com/greet\tv0.1.0") && listed.contains("=>\t./greet"));
}

#[test]
fn cargo_auditable_binary_lists_its_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if !have(&cargo, &["auditable", "--version"]) {
        return skip("cargo-auditable is not installed (scripts/testenv.sh installs it)");
    }
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("probe");
    write(
        &src.join("Cargo.toml"),
        "[package]\nname = \"probe\"\nversion = \"0.3.1\"\nedition = \"2021\"\n\n[dependencies]\nhelper = { path = \"helper\" }\n\n[workspace]\n",
    );
    write(&src.join("src/main.rs"), "fn main() { helper::hi(); }\n");
    write(
        &src.join("helper/Cargo.toml"),
        "[package]\nname = \"helper\"\nversion = \"1.2.0\"\nedition = \"2021\"\n",
    );
    write(
        &src.join("helper/src/lib.rs"),
        "pub fn hi() { println!(\"hi\"); }\n",
    );
    let target = work.path().join("target");
    run(Command::new(&cargo)
        .current_dir(&src)
        .args(["auditable", "build", "--quiet"])
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS"));
    let root = work.path().join("rootfs");
    std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
    std::fs::copy(target.join("debug/probe"), root.join("usr/bin/probe")).expect("copy");

    let scan = ossb_sbom::scan_with_warnings(&root).expect("scan");
    assert!(scan.warnings.is_empty(), "{:?}", scan.warnings);
    let found: Vec<(&str, &str, Option<&str>)> = scan
        .packages
        .iter()
        .filter(|p| p.kind == Kind::Cargo)
        .map(|p| (p.name.as_str(), p.version.as_str(), p.purl.as_deref()))
        .collect();
    // Path crates: listed, without a purl (see auditable.rs).
    assert_eq!(
        found,
        vec![("helper", "1.2.0", None), ("probe", "0.3.1", None)]
    );
}
