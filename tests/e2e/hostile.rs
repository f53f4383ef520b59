//! Hostile input, as a careless or malicious submitter sends it: every case ends in a clear
//! error and a non-zero exit (or, where BuildKit accepts the input, in its behaviour), never a
//! crash, a hang or a file left behind; a cluster keeps serving everyone else.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::{http_get, Cluster};
use crate::support::*;

fn busybox(env: &TestEnv) -> String {
    format!("{}/{}", env.registry(), env.var("OSSB_TEST_BUSYBOX"))
}

/// `ossb build --progress plain` with the plain test registry, then `args`.
fn build(env: &TestEnv, cache: &Path, args: &[&str]) -> Run {
    build_with(env, cache, args, &[])
}

fn build_with(env: &TestEnv, cache: &Path, args: &[&str], vars: &[(&str, &str)]) -> Run {
    let reg = env.registry();
    let mut all = vec!["build", "--progress", "plain", "--insecure-registry", &reg];
    all.extend_from_slice(args);
    ossb_with(env, cache, &all, vars)
}

/// `${A:-${A:-...x...}}`, `levels` deep.
fn nested(levels: usize) -> String {
    format!("{}x{}", "${A:-".repeat(levels), "}".repeat(levels))
}

/// 14 ARGs, each the one before repeated ten times: 10^14 bytes if nothing stopped them.
fn growing_args(base: &str) -> String {
    let mut text = format!("FROM {base}\nARG A0=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n");
    for i in 1..14 {
        text.push_str(&format!(
            "ARG A{i}={}\n",
            format!("${{A{}}}", i - 1).repeat(10)
        ));
    }
    text.push_str("RUN echo ${#A13}\n");
    text
}

/// Regular files under `dir` (not following symlinks) whose content holds `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                todo.push(path);
            } else if meta.is_file() {
                if let Ok(bytes) = std::fs::read(&path) {
                    if bytes.windows(needle.len()).any(|w| w == needle) {
                        found.push(path);
                    }
                }
            }
        }
    }
    found
}

/// Entries of `dir`, empty when it does not exist.
fn entries_of(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn substitutions_nested_thousands_deep_fail_at_their_line_and_leave_nothing() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nENV B={}\n", busybox(&env), nested(10_000)),
        &[],
    );
    let cache = dir.path().join("cache");
    let out = build(&env, &cache, &[ctx.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("Dockerfile:2"), "{}", out.stderr);
    assert!(
        out.stderr.contains("nest deeper than 64 levels"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.len() < 4000,
        "{} bytes of error",
        out.stderr.len()
    );
    assert!(entries_of(&cache.join("work")).is_empty());
}

#[test]
fn variables_that_repeat_each_other_are_refused_before_anything_runs() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), &growing_args(&busybox(&env)), &[]);
    let out = build(&env, &dir.path().join("cache"), &[ctx.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("at most 131071 bytes"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("Dockerfile:"), "{}", out.stderr);
    // The log never repeats the values (before: 2.4 GB of them).
    assert!(out.stderr.len() < 8000, "{} bytes of log", out.stderr.len());
}

#[test]
fn a_step_printing_100_mb_is_clipped_as_buildkit_clips_it() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c 100000000 && echo after-the-flood >&2\n",
            busybox(&env)
        ),
        &[],
    );
    let cache = dir.path().join("cache");
    let out = build(&env, &cache, &[ctx.to_str().unwrap()]).success("the loud build");
    assert!(
        out.stderr
            .contains("[output clipped, log limit 2MiB reached]"),
        "no clip notice in {} bytes",
        out.stderr.len()
    );
    // stdout's 2 MiB with the step prefixes; not 100 MB.
    assert!(
        out.stderr.len() < 5 << 20,
        "{} bytes of log",
        out.stderr.len()
    );
    assert!(
        out.stderr.contains("after-the-flood"),
        "stderr has its own budget"
    );
    // Configurable as buildkitd: BUILDKIT_STEP_LOG_MAX_SIZE.
    let out = build_with(
        &env,
        &cache,
        &["--no-cache", ctx.to_str().unwrap()],
        &[("BUILDKIT_STEP_LOG_MAX_SIZE", "1024")],
    )
    .success("the loud build with a 1 KiB limit");
    assert!(
        out.stderr
            .contains("[output clipped, log limit 1KiB reached]"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.len() < 64 << 10,
        "{} bytes of log",
        out.stderr.len()
    );
}

