//! `ossb certs init DIR`: a cluster CA and the certificates every connection presents.
//!
//! # The `--tls-dir` layout
//! | file | what | who needs it |
//! |---|---|---|
//! | `ca.crt` | the cluster CA (self-signed, 10 years) | everyone: peers are verified against it |
//! | `ca.key` | the CA's key | nobody at run time: keep it out of the cluster (it signs new certificates) |
//! | `node.crt`, `node.key` | the certificate of servers (cache nodes, coordinator), valid for serving and for dialling other nodes | cache nodes, the coordinator |
//! | `worker.crt`, `worker.key` | a client-only certificate that may register as a worker | workers |
//! | `client.crt`, `client.key` | a client-only certificate that may submit builds and read blobs | `ossb-submit`, tools |
//!
//! The certificates' common names carry the role (`ossb node`, `ossb worker`, `ossb client`):
//! only the CA signs them, so the coordinator hands tasks (and their secrets) only to peers
//! presenting a worker or node certificate, never to a submitter's (see [`crate::peer_role`]).
//!
//! `node.crt` names the DNS names and IP addresses given with `--san` (wildcards such as
//! `*.cache.ossb.svc.cluster.local` are fine) plus `localhost` and `127.0.0.1`; clients check the
//! host they dial against these names. One node certificate serves every node. In Kubernetes
//! each kind of pod mounts a Secret of `ca.crt` and its own pair as `--tls-dir`: nodes
//! `node.*`, workers `worker.*`, submitters `client.*`. Key files are written with mode 0600. Keys are ECDSA P-256.
//! Existing files are never overwritten: rotating means a new directory and a new Secret.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Why the certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file of the layout is already there.
    #[error("{0} already exists: certs init never overwrites certificates or keys (use a new directory)")]
    Exists(PathBuf),
    /// Writing failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `--san` is neither an IP address nor a valid DNS name, or signing failed.
    #[error("cannot make the certificates: {0}")]
    Generate(String),
}

/// The names every node certificate carries besides the `--san`s.
pub const DEFAULT_SANS: [&str; 2] = ["localhost", "127.0.0.1"];

const VALIDITY_DAYS: i64 = 3650;

/// The files [`init`] writes, in `dir`.
pub const FILES: [&str; 8] = [
    "ca.crt",
    "ca.key",
    "node.crt",
    "node.key",
    "worker.crt",
    "worker.key",
    "client.crt",
    "client.key",
];

/// The common name of each role's certificate.
pub(crate) const NODE_NAME: &str = "ossb node";
pub(crate) const WORKER_NAME: &str = "ossb worker";
pub(crate) const CLIENT_NAME: &str = "ossb client";

/// Writes a new cluster CA, a node certificate for `sans` (plus [`DEFAULT_SANS`]), a worker and
/// a client certificate into `dir` (created if needed). Returns the files written.
pub fn init(dir: &Path, sans: &[String]) -> Result<Vec<PathBuf>, CertError> {
    let paths: Vec<PathBuf> = FILES.iter().map(|f| dir.join(f)).collect();
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(CertError::Exists(existing.clone()));
    }
    let gen = |e: rcgen::Error| CertError::Generate(e.to_string());

    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca = params(Vec::new(), "ossb cluster CA")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;
    let issuer = Issuer::new(ca, &ca_key);

    let mut names: Vec<String> = DEFAULT_SANS.iter().map(|s| s.to_string()).collect();
    for san in sans {
        if !valid_san(san) {
            return Err(CertError::Generate(format!(
                "--san {san:?} is neither an IP address nor a DNS name (letters, digits, '-', dots; a leading '*.' is allowed)"
            )));
        }
        if !names.contains(san) {
            names.push(san.clone());
        }
    }
    let node_key = KeyPair::generate().map_err(gen)?;
    let mut node = params(names, NODE_NAME)?;
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node_cert = node.signed_by(&node_key, &issuer).map_err(gen)?;

    let client_only = |name: &str| -> Result<(rcgen::Certificate, KeyPair), CertError> {
        let key = KeyPair::generate().map_err(gen)?;
        let mut p = params(Vec::new(), name)?;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok((p.signed_by(&key, &issuer).map_err(gen)?, key))
    };
    let (worker_cert, worker_key) = client_only(WORKER_NAME)?;
    let (client_cert, client_key) = client_only(CLIENT_NAME)?;

    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let contents = [
        ca_cert.pem(),
        ca_key.serialize_pem(),
        node_cert.pem(),
        node_key.serialize_pem(),
        worker_cert.pem(),
        worker_key.serialize_pem(),
        client_cert.pem(),
        client_key.serialize_pem(),
    ];
    for (path, text) in paths.iter().zip(contents) {
        let secret = path.extension().is_some_and(|e| e == "key");
        write_new(path, text.as_bytes(), if secret { 0o600 } else { 0o644 })?;
    }
    Ok(paths)
}

fn valid_san(san: &str) -> bool {
    if san.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = san.strip_prefix("*.").unwrap_or(san);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn params(sans: Vec<String>, common_name: &str) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(sans).map_err(|e| CertError::Generate(e.to_string()))?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.distinguished_name
        .push(DnType::OrganizationName, "ossb cluster");
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(VALIDITY_DAYS);
    Ok(p)
}

/// Creates `path` with `mode` from the start (a key is never readable by others, not even
/// for a moment), refusing to replace an existing file.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_the_layout_with_private_keys_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        let files = init(&out, &["cache-0.cache".into(), "10.0.0.7".into()]).unwrap();
        assert_eq!(files.len(), FILES.len());
        for f in &files {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            let key = f.extension().unwrap() == "key";
            assert_eq!(mode, if key { 0o600 } else { 0o644 }, "{}", f.display());
        }
        for role in [crate::Role::Node, crate::Role::Worker, crate::Role::Client] {
            crate::Identity::load(&out, role).unwrap();
        }
        assert!(matches!(init(&out, &[]), Err(CertError::Exists(_))));
        assert!(matches!(
            init(&dir.path().join("bad"), &["not a name!".into()]),
            Err(CertError::Generate(_))
        ));
    }
}
