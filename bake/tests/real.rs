//! Real projects' bake files (see tests/real/README.md): every group and target resolves,
//! and the facts buildx's rules imply hold.

use std::path::Path;

use ossb_bake::{load, resolve_with, Clock, Request, Resolved, SourceFile};

fn resolve(project: &str, targets: &[&str], env: &[(&str, &str)]) -> Resolved {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/real")
        .join(project)
        .join("docker-bake.hcl");
    let text = std::fs::read_to_string(&path).expect("bake file");
    let def = load(&[SourceFile {
        name: "docker-bake.hcl".into(),
        text,
    }])
    .expect("parses");
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let targets: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
    let req = Request {
        targets: &targets,
        overrides: &[],
        env: &lookup,
        builtins: ossb_bake::default_builtins(),
        clock: Clock {
            now: 1_700_000_000,
            home: "/home/user".into(),
        },
    };
    resolve_with(&def, &req).unwrap_or_else(|e| panic!("{project} {targets:?}: {e}"))
}

#[test]
fn buildx_release_file_resolves() {
    let r = resolve("buildx", &["default"], &[]);
    assert!(r.targets.contains_key("binaries"));
    let v = resolve("buildx", &["validate"], &[]);
    assert_eq!(v.groups["validate"].targets.len(), 5);
    // lint-gopls inherits lint (which inherits _common); GO_VERSION's null default drops the arg.
    let lint = &v.targets["lint-gopls"];
    assert_eq!(
        lint.dockerfile.as_deref(),
        Some("./hack/dockerfiles/lint.Dockerfile")
    );
    assert_eq!(lint.target.as_deref(), Some("gopls-analyze"));
    assert_eq!(
        lint.args.get("BUILDKIT_CONTEXT_KEEP_GIT_DIR"),
        Some(&Some("1".to_string()))
    );
    assert!(!lint.args.contains_key("GO_VERSION"));
    let with_go = resolve(
        "buildx",
        &["lint"],
        &[("GO_VERSION", "1.23"), ("GOLANGCI_LINT_MULTIPLATFORM", "1")],
    );
    assert_eq!(
        with_go.targets["lint"].args.get("GO_VERSION"),
        Some(&Some("1.23".to_string()))
    );
    assert_eq!(
        with_go.targets["lint"].platforms.as_ref().map(Vec::len),
        Some(15)
    );
    let all = resolve("buildx", &["*"], &[]);
    assert!(all.targets.len() > 15);
}

#[test]
fn agoric_release_group_resolves() {
    let r = resolve(
        "agoric-sdk",
        &["docker-sdk-release"],
        &[("GIT_COMMIT", "abc123")],
    );
    assert_eq!(r.groups["default"].targets, ["docker-sdk-release"]);
    assert_eq!(
        r.groups["docker-sdk-release"].targets,
        ["ssh-node", "sdk", "setup"]
    );
    assert_eq!(
        r.targets["sdk"].args.get("GIT_COMMIT"),
        Some(&Some("abc123".to_string()))
    );
    assert_eq!(
        r.targets["sdk"].args.get("GIT_REVISION"),
        Some(&Some(String::new()))
    );
    assert_eq!(
        r.targets["setup"].context.as_deref(),
        Some("packages/deployment")
    );
}
