//! Which layer of an image decides a file, read from the top.
//!
//! A step that reads a few files of a stage that is not unpacked here (`COPY --from=build
//! /app/bin /usr/bin/`, the stage built by another task of the cluster) needs only the layers
//! that hold those files. Looking at the layers from the top, the first one that touches a
//! path or its parents decides it: when that layer holds the path as a regular file (and its
//! parents, if it names them, as directories), the file in the image is that entry, whatever
//! the layers below hold. Anything else (a directory, which merges with the layers below; a
//! symlink or hardlink, which point elsewhere; a whiteout or opaque directory over the path)
//! is left to unpacking the whole image.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::apply::{clean_name, decompressed};
use super::guard::HeaderGuard;
use super::LayerError;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";

/// What one layer says of a path (relative to the rootfs, clean, not the rootfs itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The layer touches neither the path nor its parents: the layers below decide.
    Untouched,
    /// The layer holds the path as a regular file: that is the file in the image.
    File,
    /// The layer makes the path something only the whole image answers (a directory, a
    /// symlink, a hardlink, removed by a whiteout or an opaque parent, a parent that is not a
    /// directory, named twice).
    Other,
}

/// Reads the headers of one layer (gzip, zstd or plain tar) and says, for each of `paths`,
/// what the layer does to it. Contents are read through, never kept.
pub fn locate(reader: impl Read, paths: &[PathBuf]) -> Result<Vec<Found>, LayerError> {
    let stream = decompressed(reader).map_err(|source| LayerError::Read {
        after: None,
        source,
    })?;
    let mut archive = tar::Archive::new(HeaderGuard::new(stream));
    let mut state: Vec<PathState> = vec![PathState::default(); paths.len()];
    let mut last: Option<String> = None;
    let read_err = |after: &Option<String>, source| LayerError::Read {
        after: after.clone(),
        source,
    };
    for entry in archive.entries().map_err(|e| read_err(&last, e))? {
        let entry = entry.map_err(|e| read_err(&last, e))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let rel = clean_name(&raw).map_err(|reason| LayerError::Escape {
            entry: shown.clone(),
            reason: reason.into(),
        })?;
        last = Some(shown);
        // The rootfs itself ("./"): its metadata is nobody's file.
        let Some(base) = rel.file_name().map(|b| b.as_bytes().to_vec()) else {
            continue;
        };
        let parent = rel.parent().unwrap_or(Path::new(""));
        for (path, st) in paths.iter().zip(state.iter_mut()) {
            if base == WHITEOUT_OPAQUE {
                // Hides what the layers below hold in `parent`.
                st.hidden |= path.starts_with(parent);
            } else if let Some(name) = base.strip_prefix(WHITEOUT_PREFIX) {
                st.hidden |= path.starts_with(parent.join(OsStr::from_bytes(name)));
            } else if rel == *path {
                let file = matches!(
                    kind,
                    EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse
                );
                if file && !st.file {
                    st.file = true;
                } else {
                    st.other = true;
                }
            } else if path.starts_with(&rel) {
                // A parent named again: fine as a directory, anything else redirects the path.
                st.other |= kind != EntryType::Directory;
            } else if rel.starts_with(path) {
                // Something inside the path: it is a directory here.
                st.other = true;
            }
        }
    }
    Ok(state.iter().map(PathState::found).collect())
}

/// What the entries of one layer said of one path so far.
#[derive(Clone, Debug, Default)]
struct PathState {
    /// The path is a regular file in this layer.
    file: bool,
    /// A whiteout or an opaque marker covers the path (or a parent).
    hidden: bool,
    /// Anything that makes the answer the whole image's.
    other: bool,
}

