//! The compressed bytes do not depend on the number of compression threads (nor on how the tar
//! stream is cut into writes), and every usual reader decompresses them to the same tar.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use flate2::read::{GzDecoder, MultiGzDecoder};
use ossb_protocol::Digest;

use super::pieces::{Format, PieceWriter};
use super::*;
use crate::layer::tests::{apply, describe};

const BLOCK_SIZE: usize = Format::Gzip.piece_size();
const ZSTD_PIECE: usize = Format::Zstd.piece_size();

/// Text-like bytes with some incompressible runs, as real files are.
fn sample(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&[u8]] = &[
        b"layer", b"image", b"blob", b"digest", b"the", b"of", b"and", b"{", b"}", b"\n", b"    ",
        b"return", b"struct", b"impl", b"0x7f3a",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(9) {
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize]);
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}

fn gzip_with(data: &[u8], workers: usize, chunk: usize) -> Vec<u8> {
    let mut w = PieceWriter::new(Vec::new(), Format::Gzip, workers);
    for c in data.chunks(chunk.max(1)) {
        w.write_all(c).unwrap();
    }
    w.finish().unwrap()
}

fn zstd_with(data: &[u8], workers: usize) -> Vec<u8> {
    let mut enc = compressor(Vec::new(), Compression::Zstd, ZSTD_LEVEL, workers).unwrap();
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// `data` through an external decompressor, or None when the program is not installed.
fn external(program: &str, args: &[&str], data: &[u8]) -> Option<Vec<u8>> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Under CI a check that cannot run fails (scripts/testenv.sh installs the tools).
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{program} is not installed (scripts/testenv.sh installs it)"
            );
            eprintln!("{program} is not installed: its check is skipped");
            return None;
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    };
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "{program} {args:?} failed");
    Some(out.stdout)
}

const PY_GUNZIP: &str =
    "import gzip, sys; sys.stdout.buffer.write(gzip.decompress(sys.stdin.buffer.read()))";

/// Checks that `blob` is one gzip member that every reader decompresses to `plain`.
fn assert_gunzips_to(blob: &[u8], plain: &[u8]) {
    let mut single = GzDecoder::new(blob);
    let mut out = Vec::new();
    single.read_to_end(&mut out).unwrap();
    assert!(out == plain, "GzDecoder read different bytes");
    assert!(single.into_inner().is_empty(), "more than one gzip member");
    out.clear();
    MultiGzDecoder::new(blob).read_to_end(&mut out).unwrap();
    assert!(out == plain, "MultiGzDecoder read different bytes");
    if let Some(out) = external("gzip", &["-dc"], blob) {
        assert!(out == plain, "gzip -dc read different bytes");
    }
    if let Some(out) = external("python3", &["-c", PY_GUNZIP], blob) {
        assert!(out == plain, "python's gzip read different bytes");
    }
}

