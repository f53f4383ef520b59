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

/// A client of the cluster with a worker's certificate (claims are for those who fetch).
fn worker_client(tls: &Path, names: &[String]) -> PeerCache {
    let identity = ossb_net::Identity::load(tls, ossb_net::Role::Worker).unwrap();
    PeerCache::new(ossb_net::client(&identity).unwrap(), names)
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
    let (attempt, partial) = client.attempt(&home, &digest, partial, false).await;
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
async fn a_check_of_an_intact_blob_keeps_it() {
    let c = cluster(1, None).await;
    let client = PeerCache::connect(&c.tls, &c.names).unwrap();
    let work = tempfile::tempdir().unwrap();
    let src = local_store(&work.path().join("src"));
    let digest = src.put(&vec![7u8; 300_000]).unwrap();
    assert_eq!(client.put_from_store(&digest, &src).await.unwrap(), 1);
    // A mistaken (or hostile) report does not cost the node its copy.
    assert_eq!(client.check(&c.names[0], &digest).await, Ok(true));
    assert!(local_store(&c.data[0]).contains(&digest));
    assert_eq!(c.nodes[0].stats().verification_failures, 0);
    let absent = Digest::of(b"never stored");
    assert!(client.check(&c.names[0], &absent).await.is_err());
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

/// The bytes of a test blob of `n` bytes.
fn pattern(n: u32) -> Vec<u8> {
    (0..n).map(|i| (i * 13 % 251) as u8).collect()
}

/// Single-flight: the first asker of a blob nobody has is made its fetcher; the others get its
/// bytes as they reach the node (before the fetch ends), verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fetcher_per_blob_and_the_others_follow_its_bytes() {
    let c = cluster(2, None).await;
    let bytes = pattern(4_000_000);
    let digest = Digest::of(&bytes);
    let work = tempfile::tempdir().unwrap();
    let fetcher = worker_client(&c.tls, &c.names);
    let store = local_store(&work.path().join("fetcher"));
    // A submitter's get never claims.
    let submitter = PeerCache::connect(&c.tls, &c.names).unwrap();
    let submitter_store = local_store(&work.path().join("submitter"));
    assert!(matches!(
        submitter.get_or_claim(&digest, &submitter_store).await,
        Err(ClientError::NotFound { .. })
    ));
    let crate::Claimed::Fetch(fetch) = fetcher.get_or_claim(&digest, &store).await.unwrap() else {
        panic!("the first asker was not made the fetcher");
    };
    let (node, 0) = (fetch.node, fetch.from) else {
        panic!()
    };
    let followers: Vec<_> = (0..2)
        .map(|i| {
            let (tls, names) = (c.tls.clone(), c.names.clone());
            let dir = work.path().join(format!("follower{i}"));
            tokio::spawn(async move {
                let client = worker_client(&tls, &names);
                let store = local_store(&dir);
                let got = client.get_or_claim(&digest, &store).await.unwrap();
                (got, store.read(&digest).ok())
            })
        })
        .collect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let put = {
        let (fetcher, node) = (fetcher.clone(), node.clone());
        tokio::spawn(async move { fetcher.put_stream(&node, &digest, 4_000_000, 0, rx).await })
    };
    // The first half, then a pause: the followers have it before the rest exists.
    let half = bytes::Bytes::copy_from_slice(&bytes[..2_000_000]);
    tx.send(half).await.unwrap();
    let node_index = c.names.iter().position(|n| *n == node).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while c.nodes[node_index].stats().bytes_out < 2 * 2_000_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the followers did not get the first half"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tx.send(bytes::Bytes::copy_from_slice(&bytes[2_000_000..]))
        .await
        .unwrap();
    drop(tx);
    put.await.unwrap().unwrap();
    for f in followers {
        let (got, read) = f.await.unwrap();
        assert!(matches!(got, crate::Claimed::Got(4_000_000)), "{got:?}");
        assert_eq!(read.as_deref(), Some(&bytes[..]));
    }
    let stats = c.nodes[node_index].stats();
    assert_eq!((stats.fetch_claims, stats.followed), (1, 2));
    assert!(c.data.iter().all(|d| tmp_is_empty(d)));
}

/// A fetcher that dies halfway leaves its bytes on the node: a waiting asker is told the fetch
/// stalled, asks again, and resumes it where it stopped (the node hands it the kept bytes
/// with the claim). A claim whose holder goes away without putting lapses with its
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_asker_resumes_a_dead_fetchers_bytes() {
    let c = cluster(1, None).await;
    let bytes = pattern(1_000_000);
    let digest = Digest::of(&bytes);
    let work = tempfile::tempdir().unwrap();
    let other = worker_client(&c.tls, &c.names);
    let other_store = local_store(&work.path().join("other"));

    // A put that stops halfway, once its first half reached a follower (so it is on disk).
    let fetcher = worker_client(&c.tls, &c.names);
    let store = local_store(&work.path().join("fetcher"));
    let crate::Claimed::Fetch(fetch) = fetcher.get_or_claim(&digest, &store).await.unwrap() else {
        panic!()
    };
    let (node, 0) = (fetch.node, fetch.from) else {
        panic!()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let put = {
        let (fetcher, node) = (fetcher.clone(), node.clone());
        tokio::spawn(async move { fetcher.put_stream(&node, &digest, 1_000_000, 0, rx).await })
    };
    tx.send(bytes::Bytes::copy_from_slice(&bytes[..500_000]))
        .await
        .unwrap();
    let waiting = {
        let (other, store) = (other.clone(), other_store.clone());
        tokio::spawn(async move { other.get_or_claim(&digest, &store).await })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while c.nodes[0].stats().bytes_out < 500_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "nobody followed the put"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(tx);
    assert!(put.await.unwrap().is_err());
    // The follower claims the blob again and resumes at the first missing byte.
    let crate::Claimed::Fetch(fetch) = waiting.await.unwrap().unwrap() else {
        panic!("the follower did not resume the fetch")
    };
    let crate::Fetch {
        node,
        from,
        mut start,
    } = *fetch;
    assert_eq!((from, start.len()), (500_000, 500_000));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(bytes::Bytes::copy_from_slice(&bytes[500_000..]))
        .await
        .unwrap();
    drop(tx);
    other
        .put_stream(&node, &digest, 1_000_000, from, rx)
        .await
        .unwrap();
    start.write(&bytes[500_000..]).unwrap();
    assert_eq!(start.commit(&digest).unwrap(), 1_000_000);
    let fresh = local_store(&work.path().join("fresh"));
    other.get_to_store(&digest, &fresh).await.unwrap();
    assert_eq!(fresh.read(&digest).unwrap(), bytes);
    assert_eq!(c.nodes[0].stats().fetch_claims, 2);

    // A claim whose holder goes away without putting lapses with its connection.
    let second = pattern(300_000)
        .into_iter()
        .map(|b| b ^ 1)
        .collect::<Vec<_>>();
    let second = Digest::of(&second);
    let quitter = worker_client(&c.tls, &c.names);
    let Ok(crate::Claimed::Fetch(_)) = quitter.get_or_claim(&second, &store).await else {
        panic!()
    };
    let third = worker_client(&c.tls, &c.names);
    let third_store = local_store(&work.path().join("third"));
    let waiting = tokio::spawn(async move { third.get_or_claim(&second, &third_store).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the third asker did not wait for the claim"
    );
    drop(quitter); // closes its connection: its claim lapses
    let after = tokio::time::timeout(std::time::Duration::from_secs(20), waiting)
        .await
        .expect("the waiting asker hung after the fetcher left")
        .unwrap();
    match after {
        Ok(crate::Claimed::Fetch(f)) => assert_eq!(f.from, 0),
        Err(_) => {} // told the claim lapsed; its next ask claims
        Ok(got) => panic!("{got:?}"),
    }
    assert!(c.data.iter().all(|d| tmp_is_empty(d)));
}
