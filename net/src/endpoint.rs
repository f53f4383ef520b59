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
    mtu.upper_bound(9000);
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
    let mut endpoint = Endpoint::server(config, addr).map_err(|source| NetError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
}

/// An endpoint that only dials, presenting `identity`.
pub fn client(identity: &Identity) -> Result<Endpoint, NetError> {
    let addr: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
    let mut endpoint = Endpoint::client(addr)
        .or_else(|_| Endpoint::client((std::net::Ipv4Addr::UNSPECIFIED, 0).into()))
        .map_err(|source| NetError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    endpoint.set_default_client_config(client_config(identity)?);
    Ok(endpoint)
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
