//! `--build-context NAME=VALUE` beyond directories, as buildx and BuildKit: an image from the
//! registry (`docker-image://`), an OCI layout (`oci-layout://`), an https tarball, a git
//! repository, a directory as a stage's root, a bake target's image (`target:NAME`), and the
//! errors that name the context.

use crate::build::busybox;
use crate::support::*;

/// `ossb build ARGS... CTX` into an OCI layout directory (tag `t:v1`); returns the result.
fn build_layout(env: &TestEnv, dir: &std::path::Path, ctx: &std::path::Path, args: &[&str]) -> Run {
    let reg = env.registry();
    let dest = format!("type=oci,dest={},tar=false", dir.join("out").display());
    let mut all = vec![
        "build",
        "--progress",
        "plain",
        "--insecure-registry",
        &reg,
        "-t",
        "t:v1",
        "--output",
        &dest,
    ];
    all.extend_from_slice(args);
    all.push(ctx.to_str().unwrap());
    ossb(env, &dir.join("cache"), &all)
}

/// The rootfs of the image `build_layout` wrote, unpacked by umoci.
fn unpacked(dir: &std::path::Path) -> std::path::PathBuf {
    let bundle = dir.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:v1", dir.join("out").display()),
            bundle.to_str().unwrap(),
        ],
    )
    .success("umoci unpack");
    bundle.join("rootfs")
}

/// The config of the image `build_layout` wrote, as skopeo reads it.
fn config_of(dir: &std::path::Path) -> serde_json::Value {
    let out = tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            &format!("oci:{}:v1", dir.join("out").display()),
        ],
    )
    .success("skopeo inspect --config");
    serde_json::from_str(&out.stdout).unwrap()
}

/// Pushes an image with ENV, WORKDIR and a marker file; returns its reference.
fn push_base(env: &TestEnv, dir: &std::path::Path) -> String {
    let reg = env.registry();
    let image = format!("{reg}/named/{}:v1", unique("base"));
    let ctx = context(
        &dir.join("base"),
        &format!(
            "FROM {}\nENV FOOBAR=foobar\nWORKDIR /work\nCOPY marker /marker\n",
            busybox(env)
        ),
        &[("marker", "from the base image\n")],
    );
    ossb(
        env,
        &dir.join("base-cache"),
        &[
            "build",
            "--insecure-registry",
            &reg,
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("pushing the base image");
    image
}

/// `docker-image://`: a context named like a stage replaces it (its own FROM, from Docker
/// Hub, is never pulled; its RUN never runs), `FROM NAME` takes the image with its config
/// (ENV, WORKDIR), and `COPY --from=NAME` reads its files.
#[test]
fn docker_image_context_replaces_stages_and_images() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = push_base(&env, dir.path());
    let ctx = context(
        &dir.path().join("app"),
        "FROM alpine:3.19 AS base\n\
         RUN exit 1\n\
         FROM base AS check\n\
         RUN test \"$FOOBAR\" = foobar && test \"$(pwd)\" = /work && echo ok > /work/checked\n\
         FROM img\n\
         COPY --from=check /work/checked /checked\n\
         COPY --from=img /marker /copied\n",
        &[],
    );
    let base_ctx = format!("base=docker-image://{base}");
    let img_ctx = format!("img=docker-image://{base}");
    build_layout(
        &env,
        dir.path(),
        &ctx,
        &["--build-context", &base_ctx, "--build-context", &img_ctx],
    )
    .success("build with image contexts");
    let rootfs = unpacked(dir.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("checked")).unwrap(),
        "ok\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("copied")).unwrap(),
        "from the base image\n"
    );
    let config = config_of(dir.path());
    let env_list = config["config"]["Env"].to_string();
    assert!(env_list.contains("FOOBAR=foobar"), "{config}");
    assert_eq!(config["config"]["WorkingDir"], "/work");
}

