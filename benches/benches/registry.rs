//! Push and pull of a 500 MiB image (5 layers of 100 MiB) to and from the test environment's
//! local registry: ossb's registry client against `skopeo copy`, in the same run. Every push
//! goes to a new repository so that nothing is skipped; every pull goes to an empty store or
//! directory. Median of 3; peak memory of each side (ossb runs in a child process of this
//! bench).
//!
//! Needs the test environment (`scripts/testenv.sh start`).
//! `cargo bench -p ossb-benches --bench registry`

use std::path::Path;
use std::process::Command;

use ossb_benches::{measure, median, report, Sample};
use ossb_image::oci::{
    media_type, to_canonical_json, Descriptor, ImageConfig, Manifest, MediaTypes,
};
use ossb_image::registry::{parse_reference, PushOptions, Registry, RegistryOptions};
use ossb_image::store::BlobStore;

const LAYERS: usize = 5;
const LAYER_SIZE: usize = 100 << 20;

fn registry_addr() -> String {
    if let Ok(r) = std::env::var("OSSB_TEST_REGISTRY") {
        return r;
    }
    let env = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.testenv/env");
    let text = std::fs::read_to_string(&env)
        .expect("the test environment is not running: scripts/testenv.sh start");
    text.lines()
        .find_map(|l| l.strip_prefix("export OSSB_TEST_REGISTRY="))
        .expect("OSSB_TEST_REGISTRY in .testenv/env")
        .trim_matches('"')
        .to_string()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The image (random layers: what is measured is transfer, not compression).
fn make_image(store: &BlobStore) -> Descriptor {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let d = |mt: &str, digest, size| Descriptor {
        media_type: mt.into(),
        digest,
        size,
        platform: None,
        annotations: None,
    };
    let mut layers = Vec::new();
    let mut config = ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        ..Default::default()
    };
    for i in 0..LAYERS {
        let bytes = random(LAYER_SIZE, seed + i as u64);
        let digest = store.put(&bytes).unwrap();
        config.rootfs.diff_ids.push(digest);
        layers.push(d(media_type::OCI_LAYER_GZIP, digest, bytes.len() as u64));
    }
    let config = to_canonical_json(&config);
    let config = d(
        media_type::OCI_CONFIG,
        store.put(&config).unwrap(),
        config.len() as u64,
    );
    let m = to_canonical_json(&Manifest::new(&config, &layers, MediaTypes::Oci).unwrap());
    d(
        media_type::OCI_MANIFEST,
        store.put(&m).unwrap(),
        m.len() as u64,
    )
}

fn client(registry: &str) -> Registry {
    Registry::new(&RegistryOptions {
        insecure: vec![registry.to_string()],
        certificates: Vec::new(),
    })
    .unwrap()
}

