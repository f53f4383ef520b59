//! A 1 GiB blob fetched from a peer cache node over QUIC (mutual TLS, sha256-verified on both
//! ends, written to the local blob store) against the physical limits of this machine's
//! loopback: the same bytes over a plain TCP connection (a Rust copy to a file, without and
//! with sha256), and a pull of the same blob as a one-layer image from the test environment's
//! registry (ossb's registry client; skipped when `scripts/testenv.sh start` has not run).
//! The node runs in this process on its own runtime. Median of 3 per row.
//!
//! `cargo bench -p ossb-benches --bench peer_cache`; `OSSB_BENCH_PEER_MIB=256` for a smaller
//! blob on a busy machine; `OSSB_BENCH_DIR` for the scratch directory (default /var/tmp);
//! `OSSB_BENCH_PEER_ONLY=1` for the peer cache and raw QUIC rows alone (to profile them), with
//! the raw QUIC connection's path statistics (MTU, losses, black holes) on stderr.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ossb_cache_node::{Node, NodeConfig, PeerCache};
use ossb_image::oci::{
    media_type, to_canonical_json, Descriptor, ImageConfig, Manifest, MediaTypes,
};
use ossb_image::registry::{parse_reference, PushOptions, Registry, RegistryOptions};
use ossb_image::store::BlobStore;
use ossb_protocol::Digest;
use sha2::Digest as _;

fn random_blob(store: &BlobStore, len: usize) -> Digest {
    let mut w = store.writer().unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ std::process::id() as u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len());
        w.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    w.commit(None).unwrap().0
}

/// A run's wall time and the CPU time (user + system) this process spent in it: both ends
/// run in this process, so CPU per byte compares the transports even on a busy machine where
/// wall time depends on what else runs.
#[derive(Clone, Copy)]
struct Cost {
    wall: Duration,
    cpu: Duration,
}

fn cpu_time() -> Duration {
    // SAFETY: rusage is a plain struct that getrusage fills.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn median3(mut run: impl FnMut() -> Duration) -> Cost {
    let mut v: Vec<Cost> = (0..3)
        .map(|_| {
            let cpu = cpu_time();
            let wall = run();
            Cost {
                wall,
                cpu: cpu_time() - cpu,
            }
        })
        .collect();
    v.sort_by_key(|c| c.wall);
    v[1]
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

fn registry_addr() -> Option<String> {
    if let Ok(r) = std::env::var("OSSB_TEST_REGISTRY") {
        return Some(r);
    }
    let env = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.testenv/env");
    let text = std::fs::read_to_string(env).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("export OSSB_TEST_REGISTRY="))
        .map(|r| r.trim_matches('"').to_string())
}

/// Pushes `layer` as a one-layer image and times three pulls of it into empty stores.
fn registry_pull(
    rt: &tokio::runtime::Runtime,
    reg: &str,
    src: &BlobStore,
    layer: Digest,
    work: &Path,
) -> Cost {
    let size = src.size(&layer).unwrap();
    let d = |mt: &str, digest, size| Descriptor {
        media_type: mt.into(),
        digest,
        size,
        platform: None,
        annotations: None,
    };
    let mut config = ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        ..Default::default()
    };
    config.rootfs.diff_ids.push(layer);
    let config = to_canonical_json(&config);
    let config = d(
        media_type::OCI_CONFIG,
        src.put(&config).unwrap(),
        config.len() as u64,
    );
    let layers = [d(media_type::OCI_LAYER_GZIP, layer, size)];
    let manifest = to_canonical_json(&Manifest::new(&config, &layers, MediaTypes::Oci).unwrap());
    let top = d(
        media_type::OCI_MANIFEST,
        src.put(&manifest).unwrap(),
        manifest.len() as u64,
    );
    let registry = Registry::new(&RegistryOptions {
        insecure: vec![reg.to_string()],
        certificates: Vec::new(),
    })
    .unwrap();
    let reference =
        parse_reference(&format!("{reg}/bench/peer-cache-{}:v1", std::process::id())).unwrap();
    rt.block_on(registry.push_image(&reference, src, &top, &PushOptions::default()))
        .unwrap();
    let mut round = 0;
    median3(|| {
        round += 1;
        let store = BlobStore::open(work.join(format!("registry-pull-{round}"))).unwrap();
        let started = Instant::now();
        rt.block_on(registry.pull(&reference, &"linux/amd64".parse().unwrap(), &store))
            .unwrap();
        let elapsed = started.elapsed();
        assert!(store.contains(&layer));
        let _ = std::fs::remove_dir_all(work.join(format!("registry-pull-{round}")));
        elapsed
    })
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
    median3(|| {
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
        .enable_all()
        .build()
        .unwrap();
    let client = {
        let _in = rt.enter();
        PeerCache::connect(&tls, std::slice::from_ref(&name)).unwrap()
    };
    let (started, cpu) = (Instant::now(), cpu_time());
    rt.block_on(client.put_to_node(&name, &digest, &src))
        .unwrap();
    let put = Cost {
        wall: started.elapsed(),
        cpu: cpu_time() - cpu,
    };

    let mut round = 0;
    let quic = median3(|| {
        round += 1;
        let dst = BlobStore::open(work.path().join(format!("dst-{round}"))).unwrap();
        let started = Instant::now();
        rt.block_on(client.get_to_store(&digest, &dst)).unwrap();
        let elapsed = started.elapsed();
        let _ = std::fs::remove_dir_all(work.path().join(format!("dst-{round}")));
        elapsed
    });
    let raw = raw_quic(&node_rt, &rt, &tls, size);
    if std::env::var_os("OSSB_BENCH_PEER_ONLY").is_some() {
        println!(
            "peer cache get {:.3}s CPU {:.2}s; put {:.3}s CPU {:.2}s; raw QUIC {:.3}s CPU {:.2}s ({mib} MiB)",
            quic.wall.as_secs_f64(),
            quic.cpu.as_secs_f64(),
            put.wall.as_secs_f64(),
            put.cpu.as_secs_f64(),
            raw.wall.as_secs_f64(),
            raw.cpu.as_secs_f64()
        );
        return;
    }
    let blob_file = src.path(&digest);
    let tcp = median3(|| tcp_copy(&blob_file, work.path(), None));
    let tcp_sha = median3(|| tcp_copy(&blob_file, work.path(), Some(digest)));
    let registry = registry_addr().map(|reg| registry_pull(&rt, &reg, &src, digest, work.path()));

    println!(
        "one {mib} MiB blob over loopback (median of 3 by wall time; CPU: both ends, this process)"
    );
    let row = |name: &str, c: Cost| {
        println!(
            "{name:<50} {:>7.3}s {:>6.0} MiB/s  QUIC/this {:>5.2}x  CPU {:>6.2}s/GiB",
            c.wall.as_secs_f64(),
            mib_s(size, c.wall),
            mib_s(size, quic.wall) / mib_s(size, c.wall),
            c.cpu.as_secs_f64() * (1u64 << 30) as f64 / size as f64
        );
    };
    row("peer cache get (QUIC, mTLS, sha256 both ends)", quic);
    row("peer cache put (QUIC, verified by the node)", put);
    row("raw QUIC stream, memory to memory (no hash, no disk)", raw);
    row("raw TCP copy to a file", tcp);
    row("raw TCP copy to a file + sha256", tcp_sha);
    match registry {
        Some(d) => row("registry pull (ossb client, plain HTTP, verified)", d),
        None => println!("registry pull: skipped (scripts/testenv.sh start)"),
    }
    drop(node);
}
