//! Build workloads timed against buildah and BuildKit in the same run: each workload is a
//! Dockerfile and a generated context, built cold (empty cache), fully cached (the same build
//! again) and after one source file changed, by ossb (release build), by `buildah bud` and by
//! BuildKit (dockerd's, `crate::buildkit`). The builders take turns run by run (the order
//! rotating), so a noisy moment of the machine hits them alike; each scenario's median is
//! reported.
//!
//! ossb: `ossb build --cache-dir DIR` with no output (the image stays in its blob store), a
//! fresh cache directory for every cold run. buildah: `buildah bud --layers` with the overlay
//! storage driver and chroot isolation (the fastest set-up that runs here, see
//! ../shared/ENVIRONMENT.md), a fresh `--root`/`--runroot` for every cold run; the image stays in
//! its storage. BuildKit: `docker build --network host` against a dockerd of the bench's own,
//! its build cache and images pruned before every cold run; the image stays in dockerd's image
//! store. All pull their base image from the local registry of scripts/testenv.sh in a cold run.

use crate::buildkit::Dockerd;
use crate::{measure, median, Sample};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How many times each scenario runs; the median is reported.
pub fn runs() -> usize {
    std::env::var("OSSB_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

/// Whether the scenario named `name` runs: all do unless OSSB_BENCH_ONLY holds a part of
/// the names of those to run (to look at one scenario closely).
pub fn selected(name: &str) -> bool {
    std::env::var("OSSB_BENCH_ONLY").map_or(true, |only| name.contains(&only))
}

/// The test environment (registries and base images) of scripts/testenv.sh.
pub struct Env {
    vars: HashMap<String, String>,
    /// The release `ossb` binary.
    pub ossb: PathBuf,
}

impl Env {
    /// Reads `.testenv/env`; panics with what to do when the environment or the binary is
    /// missing (scripts/bench.sh prepares both).
    pub fn get() -> Env {
        let root = workspace();
        let text = std::fs::read_to_string(root.join(".testenv/env")).unwrap_or_else(|e| {
            panic!("no .testenv/env ({e}): run scripts/testenv.sh start --debian (scripts/bench.sh does)")
        });
        let vars = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.trim_matches('\'').trim_matches('"').to_string(),
                )
            })
            .collect();
        let ossb = ossb_binary();
        Env { vars, ossb }
    }

    /// A variable of `.testenv/env`.
    pub fn var(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    /// The plain-HTTP registry.
    pub fn registry(&self) -> &str {
        self.var("OSSB_TEST_REGISTRY")
            .expect("OSSB_TEST_REGISTRY in .testenv/env")
    }

    /// The multi-arch busybox on the plain registry.
    pub fn busybox(&self) -> String {
        format!(
            "{}/{}",
            self.registry(),
            self.var("OSSB_TEST_BUSYBOX")
                .unwrap_or("library/busybox:latest")
        )
    }

    /// Debian bookworm on the plain registry, when `scripts/testenv.sh start --debian` made it.
    pub fn debian(&self) -> Option<String> {
        self.var("OSSB_TEST_DEBIAN")
            .map(|d| format!("{}/{d}", self.registry()))
    }
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ has a parent")
        .to_path_buf()
}

/// One build to time.
pub struct Workload {
    /// The name in the results table.
    pub name: String,
    /// The context directory (the Dockerfile is `Dockerfile` in it).
    pub context: PathBuf,
    /// `--platform`, when not the host's.
    pub platforms: Option<String>,
    /// The file rewritten before each "one file changed" run.
    pub changed_file: PathBuf,
}

/// The builders.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Builder {
    Ossb,
    Buildah,
    BuildKit,
}

/// Where a builder keeps its cache between runs; a fresh one makes a cold build.
struct Store {
    dir: PathBuf,
}

