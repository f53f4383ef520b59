//! `COPY --link` as BuildKit does it: the layer is made from an empty directory, so its cache
//! key has no parent; a new base image finds it again and only what reads the stage reruns;
//! owners and modes follow `--chown`/`--chmod` as without `--link`, and the destination's
//! parents are directories of the layer's own (BuildKit's documented difference).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::build::busybox;
use crate::support::*;

/// Builds and pushes `dockerfile` under `tag` (a base image for the tests).
fn push_image(env: &TestEnv, dir: &Path, name: &str, dockerfile: &str, tag: &str) {
    let ctx = dir.join(name);
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    let reg = env.registry();
    let args = ["build", "--progress", "plain", "--insecure-registry", &reg];
    let mut args = args.to_vec();
    args.extend(["--push", "--tag", tag, ctx.to_str().unwrap()]);
    ossb(env, &dir.join("cache-base"), &args).success("pushing a base image");
}

/// A context directory `dir/name` with a Dockerfile and files.
fn context_in(dir: &Path, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    context(&sub, dockerfile, files)
}

/// Builds `ctx` and pushes it as `tag` with plain progress; returns (stderr, metadata).
fn build(env: &TestEnv, cache: &Path, ctx: &Path, tag: &str) -> (String, serde_json::Value) {
    let reg = env.registry();
    let meta = ctx.with_extension("metadata.json");
    let args = [
        "build",
        "--progress",
        "plain",
        "--insecure-registry",
        &reg,
        "--metadata-file",
        meta.to_str().unwrap(),
        "--push",
        "--tag",
        tag,
        ctx.to_str().unwrap(),
    ];
    let run = ossb(env, cache, &args).success("ossb build");
    let meta = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    (run.stderr, meta)
}

/// The layer digests of the pushed image `tag` (its platform's manifest in an index).
fn layers(tag: &str) -> Vec<String> {
    let doc: serde_json::Value = serde_json::from_str(&inspect_raw(tag).stdout).unwrap();
    let doc = match doc["manifests"].as_array() {
        Some(list) => {
            let digest = list
                .iter()
                .find(|m| m["platform"]["os"] != "unknown")
                .and_then(|m| m["digest"].as_str())
                .expect("a platform manifest in the index");
            let repo = tag.rsplit_once(':').unwrap().0;
            let raw = inspect_raw(&format!("{repo}@{digest}")).stdout;
            serde_json::from_str(&raw).unwrap()
        }
        None => doc,
    };
    doc["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect()
}

/// The plain progress lines of the vertex named `name` (`#N name`, then `#N ...`).
fn vertex_lines<'a>(stderr: &'a str, name: &str) -> Vec<&'a str> {
    let Some(id) = stderr.lines().find_map(|l| {
        let (id, rest) = l.strip_prefix('#')?.split_once(' ')?;
        (rest.ends_with(name) && rest.starts_with('[')).then_some(id)
    }) else {
        panic!("no vertex {name:?} in:\n{stderr}");
    };
    let prefix = format!("#{id} ");
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

