//! The build cluster as real processes: two `ossb cache-node`s, an `ossb coordinator`, a native
//! amd64 `ossb worker` and an amd64 worker that emulates arm64, driven by `ossb-submit`. Every
//! process runs in a network namespace of its own with its own address, as pods do (see
//! [`crate::netns`]); the tests and `ossb-submit` run on the host, and reach the registry through a
//! relay on the host's address. Where namespaces cannot be made (no root) the cluster runs on
//! loopback instead, except under CI=true, where that fails. Each process is its own process group,
//! so "kill -9 of a worker" kills the worker and everything it started, as when its machine dies.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fault_proxy::{Fault, Proxy, Rule};
use crate::netns::{relay, Net};
use crate::support::{inspect_raw, podman_run, tool, unique, TestEnv};

/// The cluster's processes, killed (with their process groups) when dropped, then their
/// namespaces.
pub(crate) struct Cluster {
    pub(crate) dir: PathBuf,
    pub(crate) tls: PathBuf,
    children: Vec<(String, Child)>,
    pub(crate) coordinator: String,
    pub(crate) metrics: String,
    docker_config: String,
    peers: String,
    /// The plain test registry as the cluster reaches it.
    pub(crate) registry: String,
    /// The namespaces, `None` on loopback.
    net: Option<Net>,
    /// Each process's node number on `net` (its address 10.214.K.N), by name.
    nodes: Vec<(String, u8)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            kill_group(c.id());
            let _ = c.wait();
        }
        // Kept for a look at the logs when the test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

fn certs_init(dir: &Path) {
    certs_init_with(dir, &[]);
}