impl Store {
    /// An empty cache. BuildKit's is dockerd's, pruned.
    fn fresh(scratch: &Path, builder: Builder, n: usize, dockerd: Option<&Dockerd>) -> Store {
        let dir = scratch.join(format!("{builder:?}-store-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if builder == Builder::BuildKit {
            dockerd.expect("a dockerd for BuildKit").reset();
        }
        Store { dir }
    }

    fn remove(self, builder: Builder, dockerd: Option<&Dockerd>) {
        match builder {
            // Unmounts and deletes its overlay layers before the directory goes.
            Builder::Buildah => {
                let _ = buildah(&self.dir)
                    .args(["rmi", "--all", "--force"])
                    .output();
            }
            Builder::BuildKit => dockerd.expect("a dockerd for BuildKit").reset(),
            Builder::Ossb => {}
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn buildah(store: &Path) -> Command {
    let mut cmd = Command::new("buildah");
    cmd.arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("runroot"))
        .args(["--storage-driver", "overlay"]);
    cmd
}

/// The image name a peer tags its result with, from the workload's name.
fn image_name(w: &Workload) -> String {
    let repo: String = w
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let repo = repo
        .split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    format!("localhost/bench/{repo}:latest")
}

fn build_command(
    env: &Env,
    builder: Builder,
    w: &Workload,
    store: &Store,
    dockerd: Option<&Dockerd>,
) -> Command {
    match builder {
        Builder::Ossb => {
            let mut cmd = Command::new(&env.ossb);
            cmd.args(["build", "--progress", "plain", "--insecure-registry"])
                .arg(env.registry())
                .arg("--cache-dir")
                .arg(&store.dir);
            if let Some(p) = &w.platforms {
                cmd.args(["--platform", p]);
            }
            cmd.arg(&w.context);
            if let Some(dc) = env.var("DOCKER_CONFIG") {
                cmd.env("DOCKER_CONFIG", dc);
            }
            cmd
        }
        Builder::Buildah => {
            let mut cmd = buildah(&store.dir);
            cmd.args([
                "bud",
                "--isolation",
                "chroot",
                "--tls-verify=false",
                "--layers",
            ]);
            let image = image_name(w);
            match &w.platforms {
                Some(p) => cmd.args(["--platform", p, "--manifest", &image]),
                None => cmd.args(["-t", &image]),
            };
            cmd.arg(&w.context);
            cmd
        }
        Builder::BuildKit => {
            let dockerd = dockerd.expect("a dockerd for BuildKit");
            let image = image_name(w);
            match &w.platforms {
                Some(p) => {
                    let platforms: Vec<&str> = p.split(',').collect();
                    dockerd.build_platforms(&w.context, &image, &platforms)
                }
                None => dockerd.build(&w.context, &image, None),
            }
        }
    }
}

/// The ossb binary the benches time: `$OSSB_BIN` (a relative path is the workspace's, where
/// the command was typed: cargo runs a bench in its package's directory), else the
/// workspace's release build.
pub fn ossb_binary() -> PathBuf {
    let root = workspace();
    let ossb = match std::env::var_os("OSSB_BIN") {
        Some(bin) => root.join(bin),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| root.join("target"), PathBuf::from)
            .join("release/ossb"),
    };
    assert!(
        ossb.is_file(),
        "{} is missing: cargo build --release -p ossb-cli (scripts/bench.sh does)",
        ossb.display()
    );
    ossb
}

/// The medians of one workload's three scenarios for one builder, and the peak memory seen.
pub struct Timings {
    pub cold: Sample,
    pub cached: Sample,
    pub changed: Sample,
    /// The largest peak RSS over every run, in KiB.
    pub peak_rss_kib: u64,
}

/// Runs the three scenarios `runs()` times each with every builder, taking turns: in each
/// round every builder runs once, the order rotating by one a round. BuildKit needs `dockerd`.
/// The timings come back in the order of `builders`.
pub fn time_builders(
    env: &Env,
    builders: &[Builder],
    w: &Workload,
    scratch: &Path,
    dockerd: Option<&Dockerd>,
) -> Vec<Timings> {
    let n = runs();
    let k = builders.len();
    let order = |round: usize| (0..k).map(move |j| (j + round) % k);
    let mut cold: Vec<Vec<Sample>> = vec![Vec::new(); k];
    let mut stores: Vec<Option<Store>> = (0..k).map(|_| None).collect();
    // Earlier cold runs' stores are removed after the last timing, not right before the
    // builder's next cold run: on ext4 without a journal (this machine's disk) removing 20,000
    // files makes the next 20,000 creates several times slower for minutes, so that order
    // timed the bench's own `rm -rf`, not a builder's cold start (BENCHMARKS.md, 2026-12-07).
    // BuildKit's cache lives in its dockerd and is still pruned before each cold run.
    let mut retired: Vec<(Store, Builder)> = Vec::new();
    for i in 0..n {
        for b in order(i) {
            let builder = builders[b];
            if let Some(s) = stores[b].take() {
                retired.push((s, builder));
            }
            let s = Store::fresh(scratch, builder, i, dockerd);
            let cmd = build_command(env, builder, w, &s, dockerd);
            cold[b].push(timed(w, builder, "cold", i, cmd));
            stores[b] = Some(s);
        }
    }
    let stores: Vec<Store> = stores
        .into_iter()
        .map(|s| s.expect("at least one run"))
        .collect();
    let mut cached: Vec<Vec<Sample>> = vec![Vec::new(); k];
    for i in 0..n {
        for b in order(i) {
            let builder = builders[b];
            let cmd = build_command(env, builder, w, &stores[b], dockerd);
            cached[b].push(timed(w, builder, "fully cached", i, cmd));
        }
    }
    let original = std::fs::read(&w.changed_file).unwrap();
    let mut changed: Vec<Vec<Sample>> = vec![Vec::new(); k];
    for i in 0..n {
        for b in order(i) {
            let builder = builders[b];
            // Different from every earlier content, so each builder sees a change every run.
            let mut content = original.clone();
            content.extend_from_slice(format!("\n// change {builder:?} {i}\n").as_bytes());
            std::fs::write(&w.changed_file, content).unwrap();
            let cmd = build_command(env, builder, w, &stores[b], dockerd);
            changed[b].push(timed(w, builder, "one file changed", i, cmd));
        }
    }
    std::fs::write(&w.changed_file, original).unwrap();
    for (store, &builder) in stores.into_iter().zip(builders) {
        store.remove(builder, dockerd);
    }
    for (store, builder) in retired {
        store.remove(builder, dockerd);
    }
    (0..k)
        .map(|b| {
            let peak_rss_kib = cold[b]
                .iter()
                .chain(&cached[b])
                .chain(&changed[b])
                .map(|s| s.max_rss_kib)
                .max()
                .unwrap_or(0);
            Timings {
                cold: median(&mut cold[b]),
                cached: median(&mut cached[b]),
                changed: median(&mut changed[b]),
                peak_rss_kib,
            }
        })
        .collect()
}

/// Runs one build and prints its time (the table has only medians; the spread is here).
fn timed(w: &Workload, builder: Builder, scenario: &str, i: usize, mut cmd: Command) -> Sample {
    let sample = measure(&mut cmd);
    eprintln!(
        "{}: {builder:?} {scenario} {}/{}: {:.2} s",
        w.name,
        i + 1,
        runs(),
        sample.wall.as_secs_f64()
    );
    sample
}

/// Times a workload with ossb, buildah and BuildKit (left out with `OSSB_BENCH_BUILDKIT=0`)
/// and prints its rows (Markdown, one per scenario), and appends them to
/// `$OSSB_BENCH_RESULTS` when set (scripts/bench.sh collects them there).
pub fn bench(env: &Env, w: &Workload) {
    let scratch = std::env::temp_dir().join(format!("ossb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let dockerd = crate::buildkit::enabled()
        .then(|| Dockerd::start(&scratch.join("buildkit"), env.registry()));
    let mut builders = vec![Builder::Ossb, Builder::Buildah];
    if dockerd.is_some() {
        builders.push(Builder::BuildKit);
    }
    let timings = time_builders(env, &builders, w, &scratch, dockerd.as_ref());
    drop(dockerd);
    let _ = std::fs::remove_dir_all(&scratch);
    let (ossb, buildah, buildkit) = (&timings[0], &timings[1], timings.get(2));
    let mut rows = String::new();
    let pick = |t: &Timings, scenario: usize| [t.cold, t.cached, t.changed][scenario];
    for (s, (scenario, buildah_target)) in [
        ("cold", 0.7),
        ("fully cached", 0.2),
        ("one file changed", f64::NAN),
    ]
    .into_iter()
    .enumerate()
    {
        let o = pick(ossb, s);
        let b = pick(buildah, s);
        let k = buildkit.map(|t| pick(t, s));
        crate::report(&format!("{} / {scenario}", w.name), o, "buildah", b);
        if let Some(k) = k {
            crate::report(&format!("{} / {scenario}", w.name), o, "BuildKit", k);
        }
        let ratio = |peer: Sample| o.wall.as_secs_f64() / peer.wall.as_secs_f64().max(1e-9);
        let mut targets = Vec::new();
        if !buildah_target.is_nan() {
            targets.push(format!(
                "buildah {}",
                crate::verdict(ratio(b), buildah_target)
            ));
        }
        let (k_secs, k_ratio) = match k {
            Some(k) => {
                targets.push(format!("BuildKit {}", crate::verdict(ratio(k), 0.7)));
                (
                    format!("{:.2}", k.wall.as_secs_f64()),
                    format!("{:.2}x", ratio(k)),
                )
            }
            None => ("-".to_string(), "-".to_string()),
        };
        rows.push_str(&format!(
            "| {} | {scenario} | {:.2} | {:.2} | {:.2}x | {k_secs} | {k_ratio} | {} | {} |\n",
            w.name,
            o.wall.as_secs_f64(),
            b.wall.as_secs_f64(),
            ratio(b),
            if targets.is_empty() {
                "-".to_string()
            } else {
                targets.join("; ")
            },
            o.max_rss_kib / 1024,
        ));
    }
    let mem = ossb.peak_rss_kib / 1024;
    rows.push_str(&format!(
        "| {} | ossb peak RSS over all runs | | | | | | < 200 MiB: {} | {mem} |\n",
        w.name,
        if mem < 200 { "met" } else { "MISSED" }
    ));
    print!("{rows}");
    crate::record(&rows);
}

/// A fresh context directory for a workload, under the system temp dir.
pub fn context_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ossb-bench-ctx-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Deterministic pseudo-random bytes (xorshift), incompressible for gzip and zstd, so that a
/// big COPY measures copying and compressing real data rather than zeros.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed | 1;
    while out.len() < len {
        out.extend_from_slice(&xorshift(&mut x).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Writes [`noise`]`(len, seed)` to `path` a megabyte at a time. A large buffer here would
/// be charged to ossb: the builders are spawned with vfork semantics (posix_spawn), and Linux
/// records the parent's peak RSS as the child's ru_maxrss at exec, so a bench process that
/// once held a 256 MiB file reports every build it runs as using 256 MiB.
pub fn write_noise(path: &Path, len: usize, seed: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut left = len;
    while left > 0 {
        let bytes = xorshift(&mut x).to_le_bytes();
        let n = left.min(8);
        out.write_all(&bytes[..n])?;
        left -= n;
    }
    out.flush()
}