/// `oci-layout://DIR:TAG`: an image of a layout skopeo wrote, by tag, as `FROM` and
/// `COPY --from`; a tag the layout does not have and a directory that is no layout are
/// refused (exit 2) naming the context.
#[test]
fn oci_layout_context_by_tag() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let layout = dir.path().join("layout");
    for (image, tag) in [
        (env.var("OSSB_TEST_BUSYBOX"), "bb"),
        (env.var("OSSB_TEST_BUSYBOX_VERSIONED"), "old"),
    ] {
        tool(
            "skopeo",
            &[
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{reg}/{image}"),
                &format!("oci:{}:{tag}", layout.display()),
            ],
        )
        .success("skopeo copy into an OCI layout");
    }
    let ctx = context(
        &dir.path().join("app"),
        "FROM bb\nRUN echo built > /built\nFROM scratch\nCOPY --from=bb /bin/busybox /bb\nCOPY --from=0 /built /built\n",
        &[],
    );
    let arg = format!("bb=oci-layout://{}:bb", layout.display());
    build_layout(&env, dir.path(), &ctx, &["--build-context", &arg]).success("oci-layout build");
    let rootfs = unpacked(dir.path());
    assert!(std::fs::metadata(rootfs.join("bb")).unwrap().len() > 100_000);
    assert_eq!(
        std::fs::read_to_string(rootfs.join("built")).unwrap(),
        "built\n"
    );

    let missing_tag = format!("bb=oci-layout://{}:nope", layout.display());
    let out = build_layout(&env, dir.path(), &ctx, &["--build-context", &missing_tag]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("--build-context bb=")
            && out.stderr.contains("tag \"nope\" is not in the OCI layout")
            && out.stderr.contains("bb, old"),
        "{}",
        out.stderr
    );
    let not_layout = format!("bb=oci-layout://{}", dir.path().join("app").display());
    let out = build_layout(&env, dir.path(), &ctx, &["--build-context", &not_layout]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("--build-context bb=")
            && out.stderr.contains("is not an OCI image layout"),
        "{}",
        out.stderr
    );
}

/// Serves `dir` over HTTP on 127.0.0.1; returns the server and its port.
pub(crate) fn serve(dir: &std::path::Path) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, port);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = server.kill();
    let _ = server.wait();
    panic!("the HTTP server did not start");
}

/// An https-style tarball URL (served over HTTP by the test): the context is its unpacked
/// content, for `COPY --from` and as a stage's root; a tarball with an entry that climbs out
/// (`../`) is refused (exit 2) and nothing lands outside the context's directory.
#[test]
fn tarball_url_context_is_its_unpacked_content() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    let script = format!(
        "import io, tarfile\n\
         t = tarfile.open('{0}/ctx.tar.gz', 'w:gz')\n\
         def add(name, data):\n    i = tarfile.TarInfo(name); i.size = len(data); t.addfile(i, io.BytesIO(data))\n\
         add('app/main.txt', b'main\\n')\n\
         t.close()\n\
         t = tarfile.open('{0}/evil.tar.gz', 'w:gz')\n\
         add('ok.txt', b'ok\\n')\n\
         add('../../escaped.txt', b'out\\n')\n\
         t.close()\n",
        served.display()
    );
    tool("python3", &["-c", &script]).success("making the tarball");
    let (mut server, port) = serve(&served);
    let ctx = context(
        &dir.path().join("app"),
        &format!(
            "FROM src AS files\nFROM {}\nCOPY --from=src app/main.txt /from-copy.txt\nCOPY --from=files /app /from-stage\n",
            busybox(&env)
        ),
        &[],
    );
    let arg = format!("src=http://127.0.0.1:{port}/ctx.tar.gz");
    let result = build_layout(&env, dir.path(), &ctx, &["--build-context", &arg]);
    let evil = format!("src=http://127.0.0.1:{port}/evil.tar.gz");
    let refused = build_layout(&env, dir.path(), &ctx, &["--build-context", &evil]);
    let _ = server.kill();
    let _ = server.wait();
    result.success("build with a tarball context");
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("--build-context src=") && refused.stderr.contains("climbs out"),
        "{}",
        refused.stderr
    );
    let rootfs = unpacked(dir.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("from-copy.txt")).unwrap(),
        "main\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("from-stage/main.txt")).unwrap(),
        "main\n"
    );
    // Nothing climbed out of the context's directory (nor into the image).
    let cache = dir.path().join("cache");
    let found = tool(
        "find",
        &[dir.path().to_str().unwrap(), "-name", "escaped.txt"],
    );
    assert!(found.stdout.trim().is_empty(), "escaped: {}", found.stdout);
    assert!(!cache.join("work/escaped.txt").exists());
}

