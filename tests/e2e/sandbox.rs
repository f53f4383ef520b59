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
    build_with(env, dir, name, ctx, extra, &[])
}

/// As [`build`], with extra environment variables.
fn build_with(
    env: &TestEnv,
    dir: &Path,
    name: &str,
    ctx: &Path,
    extra: &[&str],
    extra_env: &[(&str, &str)],
) -> Built {
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
    let run = ossb_with(env, &dir.join("cache"), &args, extra_env);
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
    /// Asserts that the build exited with `code` and that its stderr says `want`.
    fn fails_with(&self, code: i32, want: &str) {
        assert_eq!(self.run.code, code, "{}", self.run.stderr);
        assert!(
            self.run.stderr.contains(want),
            "{want:?} missing:\n{}",
            self.run.stderr
        );
    }

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
        assert!(
            out.status.success(),
            "gzip -dc {}: {}",
            l.display(),
            String::from_utf8_lossy(&out.stderr)
        );
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

/// A step starts with every signal at its default and none blocked, as under Docker: with
/// SIGPIPE ignored (as ossb's own process has it), `yes | head` never ended.
#[test]
fn a_step_starts_with_default_signals() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\n\
        RUN grep -E '^Sig(Ign|Blk)' /proc/self/status | sed 's/^/signals-/' && \
            timeout 20 sh -c 'yes | head -c 1000000 >/dev/null' && echo yes-ended\n";
    let ctx = dockerfile_context(dir.path(), "signals", dockerfile, &[]);
    let built = build(&env, dir.path(), "signals", &ctx, &[]).ok("the signals build");
    let log = &built.run.stderr;
    for line in [
        "signals-SigBlk:\t0000000000000000",
        "signals-SigIgn:\t0000000000000000",
    ] {
        assert!(log.contains(line), "no {line:?} in:\n{log}");
    }
    assert!(log.contains("yes-ended"), "{log}");
}

const SECRET: &str = "s3cr3t-value-42";

/// A secret is readable in the step (as a file, with its uid and mode, and as a variable) and
/// is in no layer, not in the config or history, and not in ossb's output.
#[test]
fn secrets_are_readable_in_the_step_and_nowhere_else() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("token.txt");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\n\
         RUN --mount=type=secret,id=tok test \"$(cut -c1-6 /run/secrets/tok)\" = s3cr3t && echo file-ok\n\
         RUN --mount=type=secret,id=tok,env=TOKEN test \"${TOKEN%%-42*}\" = s3cr3t-value && echo env-ok\n\
         RUN --mount=type=secret,id=tok,target=/root/tok,uid=1000,mode=0440 echo \"owner $(stat -c '%u %a' /root/tok)\" && cat /root/tok\n\
         RUN --mount=type=secret,id=absent echo optional-absent-ok\n\
         RUN test ! -e /run/secrets && test ! -e /root/tok && echo gone > /gone\n";
    let ctx = dockerfile_context(dir.path(), "secret", dockerfile, &[]);
    let spec = format!("id=tok,src={}", secret.display());
    let built = build(&env, dir.path(), "secret", &ctx, &["--secret", &spec]).ok("secret build");
    let out = format!("{}{}", built.run.stdout, built.run.stderr);
    for want in [
        "file-ok",
        "env-ok",
        "owner 1000 440",
        "optional-absent-ok",
        "****",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(
        !out.contains(SECRET),
        "the secret is in ossb's output:\n{out}"
    );
    assert!(!in_any_layer(&built, SECRET), "the secret is in a layer");
    assert!(
        !built.config_text().contains(SECRET),
        "the secret is in the config"
    );
    for layer in built.layers() {
        for entry in listing(&layer) {
            assert!(
                !entry.contains("run/secrets") && !entry.contains("root/tok"),
                "a secret mount point is in a layer: {entry}"
            );
        }
    }

    // From the environment, in buildx's two forms (env=VAR, and id=VAR alone): the value goes
    // through a private file on XDG_RUNTIME_DIR that is gone when the build ends.
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).unwrap();
    let ctx = dockerfile_context(
        dir.path(),
        "env-secret",
        "ARG BASE\nFROM $BASE\n\
         RUN --mount=type=secret,id=tok,env=T test \"${T%%-42*}\" = s3cr3t-value && echo env-form-ok\n\
         RUN --mount=type=secret,id=OSSB_E2E_SECRET test \"$(cut -c1-6 /run/secrets/OSSB_E2E_SECRET)\" = s3cr3t && echo id-form-ok\n",
        &[],
    );
    let from_env = build_with(
        &env,
        dir.path(),
        "env-secret",
        &ctx,
        &[
            "--secret",
            "id=tok,env=OSSB_E2E_SECRET",
            "--secret",
            "id=OSSB_E2E_SECRET",
        ],
        &[
            ("OSSB_E2E_SECRET", SECRET),
            ("XDG_RUNTIME_DIR", runtime.to_str().unwrap()),
        ],
    )
    .ok("secrets from the environment");
    let out = format!("{}{}", from_env.run.stdout, from_env.run.stderr);
    for want in ["env-form-ok", "id-form-ok"] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(
        !out.contains(SECRET),
        "the secret is in ossb's output:\n{out}"
    );
    assert!(!in_any_layer(&from_env, SECRET), "the secret is in a layer");
    assert!(!from_env.config_text().contains(SECRET));
    let left: Vec<_> = std::fs::read_dir(&runtime).unwrap().collect();
    assert!(
        left.is_empty(),
        "the secret's file was left behind: {left:?}"
    );
    // An unset variable is refused before the build, naming it.
    let unset = build(
        &env,
        dir.path(),
        "unset-secret",
        &ctx,
        &["--secret", "id=tok,env=OSSB_E2E_NOT_SET"],
    );
    unset.fails_with(2, "OSSB_E2E_NOT_SET is not set");

    // required: a missing secret fails the build and says how to pass it.
    let ctx = dockerfile_context(
        dir.path(),
        "required",
        "ARG BASE\nFROM $BASE\nRUN --mount=type=secret,id=nope,required true\n",
        &[],
    );
    let failed = build(&env, dir.path(), "required", &ctx, &[]);
    failed.fails_with(1, "--secret id=nope");
}

