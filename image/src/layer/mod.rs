//! OCI layer tars: writing them from a rootfs change list, and applying them safely onto a rootfs.
//!
//! [`write_layer`] turns the [`Change`]s of a build step (from the worker's snapshot diff) into a
//! deterministic layer blob in one streaming pass, returning its digest, diff ID and size.
//! [`apply_layer`] unpacks a layer (gzip, zstd or plain tar) onto a rootfs, honouring OCI
//! whiteouts, and never creates, modifies or removes anything outside that rootfs, whatever the
//! layer contains.
//!
//! # How hostile entries are treated
//! Names are interpreted relative to the rootfs, which is `/` to the image:
//! - a leading `/` is stripped (neutralized: it is how every consumer reads such names);
//! - a name whose `..` components would climb above the rootfs (`../x`, `a/../../x`, `/../x`)
//!   refuses the whole layer with [`LayerError::Escape`]. Docker has always refused these, so no
//!   image in circulation has them; containerd instead clamps them at the root. `..` that stays
//!   inside (`a/../b`) is cleaned lexically, as both do;
//! - symlinks met in parent components (`/x` or `../../x` targets) are followed *inside* the
//!   rootfs, as `openat2(RESOLVE_IN_ROOT)` would (neutralized, as containerd's `fs.RootPath`);
//! - the final component is never followed: an existing symlink there is replaced, never written
//!   through, chmod-ed or chown-ed; regular files are always created afresh (`O_EXCL`), so a
//!   hardlink from an earlier entry or layer is never written through either;
//! - hardlink targets are names in the same namespace: `/etc/passwd` means `<rootfs>/etc/passwd`
//!   (neutralized, as containerd), `../../etc/shadow` refuses the layer (as entry names); the
//!   target's parents resolve inside the rootfs and its final component is linked itself (a
//!   hardlink to a symlink links the symlink, as containerd);
//! - a whiteout naming `.`, `..` or nothing (`.wh..`, `.wh...`, `.wh.`) refuses the layer (as
//!   containerd's "invalid whiteout name"); a whiteout or opaque marker whose directory does not
//!   exist is a no-op;
//! - a GNU long name/link or PAX header larger than 1 MiB refuses the layer before it is read
//!   (the tar reader would hold it in memory: a decompression bomb could claim gigabytes);
//!   file contents are streamed to disk, so memory stays bounded whatever the layer holds;
//! - runs of zeros in file contents become holes (sparse files), so a layer of compressed
//!   zeros takes no disk; a layer that would leave the rootfs's filesystem with less than
//!   5% (at most 1 GiB) free is refused with [`LayerError::NoSpace`] (a decompression bomb
//!   fills the build's disk, never the machine's last byte);
//! - extended attributes `trusted.overlay.*` / `user.overlay.*` are never applied (they would
//!   steer an overlay mount that uses this rootfs as a layer) and are reported as skipped.
//!
//! # Writing
//! Entries are sorted by path (component-wise, so parents come before children); every parent
//! directory of a change is included with its metadata (as containerd's diff writer does);
//! ownership and modes are kept; mtimes are clamped to `SOURCE_DATE_EPOCH`; user and group
//! names are empty; long names, long link targets, large ids and sizes, and extended attributes
//! go in PAX records; hardlinks within the layer become hardlink entries.

mod apply;
mod guard;
mod locate;
mod root;
mod write;

#[cfg(test)]
mod escape_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ossb_protocol::Digest;

pub use apply::apply_layer;
pub(crate) use apply::decompressed;
pub use locate::{locate, Found};
pub use write::{recompress, write_layer, write_layer_from, ContentSources};

/// Media type of a gzip-compressed layer.
pub const MEDIA_TYPE_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of a zstd-compressed layer.
pub const MEDIA_TYPE_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Media type of an uncompressed layer.
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// How a written layer is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Compression {
    /// gzip (level 6), the format every registry and runtime accepts.
    #[default]
    Gzip,
    /// zstd (level 3): faster and smaller, needs a recent consumer.
    Zstd,
    /// A plain tar.
    None,
}

/// What a layer compressed as `compression` with the given `compression-level` is written
/// with: the codec's own level (see [`Compression::levels`]).
pub(crate) fn codec_level(compression: Compression, level: Option<u32>) -> i32 {
    match (compression, level) {
        (Compression::Gzip, Some(l)) => l.min(9) as i32,
        // BuildKit compresses zstd with klauspost/compress, which has four speeds and maps the
        // zstd levels onto them (`EncoderLevelFromZstd`); each is about the reference
        // library's level here (its documentation: fastest ~1, default 3, better ~7-8, best
        // ~11), so a level gives the ratio and the CPU time it gives under BuildKit.
        (Compression::Zstd, Some(l)) => match l {
            0..=2 => 1,
            3..=5 => 3,
            6..=9 => 7,
            _ => 11,
        },
        (Compression::Gzip, None) => write::GZIP_LEVEL as i32,
        (Compression::Zstd, None) | (Compression::None, _) => write::ZSTD_LEVEL,
    }
}