/// Makes `DIR/served/repo.git`, a bare repository for dumb HTTP, whose tag `v1` holds
/// `top.txt` and `sub/s.txt` (`s`).
pub(crate) fn git_repo(dir: &std::path::Path) {
    let script = "git init -q src && cd src && echo top > top.txt && mkdir sub && echo s > sub/s.txt && git add . \
        && git -c user.email=t@example.com -c user.name=t commit -qm init && git tag v1 \
        && cd .. && mkdir -p served && git clone -q --bare src served/repo.git && cd served/repo.git && git update-server-info";
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A git repository (`URL#TAG:SUBDIR`, served over dumb HTTP by the test) as a context, as ADD
/// clones them: its subdirectory's files, without `.git`.
#[test]
fn git_context_is_its_checkout() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    git_repo(dir.path());
    let (mut server, port) = serve(&dir.path().join("served"));
    let ctx = context(
        &dir.path().join("app"),
        &format!("FROM {}\nCOPY --from=repo . /repo/\n", busybox(&env)),
        &[],
    );
    let arg = format!("repo=http://127.0.0.1:{port}/repo.git#v1:sub");
    let result = build_layout(&env, dir.path(), &ctx, &["--build-context", &arg]);
    let _ = server.kill();
    let _ = server.wait();
    result.success("build with a git context");
    let rootfs = unpacked(dir.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("repo/s.txt")).unwrap(),
        "s\n"
    );
    assert!(
        !rootfs.join("repo/top.txt").exists(),
        "only the subdirectory"
    );
    assert!(!rootfs.join("repo/.git").exists());
}

/// A directory context as `FROM NAME`: its files are the stage's root (owned by root), its
/// own `.dockerignore` applies as in BuildKit, and the config is the empty image's.
#[test]
fn directory_context_as_a_stage_root() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("extra");
    std::fs::create_dir_all(extra.join("etc")).unwrap();
    std::fs::write(extra.join("etc/app.conf"), "conf\n").unwrap();
    std::fs::write(extra.join("secret.key"), "no\n").unwrap();
    std::fs::write(extra.join(".dockerignore"), "secret.key\n").unwrap();
    let ctx = context(
        &dir.path().join("app"),
        &format!(
            "FROM {}\nCOPY --from=extra . /copied/\nFROM extra\nCOPY --from=0 /copied /copied\n",
            busybox(&env)
        ),
        &[],
    );
    let arg = format!("extra={}", extra.display());
    build_layout(&env, dir.path(), &ctx, &["--build-context", &arg]).success("directory as root");
    let rootfs = unpacked(dir.path());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/app.conf")).unwrap(),
        "conf\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("copied/etc/app.conf")).unwrap(),
        "conf\n"
    );
    assert!(
        !rootfs.join("secret.key").exists(),
        "the context's .dockerignore applies"
    );
    assert!(!rootfs.join("copied/secret.key").exists());
    assert!(
        !rootfs.join("bin/busybox").exists(),
        "the root is the directory only"
    );
    let config = config_of(dir.path());
    assert!(
        config["config"]["Env"].to_string().contains("PATH="),
        "{config}"
    );
}

/// Bad contexts: exit 2 naming the context and what to do.
#[test]
fn bad_contexts_are_refused_naming_them() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(&dir.path().join("app"), "FROM base\n", &[]);
    let missing = format!("base=docker-image://{reg}/named/never-pushed:v1");
    for (arg, says) in [
        (
            "base=ftp://example.com/x".to_string(),
            "unsupported context source ftp://",
        ),
        (missing, "check the reference"),
        (
            format!("base=oci-layout://{}/nothing-here", dir.path().display()),
            "is not an OCI image layout",
        ),
        ("base=target:other".to_string(), "ossb bake"),
    ] {
        let out = build_layout(&env, dir.path(), &ctx, &["--build-context", &arg]);
        assert_eq!(out.code, 2, "{arg}: {}", out.stderr);
        assert!(
            out.stderr.contains("--build-context base=") && out.stderr.contains(says),
            "{arg}: {}",
            out.stderr
        );
    }
}

/// `ossb bake` in `dir`.
fn bake(env: &TestEnv, dir: &std::path::Path, args: &[&str]) -> Run {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ossb"))
        .arg("bake")
        .args(args)
        .current_dir(dir)
        .env("OSSB_CACHE_DIR", dir.join("cache"))
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
        .output()
        .expect("running ossb bake");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The media types of the layers of `image`'s manifest (of its image manifest when it is an
/// index with attestations).
fn layer_types(image: &str) -> Vec<String> {
    let raw: serde_json::Value = serde_json::from_str(&inspect_raw(image).stdout).unwrap();
    let manifest = match raw["manifests"].as_array() {
        None => raw,
        Some(manifests) => {
            let entry = manifests
                .iter()
                .find(|m| m["annotations"]["vnd.docker.reference.type"].is_null())
                .unwrap_or_else(|| panic!("no image manifest in {image}'s index"));
            let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
            let at = format!("{repo}@{}", entry["digest"].as_str().unwrap());
            serde_json::from_str(&inspect_raw(&at).stdout).unwrap()
        }
    };
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap().to_string())
        .collect()
}