/// A real `ssh-agent`, killed when dropped.
struct Agent {
    child: std::process::Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `ssh-agent` on `dir/agent.sock` holding a new ed25519 key whose comment is `comment`.
fn ssh_agent(dir: &Path, comment: &str) -> Agent {
    let socket = dir.join("agent.sock");
    let child = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&socket)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent (openssh-client, installed by scripts/testenv.sh)");
    let agent = Agent { child, socket };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "ssh-agent never made its socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let key = dir.join("key");
    let key_arg = key.to_str().unwrap();
    tool(
        "ssh-keygen",
        &[
            "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", key_arg,
        ],
    )
    .success("ssh-keygen");
    let added = std::process::Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &agent.socket)
        .output()
        .unwrap();
    assert!(added.status.success(), "ssh-add: {added:?}");
    agent
}

/// `RUN --mount=type=ssh` forwards a real agent: the host's own `ssh-add -l` (with its
/// libraries, from the context) lists the agent's key through the step's socket, which has the
/// mount's owner and mode; SSH_AUTH_SOCK names the first one; an optional agent not given is
/// absent, a required one fails with the flag to pass; nothing of it reaches a layer.
#[test]
fn ssh_mounts_forward_a_real_agent() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let agent = ssh_agent(dir.path(), "ossb-e2e-key");
    let ctx = dockerfile_context(
        dir.path(),
        "ssh",
        "ARG BASE\nFROM $BASE\n\
         RUN --mount=type=ssh --mount=type=bind,source=tools,target=/tools /tools/ld.so --library-path /tools /tools/ssh-add -l && echo \"sock=$SSH_AUTH_SOCK $(stat -c '%u %a' $SSH_AUTH_SOCK)\"\n\
         RUN --mount=type=ssh,id=other,target=/home/agent,uid=1000,mode=0660 echo \"other $(stat -c '%u %a' /home/agent)\"\n\
         RUN --mount=type=ssh,id=absent echo optional-absent-ok\n\
         RUN test ! -e /run/buildkit && test ! -e /home/agent && echo gone > /gone\n",
        &[],
    );
    // The host's ssh-add, its libraries and its loader: a client that runs on any base.
    let tools = ctx.join("tools");
    std::fs::create_dir(&tools).unwrap();
    std::fs::copy("/usr/bin/ssh-add", tools.join("ssh-add")).unwrap();
    let ldd = tool("ldd", &["/usr/bin/ssh-add"]).success("ldd ssh-add");
    for lib in ldd.stdout.split_whitespace().filter(|w| w.starts_with('/')) {
        let name = Path::new(lib).file_name().unwrap().to_str().unwrap();
        let name = if name.starts_with("ld-linux") {
            "ld.so"
        } else {
            name
        };
        std::fs::copy(lib, tools.join(name)).unwrap();
    }
    let other = format!("other={}", agent.socket.display());
    let built = build_with(
        &env,
        dir.path(),
        "ssh",
        &ctx,
        &["--ssh", "default", "--ssh", &other],
        &[("SSH_AUTH_SOCK", agent.socket.to_str().unwrap())],
    )
    .ok("ssh build");
    let out = &built.run.stderr;
    for want in [
        "ossb-e2e-key (ED25519)",
        "sock=/run/buildkit/ssh_agent.0 0 600",
        "other 1000 660",
        "optional-absent-ok",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    for layer in built.layers() {
        for entry in listing(&layer) {
            assert!(
                !entry.contains("run/buildkit") && !entry.contains("home/agent"),
                "an ssh mount point is in a layer: {entry}"
            );
        }
    }

    let ctx = dockerfile_context(
        dir.path(),
        "ssh-required",
        "ARG BASE\nFROM $BASE\nRUN --mount=type=ssh,required true\n",
        &[],
    );
    let failed = build(&env, dir.path(), "ssh-required", &ctx, &[]);
    failed.fails_with(1, "pass --ssh default");
    let key = dir.path().join("key");
    let not_a_socket = build(
        &env,
        dir.path(),
        "ssh-key-file",
        &ctx,
        &["--ssh", &format!("default={}", key.display())],
    );
    not_a_socket.fails_with(2, "not an agent socket");
    // A cluster's workers cannot reach this machine's agent: refused before connecting.
    let submit = std::process::Command::new(env!("CARGO_BIN_EXE_ossb-submit"))
        .args(["--coordinator", "127.0.0.1:9", "--tls-dir", "/nonexistent"])
        .args(["--ssh", "default", ctx.to_str().unwrap()])
        .env("SSH_AUTH_SOCK", &agent.socket)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&submit.stderr);
    assert_eq!(submit.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--ssh is not supported by a build cluster"),
        "{stderr}"
    );
}

