//! The peer cache through real `ossb cache-node` processes on loopback: replication to both
//! home nodes, a replica that survives `kill -9` of the other node, a byte flipped on a node's
//! disk that is detected and never served, and mutual TLS that refuses another CA's client.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ossb_cache_node::PeerCache;
use ossb_image::store::BlobStore;

/// Cache node processes, killed when dropped.
struct Nodes {
    children: Vec<Child>,
    quic: Vec<String>,
    metrics: Vec<String>,
    data: Vec<PathBuf>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

fn certs_init(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_ossb"))
        .args([
            "certs",
            "init",
            dir.to_str().unwrap(),
            "--san",
            "cache.test",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ossb certs init failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "node.key must be private");
}

fn start_nodes(root: &Path, tls: &Path, n: usize) -> Nodes {
    let quic: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_udp_port()))
        .collect();
    let metrics: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_tcp_port()))
        .collect();
    let mut nodes = Nodes {
        children: Vec::new(),
        quic: quic.clone(),
        metrics: metrics.clone(),
        data: Vec::new(),
    };
    for i in 0..n {
        let data = root.join(format!("node{i}"));
        let log = std::fs::File::create(root.join(format!("node{i}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ossb"))
            .args([
                "cache-node",
                "--listen",
                &quic[i],
                "--data-dir",
                data.to_str().unwrap(),
                "--tls-dir",
                tls.to_str().unwrap(),
                "--peers",
                &quic.join(","),
                "--max-size",
                "1GB",
                "--metrics",
                &metrics[i],
            ])
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting ossb cache-node");
        nodes.children.push(child);
        nodes.data.push(data);
    }
    for m in &metrics {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(m, "/healthz").is_none_or(|b| b != "ok\n") {
            assert!(
                Instant::now() < deadline,
                "cache node {m} never became healthy"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    nodes
}

/// The body of a plain HTTP GET, if the server answers 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

fn metric(addr: &str, name: &str) -> u64 {
    let text = http_get(addr, "/metrics").expect("/metrics answers");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
        .parse()
        .unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

#[test]
fn cache_nodes_replicate_survive_a_kill_detect_corruption_and_refuse_strangers() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    certs_init(&tls);
    // Another CA's certificates, trusting ours: only the node can refuse them.
    let other_ca = dir.path().join("other-tls");
    certs_init(&other_ca);
    std::fs::copy(tls.join("ca.crt"), other_ca.join("ca.crt")).unwrap();
    let mut nodes = start_nodes(dir.path(), &tls, 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Endpoints bind their socket on the runtime.
    let _in_runtime = rt.enter();
    let client = PeerCache::connect(&tls, &nodes.quic).unwrap();
    let local = BlobStore::open(dir.path().join("worker")).unwrap();
    let blob = pattern(6 << 20, 1);
    let digest = local.put(&blob).unwrap();
    let fragile = local.put(&pattern(3 << 20, 2)).unwrap();

    // A put reaches both nodes (with two nodes, both are home nodes).
    for d in [digest, fragile] {
        assert_eq!(rt.block_on(client.put_from_store(&d, &local)).unwrap(), 2);
    }
    for m in &nodes.metrics {
        assert_eq!(metric(m, "ossb_cache_blobs"), 2, "{m}");
    }

    // Each node serves it on its own: the replica is a full copy.
    for node in &nodes.quic {
        let store =
            BlobStore::open(dir.path().join(format!("get-{}", node.replace(':', "-")))).unwrap();
        let size = rt
            .block_on(client.get_from_node(node, &digest, &store))
            .unwrap();
        assert_eq!(size, blob.len() as u64);
        assert_eq!(store.read(&digest).unwrap(), blob);
    }

    // A byte flipped on node 0's disk: detected when read, the copy discarded, nothing served.
    let on_disk = BlobStore::open(&nodes.data[0]).unwrap().path(&fragile);
    let mut bytes = std::fs::read(&on_disk).unwrap();
    bytes[1_000_000] ^= 0x40;
    std::fs::write(&on_disk, bytes).unwrap();
    let victim = BlobStore::open(dir.path().join("victim")).unwrap();
    let err = rt
        .block_on(client.get_from_node(&nodes.quic[0], &fragile, &victim))
        .unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(!victim.contains(&fragile), "a corrupt blob was stored");
    assert!(
        std::fs::read_dir(victim.tmp_dir())
            .unwrap()
            .next()
            .is_none(),
        "the corrupt bytes were left behind"
    );
    assert!(!on_disk.exists(), "the node kept its corrupt copy");
    assert_eq!(
        metric(&nodes.metrics[0], "ossb_cache_verification_failures_total"),
        1
    );
    // Through placement, the client gets the good copy of node 1.
    assert_eq!(
        rt.block_on(client.get_to_store(&fragile, &victim)).unwrap(),
        3 << 20
    );

    // kill -9 of node 0: the blob is still served, by node 1.
    nodes.children[0].kill().unwrap();
    nodes.children[0].wait().unwrap();
    let after_kill = BlobStore::open(dir.path().join("after-kill")).unwrap();
    let started = Instant::now();
    let fresh = PeerCache::connect(&tls, &nodes.quic).unwrap();
    assert_eq!(
        rt.block_on(fresh.get_to_store(&digest, &after_kill))
            .unwrap(),
        blob.len() as u64
    );
    assert_eq!(after_kill.read(&digest).unwrap(), blob);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "failover took {:?}",
        started.elapsed()
    );
    assert!(metric(&nodes.metrics[1], "ossb_cache_hits_total") >= 2);

    // A client whose certificate another CA signed is refused.
    let stranger = PeerCache::connect(&other_ca, &nodes.quic[1..]).unwrap();
    let refused = BlobStore::open(dir.path().join("stranger")).unwrap();
    let err = rt
        .block_on(stranger.get_to_store(&digest, &refused))
        .unwrap_err();
    assert!(!refused.contains(&digest));
    assert!(
        rt.block_on(stranger.stats(&nodes.quic[1])).is_err(),
        "a stranger read the node's counters ({err})"
    );

    // The node logs JSON lines to stdout.
    let log = std::fs::read_to_string(dir.path().join("node1.log")).unwrap();
    let first = log.lines().next().expect("the node logged nothing");
    let line: serde_json::Value = serde_json::from_str(first).expect("a JSON log line");
    assert!(line["fields"]["message"].is_string(), "{first}");
}