#[test]
fn gzip_bytes_do_not_depend_on_threads_or_write_sizes() {
    let data = sample(1, 2 * BLOCK_SIZE + 517);
    let all = [(2, usize::MAX), (4, usize::MAX), (2, 7777), (3, 65_539)];
    // Around the piece size one variant is enough (debug builds compress slowly).
    let one = [(4, 7777)];
    for (len, variants) in [
        (0, &all[..]),
        (1, &all[..]),
        (5000, &all[..]),
        (BLOCK_SIZE - 1, &one[..]),
        (BLOCK_SIZE, &one[..]),
        (BLOCK_SIZE + 1, &one[..]),
        (data.len(), &all[..]),
    ] {
        let data = &data[..len];
        let reference = gzip_with(data, 1, usize::MAX);
        for &(workers, chunk) in variants {
            assert!(
                gzip_with(data, workers, chunk) == reference,
                "{len} bytes: {workers} workers, writes of {chunk} differ from 1 worker"
            );
        }
        assert_eq!(&reference[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        let trailer = &reference[reference.len() - 8..];
        let mut crc = flate2::Crc::new();
        crc.update(data);
        assert_eq!(trailer[..4], crc.sum().to_le_bytes());
        assert_eq!(trailer[4..], (len as u32).to_le_bytes());
        assert_gunzips_to(&reference, data);
    }
}

#[test]
fn gzip_ratio_is_close_to_one_compressor() {
    let data = sample(2, 4 * BLOCK_SIZE);
    let ours = gzip_with(&data, 2, usize::MAX).len();
    let mut one = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(GZIP_LEVEL));
    one.write_all(&data).unwrap();
    let one = one.finish().unwrap().len();
    assert!(
        ours <= one + one / 200,
        "pieces cost more than 0.5%: {ours} bytes vs {one}"
    );
}

/// The exact bytes are pinned: a change here changes every layer digest (a flate2, zlib-rs or
/// zstd upgrade, a piece size, a level, the incompressibility rule). Update the values only on purpose.
#[test]
fn compressed_bytes_are_pinned() {
    let data = sample(3, 2 * BLOCK_SIZE + 12_345);
    let gz = gzip_with(&data, 2, 10_000);
    assert_eq!(
        Digest::of(&gz).to_string(),
        "sha256:d03c4051690b4e03b7f3cf0d3d748cfec321d3263795f72d3266f328671eb421"
    );
    let data = sample(4, ZSTD_PIECE + BLOCK_SIZE);
    let zst = zstd_with(&data, 2);
    assert_eq!(
        Digest::of(&zst).to_string(),
        "sha256:edd8f145ef6e8ec6e02ef057ae482a8a69c949ab0c6a41e1e9a4f7f89e4d1456"
    );
}

/// Checks that `blob` decompresses to `plain` with the zstd crate and the zstd binary.
fn assert_unzstds_to(blob: &[u8], plain: &[u8]) {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(blob)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert!(out == plain, "the zstd crate read different bytes");
    if let Some(out) = external("zstd", &["-dc"], blob) {
        assert!(out == plain, "zstd -dc read different bytes");
    }
}

#[test]
fn zstd_bytes_do_not_depend_on_threads() {
    // Several pieces, so that they run in parallel and join; and around the piece size.
    let data = sample(5, 2 * ZSTD_PIECE + 4321);
    for len in [0, 1, ZSTD_PIECE, 2 * ZSTD_PIECE, data.len()] {
        let data = &data[..len];
        let reference = zstd_with(data, 1);
        for workers in [2, 4] {
            assert!(
                zstd_with(data, workers) == reference,
                "{len} bytes: zstd with {workers} workers differs from 1 worker"
            );
        }
        assert_unzstds_to(&reference, data);
        // One frame per piece (an empty stream is one empty frame).
        let frames = len.div_ceil(ZSTD_PIECE).max(1);
        assert_eq!(count_zstd_frames(&reference), frames, "{len} bytes");
    }
}

/// Incompressible pieces are frames of raw blocks: every reader takes them, the threads do
/// not change them, and they cost a few bytes per 128 KiB; compressible pieces beside them
/// stay compressed frames.
#[test]
fn incompressible_zstd_pieces_are_raw_frames() {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut random = vec![0u8; 2 * ZSTD_PIECE + 77];
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let text = sample(6, ZSTD_PIECE);
    let data = [&random[..], &text[..]].concat();
    let reference = zstd_with(&data, 1);
    for workers in [2, 4] {
        assert!(zstd_with(&data, workers) == reference, "{workers} workers");
    }
    assert_unzstds_to(&reference, &data);
    assert_eq!(count_zstd_frames(&reference), 4);
    // Three raw frames of random bytes, at a few bytes per 128 KiB block, and a compressed one.
    let raw_overhead = 3 * 9 + 3 * (random.len() / (128 << 10) + 3);
    assert!(reference.len() < random.len() + raw_overhead + text.len() / 2);
    assert!(reference.len() > random.len());
    // Empty and small raw frames are valid too.
    for len in [1, 1000, 128 << 10, (128 << 10) + 1] {
        let mut frame = Vec::new();
        super::pieces::raw_frame_for_tests(&random[..len], &mut frame);
        assert_unzstds_to(&frame, &random[..len]);
    }
}

/// The number of zstd frames in `blob` (their compressed sizes, one after another).
fn count_zstd_frames(mut blob: &[u8]) -> usize {
    let mut n = 0;
    while !blob.is_empty() {
        let size = zstd::zstd_safe::find_frame_compressed_size(blob).unwrap();
        blob = &blob[size..];
        n += 1;
    }
    n
}

/// Bytes no compressor can shrink (xorshift output).
fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn incompressible_gzip_pieces_are_stored_and_read_everywhere() {
    // Random pieces between compressible ones, a random last piece, and random data shorter
    // than the trial's samples.
    let mut data = sample(7, BLOCK_SIZE);
    data.extend(random(8, 2 * BLOCK_SIZE));
    data.extend(sample(9, BLOCK_SIZE));
    data.extend(random(10, BLOCK_SIZE / 2 + 77));
    for data in [&data[..], &random(11, 5000)[..], &random(12, 70_000)[..]] {
        let reference = gzip_with(data, 1, usize::MAX);
        for (workers, chunk) in [(2, usize::MAX), (4, 65_537)] {
            assert!(
                gzip_with(data, workers, chunk) == reference,
                "{} bytes: {workers} workers differ from 1",
                data.len()
            );
        }
        assert_gunzips_to(&reference, data);
        if let Some(out) = external("pigz", &["-dc"], &reference) {
            assert!(out == data, "pigz -dc read different bytes");
        }
    }
    // Stored: the random pieces cost 5 bytes per 64 KiB, not a level-6 attempt's output.
    let random_only = random(13, 3 * BLOCK_SIZE + 1000);
    let gz = gzip_with(&random_only, 2, usize::MAX);
    let blocks: usize = random_only
        .chunks(BLOCK_SIZE)
        .map(|piece| piece.len().div_ceil(65_535))
        .sum();
    assert_eq!(gz.len(), 10 + random_only.len() + 5 * blocks + 8);
}

#[test]
fn gzip_piece_layout_is_pinned_for_random_data() {
    // The incompressibility rule is part of the format: a change of it changes digests.
    let mut data = random(14, BLOCK_SIZE + 3000);
    data.extend(sample(15, BLOCK_SIZE));
    assert_eq!(
        Digest::of(&gzip_with(&data, 2, 100_000)).to_string(),
        "sha256:5081ab2c0fe56fbdb69e9b47008a156db706640123c1e5cd9dac365056fecb6b"
    );
}

/// A tree of a few pieces' worth of files: a large one, small ones, a link, a directory.
fn tree(root: &Path) -> Vec<Change> {
    let mut paths = vec![PathBuf::from("usr"), PathBuf::from("usr/lib")];
    fs::create_dir_all(root.join("usr/lib")).unwrap();
    fs::write(root.join("usr/lib/big.so"), sample(6, 2 * BLOCK_SIZE + 999)).unwrap();
    paths.push("usr/lib/big.so".into());
    for i in 0..300 {
        let p = PathBuf::from(format!("usr/lib/f{i:03}.txt"));
        fs::write(
            root.join(&p),
            sample(100 + i, 100 + (i as usize * 577) % 9000),
        )
        .unwrap();
        paths.push(p);
    }
    std::os::unix::fs::symlink("big.so", root.join("usr/lib/link.so")).unwrap();
    paths.push("usr/lib/link.so".into());
    paths
        .into_iter()
        .map(|path| Change {
            path,
            kind: ChangeKind::Added,
        })
        .collect()
}

fn write_on(root: &Path, changes: &[Change], compression: Compression, workers: usize) -> Vec<u8> {
    let opts = LayerOptions {
        compression,
        source_date_epoch: Some(0),
        level: None,
    };
    let mut out = Vec::new();
    let written = write_layer_on(
        root,
        changes,
        &ContentSources::new(),
        &mut out,
        &opts,
        workers,
    )
    .unwrap();
    assert_eq!(written.digest, Digest::of(&out));
    assert_eq!(written.size, out.len() as u64);
    out
}

#[test]
fn layers_are_the_same_for_1_2_and_4_threads_and_read_everywhere() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let changes = tree(&src);
    let plain = write_on(&src, &changes, Compression::None, 1);
    let diff_id = Digest::of(&plain);
    for compression in [Compression::Gzip, Compression::Zstd] {
        let reference = write_on(&src, &changes, compression, 1);
        for workers in [2, 4] {
            assert!(
                write_on(&src, &changes, compression, workers) == reference,
                "{compression:?} layer with {workers} threads differs from 1 thread"
            );
        }
        let opts = LayerOptions {
            compression,
            source_date_epoch: Some(0),
            level: None,
        };
        let written = write_layer(&src, &changes, Vec::new(), &opts).unwrap();
        assert_eq!(written.digest, Digest::of(&reference));
        assert_eq!(written.diff_id, diff_id);
        match compression {
            Compression::Gzip => assert_gunzips_to(&reference, &plain),
            _ => {
                let mut out = Vec::new();
                zstd::stream::read::Decoder::new(&reference[..])
                    .unwrap()
                    .read_to_end(&mut out)
                    .unwrap();
                assert!(out == plain);
            }
        }
        let dst = t.path().join(format!("applied-{compression:?}"));
        fs::create_dir(&dst).unwrap();
        apply(&reference, &dst).unwrap();
        // Contents and types (mtimes were clamped to 0 in the layer).
        let kept = |root: &Path| {
            describe(root)
                .into_iter()
                .map(|(p, s)| (p, s.0, s.5))
                .collect::<Vec<_>>()
        };
        assert_eq!(kept(&dst), kept(&src));
    }
}

