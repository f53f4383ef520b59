//! The cluster's transport: QUIC endpoints with mutual TLS from the cluster CA, and the
//! framing of [`ossb_protocol::wire`] messages on QUIC streams.
//!
//! Every node of the cluster (cache nodes now; the coordinator and workers later) talks
//! through this crate:
//! - [`certs::init`] writes a cluster CA and the certificates of nodes and clients (the
//!   `--tls-dir` layout, described there); [`Identity::load`] reads them back.
//! - [`server`] binds an endpoint that accepts only peers whose certificate the cluster CA
//!   signed, and can dial other nodes with its own certificate; [`client`] binds an endpoint
//!   that only dials. [`connect`] resolves `host:port` and connects with a timeout.
//! - [`write_message`] / [`read_message`] move one [`Envelope`] frame on a stream; blob bytes
//!   travel raw on the same stream after it.
//! - [`http`] serves `/metrics` and `/healthz` as plain HTTP for Prometheus and Kubernetes.
//!
//! TLS uses the process's rustls `CryptoProvider` (the `ossb` binary installs aws-lc-rs at
//! start-up), or aws-lc-rs when none is installed: quinn is built with aws-lc-rs only, so a
//! process never has two providers.

pub mod certs;
mod endpoint;
pub mod http;
mod tls;

pub use endpoint::{client, connect, server, transport_config, ALPN};
pub use tls::{peer_role, Identity, Role};

