//! Layer write and apply of a mixed tree (20 000 small files and a few large ones, about
//! 300 MiB), against the pipelines a user would otherwise run:
//! - write gzip: ossb's layer writer vs `tar -c | pigz -p 2`;
//! - write zstd: ossb vs `tar -c | zstd -3 -T2`, and vs the same pipeline computing both
//!   sha256 digests a layer needs (diff ID and blob digest), which ossb computes in its pass;
//! - write gzip and zstd of one 256 MiB file of random bytes (what a COPY of compressed or
//!   encrypted data gives): ossb vs the same pipelines;
//! - apply: ossb's safe applier vs `umoci unpack` of the same layer (in an OCI layout).
//!
//! Each side runs as its own process (this bench re-executes itself for ossb's side) so that
//! `ossb_benches::measure` reports wall time and peak memory for both. Median of 3, the write
//! runs of the two sides alternating (the machine may be shared); the load average before and
//! after each pair of measurements is printed with it.
//!
//! `cargo bench -p ossb-benches --bench layer` (installs pigz with apt when missing).

use std::path::{Path, PathBuf};
use std::process::Command;

use ossb_benches::{measure, median, report, Sample};
use ossb_image::layer::{
    apply_layer, write_layer, ApplyOptions, Change, ChangeKind, Compression, LayerOptions,
};

const SMALL_FILES: usize = 20_000;

/// Text-like content that compresses about as real files do (3-4x with gzip).
fn content(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "layer", "image", "registry", "blob", "digest", "manifest", "index", "config", "the", "of",
        "and", "build", "ossb", "static", "const", "return", "function", "0x7f3a", "{", "}", "\n",
        "    ", "=", ";", "if", "else", "for", "while", "struct", "impl",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(11) {
            // Some incompressible bytes, as in binaries.
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}

/// The tree: 20 000 files of 1-16 KiB in 200 directories, and 4 files of 40 MiB.
fn make_tree(root: &Path) -> Vec<Change> {
    let mut changes = Vec::new();
    let mut add = |p: &str| {
        changes.push(Change {
            path: PathBuf::from(p),
            kind: ChangeKind::Added,
        })
    };
    for d in 0..200 {
        let dir = format!("usr/share/d{d:03}");
        std::fs::create_dir_all(root.join(&dir)).unwrap();
        add("usr");
        add("usr/share");
        add(&dir);
        for f in 0..SMALL_FILES / 200 {
            let i = d * 1000 + f;
            let name = format!("{dir}/file{f:03}.txt");
            std::fs::write(
                root.join(&name),
                content(i as u64, 1024 + (i * 131) % 15360),
            )
            .unwrap();
            add(&name);
        }
    }
    std::fs::create_dir_all(root.join("opt/big")).unwrap();
    add("opt");
    add("opt/big");
    for b in 0..4 {
        let name = format!("opt/big/blob{b}.bin");
        std::fs::write(root.join(&name), content(1_000_000 + b, 40 << 20)).unwrap();
        add(&name);
    }
    changes.sort();
    changes.dedup();
    changes
}

/// The incompressible tree: one file of 256 MiB of random bytes.
fn make_random_tree(root: &Path) {
    use std::io::Write;
    std::fs::create_dir_all(root).unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(root.join("random.bin")).unwrap());
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..256 {
        for word in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

/// The 1-minute load average now (the machine may be shared: it says how much).
fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The child side: `layer write-gzip|write-zstd TREE OUT` or `layer apply BLOB DEST`.
fn child(args: &[String]) {
    match args[0].as_str() {
        // In a child so the bench process stays small: a child's peak memory as wait4 reports
        // it includes its parent's resident memory at fork time.
        "make-tree" => {
            make_tree(Path::new(&args[1]));
        }
        "make-random-tree" => {
            make_random_tree(Path::new(&args[1]));
        }
        "make-layout" => {
            make_layout(Path::new(&args[1]), Path::new(&args[2]));
        }
        "write-gzip" | "write-zstd" => {
            let root = Path::new(&args[1]);
            let mut changes = Vec::new();
            collect(root, root, &mut changes);
            changes.sort();
            let compression = if args[0] == "write-gzip" {
                Compression::Gzip
            } else {
                Compression::Zstd
            };
            let out = std::io::BufWriter::new(std::fs::File::create(&args[2]).unwrap());
            write_layer(
                root,
                &changes,
                out,
                &LayerOptions {
                    compression,
                    source_date_epoch: Some(0),
                    level: None,
                },
            )
            .unwrap();
        }
        "apply" => {
            std::fs::create_dir_all(&args[2]).unwrap();
            let blob = std::io::BufReader::new(std::fs::File::open(&args[1]).unwrap());
            apply_layer(blob, Path::new(&args[2]), &ApplyOptions::default()).unwrap();
        }
        other => panic!("unknown child mode {other}"),
    }
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<Change>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.push(Change {
            path: p.strip_prefix(root).unwrap().to_path_buf(),
            kind: ChangeKind::Added,
        });
        if e.file_type().unwrap().is_dir() {
            collect(root, &p, out);
        }
    }
}

fn ensure_tool(program: &str, package: &str) {
    if Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return;
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", package])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{program} is missing and apt-get install {package} failed"
    );
}

