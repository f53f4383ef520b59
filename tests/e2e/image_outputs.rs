//! The image exporter's options, as buildx passes them to BuildKit's image and registry
//! exporters: `compression-level=`, `force-compression=`, `rewrite-timestamp=`,
//! `push-by-digest=`, `name=` and `name-canonical=`, checked with skopeo, podman and the layer
//! blobs themselves; locally and through a cluster.

use std::path::Path;

use crate::build::busybox;
use crate::support::*;

const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The layers (media type, digest) of `image`'s manifest, read with `skopeo inspect --raw`.
fn layers(image: &str) -> Vec<(String, String)> {
    let raw = inspect_raw(image);
    let manifest: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{image} is not one manifest: {}", raw.stdout))
        .iter()
        .map(|l| {
            (
                l["mediaType"].as_str().unwrap().to_string(),
                l["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The config's `rootfs.diff_ids` of `image`.
fn diff_ids(image: &str) -> Vec<String> {
    let config: serde_json::Value =
        serde_json::from_str(&inspect_config_raw(image).stdout).unwrap();
    config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// The layer digests of the test busybox for this machine's platform (`skopeo inspect`
/// picks it from the index).
fn busybox_layers(env: &TestEnv) -> Vec<String> {
    let out = tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}", busybox(env)),
        ],
    )
    .success("skopeo inspect busybox");
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    info["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect()
}

/// `image` copied with skopeo into a `dir:` layout under `dir`; returns that directory (blobs
/// are files named by their hex digest).
fn copy_to_dir(image: &str, dir: &Path) -> std::path::PathBuf {
    let dest = dir.join(unique("skopeo-dir"));
    tool(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("dir:{}", dest.display()),
        ],
    )
    .success("skopeo copy to a dir: layout");
    dest
}

/// The sha256 of a blob's decompressed bytes, by the zstd or gzip program.
fn decompressed_digest(blob: &Path, media_type: &str) -> String {
    let program = if media_type == ZSTD { "zstd" } else { "gzip" };
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{program} -dc < '{}' | sha256sum | cut -d' ' -f1",
            blob.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{program} -dc failed");
    format!("sha256:{}", String::from_utf8_lossy(&out.stdout).trim())
}

/// Builds `ctx` with `-o OUTPUT` (and `--provenance=false`, for a plain manifest) and
/// SOURCE_DATE_EPOCH=0, so that two builds' tars are alike; returns the run, unchecked.
fn build_to(env: &TestEnv, cache: &Path, ctx: &Path, output: &str, extra: &[&str]) -> Run {
    let reg = env.registry();
    let mut args = vec![
        "build",
        "--progress",
        "plain",
        "--insecure-registry",
        &reg,
        "--provenance=false",
        "-o",
        output,
    ];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().unwrap());
    ossb_with(env, cache, &args, &[("SOURCE_DATE_EPOCH", "0")])
}

/// `compression-level=` changes the layer's bytes (not its tar) and the image still runs;
/// `force-compression=true` turns the gzip layer of the busybox base into zstd, with the
/// base's diff ID kept, and the image runs in podman. Without it the base layer is the base's.
#[test]
fn compression_level_and_force_compression() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN seq 1 20000 > /numbers && echo levels > /m\nCMD [\"cat\", \"/m\"]\n",
            busybox(&env)
        ),
        &[],
    );
    let base = busybox_layers(&env);
    let push = |cache: &str, settings: &str| {
        let image = format!("{reg}/tests/{}:1", unique("level"));
        build_to(
            &env,
            &dir.path().join(cache),
            &ctx,
            &format!("type=registry,name={image},{settings}"),
            &[],
        )
        .success(settings);
        image
    };
    // Default zstd level and level 19 (BuildKit's "best"), each in an empty cache.
    let default = push("cache-a", "compression=zstd");
    let best = push("cache-b", "compression=zstd,compression-level=19");
    let (d, b) = (layers(&default), layers(&best));
    assert_eq!(d.len(), 2);
    // Without force-compression the base layer is the base's, as pulled.
    assert_eq!((d[0].0.as_str(), &d[0].1), (GZIP, &base[0]));
    assert_eq!((b[0].0.as_str(), &b[0].1), (GZIP, &base[0]));
    assert_eq!((d[1].0.as_str(), b[1].0.as_str()), (ZSTD, ZSTD));
    assert_ne!(d[1].1, b[1].1, "level 19 gave the default level's bytes");
    assert_eq!(
        diff_ids(&default),
        diff_ids(&best),
        "the level changed a tar"
    );
    // The level is part of the step's key: the same cache with another level runs the step
    // again and gives level 19's bytes, not the cached default ones.
    let again = push("cache-a", "compression=zstd,compression-level=19");
    assert_eq!(layers(&again)[1].1, b[1].1);
    let run = podman_run(&best, &[]).success("podman run of the level-19 image");
    assert_eq!(run.stdout, "levels\n");

    // force-compression=true: the base's gzip layer recompressed as zstd, its tar kept.
    let forced = push("cache-a", "compression=zstd,force-compression=true");
    let f = layers(&forced);
    assert!(
        f.iter().all(|(t, _)| t == ZSTD),
        "not every layer is zstd: {f:?}"
    );
    assert_ne!(f[0].1, base[0], "the base layer was not recompressed");
    assert_eq!(f[1].1, d[1].1, "the step's own layer is the cached one");
    assert_eq!(diff_ids(&forced), diff_ids(&default));
    let copied = copy_to_dir(&forced, dir.path());
    let blob = copied.join(f[0].1.trim_start_matches("sha256:"));
    assert_eq!(
        decompressed_digest(&blob, ZSTD),
        diff_ids(&forced)[0],
        "zstd -dc of the recompressed base layer is not the base's tar"
    );
    let run = podman_run(&forced, &[]).success("podman run of the force-compressed image");
    assert_eq!(run.stdout, "levels\n");
    // gzip at level 9, forced: the base's gzip layer is kept (same compression, as BuildKit's
    // force-compression keeps it), the step's layer is written at level 9.
    let gzip = push(
        "cache-a",
        "compression=gzip,compression-level=9,force-compression=true",
    );
    let g = layers(&gzip);
    assert_eq!(
        g[0],
        (GZIP.to_string(), base[0].clone()),
        "a gzip base layer is kept, as BuildKit keeps it"
    );
    assert_eq!(g[1].0, GZIP);

    // Levels out of range, and a misspelled boolean, are refused before anything runs.
    for (settings, error) in [
        (
            "compression=gzip,compression-level=10",
            "compression-level=10 is out of range for compression=gzip (0-9)",
        ),
        (
            "compression=zstd,compression-level=23",
            "compression-level=23 is out of range for compression=zstd (0-22)",
        ),
        (
            "compression-level=fast",
            "compression-level=fast is not a level",
        ),
        (
            "force-compression=yes",
            "force-compression=yes must be true or false",
        ),
        (
            "unpack=true",
            "unpack=true unpacks the image into a containerd image store",
        ),
    ] {
        let run = build_to(
            &env,
            &dir.path().join("cache-a"),
            &ctx,
            &format!("type=registry,name={reg}/tests/refused,{settings}"),
            &[],
        );
        assert_eq!(run.code, 2, "{settings}: {}", run.stderr);
        assert!(run.stderr.contains(error), "{settings}: {}", run.stderr);
    }
}

