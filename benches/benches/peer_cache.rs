//! A 1 GiB blob fetched from a peer cache node over QUIC (mutual TLS, sha256-verified on both
//! ends, written to the local blob store) against the physical limits of this machine's
//! loopback: the same bytes over a plain TCP connection (a Rust copy to a file, without and
//! with sha256), and a pull of the same blob as a one-layer image from the test environment's
//! registries, HTTPS (as in production) and plain HTTP (ossb's registry client; skipped when
//! `scripts/testenv.sh start` has not run). CPU is reported per end: the node runs in this
//! process on a runtime of its own, told apart by its threads' name; a registry's process by its pid.
//! Median of 3 per row.
//!
//! `cargo bench -p ossb-benches --bench peer_cache`; `OSSB_BENCH_PEER_MIB=256` for a smaller
//! blob on a busy machine; `OSSB_BENCH_DIR` for the scratch directory (default /var/tmp);
//! `OSSB_BENCH_PEER_ONLY=1` for the peer cache and raw QUIC rows alone (to profile them), with
//! the raw QUIC connection's path statistics (MTU, losses, black holes) on stderr.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ossb_benches::blob::{push_one_layer, random_blob, Pushed, TestRegistry};
use ossb_cache_node::{Node, NodeConfig, PeerCache};
use ossb_image::store::BlobStore;
use ossb_protocol::Digest;
use sha2::Digest as _;

/// A run's wall time and the CPU time (user + system) spent in it: `cpu` by both ends,
/// `server` by the serving end alone (the node's runtime threads, or the registry's process),
/// so each end's cost per byte is what it would cost on its own machine.
#[derive(Clone, Copy)]
struct Cost {
    wall: Duration,
    cpu: Duration,
    server: Duration,
}

/// Runs of the peer get and of each registry pull, taking turns.
const ROUNDS: usize = 5;

/// The name of the node runtime's threads, by which its CPU time is told from the client's.
const NODE_THREADS: &str = "bench-node";

fn cpu_time() -> Duration {
    // SAFETY: rusage is a plain struct that getrusage fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// utime + stime from a `/proc/.../stat` line (fields 14 and 15, after the parenthesised name).
fn stat_cpu(stat: &str) -> Duration {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let fields: Vec<u64> = after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Duration::from_millis(fields.iter().sum::<u64>() * 1000 / ticks)
}

/// CPU time of this process's threads named `name` (live threads only: runtimes keep theirs).
fn threads_cpu(name: &str) -> Duration {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            total +=
                stat_cpu(&std::fs::read_to_string(task.path().join("stat")).unwrap_or_default());
        }
    }
    total
}

/// Where the serving end's CPU time is read.
#[derive(Clone, Copy)]
enum Server {
    Threads(&'static str),
    Process(u32),
    Nowhere,
}

impl Server {
    fn cpu(self) -> Duration {
        match self {
            Server::Threads(name) => threads_cpu(name),
            Server::Process(pid) => {
                stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default())
            }
            Server::Nowhere => Duration::ZERO,
        }
    }
}

fn measure(server: Server, run: impl FnOnce() -> Duration) -> Cost {
    let (cpu, served) = (cpu_time(), server.cpu());
    let wall = run();
    let server_cpu = server.cpu() - served;
    let own = cpu_time() - cpu;
    Cost {
        wall,
        // A registry's process is not this one: its time adds to ours.
        cpu: match server {
            Server::Process(_) => own + server_cpu,
            _ => own,
        },
        server: server_cpu,
    }
}

fn median3(server: Server, mut run: impl FnMut() -> Duration) -> Cost {
    median((0..3).map(|_| measure(server, &mut run)).collect())
}

/// The run of median wall time.
fn median(mut runs: Vec<Cost>) -> Cost {
    runs.sort_by_key(|c| c.wall);
    runs[runs.len() / 2]
}

/// CLOCK_MONOTONIC in seconds, as `perf record -k CLOCK_MONOTONIC` stamps its samples.
fn monotonic() -> f64 {
    // SAFETY: clock_gettime fills the timespec it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// A plain TCP copy of `file` over loopback into a new file in `dir`; hashes what arrives when
/// `verify` (and checks it).
fn tcp_copy(file: &Path, dir: &Path, verify: Option<Digest>) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let src = file.to_path_buf();
    let sender = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut f = std::fs::File::open(src).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).unwrap();
        }
    });
    let started = Instant::now();
    let mut sock = TcpStream::connect(addr).unwrap();
    let out_path = dir.join("tcp-copy");
    let mut out =
        std::io::BufWriter::with_capacity(256 << 10, std::fs::File::create(&out_path).unwrap());
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = sock.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if verify.is_some() {
            hasher.update(&buf[..n]);
        }
        out.write_all(&buf[..n]).unwrap();
    }
    out.flush().unwrap();
    let elapsed = started.elapsed();
    sender.join().unwrap();
    if let Some(want) = verify {
        assert_eq!(Digest::from_bytes(hasher.finalize().into()), want);
    }
    std::fs::remove_file(out_path).unwrap();
    elapsed
}

