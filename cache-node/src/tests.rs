//! Nodes and clients in one process, over real QUIC on loopback.

use std::path::Path;

use ossb_image::store::BlobStore;
use ossb_protocol::Digest;

use crate::{ClientError, Node, NodeConfig, PeerCache};

struct Cluster {
    _dir: tempfile::TempDir,
    tls: std::path::PathBuf,
    nodes: Vec<Node>,
    names: Vec<String>,
    data: Vec<std::path::PathBuf>,
}

/// `n` nodes on loopback that know each other (ports are picked first, so the peer lists
/// are complete).
async fn cluster(n: usize, max_size: Option<u64>) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    ossb_net::certs::init(&tls, &[]).unwrap();
    let ports: Vec<u16> = (0..n)
        .map(|_| {
            std::net::UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let names: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes = Vec::new();
    let mut data = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let data_dir = dir.path().join(format!("node{i}"));
        nodes.push(
            Node::start(NodeConfig {
                listen: name.parse().unwrap(),
                data_dir: data_dir.clone(),
                tls_dir: tls.clone(),
                peers: names.clone(),
                max_size,
                metrics: None,
            })
            .await
            .unwrap(),
        );
        data.push(data_dir);
    }
    Cluster {
        _dir: dir,
        tls,
        nodes,
        names,
        data,
    }
}

fn local_store(dir: &Path) -> BlobStore {
    BlobStore::open(dir).unwrap()
}

fn tmp_is_empty(data_dir: &Path) -> bool {
    std::fs::read_dir(data_dir.join("tmp")).unwrap().count() == 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_goes_to_both_homes_and_get_verifies_and_resumes() {
    let c = cluster(3, None).await;
    let client = PeerCache::connect(&c.tls, &c.names).unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = local_store(&work.path().join("src"));
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = src.put(&bytes).unwrap();
    assert_eq!(client.put_from_store(&digest, &src).await.unwrap(), 2);
    let homes = client.placement().homes(&digest);
    for (name, node) in c.names.iter().zip(&c.nodes) {
        let held = node.stats().blobs == 1;
        assert_eq!(held, homes.contains(&name.as_str()), "{name}");
    }
    assert_eq!(
        client.has(&[digest, Digest::of(b"nope")]).await,
        vec![true, false]
    );
    // A second put finds it present.
    assert_eq!(client.put_from_store(&digest, &src).await.unwrap(), 2);

    let dst = local_store(&work.path().join("dst"));
    assert_eq!(client.get_to_store(&digest, &dst).await.unwrap(), 3_000_000);
    assert_eq!(dst.read(&digest).unwrap(), bytes);

    // Resuming: a partial blob that already holds the first bytes asks only for the rest.
    let resumed = local_store(&work.path().join("resumed"));
    let mut partial = resumed.partial().unwrap();
    partial.write(&bytes[..1_234_567]).unwrap();
    let home = homes[0].to_string();
    let before = client.stats(&home).await.unwrap().bytes_out;
    let (attempt, partial) = client.get_once(&home, &digest, partial).await;
    match attempt {
        crate::client::Attempt::Complete => {}
        _ => panic!("resume failed"),
    }
    assert_eq!(partial.commit(&digest).unwrap(), 3_000_000);
    let after = client.stats(&home).await.unwrap().bytes_out;
    assert_eq!(after - before, 3_000_000 - 1_234_567);
    assert!(c.data.iter().all(|d| tmp_is_empty(d)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_bytes_do_not_match_is_refused_and_nothing_is_stored() {
    let c = cluster(1, None).await;
    let client = PeerCache::connect(&c.tls, &c.names).unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = local_store(work.path());
    let digest = src.put(b"the right bytes").unwrap();
    std::fs::write(src.path(&digest), b"the wrong bytes").unwrap();
    let err = client
        .put_to_node(&c.names[0], &digest, &src)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("verification failed"), "{err}");
    let stats = c.nodes[0].stats();
    assert_eq!((stats.blobs, stats.verification_failures), (0, 1));
    let node_store = local_store(&c.data[0]);
    assert!(node_store.blobs().unwrap().is_empty());
    assert!(tmp_is_empty(&c.data[0]));
    // Fewer bytes than announced: refused too.
    std::fs::write(src.path(&digest), b"short").unwrap();
    assert!(client
        .put_to_node(&c.names[0], &digest, &src)
        .await
        .is_err());
    assert!(node_store.blobs().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_corrupted_on_disk_is_discarded_and_refilled_from_the_replica() {
    let c = cluster(2, None).await;
    let client = PeerCache::connect(&c.tls, &c.names).unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = local_store(&work.path().join("src"));
    let bytes = vec![42u8; 2_500_000];
    let digest = src.put(&bytes).unwrap();
    assert_eq!(client.put_from_store(&digest, &src).await.unwrap(), 2);
    // Flip a byte in node 0's copy.
    let path = local_store(&c.data[0]).path(&digest);
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[2_000_000] ^= 1;
    std::fs::write(&path, on_disk).unwrap();

    let dst = local_store(&work.path().join("dst"));
    let err = client
        .get_from_node(&c.names[0], &digest, &dst)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(!dst.contains(&digest));
    assert!(!path.exists(), "the corrupt copy was kept");
    assert_eq!(c.nodes[0].stats().verification_failures, 1);
    // Node 0 is a home of the blob: asked again, it refills itself from node 1.
    assert_eq!(
        client
            .get_from_node(&c.names[0], &digest, &dst)
            .await
            .unwrap(),
        2_500_000
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_evicts_the_least_recently_used_blob() {
    let c = cluster(1, Some(250_000)).await;
    let client = PeerCache::connect(&c.tls, &c.names).unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = local_store(work.path());
    let blobs: Vec<Digest> = (0..3u8)
        .map(|i| src.put(&vec![i; 100_000]).unwrap())
        .collect();
    client.put_from_store(&blobs[0], &src).await.unwrap();
    client.put_from_store(&blobs[1], &src).await.unwrap();
    // Use blob 0, so blob 1 is the least recently used when blob 2 arrives.
    let dst = local_store(&work.path().join("dst"));
    client.get_to_store(&blobs[0], &dst).await.unwrap();
    client.put_from_store(&blobs[2], &src).await.unwrap();
    assert_eq!(client.has(&blobs).await, vec![true, false, true]);
    let stats = c.nodes[0].stats();
    assert_eq!((stats.blobs, stats.bytes, stats.evictions), (2, 200_000, 1));
    // Larger than the limit: refused outright.
    let big = src.put(&vec![9u8; 300_000]).unwrap();
    let err = client.put_from_store(&big, &src).await.unwrap_err();
    assert!(matches!(err, ClientError::PutFailed { .. }), "{err}");
}