#[test]
fn an_empty_layer_is_two_zero_blocks_in_every_compression() {
    let t = tempfile::tempdir().unwrap();
    let plain = write_on(t.path(), &[], Compression::None, 2);
    assert!(plain == vec![0; 1024]);
    for workers in [1, 3] {
        assert_gunzips_to(&write_on(t.path(), &[], Compression::Gzip, workers), &plain);
        assert_unzstds_to(&write_on(t.path(), &[], Compression::Zstd, workers), &plain);
    }
}

#[test]
fn layers_of_exact_chunk_and_piece_multiples_round_trip() {
    // One regular file whose tar (512-byte header, content, 1024 end bytes) is exactly 1 MiB
    // (the chunk and gzip piece size) or 4 MiB (the zstd piece size) long, or one byte block
    // more.
    for (tar_len, extra) in [(1 << 20, 0), (4 << 20, 0), (1 << 20, 512)] {
        let t = tempfile::tempdir().unwrap();
        let content = sample(20, tar_len + extra - 512 - 1024);
        fs::write(t.path().join("f"), &content).unwrap();
        let changes = [Change {
            path: "f".into(),
            kind: ChangeKind::Added,
        }];
        let plain = write_on(t.path(), &changes, Compression::None, 1);
        assert_eq!(plain.len(), tar_len + extra);
        for workers in [1, 2] {
            assert_gunzips_to(
                &write_on(t.path(), &changes, Compression::Gzip, workers),
                &plain,
            );
            assert_unzstds_to(
                &write_on(t.path(), &changes, Compression::Zstd, workers),
                &plain,
            );
        }
    }
}