/// A cache mount keeps its content from one build to the next, and never reaches a layer.
#[test]
fn cache_mounts_persist_between_builds() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\n\
        RUN --mount=type=cache,target=/var/cache/thing,uid=1000,mode=0750 echo run >> /var/cache/thing/log && echo \"runs=$(wc -l < /var/cache/thing/log) owner=$(stat -c '%u %a' /var/cache/thing)\"\n";
    let ctx = dockerfile_context(dir.path(), "cache", dockerfile, &[]);
    let first = build(&env, dir.path(), "c1", &ctx, &[]).ok("first cache build");
    assert!(
        first.run.stderr.contains("runs=1 owner=1000 750"),
        "{}",
        first.run.stderr
    );
    let second = build(&env, dir.path(), "c2", &ctx, &["--no-cache"]).ok("second cache build");
    assert!(
        second.run.stderr.contains("runs=2"),
        "{}",
        second.run.stderr
    );
    for entry in second.last_layer_listing() {
        assert!(
            !entry.contains("var/cache/thing"),
            "cache mount in the layer: {entry}"
        );
    }
}

/// Two builds at once with `sharing=locked` on the same cache: one step waits for the other.
#[test]
fn locked_cache_mounts_serialize_concurrent_builds() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\nARG WHO\n\
        RUN --mount=type=cache,target=/c,id=serial,sharing=locked echo start-$WHO >> /c/log && sleep 2 && echo end-$WHO >> /c/log\n";
    let ctx = dockerfile_context(dir.path(), "locked", dockerfile, &[]);
    let threads: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|who| {
            let (ctx, d) = (ctx.clone(), dir.path().to_path_buf());
            let env = TestEnv::get().unwrap();
            std::thread::spawn(move || {
                let arg = format!("WHO={who}");
                build(&env, &d, who, &ctx, &["--no-cache", "--build-arg", &arg]).ok("locked build")
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ctx = dockerfile_context(
        dir.path(),
        "show",
        "ARG BASE\nFROM $BASE\nRUN --mount=type=cache,target=/c,id=serial,sharing=locked tr '\\n' ' ' < /c/log\n",
        &[],
    );
    let shown = build(&env, dir.path(), "show", &ctx, &[]).ok("reading the cache");
    let serial = ["start-a end-a start-b end-b", "start-b end-b start-a end-a"];
    assert!(
        serial.iter().any(|s| shown.run.stderr.contains(s)),
        "the two steps overlapped:\n{}",
        shown.run.stderr
    );
}

/// tmpfs and bind mounts (the context, a stage, read-only by default, rw as a discarded copy)
/// work, and none of their targets reaches the layer.
#[test]
fn tmpfs_and_bind_mounts_leave_no_trace() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE AS src\nRUN echo from-stage > /made\n\
        FROM $BASE\n\
        RUN --mount=type=tmpfs,target=/scratch,size=1m touch /scratch/x && grep -q ' /scratch tmpfs' /proc/mounts && echo tmpfs-ok\n\
        RUN --mount=type=bind,source=data.txt,target=/data.txt cat /data.txt\n\
        RUN --mount=type=bind,from=src,target=/s cat /s/made\n\
        RUN --mount=type=bind,target=/ctx sh -c '! touch /ctx/ro 2>/dev/null && echo ro-ok'\n\
        RUN --mount=type=bind,target=/ctx,rw echo new > /ctx/new && cat /ctx/new && echo rw-ok\n\
        RUN touch /after\n";
    let ctx = dockerfile_context(
        dir.path(),
        "binds",
        dockerfile,
        &[("data.txt", "from-context\n")],
    );
    let built = build(&env, dir.path(), "binds", &ctx, &[]).ok("mounts build");
    for want in ["tmpfs-ok", "from-context", "from-stage", "ro-ok", "rw-ok"] {
        assert!(
            built.run.stderr.contains(want),
            "{want}:\n{}",
            built.run.stderr
        );
    }
    assert!(
        !ctx.join("new").exists() && !ctx.join("ro").exists(),
        "the context was written"
    );
    // Every layer the steps made (the base's own are left out, by digest).
    let base_ctx = dockerfile_context(dir.path(), "base", "ARG BASE\nFROM $BASE\n", &[]);
    let base = build(&env, dir.path(), "base", &base_ctx, &[]).ok("the base alone");
    let base_layers: Vec<String> = base
        .layers()
        .iter()
        .map(|l| l.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let made: Vec<Vec<String>> = built
        .layers()
        .iter()
        .filter(|l| !base_layers.contains(&l.file_name().unwrap().to_string_lossy().into_owned()))
        .map(|l| listing(l))
        .collect();
    assert!(
        made.iter().flatten().any(|e| e.ends_with(" after")),
        "no layer of the steps was checked: {made:#?}"
    );
    for entry in made.iter().flatten() {
        for t in [" scratch", " data.txt", " s/", " s ", " ctx"] {
            assert!(!entry.contains(t), "mount target {t} in a layer: {entry}");
        }
    }
}

/// `--network=none` has only a loopback interface, up, and the build's `--network none` is
/// the default of the steps that name none (part of their cache key, as in BuildKit);
/// `--security=insecure` is refused.
#[test]
fn network_none_and_insecure_security() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\n\
        RUN --network=none echo \"ifaces=$(grep -c : /proc/net/dev) lo=$(cat /sys/class/net/lo/operstate 2>/dev/null || ip link show lo | grep -c UP)\"\n";
    let ctx = dockerfile_context(dir.path(), "net", dockerfile, &[]);
    let built = build(&env, dir.path(), "net", &ctx, &[]).ok("network none");
    assert!(
        built.run.stderr.contains("ifaces=1"),
        "{}",
        built.run.stderr
    );

    let ctx = dockerfile_context(
        dir.path(),
        "build-net",
        "ARG BASE\nFROM $BASE\nRUN echo \"plain-ifaces=$(grep -c : /proc/net/dev)\"\n",
        &[],
    );
    let none = build(
        &env,
        dir.path(),
        "build-net",
        &ctx,
        &["--network", "none", "--pull"],
    )
    .ok("--network none");
    assert!(
        none.run.stderr.contains("plain-ifaces=1"),
        "{}",
        none.run.stderr
    );
    let default = build(&env, dir.path(), "build-net-default", &ctx, &[]).ok("default network");
    assert!(
        default.run.stderr.contains("plain-ifaces=") && !default.run.stderr.contains("CACHED"),
        "the step without network was reused with it:\n{}",
        default.run.stderr
    );
    // --add-host: lines of every RUN's /etc/hosts, part of the step's key.
    let hosts = dockerfile_context(
        dir.path(),
        "add-host",
        "ARG BASE\nFROM $BASE\nRUN grep internal /etc/hosts\n",
        &[],
    );
    let added = build(
        &env,
        dir.path(),
        "add-host",
        &hosts,
        &[
            "--add-host",
            "registry.internal:10.1.2.3",
            "--add-host",
            "v6.internal=fd00::1",
        ],
    )
    .ok("--add-host");
    for want in ["10.1.2.3\tregistry.internal", "fd00::1\tv6.internal"] {
        assert!(
            added.run.stderr.contains(want),
            "{want:?}:\n{}",
            added.run.stderr
        );
    }
    let moved = build(
        &env,
        dir.path(),
        "add-host-moved",
        &hosts,
        &["--add-host", "registry.internal:10.9.9.9"],
    )
    .ok("--add-host again");
    assert!(
        moved.run.stderr.contains("10.9.9.9\tregistry.internal"),
        "the step was reused with the other hosts:\n{}",
        moved.run.stderr
    );
    let gateway = build(
        &env,
        dir.path(),
        "gw",
        &hosts,
        &["--add-host", "h:host-gateway"],
    );
    gateway.fails_with(2, "host-gateway");
    let bogus = build(
        &env,
        dir.path(),
        "bogus-net",
        &ctx,
        &["--network", "bridge"],
    );
    bogus.fails_with(2, "unsupported network mode \"bridge\"");

    let ctx = dockerfile_context(
        dir.path(),
        "insecure",
        "ARG BASE\nFROM $BASE\nRUN --security=insecure true\n",
        &[],
    );
    let refused = build(&env, dir.path(), "insecure", &ctx, &[]);
    refused.fails_with(1, "--security=insecure is not allowed");
}

/// A RUN heredoc with a `#!` line runs as a script from the sandbox's /dev.
#[test]
fn heredoc_scripts_run_from_dev_pipes() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "# syntax=docker/dockerfile:1\nARG BASE\nFROM $BASE\n\
        RUN <<EOF\n#!/bin/sh\necho \"script $0 ran\" > /script-out\ncat /script-out\nEOF\n";
    let ctx = dockerfile_context(dir.path(), "heredoc", dockerfile, &[]);
    let built = build(&env, dir.path(), "heredoc", &ctx, &[]).ok("heredoc build");
    assert!(
        built.run.stderr.contains("script /dev/pipes/EOF ran"),
        "{}",
        built.run.stderr
    );
    assert_eq!(
        built.last_layer_file("script-out"),
        "script /dev/pipes/EOF ran\n"
    );
    assert!(!built
        .last_layer_listing()
        .iter()
        .any(|e| e.contains("dev/")));
}

