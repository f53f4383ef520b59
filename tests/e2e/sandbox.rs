//! End-to-end tests of RUN: the sandbox's isolation, the isolation modes, `RUN --mount`,
//! `--network`, heredoc scripts, other architectures through QEMU, and the size of snapshot
//! layers. Each build goes to an OCI layout whose layers, config and history are inspected.

use std::path::{Path, PathBuf};

use crate::support::*;

/// A build of `dockerfile` (with `files` in its context) to an OCI layout directory.
struct Built {
    run: Run,
    layout: PathBuf,
}

/// Builds into `dir/layout-NAME` with the registry's busybox as `$BASE`; `extra` goes before
/// the context argument.
fn build(env: &TestEnv, dir: &Path, name: &str, ctx: &Path, extra: &[&str]) -> Built {
    let reg = env.registry();
    let layout = dir.join(format!("layout-{name}"));
    let base = format!("BASE={reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let output = format!("type=oci,dest={},tar=false", layout.display());
    let mut args = vec![
        "build",
        "--progress",
        "plain",
        "--insecure-registry",
        &reg,
        "--build-arg",
        &base,
        "--output",
        &output,
    ];
    args.extend_from_slice(extra);
    let ctx = ctx.to_str().unwrap();
    args.push(ctx);
    let run = ossb(env, &dir.join("cache"), &args);
    Built { run, layout }
}

fn dockerfile_context(dir: &Path, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
    let sub = dir.join(format!("ctx-{name}"));
    std::fs::create_dir_all(&sub).unwrap();
    context(&sub, dockerfile, files)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

impl Built {
    fn ok(self, what: &str) -> Built {
        assert_eq!(
            self.run.code, 0,
            "{what} failed with exit code {}\nstdout:\n{}\nstderr:\n{}",
            self.run.code, self.run.stdout, self.run.stderr
        );
        self
    }

    fn manifest(&self) -> serde_json::Value {
        let index = read_json(&self.layout.join("index.json"));
        let digest = index["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let m = read_json(&blob(&self.layout, &digest));
        if m["manifests"].is_array() {
            // An index: the first platform's manifest.
            let d = m["manifests"][0]["digest"].as_str().unwrap().to_string();
            return read_json(&blob(&self.layout, &d));
        }
        m
    }

    /// The image config as text.
    fn config_text(&self) -> String {
        let d = self.manifest()["config"]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::read_to_string(blob(&self.layout, &d)).unwrap()
    }

    /// The layer blobs, base layers first.
    fn layers(&self) -> Vec<PathBuf> {
        self.manifest()["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| blob(&self.layout, l["digest"].as_str().unwrap()))
            .collect()
    }

    /// `tar -tv --numeric-owner` of the last layer: one line per entry.
    fn last_layer_listing(&self) -> Vec<String> {
        let layers = self.layers();
        listing(layers.last().unwrap())
    }

    /// The content of `path` in the last layer.
    fn last_layer_file(&self, path: &str) -> String {
        let layers = self.layers();
        tool(
            "tar",
            &["-xzOf", layers.last().unwrap().to_str().unwrap(), path],
        )
        .success("tar -xO")
        .stdout
    }
}

fn listing(layer: &Path) -> Vec<String> {
    tool(
        "tar",
        &["-tvzf", layer.to_str().unwrap(), "--numeric-owner"],
    )
    .success("tar -tv")
    .stdout
    .lines()
    .map(str::to_string)
    .collect()
}

/// Whether `needle` occurs in any (decompressed) layer of the build.
fn in_any_layer(built: &Built, needle: &str) -> bool {
    built.layers().iter().any(|l| {
        let out = std::process::Command::new("gzip")
            .args(["-dc", l.to_str().unwrap()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains(needle)
    })
}

/// A step is pid 1 of its own pid namespace, sees none of the host's processes, and what it
/// leaves running in the background is killed when it ends; chown to uid 1000 is recorded in
/// the layer.
#[test]
fn run_is_pid_1_and_its_background_processes_die_with_it() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    // The host pid of this test is surely not visible; sleep 300 in the background must not
    // survive the step (the next step checks the marker it would write).
    let dockerfile = "ARG BASE\nFROM $BASE\n\
        RUN echo \"pid=$$\" && test \"$$\" = 1 && ls /proc | grep -E '^[0-9]+$' | wc -l > /nprocs && \
            hostname > /hostname\n\
        RUN (sleep 2; echo survived > /tmp/bg) & echo started\n\
        RUN sleep 3; test ! -e /tmp/bg && echo no-survivor\n\
        RUN mkdir /owned && touch /owned/f && chown -R 1000:1000 /owned\n";
    let ctx = dockerfile_context(dir.path(), "pid", dockerfile, &[]);
    let built = build(&env, dir.path(), "pid", &ctx, &[]).ok("pid namespace build");
    assert!(built.run.stderr.contains("pid=1"), "{}", built.run.stderr);
    assert!(
        built.run.stderr.contains("no-survivor"),
        "a background process outlived its step:\n{}",
        built.run.stderr
    );
    let layers = built.layers();
    // base, RUN 1, RUN 2 (nothing left: /tmp/bg never written; maybe empty), RUN 3, RUN 4.
    let first_run = layers
        .iter()
        .map(|l| listing(l))
        .find(|entries| entries.iter().any(|e| e.ends_with("nprocs")))
        .expect("a layer with /nprocs");
    assert!(!first_run.is_empty());
    let owned = built.last_layer_listing();
    assert!(
        owned
            .iter()
            .any(|l| l.contains("1000/1000") && l.ends_with("owned/f")),
        "chown to 1000 is not in the layer:\n{owned:#?}"
    );
    // At most the shell, ls, grep and wc: the host's processes are not visible.
    let nprocs_layer = layers
        .iter()
        .find(|l| listing(l).iter().any(|e| e.ends_with("nprocs")))
        .unwrap();
    let n: usize = tool("tar", &["-xzOf", nprocs_layer.to_str().unwrap(), "nprocs"])
        .success("tar")
        .stdout
        .trim()
        .parse()
        .unwrap();
    assert!(n <= 5, "the step saw {n} processes");
    let hostname = tool(
        "tar",
        &["-xzOf", nprocs_layer.to_str().unwrap(), "hostname"],
    )
    .success("tar")
    .stdout;
    assert_eq!(hostname.trim(), "ossb");
}