/// BuildKit's copy makes a fifo anew and never opens it (a COPY of one hung before), turns a
/// socket into an empty file, and makes device nodes where the kernel allows it: in a user
/// namespace it does not, and the error names the path in the context.
#[test]
fn special_files_in_the_context_are_copied_as_buildkit_copies_them() {
    use std::os::unix::fs::FileTypeExt;
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nCOPY . /ctx/\n", busybox(&env)),
        &[("sub/f.txt", "f")],
    );
    tool("mkfifo", &[ctx.join("sub/pipe").to_str().unwrap()]).success("mkfifo");
    let _sock = std::os::unix::net::UnixListener::bind(ctx.join("sub/sock")).unwrap();
    let out_dir = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args([
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &env.registry(),
            "-o",
        ])
        .arg(format!("type=local,dest={}", out_dir.display()))
        .arg(&ctx)
        .env("OSSB_CACHE_DIR", dir.path().join("cache"))
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("COPY of a context with a fifo hung");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "{stderr}");
    let pipe = std::fs::symlink_metadata(out_dir.join("ctx/sub/pipe")).unwrap();
    assert!(pipe.file_type().is_fifo(), "{pipe:?}");
    let sock = std::fs::symlink_metadata(out_dir.join("ctx/sub/sock")).unwrap();
    assert!(sock.is_file() && sock.len() == 0, "{sock:?}");

    // A device node, in a user namespace where the kernel refuses to make one.
    let dev_dir = tempfile::tempdir().unwrap();
    let dev_ctx = context(
        dev_dir.path(),
        &format!("FROM {}\nCOPY . /ctx/\n", busybox(&env)),
        &[],
    );
    let made = tool(
        "mknod",
        &[dev_ctx.join("null").to_str().unwrap(), "c", "1", "3"],
    );
    if made.code != 0 {
        // Not root: no device node can be put in a context here.
        assert!(
            std::env::var("CI").is_err(),
            "mknod failed under CI: {}",
            made.stderr
        );
        return;
    }
    let cache = dev_dir.path().join("cache");
    let out = build(
        &env,
        &cache,
        &["--isolation", "rootless", dev_ctx.to_str().unwrap()],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("COPY of null: cannot make the character device"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("/work/"),
        "an internal path: {}",
        out.stderr
    );
}

/// An env secret is never written anywhere: with the build killed outright in the middle of
/// the step that reads it, no file on /dev/shm, the runtime dir, the temporary dir or the
/// cache holds it. A step spec an older ossb left in the temporary dir is removed by prune.
#[test]
fn an_env_secret_leaves_no_copy_even_when_the_build_is_killed() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (runtime, tmp, cache) = (
        dir.path().join("runtime"),
        dir.path().join("tmp"),
        dir.path().join("cache"),
    );
    std::fs::create_dir(&runtime).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let secret = unique("s3cr3t-of-the-killed-build");
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN --mount=type=secret,id=s wc -c /run/secrets/s && echo step-started && sleep 418\n",
            busybox(&env)
        ),
        &[],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args([
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &env.registry(),
        ])
        .args(["--secret", "id=s,env=OSSB_E2E_SECRET"])
        .arg(&ctx)
        .env("OSSB_CACHE_DIR", &cache)
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
        .env("OSSB_E2E_SECRET", &secret)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("TMPDIR", &tmp)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("step-started") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = child.kill();
        panic!("the step never started:\n{}", reader.join().unwrap());
    }
    tool("kill", &["-KILL", &child.id().to_string()]).success("kill -KILL");
    let _ = child.wait();
    let log = reader.join().unwrap();
    for place in [Path::new("/dev/shm"), &runtime, &tmp, &cache] {
        let found = files_holding(place, secret.as_bytes());
        assert!(found.is_empty(), "the secret is in {found:?}\n{log}");
    }
    // The step dies with the sandbox (parent-death signal), its tmpfs with it.
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        !tool("pgrep", &["-f", "sleep 418"])
            .stdout
            .contains(char::is_numeric)
    });
    assert!(gone, "the step outlived the build");

    // What an older ossb left: a step spec in the temporary dir, found and removed by prune.
    let stale = tmp.join(".ossb-run-stale");
    std::fs::write(&stale, format!("{{\"env\":[\"S={secret}\"]}}")).unwrap();
    tool("touch", &["-d", "2 minutes ago", stale.to_str().unwrap()]).success("touch");
    let pruned = Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args(["cache", "prune"])
        .env("OSSB_CACHE_DIR", &cache)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    assert!(pruned.status.success(), "{pruned:?}");
    assert!(!stale.exists(), "prune left an old step spec behind");
}