/// Runs `ossb build` of examples/hello behind `wrapper` (e.g. `setpriv ...`), with a fixed
/// SOURCE_DATE_EPOCH; returns the result and the image digest (empty on failure).
fn build_example(
    env: &TestEnv,
    dir: &Path,
    name: &str,
    wrapper: &[&str],
    extra: &[&str],
) -> (Run, String) {
    let reg = env.registry();
    let meta = dir.join(format!("meta-{name}.json"));
    let base = format!("BASE={reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let out = format!(
        "type=oci,dest={}",
        dir.join(format!("{name}.tar")).display()
    );
    let example = workspace().join("examples/hello");
    let mut cmd = std::process::Command::new(
        wrapper
            .first()
            .copied()
            .unwrap_or(env!("CARGO_BIN_EXE_ossb")),
    );
    if !wrapper.is_empty() {
        cmd.args(&wrapper[1..]).arg(env!("CARGO_BIN_EXE_ossb"));
    }
    cmd.args([
        "build",
        "--progress",
        "plain",
        "--insecure-registry",
        &reg,
        "--build-arg",
        &base,
    ])
    .args(["--metadata-file", meta.to_str().unwrap(), "--output", &out])
    .args(extra)
    .arg(example.to_str().unwrap())
    .env("OSSB_CACHE_DIR", dir.join(format!("cache-{name}")))
    .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
    .env("SOURCE_DATE_EPOCH", "1700000000");
    let out = cmd.output().unwrap();
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    let digest = std::fs::read(&meta)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|m| m["containerimage.digest"].as_str().map(str::to_string))
        .unwrap_or_default();
    if run.code == 0 {
        assert!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "{name}: no image digest in {}: {digest:?}",
            meta.display()
        );
    }
    (run, digest)
}

