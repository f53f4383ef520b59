//! Hostile layers: each test applies an evil tar onto `<tmp>/rootfs` and checks that nothing
//! beside the rootfs (`<tmp>/sentinel/...`, `<tmp>/victim`) was created, changed or removed,
//! and what became of the entry inside the rootfs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::tests::{apply, describe, is_root, RawTar, Summary};
use super::LayerError;

struct Sandbox {
    dir: tempfile::TempDir,
    before: BTreeMap<PathBuf, Summary>,
    before_inodes: Vec<(u64, u64)>,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        fs::create_dir_all(t.join("rootfs")).unwrap();
        fs::create_dir_all(t.join("sentinel/dir")).unwrap();
        fs::write(t.join("sentinel/secret"), b"untouched").unwrap();
        fs::write(t.join("sentinel/dir/file"), b"untouched").unwrap();
        fs::write(t.join("victim"), b"untouched").unwrap();
        let mut sb = Sandbox {
            dir,
            before: BTreeMap::new(),
            before_inodes: Vec::new(),
        };
        (sb.before, sb.before_inodes) = sb.outside();
        sb
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// Absolute host path of something beside the rootfs, as an evil layer would name it.
    fn host(&self, rel: &str) -> String {
        self.dir.path().join(rel).to_str().unwrap().to_string()
    }

    /// Everything beside the rootfs, and the (inode, link count) of each of its files.
    fn outside(&self) -> (BTreeMap<PathBuf, Summary>, Vec<(u64, u64)>) {
        let mut all = describe(self.dir.path());
        all.retain(|p, _| !p.starts_with("rootfs") || p == Path::new("rootfs"));
        // The rootfs directory's own mtime changes, of course.
        all.remove(Path::new("rootfs"));
        let inodes = all
            .keys()
            .map(|p| {
                let md = fs::symlink_metadata(self.dir.path().join(p)).unwrap();
                (md.ino(), md.nlink())
            })
            .collect();
        (all, inodes)
    }

    fn apply(&self, layer: &[u8]) -> Result<super::ApplyReport, LayerError> {
        let result = apply(layer, &self.root());
        self.assert_outside_untouched();
        result
    }

    fn assert_outside_untouched(&self) {
        let (now, inodes) = self.outside();
        assert_eq!(now, self.before, "something outside the rootfs changed");
        assert_eq!(
            inodes, self.before_inodes,
            "a file outside the rootfs gained a link"
        );
        let top: Vec<_> = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(top.len(), 3, "{top:?}");
    }
}

fn assert_escape(result: Result<super::ApplyReport, LayerError>, entry: &str) {
    match result {
        Err(LayerError::Escape { entry: e, .. }) => assert_eq!(e, entry),
        other => panic!("expected the layer to be refused for {entry:?}, got {other:?}"),
    }
}

#[test]
fn names_climbing_with_dotdot_refuse_the_layer() {
    for name in [
        "../escape",
        "a/../../escape",
        "/../escape",
        "./../escape",
        "a/b/../../../escape",
        "../",
    ] {
        let sb = Sandbox::new();
        let layer = RawTar::default()
            .file("fine", b"")
            .file(name, b"pwned")
            .finish();
        assert_escape(sb.apply(&layer), name);
    }
    // The same through a PAX path and a GNU long name.
    let sb = Sandbox::new();
    let name = format!("{}/../../../pax-escape", "a".repeat(120));
    let mut layer = RawTar::default();
    layer
        .pax(&[("path", name.as_bytes())])
        .file("placeholder", b"pwned");
    assert_escape(sb.apply(&layer.finish()), &name);
}

