//! End-to-end tests of `ossb build` against real registries (scripts/testenv.sh) and real
//! consumers (podman, skopeo, umoci, oci-image-tool).

mod attestations;
mod bake;
mod build;
mod cache_export;
mod cache_gc;
mod cache_miss;
mod checks;
mod cluster;
mod cluster_cache;
mod conformance;
mod deploy;
mod fault_proxy;
mod hostile;
mod image_outputs;
mod link;
mod named_contexts;
mod netns;
mod one_engine;
mod registry;
mod sandbox;
mod support;
mod token_server;

use support::*;

/// The README's example: built, pushed, and run by podman, which prints what CMD should print.
#[test]
fn example_image_is_pushed_and_runs_in_podman() {
    let Some(env) = TestEnv::get() else { return };
    let cache = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let image = format!("{reg}/examples/{}:latest", unique("hello"));
    let base = format!("BASE={reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let example = workspace().join("examples/hello");
    let meta = cache.path().join("metadata.json");
    let iid = cache.path().join("iid");
    let build = ossb(
        &env,
        cache.path(),
        &[
            "build",
            "--progress",
            "plain",
            "--build-arg",
            &base,
            "--insecure-registry",
            &reg,
            "-t",
            &image,
            "--push",
            "--metadata-file",
            meta.to_str().unwrap(),
            "--iidfile",
            iid.to_str().unwrap(),
            example.to_str().unwrap(),
        ],
    )
    .success("ossb build of examples/hello");
    assert!(
        build.stderr.contains("RUN echo"),
        "plain progress names the RUN step:\n{}",
        build.stderr
    );

    let run = podman_run(&image, &[]).success("podman run of the built image");
    assert!(
        run.stdout
            .contains("message.txt was copied into the image by COPY"),
        "COPY'd file missing:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("RUN ran as uid 0 in /app"),
        "RUN output file missing:\n{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("hello from ossb, workdir /app, user app"),
        "ENV, WORKDIR or USER wrong:\n{}",
        run.stdout
    );

    // skopeo reads the pushed manifest and config.
    let inspect = tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    )
    .success("skopeo inspect");
    let info: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Labels"]["org.opencontainers.image.title"], "hello");
    assert!(info["Env"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e == "GREETING=hello from ossb"));

    // The metadata file names the pushed manifest; the iidfile names the config.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta).unwrap()).unwrap();
    assert_eq!(meta["containerimage.digest"], info["Digest"]);
    let config = inspect_config_raw(&image);
    let config_digest = format!("sha256:{}", sha256_hex(config.stdout.as_bytes()));
    assert_eq!(std::fs::read_to_string(&iid).unwrap(), config_digest);
    let config: serde_json::Value = serde_json::from_str(&config.stdout).unwrap();
    let history = config["history"].as_array().unwrap();
    assert!(
        history.iter().any(|h| h["created_by"]
            .as_str()
            .is_some_and(|c| c.starts_with("RUN /bin/sh -c echo"))),
        "history: {history:?}"
    );
    assert_eq!(
        config["config"]["ExposedPorts"]["8080/tcp"],
        serde_json::json!({})
    );
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c"])
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bytes)?;
            child.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The OCI layout output is valid for oci-image-tool, unpacks with umoci, and loads in podman.