/// `contexts = { base = "target:base" }`: target `base` is built first (it is not asked
/// for, so cache-only, never pushed), and `app` starts from its image, read from the cache's
/// store without a registry round trip; a cycle of `target:` contexts exits 2 with file:line.
#[test]
fn bake_target_context_feeds_one_target_into_another() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("bake-link");
    std::fs::write(
        dir.path().join("base.Dockerfile"),
        format!(
            "FROM {}\nENV FROM_BASE={marker}\nRUN echo {marker} > /base-marker\n",
            busybox(&env)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("app.Dockerfile"),
        "FROM base\nRUN test \"$FROM_BASE\" = \"$(cat /base-marker)\" && cp /base-marker /app-marker\nCMD [\"cat\", \"/app-marker\"]\n",
    )
    .unwrap();
    let image = format!("{reg}/tests/{marker}:app");
    std::fs::write(
        dir.path().join("docker-bake.hcl"),
        format!(
            "target \"base\" {{\n  dockerfile = \"base.Dockerfile\"\n}}\n\
             target \"app\" {{\n  dockerfile = \"app.Dockerfile\"\n  contexts = {{ base = \"target:base\" }}\n  tags = [\"{image}\"]\n}}\n"
        ),
    )
    .unwrap();
    bake(
        &env,
        dir.path(),
        &[
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "--push",
            "app",
        ],
    )
    .success("ossb bake app");
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(run.stdout, format!("{marker}\n"));
    // The base target exports nothing, so its build left its layer uncompressed; the app's
    // push compresses it, as its own.
    let types = layer_types(&image);
    assert!(
        types.len() == 3 && types.iter().all(|t| t.ends_with("+gzip")),
        "the pushed app has a layer that is not gzip: {types:?}"
    );

    std::fs::write(
        dir.path().join("docker-bake.hcl"),
        "target \"a\" {\n  contexts = { x = \"target:b\" }\n}\ntarget \"b\" {\n  contexts = { y = \"target:a\" }\n}\n",
    )
    .unwrap();
    let cycle = bake(&env, dir.path(), &["a"]);
    assert_eq!(cycle.code, 2, "{}", cycle.stderr);
    assert!(
        cycle.stderr.contains("docker-bake.hcl:") && cycle.stderr.contains("target: contexts"),
        "{}",
        cycle.stderr
    );
}

/// The provenance names each context as buildx hands it to BuildKit (`context:NAME` in the
/// request's args, in mode=min too): an image as `docker-image://REF`, a directory as
/// `local:NAME` (and among the locals).
#[test]
fn provenance_names_the_contexts_as_buildx_passes_them() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let base = push_base(&env, dir.path());
    let assets = dir.path().join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    std::fs::write(assets.join("a.txt"), "asset\n").unwrap();
    let ctx = context(
        &dir.path().join("app"),
        "FROM img\nCOPY --from=assets a.txt /a.txt\n",
        &[],
    );
    let out = dir.path().join("out");
    let reg = env.registry();
    let img = format!("img=docker-image://{base}");
    let local = format!("assets={}", assets.display());
    ossb(
        &env,
        &dir.path().join("cache"),
        &[
            "build",
            "--insecure-registry",
            &reg,
            "--provenance=mode=min",
            "--build-context",
            &img,
            "--build-context",
            &local,
            "--output",
            &format!("type=local,dest={}", out.display()),
            ctx.to_str().unwrap(),
        ],
    )
    .success("build with named contexts and provenance");
    let provenance: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("provenance.json")).unwrap()).unwrap();
    let parameters = &provenance["predicate"]["invocation"]["parameters"];
    let args = &parameters["args"];
    assert_eq!(
        args["context:img"],
        format!("docker-image://{base}"),
        "{parameters}"
    );
    assert_eq!(args["context:assets"], "local:assets", "{parameters}");
    let locals: Vec<&str> = parameters["locals"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(locals, ["assets", "context", "dockerfile"], "{parameters}");
}