#[test]
fn dotdot_inside_the_rootfs_and_absolute_names_are_neutralized() {
    let sb = Sandbox::new();
    let layer = RawTar::default()
        .file("/abs/file", b"1")
        .file("//double", b"2")
        .file("a/../inside", b"3")
        .dir("/")
        .dir("./")
        .file("x/..", b"the root itself: ignored")
        .finish();
    sb.apply(&layer).unwrap();
    let r = sb.root();
    assert_eq!(fs::read(r.join("abs/file")).unwrap(), b"1");
    assert_eq!(fs::read(r.join("double")).unwrap(), b"2");
    assert_eq!(fs::read(r.join("inside")).unwrap(), b"3");
}

#[test]
fn absolute_symlinks_in_parents_resolve_inside_the_rootfs() {
    let sb = Sandbox::new();
    let sentinel = sb.host("sentinel");
    let layer = RawTar::default()
        .symlink("l", "/")
        .file("l/escape", b"x")
        .symlink("s", &sentinel)
        .file("s/pwned", b"x")
        .file("s/secret", b"overwritten?")
        .symlink("a", "/b")
        .symlink("b", &sentinel)
        .file("a/chained", b"x")
        .finish();
    sb.apply(&layer).unwrap();
    let r = sb.root();
    let inside = r.join(sentinel.trim_start_matches('/'));
    assert!(r.join("escape").is_file());
    assert!(inside.join("pwned").is_file());
    assert_eq!(fs::read(inside.join("secret")).unwrap(), b"overwritten?");
    assert!(inside.join("chained").is_file());
}

#[test]
fn relative_symlinks_in_parents_cannot_climb_out() {
    let sb = Sandbox::new();
    let layer = RawTar::default()
        .symlink("r", "../../../../../../../..")
        .file("r/escape", b"x")
        .dir("a/")
        .symlink("a/up", "../../sentinel")
        .file("a/up/pwned", b"x")
        .symlink("c1", "c2/..")
        .symlink("c2", "../..")
        .file("c1/x", b"x")
        .finish();
    sb.apply(&layer).unwrap();
    let r = sb.root();
    assert!(r.join("escape").is_file());
    assert!(r.join("sentinel/pwned").is_file());
    assert!(r.join("x").is_file());
}

#[test]
fn symlink_loops_are_an_error() {
    let sb = Sandbox::new();
    let layer = RawTar::default()
        .symlink("a", "b")
        .symlink("b", "a")
        .file("a/x", b"")
        .finish();
    let err = sb.apply(&layer).unwrap_err();
    assert!(
        matches!(err, LayerError::Io { ref entry, .. } if entry == "a/x"),
        "{err}"
    );
}