/// rootless, chroot (with the namespaces root may create, and as a plain chroot in a container
/// without CAP_SYS_ADMIN) and auto all build the example, to the same image; auto says it
/// picked rootless.
#[test]
fn every_isolation_mode_builds_the_example_to_the_same_image() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut digests = Vec::new();
    for (name, wrapper, isolation) in [
        ("rootless", &[][..], "rootless"),
        ("chroot", &[][..], "chroot"),
        (
            "plain-chroot",
            &["setpriv", "--bounding-set", "-sys_admin"][..],
            "chroot",
        ),
        ("auto", &[][..], "auto"),
    ] {
        let (run, digest) =
            build_example(&env, dir.path(), name, wrapper, &["--isolation", isolation]);
        let run = run.success(name);
        // auto picks rootless where user namespaces work, as here.
        let ran = if isolation == "chroot" {
            "isolation: chroot (as root"
        } else {
            "isolation: rootless ("
        };
        assert!(
            run.stderr.contains(ran),
            "{name} did not say {ran:?}:\n{}",
            run.stderr
        );
        digests.push((name, digest));
    }
    assert!(
        digests.iter().all(|(_, d)| *d == digests[0].1),
        "isolation modes built different images: {digests:?}"
    );
}

/// Where user namespaces are refused (here: inside a chroot, where the kernel refuses
/// CLONE_NEWUSER), auto falls back to chroot and says so, and rootless fails with the fixes.
#[test]
fn auto_falls_back_to_chroot_where_user_namespaces_are_refused() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    std::fs::create_dir(&root).unwrap();
    // A new mount namespace in which the host's / is bound at `root`, then chroot into it:
    // the same files, but the process's root is no longer its mount namespace's root.
    let script = format!(
        "mount --rbind / {0} && exec chroot {0} \"$@\"",
        root.display()
    );
    let wrapper = ["unshare", "-m", "sh", "-c", &script, "sh"];
    let (run, digest) = build_example(&env, dir.path(), "auto", &wrapper, &[]);
    let run = run.success("auto where user namespaces are refused");
    assert!(
        run.stderr
            .contains("isolation: chroot (auto; user namespaces are refused"),
        "{}",
        run.stderr
    );
    assert!(!digest.is_empty());

    let (run, _) = build_example(
        &env,
        dir.path(),
        "rootless",
        &wrapper,
        &["--isolation", "rootless"],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot create a user namespace"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--isolation chroot"), "{}", run.stderr);
}

