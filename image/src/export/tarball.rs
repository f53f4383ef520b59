//! The tar exporter (`--output type=tar,dest=FILE`, as buildx's): the filesystem the local
//! exporter writes, as one tar archive (one top directory per platform for several). The tree
//! is assembled in a temporary directory beside `dest` and the archive renamed into place, so
//! `dest` is either what it was or complete.
//!
//! Entries are in name order, each directory before what it holds; owners and modes are those
//! the tree got (without privilege the local exporter cannot give files their owners, and
//! says so in its warnings).

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::{io_err, parent_of, write_local, ExportError};
use crate::layer::ApplyOptions;
use crate::oci::Descriptor;
use crate::store::BlobStore;

/// Writes the filesystem of `top` (a manifest, or an index: every platform) as a tar archive
/// at `dest`. Returns the local exporter's warnings.
pub fn write_tar(
    store: &BlobStore,
    top: &Descriptor,
    dest: &Path,
    options: &ApplyOptions,
) -> Result<Vec<String>, ExportError> {
    let parent = parent_of(dest);
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".ossb-tar-")
        .tempdir_in(&parent)
        .map_err(io_err(&parent))?;
    let tree = staging.path().join("rootfs");
    let skipped = write_local(store, top, &tree, options)?;
    let archive = tempfile::Builder::new()
        .prefix(".ossb-tar-")
        .tempfile_in(&parent)
        .map_err(io_err(&parent))?;
    let mut builder = tar::Builder::new(BufWriter::new(archive.as_file()));
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    append_tree(&mut builder, &tree, Path::new(""))?;
    builder
        .into_inner()
        .and_then(|mut w| w.flush())
        .map_err(io_err(dest))?;
    archive.persist(dest).map_err(|e| io_err(dest)(e.error))?;
    Ok(skipped)
}

/// Appends what `dir` holds, named under `name`, in name order.
fn append_tree<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    name: &Path,
) -> Result<(), ExportError> {
    let mut entries = fs::read_dir(dir)
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .map_err(io_err(dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let entry_name = name.join(entry.file_name());
        builder
            .append_path_with_name(&path, &entry_name)
            .map_err(io_err(&path))?;
        let is_dir = entry.file_type().map_err(io_err(&path))?.is_dir();
        if is_dir {
            append_tree(builder, &path, &entry_name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree in name order, directories before their content, symlinks kept as links.
    #[test]
    fn archives_a_tree_in_order_keeping_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        fs::create_dir_all(root.join("b/c")).unwrap();
        fs::write(root.join("b/c/f"), "x").unwrap();
        fs::write(root.join("a"), "y").unwrap();
        std::os::unix::fs::symlink("/nowhere", root.join("link")).unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        builder.follow_symlinks(false);
        append_tree(&mut builder, &root, Path::new("")).unwrap();
        let bytes = builder.into_inner().unwrap();
        let mut archive = tar::Archive::new(bytes.as_slice());
        let names: Vec<(String, tar::EntryType)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                ("a".to_string(), tar::EntryType::Regular),
                ("b".to_string(), tar::EntryType::Directory),
                ("b/c".to_string(), tar::EntryType::Directory),
                ("b/c/f".to_string(), tar::EntryType::Regular),
                ("link".to_string(), tar::EntryType::Symlink),
            ]
        );
    }
}