#[test]
fn symlinks_at_the_final_component_are_replaced_not_followed() {
    let sb = Sandbox::new();
    let r = sb.root();
    symlink(sb.host("victim"), r.join("f")).unwrap();
    symlink(sb.host("sentinel"), r.join("d")).unwrap();
    symlink("../victim", r.join("rel")).unwrap();
    symlink(sb.host("victim"), r.join("fifo")).unwrap();
    symlink(sb.host("victim"), r.join("sym")).unwrap();
    let mut layer = RawTar::default();
    layer
        .entry_with(b"f", EntryType::Regular, b"", b"pwned", 0o777)
        .entry_with(b"d/", EntryType::Directory, b"", b"", 0o777)
        .file("rel", b"pwned")
        .entry_with(b"fifo", EntryType::Fifo, b"", b"", 0o777)
        .symlink("sym", "elsewhere")
        .symlink("g", &sb.host("victim"))
        .entry_with(b"g", EntryType::Regular, b"", b"pwned", 0o777);
    layer
        .pax(&[("SCHILY.xattr.user.evil", b"1"), ("uid", b"0")])
        .symlink("xl", &sb.host("victim"));
    sb.apply(&layer.finish()).unwrap();
    for name in ["f", "rel", "g"] {
        assert_eq!(fs::read(r.join(name)).unwrap(), b"pwned", "{name}");
        assert!(fs::symlink_metadata(r.join(name)).unwrap().is_file());
    }
    assert!(fs::symlink_metadata(r.join("d")).unwrap().is_dir());
    assert_eq!(
        fs::read_link(r.join("sym")).unwrap(),
        Path::new("elsewhere")
    );
    assert!(fs::symlink_metadata(r.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

#[test]
fn hardlinks_cannot_reach_outside() {
    // Climbing targets refuse the layer.
    for target in ["../victim", "a/../../victim", "s/../../victim"] {
        let sb = Sandbox::new();
        let layer = RawTar::default().hardlink("h", target).finish();
        assert_escape(sb.apply(&layer), "h");
    }
    // Absolute host paths and symlinked parents resolve inside the rootfs, where nothing is.
    let sb = Sandbox::new();
    let layer = RawTar::default().hardlink("h", &sb.host("victim")).finish();
    assert!(matches!(sb.apply(&layer), Err(LayerError::Io { .. })));
    let sb = Sandbox::new();
    let layer = RawTar::default()
        .symlink("s", &sb.host("sentinel"))
        .hardlink("h", "s/secret")
        .finish();
    assert!(matches!(sb.apply(&layer), Err(LayerError::Io { .. })));
    // An absolute target that exists inside links the rootfs' file, not the host's.
    let sb = Sandbox::new();
    let layer = RawTar::default()
        .dir("etc/")
        .file("etc/passwd", b"image")
        .hardlink("h", "/etc/passwd")
        .finish();
    sb.apply(&layer).unwrap();
    let h = fs::metadata(sb.root().join("h")).unwrap();
    assert_eq!(
        h.ino(),
        fs::metadata(sb.root().join("etc/passwd")).unwrap().ino()
    );
    assert_eq!(h.nlink(), 2);
    // A hardlink to itself is an error, not a deletion.
    let sb = Sandbox::new();
    let layer = RawTar::default()
        .file("self", b"x")
        .hardlink("self", "self")
        .finish();
    assert!(matches!(
        sb.apply(&layer),
        Err(LayerError::InvalidEntry { .. })
    ));
    assert_eq!(fs::read(sb.root().join("self")).unwrap(), b"x");
}

#[test]
fn files_replace_hardlinks_instead_of_writing_through_them() {
    let sb = Sandbox::new();
    let r = sb.root();
    fs::create_dir(r.join("etc")).unwrap();
    fs::write(r.join("etc/shadow"), b"orig").unwrap();
    // A link to a file outside the rootfs (same filesystem), as a hostile lower layer or a
    // careless caller could leave: rewriting it must not reach the victim.
    fs::hard_link(sb.dir.path().join("victim"), r.join("outside-link")).unwrap();
    // The victim's link count drops back to 1 when the layer replaces the rootfs' link.
    let layer = RawTar::default()
        .hardlink("x", "etc/shadow")
        .file("x", b"pwned")
        .entry_with(b"outside-link", EntryType::Regular, b"", b"pwned", 0o777)
        .finish();
    sb.apply(&layer).unwrap();
    assert_eq!(fs::read(r.join("etc/shadow")).unwrap(), b"orig");
    assert_eq!(fs::read(r.join("x")).unwrap(), b"pwned");
    assert_eq!(
        fs::read(sb.dir.path().join("victim")).unwrap(),
        b"untouched"
    );
}

#[test]
fn whiteouts_cannot_reach_outside() {
    for name in [".wh..", ".wh...", ".wh.", "a/.wh..."] {
        let sb = Sandbox::new();
        let layer = RawTar::default().file(name, b"").finish();
        assert_escape(sb.apply(&layer), name);
    }
    let sb = Sandbox::new();
    let r = sb.root();
    fs::create_dir(r.join("d")).unwrap();
    symlink(sb.host("sentinel"), r.join("d/link-to-sentinel")).unwrap();
    symlink(sb.host("sentinel"), r.join("w")).unwrap();
    let layer = RawTar::default()
        .symlink("s", &sb.host(""))
        .file("s/.wh.victim", b"")
        .file("s/sentinel/.wh..wh..opq", b"")
        .symlink("up", "..")
        .file("up/.wh.victim", b"")
        .file("up/.wh.sentinel", b"")
        .file(".wh.w", b"")
        .file("d/.wh..wh..opq", b"")
        .finish();
    sb.apply(&layer).unwrap();
    assert!(
        fs::symlink_metadata(r.join("w")).is_err(),
        "the symlink itself is whited out"
    );
    assert!(fs::symlink_metadata(r.join("d/link-to-sentinel")).is_err());
    assert!(r.join("d").is_dir());
}

#[test]
fn opaque_marker_through_a_root_symlink_stays_inside() {
    let sb = Sandbox::new();
    let r = sb.root();
    fs::write(r.join("lower"), b"").unwrap();
    let layer = RawTar::default()
        .symlink("o", "/")
        .file("o/.wh..wh..opq", b"")
        .file("kept", b"")
        .finish();
    sb.apply(&layer).unwrap();
    let names: Vec<_> = fs::read_dir(&r)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "{names:?}: the layer's own o and kept survive"
    );
}

#[test]
fn directories_over_symlinks_do_not_chmod_their_targets() {
    let sb = Sandbox::new();
    let r = sb.root();
    symlink(sb.host("sentinel"), r.join("d")).unwrap();
    let mut layer = RawTar::default();
    layer.pax(&[("uid", b"4321"), ("gid", b"4321")]).entry_with(
        b"d/",
        EntryType::Directory,
        b"",
        b"",
        0o777,
    );
    layer.file("d/inside", b"x");
    sb.apply(&layer.finish()).unwrap();
    assert!(fs::symlink_metadata(r.join("d")).unwrap().is_dir());
    assert!(r.join("d/inside").is_file());
}

#[test]
fn nul_bytes_in_names_and_targets_are_refused() {
    let sb = Sandbox::new();
    let mut layer = RawTar::default();
    layer
        .pax(&[("path", b"a\0/../../x")])
        .file("placeholder", b"");
    assert!(matches!(
        sb.apply(&layer.finish()),
        Err(LayerError::Escape { .. })
    ));
    let sb = Sandbox::new();
    let mut layer = RawTar::default();
    layer
        .pax(&[("linkpath", b"/etc\0passwd")])
        .symlink("l", "placeholder");
    assert!(matches!(
        sb.apply(&layer.finish()),
        Err(LayerError::InvalidEntry { .. })
    ));
}

#[test]
fn device_nodes_are_created_inside_or_reported() {
    let sb = Sandbox::new();
    let mut layer = RawTar::default();
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..7].copy_from_slice(b"dev/nul");
    h.set_entry_type(EntryType::Char);
    h.set_mode(0o666);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    h.set_size(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    layer.0.extend_from_slice(h.as_bytes());
    layer.symlink("dev2", &sb.host("sentinel"));
    layer.entry(b"dev2/fifo", EntryType::Fifo, b"", b"");
    let report = sb.apply(&layer.finish()).unwrap();
    let md = fs::symlink_metadata(sb.root().join("dev/nul")).ok();
    if is_root() {
        assert_eq!(md.unwrap().rdev(), nix::sys::stat::makedev(1, 3));
    } else {
        assert!(
            md.is_none() && report.skipped.len() == 1,
            "{:?}",
            report.skipped
        );
    }
    let inside = sb.root().join(sb.host("sentinel").trim_start_matches('/'));
    assert!(fs::symlink_metadata(inside.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
}

/// A small deterministic PRNG (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        items[(self.0 % items.len() as u64) as usize]
    }
}

#[test]
fn random_hostile_layers_never_touch_the_outside() {
    let names = [
        "a",
        "a/b",
        "a/b/c",
        "l",
        "l/x",
        "l/l/y",
        "up",
        "up/z",
        "up/up/w",
        "/abs/f",
        "d/",
        "d/e",
        ".wh.a",
        ".wh.l",
        "a/.wh.b",
        "a/.wh..wh..opq",
        ".wh..wh..opq",
        "l/.wh..wh..opq",
        "up/.wh.victim",
        "x/../a/n",
        "../x",
        ".wh..",
        "s",
        "s/secret",
        "s/.wh.secret",
        "s/dir/file",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..500 {
        let sb = Sandbox::new();
        let sentinel = sb.host("sentinel");
        let victim = sb.host("victim");
        let targets = [
            "/",
            "..",
            "../..",
            "../../..",
            "a",
            "l",
            "up",
            "/a/b",
            sentinel.as_str(),
            victim.as_str(),
        ];
        let mut layer = RawTar::default();
        let count = 1 + rng.0 % 12;
        let mut log = Vec::new();
        for _ in 0..count {
            let name = rng.pick(&names);
            let kind = rng.pick(&["file", "dir", "symlink", "hardlink", "fifo"]);
            let target = rng.pick(&targets);
            log.push(format!("{kind} {name} {target}"));
            match kind {
                "file" => layer.file(name, b"pwned"),
                "dir" => layer.dir(name),
                "symlink" => layer.symlink(name, target),
                "hardlink" => layer.hardlink(name, target),
                _ => layer.entry(name.as_bytes(), EntryType::Fifo, b"", b""),
            };
        }
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sb.apply(&layer.finish())));
        assert!(
            result.is_ok(),
            "round {round} panicked or touched the outside: {log:#?}"
        );
    }
}

/// A tar header for a regular file `name` of `size` bytes (ustar, mode 0644, root).
fn file_header(name: &str, size: u64) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(EntryType::Regular);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A decompression bomb of zeros (256 MiB from about 300 KiB of gzip, as concatenated gzip
/// members): neutralized, the file is all holes and takes almost no disk.
#[test]
fn a_bomb_of_zeros_becomes_a_sparse_file() {
    let sb = Sandbox::new();
    const CHUNK: usize = 16 << 20;
    const CHUNKS: usize = 16;
    let zeros = gzip(&vec![0u8; CHUNK]);
    let mut layer = gzip(&file_header("bomb", (CHUNK * CHUNKS) as u64));
    for _ in 0..CHUNKS {
        layer.extend_from_slice(&zeros);
    }
    layer.extend_from_slice(&gzip(&[0u8; 1024])); // end of archive
    assert!(layer.len() < 1 << 20, "{} bytes", layer.len());
    sb.apply(&layer).unwrap();
    let meta = fs::metadata(sb.root().join("bomb")).unwrap();
    assert_eq!(meta.len(), (CHUNK * CHUNKS) as u64);
    assert!(
        meta.blocks() * 512 < 1 << 20,
        "{} bytes on disk",
        meta.blocks() * 512
    );
}

/// A stream of a tar with one file of `size` bytes of `b'A'`, made as it is read.
fn letters_tar(size: u64) -> impl std::io::Read {
    use std::io::Read;
    let pad = (512 - size % 512) % 512;
    std::io::Cursor::new(file_header("letters", size))
        .chain(std::io::repeat(b'A').take(size))
        .chain(std::io::repeat(0).take(pad + 1024))
}

/// A layer that expands to more than its filesystem holds (letters, not zeros) is refused
/// before the filesystem is full. Needs root (a small tmpfs is mounted for it).
#[test]
fn a_layer_larger_than_the_disk_is_refused_before_the_disk_is_full() {
    if !is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "this test mounts a tmpfs: run it as root"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount -t tmpfs failed");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let rootfs = mnt.join("rootfs");
    fs::create_dir(&rootfs).unwrap();
    let result = super::apply_layer(letters_tar(512 << 20), &rootfs, &Default::default());
    match result {
        Err(LayerError::NoSpace { entry, .. }) => assert_eq!(entry, "letters"),
        other => panic!("expected the layer to be refused for space, got {other:?}"),
    }
    let stat = nix::sys::statvfs::statvfs(&mnt).unwrap();
    let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
    assert!(free > 0, "the filesystem was filled");
}