#[test]
fn oci_layout_output_is_valid_and_consumable() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!("FROM {reg}/{}\nCOPY hello.txt /hello.txt\nRUN mkdir -p /data && echo layered > /data/file && rm /etc/group\nCMD [\"cat\", \"/hello.txt\"]\n", env.var("OSSB_TEST_BUSYBOX")),
        &[("hello.txt", "hello from an OCI layout\n")],
    );
    let cache = dir.path().join("cache");
    let layout = dir.path().join("layout");
    ossb(
        &env,
        &cache,
        &[
            "build",
            "--insecure-registry",
            &reg,
            "-t",
            "ossb-test/layout:v1",
            "--output",
            &format!("type=oci,dest={},tar=false", layout.display()),
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build --output type=oci,tar=false");
    assert!(layout.join("oci-layout").is_file() && layout.join("index.json").is_file());

    // oci-image-tool 1.0.0-rc1 does not implement --type imageLayout; --type image recognizes a
    // layout and validates its index, manifest and config against the schemas.
    tool(
        "oci-image-tool",
        &[
            "validate",
            "--type",
            "image",
            "--ref",
            "name=v1",
            layout.to_str().unwrap(),
        ],
    )
    .success("oci-image-tool validate");

    let bundle = dir.path().join("bundle");
    tool(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:v1", layout.display()),
            bundle.to_str().unwrap(),
        ],
    )
    .success("umoci unpack");
    let rootfs = bundle.join("rootfs");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hello.txt")).unwrap(),
        "hello from an OCI layout\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("data/file")).unwrap(),
        "layered\n"
    );
    assert!(
        !rootfs.join("etc/group").exists(),
        "the whiteout for /etc/group was not applied"
    );
    assert!(rootfs.join("etc/passwd").exists());

    // The tar form loads into podman and runs.
    let archive = dir.path().join("image.tar");
    ossb(
        &env,
        &cache,
        &[
            "build",
            "--insecure-registry",
            &reg,
            "-t",
            "localhost/ossb-test/layout:v1",
            "--output",
            &format!("type=oci,dest={}", archive.display()),
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build --output type=oci (tar)");
    let load = tool("podman", &["load", "-i", archive.to_str().unwrap()]).success("podman load");
    let loaded = load
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .unwrap_or("localhost/ossb-test/layout:v1")
        .trim()
        .to_string();
    let run = podman_run(&loaded, &[]).success("podman run of the loaded image");
    assert_eq!(run.stdout, "hello from an OCI layout\n");
}

/// Pull and push through the TLS registry with htpasswd auth, credentials from DOCKER_CONFIG;
/// without its CA the push is refused with a hint, and as an --insecure-registry it works
/// without verification; a wrong password fails with exit 1 and says which registry refused.
#[test]
fn tls_registry_with_credentials_and_a_wrong_password() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = env.tls_registry();
    let ca = format!("{tls}={}", env.var("OSSB_TEST_CA"));
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {tls}/{}\nRUN echo private > /private.txt\n",
            env.var("OSSB_TEST_BUSYBOX")
        ),
        &[],
    );
    let image = format!("{tls}/private/{}:1.0", unique("app"));
    let cache = dir.path().join("cache");
    ossb(
        &env,
        &cache,
        &[
            "build",
            "--registry-certificate",
            &ca,
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build via the TLS registry");
    let creds = format!(
        "{}:{}",
        env.var("OSSB_TEST_USER"),
        env.var("OSSB_TEST_PASSWORD")
    );
    tool(
        "skopeo",
        &[
            "inspect",
            "--creds",
            &creds,
            "--cert-dir",
            &env.var("OSSB_TEST_CERT_DIR"),
            &format!("docker://{image}"),
        ],
    )
    .success("skopeo inspect of the pushed image");

    // Without the CA the certificate is refused, with a hint; as an --insecure-registry (as
    // Docker's insecure registries) it speaks HTTPS without verifying the certificate.
    let untrusted = ossb(
        &env,
        &cache,
        &[
            "build",
            "--no-cache",
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(untrusted.code, 1, "{}", untrusted.stderr);
    assert!(
        untrusted.stderr.contains("--registry-certificate"),
        "{}",
        untrusted.stderr
    );
    let insecure_image = format!("{tls}/private/{}:insecure", unique("app"));
    ossb(
        &env,
        &cache,
        &[
            "build",
            "--no-cache",
            "--insecure-registry",
            &tls,
            "-t",
            &insecure_image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build via the TLS registry as an insecure registry");
    tool(
        "skopeo",
        &[
            "inspect",
            "--creds",
            &creds,
            "--cert-dir",
            &env.var("OSSB_TEST_CERT_DIR"),
            &format!("docker://{insecure_image}"),
        ],
    )
    .success("skopeo inspect of the image pushed without verification");

    // The same build with a wrong password.
    let bad_config = dir.path().join("bad-docker-config");
    std::fs::create_dir_all(&bad_config).unwrap();
    let auth = base64(&format!("{}:wrong-password", env.var("OSSB_TEST_USER")));
    std::fs::write(
        bad_config.join("config.json"),
        format!(r#"{{"auths":{{"{tls}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    let run = ossb_with(
        &env,
        &cache,
        &[
            "build",
            "--no-cache",
            "--registry-certificate",
            &ca,
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
        &[("DOCKER_CONFIG", bad_config.to_str().unwrap())],
    );
    assert_eq!(run.code, 1, "a wrong password must exit 1:\n{}", run.stderr);
    assert!(
        run.stderr.contains(&tls),
        "the error names the registry:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.to_lowercase().contains("authentication failed"),
        "the error says authentication failed:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("wrong-password"),
        "the password must never be printed:\n{}",
        run.stderr
    );
}

fn base64(s: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Base images whose layers try to write outside the rootfs: `../escape`, a file through an
/// absolute symlink, a file through a `../..` symlink, hardlinks to host paths. The build either
/// refuses them or neutralizes them; nothing outside the rootfs is written.
#[test]
fn escaping_layers_never_write_outside_the_rootfs() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    for var in [
        "OSSB_TEST_EVIL",
        "OSSB_TEST_EVIL_HARDLINK",
        "OSSB_TEST_EVIL_DOTDOT",
        "OSSB_TEST_EVIL_SYMLINK",
        "OSSB_TEST_EVIL_SYMLINK_UP",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(
            dir.path(),
            &format!(
                "FROM {reg}/{}\nRUN echo pwned >> /etc/hl 2>/dev/null; true\n",
                env.var(var)
            ),
            &[],
        );
        let cache = dir.path().join("cache");
        let run = ossb(
            &env,
            &cache,
            &[
                "build",
                "--insecure-registry",
                &reg,
                "--output",
                &format!("type=oci,dest={}", dir.path().join("out.tar").display()),
                ctx.to_str().unwrap(),
            ],
        );
        assert!(
            run.code == 0 || run.code == 1,
            "{var}: unexpected exit {}:\n{}",
            run.code,
            run.stderr
        );
        if run.code == 1 {
            assert!(
                run.stderr.contains("layer"),
                "{var}: a refusal names the layer:\n{}",
                run.stderr
            );
        }
        for outside in ["/tmp/ossb-evil-file", "/tmp/ossb-evil-file2", "/escape"] {
            assert!(
                !std::path::Path::new(outside).exists(),
                "{var}: {outside} was written outside the rootfs"
            );
        }
        // `../escape` from the stage's rootfs would land in the build's work directory.
        let escaped = walk(&cache)
            .into_iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "escape"))
            .collect::<Vec<_>>();
        assert!(
            escaped.is_empty(),
            "{var}: escaped files in the cache: {escaped:?}"
        );
        assert_eq!(
            std::fs::read("/etc/passwd").unwrap(),
            passwd_before,
            "{var}: /etc/passwd of the host changed"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&p));
            }
            out.push(p);
        }
    }
    out
}

/// `RUN exit 3` fails the build with exit 1, naming the command and its exit code.
#[test]
fn failing_run_reports_the_command_and_its_exit_code() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {reg}/{}\nRUN echo about to fail | tr a-z A-Z && exit 3\n",
            env.var("OSSB_TEST_BUSYBOX")
        ),
        &[],
    );
    let out = dir.path().join("never.tar");
    let run = ossb(
        &env,
        &dir.path().join("cache"),
        &[
            "build",
            "--insecure-registry",
            &reg,
            "--output",
            &format!("type=oci,dest={}", out.display()),
            ctx.to_str().unwrap(),
        ],
    );
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("echo about to fail | tr a-z A-Z && exit 3"),
        "names the command:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("exit code: 3"),
        "names the exit code:\n{}",
        run.stderr
    );
    // The step's output, which the command's text does not hold, repeated in the error (not
    // only in the progress lines above it).
    assert!(
        run.stderr
            .split_once("last output lines:")
            .is_some_and(|(_, tail)| tail.contains("ABOUT TO FAIL")),
        "shows the last output lines:\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("Dockerfile:2"),
        "names the Dockerfile line:\n{}",
        run.stderr
    );
    assert!(!out.exists(), "a failed build must not write its output");
}

