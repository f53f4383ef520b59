//! Apply arbitrary bytes as a layer (gzip, zstd or plain tar, found by their magic) onto an
//! empty rootfs: no panic, and nothing appears outside the rootfs, neither a file next to it
//! nor a hard link to a file that is not inside it.
#![no_main]

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Once;

use libfuzzer_sys::fuzz_target;
use ossb_image::layer::{apply_layer, ApplyOptions};

/// A file may grow to 1 MiB: a few bytes of zstd can say "a gigabyte of zeros", which is not
/// what this target looks for. Writes past the limit fail with EFBIG (SIGXFSZ ignored).
fn limit_file_size() {
    // SAFETY: setrlimit and signal with plain integer arguments.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
    }
}

/// (device, inode) → (links the inode has, paths of it found under `dir`).
fn inodes(dir: &Path, found: &mut HashMap<(u64, u64), (u64, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        if meta.is_dir() {
            inodes(&e.path(), found);
        } else {
            found
                .entry((meta.dev(), meta.ino()))
                .or_insert((meta.nlink(), 0))
                .1 += 1;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    static LIMIT: Once = Once::new();
    LIMIT.call_once(limit_file_size);
    let parent = tempfile::tempdir().unwrap();
    let rootfs = parent.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    std::fs::write(parent.path().join("sentinel"), b"outside").unwrap();
    let _ = apply_layer(data, &rootfs, &ApplyOptions::default());

    let mut names: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["rootfs", "sentinel"],
        "an entry was written outside the rootfs"
    );
    assert_eq!(
        std::fs::read(parent.path().join("sentinel")).unwrap(),
        b"outside"
    );
    let meta = std::fs::symlink_metadata(&rootfs).unwrap();
    assert!(meta.is_dir(), "the rootfs itself was replaced: {meta:?}");
    let mut found = HashMap::new();
    inodes(&rootfs, &mut found);
    for (inode, (links, paths)) in found {
        assert_eq!(
            links, paths,
            "inode {inode:?} is linked from outside the rootfs"
        );
    }
    writable(&rootfs);
});

/// Gives every directory under `dir` rwx for its owner, so that the temporary dir can be
/// removed without root (a layer may leave read-only directories).
fn writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            writable(&e.path());
        }
    }
}