/// A destination that fails after `left` bytes.
struct Failing {
    left: usize,
}

impl Write for Failing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_destination_or_a_vanished_file_is_reported_not_hung() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let changes = tree(&src);
    let opts = |compression| LayerOptions {
        compression,
        source_date_epoch: Some(0),
        level: None,
    };
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        for left in [0, 5000, 1 << 20] {
            let err = write_layer_on(
                &src,
                &changes,
                &ContentSources::new(),
                Failing { left },
                &opts(compression),
                2,
            )
            .unwrap_err();
            match &err {
                LayerError::Write { source, .. } => {
                    assert_eq!(source.to_string(), "disk full", "{compression:?}: {err}")
                }
                other => panic!("{compression:?}: unexpected {other}"),
            }
        }
    }
    // A listed file missing from the rootfs: its own error, whatever the stage.
    let mut missing = changes.clone();
    missing.push(Change {
        path: "usr/lib/zz-missing".into(),
        kind: ChangeKind::Added,
    });
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let err = write_layer_on(
            &src,
            &missing,
            &ContentSources::new(),
            Vec::new(),
            &opts(compression),
            2,
        )
        .unwrap_err();
        assert!(
            matches!(&err, LayerError::InvalidChange { path, .. } if path.ends_with("zz-missing")),
            "{compression:?}: {err}"
        );
    }
}

