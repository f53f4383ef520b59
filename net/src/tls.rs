//! The certificates a process presents and trusts, read from a `--tls-dir`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::endpoint::ALPN;
use crate::NetError;

/// Which certificate of a `--tls-dir` a process presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A server of the cluster (cache node, coordinator): `node.crt` / `node.key`, valid for
    /// serving and for dialling other nodes.
    Node,
    /// A worker: only dials; the coordinator gives tasks only to this role (and nodes):
    /// `worker.crt` / `worker.key`.
    Worker,
    /// A process that only dials and may not take tasks (`ossb-submit`, tools):
    /// `client.crt` / `client.key`.
    Client,
}

impl Role {
    fn file_stem(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Worker => "worker",
            Role::Client => "client",
        }
    }

    fn common_name(self) -> &'static str {
        match self {
            Role::Node => crate::certs::NODE_NAME,
            Role::Worker => crate::certs::WORKER_NAME,
            Role::Client => crate::certs::CLIENT_NAME,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.file_stem())
    }
}

/// The role of the peer of an established connection, from the common name of the certificate
/// it presented (which the cluster CA signed: the handshake checked that). `None` for a
/// certificate of no known role.
pub fn peer_role(conn: &quinn::Connection) -> Option<Role> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast_ref::<Vec<CertificateDer<'static>>>()?;
    role_of(chain.first()?)
}

fn role_of(cert: &CertificateDer<'_>) -> Option<Role> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    [Role::Node, Role::Worker, Role::Client]
        .into_iter()
        .find(|r| r.common_name() == cn)
}

/// A certificate chain and key to present, and the cluster CA that peers must be signed by.
#[derive(Debug)]
pub struct Identity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Identity {
    /// A secret of this node's own for `purpose`, derived from its private key: the same
    /// after a restart with the same certificate (a pod restarted from its Secret).
    fn derived(&self, purpose: &[u8]) -> aws_lc_rs::hmac::Tag {
        use aws_lc_rs::hmac;
        hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, purpose),
            self.key.secret_der(),
        )
    }

    /// The key a server signs its stateless-reset tokens with. With [`Identity::cid_key`],
    /// a restarted node recognizes its previous run's connection ids and answers their
    /// packets with a reset their peers accept: they reconnect at once, not after the idle
    /// timeout.
    pub fn reset_key(&self) -> std::sync::Arc<dyn quinn::crypto::HmacKey> {
        let secret = self.derived(b"ossb quic stateless reset v1");
        std::sync::Arc::new(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            secret.as_ref(),
        ))
    }

    /// The key of a server's connection-id generator (which drops packets for ids it did
    /// not make, so a random key per run would ignore the previous run's peers).
    pub fn cid_key(&self) -> u64 {
        let secret = self.derived(b"ossb quic connection ids v1");
        u64::from_le_bytes(secret.as_ref()[..8].try_into().expect("a SHA-256 tag"))
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Reads `ca.crt` and the role's certificate and key from `dir` (the layout
    /// [`crate::certs::init`] writes).
    pub fn load(dir: &Path, role: Role) -> Result<Identity, NetError> {
        let stem = role.file_stem();
        let ca = read_certs(&dir.join("ca.crt"))?;
        let chain = read_certs(&dir.join(format!("{stem}.crt")))?;
        if chain.first().and_then(role_of) != Some(role) {
            return Err(NetError::Tls {
                path: dir.join(format!("{stem}.crt")),
                reason: format!("not a {role} certificate of `ossb certs init`"),
            });
        }
        let key_path = dir.join(format!("{stem}.key"));
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| NetError::Tls {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Identity { ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, NetError> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots.add(cert.clone()).map_err(|e| self.err(e))?;
        }
        Ok(Arc::new(roots))
    }

    fn err(&self, e: impl std::fmt::Display) -> NetError {
        NetError::Tls {
            path: PathBuf::from("ca.crt"),
            reason: e.to_string(),
        }
    }

    /// The TLS configuration of a server: presents this identity and requires a client
    /// certificate signed by the cluster CA.
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig, NetError> {
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
            .build()
            .map_err(|e| self.err(e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.err(e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.err(e))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The TLS configuration of a client: trusts only servers signed by the cluster CA and
    /// presents this identity.
    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig, NetError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.err(e))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| self.err(e))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let err = |reason: String| NetError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The process's provider, so that quinn and every other TLS user share it; aws-lc-rs when
/// the process installed none (a library user, a test).
fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}
