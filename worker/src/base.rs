//! A stage's filesystem known from its layers' listings ([`ossb_image::store::LayerEntry`])
//! instead of an unpacked rootfs, so that a COPY whose earlier steps all came from the cache
//! costs what it copies, not what the base holds.
//!
//! [`BaseTree`] replays the layers' entries as the applier would (names cleaned, parents
//! resolved through symlinks inside the rootfs, whiteouts and opaque markers, a directory over a
//! directory merging). A [`Skeleton`] is an empty directory that receives only the entries of
//! that tree a copy will look at: the destination path with every symlink met on the way (so the
//! copy resolves it inside the rootfs exactly as on the real rootfs), the paths the copied
//! files land on (an existing directory is copied into, a file replaced), and the account
//! databases `--chown` reads. Directories keep the base's owner, mode and mtime, so the layer
//! written from the skeleton (which includes every parent directory with its metadata) has the
//! bytes the real rootfs would give. Files are empty placeholders: a copy only replaces them.
//!
//! Nothing is created outside the skeleton: every created path's parents are directories this
//! module made (checked before each creation), and the copy itself resolves paths inside it.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use ossb_image::store::LayerEntry;

use crate::fs::{expand_source, join_rel, CopyFilter, FsError};

/// Why a step cannot use a skeleton (it then needs the unpacked rootfs), or what failed.
#[derive(Debug, thiserror::Error)]
pub enum SkeletonError {
    /// The layers or the step need the real rootfs (the reason is for the debug log).
    #[error("needs the unpacked rootfs: {0}")]
    NeedsRootfs(String),
    /// A file operation of the copy failed.
    #[error(transparent)]
    Fs(#[from] FsError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    /// Devices and FIFOs: never written into, only replaced.
    Other,
}

#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    link: OsString,
    content: Option<Arc<Vec<u8>>>,
}

impl Node {
    fn implicit_dir() -> Node {
        // As the applier makes a missing parent: 0755, owned by the builder (root in its
        // namespace).
        Node {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: OsString::new(),
            content: None,
        }
    }
}

/// The merged filesystem tree of a list of layers (paths relative to `/`, symlinks unresolved).
#[derive(Clone, Debug, Default)]
pub struct BaseTree {
    nodes: BTreeMap<PathBuf, Node>,
}

/// The most symlinks followed resolving one path (the kernel's limit).
const MAX_LINKS: usize = 40;

impl BaseTree {
    /// The tree of `layers` (base first), each given as its listing.
    pub fn from_layers(layers: &[Vec<LayerEntry>]) -> Result<BaseTree, SkeletonError> {
        let mut tree = BaseTree::default();
        for entries in layers {
            tree.apply(entries)?;
        }
        Ok(tree)
    }

