//! The build cluster on a datacenter-shaped network (issue 16): every process in a network
//! namespace of its own on one bridge (unshaped, as a cluster's network is), the registry
//! behind the uplink, limited to 1 Gbit/s each way by `tbf` with 20 ms of round trip added by
//! the tests' relay (this kernel has no `netem`), as a hosted registry is.
//!
//! Six one-slot workers, two cache nodes, a coordinator; twelve different builds over three
//! new bases (each a 64 MiB incompressible layer on busybox; each build's RUN names the base's
//! file with `stat`, where busybox's `wc -c` read it a byte at a time and took a fifth of the
//! machine in both scenarios) submitted at once, on a fresh cluster each run, with the peer cache on and off (no cache nodes, workers without
//! `--cache-peers`), interleaved. Reported: the median wall time of each, their ratio (target
//! ≤ 0.5×), and the bytes the workers took from the registry against the three bases'
//! (target 1.0×).
//!
//! Then a 1 GiB blob on the same network: a get from the cluster's two cache nodes against a
//! pull of the same blob as a one-layer image through the shaped link (target: the get at
//! least 3× faster). The client runs in this process, its threads moved into a namespace of
//! their own.
//!
//! A second link, 200 Mbit/s, is measured as well: on this machine's two cores, twelve builds
//! of six workers keep the CPU busy enough that a gigabit link is not the bottleneck (the
//! machine's busy time is printed with each run).
//!
//! `OSSB_BENCH_ONLY` picks parts: `get` (both MTUs), `get mtu 1500`, `builds` (both links),
//! `builds 1gbit`, `builds 200mbit`.
//!
//! Needs root (namespaces, tc). `cargo bench -p ossb-benches --bench cluster_network` (after
//! `cargo build --release -p ossb-cli` and `scripts/testenv.sh start`; scripts/bench.sh does
//! both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ossb_benches::blob::{client_of, push_one_layer, random_blob, TestRegistry};
use ossb_benches::cluster::{machine_busy, median, Cluster, Layout, WorkerSpec};
use ossb_benches::netns::{enter, relay_delayed, Net};
use ossb_benches::workload::{runs, selected, Env};
use ossb_cache_node::PeerCache;
use ossb_image::store::BlobStore;

const WORKERS: usize = 6;
const BUILDS: usize = 12;
const BASES: usize = 3;
const BASE_MIB: usize = 64;

/// Writes `mib` MiB of incompressible bytes (xorshift from `seed`) to `path`.
fn random_file(path: &Path, mib: usize, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(mib << 20);
    while bytes.len() < mib << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Builds base `i` (busybox and a random layer) with `ossb build` and pushes it to the test
/// registry; returns its repository path and its compressed size (manifest, config, layers).
fn push_base(env: &Env, root: &Path, i: usize) -> (String, u64) {
    let ctx = root.join(format!("base-{i}"));
    std::fs::create_dir_all(&ctx).unwrap();
    random_file(
        &ctx.join("big"),
        BASE_MIB,
        std::process::id() as u64 * 10 + i as u64,
    );
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {}\nCOPY big /big\n", env.busybox()),
    )
    .unwrap();
    let repo = format!("bench/shaped-base-{}-{i}:v1", std::process::id());
    let out = Command::new(&env.ossb)
        // A plain manifest, as a base image is: with an attestation the reference names an
        // index, whose sizes are the manifests'.
        .args([
            "build",
            "--platform",
            "linux/amd64",
            "--push",
            "--provenance=false",
        ])
        .args(["--insecure-registry", env.registry()])
        .args(["-t", &format!("{}/{repo}", env.registry())])
        .arg(&ctx)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building base {i}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = image_bytes(&format!("{}/{repo}", env.registry()));
    (repo, bytes)
}