/// `ossb certs init DIR --san NAME...`.
fn certs_init_with(dir: &Path, sans: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ossb"));
    cmd.args(["certs", "init", dir.to_str().unwrap()]);
    for san in sans {
        cmd.args(["--san", san]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "ossb certs init failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The workers of [`Cluster::start`]: a native amd64 one and an amd64 one that emulates arm64.
const DEFAULT_WORKERS: &[(&str, &[&str])] = &[
    ("amd64-native", &[]),
    ("amd64-emulating-arm64", &["--emulate", "linux/arm64"]),
];

/// Node numbers on the namespaces' network: cache nodes from .10, the coordinator at .20,
/// workers from .30.
const CACHE_NODE: u8 = 10;
const COORDINATOR_NODE: u8 = 20;
const WORKER_NODE: u8 = 30;

impl Cluster {
    pub(crate) fn start(env: &TestEnv) -> Cluster {
        Cluster::start_with(env, DEFAULT_WORKERS)
    }

    /// A cluster whose workers (all native amd64) are `workers`: (name, extra arguments),
    /// each process in a namespace of its own.
    pub(crate) fn start_with(env: &TestEnv, workers: &[(&str, &[&str])]) -> Cluster {
        let net = Net::new();
        if net.is_none() {
            eprintln!("network namespaces cannot be made here: the cluster runs on loopback");
        }
        Cluster::start_on(env, net, workers)
    }

    /// The cluster with every process on the host's loopback.
    fn start_on_loopback(env: &TestEnv, workers: &[(&str, &[&str])]) -> Cluster {
        Cluster::start_on(env, None, workers)
    }

    fn start_on(env: &TestEnv, net: Option<Net>, workers: &[(&str, &[&str])]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ossb-cluster-")
            .tempdir()
            .unwrap()
            .keep();
        let tls = dir.join("tls");
        // On loopback every process needs ports of its own; in namespaces each has its own
        // address and the same ports, as pods have.
        let addr = |node: u8, port: u16, free: fn() -> u16| match &net {
            Some(net) => format!("{}:{port}", net.addr(node)),
            None => format!("127.0.0.1:{}", free()),
        };
        let cache_nodes: Vec<String> = (0..2)
            .map(|i| addr(CACHE_NODE + i, 7100, free_udp_port))
            .collect();
        let coordinator = addr(COORDINATOR_NODE, 7000, free_udp_port);
        let metrics = addr(COORDINATOR_NODE, 9090, free_tcp_port);
        match &net {
            Some(net) => {
                let sans =
                    [CACHE_NODE, CACHE_NODE + 1, COORDINATOR_NODE].map(|node| net.addr(node));
                certs_init_with(&tls, &sans.each_ref().map(String::as_str));
            }
            None => certs_init(&tls),
        }
        let registry = match &net {
            Some(net) => relay(&format!("{}:0", net.host()), env.registry()),
            None => env.registry(),
        };
        let mut cluster = Cluster {
            dir: dir.clone(),
            tls: tls.clone(),
            children: Vec::new(),
            coordinator,
            metrics,
            docker_config: env.var("DOCKER_CONFIG"),
            peers: cache_nodes.join(","),
            registry,
            net,
            nodes: Vec::new(),
        };
        for (i, listen) in cache_nodes.iter().enumerate() {
            let data = dir.join(format!("cache{i}"));
            let peers = cluster.peers.clone();
            cluster.spawn(
                &format!("cache{i}"),
                CACHE_NODE + i as u8,
                &[
                    "cache-node",
                    "--listen",
                    listen,
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--tls-dir",
                    tls.to_str().unwrap(),
                    "--peers",
                    &peers,
                ],
            );
        }
        cluster.spawn_coordinator();
        for (name, extra) in workers {
            cluster.spawn_worker(name, extra);
        }
        let emulating = workers
            .iter()
            .filter(|(_, extra)| extra.contains(&"linux/arm64"))
            .count();
        let (native, emulated) = (
            format!(
                "ossb_workers{{platform=\"linux/amd64\",mode=\"native\"}} {}",
                workers.len()
            ),
            format!("ossb_workers{{platform=\"linux/arm64\",mode=\"emulated\"}} {emulating}"),
        );
        cluster
            .wait_for_metrics(|m| m.contains(&native) && (emulating == 0 || m.contains(&emulated)));
        cluster
    }

    /// `addr` (a server on the host's loopback) as the cluster's processes reach it.
    fn reach(&self, addr: &str) -> String {
        match &self.net {
            Some(net) => relay(&format!("{}:0", net.host()), addr.to_string()),
            None => addr.to_string(),
        }
    }

    /// The test busybox image on the registry, as the cluster names it.
    pub(crate) fn busybox(&self, env: &TestEnv) -> String {
        format!("{}/{}", self.registry, env.var("OSSB_TEST_BUSYBOX"))
    }

    /// Starts a native amd64 worker with 2 slots and its work directory in the cluster's
    /// (unless `extra` says) and `extra` arguments, on the next node (or
    /// on its own node again, when a worker of that name ran before).
    pub(crate) fn spawn_worker(&mut self, name: &str, extra: &[&str]) {
        let node = match self.nodes.iter().find(|(n, _)| n == name) {
            Some((_, node)) => *node,
            None => {
                WORKER_NODE + self.nodes.iter().filter(|(_, n)| *n >= WORKER_NODE).count() as u8
            }
        };
        let work = self.dir.join(name);
        let (coordinator, tls, peers) = (
            self.coordinator.clone(),
            self.tls.clone(),
            self.peers.clone(),
        );
        let mut args = vec![
            "worker",
            "--coordinator",
            &coordinator,
            "--platform",
            "linux/amd64",
            "--tls-dir",
            tls.to_str().unwrap(),
            "--cache-peers",
            &peers,
            "--name",
            name,
        ];
        if !extra.contains(&"--slots") {
            args.extend_from_slice(&["--slots", "2"]);
        }
        if !extra.contains(&"--work-dir") {
            args.extend_from_slice(&["--work-dir", work.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        self.spawn(name, node, &args);
    }

    fn spawn_coordinator(&mut self) {
        let (state, tls) = (self.dir.join("state"), self.tls.clone());
        let (listen, metrics) = (self.coordinator.clone(), self.metrics.clone());
        self.spawn(
            "coordinator",
            COORDINATOR_NODE,
            &[
                "coordinator",
                "--listen",
                &listen,
                "--state-dir",
                state.to_str().unwrap(),
                "--tls-dir",
                tls.to_str().unwrap(),
                "--metrics",
                &metrics,
            ],
        );
    }

    /// `kill -9` of the coordinator, then a new one with the same address and state dir.
    pub(crate) fn restart_coordinator(&mut self) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == "coordinator")
            .unwrap();
        let (_, mut old) = self.children.remove(i);
        kill_group(old.id());
        let _ = old.wait();
        let log = self.dir.join("coordinator.log");
        let _ = std::fs::rename(&log, self.dir.join("coordinator-before-restart.log"));
        self.spawn_coordinator();
    }

    /// Starts `ossb ARGS` as `name`, in the namespace of node `node` when the cluster has
    /// namespaces.
    fn spawn(&mut self, name: &str, node: u8, args: &[&str]) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let err = log.try_clone().unwrap();
        if !self.nodes.iter().any(|(n, _)| n == name) {
            self.nodes.push((name.to_string(), node));
        }
        let mut cmd = match &mut self.net {
            // `ip netns exec` execs the program: the pid (and process group) is ossb's.
            Some(net) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &net.node(node), env!("CARGO_BIN_EXE_ossb")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_ossb")),
        };
        let child = cmd
            .args(args)
            .env("DOCKER_CONFIG", &self.docker_config)
            .env("OSSB_LOG", "info")
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    /// Takes the link of process `name`'s node down (`up == false`) or up again.
    fn link(&self, name: &str, up: bool) {
        let net = self.net.as_ref().expect("a cluster in namespaces");
        let (_, node) = self
            .nodes
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        net.link(*node, up);
    }

    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        for (name, _) in &self.children {
            let text =
                std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {name} (last lines) ---\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub(crate) fn metrics_text(&self) -> String {
        http_get(&self.metrics, "/metrics").unwrap_or_default()
    }

    pub(crate) fn wait_for_metrics(&self, ok: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = self.metrics_text();
            if ok(&m) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not reach the expected state; metrics:\n{m}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ossb-submit` with the cluster's coordinator and certificates, then `args`.
    pub(crate) fn submit(&self, tls: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ossb-submit"));
        cmd.args([
            "--coordinator",
            &self.coordinator,
            "--tls-dir",
            tls.to_str().unwrap(),
            "--progress",
            "plain",
        ])
        .args(args)
        .env("OSSB_CACHE_DIR", self.dir.join("client-cache"))
        .env("DOCKER_CONFIG", &self.docker_config);
        cmd
    }

    /// `ossb-submit bake` with the cluster's coordinator and certificates, then `args`.
    pub(crate) fn submit_bake(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ossb-submit"));
        cmd.arg("bake")
            .args(["--coordinator", &self.coordinator, "--tls-dir"])
            .arg(&self.tls)
            .args(["--progress", "plain"])
            .args(args)
            .env("OSSB_CACHE_DIR", self.dir.join("client-cache"))
            .env("DOCKER_CONFIG", &self.docker_config);
        cmd
    }

    /// `ossb-submit --platform PLATFORMS --insecure-registry REGISTRY -t IMAGE --push CTX`
    /// with the cluster's certificates.
    fn submit_push(&self, platforms: &str, registry: &str, image: &str, ctx: &Path) -> Command {
        self.submit(
            &self.tls,
            &[
                "--platform",
                platforms,
                "--insecure-registry",
                registry,
                "-t",
                image,
                "--push",
                ctx.to_str().unwrap(),
            ],
        )
    }

    /// [`Cluster::submit_push`] run to the end; fails with the client's and the cluster's logs
    /// unless it succeeded. Returns the client's stderr.
    pub(crate) fn push_ok(
        &self,
        platforms: &str,
        registry: &str,
        image: &str,
        ctx: &Path,
    ) -> String {
        let out = self
            .submit_push(platforms, registry, image, ctx)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{stderr}\n{}", self.logs());
        stderr
    }

    /// `kill -9` of process `name` (its whole process group), as when its machine dies.
    pub(crate) fn kill(&mut self, name: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let (_, mut child) = self.children.remove(i);
        kill_group(child.id());
        let _ = child.wait();
    }

    pub(crate) fn pid_of(&self, name: &str) -> u32 {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
            .unwrap_or_else(|| panic!("no process {name}"))
    }
}

/// The value of the sample `name_and_labels` (exactly as /metrics writes it) in `text`.
fn sample(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The sum of every sample of `name` whose labels contain `label`.
pub(crate) fn sum_of(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The digest of a manifest or index from its bytes as pushed.
pub(crate) fn index_digest(raw: &str) -> String {
    format!("sha256:{}", crate::sha256_hex(raw.as_bytes()))
}

/// A two-platform, multi-stage build through `ossb-submit --push`, split into stage tasks: the
/// `$BUILDPLATFORM` tools stage runs natively on amd64 for both platforms, once (the other
/// task takes its steps from the cluster's step cache), the arm64 stages run on the emulating
/// worker, the index is pushed and both images run with the architecture they were built
/// for. A client whose certificate another CA signed is refused, and /metrics counts the
/// build and the workers.
#[test]
fn cluster_builds_two_platforms_and_pushes_one_index() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start(&env);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let dockerfile = format!(
        "FROM --platform=$BUILDPLATFORM {bb} AS tools\n\
         RUN head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n' > /id && uname -m > /tools-arch\n\
         FROM {bb} AS build\nARG TARGETARCH\nCOPY note.txt /note.txt\nCOPY --from=tools /id /tools-arch /\n\
         RUN echo \"$TARGETARCH $(uname -m) $(cat /note.txt) tools=$(cat /tools-arch) $(cat /id)\" > /arch\n\
         FROM {bb}\nCOPY --from=build /arch /arch\nCMD [\"cat\", \"/arch\"]\n",
        bb = cluster.busybox(&env)
    );
    let ctx = crate::support::context(
        work.path(),
        &dockerfile,
        &[("note.txt", "from-the-cluster")],
    );
    let image = format!("{reg}/tests/{}:latest", unique("cluster"));
    let out = cluster
        .submit_push("linux/amd64,linux/arm64", &reg, &image, &ctx)
        .args([
            "--annotation",
            "index:org.opencontainers.image.title=cluster-built",
        ])
        .args([
            "--annotation",
            "org.opencontainers.image.source=https://example.com/c",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ossb-submit failed ({:?}):\n{stderr}\n{}",
        out.status.code(),
        cluster.logs()
    );
    for (platform, stage, how) in [
        ("linux/amd64", 0, "native"),
        ("linux/amd64", 1, "native"),
        ("linux/amd64", 2, "native"),
        ("linux/arm64", 0, "native"),
        ("linux/arm64", 1, "emulated"),
        ("linux/arm64", 2, "emulated"),
    ] {
        let line = format!("{platform} stage {stage} scheduled on worker amd64-");
        let found = stderr
            .lines()
            .any(|l| l.contains(&line) && l.ends_with(&format!("({how})")));
        assert!(found, "no {line:?} ({how}) in\n{stderr}");
    }
    let raw = crate::support::inspect_raw(&image);
    let index: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let archs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"]["architecture"].as_str().unwrap())
        .collect();
    // The images, then the default provenance's attestation manifests.
    assert_eq!(archs, ["amd64", "arm64", "unknown", "unknown"]);
    // --annotation: the coordinator's index and the workers' manifests carry theirs.
    assert_eq!(
        index["annotations"]["org.opencontainers.image.title"],
        "cluster-built"
    );
    let repo = image.rsplit_once(':').unwrap().0;
    let images = index["manifests"].as_array().unwrap().iter();
    for m in images.filter(|m| m["platform"]["os"] == "linux") {
        let by_digest = format!("docker://{repo}@{}", m["digest"].as_str().unwrap());
        let raw = tool(
            "skopeo",
            &["inspect", "--raw", "--tls-verify=false", &by_digest],
        )
        .success("skopeo inspect --raw of a manifest");
        let manifest: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.source"],
            "https://example.com/c"
        );
    }
    let mut ids = Vec::new();
    for (platform, want) in [
        ("linux/amd64", "amd64 x86_64 from-the-cluster tools=x86_64 "),
        (
            "linux/arm64",
            "arm64 aarch64 from-the-cluster tools=x86_64 ",
        ),
    ] {
        let run = podman_run(&image, &["--platform", platform]).success("podman run --platform");
        let id = run
            .stdout
            .strip_prefix(want)
            .unwrap_or_else(|| panic!("{platform}: {:?} does not start with {want:?}", run.stdout));
        assert_eq!(id.trim().len(), 32, "{platform}: {:?}", run.stdout);
        ids.push(id.to_string());
    }
    assert_eq!(
        ids[0], ids[1],
        "the tools stage ran once for both platforms"
    );
    let m = cluster.metrics_text();
    let shared = sample(&m, "ossb_cluster_steps_total{answer=\"record\"}").unwrap_or(0);
    assert!(
        shared >= 1,
        "no step came from the cluster's step cache:\n{m}"
    );

    // The same build again, also written as an OCI layout: the context is already on the
    // coordinator (nothing is sent), every step comes from the workers' step caches, and the
    // layout is downloaded from the peer cache.
    let layout = work.path().join("image.tar");
    let oci = format!("type=oci,dest={}", layout.display());
    let again = cluster
        .submit(
            &cluster.tls,
            &[
                "--platform",
                "linux/amd64,linux/arm64",
                "--insecure-registry",
                &reg,
                "-t",
                &image,
                "--push",
                "--output",
                &oci,
                ctx.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}\n{}", cluster.logs());
    assert!(stderr.contains("sending 0 of 2 context files"), "{stderr}");
    let unpacked = work.path().join("layout");
    std::fs::create_dir(&unpacked).unwrap();
    tool(
        "tar",
        &[
            "-xf",
            layout.to_str().unwrap(),
            "-C",
            unpacked.to_str().unwrap(),
        ],
    )
    .success("tar -x of the OCI layout");
    let top: serde_json::Value =
        serde_json::from_slice(&std::fs::read(unpacked.join("index.json")).unwrap()).unwrap();
    let digest = top["manifests"][0]["digest"].as_str().unwrap().to_string();
    // Image configs carry the build time, so the second build pushed a new index.
    let pushed = crate::support::inspect_raw(&image);
    assert_eq!(
        index_digest(&pushed.stdout),
        digest,
        "the layout holds the index that was pushed"
    );
    // Every blob the index reaches is in the layout and matches its digest.
    let blob = |d: &str| {
        let bytes = std::fs::read(unpacked.join("blobs/sha256").join(&d[7..]))
            .unwrap_or_else(|e| panic!("blob {d} missing from the layout: {e}"));
        assert_eq!(format!("sha256:{}", crate::sha256_hex(&bytes)), d);
        bytes
    };
    let nested: serde_json::Value = serde_json::from_slice(&blob(&digest)).unwrap();
    for m in nested["manifests"].as_array().unwrap() {
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(m["digest"].as_str().unwrap())).unwrap();
        blob(manifest["config"]["digest"].as_str().unwrap());
        for layer in manifest["layers"].as_array().unwrap() {
            blob(layer["digest"].as_str().unwrap());
        }
    }

    // A client with a certificate from another CA is refused. It trusts the cluster's CA, so
    // that the refusal is the coordinator's.
    let stranger = work.path().join("stranger");
    certs_init(&stranger);
    std::fs::copy(cluster.tls.join("ca.crt"), stranger.join("ca.crt")).unwrap();
    let refused = cluster
        .submit(&stranger, &["-t", &image, "--push", ctx.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("build cluster"), "{stderr}");

    let metrics = cluster.metrics_text();
    for line in [
        "ossb_builds_finished_total{status=\"succeeded\"} 2",
        "ossb_builds_finished_total{status=\"failed\"} 0",
        "ossb_builds_running 0",
        "ossb_builds_queued 0",
        "ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 2",
        "ossb_workers{platform=\"linux/arm64\",mode=\"emulated\"} 1",
        "ossb_steps_total{worker=\"amd64-emulating-arm64\",result=\"cached\"}",
        "ossb_steps_by_platform_total{platform=\"linux/arm64\",mode=\"emulated\",result=\"run\"}",
        "ossb_steps_by_platform_total{platform=\"linux/amd64\",mode=\"native\",result=\"cached\"}",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert_eq!(
        http_get(&cluster.metrics, "/healthz").as_deref(),
        Some("ok\n")
    );
}

/// `kill -9` of the worker running a step: the coordinator notices the missing heartbeats,
/// schedules the task on the other worker, and the build succeeds.
#[test]
fn killed_worker_task_is_rescheduled_and_the_build_succeeds() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start(&env);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("kill");
    let dockerfile = format!(
        "FROM {}\nRUN echo \"start {marker}\" && sleep 6 && echo finished > /done\nCMD [\"cat\", \"/done\"]\n",
        cluster.busybox(&env)
    );
    let ctx = crate::support::context(work.path(), &dockerfile, &[]);
    let image = format!("{reg}/tests/{marker}:latest");
    let log = work.path().join("submit.log");
    let mut child = cluster
        .submit_push("linux/amd64", &reg, &image, &ctx)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Wait until the RUN step prints, then kill the worker it runs on.
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!("start {marker}")) {
            let name = text
                .lines()
                .find_map(|l| {
                    l.split("linux/amd64 stage 0 scheduled on worker ")
                        .nth(1)
                        .and_then(|rest| rest.split(' ').next())
                })
                .expect("the scheduling is reported")
                .to_string();
            break name;
        }
        assert!(
            Instant::now() < deadline,
            "the step never started:\n{text}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    kill_group(cluster.pid_of(&victim));
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{text}\n{}", cluster.logs());
    assert!(
        text.contains(&format!("worker {victim} was lost")),
        "{text}"
    );
    let other = if victim == "amd64-native" {
        "amd64-emulating-arm64"
    } else {
        "amd64-native"
    };
    assert!(
        text.contains(&format!("linux/amd64 stage 0 scheduled on worker {other}")),
        "{text}"
    );
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(run.stdout, "finished\n");
    let metrics = cluster.metrics_text();
    assert!(
        metrics.contains("ossb_tasks_rescheduled_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 1"),
        "{metrics}"
    );
}

/// Reads `path` until it contains `what`, failing after `secs` with the cluster's logs.
pub(crate) fn wait_for_text(cluster: &Cluster, path: &Path, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(what) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited {secs}s for {what:?}:\n{text}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a child with a deadline, killing it (and failing) when it hangs.
pub(crate) fn wait_child(
    cluster: &Cluster,
    child: &mut Child,
    log: &Path,
    secs: u64,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the client still runs after {secs}s:\n{}\n{}",
                std::fs::read_to_string(log).unwrap_or_default(),
                cluster.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The coordinator killed with SIGKILL while one build runs and another is queued behind it
/// (one worker, one slot), then restarted on the same state dir: both builds run to the end
/// and their clients, which lost the connection, are told so and exit 0. The step records
/// outlive a second restart: a fresh worker (empty cache) given the first build again runs
/// no step, every one answered from the coordinator's records.
#[test]
fn builds_queued_and_running_survive_a_killed_coordinator() {
    let Some(env) = TestEnv::get() else { return };
    let mut cluster = Cluster::start_with(&env, &[("worker-a", &["--slots", "1"])]);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("restart");
    let submit = |name: &str, dockerfile: String| {
        let dir = work.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let ctx = crate::support::context(&dir, &dockerfile, &[]);
        let image = format!("{reg}/tests/{marker}-{name}:latest");
        let log = dir.join("submit.log");
        let child = cluster
            .submit_push("linux/amd64", &reg, &image, &ctx)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        (ctx, image, log, child)
    };
    let bb = cluster.busybox(&env);
    let running = format!(
        "FROM {bb}\nRUN echo \"start {marker}\" && sleep 6 && echo ran > /ran\nCMD [\"cat\", \"/ran\"]\n"
    );
    let (ctx_a, image_a, log_a, mut a) = submit("running", running);
    wait_for_text(&cluster, &log_a, &format!("start {marker}"), 120);
    let (_, image_b, log_b, mut b) = submit(
        "queued",
        format!("FROM {bb}\nRUN echo queued > /q\nCMD [\"cat\", \"/q\"]\n"),
    );
    wait_for_text(&cluster, &log_b, "accepted by", 60);
    cluster.restart_coordinator();
    for (child, log, image, out) in [
        (&mut a, &log_a, &image_a, "ran\n"),
        (&mut b, &log_b, &image_b, "queued\n"),
    ] {
        let status = wait_child(&cluster, child, log, 240);
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(status.success(), "{text}\n{}", cluster.logs());
        assert!(text.contains("lost the coordinator"), "{text}");
        let run =
            podman_run(image, &[]).success("podman run of a build that outlived its coordinator");
        assert_eq!(run.stdout, out);
    }

    // Nothing in memory, no worker cache: only the state dir's step records can answer.
    cluster.kill("worker-a");
    cluster.restart_coordinator();
    cluster.spawn_worker("worker-fresh", &["--slots", "1"]);
    cluster.wait_for_metrics(|m| {
        m.contains("ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 1")
    });
    let stderr = cluster.push_ok("linux/amd64", &reg, &image_a, &ctx_a);
    let m = cluster.metrics_text();
    assert_eq!(
        sum_of(&m, "ossb_steps_total", "result=\"run\""),
        0,
        "the resubmission ran steps:\n{stderr}\n{m}"
    );
    assert!(
        sum_of(&m, "ossb_steps_total", "result=\"cached\"") >= 1,
        "the resubmission's step was not answered from the records:\n{m}"
    );
}

/// An HTTP server on the host's loopback that answers every GET with `body` and counts them:
/// a package registry as a package manager's fetch sees it.
fn counting_http_server(
    body: &'static [u8],
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request);
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(body);
        }
    });
    (addr, count)
}

/// `RUN --mount=type=cache` follows the build: a step that fetches its dependencies into a
/// cache mount (as cargo fetches into ~/.cargo/registry, or npm into ~/.npm) runs on one
/// worker; the next build, with a changed source, runs on a fresh worker that never saw the
/// cache, and finds the dependencies there (brought from the peer cache): the fetch is not
/// repeated, by the step's output and by the package server's count.
#[test]
fn a_cache_mount_follows_the_build_to_another_worker() {
    let Some(env) = TestEnv::get() else { return };
    let mut cluster = Cluster::start_with(&env, &[("worker-a", &["--slots", "1"])]);
    let reg = cluster.registry.clone();
    let (server, fetches) = counting_http_server(b"dependency bytes\n");
    let packages = cluster.reach(&server);
    let work = tempfile::tempdir().unwrap();
    let marker = unique("cachemount");
    let dockerfile = format!(
        "FROM {bb}\nCOPY src /src\n\
         RUN --mount=type=cache,id=deps-{marker},target=/deps \
         if [ -f /deps/pkg ]; then echo \"deps: reused\"; \
         else wget -q -O /deps/pkg http://{packages}/pkg && echo \"deps: fetched\"; fi; \
         cat /deps/pkg /src > /out\n\
         CMD [\"cat\", \"/out\"]\n",
        bb = cluster.busybox(&env)
    );
    let image = format!("{reg}/tests/{marker}:latest");
    let build = |cluster: &Cluster, source: &str| {
        let dir = work.path().join(source);
        std::fs::create_dir(&dir).unwrap();
        let ctx = crate::support::context(&dir, &dockerfile, &[("src", source)]);
        cluster.push_ok("linux/amd64", &reg, &image, &ctx)
    };
    // The step's own output line (its name shows the script, both words included).
    let said = |log: &str, what: &str| log.lines().any(|l| l.ends_with(what) && !l.contains("RUN"));
    let first = build(&cluster, "one\n");
    assert!(said(&first, "deps: fetched"), "{first}");
    cluster.kill("worker-a");
    cluster.spawn_worker("worker-b", &["--slots", "1"]);
    // worker-a dropped (no heartbeat), worker-b registered.
    cluster.wait_for_metrics(|m| {
        m.contains("ossb_workers_lost_total 1")
            && m.contains("ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 1")
    });
    let second = build(&cluster, "two\n");
    assert!(second.contains("scheduled on worker worker-b"), "{second}");
    assert!(
        said(&second, "deps: reused"),
        "the cache mount did not follow:\n{second}\n{}",
        cluster.logs()
    );
    assert!(
        second.contains(&format!(
            "cache mount deps-{marker}: brought from the peer cache"
        )),
        "{second}"
    );
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(run.stdout, "dependency bytes\ntwo\n");
}

/// A platform no worker builds, natively or emulated, fails the build after the grace period
/// (not forever), naming the platform and the workers there are; the build's other task,
/// already running, is cancelled with it (its RUN process killed) instead of running on.
#[test]
fn a_platform_no_worker_builds_fails_fast_and_cancels_the_sibling_task() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start(&env);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("cancel");
    let dockerfile = format!(
        "FROM {}\nRUN echo \"start-{marker}\" && sleep 120\n",
        cluster.busybox(&env)
    );
    let ctx = crate::support::context(work.path(), &dockerfile, &[]);
    let t = Instant::now();
    let out = cluster
        .submit(
            &cluster.tls,
            &[
                "--platform",
                "linux/amd64,linux/riscv64",
                "--insecure-registry",
                &reg,
                ctx.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let elapsed = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{}", cluster.logs());
    assert!(
        elapsed < Duration::from_secs(60),
        "the build took {elapsed:?} to fail\n{stderr}"
    );
    for want in [
        "no worker can build linux/riscv64",
        "amd64-native (linux/amd64)",
        "amd64-emulating-arm64 (linux/amd64; emulates linux/arm64)",
        "--emulate linux/riscv64",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in\n{stderr}");
    }
    // The amd64 task had started its RUN when the build failed: it was cancelled, and its
    // process is gone.
    assert!(
        stderr.contains("linux/amd64 cancelled: linux/riscv64 failed"),
        "{stderr}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = Command::new("pgrep")
            .args(["-f", &format!("start-{marker}")])
            .output()
            .unwrap();
        if !left.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cancelled RUN still runs: {}\n{}",
            String::from_utf8_lossy(&left.stdout),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = cluster.metrics_text();
    for line in [
        "ossb_tasks_unschedulable_total 1",
        "ossb_tasks_cancelled_total 1",
        "ossb_builds_finished_total{status=\"failed\"} 1",
        "ossb_builds_running 0",
        "ossb_tasks_queued 0",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let worker_logs = ["amd64-native", "amd64-emulating-arm64"]
        .iter()
        .map(|n| std::fs::read_to_string(cluster.dir.join(format!("{n}.log"))).unwrap_or_default())
        .collect::<String>();
    assert!(
        worker_logs.contains("task cancelled by the coordinator"),
        "{}",
        cluster.logs()
    );

    // A context file that changes between being listed and being sent (here the client's own
    // log, written into its context as it starts sending) fails the build with what happened
    // and what to do, not with a broken stream.
    let log = ctx.join("submit.log");
    let out = cluster
        .submit(
            &cluster.tls,
            &["--insecure-registry", &reg, ctx.to_str().unwrap()],
        )
        .stderr(std::fs::File::create(&log).unwrap())
        .output()
        .unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}\n{}", cluster.logs());
    assert!(
        stderr.contains("a context file changed while it was sent")
            && stderr.contains(".dockerignore"),
        "{stderr}"
    );
}

/// A context file large enough to travel through the peer cache (2 MiB), the same in every
/// build.
fn big_context_file() -> String {
    (0..(2u32 << 20) / 8)
        .map(|i| format!("{i:07x}\n"))
        .collect()
}

/// Builds `FROM busybox` (+ `COPY big.bin`, [`big_context_file`], with `big`) + `RUN run` for
/// linux/amd64 on the cluster; returns the client's log.
fn build_on(
    cluster: &Cluster,
    env: &TestEnv,
    work: &Path,
    name: &str,
    run: &str,
    big: bool,
) -> String {
    let reg = cluster.registry.clone();
    let dir = work.join(name);
    std::fs::create_dir(&dir).unwrap();
    let (copy, big_file) = if big {
        ("COPY big.bin /big.bin\n", Some(big_context_file()))
    } else {
        ("", None)
    };
    let files: Vec<(&str, &str)> = big_file.iter().map(|b| ("big.bin", b.as_str())).collect();
    let ctx = crate::support::context(
        &dir,
        &format!("FROM {}\n{copy}RUN {run}\n", cluster.busybox(env)),
        &files,
    );
    let out = cluster
        .submit(
            &cluster.tls,
            &[
                "--platform",
                "linux/amd64",
                "--insecure-registry",
                &reg,
                ctx.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}\n{}", cluster.logs());
    stderr
}

/// A second, different Dockerfile on the same base, built by another worker: the base image's
/// config and layers come from the peer cache (the first worker published what it pulled), 0
/// bytes from the registry; the coordinator's /metrics prove it. The large context file comes
/// from the peer cache too (the first worker published it), not from the coordinator.
#[test]
fn a_second_build_on_the_same_base_on_another_worker_pulls_nothing_from_the_registry() {
    let Some(env) = TestEnv::get() else { return };
    let mut cluster = Cluster::start_with(&env, &[("amd64-a", &[])]);
    let work = tempfile::tempdir().unwrap();
    let first = build_on(&cluster, &env, work.path(), "one", "echo one > /one", true);
    assert!(
        first.contains("linux/amd64 stage 0 scheduled on worker amd64-a"),
        "{first}"
    );
    // The second worker replaces the first, which dies.
    cluster.spawn_worker("amd64-b", &[]);
    kill_group(cluster.pid_of("amd64-a"));
    cluster.wait_for_metrics(|m| {
        m.contains("ossb_workers_lost_total 1")
            && m.contains("ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 1")
    });
    let second = build_on(&cluster, &env, work.path(), "two", "echo two > /two", true);
    assert!(
        second.contains("linux/amd64 stage 0 scheduled on worker amd64-b"),
        "{second}"
    );
    assert!(second.contains("0 to pull from registries"), "{second}");
    let big = big_context_file().len();
    assert!(
        first.contains("context files (those its stages read): 0 from the peer cache (0 bytes), "),
        "{first}"
    );
    assert!(
        second.contains(&format!(
            "context files (those its stages read): 1 from the peer cache ({big} bytes), "
        )),
        "the second worker took the large context file from its peers\n{second}"
    );
    let m = cluster.metrics_text();
    let get = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
    let pulled = get("ossb_input_bytes_total{worker=\"amd64-a\",source=\"registry\"}");
    assert!(pulled > 0, "{m}");
    assert_eq!(
        get("ossb_input_bytes_total{worker=\"amd64-b\",source=\"registry\"}"),
        0,
        "{m}"
    );
    assert_eq!(
        get("ossb_input_blobs_total{worker=\"amd64-b\",source=\"registry\"}"),
        0,
        "{m}"
    );
    assert_eq!(
        get("ossb_input_bytes_total{worker=\"amd64-b\",source=\"peer\"}"),
        pulled,
        "the second worker fetched from its peers what the first pulled\n{m}"
    );
    assert!(get("ossb_input_blobs_total{worker=\"amd64-b\",source=\"peer\"}") >= 2);
}

/// Bytes of the config and layers of `image` (a manifest, or the amd64 one of an index).
fn image_bytes(image: &str) -> u64 {
    let raw: serde_json::Value = serde_json::from_str(&inspect_raw(image).stdout).unwrap();
    if let Some(manifests) = raw["manifests"].as_array() {
        let amd64 = manifests
            .iter()
            .find(|m| m["platform"]["architecture"] == "amd64")
            .expect("an amd64 manifest");
        let repo = image.rsplit_once(':').map_or(image, |(r, _)| r);
        return image_bytes(&format!("{repo}@{}", amd64["digest"].as_str().unwrap()));
    }
    let size = |d: &serde_json::Value| d["size"].as_u64().unwrap();
    size(&raw["config"])
        + raw["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(size)
            .sum::<u64>()
}

/// The large file (over the peer cache's 1 MiB threshold) every context of
/// [`submit_on_base`] holds.
const SHARED_CONTEXT_FILE: usize = 3 << 20;

/// Three different builds on `registry`/`base` submitted at once (one RUN each, told apart by
/// `marker`; each context also holds the same large file): each client's log file and
/// process.
fn submit_on_base(
    cluster: &Cluster,
    work: &Path,
    registry: &str,
    base: &str,
    marker: &str,
) -> Vec<(PathBuf, Child)> {
    let shared = "s".repeat(SHARED_CONTEXT_FILE);
    submit_three(cluster, work, registry, &[("shared.bin", &shared)], |i| {
        format!(
            "FROM {registry}/{base}\nCOPY shared.bin /shared.bin\n\
             RUN echo \"{marker} {i}\" > /built\n"
        )
    })
}

/// The image's largest layer (its digest), as the registry serves its manifest.
fn largest_layer(image: &str) -> String {
    let manifest: serde_json::Value = serde_json::from_str(&inspect_raw(image).stdout).unwrap();
    manifest["layers"]
        .as_array()
        .and_then(|l| l.iter().max_by_key(|d| d["size"].as_u64()))
        .and_then(|d| d["digest"].as_str())
        .unwrap_or_else(|| panic!("{image} is not one manifest with layers"))
        .to_string()
}

/// Submits three builds at once, the Dockerfile of build `i` from `dockerfile(i)`, each
/// context holding `files`; returns each client's log and process.
fn submit_three(
    cluster: &Cluster,
    work: &Path,
    registry: &str,
    files: &[(&str, &str)],
    dockerfile: impl Fn(usize) -> String,
) -> Vec<(PathBuf, Child)> {
    (0..3)
        .map(|i| {
            let ctx = crate::support::context(&work.join(format!("b{i}")), &dockerfile(i), files);
            let log = work.join(format!("client{i}.log"));
            let child = cluster
                .submit(
                    &cluster.tls,
                    &[
                        "--platform",
                        "linux/amd64",
                        "--insecure-registry",
                        registry,
                        ctx.to_str().unwrap(),
                    ],
                )
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (log, child)
        })
        .collect()
}

/// Single-flight: three different Dockerfiles on one Debian base nobody in the cluster has,
/// submitted at the same moment to three one-slot workers. One worker fetches the base from
/// the registry for all; the others get its bytes from the peer cache as they arrive. The base
/// crosses the registry link once (at most 1.1x its size), the large context file leaves the
/// coordinator once, and the builds spread over the workers.
#[test]
fn three_builds_on_one_new_base_pull_it_from_the_registry_once() {
    let Some(env) = TestEnv::get() else { return };
    let one = ["--slots", "1"];
    let cluster = Cluster::start_with(
        &env,
        &[("amd64-a", &one), ("amd64-b", &one), ("amd64-c", &one)],
    );
    let base = env.var("OSSB_TEST_DEBIAN");
    let base_bytes = image_bytes(&format!("{}/{base}", env.registry()));
    let work = tempfile::tempdir().unwrap();
    let marker = unique("flight");
    let clients = submit_on_base(&cluster, work.path(), &cluster.registry, &base, &marker);
    let mut workers = std::collections::BTreeSet::new();
    for (log, mut child) in clients {
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{text}\n{}", cluster.logs());
        let worker = text
            .lines()
            .find_map(|l| l.split("scheduled on worker ").nth(1))
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("not scheduled:\n{text}"))
            .to_string();
        workers.insert(worker);
    }
    let m = cluster.metrics_text();
    let from_registry = sum_of(&m, "ossb_input_bytes_total", "source=\"registry\"");
    let from_peers = sum_of(&m, "ossb_input_bytes_total", "source=\"peer\"");
    eprintln!(
        "registry bytes {from_registry} for a base of {base_bytes} ({:.2}x), peer bytes {from_peers}, workers {workers:?}",
        from_registry as f64 / base_bytes as f64
    );
    assert!(workers.len() >= 2, "the builds ran on {workers:?}\n{m}");
    assert!(
        from_registry as f64 <= 1.1 * base_bytes as f64,
        "{from_registry} bytes from the registry for a base of {base_bytes}\n{m}\n{}",
        cluster.logs()
    );
    assert!(from_registry >= base_bytes, "{m}");
    assert!(
        from_peers >= base_bytes,
        "the others took the base from their peers\n{m}"
    );
    // Context files follow the same rule: the large one left the coordinator once.
    let served = sample(&m, "ossb_context_bytes_total{direction=\"served\"}").unwrap();
    let big = SHARED_CONTEXT_FILE as u64;
    eprintln!("context bytes served by the coordinator {served} for a shared file of {big}");
    assert!(
        (big..2 * big).contains(&served),
        "the coordinator served {served} context bytes for a {big}-byte file three workers needed\n{m}"
    );
}

/// The worker fetching a new base for the cluster is killed with SIGKILL halfway through its
/// largest layer (the registry stalls after half of it): the layer's home node keeps the half
/// that reached it, another worker resumes the fetch from there (a `Range` request), every
/// build succeeds (the killed worker's task runs elsewhere), no node or worker holds a corrupt
/// blob, and the registry sent the surviving workers less than the base.
#[test]
fn a_fetcher_killed_halfway_hands_the_base_to_another_worker() {
    let Some(env) = TestEnv::get() else { return };
    let proxy = Proxy::start(&env.registry(), None);
    let one = ["--slots", "1"];
    let cluster = Cluster::start_with(
        &env,
        &[("amd64-a", &one), ("amd64-b", &one), ("amd64-c", &one)],
    );
    let registry = cluster.reach(&proxy.addr);
    let base = env.var("OSSB_TEST_DEBIAN");
    let base_bytes = image_bytes(&format!("{}/{base}", env.registry()));
    let layer = largest_layer(&format!("{}/{base}", env.registry()));
    proxy.inject(Rule::new("GET", &layer, Fault::Stall(120), 1));
    let work = tempfile::tempdir().unwrap();
    let marker = unique("killed-fetcher");
    let clients = submit_on_base(&cluster, work.path(), &registry, &base, &marker);
    // The worker the layer's home node made its fetcher, once the registry has stalled it.
    let names = ["amd64-a", "amd64-b", "amd64-c"];
    let claimed = format!("fetching a blob from the registry for the cluster digest={layer}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let fetcher = loop {
        let found = names.iter().find(|n| {
            std::fs::read_to_string(cluster.dir.join(format!("{n}.log")))
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("fetching a blob from the registry") && l.contains(&layer))
        });
        if let (Some(n), true) = (found, proxy.seen().iter().any(|s| s.fault.is_some())) {
            break n.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no worker fetched {claimed}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_millis(500));
    kill_group(cluster.pid_of(&fetcher));
    for (log, mut child) in clients {
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{text}\n{}", cluster.logs());
    }
    let m = cluster.metrics_text();
    let from_registry = sum_of(&m, "ossb_input_bytes_total", "source=\"registry\"");
    eprintln!(
        "killed {fetcher}; registry bytes {from_registry} for a base of {base_bytes} ({:.2}x)",
        from_registry as f64 / base_bytes as f64
    );
    assert!(
        from_registry as f64 <= 2.1 * base_bytes as f64,
        "{from_registry} bytes from the registry for a base of {base_bytes}\n{m}"
    );
    // The next fetcher resumed where the dead one's bytes stopped: the registry was asked for
    // the rest of the layer only, and the survivors pulled less than the base.
    let gets: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.contains(&layer))
        .collect();
    let resumed = gets.iter().skip(1).any(|s| {
        s.range
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    });
    let ranges: Vec<_> = gets.iter().map(|s| s.range.clone()).collect();
    assert!(
        resumed,
        "no fetch of the layer resumed: ranges asked {ranges:?}\n{}",
        cluster.logs()
    );
    assert!(
        (from_registry as f64) < 0.9 * base_bytes as f64,
        "the survivors pulled {from_registry} bytes of a {base_bytes}-byte base: the fetch did not resume\n{m}"
    );
    // Every blob anywhere hashes to its name.
    let stores = ["cache0", "cache1"]
        .iter()
        .map(|n| cluster.dir.join(n))
        .chain(names.iter().map(|n| cluster.dir.join(n).join("cache")));
    for store in stores {
        let Ok(entries) = std::fs::read_dir(store.join("blobs/sha256")) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).unwrap();
            assert_eq!(
                ossb_protocol::Digest::of(&bytes).hex(),
                name,
                "a corrupt blob in {}",
                store.display()
            );
        }
    }
}

/// The peer cache failing under a build: one cache node killed with `kill -9`, the other's
/// copy of the base layer corrupted on disk. The next build, on a worker with an empty store,
/// detects the corrupt copy (never uses it), falls back to the registry, and pushes an image
/// that runs.
#[test]
fn builds_survive_a_killed_cache_node_and_a_corrupt_blob() {
    let Some(env) = TestEnv::get() else { return };
    let mut cluster = Cluster::start_with(&env, &[("amd64-a", &[])]);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    build_on(&cluster, &env, work.path(), "one", "echo one > /one", false);
    // The base layer as both nodes hold it (the largest blob of each node's store).
    let largest = |i: usize| -> PathBuf {
        let mut blobs: Vec<(u64, PathBuf)> =
            std::fs::read_dir(cluster.dir.join(format!("cache{i}/blobs/sha256")))
                .unwrap()
                .flatten()
                .map(|e| (e.metadata().unwrap().len(), e.path()))
                .collect();
        blobs.sort();
        blobs.pop().expect("the node holds the base image").1
    };
    let (layer0, layer1) = (largest(0), largest(1));
    assert_eq!(
        layer0.file_name(),
        layer1.file_name(),
        "both nodes hold the layer"
    );
    let mut bytes = std::fs::read(&layer0).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&layer0, bytes).unwrap();
    kill_group(cluster.pid_of("cache1"));
    // A fresh worker (empty store) takes over from the first.
    cluster.spawn_worker("amd64-b", &[]);
    kill_group(cluster.pid_of("amd64-a"));
    cluster.wait_for_metrics(|m| {
        m.contains("ossb_workers_lost_total 1")
            && m.contains("ossb_workers{platform=\"linux/amd64\",mode=\"native\"} 1")
    });
    let marker = unique("peerfail");
    let ctx = crate::support::context(
        &work.path().join("two"),
        &format!(
            "FROM {}\nRUN echo \"{marker}\" > /two\nCMD [\"cat\", \"/two\"]\n",
            cluster.busybox(&env)
        ),
        &[],
    );
    let image = format!("{reg}/tests/{marker}:latest");
    cluster.push_ok("linux/amd64", &reg, &image, &ctx);
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(run.stdout, format!("{marker}\n"));
    let m = cluster.metrics_text();
    let get = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
    assert!(
        get("ossb_input_bytes_total{worker=\"amd64-b\",source=\"registry\"}") > 0,
        "the corrupt layer must come from the registry again\n{m}"
    );
    // The node discarded its corrupt copy; what it holds now (the worker published the layer
    // again after pulling it) is the right bytes.
    let logs = std::fs::read_to_string(cluster.dir.join("cache0.log")).unwrap();
    assert!(logs.contains("failed verification: discarded"), "{logs}");
    if let Ok(bytes) = std::fs::read(&layer0) {
        let name = layer0.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            ossb_protocol::Digest::of(&bytes).hex(),
            name,
            "the node serves corrupt bytes"
        );
    }
}

/// Two independent stages of one build run at once on two workers; the final stage, on one
/// of them, copies from both: the other worker's layers reach it through the peer cache and
/// the cluster's step cache, and nothing runs twice.
#[test]
fn independent_stages_run_on_two_workers_and_meet_through_the_peer_cache() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start_with(&env, &[("amd64-a", &[]), ("amd64-b", &[])]);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("stages");
    let dockerfile = format!(
        "FROM {bb} AS left\nRUN head -c 1000000 /dev/urandom > /left.big\n\
         RUN sleep 2 && echo \"left {marker}\" > /left\n\
         FROM {bb} AS right\nRUN head -c 1000000 /dev/urandom > /right.big\n\
         RUN sleep 2 && echo \"right {marker}\" > /right\n\
         FROM {bb}\nCOPY --from=left /left /left\nCOPY --from=right /right /right\n\
         CMD [\"cat\", \"/left\", \"/right\"]\n",
        bb = cluster.busybox(&env)
    );
    let ctx = crate::support::context(work.path(), &dockerfile, &[]);
    let image = format!("{reg}/tests/{marker}:latest");
    let stderr = cluster.push_ok("linux/amd64", &reg, &image, &ctx);
    let worker_of = |stage: usize| -> String {
        let prefix = format!("linux/amd64 stage {stage} scheduled on worker ");
        stderr
            .lines()
            .find_map(|l| l.split(&prefix).nth(1))
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("stage {stage} was not scheduled:\n{stderr}"))
            .to_string()
    };
    assert_ne!(
        worker_of(0),
        worker_of(1),
        "independent stages on one worker:\n{stderr}"
    );
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(run.stdout, format!("left {marker}\nright {marker}\n"));
    let m = cluster.metrics_text();
    let get = |s: &str| sample(&m, s).unwrap_or_else(|| panic!("no {s} in\n{m}"));
    // The final stage's task started from both stages as their tasks built them (it asked the
    // cluster's step cache for none of their steps), and brought from the peer cache only the
    // layer of the other worker's stage that holds the file it copies, not the 1 MB below it.
    assert_eq!(get("ossb_cluster_steps_total{answer=\"record\"}"), 0, "{m}");
    assert!(
        stderr.contains("starting from stage 0, 1 as built by other tasks"),
        "the final stage did not start from stages 0 and 1:\n{stderr}"
    );
    let fetched = stderr
        .lines()
        .find_map(|l| {
            l.split("linux/amd64: ")
                .nth(1)?
                .strip_suffix(")")?
                .split_once(" layers of stages other tasks built came from the peer cache (")
        })
        .map(|(n, bytes)| {
            (
                n.parse::<u32>().unwrap(),
                bytes
                    .strip_suffix(" bytes")
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            )
        })
        .unwrap_or_else(|| panic!("no count of the layers brought:\n{stderr}"));
    assert_eq!(fetched.0, 1, "{stderr}");
    assert!(fetched.1 < 100_000, "{stderr}");
    // Four RUNs and two COPYs ran, once each.
    assert_eq!(sum_of(&m, "ossb_steps_total", "result=\"run\""), 6, "{m}");
}

/// A stage that two stage tasks need (x: its own task, and the final stage's) runs once in
/// the cluster: its steps have the same keys in every task's plan, whatever position the
/// pruned plan gives the stages. Six steps run, not eight; submitted again, none.
#[test]
fn a_stage_shared_by_two_tasks_runs_once() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start_with(&env, &[("amd64-a", &[]), ("amd64-b", &[])]);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("shared");
    let dockerfile = format!(
        "FROM {bb} AS a\nRUN echo a > /a\n\
         FROM {bb} AS b\nRUN echo b > /b\n\
         FROM {bb} AS x\nCOPY --from=b /b /b\nRUN echo \"x from $(cat /b) {marker}\" > /x\n\
         FROM {bb}\nCOPY --from=a /a /a\nCOPY --from=x /x /x\nCMD [\"cat\", \"/a\", \"/x\"]\n",
        bb = cluster.busybox(&env)
    );
    let ctx = crate::support::context(work.path(), &dockerfile, &[]);
    let image = format!("{reg}/tests/{marker}:latest");
    for (round, expected) in [("first", 6), ("second", 0)] {
        let before = cluster.metrics_text();
        let steps =
            |m: &str, result: &str| sum_of(m, "ossb_steps_total", &format!("result=\"{result}\""));
        let out = cluster
            .submit_push("linux/amd64", &reg, &image, &ctx)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{round}: {stderr}\n{}",
            cluster.logs()
        );
        let m = cluster.metrics_text();
        let ran = steps(&m, "run") - steps(&before, "run");
        assert_eq!(
            ran, expected,
            "{round} submission: steps run\n{stderr}\n{m}"
        );
        // Each task starts from the stages it reads as their tasks built them: no task goes
        // through another's steps, not even as cache hits.
        if round == "first" {
            let cached = steps(&m, "cached") - steps(&before, "cached");
            assert_eq!(cached, 0, "first submission: steps cached\n{stderr}\n{m}");
        }
    }
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(run.stdout, format!("a\nx from b {marker}\n"));
}

/// The same build submitted by two clients at once: its steps run once in the cluster (one
/// task waits for the other, then takes every step from the cache of the worker that ran it).
#[test]
fn the_same_build_from_two_clients_at_once_runs_its_steps_once() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start(&env);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("twice");
    let dockerfile = format!(
        "FROM {}\nCOPY a.txt /a.txt\nRUN echo \"ran-{marker}\" && sleep 3 && cp /a.txt /b.txt\nRUN echo second > /c.txt\n",
        cluster.busybox(&env)
    );
    let ctx = crate::support::context(work.path(), &dockerfile, &[("a.txt", "a")]);
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let log = work.path().join(format!("client{i}.log"));
            let child = cluster
                .submit(
                    &cluster.tls,
                    &[
                        "--platform",
                        "linux/amd64",
                        "--insecure-registry",
                        &reg,
                        ctx.to_str().unwrap(),
                    ],
                )
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            (log, child)
        })
        .collect();
    let mut ran = 0;
    let mut waited = 0;
    for (log, mut child) in clients {
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{text}\n{}", cluster.logs());
        // The RUN's own output (not its echoed command line) is shown where it ran.
        if text.lines().any(|l| l.ends_with(&format!(" ran-{marker}"))) {
            ran += 1;
        }
        if text.contains("an identical build runs on worker") {
            waited += 1;
        }
    }
    assert_eq!((ran, waited), (1, 1), "{}", cluster.logs());
    let m = cluster.metrics_text();
    let run = sum_of(&m, "ossb_steps_total", "result=\"run\"");
    let cached = sum_of(&m, "ossb_steps_total", "result=\"cached\"");
    assert!(run > 0, "{m}");
    assert_eq!(run, cached, "the second build ran nothing\n{m}");
    assert!(m.contains("ossb_tasks_waited_identical_total 1"), "{m}");
}

/// Secrets, named build contexts, `--network`, `--add-host` and a registry CA travel to the
/// cluster: a base from the TLS registry (its CA given with --registry-certificate) is pulled
/// by the worker, and the image pushed there; the RUN reads the secret without a network and
/// with the extra host, COPY --from reads the named context. The secret's bytes are in no
/// layer, no log, no build record, and the task's files are gone afterwards.
#[test]
fn secrets_named_contexts_and_registry_cas_reach_the_cluster() {
    let Some(env) = TestEnv::get() else { return };
    // On loopback: the TLS registry's certificate names 127.0.0.1, not a relay's address.
    let cluster = Cluster::start_on_loopback(&env, &[("amd64-a", &[])]);
    let tls = env.tls_registry();
    let work = tempfile::tempdir().unwrap();
    let secret = format!("hunter2-{}", unique("secret"));
    let secret_file = work.path().join("token");
    std::fs::write(&secret_file, &secret).unwrap();
    let extra = work.path().join("extra");
    std::fs::create_dir(&extra).unwrap();
    std::fs::write(extra.join("named.txt"), "from the named context\n").unwrap();
    let dockerfile = format!(
        "FROM {tls}/{}\nRUN --mount=type=secret,id=tok sha256sum /run/secrets/tok | cut -d' ' -f1 > /tok.sum && grep -c : /proc/net/dev > /ifaces && grep reg.internal /etc/hosts > /hosts\nCOPY --from=extra named.txt /named.txt\n",
        env.var("OSSB_TEST_BUSYBOX")
    );
    let ctx = crate::support::context(work.path(), &dockerfile, &[]);
    let image = format!("{tls}/private/{}:1.0", unique("cluster-secret"));
    let rootfs = work.path().join("rootfs");
    let out = cluster
        .submit(
            &cluster.tls,
            &[
                "--platform",
                "linux/amd64",
                "--registry-certificate",
                &format!("{tls}={}", env.var("OSSB_TEST_CA")),
                "--secret",
                &format!("id=tok,src={}", secret_file.display()),
                "--build-context",
                &format!("extra={}", extra.display()),
                "--network",
                "none",
                "--add-host",
                "reg.internal:10.1.2.3",
                "-t",
                &image,
                "--push",
                "--output",
                &format!("type=local,dest={}", rootfs.display()),
                ctx.to_str().unwrap(),
            ],
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ossb-submit failed ({:?}):\n{stderr}\n{}",
        out.status.code(),
        cluster.logs()
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tok.sum"))
            .unwrap()
            .trim(),
        crate::sha256_hex(secret.as_bytes())
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("named.txt")).unwrap(),
        "from the named context\n"
    );
    assert!(!rootfs.join("run/secrets/tok").exists());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("ifaces"))
            .unwrap()
            .trim(),
        "1",
        "the RUN had a network despite --network none"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("hosts")).unwrap(),
        "10.1.2.3\treg.internal\n"
    );
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
    .success("skopeo inspect of the image pushed through the cluster");
    assert!(
        !stderr.contains(&secret),
        "the secret was printed:\n{stderr}"
    );
    // Nothing the cluster wrote (logs, build records, caches, peer cache blobs) holds the
    // secret, and the task's directory (with the secret's file) is gone.
    let mut stack = vec![cluster.dir.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{} holds the secret",
                    path.display()
                );
            }
        }
    }
    let tasks = cluster.dir.join("amd64-a/tasks");
    assert_eq!(
        std::fs::read_dir(&tasks).unwrap().count(),
        0,
        "task directories left in {}",
        tasks.display()
    );
}

/// A worker pushing by digest mounts the base image's layers from the base's repository on
/// the same registry instead of uploading them (seen through a proxy in front of the registry).
#[test]
fn worker_pushes_mount_base_layers_from_the_base_repository() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start_with(&env, &[("amd64-a", &[])]);
    let proxy = Proxy::start(&env.registry(), None);
    let proxied = cluster.reach(&proxy.addr);
    let work = tempfile::tempdir().unwrap();
    let ctx = crate::support::context(
        work.path(),
        &format!(
            "FROM {}/{}\nRUN echo mounted > /m\n",
            proxied,
            env.var("OSSB_TEST_BUSYBOX")
        ),
        &[],
    );
    let image = format!("{proxied}/tests/{}:1", unique("cluster-mount"));
    cluster.push_ok("linux/amd64", &proxied, &image, &ctx);
    let seen = proxy.seen();
    let base_repo = env.var("OSSB_TEST_BUSYBOX");
    let base_repo = base_repo.split(':').next().unwrap();
    assert!(
        seen.iter().any(|s| s.method == "POST"
            && s.path.contains("mount=")
            && (s.path.contains(&format!("from={base_repo}"))
                || s.path
                    .contains(&format!("from={}", base_repo.replace('/', "%2F"))))
            && s.status == 201),
        "no layer was mounted from {base_repo}: {seen:#?}"
    );
}

/// Every process in its own network namespace; the link of the worker running a step is cut
/// (`ip link set ... down`) for 10 s. The coordinator loses the worker, builds on the other
/// one, and the build completes; what was pushed is whole (podman pulls it, verifying every
/// blob, and runs it). Or, if it fails, it says why: never a hang, never a corrupt image.
#[test]
fn a_link_cut_for_10s_during_a_build_in_network_namespaces() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start_with(&env, &[("worker-a", &[]), ("worker-b", &[])]);
    if cluster.net.is_none() {
        eprintln!("SKIPPED: the link cut needs the cluster in network namespaces");
        return;
    }
    let registry = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("linkcut");
    let dockerfile = format!(
        "FROM {registry}/{}\nRUN echo \"start {marker}\" && sleep 8 && echo finished > /done\nCMD [\"cat\", \"/done\"]\n",
        env.var("OSSB_TEST_BUSYBOX")
    );
    let ctx = crate::support::context(work.path(), &dockerfile, &[]);
    let repo = format!("tests/{marker}:latest");
    let log = work.path().join("submit.log");
    let mut child = cluster
        .submit_push(
            "linux/amd64",
            &registry,
            &format!("{registry}/{repo}"),
            &ctx,
        )
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&format!("start {marker}")) {
            break text
                .lines()
                .find_map(|l| l.split("scheduled on worker ").nth(1))
                .and_then(|rest| rest.split(' ').next())
                .expect("the scheduling is reported")
                .to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the step never started:\n{text}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    cluster.link(&victim, false);
    std::thread::sleep(Duration::from_secs(10));
    cluster.link(&victim, true);
    let status = wait_child(&cluster, &mut child, &log, 180);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if !status.success() {
        // Failing is allowed, clearly: the exit code of a failed build and the reason, and
        // nothing under the tag (the tag is pushed last, after every platform succeeded).
        // The only failure this test allows is one the cut caused: the lost worker is named.
        assert_eq!(status.code(), Some(1), "{text}\n{}", cluster.logs());
        assert!(
            text.contains("error:") && text.contains(&format!("worker {victim} was lost")),
            "a failure that does not come from the cut:\n{text}\n{}",
            cluster.logs()
        );
        let tagged = tool(
            "skopeo",
            &[
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{registry}/{repo}"),
            ],
        );
        assert_ne!(
            tagged.code, 0,
            "a failed build pushed its tag:\n{}",
            tagged.stdout
        );
        eprintln!("the build failed across the link cut, clearly:\n{text}");
        return;
    }
    assert!(
        text.contains(&format!("worker {victim} was lost")),
        "{text}\n{}",
        cluster.logs()
    );
    let image = format!("{registry}/{repo}");
    let run = podman_run(&image, &[]).success("podman run of the image pushed across the cut");
    assert_eq!(run.stdout, "finished\n");
    let metrics = cluster.metrics_text();
    assert!(
        metrics.contains("ossb_tasks_rescheduled_total 1"),
        "{metrics}"
    );
}

/// A stage task fetches only the context files its stages read (each stage here copies its
/// own directory), not the whole context; a base image with ONBUILD triggers (which may read
/// any file) makes the task fetch it all, and its trigger's COPY works.
#[test]
fn a_task_fetches_only_the_context_files_its_stages_read() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start_with(&env, &[("amd64-a", &[]), ("amd64-b", &[])]);
    let reg = cluster.registry.clone();
    let work = tempfile::tempdir().unwrap();
    let marker = unique("reads");
    let dockerfile = format!(
        "FROM {bb} AS left\nCOPY left /left\n\
         FROM {bb} AS right\nCOPY right/ /right/\n\
         FROM {bb}\nCOPY --from=left /left /left\nCOPY --from=right /right /right\n\
         COPY docs/*.md /docs/\nCMD [\"cat\", \"/left/1\", \"/left/2\", \"/right/1\", \"/docs/a.md\"]\n",
        bb = cluster.busybox(&env)
    );
    let files: Vec<(String, String)> = [
        "left/1",
        "left/2",
        "right/1",
        "right/2",
        "docs/a.md",
        "docs/b.txt",
        "other/x",
        "other/y",
    ]
    .iter()
    .map(|p| (p.to_string(), format!("{p} {marker}\n")))
    .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_str()))
        .collect();
    let ctx = crate::support::context(work.path(), &dockerfile, &files);
    let image = format!("{reg}/tests/{marker}:latest");
    let stderr = cluster.push_ok("linux/amd64", &reg, &image, &ctx);
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(
        run.stdout,
        format!("left/1 {marker}\nleft/2 {marker}\nright/1 {marker}\ndocs/a.md {marker}\n")
    );
    // Each task names how many context files it fetched: 2 + 2 + 1, not 3 x 9.
    let fetched: Vec<u64> = stderr
        .lines()
        .filter_map(|l| l.split("context files (those its stages read): ").nth(1))
        .map(|rest| {
            let n = |s: &str| s.split(' ').next().unwrap().parse::<u64>().unwrap();
            let (peer, coordinator) = rest.split_once("), ").unwrap();
            n(peer) + n(coordinator)
        })
        .collect();
    let mut sorted = fetched.clone();
    sorted.sort();
    assert_eq!(sorted, [1, 2, 2], "{stderr}");

    // A base with an ONBUILD trigger that copies a file: the task takes the whole context.
    let base = format!("{reg}/tests/{marker}-onbuild:latest");
    let base_ctx = crate::support::context(
        &work.path().join("base"),
        &format!(
            "FROM {}\nONBUILD COPY other/x /onbuild\n",
            cluster.busybox(&env)
        ),
        &[],
    );
    crate::support::ossb(
        &env,
        &work.path().join("cache"),
        &[
            "build",
            "--insecure-registry",
            &reg,
            "-t",
            &base,
            "--push",
            base_ctx.to_str().unwrap(),
        ],
    )
    .success("pushing a base with an ONBUILD trigger");
    let dockerfile = format!("FROM {base}\nCOPY left/1 /1\nCMD [\"cat\", \"/onbuild\", \"/1\"]\n");
    let ctx = crate::support::context(&work.path().join("onbuild"), &dockerfile, &files);
    let image = format!("{reg}/tests/{marker}-child:latest");
    let stderr = cluster.push_ok("linux/amd64", &reg, &image, &ctx);
    assert!(
        !stderr.contains("those its stages read"),
        "a base with ONBUILD: the whole context\n{stderr}"
    );
    let run = podman_run(&image, &[]).success("podman run of the ONBUILD child");
    assert_eq!(run.stdout, format!("other/x {marker}\nleft/1 {marker}\n"));
}

/// Single-flight for images a build reads late, not only for its bases: three builds that
/// each `COPY --from` a Debian image nobody in the cluster has, on three one-slot workers at
/// once, fetch its layer from the registry once (counted at a proxy in front of the registry);
/// the other workers take it from the peer cache.
#[test]
fn three_builds_copying_from_one_new_image_pull_it_from_the_registry_once() {
    let Some(env) = TestEnv::get() else { return };
    let proxy = Proxy::start(&env.registry(), None);
    let one = ["--slots", "1"];
    let cluster = Cluster::start_with(
        &env,
        &[("amd64-a", &one), ("amd64-b", &one), ("amd64-c", &one)],
    );
    let registry = cluster.reach(&proxy.addr);
    let debian = env.var("OSSB_TEST_DEBIAN");
    let layer = largest_layer(&format!("{}/{debian}", env.registry()));
    let work = tempfile::tempdir().unwrap();
    let marker = unique("late-pull");
    let busybox = env.var("OSSB_TEST_BUSYBOX");
    let clients = submit_three(&cluster, work.path(), &registry, &[], |i| {
        format!(
            "FROM {registry}/{busybox}\n\
             COPY --from={registry}/{debian} /etc/debian_version /debian_version\n\
             RUN echo \"{marker} {i}\" > /built\n"
        )
    });
    let mut workers = std::collections::BTreeSet::new();
    for (log, mut child) in clients {
        let status = child.wait().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{text}\n{}", cluster.logs());
        if let Some(w) = text
            .lines()
            .find_map(|l| l.split("scheduled on worker ").nth(1))
            .and_then(|rest| rest.split(' ').next())
        {
            workers.insert(w.to_string());
        }
    }
    assert!(workers.len() >= 2, "the builds ran on {workers:?}");
    let layer_gets = proxy
        .seen()
        .iter()
        .filter(|s| s.method == "GET" && s.path.contains(&layer) && s.status < 300)
        .count();
    assert_eq!(
        layer_gets,
        1,
        "the Debian layer {layer} crossed the registry link {layer_gets} times\n{}",
        cluster.logs()
    );
}

/// Named contexts of every kind a worker can reach resolve on the worker, with the same
/// engine code as `ossb build`: an image (`docker-image://`, as the stage's base), an http
/// tarball and a git repository (served by the test on loopback); an OCI layout, which only
/// this machine holds, is refused before anything is sent (exit 2).
#[test]
fn image_tarball_and_git_contexts_resolve_on_the_workers() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start_on_loopback(&env, &[("amd64-a", &[])]);
    let work = tempfile::tempdir().unwrap();
    let served = work.path().join("served");
    let script = format!(
        "import io, tarfile\n\
         t = tarfile.open('{0}/ctx.tar.gz', 'w:gz')\n\
         i = tarfile.TarInfo('app/main.txt'); i.size = 5; t.addfile(i, io.BytesIO(b'main\\n'))\n\
         t.close()\n",
        served.display()
    );
    std::fs::create_dir_all(&served).unwrap();
    tool("python3", &["-c", &script]).success("making the tarball");
    crate::named_contexts::git_repo(work.path());
    let (mut server, port) = crate::named_contexts::serve(&served);
    let ctx = crate::support::context(
        &work.path().join("app"),
        "FROM base\nCOPY --from=src app/main.txt /main.txt\nCOPY --from=repo s.txt /s.txt\n",
        &[],
    );
    let rootfs = work.path().join("rootfs");
    let base = format!("base=docker-image://{}", cluster.busybox(&env));
    let src = format!("src=http://127.0.0.1:{port}/ctx.tar.gz");
    let repo = format!("repo=http://127.0.0.1:{port}/repo.git#v1:sub");
    let dest = format!("type=local,dest={}", rootfs.display());
    let args = [
        "--platform",
        "linux/amd64",
        "--insecure-registry",
        &cluster.registry,
        "--build-context",
        &base,
        "--build-context",
        &src,
        "--build-context",
        &repo,
        "--output",
        &dest,
    ];
    let out = cluster
        .submit(&cluster.tls, &args)
        .arg(&ctx)
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", cluster.logs());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("main.txt")).unwrap(),
        "main\n"
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("s.txt")).unwrap(),
        "s\n"
    );
    assert!(
        rootfs.join("bin/busybox").exists(),
        "the image context is the base"
    );

    let layout = format!("base=oci-layout://{}", work.path().display());
    let refused = cluster
        .submit(
            &cluster.tls,
            &["--platform", "linux/amd64", "--build-context", &layout],
        )
        .arg(&ctx)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--build-context base"), "{stderr}");
}