/// The media types of the step layers recorded in `cache`'s step records.
fn recorded_layer_types(cache: &Path) -> Vec<String> {
    let mut types = Vec::new();
    for entry in std::fs::read_dir(cache.join("cache/keys")).unwrap() {
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(entry.unwrap().path()).unwrap()).unwrap();
        if let Some(t) = record["layer"]["mediaType"].as_str() {
            types.push(t.to_string());
        }
    }
    types
}

/// A build whose outputs read no blobs (here the cache alone) stores its step's layer as a
/// plain tar, as BuildKit leaves a layer uncompressed until an export asks for it. The first
/// push from that cache compresses it, to the bytes a build that compressed at once gives
/// (an empty cache's), and a second push takes the copy the first one made.
#[test]
fn a_layer_is_compressed_by_the_first_build_that_exports_it() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN seq 1 20000 > /numbers\nCMD [\"wc\", \"-l\", \"/numbers\"]\n",
            busybox(&env)
        ),
        &[],
    );
    let cache = dir.path().join("cache");
    build_to(&env, &cache, &ctx, "type=cacheonly", &[]).success("cache-only build");
    assert_eq!(
        recorded_layer_types(&cache),
        ["application/vnd.oci.image.layer.v1.tar"],
        "the cache-only build did not store its step's layer as a plain tar"
    );
    let push = |cache: &Path| {
        let image = format!("{reg}/tests/{}:1", unique("deferred"));
        let run = build_to(
            &env,
            cache,
            &ctx,
            &format!("type=registry,name={image}"),
            &[],
        )
        .success("push");
        (image, run)
    };
    let (first, run) = push(&cache);
    assert!(
        run.stderr.contains("compressing layer"),
        "the first push did not say it compressed the layer: {}",
        run.stderr
    );
    let (second, run) = push(&cache);
    assert!(
        !run.stderr.contains("compressing layer"),
        "the second push compressed the layer again: {}",
        run.stderr
    );
    let (compressed_at_once, _) = push(&dir.path().join("empty-cache"));
    let l = layers(&first);
    assert_eq!(l[1].0, GZIP);
    assert_eq!(l, layers(&second));
    assert_eq!(
        l,
        layers(&compressed_at_once),
        "the layer compressed late differs from the one compressed when built"
    );
    let run = podman_run(&first, &[]).success("podman run of the image compressed late");
    assert_eq!(run.stdout.split_whitespace().next(), Some("20000"));
}