/// A new image under the base's tag: the `COPY --link` is cached (its layer the same blob),
/// the RUN after it reruns, blaming the base; an image whose only change is its base runs
/// nothing and unpacks nothing, the new base's layers under the same linked layer. Both run
/// in podman with the copied file and the new base.
#[test]
fn a_linked_copy_is_reused_on_a_new_base_and_the_image_reassembled() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let base = format!("{reg}/{}:latest", unique("link-base"));
    let push_base = |content: &str| {
        let text = format!("FROM {}\nRUN echo {content} > /base\n", busybox(&env));
        push_image(&env, dir.path(), &format!("base-{content}"), &text, &base);
    };
    push_base("one");
    let files = [("app/hello", "hello\n")];
    let with_run = context_in(
        dir.path(),
        "run",
        &format!(
            "FROM {base}\nCOPY --link app /app\nRUN cat /app/hello /base > /seen\nCMD [\"cat\", \"/seen\"]\n"
        ),
        &files,
    );
    let copy_only = context_in(
        dir.path(),
        "copy",
        &format!("FROM {base}\nCOPY --link app /app\nCMD [\"cat\", \"/base\", \"/app/hello\"]\n"),
        &files,
    );
    let cache = dir.path().join("cache");
    let run_tag = format!("{reg}/{}:latest", unique("link-run"));
    let copy_tag = format!("{reg}/{}:latest", unique("link-copy"));
    build(&env, &cache, &with_run, &run_tag);
    build(&env, &cache, &copy_only, &copy_tag);
    let (run_before, copy_before) = (layers(&run_tag), layers(&copy_tag));
    let base_before = layers(&base);

    push_base("two");
    let base_after = layers(&base);
    assert_ne!(base_before, base_after);

    // The RUN reads the stage: it runs again, blaming the base; the COPY --link does not.
    let (stderr, meta) = build(&env, &cache, &with_run, &run_tag);
    let copy = vertex_lines(&stderr, "COPY --link app /app");
    assert!(
        copy.contains(&"CACHED"),
        "COPY --link not cached: {copy:?}\n{stderr}"
    );
    let misses = meta["ossb.cache-misses"].as_array().unwrap();
    assert_eq!(misses.len(), 1, "{misses:?}");
    assert!(
        misses[0]["step"]
            .as_str()
            .unwrap()
            .ends_with("RUN cat /app/hello /base > /seen")
            && misses[0]["reason"]
                .as_str()
                .unwrap()
                .starts_with(&format!("base image {base} changed")),
        "{misses:?}"
    );
    assert!(stderr.contains("1 steps run, 1 cached"), "{stderr}");
    let run_after = layers(&run_tag);
    assert_eq!(run_after[..base_after.len()], base_after[..]);
    assert_eq!(
        run_after[base_after.len()],
        run_before[base_before.len()],
        "the linked layer is the same blob"
    );
    let out = podman_run(&run_tag, &[]).success("podman run of the rebuilt image");
    assert_eq!(out.stdout, "hello\ntwo\n");

    // Only the base changed: nothing runs, nothing is unpacked, the image is the new base's
    // layers and the same linked layer.
    let (stderr, meta) = build(&env, &cache, &copy_only, &copy_tag);
    assert!(stderr.contains("0 steps run, 1 cached"), "{stderr}");
    assert!(!stderr.contains("unpacking"), "{stderr}");
    assert_eq!(meta["ossb.cache-misses"], serde_json::json!([]), "{meta}");
    let mut expected = base_after.clone();
    expected.push(copy_before[base_before.len()].clone());
    assert_eq!(layers(&copy_tag), expected);
    let out = podman_run(&copy_tag, &[]).success("podman run of the re-assembled image");
    assert_eq!(out.stdout, "two\nhello\n");
}

/// `stat` of `paths` in the image `tag`, run by podman: one `path uid:gid mode type` line each.
fn stat_in(tag: &str, paths: &[&str]) -> Vec<String> {
    let mut cmd = vec!["run", "--rm", "--runtime", "runc", "--network", "host"];
    cmd.extend_from_slice(&[
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
    ]);
    cmd.push("--tls-verify=false");
    cmd.extend_from_slice(&[tag, "stat", "-c", "%n %u:%g %a %F"]);
    cmd.extend_from_slice(paths);
    let out = tool("podman", &cmd).success("podman run stat");
    out.stdout.lines().map(str::to_string).collect()
}

