//! What every end-to-end test needs: the test environment made by `scripts/testenv.sh`, the
//! ossb binary, and helpers to run it and the real consumers (podman, skopeo, umoci).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The running test environment (registries, credentials, base images).
pub struct TestEnv {
    vars: HashMap<String, String>,
}

impl TestEnv {
    /// The environment, read from the process environment or from `.testenv/env`. Returns
    /// `None` (the test then skips) only outside CI: under CI=true a missing environment fails
    /// the test, because a test that does not run must not pass there.
    pub fn get() -> Option<TestEnv> {
        let mut vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("OSSB_TEST") || k == "DOCKER_CONFIG")
            .collect();
        if !vars.contains_key("OSSB_TEST_REGISTRY") {
            let file = workspace().join(".testenv/env");
            if let Ok(text) = std::fs::read_to_string(&file) {
                for line in text.lines() {
                    if let Some((k, v)) = line
                        .trim()
                        .strip_prefix("export ")
                        .and_then(|l| l.split_once('='))
                    {
                        vars.insert(
                            k.to_string(),
                            v.trim_matches('"').trim_matches('\'').to_string(),
                        );
                    }
                }
            }
        }
        if vars.contains_key("OSSB_TEST_REGISTRY") {
            return Some(TestEnv { vars });
        }
        let msg = "the test environment is not running: start it with scripts/testenv.sh start (scripts/test.sh does)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        None
    }

    /// A variable of the environment; panics with its name when missing.
    pub fn var(&self, name: &str) -> String {
        self.vars
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} is not set by scripts/testenv.sh"))
    }

    /// The plain-HTTP registry, `127.0.0.1:PORT`.
    pub fn registry(&self) -> String {
        self.var("OSSB_TEST_REGISTRY")
    }

    /// The TLS + htpasswd registry.
    pub fn tls_registry(&self) -> String {
        self.var("OSSB_TEST_TLS_REGISTRY")
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ has a parent")
        .to_path_buf()
}

/// A unique repository name per test run, so reruns never see an earlier push.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// The result of a command, with its output as text.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics with the whole output unless the command succeeded.
    pub fn success(self, what: &str) -> Run {
        assert_eq!(
            self.code, 0,
            "{what} failed with exit code {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// Runs `ossb` with `args`, a private cache dir and the test environment's DOCKER_CONFIG.
pub fn ossb(env: &TestEnv, cache: &Path, args: &[&str]) -> Run {
    ossb_with(env, cache, args, &[])
}

/// As [`ossb`], with extra environment variables.
pub fn ossb_with(env: &TestEnv, cache: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Run {
    ossb_in(env, cache, None, args, extra_env)
}

/// As [`ossb_with`], started in `cwd` (so that paths in `args` may be relative to it).
pub fn ossb_in(
    env: &TestEnv,
    cache: &Path,
    cwd: Option<&Path>,
    args: &[&str],
    extra_env: &[(&str, &str)],
) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ossb"));
    cmd.args(args)
        .env("OSSB_CACHE_DIR", cache)
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"));
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    Run::from(cmd.output().expect("running ossb"))
}

/// Runs a tool (podman, skopeo, umoci, ...) and returns its result.
/// `skopeo inspect --raw` of `image` on a plain-HTTP registry: the manifest or index bytes as
/// pushed (its sha256 is the digest).
pub fn inspect_raw(image: &str) -> Run {
    tool(
        "skopeo",
        &[
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    )
    .success("skopeo inspect --raw")
}

/// `skopeo inspect --config --raw` of `image` on a plain-HTTP registry: its config's bytes as
/// pushed (their sha256 is the image ID).
pub fn inspect_config_raw(image: &str) -> Run {
    tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    )
    .success("skopeo inspect --config --raw")
}

pub fn tool(program: &str, args: &[&str]) -> Run {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (installed by scripts/testenv.sh): {e}"));
    Run::from(out)
}

/// `podman run` with the settings this machine needs (runc, ulimits, host network).
pub fn podman_run(image: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
        "--network",
        "host",
        "--tls-verify=false",
    ];
    args.extend_from_slice(extra);
    args.push(image);
    tool("podman", &args)
}

/// Writes a build context with a Dockerfile and extra files; returns its directory.
pub fn context(dir: &Path, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    for (name, content) in files {
        let path = ctx.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    ctx
}