/// One Dockerfile built for amd64 and arm64: each platform's RUN reports its own machine
/// (arm64 through the QEMU binfmt handler the test environment registers).
#[test]
fn arm64_and_amd64_steps_report_their_own_machine() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\nRUN echo \"machine=$(uname -m)\" | tee /machine\n";
    let ctx = dockerfile_context(dir.path(), "arch", dockerfile, &[]);
    for (platform, machine) in [("linux/arm64", "aarch64"), ("linux/amd64", "x86_64")] {
        let built = build(
            &env,
            dir.path(),
            &platform.replace('/', "-"),
            &ctx,
            &["--platform", platform],
        )
        .ok(platform);
        assert!(
            built.run.stderr.contains(&format!("machine={machine}")),
            "{platform}:\n{}",
            built.run.stderr
        );
        assert_eq!(
            built.last_layer_file("machine"),
            format!("machine={machine}\n")
        );
    }
}

/// A platform whose RUN steps cannot run here is refused before any step of any platform
/// runs, with exit code 1 and what to do.
#[test]
fn a_platform_that_cannot_run_is_refused_before_any_step() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "FROM scratch\nCOPY marker /marker\nRUN [\"/marker\"]\n";
    let ctx = dockerfile_context(dir.path(), "mips", dockerfile, &[("marker", "m")]);
    let built = build(
        &env,
        dir.path(),
        "mips",
        &ctx,
        &["--platform", "linux/amd64,linux/mips64le"],
    );
    built.fails_with(1, "linux/mips64le");
    assert!(
        !built.run.stderr.contains("COPY marker"),
        "no step may start:\n{}",
        built.run.stderr
    );
    assert!(!built.layout.exists(), "nothing is written");
}

/// A step that creates 100 000 files, then one that changes one of them: the second layer
/// holds that one file.
#[test]
fn a_step_after_a_huge_one_records_only_its_own_change() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\n\
        RUN mkdir /many && cd /many && seq 1 100000 | xargs touch\n\
        RUN echo changed > /many/50000\n";
    let ctx = dockerfile_context(dir.path(), "many", dockerfile, &[]);
    let built = build(&env, dir.path(), "many", &ctx, &[]).ok("100k files");
    let layers = built.layers();
    let big = listing(&layers[layers.len() - 2]);
    assert!(
        big.len() > 100_000,
        "the first step's layer has {} entries",
        big.len()
    );
    let last = built.last_layer_listing();
    let files: Vec<_> = last.iter().filter(|e| !e.starts_with('d')).collect();
    assert_eq!(files.len(), 1, "{last:#?}");
    assert!(files[0].ends_with("many/50000"), "{last:#?}");
    assert!(
        last.len() <= 2,
        "more than the file and its directory: {last:#?}"
    );
}