/// The child side: `push STORE MANIFEST_DIGEST REF` or `pull REF STORE`.
fn child(args: &[String]) {
    if args[0] == "make-image" {
        // Made in a child so the bench process stays small: a child's peak memory as wait4
        // reports it includes its parent's resident memory at fork time.
        let store = BlobStore::open(&args[1]).unwrap();
        let top = make_image(&store);
        ossb_image::export::write_oci_dir(
            &store,
            &[ossb_image::export::NamedImage {
                descriptor: top.clone(),
                names: vec!["localhost/bench:bench".into()],
            }],
            Path::new(&args[2]),
        )
        .unwrap();
        println!("{}", top.digest);
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    match args[0].as_str() {
        "push" => {
            let store = BlobStore::open(&args[1]).unwrap();
            let digest = args[2].parse().unwrap();
            let bytes = store.read(&digest).unwrap();
            let top = Descriptor {
                media_type: media_type::OCI_MANIFEST.into(),
                digest,
                size: bytes.len() as u64,
                platform: None,
                annotations: None,
            };
            let reference = parse_reference(&args[3]).unwrap();
            let registry = client(reference.registry());
            rt.block_on(registry.push_image(&reference, &store, &top, &PushOptions::default()))
                .unwrap();
        }
        "pull" => {
            let reference = parse_reference(&args[1]).unwrap();
            let store = BlobStore::open(&args[2]).unwrap();
            let registry = client(reference.registry());
            rt.block_on(registry.pull(&reference, &"linux/amd64".parse().unwrap(), &store))
                .unwrap();
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn median_of(n: usize, mut run: impl FnMut(usize) -> Sample) -> Sample {
    let mut samples: Vec<Sample> = (0..n).map(&mut run).collect();
    median(&mut samples)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        child(&args[pos + 1..]);
        return;
    }
    let reg = registry_addr();
    let me = std::env::current_exe().unwrap();
    let work =
        tempfile::tempdir_in(std::env::var("OSSB_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    // A fresh image per push (new random layers), so neither side can skip or mount a blob
    // an earlier round pushed (skopeo's blob-info cache would mount them).
    let image = |i: usize| {
        let store_dir = work.path().join(format!("store-{i}"));
        let layout = work.path().join(format!("layout-{i}"));
        let out = Command::new(&me)
            .args([
                "--child",
                "make-image",
                store_dir.to_str().unwrap(),
                layout.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let digest = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (store_dir, layout, digest)
    };
    let images: Vec<_> = (0..6).map(image).collect();
    let run_id = std::process::id();
    println!(
        "push/pull of a {} MiB image ({LAYERS} layers) to {reg} (median of 3)",
        (LAYERS * LAYER_SIZE) >> 20
    );

    let ossb_push = median_of(3, |i| {
        let (store_dir, _, digest) = &images[i];
        measure(Command::new(&me).args([
            "--child",
            "push",
            store_dir.to_str().unwrap(),
            digest,
            &format!("{reg}/bench/ossb-{run_id}-{i}:v1"),
        ]))
    });
    let skopeo_push = median_of(3, |i| {
        let layout = &images[3 + i].1;
        measure(Command::new("skopeo").args([
            "copy",
            "-q",
            "--dest-tls-verify=false",
            &format!("oci:{}:bench", layout.display()),
            &format!("docker://{reg}/bench/skopeo-{run_id}-{i}:v1"),
        ]))
    });
    report(
        "push 500 MiB (ossb vs skopeo copy)",
        ossb_push,
        "skopeo",
        skopeo_push,
    );

    let ossb_pull = median_of(3, |i| {
        let dest = work.path().join(format!("pull-ossb-{i}"));
        let s = measure(Command::new(&me).args([
            "--child",
            "pull",
            &format!("{reg}/bench/ossb-{run_id}-0:v1"),
            dest.to_str().unwrap(),
        ]));
        let _ = std::fs::remove_dir_all(&dest);
        s
    });
    let skopeo_pull = median_of(3, |i| {
        let dest = work.path().join(format!("pull-skopeo-{i}"));
        let s = measure(Command::new("skopeo").args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            &format!("docker://{reg}/bench/ossb-{run_id}-0:v1"),
            &format!("oci:{}:v1", dest.display()),
        ]));
        let _ = std::fs::remove_dir_all(&dest);
        s
    });
    report(
        "pull 500 MiB (ossb vs skopeo copy)",
        ossb_pull,
        "skopeo",
        skopeo_pull,
    );
    let mib = ((LAYERS * LAYER_SIZE) >> 20) as f64;
    println!(
        "    throughput: push ossb {:.0} MiB/s, skopeo {:.0} MiB/s; pull ossb {:.0} MiB/s, skopeo {:.0} MiB/s",
        mib / ossb_push.wall.as_secs_f64(),
        mib / skopeo_push.wall.as_secs_f64(),
        mib / ossb_pull.wall.as_secs_f64(),
        mib / skopeo_pull.wall.as_secs_f64()
    );
}