#[test]
fn bad_tags_and_outputs_fail_before_any_step() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nRUN echo should-not-run\n", busybox(&env)),
        &[],
    );
    let cache = dir.path().join("cache");
    let ctx = ctx.to_str().unwrap();
    for (args, expected) in [
        (
            vec!["-t", "Bad Tag!!", "--push"],
            "invalid tag \"Bad Tag!!\": invalid reference format",
        ),
        (
            vec!["--cache-to", "type=registry,ref=Bad!!"],
            "invalid cache reference \"Bad!!\"",
        ),
        (
            vec![
                "--platform",
                "linux/amd64,linux/arm64",
                "-o",
                "type=docker,dest=x.tar",
            ],
            "--output type=docker holds one platform",
        ),
    ] {
        let mut all = args;
        all.push(ctx);
        let out = build(&env, &cache, &all);
        assert_eq!(out.code, 2, "{all:?}: {}", out.stderr);
        assert!(out.stderr.contains(expected), "{all:?}: {}", out.stderr);
        assert!(
            !out.stderr.contains("should-not-run") && !out.stderr.contains("#1 "),
            "a step ran: {}",
            out.stderr
        );
    }
}

#[test]
fn unused_build_args_are_named_and_a_build_without_output_says_where_its_image_is() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nARG USED\nRUN echo $USED\n", busybox(&env)),
        &[],
    );
    let out = build(
        &env,
        &dir.path().join("cache"),
        &[
            "--build-arg",
            "USED=1",
            "--build-arg",
            "FOO=1",
            "--build-arg",
            "HTTP_PROXY=http://proxy:3128",
            ctx.to_str().unwrap(),
        ],
    )
    .success("a build with an unused build arg");
    assert!(
        out.stderr
            .contains("One or more build-args [FOO] were not consumed"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("no output was asked for")
            && out.stderr.contains("--output type=oci,dest=FILE"),
        "{}",
        out.stderr
    );
}

/// A raw client of the coordinator: a valid client certificate, and whatever bytes it likes.
struct RawClient {
    rt: tokio::runtime::Runtime,
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl RawClient {
    fn connect(cluster: &Cluster) -> RawClient {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _in_runtime = rt.enter();
        let identity = ossb_net::Identity::load(&cluster.tls, ossb_net::Role::Client).unwrap();
        let endpoint = ossb_net::client(&identity).unwrap();
        let conn = rt
            .block_on(ossb_net::connect(
                &endpoint,
                &cluster.coordinator,
                Duration::from_secs(10),
            ))
            .unwrap();
        RawClient {
            rt,
            conn,
            _endpoint: endpoint,
        }
    }

    /// Sends `bytes` on a new stream, ends it, and returns every byte of the answer.
    fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        self.rt.block_on(async {
            let (mut tx, mut rx) = self.conn.open_bi().await.unwrap();
            tx.write_all(bytes).await.unwrap();
            let _ = tx.finish();
            tokio::time::timeout(Duration::from_secs(60), rx.read_to_end(1 << 20))
                .await
                .expect("the coordinator did not answer within a minute")
                .unwrap_or_default()
        })
    }