impl Compression {
    /// The name buildx's `compression=` option gives it: `gzip`, `zstd` or `uncompressed`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "uncompressed",
        }
    }

    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => MEDIA_TYPE_GZIP,
            Compression::Zstd => MEDIA_TYPE_ZSTD,
            Compression::None => MEDIA_TYPE_TAR,
        }
    }
}

impl Compression {
    /// The `compression-level=` values this compression takes, as BuildKit documents them:
    /// gzip 0-9, zstd 0-22; none for a plain tar.
    pub fn levels(self) -> Option<std::ops::RangeInclusive<u32>> {
        match self {
            Compression::Gzip => Some(0..=9),
            Compression::Zstd => Some(0..=22),
            Compression::None => None,
        }
    }

    /// The compression of a layer of media type `media_type` (OCI or Docker), if it is a
    /// layer type ossb knows.
    pub fn of_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            MEDIA_TYPE_GZIP
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            MEDIA_TYPE_ZSTD
            | "application/vnd.docker.image.rootfs.diff.tar.zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            MEDIA_TYPE_TAR
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            _ => None,
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;

    /// `gzip`, `zstd` or `uncompressed`, as buildx's `compression=`.
    fn from_str(s: &str) -> Result<Compression, String> {
        [Compression::Gzip, Compression::Zstd, Compression::None]
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("compression={s} (expected gzip, zstd or uncompressed)"))
    }
}

/// What happened to a path between two snapshots of a rootfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChangeKind {
    /// The path did not exist before.
    Added,
    /// The path existed before and its metadata or content (or its type) changed.
    Modified,
    /// The path existed before and does not any more (written as a whiteout).
    Deleted,
}

/// One changed path of a rootfs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Change {
    /// Relative to the rootfs: no leading `/`, no `.` or `..` components, not empty.
    pub path: PathBuf,
    /// What happened to it.
    pub kind: ChangeKind,
}

/// How [`write_layer`] writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerOptions {
    /// The compression of the blob.
    pub compression: Compression,
    /// When set, every mtime later than this (seconds since the epoch) is written as this.
    pub source_date_epoch: Option<i64>,
    /// `compression-level=`: within [`Compression::levels`] (checked by the caller); the
    /// compression's default level (gzip 6, zstd 3) when `None`.
    pub level: Option<u32>,
}

/// What [`write_layer`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrittenLayer {
    /// The digest of the blob (the compressed bytes): its name in the blob store and manifest.
    pub digest: Digest,
    /// The digest of the uncompressed tar: the image config's `rootfs.diff_ids` entry.
    pub diff_id: Digest,
    /// The size of the blob in bytes.
    pub size: u64,
    /// The OCI media type of the blob.
    pub media_type: &'static str,
}

/// A callback told about each thing [`apply_layer`] skips, as it happens.
pub type WarningHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Which regular files [`ApplyOptions::only`] writes: by path relative to the rootfs,
/// permission bits and size.
pub type FileFilter = Arc<dyn Fn(&Path, u32, u64) -> bool + Send + Sync>;

/// How [`apply_layer`] applies.
#[derive(Clone)]
pub struct ApplyOptions {
    /// Whether to give entries the owners recorded in the layer (`lchown`). When the process
    /// may not (unprivileged, or an id without mapping in its user namespace), the entry keeps
    /// the applier's ids and the first such failure is reported once. Default: true.
    pub chown: bool,
    /// Whether to apply extended attributes recorded in the layer (best effort). Default: true.
    pub xattrs: bool,
    /// Whether `.wh.` entries are whiteouts (a layer) or ordinary files (a user's archive
    /// that ADD unpacks, as Docker's untar). Default: true.
    pub whiteouts: bool,
    /// Called with each line added to [`ApplyReport::skipped`].
    pub on_warning: Option<WarningHook>,
    /// Which regular files (and hardlinks) to write, by path relative to the rootfs,
    /// permission bits and size; the others are skipped (a reader that needs a few files of an
    /// image, as the SBOM scan), as are device nodes and fifos. Directories, symlinks and
    /// whiteouts always apply. Default: every entry.
    pub only: Option<FileFilter>,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            chown: true,
            xattrs: true,
            whiteouts: true,
            on_warning: None,
            only: None,
        }
    }
}