/// A registry of the test environment (`scripts/testenv.sh start`).
fn test_registry(tls: bool) -> Option<TestRegistry> {
    let testenv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.testenv");
    let text = std::fs::read_to_string(testenv.join("env")).ok()?;
    let var = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| v.trim_matches('"').to_string())
    };
    let (addr_var, pid_file) = if tls {
        ("OSSB_TEST_TLS_REGISTRY", "registry-tls.pid")
    } else {
        ("OSSB_TEST_REGISTRY", "registry-plain.pid")
    };
    let pid = std::fs::read_to_string(testenv.join("run").join(pid_file)).ok()?;
    Some(TestRegistry {
        addr: var(addr_var)?,
        ca: if tls {
            var("OSSB_TEST_CA").map(PathBuf::from)
        } else {
            None
        },
        pid: pid.trim().parse().ok()?,
    })
}

/// One pull of `pushed` into an empty store under `work`, with the registry's CPU time.
fn pull(rt: &tokio::runtime::Runtime, pushed: &Pushed, layer: &Digest, work: &Path) -> Cost {
    let dir = work.join("registry-pull");
    let store = BlobStore::open(&dir).unwrap();
    let cost = measure(Server::Process(pushed.pid), || {
        let started = Instant::now();
        rt.block_on(pushed.registry.pull(
            &pushed.reference,
            &"linux/amd64".parse().unwrap(),
            &store,
        ))
        .unwrap();
        started.elapsed()
    });
    assert!(store.contains(layer));
    let _ = std::fs::remove_dir_all(dir);
    cost
}

/// `size` bytes over one QUIC stream between two ossb endpoints (the cluster's transport
/// settings, mutual TLS), from memory to nowhere: the transport's own cost, without hashing
/// or disks. The sender runs on `server_rt`, the receiver on `rt`.
fn raw_quic(
    server_rt: &tokio::runtime::Runtime,
    rt: &tokio::runtime::Runtime,
    tls: &Path,
    size: u64,
) -> Cost {
    use ossb_net::{Identity, Role};
    let node = Identity::load(tls, Role::Node).unwrap();
    let client_id = Identity::load(tls, Role::Client).unwrap();
    let server = {
        let _in = server_rt.enter();
        ossb_net::server("127.0.0.1:0".parse().unwrap(), &node).unwrap()
    };
    let addr = server.local_addr().unwrap().to_string();
    let accepting = server.clone();
    server_rt.spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                let conn = incoming.await.unwrap();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let mut one = [0u8; 1];
                    let _ = recv.read_exact(&mut one).await;
                    let chunk = vec![0x5au8; 1 << 20];
                    let mut left = size;
                    while left > 0 {
                        let n = left.min(chunk.len() as u64) as usize;
                        send.write_all(&chunk[..n]).await.unwrap();
                        left -= n as u64;
                    }
                    let _ = send.finish();
                    let _ = send.stopped().await;
                    if std::env::var_os("OSSB_BENCH_PEER_ONLY").is_some() {
                        let path = conn.stats().path;
                        eprintln!(
                            "raw QUIC sender: path MTU at the end {}, packets lost {}, MTU black holes detected {}",
                            path.current_mtu, path.lost_packets, path.black_holes_detected
                        );
                    }
                }
            });
        }
    });
    let client = {
        let _in = rt.enter();
        ossb_net::client(&client_id).unwrap()
    };
    let conn = rt
        .block_on(ossb_net::connect(&client, &addr, Duration::from_secs(10)))
        .unwrap();
    median3(Server::Threads(NODE_THREADS), || {
        rt.block_on(async {
            let started = Instant::now();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&[1]).await.unwrap();
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0u64;
            while let Some(n) = recv.read(&mut buf).await.unwrap() {
                got += n as u64;
            }
            assert_eq!(got, size);
            if std::env::var_os("OSSB_BENCH_PEER_ONLY").is_some() {
                let rx = conn.stats().udp_rx;
                eprintln!(
                    "raw QUIC receiver: {} datagrams so far, {} bytes each on average",
                    rx.datagrams,
                    rx.bytes / rx.datagrams.max(1)
                );
            }
            started.elapsed()
        })
    })
}

fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mib: usize = std::env::var("OSSB_BENCH_PEER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let size = (mib as u64) << 20;
    let scratch: PathBuf = std::env::var("OSSB_BENCH_DIR")
        .unwrap_or_else(|_| "/var/tmp".into())
        .into();
    let work = tempfile::tempdir_in(scratch).unwrap();
    let src = BlobStore::open(work.path().join("src")).unwrap();
    let digest = random_blob(&src, size as usize);
    let tls = work.path().join("tls");
    ossb_net::certs::init(&tls, &[]).unwrap();

    // The node, on a runtime of its own (as if it were another process).
    let node_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(NODE_THREADS)
        .enable_all()
        .build()
        .unwrap();
    let node = node_rt
        .block_on(Node::start(NodeConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: work.path().join("node"),
            tls_dir: tls.clone(),
            peers: Vec::new(),
            max_size: None,
            metrics: None,
        }))
        .unwrap();
    let name = node.local_addr().to_string();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .unwrap();
    let client = {
        let _in = rt.enter();
        PeerCache::connect(&tls, std::slice::from_ref(&name)).unwrap()
    };
    let put = measure(Server::Threads(NODE_THREADS), || {
        let started = Instant::now();
        rt.block_on(client.put_to_node(&name, &digest, &src))
            .unwrap();
        started.elapsed()
    });

    // The peer get and the registry pulls take turns, ROUNDS times: a machine that slows down
    // for a while (page cache reclaim, a neighbour) slows each of them alike.
    let only_peer = std::env::var_os("OSSB_BENCH_PEER_ONLY").is_some();
    let registries: Vec<(&str, Option<Pushed>)> = [
        (true, "registry pull (ossb client, HTTPS, verified)"),
        (false, "registry pull (ossb client, plain HTTP, verified)"),
    ]
    .into_iter()
    .filter(|_| !only_peer)
    .map(|(tls, name)| {
        let pushed = test_registry(tls).map(|t| push_one_layer(&rt, &t, &src, digest));
        (name, pushed)
    })
    .collect();
    let mut gets = Vec::new();
    let mut pulls: Vec<Vec<Cost>> = vec![Vec::new(); registries.len()];
    for round in 1..=ROUNDS {
        gets.push(measure(Server::Threads(NODE_THREADS), || {
            let dst = BlobStore::open(work.path().join("dst")).unwrap();
            let (started, from) = (Instant::now(), monotonic());
            rt.block_on(client.get_to_store(&digest, &dst)).unwrap();
            let elapsed = started.elapsed();
            if only_peer {
                // For `perf record -k CLOCK_MONOTONIC` then `perf report --time FROM,TO`.
                eprintln!(
                    "peer cache get {round}: --time {from:.6},{:.6}",
                    monotonic()
                );
            }
            let _ = std::fs::remove_dir_all(work.path().join("dst"));
            elapsed
        }));
        for ((_, pushed), costs) in registries.iter().zip(&mut pulls) {
            if let Some(pushed) = pushed {
                costs.push(pull(&rt, pushed, &digest, work.path()));
            }
        }
    }
    let quic = median(gets);
    let raw = raw_quic(&node_rt, &rt, &tls, size);
    let per_gib = |d: Duration| d.as_secs_f64() * (1u64 << 30) as f64 / size as f64;
    let row = |name: &str, c: Cost| {
        println!(
            "{name:<56} {:>7.3}s {:>6.0} MiB/s  peer get/this {:>5.2}x  CPU {:>5.2}s/GiB (client {:>5.2}, server {:>5.2})",
            c.wall.as_secs_f64(),
            mib_s(size, c.wall),
            mib_s(size, quic.wall) / mib_s(size, c.wall),
            per_gib(c.cpu),
            per_gib(c.cpu - c.server),
            per_gib(c.server),
        );
    };
    println!(
        "one {mib} MiB blob over loopback (medians by wall time: {ROUNDS} interleaved runs of the get and the pulls, 3 of the others)"
    );
    row("peer cache get (QUIC, mTLS, sha256 both ends)", quic);
    row("peer cache put (QUIC, verified by the node)", put);
    row("raw QUIC stream, memory to memory (no hash, no disk)", raw);
    if std::env::var_os("OSSB_BENCH_PEER_ONLY").is_some() {
        return;
    }
    let blob_file = src.path(&digest);
    let tcp = median3(Server::Nowhere, || tcp_copy(&blob_file, work.path(), None));
    let tcp_sha = median3(Server::Nowhere, || {
        tcp_copy(&blob_file, work.path(), Some(digest))
    });
    row("raw TCP copy to a file (both ends)", tcp);
    row("raw TCP copy to a file + sha256 (both ends)", tcp_sha);
    for ((name, _), costs) in registries.iter().zip(pulls) {
        match costs.is_empty() {
            false => row(name, median(costs)),
            true => println!("{name}: skipped (scripts/testenv.sh start)"),
        }
    }
    drop(node);
}