fn median_of(n: usize, mut run: impl FnMut() -> Sample) -> Sample {
    let mut samples: Vec<Sample> = (0..n).map(|_| run()).collect();
    median(&mut samples)
}

/// The medians of `n` runs of each side, alternating (ossb, peer, ossb, ...), so that a change
/// of load on a shared machine weighs on both sides alike.
fn median_pair(
    n: usize,
    mut ours: impl FnMut() -> Sample,
    mut peer: impl FnMut() -> Sample,
) -> (Sample, Sample) {
    let before = load();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..n {
        a.push(ours());
        b.push(peer());
    }
    println!("    (load average {before} before, {} after)", load());
    (median(&mut a), median(&mut b))
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        child(&args[pos + 1..]);
        return;
    }
    ensure_tool("pigz", "pigz");
    ensure_tool("zstd", "zstd");
    let me = std::env::current_exe().unwrap();
    let work =
        tempfile::tempdir_in(std::env::var("OSSB_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .unwrap();
    let tree = work.path().join("tree");
    let made = Command::new(&me)
        .args(["--child", "make-tree", tree.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(made.success());
    let mut changes = Vec::new();
    collect(&tree, &tree, &mut changes);
    let total: u64 = changes
        .iter()
        .map(|c| {
            std::fs::symlink_metadata(tree.join(&c.path))
                .map(|m| if m.is_file() { m.len() } else { 0 })
                .unwrap_or(0)
        })
        .sum();
    let mib = total as f64 / (1 << 20) as f64;
    println!(
        "layer write/apply of {} entries, {:.0} MiB (median of 3, the two sides alternating); \
         ossb compresses on min(available parallelism = {}, 4) threads",
        changes.len(),
        mib,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let tree_s = tree.to_str().unwrap().to_string();
    let out = |name: &str| work.path().join(name).to_str().unwrap().to_string();

    let ours = |mode: &str, dest: String| {
        let (tree_s, me) = (tree_s.clone(), me.clone());
        let mode = mode.to_string();
        move || measure(Command::new(&me).args(["--child", &mode, &tree_s, &dest]))
    };
    let pipeline = |cmd: String| move || measure(Command::new("sh").args(["-c", &cmd]));

    let gz = out("ossb.tar.gz");
    let (ossb_gzip, pigz) = median_pair(
        3,
        ours("write-gzip", gz.clone()),
        pipeline(format!(
            "tar -C {tree_s} -cf - . | pigz -6 -p 2 > {}",
            out("peer.tar.gz")
        )),
    );
    report(
        "write gzip (ossb vs tar|pigz -p 2)",
        ossb_gzip,
        "pipeline",
        pigz,
    );
    println!(
        "    throughput ossb {:.0} MiB/s, pipeline {:.0} MiB/s; sizes ossb {} MiB, pipeline {} MiB",
        mib / ossb_gzip.wall.as_secs_f64(),
        mib / pigz.wall.as_secs_f64(),
        size_of(Path::new(&gz)) >> 20,
        size_of(Path::new(&out("peer.tar.gz"))) >> 20
    );

    let zst = out("ossb.tar.zst");
    let (ossb_zstd, zstd) = median_pair(
        3,
        ours("write-zstd", zst.clone()),
        pipeline(format!(
            "tar -C {tree_s} -cf - . | zstd -q -3 -T2 -f -o {}",
            out("peer.tar.zst")
        )),
    );
    report(
        "write zstd (ossb vs tar|zstd -3 -T2)",
        ossb_zstd,
        "pipeline",
        zstd,
    );
    println!(
        "    throughput ossb {:.0} MiB/s, pipeline {:.0} MiB/s; sizes ossb {} MiB, pipeline {} MiB",
        mib / ossb_zstd.wall.as_secs_f64(),
        mib / zstd.wall.as_secs_f64(),
        size_of(Path::new(&zst)) >> 20,
        size_of(Path::new(&out("peer.tar.zst"))) >> 20
    );

    // The same work a layer needs: the pipeline also computes the tar's and the blob's
    // sha256 (a layer's diff ID and digest), as ossb does in its one pass.
    let with_digests = format!(
        "tar -C {tree_s} -cf - . | tee >(sha256sum > /dev/null) | zstd -q -3 -T2 | tee {} | sha256sum > /dev/null",
        out("peer2.tar.zst")
    );
    let (ossb_zstd2, zstd2) = median_pair(3, ours("write-zstd", zst.clone()), move || {
        measure(Command::new("bash").args(["-c", &with_digests]))
    });
    report(
        "write zstd + both digests (vs tar|tee sha256sum|zstd -3 -T2|tee|sha256sum)",
        ossb_zstd2,
        "pipeline",
        zstd2,
    );

    // Incompressible: one 256 MiB file of random bytes.
    let random = work.path().join("random");
    let made = Command::new(&me)
        .args(["--child", "make-random-tree", random.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(made.success());
    let random_s = random.to_str().unwrap().to_string();
    let ours_random = |mode: &str, dest: String| {
        let (random_s, me) = (random_s.clone(), me.clone());
        let mode = mode.to_string();
        move || measure(Command::new(&me).args(["--child", &mode, &random_s, &dest]))
    };
    for (mode, name, peer_cmd, ours_out, peer_out) in [
        (
            "write-gzip",
            "write gzip, 256 MiB random (vs tar|pigz -p 2)",
            "pigz -6 -p 2 >",
            "ossb-random.tar.gz",
            "peer-random.tar.gz",
        ),
        (
            "write-zstd",
            "write zstd, 256 MiB random (vs tar|zstd -T2)",
            "zstd -q -3 -T2 -f -o",
            "ossb-random.tar.zst",
            "peer-random.tar.zst",
        ),
    ] {
        let (ossb, peer) = median_pair(
            3,
            ours_random(mode, out(ours_out)),
            pipeline(format!(
                "tar -C {random_s} -cf - . | {peer_cmd} {}",
                out(peer_out)
            )),
        );
        report(name, ossb, "pipeline", peer);
        println!(
            "    throughput ossb {:.0} MiB/s, pipeline {:.0} MiB/s; sizes ossb {} MiB, pipeline {} MiB",
            256.0 / ossb.wall.as_secs_f64(),
            256.0 / peer.wall.as_secs_f64(),
            size_of(Path::new(&out(ours_out))) >> 20,
            size_of(Path::new(&out(peer_out))) >> 20
        );
    }
    let with_digests = format!(
        "tar -C {random_s} -cf - . | tee >(sha256sum > /dev/null) | zstd -q -3 -T2 | tee {} | sha256sum > /dev/null",
        out("peer2-random.tar.zst")
    );
    let (ossb, peer) = median_pair(
        3,
        ours_random("write-zstd", out("ossb-random.tar.zst")),
        move || measure(Command::new("bash").args(["-c", &with_digests])),
    );
    report(
        "write zstd + both digests, 256 MiB random (vs tar|tee sha256sum|zstd -T2|tee|sha256sum)",
        ossb,
        "pipeline",
        peer,
    );
    let _ = std::fs::remove_dir_all(&random);

    // Apply: the gzip layer, into a fresh directory each time; umoci gets it in a layout.
    let layout = work.path().join("layout");
    let made = Command::new(&me)
        .args(["--child", "make-layout", layout.to_str().unwrap(), &gz])
        .status()
        .unwrap();
    assert!(made.success());
    let mut round = 0;
    let ossb_apply = median_of(3, || {
        round += 1;
        let dest = out(&format!("apply-ossb-{round}"));
        let s = measure(Command::new(&me).args(["--child", "apply", &gz, &dest]));
        let _ = std::fs::remove_dir_all(&dest);
        s
    });
    let umoci = median_of(3, || {
        round += 1;
        let dest = out(&format!("apply-umoci-{round}"));
        let s = measure(Command::new("umoci").args([
            "unpack",
            "--image",
            &format!("{}:bench", layout.display()),
            &dest,
        ]));
        let _ = std::fs::remove_dir_all(&dest);
        s
    });
    report(
        "apply gzip layer (ossb vs umoci unpack)",
        ossb_apply,
        "umoci",
        umoci,
    );
}

/// An OCI layout holding one image whose only layer is `blob`.
fn make_layout(layout: &Path, blob: &Path) {
    use ossb_image::export::{write_oci_dir, NamedImage};
    use ossb_image::oci::{
        media_type, to_canonical_json, Descriptor, ImageConfig, Manifest, MediaTypes,
    };
    use ossb_image::store::BlobStore;
    let store = BlobStore::open(layout.with_extension("store")).unwrap();
    let bytes = std::fs::read(blob).unwrap();
    let digest = store.put(&bytes).unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2_free_gunzip(blob), &mut plain).unwrap();
    let mut config = ImageConfig {
        architecture: "amd64".into(),
        os: "linux".into(),
        ..Default::default()
    };
    config.rootfs.diff_ids = vec![ossb_protocol::Digest::of(&plain)];
    drop(plain);
    let config = to_canonical_json(&config);
    let d = |mt: &str, digest, size| Descriptor {
        media_type: mt.into(),
        digest,
        size,
        platform: None,
        annotations: None,
    };
    let manifest = Manifest::new(
        &d(
            media_type::OCI_CONFIG,
            store.put(&config).unwrap(),
            config.len() as u64,
        ),
        &[d(media_type::OCI_LAYER_GZIP, digest, bytes.len() as u64)],
        MediaTypes::Oci,
    )
    .unwrap();
    let m = to_canonical_json(&manifest);
    let top = d(
        media_type::OCI_MANIFEST,
        store.put(&m).unwrap(),
        m.len() as u64,
    );
    write_oci_dir(
        &store,
        &[NamedImage {
            descriptor: top,
            names: vec!["localhost/bench:bench".into()],
        }],
        layout,
    )
    .unwrap();
}

/// The decompressed bytes of a gzip file, by `gzip -dc` (no compressor crate needed here).
fn flate2_free_gunzip(path: &Path) -> std::io::Cursor<Vec<u8>> {
    let out = Command::new("gzip").arg("-dc").arg(path).output().unwrap();
    assert!(out.status.success());
    std::io::Cursor::new(out.stdout)
}
