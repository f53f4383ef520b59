//! Blobs for the transfer benchmarks: a random (incompressible) blob in a blob store, and the
//! same blob pushed to a registry as a one-layer image, to time pulls of.

use std::io::Write;
use std::path::PathBuf;

use ossb_image::oci::{
    media_type, to_canonical_json, Descriptor, ImageConfig, Manifest, MediaTypes,
};
use ossb_image::registry::{parse_reference, PushOptions, Registry, RegistryOptions};
use ossb_image::store::BlobStore;
use ossb_protocol::Digest;

/// `len` random bytes (xorshift) committed to `store`; returns their digest.
pub fn random_blob(store: &BlobStore, len: usize) -> Digest {
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

/// A registry to push to: where it listens, the CA that signs its certificate (None: plain
/// HTTP), and its process, whose CPU time counts.
pub struct TestRegistry {
    pub addr: String,
    pub ca: Option<PathBuf>,
    pub pid: u32,
}

/// A one-layer image pushed to a registry, to time pulls of.
pub struct Pushed {
    pub registry: Registry,
    pub reference: ossb_image::Reference,
    pub pid: u32,
}

/// A client of `addr` (plain HTTP unless `ca` is given), and `reference` on it.
pub fn client_of(addr: &str, ca: Option<&PathBuf>) -> Registry {
    Registry::new(&RegistryOptions {
        insecure: if ca.is_none() {
            vec![addr.to_string()]
        } else {
            Vec::new()
        },
        certificates: ca
            .iter()
            .map(|ca| (addr.to_string(), (*ca).clone()))
            .collect(),
    })
    .unwrap()
}

/// Pushes `layer` as a one-layer image to `target`.
pub fn push_one_layer(
    rt: &tokio::runtime::Runtime,
    target: &TestRegistry,
    src: &BlobStore,
    layer: Digest,
) -> Pushed {
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
    let reg = &target.addr;
    let registry = client_of(reg, target.ca.as_ref());
    let reference =
        parse_reference(&format!("{reg}/bench/peer-cache-{}:v1", std::process::id())).unwrap();
    rt.block_on(registry.push_image(&reference, src, &top, &PushOptions::default()))
        .unwrap();
    Pushed {
        registry,
        reference,
        pid: target.pid,
    }
}