    /// How many paths the tree holds.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn apply(&mut self, entries: &[LayerEntry]) -> Result<(), SkeletonError> {
        let refuse = |name: &[u8], why: &str| {
            SkeletonError::NeedsRootfs(format!(
                "layer entry {:?} {why}",
                String::from_utf8_lossy(name)
            ))
        };
        let mut created: HashSet<PathBuf> = HashSet::new();
        for e in entries {
            if matches!(e.kind, b'g' | b'x' | b'X' | b'L' | b'K') {
                continue;
            }
            let rel = clean_name(&e.name).ok_or_else(|| refuse(&e.name, "is not a clean name"))?;
            let Some(base) = rel.file_name().map(OsStr::to_os_string) else {
                continue;
            };
            let parent_rel = rel.parent().unwrap_or(Path::new(""));
            if base.as_bytes().starts_with(b".wh.") {
                let Some(parent) = self.resolve_parent(parent_rel, false)? else {
                    continue;
                };
                if base.as_bytes() == b".wh..wh..opq" {
                    let children: Vec<PathBuf> = self
                        .subtree(&parent)
                        .filter(|p| p.parent() == Some(parent.as_path()) && !created.contains(*p))
                        .cloned()
                        .collect();
                    for child in children {
                        self.remove(&child);
                    }
                } else {
                    let name = &base.as_bytes()[4..];
                    if matches!(name, b"" | b"." | b"..") {
                        return Err(refuse(&e.name, "is an invalid whiteout"));
                    }
                    let target = parent.join(OsStr::from_bytes(name));
                    if !created.contains(&target) {
                        self.remove(&target);
                    }
                }
                continue;
            }
            if rel.as_os_str().as_bytes().starts_with(b".wh..wh.") {
                continue;
            }
            let kind = match e.kind {
                b'5' => Kind::Dir,
                0 | b'0' | b'7' | b'S' | b'1' => Kind::File,
                b'2' => Kind::Symlink,
                b'3' | b'4' | b'6' => Kind::Other,
                // Skipped by the applier too.
                _ => continue,
            };
            let parent = self
                .resolve_parent(parent_rel, true)?
                .ok_or_else(|| refuse(&e.name, "has no parent directory"))?;
            let path = parent.join(&base);
            let mut node = Node {
                kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                mtime: e.mtime,
                size: e.size,
                link: OsString::from(OsStr::from_bytes(&e.link)),
                content: e.content.clone().map(Arc::new),
            };
            if e.kind == b'1' {
                // A hard link is the same inode as its target: same metadata and content.
                let target = clean_name(&e.link)
                    .ok_or_else(|| refuse(&e.name, "links out of the rootfs"))?;
                let tparent = target.parent().unwrap_or(Path::new(""));
                let tname = target
                    .file_name()
                    .ok_or_else(|| refuse(&e.name, "links to the rootfs"))?;
                let found = self
                    .resolve_parent(tparent, false)?
                    .and_then(|p| self.nodes.get(&p.join(tname)).cloned());
                node = found.ok_or_else(|| refuse(&e.name, "links to a missing file"))?;
            }
            match self.nodes.get_mut(&path) {
                Some(old) if old.kind == Kind::Dir && kind == Kind::Dir => *old = node,
                _ => {
                    self.remove(&path);
                    self.nodes.insert(path.clone(), node);
                }
            }
            created.insert(path);
        }
        Ok(())
    }

    /// `path` and everything below it.
    fn subtree<'a>(&'a self, path: &'a Path) -> impl Iterator<Item = &'a PathBuf> + 'a {
        self.nodes
            .range(path.to_path_buf()..)
            .map(|(p, _)| p)
            .take_while(move |p| p.starts_with(path))
    }

    fn remove(&mut self, path: &Path) {
        let doomed: Vec<PathBuf> = self.subtree(path).cloned().collect();
        for p in doomed {
            self.nodes.remove(&p);
        }
    }

    /// The directory `rel` names, symlinks followed inside the rootfs, as the applier resolves
    /// an entry's parent; missing directories are made when `create`, else `None`.
    fn resolve_parent(
        &mut self,
        rel: &Path,
        create: bool,
    ) -> Result<Option<PathBuf>, SkeletonError> {
        let mut seen = BTreeSet::new();
        let resolved = self
            .resolve(rel, true, &mut seen)
            .map_err(|e| SkeletonError::NeedsRootfs(e.to_string()))?;
        let mut cur = PathBuf::new();
        for part in resolved.components() {
            cur.push(part);
            match self.nodes.get(&cur) {
                Some(n) if n.kind == Kind::Dir => {}
                Some(_) => {
                    return Err(SkeletonError::NeedsRootfs(format!(
                        "{} is not a directory",
                        cur.display()
                    )))
                }
                None if create => {
                    self.nodes.insert(cur.clone(), Node::implicit_dir());
                }
                None => return Ok(None),
            }
        }
        Ok(Some(resolved))
    }

    /// Resolves `path` as [`crate::fs::resolve_in_root`] does on the real rootfs, adding every
    /// existing path met (symlinks included) to `seen`.
    fn resolve(
        &self,
        path: &Path,
        follow_last: bool,
        seen: &mut BTreeSet<PathBuf>,
    ) -> Result<PathBuf, FsError> {
        let mut resolved = PathBuf::new();
        let mut pending = components(path);
        pending.reverse();
        let mut links = 0;
        while let Some(part) = pending.pop() {
            if part == ".." {
                resolved.pop();
                continue;
            }
            let candidate = resolved.join(&part);
            let is_last = pending.is_empty();
            match self.nodes.get(&candidate) {
                Some(node) => {
                    seen.insert(candidate.clone());
                    if node.kind == Kind::Symlink && (follow_last || !is_last) {
                        links += 1;
                        if links > MAX_LINKS {
                            return Err(FsError::SymlinkLoop(path.display().to_string()));
                        }
                        let target = Path::new(&node.link);
                        if target.is_absolute() {
                            resolved = PathBuf::new();
                        }
                        let mut more = components(target);
                        more.reverse();
                        pending.extend(more);
                    } else {
                        resolved = candidate;
                    }
                }
                None => resolved = candidate,
            }
        }
        Ok(resolved)
    }
}