impl PathState {
    fn found(&self) -> Found {
        match (self.other, self.file, self.hidden) {
            (true, _, _) => Found::Other,
            // A whiteout never removes what its own layer holds.
            (false, true, _) => Found::File,
            (false, false, true) => Found::Other,
            (false, false, false) => Found::Untouched,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::RawTar;
    use super::*;
    use std::io::Cursor;

    fn found(tar: &mut RawTar, path: &str) -> Found {
        locate(Cursor::new(tar.finish()), &[PathBuf::from(path)]).unwrap()[0]
    }

    #[test]
    fn a_regular_file_decides_its_path() {
        assert_eq!(
            found(RawTar::default().file("sum", b"x"), "sum"),
            Found::File
        );
        assert_eq!(
            found(RawTar::default().file("./sum", b"x"), "sum"),
            Found::File
        );
        // Its parents named as directories, and other paths, change nothing.
        let mut tar = RawTar::default();
        tar.dir("app").dir("app/bin").file("app/bin/tool", b"x");
        tar.file("other", b"y").symlink("elsewhere", "/app");
        assert_eq!(found(&mut tar, "app/bin/tool"), Found::File);
    }

    #[test]
    fn a_layer_without_the_path_leaves_it_to_the_layers_below() {
        let mut tar = RawTar::default();
        tar.dir("app").file("app/other", b"x").file("apps", b"y");
        assert_eq!(found(&mut tar, "app/tool"), Found::Untouched);
        assert_eq!(
            found(RawTar::default().file("sum2", b"x"), "sum"),
            Found::Untouched
        );
    }

    #[test]
    fn anything_but_a_plain_file_needs_the_whole_image() {
        // The path is a directory (merges with the layers below) or holds something.
        assert_eq!(found(RawTar::default().dir("sum"), "sum"), Found::Other);
        assert_eq!(
            found(RawTar::default().file("sum/x", b""), "sum"),
            Found::Other
        );
        // A symlink or a hardlink points elsewhere.
        assert_eq!(
            found(RawTar::default().symlink("sum", "x"), "sum"),
            Found::Other
        );
        assert_eq!(
            found(RawTar::default().hardlink("sum", "x"), "sum"),
            Found::Other
        );
        // A parent that is not a directory redirects the path.
        let mut tar = RawTar::default();
        tar.symlink("app", "/opt").file("app/tool", b"x");
        assert_eq!(found(&mut tar, "app/tool"), Found::Other);
        // Named twice: the tar is not what a diff writes.
        let mut tar = RawTar::default();
        tar.file("sum", b"1").file("sum", b"2");
        assert_eq!(found(&mut tar, "sum"), Found::Other);
    }

    #[test]
    fn whiteouts_and_opaque_parents_hide_the_layers_below_but_not_their_own_layer() {
        assert_eq!(
            found(RawTar::default().file(".wh.sum", b""), "sum"),
            Found::Other
        );
        assert_eq!(
            found(RawTar::default().file("app/.wh.bin", b""), "app/bin/t"),
            Found::Other
        );
        assert_eq!(
            found(RawTar::default().file("app/.wh..wh..opq", b""), "app/t"),
            Found::Other
        );
        assert_eq!(
            found(RawTar::default().file(".wh..wh..opq", b""), "a/b/t"),
            Found::Other
        );
        // A whiteout of a sibling or in another directory is not about the path.
        assert_eq!(
            found(RawTar::default().file(".wh.sum2", b""), "sum"),
            Found::Untouched
        );
        assert_eq!(
            found(RawTar::default().file("b/.wh..wh..opq", b""), "a/t"),
            Found::Untouched
        );
        // The layer's own file stands over its own whiteout and opaque marker.
        let mut tar = RawTar::default();
        tar.file("app/.wh..wh..opq", b"").file("app/t", b"x");
        assert_eq!(found(&mut tar, "app/t"), Found::File);
        let mut tar = RawTar::default();
        tar.file("app/t", b"x").file(".wh.app", b"");
        assert_eq!(found(&mut tar, "app/t"), Found::File);
    }

    #[test]
    fn several_paths_are_answered_in_one_read_and_compressed_layers_are_read() {
        let mut tar = RawTar::default();
        tar.file("a", b"1").dir("b").file("c/d", b"2");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar.finish()).unwrap();
        let paths: Vec<PathBuf> = ["a", "b", "c/d", "e"].iter().map(PathBuf::from).collect();
        let got = locate(Cursor::new(gz.finish().unwrap()), &paths).unwrap();
        assert_eq!(
            got,
            [Found::File, Found::Other, Found::File, Found::Untouched]
        );
    }

    #[test]
    fn an_entry_climbing_out_of_the_rootfs_is_an_error() {
        let err = locate(
            Cursor::new(RawTar::default().file("../x", b"").finish()),
            &[PathBuf::from("x")],
        )
        .unwrap_err();
        assert!(matches!(err, LayerError::Escape { .. }), "{err}");
        // Garbage is an error, not a panic.
        assert!(locate(
            Cursor::new(vec![0x1f, 0x8b, 1, 2, 3]),
            &[PathBuf::from("x")]
        )
        .is_err());
    }
}
