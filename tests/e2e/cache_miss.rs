//! Why a step missed the cache: each test builds, changes one thing, builds again, and reads
//! the reason in plain progress, in `--progress json` and in `--metadata-file`
//! (`ossb.cache-misses`). Every scenario runs in two cache directories at once, one shown
//! plain and one as JSON with a metadata file; the three must agree.

use std::path::{Path, PathBuf};

use crate::build::busybox;
use crate::support::*;

/// A step that ran and its reason: (the step's vertex name, the reason).
type Miss = (String, String);

/// One scenario's two cache directories.
struct Twins {
    plain: PathBuf,
    json: PathBuf,
    out: PathBuf,
}

impl Twins {
    fn new(dir: &Path) -> Twins {
        Twins {
            plain: dir.join("cache-plain"),
            json: dir.join("cache-json"),
            out: dir.join("out"),
        }
    }

    /// Builds `ctx` in both caches; returns the misses, checked to agree in plain progress,
    /// JSON progress and the metadata file.
    fn build(&self, env: &TestEnv, ctx: &Path, extra: &[&str]) -> Vec<Miss> {
        self.build_with(env, ctx, extra, &[])
    }

    fn build_with(
        &self,
        env: &TestEnv,
        ctx: &Path,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Vec<Miss> {
        self.build_in(env, None, ctx, extra, vars)
    }

    /// As `build_with`, run in `cwd` (so that `ctx` may be relative to it).
    fn build_in(
        &self,
        env: &TestEnv,
        cwd: Option<&Path>,
        ctx: &Path,
        extra: &[&str],
        vars: &[(&str, &str)],
    ) -> Vec<Miss> {
        let reg = env.registry();
        std::fs::create_dir_all(&self.out).unwrap();
        let dest = format!("type=oci,dest={}", self.out.join("image.tar").display());
        let mut args = vec!["build", "--insecure-registry", &reg, "--output", &dest];
        args.extend_from_slice(extra);
        let ctx = ctx.to_str().unwrap();

        let mut plain = args.clone();
        plain.extend_from_slice(&["--progress", "plain", ctx]);
        let run =
            ossb_in(env, &self.plain, cwd, &plain, vars).success("ossb build --progress plain");
        let from_plain = plain_misses(&run.stderr);

        let meta = self.out.join("metadata.json");
        let meta_arg = meta.to_str().unwrap().to_string();
        let mut json = args.clone();
        json.extend_from_slice(&["--progress", "json", "--metadata-file", &meta_arg, ctx]);
        let run = ossb_in(env, &self.json, cwd, &json, vars).success("ossb build --progress json");
        let from_json = json_misses(&run.stdout);
        let metadata: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        let from_metadata: Vec<Miss> = metadata["ossb.cache-misses"]
            .as_array()
            .unwrap_or_else(|| panic!("no ossb.cache-misses in {metadata}"))
            .iter()
            .map(|m| {
                (
                    m["step"].as_str().unwrap().to_string(),
                    m["reason"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(from_plain, from_json, "plain and JSON progress differ");
        assert_eq!(
            from_json, from_metadata,
            "JSON progress and metadata differ"
        );
        from_plain
    }
}

/// `#N CACHE MISS: reason` lines, with the name their vertex started with.
fn plain_misses(stderr: &str) -> Vec<Miss> {
    let mut names = std::collections::HashMap::new();
    let mut misses = Vec::new();
    for line in stderr.lines() {
        let Some((id, rest)) = line.strip_prefix('#').and_then(|l| l.split_once(' ')) else {
            continue;
        };
        if let Some(reason) = rest.strip_prefix("CACHE MISS: ") {
            misses.push((
                names.get(id).cloned().unwrap_or_default(),
                reason.to_string(),
            ));
        } else if rest.starts_with('[') {
            names
                .entry(id.to_string())
                .or_insert_with(|| rest.to_string());
        }
    }
    misses
}

/// `cache_miss` events, with the name their vertex started with.
fn json_misses(stdout: &str) -> Vec<Miss> {
    let mut names = std::collections::HashMap::new();
    let mut misses = Vec::new();
    for line in stdout.lines() {
        let event: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("progress line is not JSON ({e}): {line}"));
        match event["event"].as_str() {
            Some("started") => {
                names.insert(
                    event["id"].clone(),
                    event["name"].as_str().unwrap().to_string(),
                );
            }
            Some("cache_miss") => misses.push((
                names.get(&event["id"]).cloned().unwrap_or_default(),
                event["reason"].as_str().unwrap().to_string(),
            )),
            _ => {}
        }
    }
    misses
}

fn reasons(misses: &[Miss]) -> Vec<&str> {
    misses.iter().map(|(_, r)| r.as_str()).collect()
}

/// A context file changed: the COPY names its path, the RUN after it says its parent ran;
/// the first build says there was none; a build with nothing changed misses nothing;
/// --no-cache says so.
#[test]
fn a_changed_context_file_is_named_and_the_step_after_it_blames_its_parent() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM {}\nCOPY src/ /src/\nRUN cat /src/b.txt > /out\n",
        busybox(&env)
    );
    let ctx = context(
        dir.path(),
        &dockerfile,
        &[
            ("src/a.txt", "a\n"),
            ("src/b.txt", "b\n"),
            ("src/c.txt", "c\n"),
        ],
    );
    let twins = Twins::new(dir.path());
    let first = twins.build(&env, &ctx, &[]);
    assert_eq!(
        reasons(&first),
        [
            "no previous build of this step",
            "no previous build of this step"
        ]
    );
    assert!(twins.build(&env, &ctx, &[]).is_empty(), "nothing changed");
    std::fs::write(ctx.join("src/b.txt"), "b, changed\n").unwrap();
    // The context named by a relative path is the same build: its steps have the same
    // positions, so the change is still named.
    let relative = Path::new(ctx.file_name().unwrap());
    let misses = twins.build_in(&env, ctx.parent(), relative, &[], &[]);
    assert_eq!(
        misses,
        [
            (
                "[stage-0 1/2] COPY src/ /src/".to_string(),
                "context file src/b.txt changed".to_string()
            ),
            (
                "[stage-0 2/2] RUN cat /src/b.txt > /out".to_string(),
                "parent step ran".to_string()
            ),
        ]
    );
    std::fs::write(ctx.join("src/new.txt"), "new\n").unwrap();
    let misses = twins.build(&env, &ctx, &[]);
    assert_eq!(
        reasons(&misses),
        ["context file src/new.txt added", "parent step ran"]
    );
    let misses = twins.build(&env, &ctx, &["--no-cache"]);
    assert_eq!(reasons(&misses), ["--no-cache", "--no-cache"]);
}

/// A build arg changed (named, with the ARG's line), a secret was added (its presence, never
/// its value), an instruction was edited.
#[test]
fn a_build_arg_a_secret_and_an_edited_instruction_are_named() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = |cmd: &str| {
        format!(
            "FROM {}\nARG V=1\nRUN {cmd}\nRUN --mount=type=secret,id=tok wc -c /run/secrets/tok > /n 2>&1; true\n",
            busybox(&env)
        )
    };
    let ctx = context(dir.path(), &dockerfile("echo $V > /v"), &[]);
    let twins = Twins::new(dir.path());
    twins.build(&env, &ctx, &["--build-arg", "V=1"]);
    let misses = twins.build(&env, &ctx, &["--build-arg", "V=2"]);
    assert_eq!(
        misses,
        [
            (
                "[stage-0 2/3] RUN echo $V > /v".to_string(),
                "build arg V changed at line 2".to_string()
            ),
            (
                "[stage-0 3/3] RUN wc -c /run/secrets/tok > /n 2>&1; true".to_string(),
                "parent step ran".to_string()
            ),
        ]
    );
    let secret = [("OSSB_E2E_MISS_SECRET", "hunter2-value")];
    let extra = [
        "--build-arg",
        "V=2",
        "--secret",
        "id=tok,env=OSSB_E2E_MISS_SECRET",
    ];
    let misses = twins.build_with(&env, &ctx, &extra, &secret);
    assert_eq!(reasons(&misses), ["secret tok is now present (was absent)"]);
    assert!(!format!("{misses:?}").contains("hunter2"));
    std::fs::write(ctx.join("Dockerfile"), dockerfile("echo $V > /w")).unwrap();
    let misses = twins.build_with(&env, &ctx, &extra, &secret);
    assert_eq!(reasons(&misses), ["instruction changed", "parent step ran"]);
}

/// Another image pushed under the base image's tag: the first step names the base image and
/// both digests.
#[test]
fn a_moved_base_image_tag_is_named_with_its_digests() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let base = format!("{reg}/{}:latest", unique("miss-base"));
    let push_base = |content: &str| {
        let bctx = dir.path().join(format!("base-{content}"));
        std::fs::create_dir_all(&bctx).unwrap();
        std::fs::write(
            bctx.join("Dockerfile"),
            format!("FROM {}\nRUN echo {content} > /base\n", busybox(&env)),
        )
        .unwrap();
        ossb(
            &env,
            &dir.path().join("cache-base"),
            &[
                "build",
                "--progress",
                "plain",
                "--insecure-registry",
                &reg,
                "--push",
                "--tag",
                &base,
                bctx.to_str().unwrap(),
            ],
        )
        .success("pushing a base image");
        // The platform's manifest: the base image's digest in the step key (the tag may
        // name an index with an attestation manifest beside it).
        let raw = inspect_raw(&base).stdout;
        let doc: serde_json::Value = serde_json::from_str(&raw).unwrap();
        match doc["manifests"].as_array() {
            Some(list) => list
                .iter()
                .find(|m| m["platform"]["os"] != "unknown")
                .and_then(|m| m["digest"].as_str())
                .expect("a platform manifest in the index")
                .to_string(),
            None => format!("sha256:{}", crate::sha256_hex(raw.as_bytes())),
        }
    };
    let first = push_base("one");
    let ctx = context(
        dir.path(),
        &format!("FROM {base}\nRUN cat /base > /copy\n"),
        &[],
    );
    let twins = Twins::new(dir.path());
    twins.build(&env, &ctx, &[]);
    let second = push_base("two");
    assert_ne!(first, second);
    let misses = twins.build(&env, &ctx, &[]);
    assert_eq!(
        reasons(&misses),
        [format!("base image {base} changed ({first} -> {second})").as_str()]
    );
}