/// The cleaned name of a layer entry (as the applier cleans it), `None` when `..` climbs out
/// or a NUL is present.
fn clean_name(raw: &[u8]) -> Option<PathBuf> {
    if raw.contains(&0) {
        return None;
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            _ => parts.push(c),
        }
    }
    Some(PathBuf::from(OsStr::from_bytes(&parts.join(&b'/'))))
}

fn components(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// A directory standing in for the rootfs of a stage that is not unpacked (see the module
/// documentation). Collect what a step needs ([`Skeleton::prepare_copy`],
/// [`Skeleton::prepare_accounts`]), then [`Skeleton::materialize`] once, then run the step on
/// [`Skeleton::root`].
pub struct Skeleton<'t> {
    tree: &'t BaseTree,
    root: PathBuf,
    seen: BTreeSet<PathBuf>,
}

impl<'t> Skeleton<'t> {
    /// A skeleton of `tree` in the empty directory `root`.
    pub fn new(tree: &'t BaseTree, root: &Path) -> Skeleton<'t> {
        Skeleton {
            tree,
            root: root.to_path_buf(),
            seen: BTreeSet::new(),
        }
    }

    /// The directory the step runs on.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Needs `/etc/passwd` and `/etc/group` with their contents (for `--chown` names).
    pub fn prepare_accounts(&mut self) -> Result<(), SkeletonError> {
        for db in ["etc/passwd", "etc/group"] {
            let at = self.tree.resolve(Path::new(db), true, &mut self.seen)?;
            if let Some(n) = self.tree.nodes.get(&at) {
                if n.kind == Kind::File && n.content.is_none() && n.size > 0 {
                    return Err(SkeletonError::NeedsRootfs(format!(
                        "/{db} is {}, whose content the listing does not keep",
                        at.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// Needs what `copy_into(source_root, sources, dest)` (with `parents` and `filter`) looks
    /// at in the rootfs: the same sources, destination and rules as the copy.
    pub fn prepare_copy(
        &mut self,
        source_root: &Path,
        sources: &[String],
        dest: &str,
        parents: bool,
        filter: CopyFilter<'_>,
    ) -> Result<(), SkeletonError> {
        let target = self.tree.resolve(Path::new(dest), true, &mut self.seen)?;
        for source in sources {
            // A source that matches nothing fails the copy itself, with its own message.
            let Ok(matched) = expand_source(source_root, source, filter) else {
                continue;
            };
            for (rel, from) in matched {
                let meta = fs::symlink_metadata(&from).map_err(|source| FsError::Io {
                    path: from.clone(),
                    source,
                })?;
                let name = from.file_name().unwrap_or_default().to_os_string();
                if parents {
                    let kept = target.join(&rel);
                    if meta.is_dir() {
                        let to = self.tree.resolve(&kept, true, &mut self.seen)?;
                        self.prepare_tree(&from, &rel, &to, filter)?;
                    } else {
                        let parent = kept.parent().unwrap_or(Path::new(""));
                        let parent = self.tree.resolve(parent, true, &mut self.seen)?;
                        self.prepare_entry(
                            &parent.join(kept.file_name().unwrap_or_default()),
                            &name,
                        )?;
                    }
                } else if meta.is_dir() {
                    self.prepare_tree(&from, &rel, &target, filter)?;
                } else {
                    let shown = Path::new(&rel)
                        .file_name()
                        .map(OsStr::to_os_string)
                        .unwrap_or_else(|| name.clone());
                    self.prepare_entry(&target.join(shown), &name)?;
                    self.prepare_entry(&target, &name)?;
                }
            }
        }
        Ok(())
    }

    /// A non-directory copied to `to`: an existing directory there is copied into instead.
    fn prepare_entry(&mut self, to: &Path, name: &OsStr) -> Result<(), SkeletonError> {
        let mut to = to.to_path_buf();
        for _ in 0..MAX_LINKS {
            let at = self.tree.resolve(&to, false, &mut self.seen)?;
            match self.tree.nodes.get(&at) {
                Some(n) if n.kind == Kind::Dir => to = at.join(name),
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// The contents of the source directory `from` copied into `to` (resolved).
    fn prepare_tree(
        &mut self,
        from: &Path,
        rel: &str,
        to: &Path,
        filter: CopyFilter<'_>,
    ) -> Result<(), SkeletonError> {
        let io_err = |source| FsError::Io {
            path: from.to_path_buf(),
            source,
        };
        let mut entries: Vec<_> = fs::read_dir(from)
            .map_err(io_err)?
            .collect::<Result<_, _>>()
            .map_err(io_err)?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let src = entry.path();
            let child_rel = join_rel(rel, &entry.file_name().to_string_lossy());
            let meta = fs::symlink_metadata(&src).map_err(|source| FsError::Io {
                path: src.clone(),
                source,
            })?;
            if filter.excluded(&child_rel) && !(meta.is_dir() && filter.must_descend(&child_rel)) {
                continue;
            }
            let dst = to.join(entry.file_name());
            if meta.is_dir() {
                // An existing directory, or a symlink to one inside the rootfs, is copied into.
                let real = self.tree.resolve(&dst, true, &mut self.seen)?;
                let into = match self.tree.nodes.get(&real) {
                    Some(n) if n.kind == Kind::Dir => real,
                    _ => dst,
                };
                self.prepare_tree(&src, &child_rel, &into, filter)?;
            } else {
                self.prepare_entry(&dst, &entry.file_name())?;
            }
        }
        Ok(())
    }

    /// Creates every path collected so far (with its parents), with the base's metadata.
    pub fn materialize(&mut self) -> Result<(), SkeletonError> {
        let mut all: BTreeSet<PathBuf> = BTreeSet::new();
        for p in &self.seen {
            let mut cur = p.as_path();
            while !cur.as_os_str().is_empty() && all.insert(cur.to_path_buf()) {
                cur = cur.parent().unwrap_or(Path::new(""));
            }
        }
        let mut dirs = Vec::new();
        for rel in &all {
            let Some(node) = self.tree.nodes.get(rel) else {
                continue;
            };
            let path = self.root.join(rel);
            let io_err = |source| FsError::Io {
                path: path.clone(),
                source,
            };
            // Never through a symlink: the parent must be a directory made here.
            let parent = path.parent().unwrap_or(&self.root);
            if !fs::symlink_metadata(parent).map_err(io_err)?.is_dir() {
                return Err(SkeletonError::NeedsRootfs(format!(
                    "{} is not a directory in the skeleton",
                    parent.display()
                )));
            }
            match node.kind {
                Kind::Dir => {
                    fs::create_dir(&path).map_err(io_err)?;
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                        .map_err(io_err)?;
                    dirs.push((path, node));
                    continue;
                }
                Kind::Symlink => std::os::unix::fs::symlink(&node.link, &path).map_err(io_err)?,
                Kind::File | Kind::Other => {
                    let mut f = fs::File::create_new(&path).map_err(io_err)?;
                    if let Some(content) = &node.content {
                        f.write_all(content).map_err(io_err)?;
                    }
                }
            }
            set_meta(&path, node)?;
        }
        // Deepest first, once their contents exist, as the applier sets directories' metadata.
        for (path, node) in dirs.iter().rev() {
            set_meta(path, node)?;
        }
        self.seen.clear();
        Ok(())
    }
}

/// Owner (best effort, as the applier: without the ids in the namespace the builder's stay),
/// mode and mtime of a created path.
fn set_meta(path: &Path, node: &Node) -> Result<(), SkeletonError> {
    let io_err = |source| FsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = lchown(path, Some(node.uid), Some(node.gid));
    if node.kind != Kind::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(node.mode)).map_err(io_err)?;
    }
    let t = nix::sys::time::TimeSpec::new(node.mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(io::Error::from(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn entry(name: &str, kind: u8, mode: u32, link: &str) -> LayerEntry {
        LayerEntry {
            name: name.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_000_000,
            size: 0,
            link: link.as_bytes().to_vec(),
            content: None,
        }
    }

    fn paths(tree: &BaseTree) -> Vec<String> {
        tree.nodes.keys().map(|p| p.display().to_string()).collect()
    }

    #[test]
    fn layers_merge_as_the_applier_applies_them() {
        let one = vec![
            entry("a/", b'5', 0o755, ""),
            entry("a/x", b'0', 0o644, ""),
            entry("./a/y", b'0', 0o644, ""),
            entry("b/", b'5', 0o700, ""),
            entry("b/z", b'0', 0o644, ""),
            entry("l", b'2', 0o777, "/a"),
            entry("h", b'1', 0, "a/y"),
        ];
        let two = vec![
            entry("a/.wh.x", b'0', 0, ""),
            entry("b/.wh..wh..opq", b'0', 0, ""),
            entry("b/new", b'0', 0o600, ""),
            // Through the symlink, inside the rootfs.
            entry("l/w", b'0', 0o644, ""),
            // A directory over a directory merges.
            entry("a", b'5', 0o750, ""),
            entry("c/deep/f", b'0', 0o644, ""),
        ];
        let tree = BaseTree::from_layers(&[one, two]).unwrap();
        assert_eq!(
            paths(&tree),
            ["a", "a/w", "a/y", "b", "b/new", "c", "c/deep", "c/deep/f", "h", "l"]
        );
        assert_eq!(tree.nodes[Path::new("a")].mode, 0o750, "directories merge");
        assert_eq!(tree.nodes[Path::new("h")].kind, Kind::File);
        for bad in ["../x", "a/../../x"] {
            assert!(BaseTree::from_layers(&[vec![entry(bad, b'0', 0o644, "")]]).is_err());
        }
        let replaced = BaseTree::from_layers(&[
            vec![entry("d/", b'5', 0o755, ""), entry("d/f", b'0', 0o644, "")],
            vec![entry("d", b'0', 0o644, "")],
        ])
        .unwrap();
        assert_eq!(paths(&replaced), ["d"]);
    }

    #[test]
    fn a_skeleton_holds_what_the_copy_looks_at_with_the_base_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        fs::create_dir_all(ctx.join("src/sub")).unwrap();
        fs::write(ctx.join("f.txt"), "f").unwrap();
        fs::write(ctx.join("src/sub/g"), "g").unwrap();
        let mut layer = vec![
            entry("opt/", b'5', 0o755, ""),
            entry("opt/real/", b'5', 0o750, ""),
            entry("opt/real/sub/", b'5', 0o711, ""),
            entry("opt/real/sub/g", b'0', 0o644, ""),
            entry("opt/link", b'2', 0o777, "real"),
            entry("up", b'2', 0o777, "../../../opt/link"),
            entry("unrelated/", b'5', 0o755, ""),
            entry("unrelated/file", b'0', 0o644, ""),
        ];
        layer[1].uid = 1000;
        let tree = BaseTree::from_layers(&[layer]).unwrap();
        let root = dir.path().join("skeleton");
        fs::create_dir(&root).unwrap();
        let mut sk = Skeleton::new(&tree, &root);
        sk.prepare_copy(&ctx, &["f.txt".into()], "/up/", false, CopyFilter::none())
            .unwrap();
        sk.prepare_copy(&ctx, &["src".into()], "/up/", false, CopyFilter::none())
            .unwrap();
        sk.materialize().unwrap();
        let real = fs::symlink_metadata(root.join("opt/real")).unwrap();
        assert_eq!((real.mode() & 0o7777, real.mtime()), (0o750, 1_000_000));
        if nix::unistd::geteuid().is_root() {
            assert_eq!(real.uid(), 1000);
        }
        assert!(fs::symlink_metadata(root.join("up")).unwrap().is_symlink());
        assert!(
            root.join("opt/real/sub/g").is_file(),
            "a file the copy replaces"
        );
        assert!(
            !root.join("unrelated").exists(),
            "only what the copy looks at"
        );
        let mut changes: Vec<String> = crate::fs::copy_into(
            &ctx,
            &["f.txt".into(), "src".into()],
            &root,
            "/up/",
            Default::default(),
            CopyFilter::none(),
        )
        .unwrap()
        .into_iter()
        .map(|c| c.path.display().to_string())
        .collect();
        changes.sort();
        for p in ["opt/real/f.txt", "opt/real/sub/g"] {
            assert!(changes.iter().any(|c| c == p), "{p}: {changes:?}");
        }
        assert!(!changes.iter().any(|c| c.starts_with("up")), "{changes:?}");
    }

    #[test]
    fn accounts_without_their_content_need_the_rootfs() {
        let mut passwd = entry("etc/passwd", b'0', 0o644, "");
        passwd.size = 10;
        let tree =
            BaseTree::from_layers(&[vec![entry("etc/", b'5', 0o755, ""), passwd.clone()]]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut sk = Skeleton::new(&tree, dir.path());
        assert!(matches!(
            sk.prepare_accounts(),
            Err(SkeletonError::NeedsRootfs(_))
        ));
        passwd.content = Some(b"app:x:1:1::/:/bin/sh\n".to_vec());
        let tree = BaseTree::from_layers(&[vec![passwd]]).unwrap();
        let mut sk = Skeleton::new(&tree, dir.path());
        sk.prepare_accounts().unwrap();
        sk.materialize().unwrap();
        assert_eq!(crate::fs::lookup_user(dir.path(), "app").unwrap().uid, 1);
    }
}