/// The compressed bytes of a single-platform image: its layers and config, as a worker pulls
/// them (`skopeo inspect --raw` gives the manifest).
fn image_bytes(reference: &str) -> u64 {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .expect("skopeo");
    assert!(out.status.success(), "skopeo inspect {reference}");
    let text = String::from_utf8_lossy(&out.stdout);
    // Every "size" in the manifest: the config's and the layers'.
    text.split("\"size\"")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest
                .trim_start_matches([':', ' '])
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// Sum of every sample of `name` whose labels contain `label` in /metrics text.
fn sum_of(metrics: &str, name: &str, label: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// One run: a fresh cluster (peer cache on or off), the twelve builds at once; returns the
/// wall time and the bytes the workers pulled from the registry.
fn run(
    env: &Env,
    net: &mut Net,
    relay: &str,
    contexts: &[PathBuf],
    peers: bool,
    tag: &str,
) -> (Duration, u64) {
    let names: Vec<String> = (0..WORKERS).map(|i| format!("w{i}")).collect();
    let specs: Vec<WorkerSpec> = names
        .iter()
        .map(|name| WorkerSpec {
            name,
            cpu: None,
            args: &["--platform", "linux/amd64", "--slots", "1"],
        })
        .collect();
    let cluster = Cluster::start_in(
        env,
        Layout {
            net: Some(net),
            registry: Some(relay.to_string()),
            cache_nodes: if peers { 2 } else { 0 },
        },
        &specs,
    );
    let (start, busy) = (Instant::now(), machine_busy());
    std::thread::scope(|s| {
        for (j, ctx) in contexts.iter().enumerate() {
            let (cluster, tag) = (&cluster, format!("{relay}/bench/shaped-{tag}-{j}:latest"));
            s.spawn(move || cluster.submit(env, ctx, "linux/amd64", Some(&tag)));
        }
    });
    let (wall, cpu) = (start.elapsed(), machine_busy() - busy);
    let m = cluster.metrics_text();
    if let Some(dir) = std::env::var_os("OSSB_BENCH_LOGS") {
        // Every process's log, to see where the time went.
        let file = Path::new(&dir).join(format!("cluster-network-{tag}.log"));
        std::fs::write(&file, cluster.logs() + &m).unwrap();
    }
    let workers_used = names
        .iter()
        .filter(|n| sum_of(&m, "ossb_input_blobs_total", &format!("worker=\"{n}\"")) > 0)
        .count();
    let registry = sum_of(&m, "ossb_input_bytes_total", "source=\"registry\"");
    let peer = sum_of(&m, "ossb_input_bytes_total", "source=\"peer\"");
    eprintln!(
        "  peer cache {}: {:.2}s, machine CPU {:.1}s, registry bytes {registry}, peer bytes {peer}, workers used {workers_used}",
        if peers { "on " } else { "off" },
        wall.as_secs_f64(),
        cpu.as_secs_f64()
    );
    (wall, registry)
}

/// Rounds of the shaped get and pull, taking turns.
const GET_ROUNDS: usize = 3;

/// A 1 GiB blob from the cache nodes of a cluster on `net`, whose links between the nodes
/// carry `mtu`-byte packets, against a pull of it through the shaped link at `relay`; returns
/// the median get and the median pull.
fn shaped_get(
    env: &Env,
    net: &mut Net,
    relay: &str,
    scratch: &Path,
    mtu: u16,
) -> (Duration, Duration) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let src = BlobStore::open(scratch.join("blob-src")).unwrap();
    let digest = random_blob(&src, 1 << 30);
    let target = TestRegistry {
        addr: env.registry().to_string(),
        ca: None,
        pid: 0,
    };
    let pushed = push_one_layer(&rt, &target, &src, digest);
    // The same image, as the client in the net reaches the registry.
    let reference = ossb_image::registry::parse_reference(&format!(
        "{relay}/{}:{}",
        pushed.reference.repository(),
        pushed.reference.tag().unwrap_or("latest")
    ))
    .unwrap();
    let cluster = Cluster::start_in(
        env,
        Layout {
            net: Some(net),
            registry: Some(relay.to_string()),
            cache_nodes: 2,
        },
        &[],
    );
    let tls = cluster.dir.path().join("tls");
    let ns = net.node(20);
    for n in [3, 4, 20] {
        net.set_mtu(n, mtu);
    }
    let medians = std::thread::scope(|s| {
        s.spawn(|| {
            // This thread and every thread of the client's runtime open their sockets in the
            // client's namespace.
            enter(&ns);
            let in_ns = ns.clone();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .on_thread_start(move || enter(&in_ns))
                .enable_all()
                .build()
                .unwrap();
            let client = {
                let _in = rt.enter();
                PeerCache::connect(&tls, &cluster.caches).unwrap()
            };
            rt.block_on(client.put_from_store(&digest, &src)).unwrap();
            let registry = client_of(relay, None);
            let (mut gets, mut pulls) = (Vec::new(), Vec::new());
            for _ in 0..GET_ROUNDS {
                let dst = scratch.join("blob-dst");
                let store = BlobStore::open(&dst).unwrap();
                let started = Instant::now();
                rt.block_on(client.get_to_store(&digest, &store)).unwrap();
                gets.push(started.elapsed());
                std::fs::remove_dir_all(&dst).unwrap();
                let store = BlobStore::open(&dst).unwrap();
                let started = Instant::now();
                rt.block_on(registry.pull(&reference, &"linux/amd64".parse().unwrap(), &store))
                    .unwrap();
                pulls.push(started.elapsed());
                assert!(store.contains(&digest));
                std::fs::remove_dir_all(&dst).unwrap();
            }
            (median(gets), median(pulls))
        })
        .join()
        .unwrap()
    });
    let _ = std::fs::remove_dir_all(scratch.join("blob-src"));
    medians
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let env = Env::get();
    let scratch = tempfile::tempdir().unwrap();
    let bases: Vec<(String, u64)> = (0..BASES)
        .map(|i| push_base(&env, scratch.path(), i))
        .collect();
    let base_bytes: u64 = bases.iter().map(|(_, b)| b).sum();

    let mut net = Net::new().expect("network namespaces (run as root)");
    let relay = relay_delayed(
        &format!("{}:0", net.host()),
        env.registry().to_string(),
        Duration::from_millis(10),
    );
    let contexts: Vec<PathBuf> = (0..BUILDS)
        .map(|j| {
            let ctx = scratch.path().join(format!("build-{j}"));
            std::fs::create_dir_all(&ctx).unwrap();
            let (base, _) = &bases[j % BASES];
            std::fs::write(
                ctx.join("Dockerfile"),
                format!("FROM {relay}/{base}\nRUN stat -c %s /big > /size && echo {j} > /build\n"),
            )
            .unwrap();
            ctx
        })
        .collect();

    net.shape_uplink("1gbit");
    println!("registry behind 1 Gbit/s + 20 ms round trip, cluster links unshaped");
    // Packets of 1500 bytes (most Kubernetes networks), then jumbo frames (as AWS VPCs have).
    for mtu in [1500, 9000] {
        if !selected(&format!("get mtu {mtu}")) {
            continue;
        }
        let (get, pull) = shaped_get(&env, &mut net, &relay, scratch.path(), mtu);
        let ratio = pull.as_secs_f64() / get.as_secs_f64();
        println!(
            "{:<52} get {:>6.3}s ({:>4.0} MiB/s)  pull {:>6.3}s ({:>4.0} MiB/s)  get {:>5.2}x faster  {}",
            format!("1 GiB, cluster MTU {mtu}: peer get vs registry pull"),
            get.as_secs_f64(),
            1024.0 / get.as_secs_f64(),
            pull.as_secs_f64(),
            1024.0 / pull.as_secs_f64(),
            ratio,
            if ratio >= 3.0 { ">= 3x: met" } else { ">= 3x: MISSED" }
        );
    }
    for n in [3, 4, 20] {
        net.set_mtu(n, 1500);
    }

    for (link, label) in [("1gbit", "1 Gbit/s"), ("200mbit", "200 Mbit/s")] {
        if !selected(&format!("builds {link}")) {
            continue;
        }
        net.shape_uplink(link);
        let (mut on, mut off) = (Vec::new(), Vec::new());
        let mut bytes_on = Vec::new();
        for round in 0..runs() {
            let tag = |mode: &str| format!("{mode}-{link}-{round}");
            let (wall, bytes) = run(&env, &mut net, &relay, &contexts, true, &tag("on"));
            on.push(wall);
            bytes_on.push(bytes);
            let (wall, _) = run(&env, &mut net, &relay, &contexts, false, &tag("off"));
            off.push(wall);
        }
        let (on, off) = (median(on), median(off));
        let ratio = on.as_secs_f64() / off.as_secs_f64();
        println!(
            "{BUILDS} builds over {BASES} new {BASE_MIB} MiB bases, {WORKERS} workers, registry behind {label} + 20 ms"
        );
        println!(
            "{:<52} peer cache on {:>7.3}s  off {:>7.3}s  ratio {:>5.2}x  {}",
            "  wall time",
            on.as_secs_f64(),
            off.as_secs_f64(),
            ratio,
            ossb_benches::verdict(ratio, 0.5)
        );
        let worst = *bytes_on.iter().max().unwrap();
        let bytes_ratio = worst as f64 / base_bytes as f64;
        println!(
            "{:<52} {worst} of {base_bytes} (worst of {} runs)  ratio {bytes_ratio:>5.2}x  {}",
            "  registry bytes with the peer cache / the bases'",
            bytes_on.len(),
            if bytes_ratio <= 1.0 {
                "<= 1.0x: met"
            } else {
                "<= 1.0x: MISSED"
            }
        );
    }
}