    /// Submits `spec` and drives the conversation to its end: no uploads (the tests' contexts
    /// hold no files), then every event. Returns the failure, if the build failed.
    fn submit(&self, spec: ossb_protocol::cluster::BuildSpec) -> Option<(String, i32)> {
        use ossb_protocol::cluster::ClusterMessage as M;
        use ossb_protocol::wire::Message;
        self.rt.block_on(async {
            let (mut tx, mut rx) = self.conn.open_bi().await.unwrap();
            let send = |m: M| Message::Cluster(Box::new(m));
            ossb_net::write_message(&mut tx, send(M::Submit(spec)))
                .await
                .unwrap();
            loop {
                let read =
                    tokio::time::timeout(Duration::from_secs(300), ossb_net::read_message(&mut rx));
                let message = read.await.expect("no answer in 5 minutes").unwrap();
                match message {
                    Message::Cluster(m) => match *m {
                        M::NeedBlobs { .. } => {
                            ossb_net::write_message(&mut tx, send(M::UploadsDone))
                                .await
                                .unwrap();
                        }
                        M::Finished(outcome) => {
                            return outcome.result.err().map(|f| (f.message, f.exit_code))
                        }
                        _ => {}
                    },
                    other => panic!("{other:?}"),
                }
            }
        })
    }
}