/// `compression-level=`: each level gives its own bytes (and the gzip header's XFL says 9 and
/// 1 as RFC 1952 does), every reader decompresses them to the same tar, and the default level
/// is the one a layer written without a level has.
#[test]
fn compression_levels_change_the_bytes_not_the_tar() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let changes = tree(&src);
    let plain = write_on(&src, &changes, Compression::None, 1);
    let at = |compression, level| {
        let opts = LayerOptions {
            compression,
            source_date_epoch: Some(0),
            level,
        };
        let mut out = Vec::new();
        let written =
            write_layer_on(&src, &changes, &ContentSources::new(), &mut out, &opts, 2).unwrap();
        assert_eq!(written.diff_id, Digest::of(&plain));
        out
    };
    let gzip_default = at(Compression::Gzip, None);
    assert!(at(Compression::Gzip, Some(6)) == gzip_default);
    for level in [0, 1, 9] {
        let blob = at(Compression::Gzip, Some(level));
        assert!(
            blob != gzip_default,
            "gzip level {level} gave level 6's bytes"
        );
        assert_eq!(
            blob[8],
            [0, 4, 2][[0, 1, 9].iter().position(|l| *l == level).unwrap()]
        );
        assert_gunzips_to(&blob, &plain);
    }
    assert!(at(Compression::Gzip, Some(9)).len() <= gzip_default.len());
    let zstd_default = at(Compression::Zstd, None);
    // BuildKit's buckets: 3 to 5 are the default speed.
    assert!(at(Compression::Zstd, Some(5)) == zstd_default);
    for level in [0, 9, 19] {
        let blob = at(Compression::Zstd, Some(level));
        assert!(
            blob != zstd_default,
            "zstd level {level} gave level 3's bytes"
        );
        assert_unzstds_to(&blob, &plain);
    }
    assert!(at(Compression::Zstd, Some(19)) == at(Compression::Zstd, Some(22)));
}

/// `force-compression=`: a gzip layer recompressed as zstd (and back, and to a plain tar)
/// keeps its tar byte for byte, so its diff ID; the result is what writing the layer in that
/// compression gives. So does a plain tar compressed (a layer whose compression a build
/// deferred, compressed when a later build exports it).
#[test]
fn recompressing_keeps_the_tar() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let changes = tree(&src);
    let plain = write_on(&src, &changes, Compression::None, 1);
    let gzip = write_on(&src, &changes, Compression::Gzip, 2);
    for (source, to, level) in [
        (&gzip, Compression::Zstd, None),
        (&gzip, Compression::Zstd, Some(19)),
        (&gzip, Compression::None, None),
        (&gzip, Compression::Gzip, Some(1)),
        (&plain, Compression::Gzip, None),
        (&plain, Compression::Gzip, Some(9)),
        (&plain, Compression::Zstd, None),
    ] {
        // The epoch is the one `gzip` was written with (recompress itself reads none).
        let opts = LayerOptions {
            compression: to,
            source_date_epoch: Some(0),
            level,
        };
        let mut out = Vec::new();
        let written = recompress(&source[..], &mut out, &opts).unwrap();
        assert_eq!(written.diff_id, Digest::of(&plain), "{to:?}");
        assert_eq!(written.digest, Digest::of(&out));
        assert_eq!(written.media_type, to.media_type());
        let mut direct = Vec::new();
        write_layer_on(
            &src,
            &changes,
            &ContentSources::new(),
            &mut direct,
            &opts,
            2,
        )
        .unwrap();
        assert!(
            out == direct,
            "{to:?} {level:?}: not what writing it so gives"
        );
    }
    // A truncated blob is an error, not a shorter layer.
    let cut = &gzip[..gzip.len() / 2];
    let opts = LayerOptions {
        compression: Compression::Zstd,
        ..Default::default()
    };
    assert!(recompress(cut, Vec::new(), &opts).is_err());
}