/// The (mtime, path) of every entry of a gzip layer blob, read by Python's tarfile.
fn mtimes(blob: &Path) -> Vec<(i64, String)> {
    let out = tool(
        "python3",
        &[
            "-c",
            "import sys, tarfile\nfor m in tarfile.open(sys.argv[1]): print(int(m.mtime), m.name)",
            blob.to_str().unwrap(),
        ],
    )
    .success("python3 tarfile");
    out.stdout
        .lines()
        .map(|l| {
            let (t, name) = l.split_once(' ').unwrap();
            (t.parse().unwrap(), name.to_string())
        })
        .collect()
}

/// `rewrite-timestamp=true` with SOURCE_DATE_EPOCH: every file of the layer a RUN made has
/// its mtime at most the epoch, and the files it touched exactly the epoch; the base image's
/// layer is left as it is, as BuildKit leaves it (its diff IDs mark it immutable). Without
/// SOURCE_DATE_EPOCH, BuildKit's warning.
#[test]
fn rewrite_timestamp_clamps_the_layers_the_build_makes() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN touch /made /etc/passwd && mkdir -p /d/e && echo x > /d/e/f\n",
            busybox(&env)
        ),
        &[],
    );
    let epoch = 1_000_000_000_i64;
    let image = format!("{reg}/tests/{}:1", unique("rewrite"));
    let cache = dir.path().join("cache");
    let args = [
        "build",
        "--insecure-registry",
        &reg,
        "--provenance=false",
        "-o",
        &format!("type=image,name={image},push=true,rewrite-timestamp=true"),
        ctx.to_str().unwrap(),
    ];
    ossb_with(
        &env,
        &cache,
        &args,
        &[("SOURCE_DATE_EPOCH", &epoch.to_string())],
    )
    .success("build with rewrite-timestamp=true");
    let l = layers(&image);
    assert_eq!(
        l[0].1,
        busybox_layers(&env)[0],
        "the base layer was rewritten"
    );
    let copied = copy_to_dir(&image, dir.path());
    let entries = mtimes(&copied.join(l[1].1.trim_start_matches("sha256:")));
    for touched in ["made", "etc/passwd", "d/e/f", "d/e"] {
        let found = entries.iter().find(|(_, n)| n == touched);
        assert_eq!(
            found.map(|(t, _)| *t),
            Some(epoch),
            "{touched} in {entries:?}"
        );
    }
    assert!(
        entries.iter().all(|(t, _)| *t <= epoch),
        "an mtime after the epoch: {entries:?}"
    );

    let plain = ossb(&env, &cache, &args).success("build without SOURCE_DATE_EPOCH");
    assert!(
        plain
            .stderr
            .contains("rewrite-timestamp is specified, but no source-date-epoch was found"),
        "{}",
        plain.stderr
    );
}