impl fmt::Debug for ApplyOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApplyOptions")
            .field("chown", &self.chown)
            .field("xattrs", &self.xattrs)
            .field("whiteouts", &self.whiteouts)
            .field("on_warning", &self.on_warning.as_ref().map(|_| "<hook>"))
            .field("only", &self.only.as_ref().map(|_| "<filter>"))
            .finish()
    }
}

/// What [`apply_layer`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// How many tar entries were read (whiteouts and skipped entries included).
    pub entries: u64,
    /// What was not applied and why, one line each (ownership without permission, unsupported
    /// extended attributes, unknown entry types).
    pub skipped: Vec<String>,
    /// Device nodes not made for want of privilege (a base image's `/dev` entries, every time
    /// a build runs rootless).
    pub devices_skipped: Vec<String>,
}

impl ApplyReport {
    /// What to tell the user: each skipped entry, and the device nodes in one line.
    pub fn warnings(self) -> Vec<String> {
        let mut lines = self.skipped;
        let devices = self.devices_skipped;
        if !devices.is_empty() {
            const SHOWN: usize = 8;
            let mut names = devices[..devices.len().min(SHOWN)].join(", ");
            if devices.len() > SHOWN {
                names.push_str(&format!(" and {} more", devices.len() - SHOWN));
            }
            lines.push(format!(
                "{} device node(s) skipped, creating devices needs privilege: {names}",
                devices.len()
            ));
        }
        lines
    }
}

/// Why a layer could not be written or applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// The rootfs directory could not be opened.
    #[error("cannot open rootfs {path:?}: {source}")]
    Rootfs {
        /// The rootfs path.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// An entry would reach outside the rootfs; the whole layer is refused (the rootfs may
    /// hold the entries applied before it and should be discarded).
    #[error("layer refused: entry {entry:?} {reason}")]
    Escape {
        /// The entry name as it appears in the tar.
        entry: String,
        /// What was wrong.
        reason: String,
    },
    /// An entry is malformed (bad header field, NUL byte in a name, missing link target).
    #[error("layer entry {entry:?} is invalid: {reason}")]
    InvalidEntry {
        /// The entry name as it appears in the tar.
        entry: String,
        /// What was wrong.
        reason: String,
    },
    /// A filesystem operation for an entry or a changed path failed.
    #[error("{op} {entry:?}: {source}")]
    Io {
        /// The entry (or changed path) being handled.
        entry: String,
        /// What was being done, e.g. "creating file".
        op: &'static str,
        /// What the system said.
        source: io::Error,
    },
    /// The layer stream is corrupt, truncated or not a tar (after decompression).
    #[error("cannot read the layer stream {}: {source} (corrupt or truncated blob?)", after_entry(.after))]
    Read {
        /// The last entry read successfully, if any.
        after: Option<String>,
        /// What the decompressor or tar reader said.
        source: io::Error,
    },
    /// A change given to [`write_layer`] cannot be written.
    #[error("cannot write change {path:?}: {reason}")]
    InvalidChange {
        /// The changed path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Applying the layer would leave the filesystem under the rootfs (nearly) full: refused
    /// before the disk is, so that a layer that decompresses to more than it holds (a
    /// decompression bomb) cannot starve the machine.
    #[error("layer refused at entry {entry:?}: the filesystem of the rootfs has only {free_mib} MiB left (ossb keeps {reserve_mib} MiB free); the layer expands to more than the disk holds: free space, or put --cache-dir on a larger disk")]
    NoSpace {
        /// The entry being written.
        entry: String,
        /// Free space left, in MiB.
        free_mib: u64,
        /// The space ossb leaves free, in MiB.
        reserve_mib: u64,
    },
    /// Writing the layer blob to its destination failed.
    #[error(
        "writing the layer blob failed {}: {source}{}",
        at_entry(entry),
        space_hint(source)
    )]
    Write {
        /// The entry being written (or "end of archive").
        entry: String,
        /// What the destination said.
        source: io::Error,
    },
}

/// Where a layer write failed: at an entry, or in what follows the last one (the
/// compressor's end, the final flush).
fn at_entry(entry: &str) -> String {
    match entry {
        "" => "while finishing it".to_string(),
        e => format!("at entry {e:?}"),
    }
}

/// What to do when the disk is full.
fn space_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::StorageFull => {
            " (the disk holding the cache is full: free space, run `ossb cache prune`, or put --cache-dir on a larger disk)"
        }
        _ => "",
    }
}

fn after_entry(after: &Option<String>) -> String {
    match after {
        Some(e) => format!("after entry {e:?}"),
        None => "before the first entry".to_string(),
    }
}