/// The same COPYs with and without `--link` give the copied files the same owners and modes,
/// as BuildKit documents them (`--chown=UID` is UID:UID; `--chmod` as given; a new directory
/// the source's mode). Where they differ is where BuildKit's `--link` does: the destination's
/// parents are the layer's own directories (0755, the `--chown` owner), replacing a directory
/// of the base with other modes and a symlink of the base. `--chown=NAME` is refused.
#[test]
fn a_linked_copy_owns_files_as_an_ordinary_copy_and_replaces_parents() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let base = format!("{reg}/{}:latest", unique("link-owners-base"));
    // A user whose group is not its uid, a private directory and a symlink to it.
    let text = format!(
        "FROM {}\nRUN echo 'svc:x:1500:100::/:/bin/sh' >> /etc/passwd && mkdir /srv && chown 1000:1000 /srv && chmod 700 /srv && ln -s /srv /data\n",
        busybox(&env)
    );
    push_image(&env, dir.path(), "base", &text, &base);
    let dockerfile = |link: &str| {
        format!(
            "FROM {base}\n\
             COPY {link} --chown=1500 tree /opt/tree/\n\
             COPY {link} --chown=1000:1001 --chmod=640 f.txt /opt/f.txt\n\
             COPY {link} --chmod=u=rwx,go=rx f.txt /opt/sym.txt\n\
             COPY {link} f.txt /opt/plain.txt\n\
             COPY {link} f.txt /srv/deep/f.txt\n\
             COPY {link} f.txt /data/f.txt\n"
        )
    };
    let files = [
        ("tree/run.sh", "#!/bin/sh\n"),
        ("tree/sub/secret", "s\n"),
        ("f.txt", "f\n"),
    ];
    let build_one = |name: &str, link: &str| {
        let ctx = context_in(dir.path(), name, &dockerfile(link), &files);
        let mode = |p: &str, m: u32| {
            std::fs::set_permissions(ctx.join(p), std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode("tree/run.sh", 0o755);
        mode("tree/sub/secret", 0o600);
        mode("tree/sub", 0o750);
        mode("tree", 0o775);
        let tag = format!("{reg}/{}:latest", unique(name));
        build(&env, &dir.path().join(format!("cache-{name}")), &ctx, &tag);
        tag
    };
    let linked = build_one("linked", "--link");
    let plain = build_one("plain", "--link=false");
    let copied = [
        "/opt/tree",
        "/opt/tree/run.sh",
        "/opt/tree/sub",
        "/opt/tree/sub/secret",
        "/opt/f.txt",
        "/opt/sym.txt",
        "/opt/plain.txt",
        "/srv/deep",
        "/srv/deep/f.txt",
    ];
    let got = stat_in(&linked, &copied);
    assert_eq!(
        got,
        stat_in(&plain, &copied),
        "owners and modes with and without --link"
    );
    assert_eq!(
        got,
        [
            // The destination directory: 0755 (not the source's 0775), as BuildKit makes it.
            "/opt/tree 1500:1500 755 directory",
            "/opt/tree/run.sh 1500:1500 755 regular file",
            "/opt/tree/sub 1500:1500 750 directory",
            "/opt/tree/sub/secret 1500:1500 600 regular file",
            "/opt/f.txt 1000:1001 640 regular file",
            "/opt/sym.txt 0:0 755 regular file",
            "/opt/plain.txt 0:0 644 regular file",
            "/srv/deep 0:0 755 directory",
            "/srv/deep/f.txt 0:0 644 regular file",
        ]
    );
    // BuildKit's --link: the base's /srv (0700 1000:1000) is replaced by the layer's parent,
    // and the base's /data symlink by a directory; an ordinary copy keeps both and writes
    // through the symlink.
    assert_eq!(
        stat_in(&linked, &["/srv", "/data", "/data/f.txt"]),
        [
            "/srv 0:0 755 directory",
            "/data 0:0 755 directory",
            "/data/f.txt 0:0 644 regular file"
        ]
    );
    assert_eq!(
        stat_in(&plain, &["/srv", "/data", "/srv/f.txt"]),
        [
            "/srv 1000:1000 700 directory",
            "/data 0:0 777 symbolic link",
            "/srv/f.txt 0:0 644 regular file"
        ]
    );

    // A name needs the layers below: refused before anything runs, with its line.
    let ctx = context_in(
        dir.path(),
        "named",
        &format!("FROM {base}\nCOPY --link --chown=svc f.txt /f.txt\n"),
        &files,
    );
    let run = ossb(
        &env,
        &dir.path().join("cache-named"),
        &["build", "--insecure-registry", &reg, ctx.to_str().unwrap()],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("Dockerfile:2") && run.stderr.contains("numeric ids"),
        "{}",
        run.stderr
    );
}