/// An unknown instruction or a missing FROM: exit 2 with file:line.
#[test]
fn invalid_dockerfiles_exit_2_with_file_and_line() {
    let Some(env) = TestEnv::get() else { return };
    for (text, line) in [
        ("FROM busybox\nFORM busybox\n", "Dockerfile:2"),
        ("# no base\nRUN echo hi\n", "Dockerfile:2"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path(), text, &[]);
        let run = ossb(
            &env,
            &dir.path().join("cache"),
            &["build", ctx.to_str().unwrap()],
        );
        assert_eq!(run.code, 2, "{text:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(line),
            "{text:?}: the error names {line}:\n{}",
            run.stderr
        );
    }
}

/// Rootless for real: an ordinary user (with an /etc/subuid range) builds the example, whose
/// RUN uses chown, and gets the same image, byte for byte, as root does.
#[test]
fn rootless_build_by_an_ordinary_user_matches_the_root_build() {
    let Some(env) = TestEnv::get() else { return };
    let user = env.var("OSSB_TEST_ROOTLESS_USER");
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir(&ctx).unwrap();
    for f in ["Dockerfile", "message.txt"] {
        std::fs::copy(workspace().join("examples/hello").join(f), ctx.join(f)).unwrap();
    }
    let empty_config = dir.path().join("docker-config");
    std::fs::create_dir(&empty_config).unwrap();
    let base = format!("BASE={reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let build = |who: Option<&str>| -> String {
        let meta = dir
            .path()
            .join(format!("meta-{}.json", who.unwrap_or("root")));
        let out = dir
            .path()
            .join(format!("out-{}.tar", who.unwrap_or("root")));
        let cache = dir.path().join(format!("cache-{}", who.unwrap_or("root")));
        let ossb_args = [
            "build",
            "--build-arg",
            &base,
            "--insecure-registry",
            &reg,
            "--metadata-file",
            meta.to_str().unwrap(),
            "--output",
            &format!("type=oci,dest={}", out.display()),
            ctx.to_str().unwrap(),
        ];
        let mut cmd = match who {
            Some(user) => {
                let mut c = std::process::Command::new("runuser");
                c.args(["-u", user, "--", env!("CARGO_BIN_EXE_ossb")]);
                c
            }
            None => std::process::Command::new(env!("CARGO_BIN_EXE_ossb")),
        };
        let out = cmd
            .args(ossb_args)
            .env("OSSB_CACHE_DIR", &cache)
            .env("DOCKER_CONFIG", &empty_config)
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build as {who:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
        meta["containerimage.digest"].as_str().unwrap().to_string()
    };
    let as_root = build(None);
    let as_user = build(Some(&user));
    assert_eq!(
        as_root, as_user,
        "the rootless image differs from the root one"
    );
}

/// A real package install, rootless: an ordinary user builds `apt-get update && apt-get
/// install jq` on the debootstrap Debian (packages from Debian's archive, through the mirror
/// this machine's apt uses; apt drops to its `_apt` user, so the build needs the user's
/// subordinate ids), pushes it, and podman runs the installed program.
#[test]
fn rootless_apt_get_install_on_debian_and_the_program_runs() {
    let Some(env) = TestEnv::get() else { return };
    let user = env.var("OSSB_TEST_ROOTLESS_USER");
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let dockerfile = format!(
        "FROM {reg}/{}\n\
         RUN apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*\n\
         CMD [\"jq\", \"--version\"]\n",
        env.var("OSSB_TEST_DEBIAN")
    );
    let ctx = crate::support::context(dir.path(), &dockerfile, &[]);
    let image = format!("{reg}/tests/{}:latest", unique("apt"));
    let out = std::process::Command::new("runuser")
        .args(["-u", &user, "--", env!("CARGO_BIN_EXE_ossb")])
        .args(["build", "--progress", "plain", "--insecure-registry", &reg])
        .args(["-t", &image, "--push", ctx.to_str().unwrap()])
        .env("OSSB_CACHE_DIR", dir.path().join("cache"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the rootless apt-get build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = podman_run(&image, &[]).success("podman run of the apt-built image");
    assert!(run.stdout.starts_with("jq-1."), "{}", run.stdout);
}

/// Two stages, COPY --from the first, wildcards and .dockerignore: only the final stage is
/// exported, and ignored files never reach it.
#[test]
fn multi_stage_build_copies_from_a_stage_and_honours_dockerignore() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let reg = env.registry();
    let busybox = format!("{reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let dockerfile = format!(
        "FROM {busybox} AS builder\nWORKDIR /src\nCOPY *.txt ./\nRUN cat *.txt > /combined && echo built-in-builder > /marker\n\
         FROM {busybox}\nCOPY --from=builder /combined /out/combined\nCOPY . /ctx/\nCMD [\"sh\", \"-c\", \"cat /out/combined; ls /ctx; test -e /marker && echo LEAKED; true\"]\n"
    );
    let ctx = context(
        dir.path(),
        &dockerfile,
        &[
            ("a.txt", "alpha\n"),
            ("b.txt", "beta\n"),
            ("secret.env", "TOKEN=x\n"),
            (".dockerignore", "*.env\n"),
        ],
    );
    let image = format!("{reg}/tests/{}:latest", unique("multistage"));
    ossb(
        &env,
        &dir.path().join("cache"),
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
    .success("multi-stage build");
    let run = podman_run(&image, &[]).success("podman run");
    assert!(
        run.stdout.starts_with("alpha\nbeta\n"),
        "COPY --from a stage:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("a.txt") && run.stdout.contains("Dockerfile"),
        "COPY . copies the context:\n{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("secret.env"),
        ".dockerignore'd file was copied:\n{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("LEAKED"),
        "the builder stage's files leaked into the final image:\n{}",
        run.stdout
    );
}
