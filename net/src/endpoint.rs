//! QUIC endpoints tuned for bulk transfer on a cluster network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, TransportConfig, VarInt};

use crate::{Identity, NetError};

/// The ALPN protocol name of ossb's cluster protocol; a peer speaking anything else fails the
/// handshake.
pub const ALPN: &[u8] = b"ossb/1";

/// Per-stream flow-control window: large enough that one stream is never held back waiting
/// for window updates at 10 Gbit/s and a millisecond of round trip.
const STREAM_WINDOW: u32 = 16 << 20;
/// Per-connection window (a few streams in flight at full speed).
const CONNECTION_WINDOW: u32 = 64 << 20;

/// The largest UDP payload path MTU discovery may reach. Fewer, larger packets cost less per
/// byte; discovery falls back to what the path carries (1200 bytes at least). Not jumbo
/// frames' 8952: quinn sends up to 10 packets in one GSO write, and the kernel refuses a GSO
/// write over 64 KiB (EMSGSIZE), so packets above 6550 bytes lose whole batches. Measured on
/// loopback: with 8952 every transfer lost packets, was taken for an MTU black hole and ran
/// at 1200 bytes a packet (111 MiB/s); with 6500, no loss and 5x the throughput.
const MAX_UDP_PAYLOAD: u16 = 6500;

/// How soon path MTU discovery starts again after a loss burst was taken for an MTU black hole
/// (quinn's default: a minute). A burst of losses at the start of a bulk transfer (a receive
/// buffer overflowing on a busy host) drops the path to 1200-byte packets; with a minute of
/// cooldown a 1 GiB transfer then runs entirely at 1200 bytes a packet, 5x the packets of
/// 6500, and the per-packet cost (syscalls, AEAD calls, acks) dominates. A real black hole
/// costs one lost probe per cooldown.
const BLACK_HOLE_COOLDOWN: Duration = Duration::from_secs(2);

/// The transport settings of every ossb endpoint: large flow-control windows (quinn's
/// defaults cap one stream far below a gigabyte per second), path MTU discovery up to jumbo
/// frames, keep-alives so that an idle connection between nodes survives, and an idle timeout
/// that notices a dead peer.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(1024))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(Some(Duration::from_secs(5)))
        .max_idle_timeout(Some(VarInt::from_u32(20_000).into()));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD)
        .black_hole_cooldown(BLACK_HOLE_COOLDOWN);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// An endpoint that accepts connections on `addr` from holders of a certificate signed by
/// the cluster CA, and that can dial other nodes presenting `identity` (so a node's outgoing
/// connections come from the same socket).
pub fn server(addr: SocketAddr, identity: &Identity) -> Result<Endpoint, NetError> {
    let crypto =
        QuicServerConfig::try_from(identity.server_config()?).map_err(|e| NetError::Tls {
            path: "node.crt".into(),
            reason: e.to_string(),
        })?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    let mut endpoint = bind(addr, Some(config), Some(identity))?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// An endpoint that only dials, presenting `identity`.
pub fn client(identity: &Identity) -> Result<Endpoint, NetError> {
    let mut endpoint = bind((std::net::Ipv6Addr::UNSPECIFIED, 0).into(), None, None)
        .or_else(|_| bind((std::net::Ipv4Addr::UNSPECIFIED, 0).into(), None, None))?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// The UDP socket buffers asked for. The kernel's default (about 200 KiB) overflows at a
/// gigabyte per second and the dropped datagrams throttle QUIC's congestion control; the
/// kernel caps the request at `net.core.rmem_max` / `wmem_max` without failing.
const UDP_BUFFER: usize = 8 << 20;

/// Binds the endpoint's socket (dual-stack for `[::]`) with large buffers. A server's
/// stateless-reset and connection-id keys are its identity's (see [`Identity::reset_key`]).
fn bind(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    identity: Option<&Identity>,
) -> Result<Endpoint, NetError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| NetError::Bind {
        addr: addr.to_string(),
        source,
    };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(err)?;
    }
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into()).map_err(err)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        err(std::io::Error::other(
            "no tokio runtime: endpoints must be created within one",
        ))
    })?;
    let mut config = match identity {
        Some(identity) => {
            let mut config = quinn::EndpointConfig::new(identity.reset_key());
            let cid_key = identity.cid_key();
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?;
    Endpoint::new(config, server, socket.into(), runtime).map_err(err)
}

fn client_config(identity: &Identity) -> Result<quinn::ClientConfig, NetError> {
    let crypto =
        QuicClientConfig::try_from(identity.client_config()?).map_err(|e| NetError::Tls {
            path: "client.crt".into(),
            reason: e.to_string(),
        })?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Connects to `addr` (`host:port`; the host is also the name the peer's certificate must
/// carry), trying each address the name resolves to, each within `timeout`.
pub async fn connect(
    endpoint: &Endpoint,
    addr: &str,
    timeout: Duration,
) -> Result<Connection, NetError> {
    let err = |reason: String| NetError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let (host, _) = addr
        .rsplit_once(':')
        .ok_or_else(|| err("not of the form host:port".into()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host(addr))
        .await
        .map_err(|_| err("name resolution timed out".into()))?
        .map_err(|e| err(format!("cannot resolve: {e}")))?;
    let mut last = err("the name resolves to no address".into());
    for sock in resolved {
        let connecting = match endpoint.connect(sock, host) {
            Ok(c) => c,
            Err(e) => {
                last = err(e.to_string());
                continue;
            }
        };
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => last = err(format!("{sock}: {e}")),
            Err(_) => last = err(format!("{sock}: no answer within {timeout:?}")),
        }
    }
    Err(last)
}