/// A placeholder of `real`'s size, mode and mtime at `placeholder` (as a COPY by reference
/// makes it), holding no data.
fn placeholder_of(real: &Path, placeholder: &Path) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(real).unwrap();
    let f = fs::File::create(placeholder).unwrap();
    f.set_len(meta.len()).unwrap();
    f.set_permissions(meta.permissions()).unwrap();
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(meta.mtime() as u64);
    f.set_modified(mtime).unwrap();
}

/// A layer whose files' bytes come from their sources (placeholders in the rootfs) is byte
/// for byte the layer of the rootfs with the bytes copied in, in every compression.
#[test]
fn contents_from_sources_give_the_layer_of_the_copied_files() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let changes = tree(&src);
    let rootfs = t.path().join("placeholders");
    let mut sources = ContentSources::new();
    for change in &changes {
        let (real, copy) = (src.join(&change.path), rootfs.join(&change.path));
        let meta = fs::symlink_metadata(&real).unwrap();
        if meta.is_dir() {
            fs::create_dir_all(&copy).unwrap();
        } else if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&real).unwrap(), &copy).unwrap();
        } else {
            placeholder_of(&real, &copy);
            sources.insert(change.path.clone(), real);
        }
    }
    for change in changes.iter().rev() {
        let meta = fs::symlink_metadata(src.join(&change.path)).unwrap();
        if meta.is_dir() {
            fs::set_permissions(rootfs.join(&change.path), meta.permissions()).unwrap();
            let at = filetime_secs(&meta);
            fs::File::open(rootfs.join(&change.path))
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
    }
    assert!(sources.len() > 100);
    for compression in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let opts = LayerOptions {
            compression,
            source_date_epoch: Some(0),
            level: None,
        };
        let copied = write_on(&src, &changes, compression, 2);
        let mut referenced = Vec::new();
        let written =
            write_layer_on(&rootfs, &changes, &sources, &mut referenced, &opts, 2).unwrap();
        assert_eq!(written.digest, Digest::of(&referenced));
        assert!(
            referenced == copied,
            "{compression:?}: the layer from the sources differs"
        );
        // Without the sources, the placeholders' zeros are what the layer holds.
        let mut zeros = Vec::new();
        write_layer_on(
            &rootfs,
            &changes,
            &ContentSources::new(),
            &mut zeros,
            &opts,
            2,
        )
        .unwrap();
        assert!(zeros != copied);
    }
}

fn filetime_secs(meta: &fs::Metadata) -> std::time::SystemTime {
    use std::os::unix::fs::MetadataExt;
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(meta.mtime() as u64)
}

/// A source that is no longer the size copied (changed since), or is now a symlink, is an
/// error naming the entry, never a layer with other bytes.
#[test]
fn a_source_changed_since_the_copy_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let (src, rootfs) = (t.path().join("src"), t.path().join("rootfs"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&rootfs).unwrap();
    fs::write(src.join("f"), b"hello").unwrap();
    placeholder_of(&src.join("f"), &rootfs.join("f"));
    let changes = vec![Change {
        path: "f".into(),
        kind: ChangeKind::Added,
    }];
    let sources = ContentSources::from([(PathBuf::from("f"), src.join("f"))]);
    let opts = LayerOptions::default();
    write_layer_on(&rootfs, &changes, &sources, Vec::new(), &opts, 1).unwrap();
    fs::write(src.join("f"), b"hello, longer").unwrap();
    let err = write_layer_on(&rootfs, &changes, &sources, Vec::new(), &opts, 1).unwrap_err();
    assert!(
        err.to_string().contains("changed while the step ran"),
        "{err}"
    );
    fs::remove_file(src.join("f")).unwrap();
    fs::write(src.join("g"), b"hello").unwrap();
    std::os::unix::fs::symlink("g", src.join("f")).unwrap();
    let err = write_layer_on(&rootfs, &changes, &sources, Vec::new(), &opts, 1).unwrap_err();
    assert!(err.to_string().contains('f'), "{err}");
}