/// A frame of `envelope` as the protocol writes it, without the length check a well-behaved
/// client makes.
fn raw_frame(envelope: &ossb_protocol::wire::Envelope) -> Vec<u8> {
    let body = postcard::to_stdvec(envelope).unwrap();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A hostile client with a valid submitter certificate sends every bad input above and
/// malformed frames; after each, the coordinator still answers `/healthz`, and a normal build
/// from another client succeeds.
#[test]
fn a_hostile_submitter_never_takes_the_coordinator_down() {
    use ossb_protocol::cluster::{BuildSpec, ClusterMessage, ContextEntry, EntryKind};
    use ossb_protocol::wire::{Envelope, Message};
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start_with(&env, &[("amd64-a", &[])]);
    let work = tempfile::tempdir().unwrap();
    let base = cluster.busybox(&env);
    let mut normal_builds = 0;
    let mut still_serves = |after: &str| {
        assert_eq!(
            http_get(&cluster.metrics, "/healthz")
                .as_deref()
                .map(str::trim),
            Some("ok"),
            "no /healthz after {after}\n{}",
            cluster.logs()
        );
        normal_builds += 1;
        let ctx = context(
            &work.path().join(format!("normal-{normal_builds}")),
            &format!("FROM {base}\nRUN echo fine-{normal_builds} > /f\n"),
            &[],
        );
        let out = cluster
            .submit(
                &cluster.tls,
                &[
                    "--platform",
                    "linux/amd64",
                    "--insecure-registry",
                    &cluster.registry,
                    ctx.to_str().unwrap(),
                ],
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "a normal build failed after {after}:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
    };
    let submit = |name: &str, dockerfile: &str, args: &[&str]| {
        let ctx = context(&work.path().join(name), dockerfile, &[]);
        let mut all = vec![
            "--platform",
            "linux/amd64",
            "--insecure-registry",
            &cluster.registry,
        ];
        all.extend_from_slice(args);
        all.push(ctx.to_str().unwrap());
        let out = cluster.submit(&cluster.tls, &all).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The inputs of the local tests, through ossb-submit.
    let (code, stderr) = submit(
        "nested",
        &format!("FROM {base}\nENV B={}\n", nested(2500)),
        &[],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("Dockerfile:2") && stderr.contains("nest deeper than 64 levels"),
        "{stderr}"
    );
    still_serves("2,500 nested substitutions");
    let (code, stderr) = submit("growing", &growing_args(&base), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.len() < 8000, "{} bytes of log", stderr.len());
    still_serves("ARGs that grow geometrically");
    let (code, stderr) = submit(
        "loud",
        &format!("FROM {base}\nRUN yes 0123456789abcdef | head -c 100000000\n"),
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("[output clipped, log limit 2MiB reached]") && stderr.len() < 5 << 20,
        "{} bytes of log",
        stderr.len()
    );
    still_serves("a step printing 100 MB");
    let (code, stderr) = submit(
        "tag",
        &format!("FROM {base}\nRUN echo should-not-run\n"),
        &["-t", "Bad Tag!!", "--push", "--build-arg", "FOO=1"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("invalid tag \"Bad Tag!!\""), "{stderr}");
    let (code, stderr) = submit(
        "unused",
        &format!("FROM {base}\n"),
        &["--build-arg", "FOO=1"],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("One or more build-args [FOO] were not consumed"),
        "{stderr}"
    );
    {
        let ctx = context(
            &work.path().join("fifo"),
            &format!("FROM {base}\nCOPY . /ctx/\nRUN test -p /ctx/pipe && test -f /ctx/sock\n"),
            &[],
        );
        tool("mkfifo", &[ctx.join("pipe").to_str().unwrap()]).success("mkfifo");
        let _sock = std::os::unix::net::UnixListener::bind(ctx.join("sock")).unwrap();
        let out = cluster
            .submit(
                &cluster.tls,
                &[
                    "--platform",
                    "linux/amd64",
                    "--insecure-registry",
                    &cluster.registry,
                    ctx.to_str().unwrap(),
                ],
            )
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    still_serves("a fifo and a socket in the context");

    // Raw frames.
    let raw = RawClient::connect(&cluster);
    let answer = |bytes: &[u8]| String::from_utf8_lossy(&raw.exchange(bytes)).into_owned();
    let valid = raw_frame(&Envelope::new(Message::Cluster(Box::new(
        ClusterMessage::Status { build: "b1".into() },
    ))));
    let truncated = answer(&valid[..valid.len() - 3]);
    assert!(truncated.contains("before a whole message"), "{truncated}");
    still_serves("a truncated frame");
    let oversized = answer(&u32::MAX.to_be_bytes());
    assert!(
        oversized.contains("at most 4194304 are accepted"),
        "{oversized}"
    );
    still_serves("a frame announcing 4 GiB");
    let old = raw_frame(&Envelope {
        version: 999,
        message: Message::Cluster(Box::new(ClusterMessage::Status { build: "b1".into() })),
    });
    let versioned = answer(&old);
    assert!(versioned.contains("999"), "{versioned}");
    still_serves("an unknown protocol version");
    let garbage = answer(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    assert!(!garbage.is_empty(), "no answer to garbage");
    still_serves("garbage");

    let spec = |context: Vec<ContextEntry>, dockerfile: &str| BuildSpec {
        dockerfile: dockerfile.to_string(),
        dockerfile_name: "Dockerfile".into(),
        platforms: vec!["linux/amd64".parse().unwrap()],
        compression: "gzip".into(),
        oci_media_types: true,
        network: "default".into(),
        insecure_registries: vec![cluster.registry.clone()],
        context,
        ..Default::default()
    };
    let dir_entry = |path: &str| ContextEntry {
        path: path.into(),
        mode: 0o755,
        kind: EntryKind::Dir,
    };
    let symlink = |path: &str, to: &str| ContextEntry {
        path: path.into(),
        mode: 0o777,
        kind: EntryKind::Symlink(to.into()),
    };
    let dockerfile = format!("FROM {base}\nCOPY a /a\n");
    for (entries, expected) in [
        (vec![dir_entry("../escape")], "not a plain relative path"),
        (vec![dir_entry("/etc/escape")], "not a plain relative path"),
        (vec![dir_entry("a"), dir_entry("a")], "listed twice"),
    ] {
        let (message, code) = raw
            .submit(spec(entries, &dockerfile))
            .expect("a bad entry list was accepted");
        assert_eq!(code, 2, "{message}");
        assert!(message.contains(expected), "{message}");
        still_serves(expected);
    }
    // An unknown compression is refused (it once became gzip without a word).
    let mut odd = spec(vec![dir_entry("a")], &dockerfile);
    odd.compression = "brotli".into();
    let (message, code) = raw
        .submit(odd)
        .expect("an unknown compression was accepted");
    assert_eq!(code, 2, "{message}");
    assert!(message.contains("compression=brotli"), "{message}");
    let mut odd = spec(vec![dir_entry("a")], &dockerfile);
    odd.annotations = vec![("everywhere".into(), "k".into(), "v".into())];
    let (message, code) = raw
        .submit(odd)
        .expect("an unknown annotation kind was accepted");
    assert_eq!(code, 2, "{message}");
    assert!(
        message.contains("annotation kind \"everywhere\""),
        "{message}"
    );
    let looped = raw.submit(spec(
        vec![symlink("a", "b"), symlink("b", "a")],
        &dockerfile,
    ));
    let (message, code) = looped.expect("a COPY through a symlink loop succeeded");
    assert_eq!(code, 1, "{message}");
    assert!(message.contains("symbolic links"), "{message}");
    still_serves("a symlink loop in the context");
    // A million entries do not fit in a frame: refused from the length prefix, before the
    // body is read.
    let million: Vec<ContextEntry> = (0..1_000_000)
        .map(|i| dir_entry(&format!("{i:x}")))
        .collect();
    let big = raw_frame(&Envelope::new(Message::Cluster(Box::new(
        ClusterMessage::Submit(spec(million, &dockerfile)),
    ))));
    let refused = answer(&big);
    assert!(refused.contains("are accepted"), "{refused}");
    still_serves("a million context entries");

    // 1,000 streams that each send two bytes of a frame and stall.
    let stalled: Vec<_> = raw.rt.block_on(async {
        let mut streams = Vec::new();
        for _ in 0..1000 {
            let (mut tx, rx) = raw.conn.open_bi().await.unwrap();
            tx.write_all(&[0, 0]).await.unwrap();
            streams.push((tx, rx));
        }
        streams
    });
    still_serves("1,000 stalled streams");
    drop(stalled);
}

/// A worker killed with SIGKILL in the middle of a RUN that reads a secret leaves no file of
/// it in its work dir, and a worker started again on that dir removes what the killed one left.
#[test]
fn a_worker_killed_mid_run_leaves_no_secret_behind() {
    let Some(env) = TestEnv::get() else { return };
    let mut cluster = Cluster::start_with(&env, &[("amd64-a", &[])]);
    let work = tempfile::tempdir().unwrap();
    let secret = unique("s3cr3t-of-the-killed-worker");
    let secret_file = work.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let ctx = context(
        work.path(),
        &format!(
            "FROM {}\nRUN --mount=type=secret,id=s wc -c /run/secrets/s && echo step-started && sleep 419\n",
            cluster.busybox(&env)
        ),
        &[],
    );
    let mut submit = cluster
        .submit(
            &cluster.tls,
            &[
                "--platform",
                "linux/amd64",
                "--insecure-registry",
                &cluster.registry,
                "--secret",
                &format!("id=s,src={}", secret_file.display()),
                ctx.to_str().unwrap(),
            ],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = submit.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("step-started") {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(Duration::from_secs(120)).is_err() {
        let _ = submit.kill();
        panic!("the step never started\n{}", cluster.logs());
    }
    cluster.kill("amd64-a");
    let worker_dir = cluster.dir.join("amd64-a");
    let found = files_holding(&worker_dir, secret.as_bytes());
    assert!(
        found.is_empty(),
        "the killed worker left the secret in {found:?}"
    );
    let killed = entries_of(&worker_dir.join("tasks"));
    assert!(!killed.is_empty(), "the killed task left nothing to clean");
    let _ = submit.kill();
    let _ = submit.wait();
    cluster.spawn_worker("amd64-a", &[]);
    // It cleans up before it registers (the coordinator may still count the killed one); a
    // task it took since has a directory of a new name.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kept: Vec<_> = killed.iter().filter(|p| p.exists()).collect();
        if kept.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted worker kept {kept:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let found = files_holding(&cluster.dir, secret.as_bytes());
    assert!(
        found.is_empty(),
        "the cluster holds the secret in {found:?}"
    );
}
