//! deploy/: the manifests validate, the ossb image builds and runs, and the rendered Job and
//! cache-node StatefulSet run with their own command lines, environment, mounts, users and
//! capabilities (tests/deploy/pod.sh), in network namespaces with /etc/hosts standing in for
//! the headless Services. The coordinator, worker and ossb-submit parts are added to
//! `cluster_topology_from_the_rendered_manifests` when those binaries exist.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// A container of a rendered pod template, ready to run with tests/deploy/pod.sh.
struct Container {
    argv: Vec<String>,
    env: HashMap<String, String>,
    /// mountPath -> (volume name, readOnly)
    mounts: Vec<(String, String, bool)>,
    user: String,
    caps: Vec<String>,
    read_only_root: bool,
    no_new_privs: bool,
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
        let mut env: HashMap<String, String> = c["env"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| {
                        Some((
                            e["name"].as_str()?.to_string(),
                            e["value"].as_str()?.to_string(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
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
        }
    }

    /// The pod.sh command line; `volumes` maps volume names to host directories.
    fn command(
        &self,
        rootfs: &Path,
        volumes: &HashMap<&str, PathBuf>,
        netns: Option<&str>,
        hosts: Option<&Path>,
    ) -> Command {
        let mut cmd = Command::new(workspace().join("tests/deploy/pod.sh"));
        cmd.arg("--rootfs")
            .arg(rootfs)
            .arg("--user")
            .arg(&self.user);
        cmd.arg("--caps").arg(self.caps.join(",").to_lowercase());
        if self.read_only_root {
            cmd.arg("--ro-root");
        }
        if self.no_new_privs {
            cmd.arg("--no-new-privs");
        }
        if let Some(ns) = netns {
            cmd.arg("--netns").arg(ns);
        }
        if let Some(h) = hosts {
            cmd.arg("--hosts").arg(h);
        }
        for (path, volume, ro) in &self.mounts {
            let src = volumes.get(volume.as_str()).unwrap_or_else(|| {
                panic!("the test provides no volume {volume} (mounted at {path})")
            });
            cmd.arg("--mount").arg(format!(
                "{}:{path}{}",
                src.display(),
                if *ro { ":ro" } else { "" }
            ));
        }
        for (k, v) in &self.env {
            cmd.arg("--env").arg(format!("{k}={v}"));
        }
        cmd.arg("--").args(&self.argv);
        cmd
    }
}

/// Builds deploy/Dockerfile with ossb from the test's own ossb binary and returns
/// (image reference pushed to the test registry, unpacked root filesystem).
fn ossb_image(env: &TestEnv, dir: &Path) -> (String, PathBuf) {
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
    let rootfs = dir.join("image-rootfs");
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
    ossb(
        env,
        &cache,
        &[
            "build",
            "--insecure-registry",
            &reg,
            "-f",
            ctx.join("Dockerfile").to_str().unwrap(),
            "-o",
            &format!("type=local,dest={}", rootfs.display()),
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build of deploy/Dockerfile to a directory");
    (image, rootfs)
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
}

#[test]
fn ossb_image_is_built_by_ossb_and_runs_in_podman() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = ossb_image(&env, dir.path());
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
    let config = tool(
        "skopeo",
        &[
            "inspect",
            "--config",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ],
    )
    .success("skopeo inspect --config");
    let config: Value = serde_json::from_str(&config.stdout).unwrap();
    assert_eq!(
        config["config"]["User"], "1000:1000",
        "the image runs as a non-root user"
    );
}

/// The chroot Job (tests/deploy/job-test, the chroot overlay plus the test registry) builds a
/// ConfigMap-shaped context and pushes it; a broken Dockerfile exits 2 (FailJob in the Job's
/// podFailurePolicy) and the log says why.
#[test]
fn job_manifest_builds_and_pushes_and_fails_on_a_broken_dockerfile() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, rootfs) = ossb_image(&env, dir.path());
    let objects = render(&env, "tests/deploy/job-test");
    let job = find(&objects, "Job", "ossb-build");
    let reg = env.registry();
    let rules = job["spec"]["podFailurePolicy"]["rules"].as_array().unwrap();
    assert!(rules
        .iter()
        .any(|r| r["action"] == "FailJob" && r["onExitCodes"]["values"] == serde_json::json!([2])));
    assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never");

    // The ConfigMap ossb-build-context as the kubelet writes it: one file per key.
    let context = dir.path().join("configmap");
    std::fs::create_dir(&context).unwrap();
    std::fs::write(context.join("Dockerfile"), format!("FROM {reg}/{}\nCOPY message.txt /message.txt\nRUN echo built in a Job >> /message.txt\nCMD [\"cat\", \"/message.txt\"]\n", env.var("OSSB_TEST_BUSYBOX"))).unwrap();
    std::fs::write(context.join("message.txt"), "hello from a ConfigMap\n").unwrap();
    // The dockerconfigjson Secret, its .dockerconfigjson key projected as config.json.
    let creds = dir.path().join("secret");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(
        Path::new(&env.var("DOCKER_CONFIG")).join("config.json"),
        creds.join("config.json"),
    )
    .unwrap();
    let destination = format!("{reg}/jobs/{}:1", unique("hello"));
    let run_job = |ctx: &Path, cache: &Path| {
        let c = Container::from(
            &job["spec"]["template"],
            "build",
            &[
                ("OSSB_DESTINATION", &destination),
                ("OSSB_TEST_REGISTRY", &reg),
            ],
        );
        let tmp = tempfile::tempdir_in(dir.path()).unwrap();
        let volumes: HashMap<&str, PathBuf> = [
            ("context", ctx.to_path_buf()),
            ("registry-credentials", creds.clone()),
            ("cache", cache.to_path_buf()),
            ("tmp", tmp.path().to_path_buf()),
        ]
        .into();
        let out = c.command(&rootfs, &volumes, None, None).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let (code, log) = run_job(&context, &cache);
    assert_eq!(code, 0, "the Job's build failed:\n{log}");
    assert!(
        log.contains("RUN echo built in a Job"),
        "plain progress in the log:\n{log}"
    );
    let run = podman_run(&destination, &[]).success("podman run of the Job's image");
    assert_eq!(run.stdout, "hello from a ConfigMap\nbuilt in a Job\n");

    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(
        broken.join("Dockerfile"),
        format!(
            "FROM {reg}/{}\nCOPPY message.txt /\n",
            env.var("OSSB_TEST_BUSYBOX")
        ),
    )
    .unwrap();
    let (code, log) = run_job(&broken, &cache);
    assert_eq!(code, 2, "a broken Dockerfile must exit 2 (FailJob):\n{log}");
    assert!(
        log.contains("Dockerfile:2"),
        "the log names the line:\n{log}"
    );
}

/// Network namespaces joined by a bridge in a namespace of their own (nothing is added to the
/// host's network), one per pod, removed when dropped.
struct Net {
    prefix: String,
    pods: Vec<String>,
}

impl Net {
    fn new() -> Net {
        let prefix = format!("ossbt{}", std::process::id());
        let net = Net {
            prefix: prefix.clone(),
            pods: Vec::new(),
        };
        ip(&["netns", "add", &net.switch()]);
        ip(&["-n", &net.switch(), "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.switch(), "link", "set", "br0", "up"]);
        net
    }
    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }
    /// A pod namespace with address 10.213.0.N; returns its name.
    fn pod(&mut self, n: usize) -> String {
        let ns = format!("{}-p{n}", self.prefix);
        ip(&["netns", "add", &ns]);
        let host_end = format!("v{n}");
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &self.switch(),
            "link",
            "set",
            &host_end,
            "master",
            "br0",
            "up",
        ]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.213.0.{n}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        self.pods.push(ns.clone());
        ns
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.pods.iter().chain(std::iter::once(&self.switch())) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Pods(Vec<std::process::Child>);
impl Drop for Pods {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // pod.sh execs unshare --fork: killing it kills the pod's pid namespace
            let _ = c.kill();
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

/// The cluster of deploy/cluster/base as processes: what exists today is the peer cache (the
/// StatefulSet's three cache nodes, started from its rendered command line, env and mounts in
/// their own network namespaces, names resolving as the headless Service ossb-cache would, the
/// TLS Secret made by the certs Job's own `ossb certs init` command line). Each pod's readiness
/// probe (/healthz) must answer. The coordinator's and workers' rendered command lines are
/// checked against `ossb coordinator --help` / `ossb worker --help`.
#[test]
fn cluster_topology_from_the_rendered_manifests() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, rootfs) = ossb_image(&env, dir.path());
    let objects = render(&env, "deploy/cluster/base");
    let certs = render(&env, "deploy/cluster/certs-job");

    // The certs Job's init container, run as written (POD_NAMESPACE from the downward API).
    let certs_job = find(&certs, "Job", "ossb-certs");
    let init = &certs_job["spec"]["template"]["spec"]["initContainers"][0];
    let mut ns_env = HashMap::new();
    ns_env.insert("POD_NAMESPACE".to_string(), "ossb-test".to_string());
    let args: Vec<String> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| expand(a.as_str().unwrap(), &ns_env))
        .collect();
    let certs_dir = dir.path().join("certs");
    std::fs::create_dir(&certs_dir).unwrap();
    let args: Vec<String> = args
        .into_iter()
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
    // The Secret ossb-node-tls as the kubelet writes it (files of the keys the Job stores).
    let node_tls = dir.path().join("ossb-node-tls");
    std::fs::create_dir(&node_tls).unwrap();
    for f in ["ca.crt", "node.crt", "node.key"] {
        std::fs::copy(certs_dir.join("new").join(f), node_tls.join(f)).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;
    for f in std::fs::read_dir(&node_tls).unwrap() {
        let f = f.unwrap().path();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o440)).unwrap();
        std::os::unix::fs::chown(&f, Some(0), Some(1000)).unwrap(); // fsGroup 1000
    }

    let sts = find(&objects, "StatefulSet", "ossb-cache");
    let svc = find(&objects, "Service", "ossb-cache");
    assert_eq!(svc["spec"]["clusterIP"], "None", "a headless Service");
    let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
    assert_eq!(replicas, 3);
    let service = sts["spec"]["serviceName"].as_str().unwrap();
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let probe_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == container["readinessProbe"]["httpGet"]["port"])
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    let probe_path = container["readinessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap();

    let mut net = Net::new();
    let hosts = dir.path().join("hosts");
    let mut text = String::from("127.0.0.1 localhost\n");
    let pod_ns: Vec<String> = (0..replicas).map(|i| net.pod(10 + i)).collect();
    for i in 0..replicas {
        text += &format!(
            "10.213.0.{} {sts_name}-{i}.{service} {sts_name}-{i}.{service}.ossb-test.svc\n",
            10 + i,
            sts_name = sts["metadata"]["name"].as_str().unwrap()
        );
    }
    std::fs::write(&hosts, &text).unwrap();
    let client_ns = net.pod(100);

    let mut pods = Pods(Vec::new());
    for (i, ns) in pod_ns.iter().enumerate() {
        let c = Container::from(&sts["spec"]["template"], "cache-node", &[]);
        let data = dir.path().join(format!("pvc-data-{i}"));
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::chown(&data, Some(0), Some(1000)).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o2775)).unwrap();
        let volumes: HashMap<&str, PathBuf> = [("data", data), ("tls", node_tls.clone())].into();
        let log = std::fs::File::create(dir.path().join(format!("cache-{i}.log"))).unwrap();
        let child = c
            .command(&rootfs, &volumes, Some(ns), Some(&hosts))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        pods.0.push(child);
    }
    for i in 0..replicas {
        let url = format!(
            "http://{}-{i}.{service}:{probe_port}{probe_path}",
            sts["metadata"]["name"].as_str().unwrap()
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_get_in(&client_ns, &hosts, &url).is_some_and(|b| b == "ok\n") {
                break;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.path().join(format!("cache-{i}.log")))
                    .unwrap_or_default();
                panic!("{url} never answered ok (readiness probe):\n{log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // JSON logs for collectors: the first line of each node's stdout is a JSON object.
    for i in 0..replicas {
        let log = std::fs::read_to_string(dir.path().join(format!("cache-{i}.log"))).unwrap();
        let first = log.lines().next().unwrap_or("");
        assert!(
            serde_json::from_str::<Value>(first).is_ok(),
            "cache-{i} logs JSON: {first}"
        );
    }

    // The coordinator's and workers' command lines against the binaries' own flags: every
    // --flag the manifests pass must be one the subcommand knows. (Running them in the same
    // namespaces and submitting a build with ossb-submit is the next step of this test.)
    let emulated = render(&env, "deploy/cluster/overlays/emulated-arm64");
    for (objs, kind, name, container) in [
        (&objects, "StatefulSet", "ossb-coordinator", "coordinator"),
        (&objects, "Deployment", "ossb-worker-amd64", "worker"),
        (&objects, "Deployment", "ossb-worker-arm64", "worker"),
        (&emulated, "Deployment", "ossb-worker-arm64", "worker"),
    ] {
        let c = Container::from(&find(objs, kind, name)["spec"]["template"], container, &[]);
        let sub = &c.argv[1];
        let help = Command::new(env!("CARGO_BIN_EXE_ossb"))
            .args([sub.as_str(), "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        for flag in c.argv[2..].iter().filter(|a| a.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")),
                "{kind}/{name}: `ossb {sub}` has no {flag}:\n{help}"
            );
        }
    }
}