/// The same Dockerfile built with overlayfs snapshots (RUN) and recorded writes (COPY,
/// WORKDIR), and again with `OSSB_SNAPSHOT=metadata` (every step compares metadata snapshots
/// of the whole rootfs), gives the same image, byte for byte. The RUN creates, modifies,
/// chmods, chowns, deletes a file and a directory, replaces a directory by a file, hardlinks,
/// symlinks, renames and recreates a directory.
#[test]
fn overlay_and_metadata_snapshots_build_the_same_image() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = "ARG BASE\nFROM $BASE\n\
        COPY a.txt /app/\n\
        COPY tree /app/\n\
        WORKDIR /work/here\n\
        RUN set -e; echo new > /new; mkdir -p /nd/x; echo f > /nd/x/f; \
            echo more >> /etc/passwd; chmod 600 /etc/group; chown 1000:1000 /app/a.txt; \
            rm /app/gone; rm -rf /app/sub; rm -rf /app/repl; echo now-a-file > /app/repl; \
            ln /app/a.txt /app/hl; ln -s /new /sym; mv /app/ren /app/renamed; \
            rm -rf /app/opq; mkdir /app/opq; echo n > /app/opq/n; touch here.txt\n\
        RUN echo second > /app/keep\n\
        COPY a.txt /app/opq/\n";
    let ctx = dockerfile_context(
        dir.path(),
        "same",
        dockerfile,
        &[
            ("a.txt", "a\n"),
            ("tree/gone", "g\n"),
            ("tree/keep", "k\n"),
            ("tree/ren", "r\n"),
            ("tree/sub/x", "x\n"),
            ("tree/repl/y", "y\n"),
            ("tree/opq/old", "o\n"),
        ],
    );
    let reg = env.registry();
    let base = format!("BASE={reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let build = |name: &str, extra: &[(&str, &str)]| {
        let meta = dir.path().join(format!("meta-{name}.json"));
        let layout = dir.path().join(format!("layout-{name}"));
        let output = format!("type=oci,dest={},tar=false", layout.display());
        let mut vars = vec![
            ("SOURCE_DATE_EPOCH", "1700000000"),
            ("OSSB_LOG", "ossb_engine=debug"),
        ];
        vars.extend_from_slice(extra);
        let run = ossb_with(
            &env,
            &dir.path().join(format!("cache-{name}")),
            &[
                "build",
                "--progress",
                "plain",
                "--insecure-registry",
                &reg,
                "--build-arg",
                &base,
                "--metadata-file",
                meta.to_str().unwrap(),
                "--output",
                &output,
                ctx.to_str().unwrap(),
            ],
            &vars,
        )
        .success(name);
        let meta = read_json(&meta);
        let digest = meta["containerimage.digest"].as_str().unwrap().to_string();
        (digest, Built { run, layout })
    };
    let (overlay, built) = build("overlay", &[]);
    let log = &built.run.stderr;
    if !log.contains("source=Overlay overlay=true") {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "RUN did not use overlayfs:\n{log}"
        );
        eprintln!("skipped: overlayfs is not usable here");
        return;
    }
    assert!(log.contains("source=Recorded"), "{log}");
    let (metadata, fallback) = build("metadata", &[("OSSB_SNAPSHOT", "metadata")]);
    let log = &fallback.run.stderr;
    assert!(
        log.contains("source=Snapshots") && !log.contains("source=Overlay"),
        "{log}"
    );
    assert_eq!(overlay, metadata, "the two ways give different images");
    let layers = built.layers();
    let run = listing(&layers[layers.len() - 3]);
    for entry in [
        "app/.wh.gone",
        "app/.wh.sub",
        "app/opq/.wh.old",
        "app/renamed",
        "sym",
    ] {
        assert!(
            run.iter()
                .any(|l| l.ends_with(entry) || l.contains(&format!("{entry} "))),
            "{entry} missing from the RUN layer:\n{run:#?}"
        );
    }
}