use ossb_protocol::frame::{self, FrameError, HEADER_LEN};
use ossb_protocol::wire::{Envelope, Message};
use std::path::PathBuf;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A certificate or key file could not be read or used.
    #[error("TLS material {path}: {reason} (create it with `ossb certs init DIR` and pass that DIR as --tls-dir)")]
    Tls {
        /// The file involved.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The endpoint could not be created (the address is in use, for instance).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A peer could not be reached or refused the handshake.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The `host:port` dialled.
        addr: String,
        /// Why (a refused certificate, a timeout, an unresolvable name).
        reason: String,
    },
    /// The connection broke while a stream was in use.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading a stream failed.
    #[error("reading from the peer: {0}")]
    Read(#[from] quinn::ReadError),
    /// Writing a stream failed.
    #[error("writing to the peer: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream ended before a whole message arrived.
    #[error("the peer closed the stream before a whole message arrived")]
    Truncated,
    /// A message was not a valid frame.
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Writes one message (in this build's protocol version) as a frame.
pub async fn write_message(send: &mut quinn::SendStream, message: Message) -> Result<(), NetError> {
    let bytes = frame::encode(&Envelope::new(message))?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// Reads one frame and returns its message. Reads exactly the frame, so raw bytes that follow
/// it stay on the stream for the caller.
pub async fn read_message(recv: &mut quinn::RecvStream) -> Result<Message, NetError> {
    let mut header = [0u8; HEADER_LEN];
    read_exact(recv, &mut header).await?;
    let len = frame::body_len(header)?;
    // Grown as bytes arrive: a prefix announcing megabytes costs nothing until they come.
    // The buffer is on the heap: a 64 KiB array held across an await makes every future
    // that reads a message that much larger (and overflowed a test thread's stack).
    const CHUNK: usize = 64 * 1024;
    let mut body = Vec::with_capacity(len.min(CHUNK));
    while body.len() < len {
        let filled = body.len();
        body.resize(filled + (len - filled).min(CHUNK), 0);
        match recv.read(&mut body[filled..]).await? {
            Some(n) => body.truncate(filled + n),
            None => return Err(NetError::Truncated),
        }
    }
    Ok(frame::decode(&body)?.message)
}

async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), NetError> {
    recv.read_exact(buf).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => NetError::Truncated,
        quinn::ReadExactError::ReadError(e) => NetError::Read(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ossb_protocol::wire::CacheRequest;
    use std::time::Duration;

    fn cluster(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let d = dir.join(name);
        certs::init(&d, &[]).unwrap();
        d
    }

    #[tokio::test]
    async fn mutual_tls_admits_the_cluster_and_refuses_strangers() {
        let dir = tempfile::tempdir().unwrap();
        let ours = cluster(dir.path(), "ours");
        let theirs = cluster(dir.path(), "theirs");
        let node = Identity::load(&ours, Role::Node).unwrap();
        let endpoint = server("127.0.0.1:0".parse().unwrap(), &node).unwrap();
        let addr = format!("127.0.0.1:{}", endpoint.local_addr().unwrap().port());
        let accept = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accept.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let m = read_message(&mut recv).await.unwrap();
                        write_message(&mut send, m).await.unwrap();
                        send.finish().unwrap();
                    }
                });
            }
        });
        let t = Duration::from_secs(5);

        let member = client(&Identity::load(&ours, Role::Client).unwrap()).unwrap();
        let conn = connect(&member, &addr, t).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let stat = Message::CacheRequest(CacheRequest::Stat);
        write_message(&mut send, stat.clone()).await.unwrap();
        assert_eq!(read_message(&mut recv).await.unwrap(), stat);

        // A client whose certificate another CA signed, trusting our CA (so that only the
        // server can refuse): the server refuses the handshake (the client may only notice
        // when it first uses the connection).
        let mixed = dir.path().join("mixed");
        std::fs::create_dir(&mixed).unwrap();
        std::fs::copy(ours.join("ca.crt"), mixed.join("ca.crt")).unwrap();
        for f in ["client.crt", "client.key"] {
            std::fs::copy(theirs.join(f), mixed.join(f)).unwrap();
        }
        let stranger = client(&Identity::load(&mixed, Role::Client).unwrap()).unwrap();
        let refused = async {
            let conn = connect(&stranger, &addr, t).await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            write_message(&mut send, Message::CacheRequest(CacheRequest::Stat)).await?;
            read_message(&mut recv).await
        };
        assert!(refused.await.is_err(), "a stranger's client was served");

        // A server that the cluster CA did not sign is refused by our client.
        let fake = server(
            "127.0.0.1:0".parse().unwrap(),
            &Identity::load(&theirs, Role::Node).unwrap(),
        )
        .unwrap();
        let fake_addr = format!("127.0.0.1:{}", fake.local_addr().unwrap().port());
        tokio::spawn(async move {
            while let Some(incoming) = fake.accept().await {
                let _ = incoming.await;
            }
        });
        let err = connect(&member, &fake_addr, t).await.unwrap_err();
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    /// A server killed with SIGKILL (no CONNECTION_CLOSE sent) and started again on the same
    /// address with the same certificate answers its previous connections with a stateless
    /// reset their peers accept: the client learns it at its next packet, not after the 20 s
    /// idle timeout. The first server is this test binary run again as a child process.
    #[test]
    fn a_restarted_server_resets_its_old_connections_at_once() {
        if let Ok(tls) = std::env::var("OSSB_NET_TEST_KILLED_SERVER") {
            return killed_server(std::path::Path::new(&tls));
        }
        let dir = tempfile::tempdir().unwrap();
        let tls = cluster(dir.path(), "tls");
        let node = Identity::load(&tls, Role::Node).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_restarted_server_resets_its_old_connections_at_once",
            ])
            .args(["--nocapture", "--test-threads", "1"])
            .env("OSSB_NET_TEST_KILLED_SERVER", &tls)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        // The harness writes "test NAME ... " first, on the same line.
        while !line.contains("listening ") {
            line.clear();
            assert!(
                std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
                "the server child said nothing"
            );
        }
        let addr: std::net::SocketAddr = line
            .split("listening ")
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let main = tokio::runtime::Runtime::new().unwrap();
        let member = Identity::load(&tls, Role::Client).unwrap();
        let conn = main.block_on(async {
            let c = client(&member).unwrap();
            let conn = connect(&c, &addr.to_string(), Duration::from_secs(5))
                .await
                .unwrap();
            // The server has the connection once a stream got through.
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"hello").await.unwrap();
            let mut echoed = [0u8; 5];
            recv.read_exact(&mut echoed).await.unwrap();
            (c, conn)
        });
        child.kill().unwrap();
        child.wait().unwrap();
        main.block_on(async {
            let again = server(addr, &node).unwrap();
            let started = std::time::Instant::now();
            // A packet from the old connection reaches the new server.
            if let Ok(mut send) = conn.1.open_uni().await {
                let _ = send.write_all(b"anyone?").await;
            }
            let closed = tokio::time::timeout(Duration::from_secs(10), conn.1.closed())
                .await
                .expect("the old connection was not reset within 10 s");
            assert!(
                matches!(closed, quinn::ConnectionError::Reset),
                "{closed:?}"
            );
            assert!(started.elapsed() < Duration::from_secs(5));
            drop(again);
        });
    }

    /// The first server of the test above: echoes one stream, then waits to be killed.
    fn killed_server(tls: &std::path::Path) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let node = Identity::load(tls, Role::Node).unwrap();
            let endpoint = server("127.0.0.1:0".parse().unwrap(), &node).unwrap();
            println!("listening {}", endpoint.local_addr().unwrap());
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let mut hello = [0u8; 5];
            recv.read_exact(&mut hello).await.unwrap();
            send.write_all(&hello).await.unwrap();
            std::future::pending::<()>().await;
        });
    }
}
