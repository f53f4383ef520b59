//! The build cluster as processes on this machine, for the cluster benchmarks: a cache node,
//! a coordinator and workers, each an `ossb` process with its log in a directory of its own,
//! killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Net;
use crate::workload::Env;

/// Processes of one cluster, killed when dropped.
pub struct Cluster {
    /// Where the processes keep their state and logs.
    pub dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
    /// The coordinator's QUIC address.
    pub coordinator: String,
    /// Its /metrics address.
    pub metrics: String,
    /// The registry as the cluster's processes reach it.
    pub registry: String,
    /// The cache nodes' addresses.
    pub caches: Vec<String>,
    /// The namespace ossb-submit runs in (None: this host).
    submit_ns: Option<String>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A free port on loopback.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The body of an HTTP GET, `None` when the server does not answer.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// A worker: its name, the CPU it is pinned to (none: unpinned), its arguments.
pub struct WorkerSpec<'a> {
    /// Its name (and work dir's, and log's).
    pub name: &'a str,
    /// The CPU it is pinned to.
    pub cpu: Option<usize>,
    /// Its arguments after the common ones.
    pub args: &'a [&'a str],
}

/// Where a cluster runs and what it has besides its workers.
pub struct Layout<'a> {
    /// Each process in a namespace of its own on this net (None: all on this host's loopback).
    pub net: Option<&'a mut Net>,
    /// The registry as the processes reach it (None: the test environment's plain one).
    pub registry: Option<String>,
    /// How many cache nodes; with none the workers run without `--cache-peers`.
    pub cache_nodes: u8,
}

impl Layout<'_> {
    /// Everything on loopback, one cache node.
    pub fn loopback() -> Layout<'static> {
        Layout {
            net: None,
            registry: None,
            cache_nodes: 1,
        }
    }
}

/// A process's place: its address and, on a net, its namespace.
struct Place {
    host: String,
    ns: Option<String>,
}

impl Layout<'_> {
    /// Node `n`'s place: a namespace of the net, or loopback.
    fn place(&mut self, n: u8) -> Place {
        match self.net.as_deref_mut() {
            Some(net) => Place {
                host: net.addr(n),
                ns: Some(net.node(n)),
            },
            None => Place {
                host: "127.0.0.1".into(),
                ns: None,
            },
        }
    }
}

impl Place {
    /// An address of this place: a fixed port in a namespace of its own, a free one on loopback.
    fn addr(&self, port: u16) -> String {
        match self.ns {
            Some(_) => format!("{}:{port}", self.host),
            None => format!("{}:{}", self.host, free_port()),
        }
    }
}

impl Cluster {
    /// A cache node, a coordinator and `workers` on loopback, waiting until every worker
    /// registered.
    pub fn start(env: &Env, workers: &[WorkerSpec]) -> Cluster {
        Cluster::start_in(env, Layout::loopback(), workers)
    }