/// The rootless sandbox adapted to a Pod Security "baseline" pod keeps every RUN feature: ossb
/// (this test's binary, on the Debian image) runs in podman as such a pod runs it (a user
/// namespace of 65536 ids of its own, only SETUID, SETGID and SETFCAP, the seccomp profile of
/// deploy/security-profiles, /proc masked, no-new-privileges, a read-only root). Its steps get
/// the pod's /proc read-only in the build's pid namespace and a user namespace of their own,
/// and still have secrets (with their owner), cache, tmpfs and bind mounts, heredocs,
/// `--network=none` (loopback only), another USER, chown, and a background process killed when
/// the step ends; the log says once how the sandbox adapted. `--isolation rootless` fails there.
#[test]
fn the_sandbox_adapted_to_a_baseline_pod_keeps_every_run_feature() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let dockerfile = format!(
        "# syntax=docker/dockerfile:1\n\
         FROM {reg}/{}\n\
         RUN useradd --uid 1234 --create-home app && mkdir /owned && chown app:app /owned\n\
         RUN --mount=type=secret,id=tok,uid=1234,mode=0400 echo \"secret $(stat -c '%u %a' /run/secrets/tok) $(cut -c1-6 /run/secrets/tok)\"\n\
         RUN --mount=type=cache,target=/var/cache/t echo cached > /var/cache/t/f && echo \"cache $(cat /var/cache/t/f)\"\n\
         RUN --mount=type=tmpfs,target=/scratch touch /scratch/x && echo \"tmpfs $(stat -f -c %T /scratch)\"\n\
         RUN --mount=type=bind,source=note.txt,target=/note.txt echo \"bind $(cat /note.txt)\"\n\
         RUN --network=none echo \"network $(grep -c : /proc/net/dev)\"\n\
         RUN <<EOT\n\
         echo \"heredoc $(echo ok)\"\n\
         EOT\n\
         RUN (sleep 300; echo survived > /tmp/bg) & echo background-started\n\
         RUN test ! -e /tmp/bg && echo \"proc $(test -w /proc/self/comm && echo writable || echo read-only)\"\n\
         USER app\n\
         RUN echo \"user $(id -u) $(stat -c %u /owned)\"\n",
        env.var("OSSB_TEST_DEBIAN")
    );
    let ctx = dockerfile_context(
        dir.path(),
        "baseline",
        &dockerfile,
        &[("note.txt", "from-the-context"), ("token.txt", SECRET)],
    );
    // The pod's emptyDir for ossb's cache is owned by its root, as the kubelet's idmapped mounts
    // show it: 3_000_000 on the host is root in the pod's user namespace.
    let seccomp = workspace().join("deploy/security-profiles/ossb-rootless.json");
    let run = |isolation: &str| {
        // A cache of its own: with the steps cached, no RUN would run.
        let cache = dir.path().join(format!("pod-cache-{isolation}"));
        std::fs::create_dir(&cache).unwrap();
        std::os::unix::fs::chown(&cache, Some(3_000_000), Some(3_000_000)).unwrap();
        let started = std::time::Instant::now();
        let out = std::process::Command::new("podman")
            .args([
                "run",
                "--rm",
                "--quiet",
                "--runtime",
                "runc",
                "--tls-verify=false",
            ])
            .args([
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=32768:32768",
            ])
            .args(["--network", "host", "--user", "0:0"])
            .args(["--uidmap", "0:3000000:65536", "--gidmap", "0:3000000:65536"])
            .args(["--cap-drop", "all", "--cap-add", "SETUID,SETGID,SETFCAP"])
            .arg("--security-opt")
            .arg(format!("seccomp={}", seccomp.display()))
            .args(["--security-opt", "no-new-privileges"])
            .args(["--read-only", "--read-only-tmpfs=false"])
            .arg("--volume")
            .arg(format!(
                "{}:/usr/local/bin/ossb:ro",
                env!("CARGO_BIN_EXE_ossb")
            ))
            .arg("--volume")
            .arg(format!("{}:/ctx:ro", ctx.display()))
            .arg("--volume")
            .arg(format!("{}:/cache", cache.display()))
            .args(["--env", "OSSB_CACHE_DIR=/cache", "--env", "HOME=/cache"])
            .arg(format!("{reg}/{}", env.var("OSSB_TEST_DEBIAN")))
            .args([
                "ossb",
                "build",
                "--progress",
                "plain",
                "--insecure-registry",
                &reg,
            ])
            .args([
                "--isolation",
                isolation,
                "--secret",
                "id=tok,src=/ctx/token.txt",
            ])
            .arg("/ctx")
            .output()
            .expect("podman (installed by scripts/testenv.sh)");
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), log, started.elapsed())
    };
    let (code, log, took) = run("auto");
    assert_eq!(code, Some(0), "{log}");
    for line in [
        "secret 1234 400 s3cr3t",
        "cache cached",
        "tmpfs tmpfs",
        "bind from-the-context",
        // /proc/net/dev: its header (2 lines with ':'... none) and lo only
        "network 1",
        "heredoc ok",
        "background-started",
        "proc read-only",
        "user 1234 1234",
    ] {
        assert!(log.contains(line), "{line:?} missing:\n{log}");
    }
    assert!(
        took < std::time::Duration::from_secs(240),
        "a background process kept its step running ({took:?}):\n{log}"
    );
    assert_eq!(
        log.matches("isolation: rootless, adapted to this container")
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains(SECRET), "the secret reached the log:\n{log}");

    let (code, log, _) = run("rootless");
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("--isolation rootless was asked for"), "{log}");
    assert!(log.contains("mount(proc): EPERM"), "{log}");
}