/// The repository's tags, by `skopeo list-tags`. The registry answers 404 for a repository
/// that has manifests but no tag (the callers check its manifest is there by digest).
fn tags_of(repository: &str) -> Vec<String> {
    let out = tool(
        "skopeo",
        &[
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{repository}"),
        ],
    );
    if out.code != 0 && out.stderr.contains("invalid status code from registry 404") {
        return Vec::new();
    }
    let out = out.success("skopeo list-tags");
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["Tags"]
        .as_array()
        .map(|t| t.iter().map(|t| t.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// `sha256:` of what `skopeo inspect --raw` returns for `image`.
fn raw_digest(image: &str) -> String {
    let raw = inspect_raw(image);
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(raw.stdout.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    let hex = String::from_utf8_lossy(&out.stdout);
    format!("sha256:{}", hex.split_whitespace().next().unwrap())
}

/// `push-by-digest=true` pushes the image under no tag, its digest in `--metadata-file` as
/// buildx writes it (`containerimage.digest`); `name=` names the image as `-t` would (several
/// in a quoted CSV field); `name-canonical=true` pushes `NAME@DIGEST` beside each tag.
#[test]
fn push_by_digest_name_and_name_canonical() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let cache = dir.path().join("cache");
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {}\nRUN echo by-digest > /m\nCMD [\"cat\", \"/m\"]\n",
            busybox(&env)
        ),
        &[],
    );
    // docker/build-push-action's multi-platform pattern.
    let repo = format!("{reg}/tests/{}", unique("by-digest"));
    let meta = dir.path().join("meta.json");
    let run = build_to(
        &env,
        &cache,
        &ctx,
        &format!("type=image,\"name={repo}\",push-by-digest=true,name-canonical=true,push=true"),
        &["--metadata-file", meta.to_str().unwrap()],
    )
    .success("push-by-digest");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    let digest = meta["containerimage.digest"].as_str().unwrap().to_string();
    assert_eq!(meta["image.name"], repo.as_str());
    assert_eq!(
        tags_of(&repo),
        Vec::<String>::new(),
        "push-by-digest left a tag"
    );
    let by_digest = format!("{repo}@{digest}");
    assert_eq!(raw_digest(&by_digest), digest);
    assert!(
        run.stderr.contains(&format!("pushed {by_digest}")),
        "{}",
        run.stderr
    );
    let out = podman_run(&by_digest, &[]).success("podman run by digest");
    assert_eq!(out.stdout, "by-digest\n");

    // name= with two tagged names and name-canonical: both tags, and each NAME@DIGEST.
    let (a, b) = (
        format!("{reg}/tests/{}", unique("name-a")),
        format!("{reg}/tests/{}", unique("name-b")),
    );
    let meta = dir.path().join("meta2.json");
    let run = build_to(
        &env,
        &cache,
        &ctx,
        &format!("type=registry,\"name={a}:1,{b}:2\",name-canonical=true"),
        &["--metadata-file", meta.to_str().unwrap()],
    )
    .success("name= and name-canonical");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    let digest = meta["containerimage.digest"].as_str().unwrap();
    assert_eq!(meta["image.name"], format!("{a}:1,{b}:2").as_str());
    for (repo, tag) in [(&a, "1"), (&b, "2")] {
        assert_eq!(tags_of(repo), [tag]);
        assert_eq!(raw_digest(&format!("{repo}:{tag}")), digest);
        for pushed in [format!("{repo}:{tag}@{digest}"), format!("{repo}@{digest}")] {
            assert!(
                run.stderr.contains(&format!("pushed {pushed}\n")),
                "no 'pushed {pushed}' in\n{}",
                run.stderr
            );
        }
    }

    // A tagged name cannot be pushed by digest (BuildKit's words), exit 2 before any step.
    let run = build_to(
        &env,
        &cache,
        &ctx,
        &format!("type=registry,name={a}:1,push-by-digest=true"),
        &[],
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("can't push tagged ref {a}:1 by digest")),
        "{}",
        run.stderr
    );
}

/// Through a cluster (`ossb-submit -o ...`): the options travel in the build's spec; the
/// workers write zstd layers at the level asked with the base recompressed, and the
/// coordinator pushes by digest under no tag, the digest in `--metadata-file`.
#[test]
fn cluster_pushes_by_digest_with_forced_compression() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = crate::cluster::Cluster::start_with(&env, &[("amd64-a", &[])]);
    let work = tempfile::tempdir().unwrap();
    let ctx = context(
        work.path(),
        &format!(
            "FROM {}\nRUN echo from-the-cluster > /m\nCMD [\"cat\", \"/m\"]\n",
            cluster.busybox(&env)
        ),
        &[],
    );
    let name = unique("cluster-by-digest");
    let meta = work.path().join("meta.json");
    let out = cluster
        .submit(
            &cluster.tls,
            &[
                "--platform",
                "linux/amd64",
                "--insecure-registry",
                &cluster.registry,
                "--provenance=false",
                "--metadata-file",
                meta.to_str().unwrap(),
                "-o",
                &format!(
                    "type=image,name={}/tests/{name},push=true,push-by-digest=true,compression=zstd,compression-level=19,force-compression=true",
                    cluster.registry
                ),
                ctx.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", cluster.logs());
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    let digest = meta["containerimage.digest"].as_str().unwrap();
    // The registry as this process reaches it.
    let repo = format!("{}/tests/{name}", env.registry());
    assert_eq!(
        tags_of(&repo),
        Vec::<String>::new(),
        "push-by-digest left a tag"
    );
    let image = format!("{repo}@{digest}");
    assert_eq!(raw_digest(&image), digest);
    let l = layers(&image);
    assert!(l.iter().all(|(t, _)| t == ZSTD), "{l:?}");
    assert_ne!(l[0].1, busybox_layers(&env)[0]);
    let run = podman_run(&image, &[]).success("podman run of the cluster's image");
    assert_eq!(run.stdout, "from-the-cluster\n");
}