    /// `layout.cache_nodes` cache nodes, a coordinator and `workers`, placed as `layout` says,
    /// waiting until every worker registered.
    pub fn start_in(env: &Env, mut layout: Layout, workers: &[WorkerSpec]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ossb-bench-cluster-")
            .tempdir()
            .unwrap();
        // Nodes: 2 the coordinator, 3.. the cache nodes, 9 ossb-submit, 10.. the workers.
        let coordinator_place = layout.place(2);
        let cache_places: Vec<Place> = (0..layout.cache_nodes)
            .map(|i| layout.place(3 + i))
            .collect();
        let tls = dir.path().join("tls");
        let mut certs = Command::new(&env.ossb);
        certs.args(["certs", "init", tls.to_str().unwrap()]);
        for place in std::iter::once(&coordinator_place).chain(&cache_places) {
            certs.args(["--san", &place.host]);
        }
        let out = certs.output().unwrap();
        assert!(out.status.success(), "ossb certs init failed");
        let mut cluster = Cluster {
            coordinator: coordinator_place.addr(7000),
            metrics: coordinator_place.addr(9100),
            registry: layout
                .registry
                .clone()
                .unwrap_or_else(|| env.registry().to_string()),
            submit_ns: layout.place(9).ns,
            caches: Vec::new(),
            children: Vec::new(),
            dir,
        };
        let caches: Vec<(Place, String)> = cache_places
            .into_iter()
            .map(|place| {
                let addr = place.addr(7100);
                (place, addr)
            })
            .collect();
        cluster.caches = caches.iter().map(|(_, a)| a.clone()).collect();
        let peers = cluster.caches.join(",");
        let tls = tls.to_str().unwrap().to_string();
        let root = cluster.dir.path().to_path_buf();
        let path = |name: &str| root.join(name).to_str().unwrap().to_string();
        for (i, (place, addr)) in caches.iter().enumerate() {
            let name = format!("cache{i}");
            cluster.spawn(
                env,
                &name,
                place,
                None,
                &[
                    "cache-node",
                    "--listen",
                    addr,
                    "--data-dir",
                    &path(&name),
                    "--tls-dir",
                    &tls,
                    "--peers",
                    &peers,
                ],
            );
        }
        let (coordinator, metrics) = (cluster.coordinator.clone(), cluster.metrics.clone());
        cluster.spawn(
            env,
            "coordinator",
            &coordinator_place,
            None,
            &[
                "coordinator",
                "--listen",
                &coordinator,
                "--state-dir",
                &path("state"),
                "--tls-dir",
                &tls,
                "--metrics",
                &metrics,
            ],
        );
        for (i, w) in workers.iter().enumerate() {
            let work = path(w.name);
            let mut args = vec![
                "worker",
                "--coordinator",
                &coordinator,
                "--work-dir",
                &work,
                "--tls-dir",
                &tls,
                "--name",
                w.name,
            ];
            if !peers.is_empty() {
                args.extend_from_slice(&["--cache-peers", &peers]);
            }
            args.extend_from_slice(w.args);
            // Node numbers of a /24: at most 245 workers get a namespace each.
            let place = layout.place(10 + i as u8);
            cluster.spawn(env, w.name, &place, w.cpu, &args);
        }
        // Hundreds of simulated workers take a while to start on two cores.
        let deadline = Instant::now() + Duration::from_secs(30 + workers.len() as u64 / 2);
        loop {
            let m = http_get(&cluster.metrics, "/metrics").unwrap_or_default();
            let registered: u64 = m
                .lines()
                .filter(|l| l.starts_with("ossb_workers{") && l.contains("mode=\"native\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            if registered >= workers.len() as u64 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the workers did not register:\n{m}\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    /// `ossb ARGS` in `place`, pinned to `cpu` when there is one.
    fn spawn(&mut self, env: &Env, name: &str, place: &Place, cpu: Option<usize>, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = command(&place.ns, cpu, &env.ossb)
            .args(args)
            .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG").unwrap_or(""))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start ossb {name}: {e}"));
        self.children.push((name.to_string(), child));
    }

    /// Submits the build of `ctx` for `platforms`, pushed as `tag` when there is one; returns
    /// its wall time.
    pub fn submit(&self, env: &Env, ctx: &Path, platforms: &str, tag: Option<&str>) -> Duration {
        self.run_submit(env, None, &ctx.display().to_string(), |cmd| {
            cmd.args(["--platform", platforms])
                .args(tag.map(|t| ["-t", t, "--push"]).into_iter().flatten())
                .arg(ctx);
        })
    }

    /// `ossb-submit bake` in `dir` (its bake file), pushing with `--push` when `push`;
    /// returns its wall time.
    pub fn submit_bake(&self, env: &Env, dir: &Path, push: bool) -> Duration {
        self.run_submit(env, Some("bake"), &dir.display().to_string(), |cmd| {
            cmd.args(push.then_some("--push")).current_dir(dir);
        })
    }

    /// Runs `ossb-submit [SUBCOMMAND]` with the cluster's coordinator, certificates and
    /// registry, then what `finish` adds; panics with the logs when it fails (naming `what`).
    /// Its wall time.
    fn run_submit(
        &self,
        env: &Env,
        subcommand: Option<&str>,
        what: &str,
        finish: impl FnOnce(&mut Command),
    ) -> Duration {
        let submit = env.ossb.with_file_name("ossb-submit");
        let mut cmd = command(&self.submit_ns, None, &submit);
        cmd.args(subcommand);
        cmd.args(["--coordinator", &self.coordinator])
            .arg("--tls-dir")
            .arg(self.dir.path().join("tls"))
            .args(["--progress", "plain", "--insecure-registry", &self.registry])
            .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG").unwrap_or(""))
            .stdin(Stdio::null());
        finish(&mut cmd);
        let start = Instant::now();
        // OSSB_BENCH_SHOW_PROGRESS=1 prints each submission's progress, each line with the
        // time it came, to see where a run's time goes.
        let out = if std::env::var_os("OSSB_BENCH_SHOW_PROGRESS").is_some() {
            let mut child = cmd
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", submit.display()));
            let stderr =
                std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
            eprintln!("--- ossb-submit {what}:");
            for line in stderr.map_while(Result::ok) {
                eprintln!("{:>7.3} {line}", start.elapsed().as_secs_f64());
            }
            child.wait_with_output().unwrap()
        } else {
            cmd.output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", submit.display()))
        };
        let wall = start.elapsed();
        assert!(
            out.status.success(),
            "ossb-submit {what} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        wall
    }

    /// Every process's log.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                all += &format!("--- {}\n", e.path().display());
                all += &std::fs::read_to_string(e.path()).unwrap_or_default();
            }
        }
        all
    }
}

/// `program`, in namespace `ns` (`ip netns exec` execs it: the child's pid is the program's)
/// and pinned to `cpu` when given.
fn command(ns: &Option<String>, cpu: Option<usize>, program: &Path) -> Command {
    let mut prefix: Vec<String> = Vec::new();
    if let Some(ns) = ns {
        prefix.extend(["ip".into(), "netns".into(), "exec".into(), ns.clone()]);
    }
    if let Some(cpu) = cpu {
        prefix.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
    }
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// CPU time the whole machine spent busy so far (every CPU's user, system, irq and softirq
/// time, from /proc/stat): a cluster's processes re-exec themselves into namespaces and spawn
/// sandboxes, so their own counters miss most of it.
pub fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let jiffies: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .enumerate()
        // user nice system idle iowait irq softirq steal: all but idle and iowait.
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    Duration::from_millis(jiffies * 1000 / ticks)
}

/// The median of `v` (not empty).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The `p` percentile of `sorted` (not empty).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

impl Cluster {
    /// The coordinator's /metrics text.
    pub fn metrics_text(&self) -> String {
        http_get(&self.metrics, "/metrics").unwrap_or_default()
    }

    /// The peak resident memory (VmHWM) of process `name`, in KiB.
    pub fn peak_rss_kib(&self, name: &str) -> u64 {
        let Some((_, child)) = self.children.iter().find(|(n, _)| n == name) else {
            return 0;
        };
        std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The value of sample `name_and_labels` (exactly as /metrics writes it) in `text`.
pub fn sample(text: &str, name_and_labels: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}
