//! deploy/: the manifests validate and meet the Pod Security level they state, the ossb image
//! builds and runs, and every rendered pod runs the ossb image in podman with runc, its command
//! line, environment, volumes, user and security context translated to podman's flags
//! ([`Container::podman`]): the Jobs (chroot and rootless) and a rootless worker pool build
//! images that podman runs, and the whole cluster (cache nodes, coordinator, worker pools) runs
//! in network namespaces with /etc/hosts standing in for the headless Services, where docs/ci's
//! examples submit builds to it.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{relay, Net};
use crate::support::*;

fn python(env: &TestEnv) -> String {
    env.var("OSSB_TEST_PYTHON")
}

/// The objects `tests/deploy/render.py DIR` renders (DIR relative to the workspace).
fn render(env: &TestEnv, dir: &str) -> Vec<Value> {
    let out = Command::new(python(env))
        .arg(workspace().join("tests/deploy/render.py"))
        .arg(workspace().join(dir))
        .output()
        .expect("running tests/deploy/render.py");
    assert!(
        out.status.success(),
        "render.py {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered manifests"))
}

/// Kubernetes' $(VAR) expansion of command and args from the container's env.
fn expand(s: &str, env: &HashMap<String, String>) -> String {
    let mut out = s.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    assert!(!out.contains("$("), "unexpanded variable in {s:?}");
    out
}

/// A container of a rendered pod template, ready to run in podman ([`Container::podman`]).
struct Container {
    argv: Vec<String>,
    env: HashMap<String, String>,
    /// mountPath -> (volume name, readOnly)
    mounts: Vec<(String, String, bool)>,
    user: String,
    caps: Vec<String>,
    read_only_root: bool,
    no_new_privs: bool,
    /// The pod's name: its hostname and $HOSTNAME, as the kubelet sets them.
    hostname: Option<String>,
    /// `hostUsers: false`: the pod has a user namespace of its own.
    own_userns: bool,
    /// seccompProfile (the container's, else the pod's): type and localhostProfile.
    seccomp: Option<(String, Option<String>)>,
    /// appArmorProfile (the container's, else the pod's): type and localhostProfile.
    apparmor: Option<(String, Option<String>)>,
    /// procMount: Default (the runtime masks parts of /proc) or Unmasked.
    proc_mount: Option<String>,
}

/// Where the user namespace of a `hostUsers: false` pod starts on this host, in podman's
/// `--uidmap`: 65536 ids, as the kubelet gives each such pod.
const POD_USERNS_BASE: u32 = 3_000_000;

/// A securityContext's seccompProfile or appArmorProfile, the container's first.
fn profile(container: &Value, pod: &Value, field: &str) -> Option<(String, Option<String>)> {
    [container, pod].into_iter().find_map(|sc| {
        let p = &sc[field];
        let kind = p["type"].as_str()?;
        Some((
            kind.to_string(),
            p["localhostProfile"].as_str().map(str::to_string),
        ))
    })
}

impl Container {
    fn from(pod_template: &Value, name: &str, overrides: &[(&str, &str)]) -> Container {
        let spec = &pod_template["spec"];
        let c = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"));
        // As the kubelet: in order, `$(VAR)` of earlier variables expanded, the namespace
        // from the downward API.
        let mut env: HashMap<String, String> = HashMap::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match (
                e["value"].as_str(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => expand(v, &env),
                (None, Some("metadata.namespace")) => NAMESPACE.to_string(),
                (None, other) => panic!("env {name}: unsupported valueFrom {other:?}"),
            };
            env.insert(name, value);
        }
        for (k, v) in overrides {
            env.insert(k.to_string(), v.to_string());
        }
        let argv = c["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(c["args"].as_array().into_iter().flatten())
            .map(|a| expand(a.as_str().unwrap(), &env))
            .collect();
        let mounts = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap().to_string(),
                    m["name"].as_str().unwrap().to_string(),
                    m["readOnly"].as_bool().unwrap_or(false),
                )
            })
            .collect();
        let sc = &c["securityContext"];
        let psc = &spec["securityContext"];
        let uid = sc["runAsUser"]
            .as_u64()
            .or(psc["runAsUser"].as_u64())
            .unwrap_or(1000);
        let gid = sc["runAsGroup"]
            .as_u64()
            .or(psc["runAsGroup"].as_u64())
            .unwrap_or(uid);
        let drops_all = sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c == "ALL"));
        assert!(drops_all, "container {name} must drop ALL capabilities");
        let caps = sc["capabilities"]["add"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        Container {
            argv,
            env,
            mounts,
            user: format!("{uid}:{gid}"),
            caps,
            read_only_root: sc["readOnlyRootFilesystem"] == true,
            no_new_privs: sc["allowPrivilegeEscalation"] == false,
            hostname: None,
            own_userns: spec["hostUsers"] == false,
            seccomp: profile(sc, psc, "seccompProfile"),
            apparmor: profile(sc, psc, "appArmorProfile"),
            proc_mount: sc["procMount"].as_str().map(str::to_string),
        }
    }

    /// Names the pod: its hostname and $HOSTNAME.
    fn named(mut self, pod: &str) -> Container {
        self.hostname = Some(pod.to_string());
        self.env.insert("HOSTNAME".into(), pod.into());
        self
    }

    /// Adds the image's environment under the container's (a runtime's order).
    fn with(mut self, image_env: &HashMap<String, String>) -> Container {
        for (k, v) in image_env {
            self.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        self
    }

    /// `podman run` of `image` (pulled from the test registry) as a runtime runs this container
    /// of the pod: its command and arguments, environment (over the image's), user, volumes
    /// (`volumes` maps volume names to host directories) and security context translated to
    /// podman's flags, on the host's network (where the test registry is):
    ///
    /// - `hostUsers: false`: a user namespace of 65536 ids of its own (`--uidmap`), root of the
    ///   pod being [`POD_USERNS_BASE`] on the host. The kubelet mounts such a pod's volumes
    ///   idmapped (the pod's root sees them as the node's root does); podman with runc 1.1 has
    ///   no idmapped mounts, so the test owns the volumes by the pod's root instead
    ///   ([`for_pod_userns`]).
    /// - capabilities: `--cap-drop all`, then the ones added.
    /// - seccomp: `RuntimeDefault` is podman's default profile (containers-common's, as CRI-O's
    ///   RuntimeDefault; containerd's refuses unshare and mount without CAP_SYS_ADMIN, which is
    ///   what the Localhost profile is for); `Localhost` is the file of deploy/security-profiles
    ///   that deploy/security-profiles/install.sh installs under that name.
    /// - AppArmor: `Localhost` becomes `--security-opt apparmor=NAME` where this kernel has
    ///   AppArmor. Here it has none, and podman, like the kubelet, refuses an AppArmor profile
    ///   then: the setting is left out (neither podman nor tests/deploy's runtime can express it
    ///   here), and the profile is compiled by apparmor_parser instead
    ///   (`security_profiles_install_and_compile`).
    /// - procMount: `Default` is podman's default masks; `Unmasked` is `--security-opt
    ///   unmask=ALL`.
    /// - readOnlyRootFilesystem: `--read-only` (without podman's own tmpfs on /tmp, /run).
    /// - allowPrivilegeEscalation false: `--security-opt no-new-privileges`.
    ///
    /// `network`: podman's `--network` (`host`, or `ns:/run/netns/NAME`, a pod's namespace of
    /// [`crate::netns::Net`]); `extra`: more podman options (a `--name`, an /etc/hosts).
    fn podman(
        &self,
        image: &str,
        volumes: &HashMap<&str, PathBuf>,
        network: &str,
        extra: &[&str],
    ) -> Command {
        let mut cmd = Command::new("podman");
        if network.starts_with("ns:") {
            cmd.env(
                "CONTAINERS_CONF",
                workspace().join("tests/deploy/podman-containers.conf"),
            );
        }
        cmd.args([
            "run",
            "--rm",
            "--quiet",
            "--runtime",
            "runc",
            "--tls-verify=false",
        ])
        // this machine's podman needs explicit ulimits (../shared/ENVIRONMENT.md)
        .args([
            "--ulimit",
            "nofile=20000:20000",
            "--ulimit",
            "nproc=32768:32768",
        ])
        .args(["--network", network, "--user", &self.user]);
        if self.own_userns {
            let map = format!("0:{POD_USERNS_BASE}:65536");
            cmd.args(["--uidmap", &map, "--gidmap", &map]);
        }
        cmd.args(["--cap-drop", "all"]);
        if !self.caps.is_empty() {
            cmd.arg("--cap-add").arg(self.caps.join(","));
        }
        match &self.seccomp {
            None => {}
            Some((kind, _)) if kind == "RuntimeDefault" => {}
            Some((kind, _)) if kind == "Unconfined" => {
                cmd.args(["--security-opt", "seccomp=unconfined"]);
            }
            Some((kind, Some(file))) if kind == "Localhost" => {
                let path = workspace().join("deploy/security-profiles").join(file);
                assert!(
                    path.is_file(),
                    "seccomp Localhost {file}: not in deploy/security-profiles"
                );
                cmd.arg("--security-opt")
                    .arg(format!("seccomp={}", path.display()));
            }
            Some(other) => panic!("seccompProfile {other:?}: not translated"),
        }
        match &self.apparmor {
            Some((kind, _)) if kind == "Unconfined" => {
                cmd.args(["--security-opt", "apparmor=unconfined"]);
            }
            Some((kind, Some(name))) if kind == "Localhost" && apparmor_enabled() => {
                cmd.arg("--security-opt").arg(format!("apparmor={name}"));
            }
            _ => {}
        }
        match self.proc_mount.as_deref() {
            None | Some("Default") => {}
            Some("Unmasked") => {
                cmd.args(["--security-opt", "unmask=ALL"]);
            }
            Some(other) => panic!("procMount {other}: not translated"),
        }
        if self.read_only_root {
            cmd.args(["--read-only", "--read-only-tmpfs=false"]);
        }
        if self.no_new_privs {
            cmd.args(["--security-opt", "no-new-privileges"]);
        }
        if let Some(name) = &self.hostname {
            cmd.args(["--hostname", name]);
        }
        for (k, v) in &self.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        for (path, volume, ro) in &self.mounts {
            let src = volumes.get(volume.as_str()).unwrap_or_else(|| {
                panic!("the test provides no volume {volume} (mounted at {path})")
            });
            let ro = if *ro { ":ro" } else { "" };
            cmd.arg("--volume")
                .arg(format!("{}:{path}{ro}", src.display()));
        }
        cmd.args(extra)
            .arg("--entrypoint")
            .arg(&self.argv[0])
            .arg(image)
            .args(&self.argv[1..]);
        cmd
    }
}

