//! The build cluster as processes on this machine, for the cluster benchmarks: a cache node,
//! a coordinator and workers, each an `ossb` process with its log in a directory of its own,
//! killed when dropped.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

impl Cluster {
    /// A cache node, a coordinator and `workers`, waiting until every worker registered.
    pub fn start(env: &Env, workers: &[WorkerSpec]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ossb-bench-cluster-")
            .tempdir()
            .unwrap();
        let tls = dir.path().join("tls");
        let out = Command::new(&env.ossb)
            .args(["certs", "init", tls.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "ossb certs init failed");
        let mut cluster = Cluster {
            coordinator: format!("127.0.0.1:{}", free_port()),
            metrics: format!("127.0.0.1:{}", free_port()),
            children: Vec::new(),
            dir,
        };
        let cache = format!("127.0.0.1:{}", free_port());
        let tls = tls.to_str().unwrap().to_string();
        let root = cluster.dir.path().to_path_buf();
        let path = |name: &str| root.join(name).to_str().unwrap().to_string();
        cluster.spawn(
            env,
            "cache",
            None,
            &[
                "cache-node",
                "--listen",
                &cache,
                "--data-dir",
                &path("cache"),
                "--tls-dir",
                &tls,
                "--peers",
                &cache,
            ],
        );
        let (coordinator, metrics) = (cluster.coordinator.clone(), cluster.metrics.clone());
        cluster.spawn(
            env,
            "coordinator",
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
        for w in workers {
            let work = path(w.name);
            let mut args = vec![
                "worker",
                "--coordinator",
                &coordinator,
                "--work-dir",
                &work,
                "--tls-dir",
                &tls,
                "--cache-peers",
                &cache,
                "--name",
                w.name,
            ];
            args.extend_from_slice(w.args);
            cluster.spawn(env, w.name, w.cpu, &args);
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
                "the workers did not register:\n{m}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        cluster
    }

    fn spawn(&mut self, env: &Env, name: &str, cpu: Option<usize>, args: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let mut cmd = match cpu {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu.to_string()]).arg(&env.ossb);
                c
            }
            None => Command::new(&env.ossb),
        };
        let child = cmd
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
        let submit = env.ossb.with_file_name("ossb-submit");
        let start = Instant::now();
        let out = Command::new(&submit)
            .args(["--coordinator", &self.coordinator])
            .arg("--tls-dir")
            .arg(self.dir.path().join("tls"))
            .args(["--progress", "plain", "--platform", platforms])
            .args(["--insecure-registry", env.registry()])
            .args(tag.map(|t| ["-t", t, "--push"]).into_iter().flatten())
            .arg(ctx)
            .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG").unwrap_or(""))
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", submit.display()));
        let wall = start.elapsed();
        assert!(
            out.status.success(),
            "ossb-submit {} failed:\n{}\n{}",
            ctx.display(),
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