/// Builds deploy/Dockerfile with ossb from the test's own ossb binary, pushes it to the test
/// registry and returns its reference.
fn ossb_image_pushed(env: &TestEnv, dir: &Path) -> String {
    let ctx = dir.join("image-context");
    let out = Command::new(workspace().join("deploy/image-context.sh"))
        .arg(&ctx)
        .arg(env!("CARGO_BIN_EXE_ossb"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "image-context.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reg = env.registry();
    let image = format!("{reg}/ossb/{}:test", unique("ossb"));
    let cache = dir.join("image-cache");
    ossb(
        env,
        &cache,
        &[
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "-f",
            ctx.join("Dockerfile").to_str().unwrap(),
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build of deploy/Dockerfile");
    image
}

/// The ossb CI image: deploy/Dockerfile on busybox (a shell for CI systems that run scripts in
/// the image), pushed as `image` with `-shell` appended; needs the context
/// [`ossb_image_pushed`] assembled in `dir`. Returns its reference.
fn ossb_shell_image(env: &TestEnv, dir: &Path, image: &str) -> String {
    let ctx = dir.join("image-context");
    let reg = env.registry();
    let shell = format!("{image}-shell");
    ossb(
        env,
        &dir.join("image-cache"),
        &[
            "build",
            "--insecure-registry",
            &reg,
            "--build-arg",
            &format!("BASE={reg}/{}", env.var("OSSB_TEST_BUSYBOX")),
            "-f",
            ctx.join("Dockerfile").to_str().unwrap(),
            "-t",
            &shell,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build of deploy/Dockerfile on busybox");
    shell
}

#[test]
fn manifests_render_and_pass_kubernetes_validate_strict() {
    let Some(env) = TestEnv::get() else { return };
    let out = Command::new(workspace().join("tests/deploy/validate.sh"))
        .arg(python(&env))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tests/deploy/validate.sh failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(" passed, 0 failed"), "{text}");
    // tests/deploy/render.py renders what kustomize itself renders, kustomization by
    // kustomization (kustomize from scripts/testenv.sh).
    let kustomizations = std::fs::read_dir(workspace().join("deploy"))
        .map(|_| text.matches("same as ").count())
        .unwrap_or(0);
    assert!(kustomizations >= 10, "not compared with kustomize:\n{text}");
}

#[test]
fn ossb_image_is_built_by_ossb_and_runs_in_podman() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = ossb_image_pushed(&env, dir.path());
    let run = podman_run(&image, &["--user", "1000:1000"]);
    // podman_run puts the image last: the entrypoint is ossb, so pass --version as its command.
    let version = tool(
        "podman",
        &[
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
            &image,
            "--version",
        ],
    )
    .success("podman run IMAGE --version");
    assert!(version.stdout.starts_with("ossb "), "{}", version.stdout);
    // ossb-submit is in the image too (the CI examples of docs/kubernetes.md run it from there).
    let submit = podman_run(&image, &["--entrypoint", "/usr/local/bin/ossb-submit"]);
    assert!(
        submit.stdout.contains("--coordinator") || submit.stderr.contains("--coordinator"),
        "ossb-submit in the image:\n{}{}",
        submit.stdout,
        submit.stderr
    );
    assert!(
        run.stdout.contains("Usage: ossb"),
        "the default CMD is --help:\n{}{}",
        run.stdout,
        run.stderr
    );
    let config = inspect_config_raw(&image);
    let config: Value = serde_json::from_str(&config.stdout).unwrap();
    assert_eq!(
        config["config"]["User"], "1000:1000",
        "the image runs as a non-root user"
    );
}

/// A rendered Job's build container run in podman from the ossb image, as a runtime runs its
/// pod ([`Container::podman`]), with a ConfigMap-shaped context, the registry credentials
/// Secret, and emptyDirs for its cache and /tmp.
struct JobRunner {
    image: String,
    dir: tempfile::TempDir,
    /// The dockerconfigjson Secret, its .dockerconfigjson key projected as config.json.
    creds: PathBuf,
    registry: String,
}

impl JobRunner {
    fn new(env: &TestEnv) -> JobRunner {
        let dir = tempfile::tempdir().unwrap();
        let image = ossb_image_pushed(env, dir.path());
        let creds = dir.path().join("secret");
        std::fs::create_dir(&creds).unwrap();
        std::fs::copy(
            Path::new(&env.var("DOCKER_CONFIG")).join("config.json"),
            creds.join("config.json"),
        )
        .unwrap();
        JobRunner {
            image,
            dir,
            creds,
            registry: env.registry(),
        }
    }

    /// A ConfigMap ossb-build-context as the kubelet writes it, one file per key.
    fn context(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    /// An emptyDir of the Job's pod.
    fn empty_dir(&self, job: &Value, name: &str) -> PathBuf {
        let dir = empty_dir(&self.dir.path().join(name), 0o1777);
        if job["spec"]["template"]["spec"]["hostUsers"] == false {
            for_pod_userns(&dir);
        }
        dir
    }

    /// Runs the Job's container on `ctx` with `cache` as its cache emptyDir; the destination
    /// and progress mode are set through its environment as a user's patch would.
    /// Returns (exit code, stdout and stderr).
    fn run(
        &self,
        job: &Value,
        ctx: &Path,
        cache: &Path,
        destination: &str,
        env: &[(&str, &str)],
    ) -> (i32, String) {
        let mut overrides = vec![
            ("OSSB_DESTINATION", destination),
            ("OSSB_TEST_REGISTRY", self.registry.as_str()),
        ];
        overrides.extend_from_slice(env);
        let c = Container::from(&job["spec"]["template"], "build", &overrides);
        let tmp = self.empty_dir(job, &unique("tmp"));
        let volumes: HashMap<&str, PathBuf> = [
            ("context", ctx.to_path_buf()),
            ("registry-credentials", self.creds.clone()),
            ("cache", cache.to_path_buf()),
            ("tmp", tmp),
        ]
        .into();
        let out = c
            .podman(&self.image, &volumes, "host", &[])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

/// Whether this kernel has AppArmor enabled (podman and the kubelet refuse AppArmor profiles
/// where it has not).
fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|v| v.trim() == "Y")
}

/// Owns `dir` and everything in it by the root of a `hostUsers: false` pod
/// ([`POD_USERNS_BASE`]), as the kubelet's idmapped volume mounts make it look to the pod.
fn for_pod_userns(dir: &Path) -> PathBuf {
    let out = Command::new("chown")
        .args(["-R", &format!("{POD_USERNS_BASE}:{POD_USERNS_BASE}")])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "chown -R {}", dir.display());
    dir.to_path_buf()
}

/// A Debian build with the two kinds of RUN a pod's sandbox must allow: a `chown` to a user the
/// step creates (ids beyond the first need a user namespace of 65536 ids, or root), and
/// `apt-get install` (apt drops to its _apt user; packages from Debian's archive through the
/// mirror this machine's apt uses). The image prints the owner and jq's version.
fn debian_chown_and_apt(env: &TestEnv) -> String {
    format!(
        "FROM {}/{}
\
         RUN useradd --uid 1234 --create-home app && mkdir /data && chown app:app /data && stat -c 'owner %u:%g' /data\n\
         RUN apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*\n\
         CMD [\"sh\", \"-c\", \"stat -c %u:%g /data && jq --version\"]\n",
        env.registry(),
        env.var("OSSB_TEST_DEBIAN")
    )
}

/// The chroot Job (tests/deploy/job-test, the chroot overlay plus the test registry) run in
/// podman builds a ConfigMap-shaped context and pushes it; with the json-logs overlay's setting
/// its whole log is JSON lines; a broken Dockerfile exits 2 (FailJob in the Job's
/// podFailurePolicy) and the log says why.
#[test]
fn job_manifest_builds_and_pushes_and_fails_on_a_broken_dockerfile() {
    let Some(env) = TestEnv::get() else { return };
    let runner = JobRunner::new(&env);
    let objects = render(&env, "tests/deploy/job-test");
    let job = find(&objects, "Job", "ossb-build");
    let reg = env.registry();
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    assert!(rules
        .iter()
        .any(|r| r["action"] == "FailJob" && r["onExitCodes"]["values"] == serde_json::json!([2])));
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never");

    let dockerfile = format!("FROM {reg}/{}\nCOPY message.txt /message.txt\nRUN echo built in a Job >> /message.txt\nCMD [\"cat\", \"/message.txt\"]\n", env.var("OSSB_TEST_BUSYBOX"));
    let context = runner.context(
        "configmap",
        &[
            ("Dockerfile", &dockerfile),
            ("message.txt", "hello from a ConfigMap\n"),
        ],
    );
    let destination = format!("{reg}/jobs/{}:1", unique("hello"));
    let run_job = |ctx: &Path, cache: &Path, progress: &str| {
        runner.run(
            job,
            ctx,
            cache,
            &destination,
            &[("OSSB_PROGRESS", progress)],
        )
    };
    let cache = runner.empty_dir(job, "cache");
    let (code, log) = run_job(&context, &cache, "plain");
    assert_eq!(code, 0, "the Job's build failed:\n{log}");
    assert!(
        log.contains("RUN echo built in a Job"),
        "plain progress in the log:\n{log}"
    );
    let run = podman_run(&destination, &[]).success("podman run of the Job's image");
    assert_eq!(run.stdout, "hello from a ConfigMap\nbuilt in a Job\n");

    let broken_dockerfile = format!(
        "FROM {reg}/{}\nCOPPY message.txt /\n",
        env.var("OSSB_TEST_BUSYBOX")
    );
    let broken = runner.context("broken", &[("Dockerfile", &broken_dockerfile)]);
    let (code, log) = run_job(&broken, &cache, "plain");
    assert_eq!(code, 2, "a broken Dockerfile must exit 2 (FailJob):\n{log}");
    assert!(
        log.contains("Dockerfile:2"),
        "the log names the line:\n{log}"
    );

    // The json-logs overlay's setting: every line of the log is a JSON object, the last one
    // the error with the exit code, for log collectors.
    let json = render(&env, "deploy/job/overlays/json-logs");
    let container = &find(&json, "Job", "ossb-build")["spec"]["template"]["spec"]["containers"][0];
    let progress = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "OSSB_PROGRESS")
        .unwrap()["value"]
        .as_str()
        .unwrap();
    assert_eq!(progress, "json");
    for (ctx, want) in [(&context, 0), (&broken, 2)] {
        let (code, log) = run_job(ctx, &cache, progress);
        assert_eq!(code, want, "{log}");
        let events: Vec<Value> = log
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}"))
            })
            .collect();
        let last = events.last().unwrap();
        if want == 0 {
            assert_eq!(last["event"], "result", "{log}");
        } else {
            assert_eq!(last["event"], "error", "{log}");
            assert_eq!(last["exit_code"], 2, "{log}");
            assert!(
                last["message"].as_str().unwrap().contains("Dockerfile:2"),
                "{log}"
            );
        }
    }
}

/// The chroot Job and the rootless Job (hostUsers: false, the Localhost seccomp profile,
/// procMount Default: a baseline pod) run in podman build a Debian image with a RUN that chowns
/// and one that runs apt-get install and push it, and podman runs it. The rootless Job's sandbox
/// adapts to the masked /proc and says so once; with `--isolation rootless` forced it fails,
/// naming the refused mount and the fixes. With the runtime's default seccomp profile (CRI-O's
/// RuntimeDefault is podman's), which refuses sethostname, it keeps the pod's hostname and says
/// that too.
#[test]
fn chroot_and_rootless_jobs_build_chown_and_apt_get_on_debian_in_podman() {
    let Some(env) = TestEnv::get() else { return };
    let runner = JobRunner::new(&env);
    let dockerfile = debian_chown_and_apt(&env);
    let context = runner.context("debian", &[("Dockerfile", &dockerfile)]);
    let adapted = "isolation: rootless, adapted to this container";
    for (overlay, rootless) in [
        ("tests/deploy/job-test", false),
        ("tests/deploy/job-test-rootless", true),
    ] {
        let objects = render(&env, overlay);
        let job = find(&objects, "Job", "ossb-build");
        assert_eq!(
            job["spec"]["template"]["spec"]["hostUsers"] == false,
            rootless,
            "{overlay}"
        );
        let destination = format!("{}/jobs/{}:1", env.registry(), unique("debian"));
        let cache = runner.empty_dir(job, &unique("cache"));
        let (code, log) = runner.run(job, &context, &cache, &destination, &[]);
        assert_eq!(code, 0, "{overlay}: the Job's build failed:\n{log}");
        assert!(log.contains("owner 1234:1234"), "{overlay}: {log}");
        // Two RUN steps, one word about the sandbox (rootless only: chroot is what it asked for).
        assert_eq!(
            log.matches(adapted).count(),
            usize::from(rootless),
            "{overlay}: how the sandbox adapted, said once:\n{log}"
        );
        if rootless {
            assert!(log.contains("mount(proc): EPERM"), "{log}");
            assert!(!log.contains("sethostname: EPERM"), "{log}");
        }
        let run = podman_run(&destination, &[]).success("podman run of the Job's image");
        assert!(
            run.stdout.starts_with("1234:1234\njq-1."),
            "{overlay}: {}",
            run.stdout
        );
    }

    let objects = render(&env, "tests/deploy/job-test-rootless");
    let job = find(&objects, "Job", "ossb-build");
    let hostname = format!(
        "FROM {}/{}\nRUN echo \"hostname=$(hostname)\"\nRUN {SEES_OSSB}\n",
        env.registry(),
        env.var("OSSB_TEST_BUSYBOX")
    );
    let hostname = runner.context("hostname", &[("Dockerfile", &hostname)]);
    // A forced mode is never weakened: the build fails with what was refused and what to do.
    let cache = runner.empty_dir(job, "forced-cache");
    let (code, log) = runner.run(
        job,
        &hostname,
        &cache,
        &format!("{}/jobs/{}:1", env.registry(), unique("forced")),
        &[("OSSB_ISOLATION", "rootless")],
    );
    assert_eq!(code, 1, "--isolation rootless in a baseline pod:\n{log}");
    for part in [
        "--isolation rootless was asked for",
        "mount(proc): EPERM",
        "procMount: Unmasked",
        "--isolation auto",
    ] {
        assert!(log.contains(part), "{part:?} missing:\n{log}");
    }
    assert!(!log.contains(adapted), "{log}");

    // RuntimeDefault seccomp: podman's default profile, as CRI-O's, refuses sethostname.
    let mut runtime_default = job.clone();
    runtime_default["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        ["seccompProfile"] = serde_json::json!({"type": "RuntimeDefault"});
    let cache = runner.empty_dir(job, "runtime-default-cache");
    let (code, log) = runner.run(
        &runtime_default,
        &hostname,
        &cache,
        &format!("{}/jobs/{}:1", env.registry(), unique("hostname")),
        &[],
    );
    assert_eq!(code, 0, "RuntimeDefault seccomp:\n{log}");
    assert_eq!(log.matches(adapted).count(), 1, "{log}");
    assert!(log.contains("sethostname: EPERM"), "{log}");
    assert!(
        !log.contains("hostname=ossb"),
        "the pod's hostname stays:\n{log}"
    );
    // In the build's pid namespace the step sees ossb's processes, and cannot read them.
    assert!(log.contains("sees /proc/"), "{log}");
    assert!(log.contains("none of them readable"), "{log}");
}

/// A RUN script that lists the processes of ossb it sees in /proc (other than its own shell)
/// and fails when it can read the environment or the root directory of one of them.
const SEES_OSSB: &str = "for p in /proc/[0-9]*; do [ \"${p#/proc/}\" = \"$$\" ] && continue; \
    grep -q ossb \"$p/cmdline\" 2>/dev/null || continue; echo \"sees $p\"; \
    if cat \"$p/environ\" >/dev/null 2>&1 || ls \"$p/root/\" >/dev/null 2>&1; then echo \"READ $p\"; exit 1; fi; \
    done; echo \"none of them readable\"";

/// deploy/security-profiles/ossb-rootless.json is the runtime default with five calls added,
/// and the rootless sandbox needs each of them: the rootless Job in podman with the profile
/// builds and sets its step's hostname; with one of the five taken out it cannot build
/// (unshare: no user namespace; mount, umount2, pivot_root: no sandbox) or keeps the pod's
/// hostname (sethostname).
#[test]
fn the_rootless_seccomp_profile_adds_only_what_the_sandbox_needs() {
    let Some(env) = TestEnv::get() else { return };
    let runner = JobRunner::new(&env);
    let objects = render(&env, "tests/deploy/job-test-rootless");
    let job = find(&objects, "Job", "ossb-build");
    let sc = &job["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["seccompProfile"]["type"], "Localhost");
    let file = sc["seccompProfile"]["localhostProfile"].as_str().unwrap();
    let profile: Value = serde_json::from_slice(
        &std::fs::read(workspace().join("deploy/security-profiles").join(file)).unwrap(),
    )
    .unwrap();
    let rules = profile["syscalls"].as_array().unwrap();
    let added = rules.last().unwrap();
    let added_names: Vec<&str> = added["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(
        added_names,
        ["mount", "umount2", "unshare", "pivot_root", "sethostname"],
        "the profile's last rule is what it adds to the runtime default"
    );
    let named_before = |name: &str| {
        rules[..rules.len() - 1]
            .iter()
            .any(|r| r["names"].as_array().unwrap().iter().any(|n| n == name))
    };
    assert!(added_names.iter().all(|n| !named_before(n)), "{profile}");

    let dockerfile = format!(
        "FROM {}/{}\nRUN echo \"hostname=$(hostname)\"\n",
        env.registry(),
        env.var("OSSB_TEST_BUSYBOX")
    );
    let context = runner.context("hostname", &[("Dockerfile", &dockerfile)]);
    let mut cases: Vec<(Option<&str>, i32, &str)> = vec![(None, 0, "hostname=ossb")];
    cases.extend([
        (Some("unshare"), 1, "user namespaces are refused here"),
        (Some("mount"), 1, "mount(/, private): EPERM"),
        (Some("umount2"), 1, "detaching the old root: EPERM"),
        (Some("pivot_root"), 1, "pivot_root: EPERM"),
        (Some("sethostname"), 0, "sethostname: EPERM"),
    ]);
    for (without, code_wanted, says) in cases {
        let mut variant = profile.clone();
        let names = variant["syscalls"]
            .as_array_mut()
            .unwrap()
            .last_mut()
            .unwrap()["names"]
            .as_array_mut()
            .unwrap();
        names.retain(|n| Some(n.as_str().unwrap()) != without);
        let path = runner.dir.path().join(format!(
            "seccomp-without-{}.json",
            without.unwrap_or("nothing")
        ));
        std::fs::write(&path, serde_json::to_vec(&variant).unwrap()).unwrap();
        let mut job = job.clone();
        // An absolute path: Container::podman joins it to deploy/security-profiles.
        job["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfile"]
            ["localhostProfile"] = Value::from(path.to_str().unwrap());
        let cache = runner.empty_dir(&job, &unique("cache"));
        let destination = format!("{}/jobs/{}:1", env.registry(), unique("seccomp"));
        let (code, log) = runner.run(&job, &context, &cache, &destination, &[]);
        assert_eq!(code, code_wanted, "without {without:?}:\n{log}");
        assert!(
            log.contains(says),
            "without {without:?}: {says:?} missing:\n{log}"
        );
    }
}

/// deploy/security-profiles/install.sh puts the seccomp profile where the kubelet looks for
/// Localhost profiles (under a stand-in for a node's /; AppArmor is not enabled in this kernel,
/// so it loads nothing and says so), the AppArmor profile compiles with apparmor_parser, and the
/// rendered rootless pods name these profiles.
#[test]
fn security_profiles_install_and_compile() {
    let Some(env) = TestEnv::get() else { return };
    let profiles = workspace().join("deploy/security-profiles");
    let node = tempfile::tempdir().unwrap();
    let out = Command::new("sh")
        .arg(profiles.join("install.sh"))
        .arg("--root")
        .arg(node.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "install.sh: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = node
        .path()
        .join("var/lib/kubelet/seccomp/ossb-rootless.json");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(profiles.join("ossb-rootless.json")).unwrap()
    );
    if !apparmor_enabled() {
        assert!(stdout.contains("apparmor: not enabled"), "{stdout}");
    }
    let apparmor = profiles.join("ossb-rootless.apparmor");
    tool(
        "apparmor_parser",
        &[
            "--skip-kernel-load",
            "--skip-cache",
            apparmor.to_str().unwrap(),
        ],
    )
    .success("apparmor_parser of deploy/security-profiles/ossb-rootless.apparmor");
    let text = std::fs::read_to_string(&apparmor).unwrap();
    for (dir, kind, name) in [
        ("deploy/job/overlays/rootless", "Job", "ossb-build"),
        ("deploy/cluster/base", "Deployment", "ossb-worker-amd64"),
        ("deploy/cluster/base", "Deployment", "ossb-worker-arm64"),
    ] {
        let objects = render(&env, dir);
        let template = &find(&objects, kind, name)["spec"]["template"];
        let sc = &template["spec"]["containers"][0]["securityContext"];
        let seccomp = sc["seccompProfile"]["localhostProfile"].as_str().unwrap();
        assert!(profiles.join(seccomp).is_file(), "{dir}: {seccomp}");
        let apparmor = sc["appArmorProfile"]["localhostProfile"].as_str().unwrap();
        assert!(
            text.contains(&format!("\nprofile {apparmor} ")),
            "{dir}: AppArmor profile {apparmor}"
        );
        assert_eq!(sc["procMount"], "Default", "{dir}");
    }
}

fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// A worker of the rootless pool (deploy/cluster/base's ossb-worker-amd64: hostUsers: false,
/// the Localhost seccomp profile, procMount Default, a baseline pod) runs in podman from the
/// ossb image, joins a coordinator and a cache node (processes on this host: the topology test
/// runs those from their manifests), and builds a submitted Debian image with a RUN that chowns
/// and one that runs apt-get install; podman runs the pushed image. The worker's log says once
/// how its sandbox adapted to the pod.
#[test]
fn rootless_worker_pool_in_podman_builds_chown_and_apt_get_on_debian() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = ossb_image_pushed(&env, dir.path());
    let objects = render(&env, "deploy/cluster/base");
    let template = &find(&objects, "Deployment", "ossb-worker-amd64")["spec"]["template"];
    assert_eq!(template["spec"]["hostUsers"], false);

    let tls = dir.path().join("certs");
    let out = Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args(["certs", "init", tls.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "ossb certs init");
    let (coordinator, cache_node) = (
        format!("127.0.0.1:{}", free_port(true)),
        format!("127.0.0.1:{}", free_port(true)),
    );
    let coordinator_metrics = format!("127.0.0.1:{}", free_port(false));
    let mut pods = Pods::default();
    let name = unique("ossb-worker");
    pods.containers.push(name.clone());
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mut start = |name: &str, cmd: &mut Command| {
        let log = std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        pods.children.push(child);
    };
    let ossb_cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ossb"));
        c.args(args).env("OSSB_LOG", "info");
        c
    };
    let (data, state) = (dir.path().join("cache-data"), dir.path().join("state"));
    start(
        "cache-node",
        &mut ossb_cmd(&[
            "cache-node",
            "--listen",
            &cache_node,
            "--data-dir",
            data.to_str().unwrap(),
            "--tls-dir",
            tls.to_str().unwrap(),
            "--peers",
            &cache_node,
        ]),
    );
    start(
        "coordinator",
        &mut ossb_cmd(&[
            "coordinator",
            "--listen",
            &coordinator,
            "--state-dir",
            state.to_str().unwrap(),
            "--tls-dir",
            tls.to_str().unwrap(),
            "--metrics",
            &coordinator_metrics,
        ]),
    );

    let mut worker = Container::from(
        template,
        "worker",
        &[
            ("OSSB_COORDINATOR", &coordinator),
            ("OSSB_CACHE_PEERS", &cache_node),
        ],
    )
    .named("ossb-worker-amd64-7d9f8-x0");
    // On the host's network the manifest's metrics port may be taken: the same flag, a free port.
    let worker_metrics = format!("127.0.0.1:{}", free_port(false));
    for arg in &mut worker.argv {
        if arg.starts_with("--metrics=") {
            *arg = format!("--metrics={worker_metrics}");
        }
    }
    let read = |f: &str| std::fs::read(tls.join(f)).unwrap();
    let (ca, crt, key) = (read("ca.crt"), read("worker.crt"), read("worker.key"));
    let volumes = HashMap::from([
        ("work", empty_dir(&dir.path().join("work"), 0o755)),
        ("tmp", empty_dir(&dir.path().join("tmp"), 0o1777)),
        (
            "tls",
            secret_volume(
                &dir.path().join("worker-tls"),
                &[("ca.crt", &ca), ("worker.crt", &crt), ("worker.key", &key)],
                0o440,
            ),
        ),
        (
            "registry-credentials",
            secret_volume(
                &dir.path().join("registry-credentials"),
                &[("config.json", b"{\"auths\":{}}")],
                0o440,
            ),
        ),
    ]);
    for volume in volumes.values() {
        for_pod_userns(volume);
    }
    start(
        "worker",
        &mut worker.podman(&image, &volumes, "host", &["--name", &name]),
    );
    let all_logs = || {
        let mut all = String::new();
        for name in ["worker", "coordinator", "cache-node"] {
            all += &format!("--- {name}\n");
            all += &std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
        }
        all
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready =
            crate::cluster::http_get(&worker_metrics, "/healthz").is_some_and(|b| b == "ok\n");
        let metrics =
            crate::cluster::http_get(&coordinator_metrics, "/metrics").unwrap_or_default();
        if ready && metrics.contains("ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never joined:\n{metrics}\n{}",
            all_logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    let ctx = crate::support::context(dir.path(), &debian_chown_and_apt(&env), &[]);
    let destination = format!("{}/workers/{}:1", env.registry(), unique("debian"));
    let out = Command::new(env!("CARGO_BIN_EXE_ossb-submit"))
        .args([
            "--coordinator",
            &coordinator,
            "--tls-dir",
            tls.to_str().unwrap(),
        ])
        .args(["--progress", "plain", "--platform", "linux/amd64"])
        .args([
            "--insecure-registry",
            &env.registry(),
            "-t",
            &destination,
            "--push",
        ])
        .arg(&ctx)
        .env("OSSB_CACHE_DIR", dir.path().join("client-cache"))
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ossb-submit to the podman worker failed:\n{stderr}\n{}",
        all_logs()
    );
    assert!(stderr.contains("owner 1234:1234"), "{stderr}");
    // The client is told too, once: the worker's log is not the submitter's.
    assert_eq!(
        stderr
            .matches("isolation: rootless, adapted to this container")
            .count(),
        1,
        "the client is told once how the worker's sandbox adapted:\n{stderr}"
    );
    let run = podman_run(&destination, &[]).success("podman run of the worker's image");
    assert!(run.stdout.starts_with("1234:1234\njq-1."), "{}", run.stdout);
    let log = std::fs::read_to_string(logs.join("worker.log")).unwrap();
    assert_eq!(
        log.matches("isolation: rootless, adapted to this container")
            .count(),
        1,
        "the worker says once how its sandbox adapted:\n{log}"
    );
}

/// The pods a test started: `podman run` processes, each in a process group of its own, and
/// the names of their containers, removed when dropped (killing `podman run` leaves its
/// container running).
#[derive(Default)]
struct Pods {
    children: Vec<std::process::Child>,
    containers: Vec<String>,
}
impl Drop for Pods {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--time", "0", name])
                .output();
        }
        for c in &mut self.children {
            // The whole group: `ip netns exec` forks, so killing the child alone would leave
            // unshare and the pod's processes running.
            crate::cluster::kill_group(c.id());
            let _ = c.wait();
        }
    }
}

/// GET http://HOST:PORT/PATH from inside a network namespace, with the pods' /etc/hosts.
fn http_get_in(ns: &str, hosts: &Path, url: &str) -> Option<String> {
    let script = format!("mount --bind {} /etc/hosts && exec python3 -c 'import urllib.request,sys; sys.stdout.write(urllib.request.urlopen(\"{url}\", timeout=2).read().decode())'", hosts.display());
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The namespace the test's objects live in (the certs Job's POD_NAMESPACE; docs/ci's examples
/// address the coordinator as ossb-coordinator.ossb.svc).
const NAMESPACE: &str = "ossb";

/// The image's own environment (its config's Env), which a runtime sets before the container's.
fn image_env(image: &str) -> HashMap<String, String> {
    let config = inspect_config_raw(image);
    let config: Value = serde_json::from_str(&config.stdout).unwrap();
    config["config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            let (k, v) = e.as_str()?.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// A Secret or ConfigMap volume as the kubelet writes it: one file per key, `mode`, group 1000
/// (the pods' fsGroup).
fn secret_volume(dir: &Path, files: &[(&str, &[u8])], mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        let f = dir.join(name);
        std::fs::write(&f, bytes).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&f, Some(0), Some(1000)).unwrap();
    }
    dir.to_path_buf()
}

/// An emptyDir or a PVC: writable by the fsGroup (setgid), or world-writable for /tmp.
fn empty_dir(dir: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::chown(dir, Some(0), Some(1000)).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
    dir.to_path_buf()
}

/// Waits until `url` answers "ok\n" from the client's namespace (the kubelet's readiness probe).
fn wait_ready(client_ns: &str, hosts: &Path, url: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get_in(client_ns, hosts, url).is_none_or(|b| b != "ok\n") {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{url} never answered ok (readiness probe):\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The probe port's number and path of a rendered container.
fn probe(container: &Value) -> (u64, String) {
    let probe = &container["readinessProbe"]["httpGet"];
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == probe["port"])
        .unwrap_or_else(|| panic!("no port named {}", probe["port"]))["containerPort"]
        .as_u64()
        .unwrap();
    (port, probe["path"].as_str().unwrap().to_string())
}

/// The cluster of deploy/cluster/base (and the emulated-arm64 overlay's worker) as processes,
/// each started from its rendered command line, environment, user, capabilities and mounts in a
/// network namespace of its own, names resolving as the headless Services would, the TLS
/// Secrets made by the certs Job's own `ossb certs init` command line: three cache nodes, the
/// coordinator, a native amd64 worker and a worker that emulates arm64. Every pod's readiness
/// probe (/healthz) must answer; then the Tekton Task of docs/ci submits a two-platform build
/// with ossb-submit from the ossb image, and both images of the pushed index run under podman;
/// then the GitLab job's script and the GitHub workflow's steps submit it too.
#[test]
fn cluster_topology_from_the_rendered_manifests() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let image = ossb_image_pushed(&env, dir.path());
    let image_env = image_env(&image);
    let objects = render(&env, "deploy/cluster/base");
    let emulated = render(&env, "deploy/cluster/overlays/emulated-arm64");
    let certs = render(&env, "deploy/cluster/certs-job");

    // The certs Job's init container, run as written (POD_NAMESPACE from the downward API).
    let certs_job = find(&certs, "Job", "ossb-certs");
    let init = &certs_job["spec"]["template"]["spec"]["initContainers"][0];
    let ns_env = HashMap::from([("POD_NAMESPACE".to_string(), NAMESPACE.to_string())]);
    let certs_dir = dir.path().join("certs");
    std::fs::create_dir(&certs_dir).unwrap();
    let args: Vec<String> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| expand(a.as_str().unwrap(), &ns_env))
        .map(|a| a.replace("/certs/new", certs_dir.join("new").to_str().unwrap()))
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ossb {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    // The Secrets the Job's kubectl containers create: each a role's pair and the CA.
    let made: Vec<String> = certs_job["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            format!("{} {}", args[3], args[4..].join(" "))
        })
        .collect();
    for role in ["node", "worker", "client"] {
        let want = format!(
            "ossb-{role}-tls --from-file=ca.crt=/certs/new/ca.crt --from-file={role}.crt=/certs/new/{role}.crt --from-file={role}.key=/certs/new/{role}.key"
        );
        assert!(
            made.contains(&want),
            "the certs Job makes no {want:?}: {made:?}"
        );
    }
    // The Secrets the Job's kubectl containers create, as the kubelet writes them (0440, the
    // manifests' defaultMode; the Tekton Task mounts ossb-client-tls with the default 0644).
    let read = |f: &str| std::fs::read(certs_dir.join("new").join(f)).unwrap();
    let (ca, node_crt, node_key) = (read("ca.crt"), read("node.crt"), read("node.key"));
    let (client_crt, client_key) = (read("client.crt"), read("client.key"));
    let worker_tls = secret_volume(
        &dir.path().join("ossb-worker-tls"),
        &[
            ("ca.crt", &ca),
            ("worker.crt", &read("worker.crt")),
            ("worker.key", &read("worker.key")),
        ],
        0o440,
    );
    let node_tls = secret_volume(
        &dir.path().join("ossb-node-tls"),
        &[
            ("ca.crt", &ca),
            ("node.crt", &node_crt),
            ("node.key", &node_key),
        ],
        0o440,
    );
    let client_files: [(&str, &[u8]); 3] = [
        ("ca.crt", &ca),
        ("client.crt", &client_crt),
        ("client.key", &client_key),
    ];
    let submitter_tls = secret_volume(&dir.path().join("submitter-tls"), &client_files, 0o644);
    // ossb-registry-credentials: the test registry needs no credentials.
    let credentials = secret_volume(
        &dir.path().join("ossb-registry-credentials"),
        &[("config.json", b"{\"auths\":{}}")],
        0o440,
    );
    // Each pod's "tls" volume is the Secret its manifest names: a worker mounting the
    // submitters' certificate would be refused by the coordinator.
    let secrets = HashMap::from([
        ("ossb-node-tls", node_tls.clone()),
        ("ossb-worker-tls", worker_tls.clone()),
    ]);
    let tls_of = |template: &serde_json::Value| -> PathBuf {
        let volume = template["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "tls")
            .expect("a tls volume");
        let name = volume["secret"]["secretName"].as_str().unwrap();
        secrets
            .get(name)
            .unwrap_or_else(|| panic!("no Secret {name} is made by the certs Job"))
            .clone()
    };

    // The network: a namespace per pod on one bridge, and an uplink to the host, where a relay
    // stands in for the in-cluster registry (registry.ossb-test:PORT, plain HTTP).
    let sts = find(&objects, "StatefulSet", "ossb-cache");
    let svc = find(&objects, "Service", "ossb-cache");
    assert_eq!(svc["spec"]["clusterIP"], "None", "a headless Service");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    assert_eq!(replicas, 3);
    let cache_name = sts["metadata"]["name"].as_str().unwrap();
    let cache_service = sts["spec"]["serviceName"].as_str().unwrap();
    let coordinator = find(&objects, "StatefulSet", "ossb-coordinator");
    let coordinator_service = coordinator["spec"]["serviceName"].as_str().unwrap();
    assert_eq!(
        find(&objects, "Service", coordinator_service)["spec"]["clusterIP"],
        "None"
    );

    let Some(mut net) = Net::new() else {
        eprintln!("SKIPPED: the topology test needs network namespaces");
        return;
    };
    let uplink = net.host();
    let relayed = relay(&format!("{uplink}:0"), env.registry());
    let registry = format!("registry.ossb-test:{}", relayed.rsplit(':').next().unwrap());
    let cache_ns: Vec<String> = (0..replicas as u8).map(|i| net.node(10 + i)).collect();
    let coordinator_ns = net.node(20);
    let worker_ns = [net.node(30), net.node(31)];
    let client_ns = net.node(100);
    let mut text = format!("127.0.0.1 localhost\n{uplink} registry.ossb-test\n");
    for i in 0..replicas {
        let pod = format!("{cache_name}-{i}.{cache_service}");
        let addr = net.addr(10 + i as u8);
        text += &format!("{addr} {pod} {pod}.{NAMESPACE}.svc\n");
    }
    // A headless Service of one ready pod resolves to that pod.
    let svc = coordinator_service;
    text += &format!(
        "{} {svc} {svc}.{NAMESPACE}.svc ossb-coordinator-0.{svc} ossb-coordinator-0.{svc}.{NAMESPACE}.svc\n",
        net.addr(20)
    );
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, &text).unwrap();

    // Each pod in podman, in its network namespace, with the Services' names in its /etc/hosts.
    let hosts_file = format!("{}:/etc/hosts:ro", hosts.display());
    let in_pod =
        |c: &Container, image: &str, volumes: &HashMap<&str, PathBuf>, ns: &str, name: &str| {
            c.podman(
                image,
                volumes,
                &format!("ns:/run/netns/{ns}"),
                &["--name", name, "--no-hosts", "--volume", &hosts_file],
            )
        };
    let mut pods = Pods::default();
    let mut start = |name: &str, c: &Container, volumes: HashMap<&str, PathBuf>, ns: &str| {
        let log_path = dir.path().join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let container = unique(name);
        pods.containers.push(container.clone());
        let child = in_pod(c, &image, &volumes, ns, &container)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        pods.children.push(child);
        log_path
    };

    // The cache nodes' StatefulSet.
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let (port, path) = probe(container);
    let mut cache_logs = Vec::new();
    for (i, ns) in cache_ns.iter().enumerate() {
        let c = Container::from(&sts["spec"]["template"], "cache-node", &[])
            .with(&image_env)
            .named(&format!("{cache_name}-{i}"));
        let data = empty_dir(&dir.path().join(format!("pvc-data-{i}")), 0o2775);
        let volumes = HashMap::from([("data", data), ("tls", tls_of(&sts["spec"]["template"]))]);
        cache_logs.push(start(&format!("cache-{i}"), &c, volumes, ns));
    }
    for (i, log) in cache_logs.iter().enumerate() {
        let url = format!("http://{cache_name}-{i}.{cache_service}:{port}{path}");
        wait_ready(&client_ns, &hosts, &url, log);
    }

    // The coordinator's StatefulSet.
    let c = Container::from(&coordinator["spec"]["template"], "coordinator", &[])
        .with(&image_env)
        .named("ossb-coordinator-0");
    let volumes = HashMap::from([
        ("state", empty_dir(&dir.path().join("pvc-state"), 0o2775)),
        (
            "tmp",
            empty_dir(&dir.path().join("coordinator-tmp"), 0o1777),
        ),
        ("tls", tls_of(&coordinator["spec"]["template"])),
        ("registry-credentials", credentials.clone()),
    ]);
    let coordinator_log = start("coordinator", &c, volumes, &coordinator_ns);
    let container = &coordinator["spec"]["template"]["spec"]["containers"][0];
    let (metrics_port, path) = probe(container);
    let coordinator_metrics = format!("http://{svc}:{metrics_port}");
    wait_ready(
        &client_ns,
        &hosts,
        &format!("{coordinator_metrics}{path}"),
        &coordinator_log,
    );

    // The worker pools: the native amd64 Deployment of the base, and the arm64 pool of the
    // emulated-arm64 overlay (amd64 nodes running arm64 steps through QEMU).
    let mut worker_logs = Vec::new();
    for (i, (objs, name)) in [
        (&objects, "ossb-worker-amd64"),
        (&emulated, "ossb-worker-arm64"),
    ]
    .into_iter()
    .enumerate()
    {
        let deployment = find(objs, "Deployment", name);
        let template = &deployment["spec"]["template"];
        assert_eq!(template["spec"]["hostUsers"], false, "{name}: hostUsers");
        let c = Container::from(template, "worker", &[])
            .with(&image_env)
            .named(&format!("{name}-7d9f8-x{i}"));
        let volumes = HashMap::from([
            (
                "work",
                empty_dir(&dir.path().join(format!("{name}-work")), 0o777),
            ),
            (
                "tmp",
                empty_dir(&dir.path().join(format!("{name}-tmp")), 0o1777),
            ),
            ("tls", tls_of(template)),
            (
                "registry-credentials",
                secret_volume(
                    &dir.path().join(format!("{name}-registry-credentials")),
                    &[("config.json", b"{\"auths\":{}}")],
                    0o440,
                ),
            ),
        ]);
        // hostUsers: false: the pod's root owns its volumes (see Container::podman).
        for volume in volumes.values() {
            for_pod_userns(volume);
        }
        let log = start(name, &c, volumes, &worker_ns[i]);
        let (port, path) = probe(&template["spec"]["containers"][0]);
        wait_ready(
            &client_ns,
            &hosts,
            &format!("http://{}:{port}{path}", net.addr(30 + i as u8)),
            &log,
        );
        worker_logs.push(log);
    }
    let logs = || {
        let mut all = String::new();
        for f in cache_logs
            .iter()
            .chain(&worker_logs)
            .chain([&coordinator_log])
        {
            all += &format!("--- {}\n", f.display());
            all += &std::fs::read_to_string(f).unwrap_or_default();
        }
        all
    };
    // Both workers registered with the coordinator.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = http_get_in(
            &client_ns,
            &hosts,
            &format!("{coordinator_metrics}/metrics"),
        )
        .unwrap_or_default();
        // (the emulating worker builds amd64 natively too)
        if metrics.contains("ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 2")
            && metrics.contains("ossb_workers{platform=\"linux/arm64\",mode=\"emulated\"} 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the workers never registered:\n{metrics}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }

    // docs/ci/tekton-task.yaml's step, run as written in the ossb image from a client pod, with
    // the test's values for the Task's params and its workspace. One change: the test registry is
    // plain HTTP, so `--insecure-registry` follows `--push`.
    let task = yaml_documents(&env, &workspace().join("docs/ci/tekton-task.yaml"));
    let task = &task[0];
    let step = &task["spec"]["steps"][0];
    let source = dir.path().join("workspace-source");
    let bb = format!("{registry}/{}", env.var("OSSB_TEST_BUSYBOX"));
    crate::support::context(
        &source,
        &format!(
            "FROM {bb} AS build\nARG TARGETARCH\nCOPY note.txt /note.txt\nRUN echo \"$TARGETARCH $(uname -m) $(cat /note.txt)\" > /arch\n\
             FROM {bb}\nCOPY --from=build /arch /arch\nCMD [\"cat\", \"/arch\"]\n"
        ),
        &[("note.txt", "from-the-topology")],
    );
    let pushed = format!("{}/ci/{}:tekton", env.registry(), unique("tekton"));
    let tag = pushed.replacen(&env.registry(), &registry, 1);
    let mut params: HashMap<String, String> = task["spec"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                format!("params.{}", p["name"].as_str()?),
                p["default"].as_str()?.to_string(),
            ))
        })
        .collect();
    params.insert("params.image".into(), tag.clone());
    params.insert("workspaces.source.path".into(), "/workspace/source".into());
    let mut argv: Vec<String> = step["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(step["args"].as_array().unwrap())
        .map(|a| expand(a.as_str().unwrap(), &params))
        .collect();
    let push = argv
        .iter()
        .position(|a| a == "--push")
        .expect("the Task pushes");
    argv.insert(push + 1, format!("--insecure-registry={registry}"));
    let sc = &task["spec"]["stepTemplate"]["securityContext"];
    let user = sc["runAsUser"].as_u64().unwrap();
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let submitter = Container {
        argv,
        env: image_env.clone(),
        mounts: vec![
            ("/etc/ossb/tls".into(), "ossb-tls".into(), true),
            ("/workspace/source".into(), "source".into(), true),
        ],
        user: format!("{user}:{user}"),
        caps: Vec::new(),
        read_only_root: false,
        no_new_privs: sc["allowPrivilegeEscalation"] == false,
        hostname: Some("app-build-submit-pod".into()),
        own_userns: false,
        seccomp: None,
        apparmor: None,
        proc_mount: None,
    };
    let volumes = HashMap::from([
        ("ossb-tls", submitter_tls.clone()),
        ("source", source.join("ctx")),
    ]);
    let out = in_pod(&submitter, &image, &volumes, &client_ns, &unique("tekton"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Tekton step's ossb-submit failed ({:?}):\n{stderr}\n{}",
        out.status.code(),
        logs()
    );
    assert!(
        stderr.contains("(native)") && stderr.contains("(emulated)"),
        "{stderr}"
    );
    for (platform, want) in [
        ("linux/amd64", "amd64 x86_64 from-the-topology\n"),
        ("linux/arm64", "arm64 aarch64 from-the-topology\n"),
    ] {
        let run = podman_run(&pushed, &["--platform", platform]).success("podman run --platform");
        assert_eq!(run.stdout, want, "{platform}");
    }
    // The pushed index has both platforms (and their attestations).
    let has_both = |image: &str| {
        let raw = inspect_raw(image);
        let index: Value = serde_json::from_str(&raw.stdout).unwrap();
        let archs: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap_or_else(|| panic!("{image} is not an index: {}", raw.stdout))
            .iter()
            .map(|m| m["platform"]["architecture"].as_str().unwrap())
            .collect();
        // The images, then the default provenance's attestation manifests.
        assert_eq!(archs, ["amd64", "arm64", "unknown", "unknown"], "{image}");
    };
    // What the tests change in the examples: the registry, plain HTTP.
    let test_registry = |text: &str, repository: &str| {
        text.replace(
            "registry.example.com/team/app",
            &format!("{registry}/{repository}"),
        )
        .replace("--push", &format!("--push --insecure-registry {registry}"))
    };

    // docs/ci/gitlab-ci.yml: the job's script, with sh, in the ossb image built on busybox (the
    // `-shell` image), as the runner's user, in the project directory, the File variables as
    // files.
    let gitlab = yaml_documents(&env, &workspace().join("docs/ci/gitlab-ci.yml"));
    let job = &gitlab[0]["build-image"];
    assert!(job["image"]["name"].as_str().unwrap().ends_with("-shell"));
    assert_eq!(job["image"]["entrypoint"], serde_json::json!([""]));
    let shell_image = ossb_shell_image(&env, dir.path(), &image);
    let gitlab_repo = format!("ci/{}", unique("gitlab"));
    let mut script = String::from("set -e\ncd \"$CI_PROJECT_DIR\"\n");
    for line in job["script"].as_array().unwrap() {
        script += &test_registry(line.as_str().unwrap(), &gitlab_repo);
        script += "\n";
    }
    let mut env_vars = image_env.clone();
    for (k, v) in job["variables"].as_object().unwrap() {
        env_vars.insert(k.clone(), v.as_str().unwrap().to_string());
    }
    let variables = secret_volume(&dir.path().join("gitlab-files"), &client_files, 0o644);
    for (var, file) in [
        ("OSSB_CA_CRT", "ca.crt"),
        ("OSSB_CLIENT_CRT", "client.crt"),
        ("OSSB_CLIENT_KEY", "client.key"),
    ] {
        env_vars.insert(var.into(), format!("/builds/tmp/{file}"));
    }
    env_vars.insert("CI_PROJECT_DIR".into(), "/builds/team/app".into());
    env_vars.insert(
        "CI_REGISTRY_IMAGE".into(),
        format!("{registry}/{gitlab_repo}"),
    );
    env_vars.insert(
        "CI_COMMIT_SHA".into(),
        "4b825dc642cb6eb9a060e54bf8d69288fbee4904".into(),
    );
    let runner = Container {
        argv: vec!["sh".into(), "-c".into(), script],
        env: env_vars,
        mounts: vec![
            ("/builds/team/app".into(), "source".into(), false),
            ("/builds/tmp".into(), "variables".into(), true),
            ("/tmp".into(), "tmp".into(), false),
        ],
        user: "1000:1000".into(),
        caps: Vec::new(),
        read_only_root: false,
        no_new_privs: false,
        hostname: Some("runner-x7k2p-project-1-concurrent-0".into()),
        own_userns: false,
        seccomp: None,
        apparmor: None,
        proc_mount: None,
    };
    let volumes = HashMap::from([
        ("source", source.join("ctx")),
        ("variables", variables),
        ("tmp", empty_dir(&dir.path().join("gitlab-tmp"), 0o1777)),
    ]);
    let out = in_pod(
        &runner,
        &shell_image,
        &volumes,
        &client_ns,
        &unique("gitlab"),
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "the GitLab job failed ({:?}):\n{}{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    has_both(&format!(
        "{}/{gitlab_repo}:4b825dc642cb6eb9a060e54bf8d69288fbee4904",
        env.registry()
    ));

    // docs/ci/github-actions.yml: the run steps, each with bash -eo pipefail as the runner does,
    // on this host in a client namespace, docker being podman, the secrets the cluster's.
    let workflow = yaml_documents(&env, &workspace().join("docs/ci/github-actions.yml"));
    let steps = workflow[0]["jobs"]["build"]["steps"].as_array().unwrap();
    tool("podman", &["pull", "-q", "--tls-verify=false", &image]).success("podman pull");
    tool(
        "podman",
        &["tag", &image, "registry.example.com/tools/ossb:0.1.0"],
    )
    .success("podman tag");
    let shims = dir.path().join("runner-bin");
    std::fs::create_dir(&shims).unwrap();
    std::fs::write(shims.join("docker"), "#!/bin/sh\nexec podman \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(shims.join("docker"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let runner_temp = dir.path().join("runner-temp");
    std::fs::create_dir(&runner_temp).unwrap();
    let checkout = dir.path().join("github-workspace");
    tool(
        "cp",
        &[
            "-a",
            source.join("ctx").to_str().unwrap(),
            checkout.to_str().unwrap(),
        ],
    )
    .success("the checkout");
    let github_repo = format!("ci/{}", unique("github"));
    let sha = "9fceb02d0ae598e95dc970b74767f19372d61af8";
    let secrets = [
        ("OSSB_CA_CRT", String::from_utf8(ca.clone()).unwrap()),
        (
            "OSSB_CLIENT_CRT",
            String::from_utf8(client_crt.clone()).unwrap(),
        ),
        (
            "OSSB_CLIENT_KEY",
            String::from_utf8(client_key.clone()).unwrap(),
        ),
        ("OSSB_COORDINATOR", format!("{svc}.{NAMESPACE}.svc:7100")),
    ];
    let mut outputs = String::new();
    for (i, step) in steps.iter().enumerate() {
        let Some(run) = step["run"].as_str() else {
            assert_eq!(
                step["uses"], "actions/checkout@v4",
                "a step the test does not know"
            );
            continue;
        };
        let mut run = test_registry(run, &github_repo);
        for (name, value) in &secrets {
            run = run.replace(&format!("${{{{ secrets.{name} }}}}"), value.trim_end());
        }
        assert!(
            !run.contains("${{"),
            "an expression the test does not know: {run}"
        );
        let file = dir.path().join(format!("github-step-{i}.sh"));
        std::fs::write(&file, &run).unwrap();
        let script = format!(
            "mount --bind {} /etc/hosts && cd {} && exec bash --noprofile --norc -eo pipefail {}",
            hosts.display(),
            checkout.display(),
            file.display()
        );
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client_ns,
                "unshare",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["bash", "-c", &script])
            .env(
                "PATH",
                format!("{}:{}", shims.display(), std::env::var("PATH").unwrap()),
            )
            .env("RUNNER_TEMP", &runner_temp)
            .env("GITHUB_SHA", sha)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the GitHub step {:?} failed ({:?}):\n{text}\n{}",
            step["name"],
            out.status.code(),
            logs()
        );
        outputs += &text;
    }
    let _ = tool("podman", &["rmi", "registry.example.com/tools/ossb:0.1.0"]);
    assert!(
        outputs.contains("\"containerimage.digest\""),
        "cat metadata.json:\n{outputs}"
    );
    has_both(&format!("{}/{github_repo}:{sha}", env.registry()));

    // Every node logs JSON lines (for log collectors), from the first line on.
    for log in cache_logs
        .iter()
        .chain(&worker_logs)
        .chain([&coordinator_log])
    {
        let text = std::fs::read_to_string(log).unwrap();
        for line in text.lines().take(5) {
            assert!(
                serde_json::from_str::<Value>(line).is_ok(),
                "{} logs JSON lines: {line}",
                log.display()
            );
        }
    }
}

/// The documents of a YAML file, as JSON values (PyYAML of the test environment's Python).
fn yaml_documents(env: &TestEnv, file: &Path) -> Vec<Value> {
    let out = Command::new(python(env))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(file)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "reading {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
