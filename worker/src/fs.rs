//! File operations on a rootfs that can never leave it: path resolution with the rootfs as
//! `/` (symlinks followed inside it, `..` clamped at its top), COPY from the build context,
//! WORKDIR creation and user lookup in the rootfs's own `/etc/passwd` and `/etc/group`.
//!
//! COPY and WORKDIR return the [`Change`]s they made (every path they created or replaced, every
//! existing directory whose owner, mode or mtime they changed), so that their layer is written
//! without comparing snapshots of the whole rootfs. The list names each path by where it really
//! is in the rootfs (symlinks resolved inside it), as a metadata diff would, and gives the same
//! layer bytes.
//!
//! Resolution and use are not atomic, which is sound here because nothing else runs in the
//! rootfs while a step's files are written: RUN processes have exited before COPY begins.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use ossb_dockerfile::dockerignore::Dockerignore;
use ossb_image::layer::{Change, ChangeKind, ContentSources};

/// Errors of file steps.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A filesystem call failed on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The path involved (in the context or the rootfs).
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A COPY source does not exist in the build context.
    #[error("COPY source {0:?} not found: no such file in the build context, or excluded by .dockerignore (paths are relative to the context directory)")]
    SourceMissing(String),
    /// Several sources were copied to a destination that is not a directory.
    #[error(
        "when copying several sources, the destination {0:?} must be a directory and end with a /"
    )]
    DestNotDir(String),
    /// A symlink loop or a chain longer than the kernel's limit.
    #[error("too many levels of symbolic links resolving {0}")]
    SymlinkLoop(String),
    /// A fifo or device node of the source could not be made in the rootfs.
    #[error("COPY of {path}: cannot make the {what} in the image: {source} (device nodes need root outside a user namespace; remove it from the context or add it to .dockerignore)")]
    Special {
        /// The path in the build context (or the stage it is copied from).
        path: String,
        /// "named pipe", "character device", "block device".
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// USER names an account the rootfs does not have.
    #[error("unable to find user {0}: no matching entries in the image's /etc/passwd")]
    UnknownUser(String),
    /// USER names a group the rootfs does not have.
    #[error("unable to find group {0}: no matching entries in the image's /etc/group")]
    UnknownGroup(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Resolves `path` (absolute or relative, interpreted from `/` of the rootfs) to a host path
/// inside `root`, following symlinks as the kernel would if `root` were `/`. When
/// `follow_last` is false a symlink in the final component is not followed. Components that do
/// not exist are kept as they are.
pub fn resolve_in_root(root: &Path, path: &str, follow_last: bool) -> Result<PathBuf, FsError> {
    resolve_path_in_root(root, Path::new(path), follow_last)
}

/// [`resolve_in_root`] for a path that need not be UTF-8.
fn resolve_path_in_root(root: &Path, path: &Path, follow_last: bool) -> Result<PathBuf, FsError> {
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = components(path);
    pending.reverse();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate: PathBuf = root.join(resolved.iter().collect::<PathBuf>()).join(&part);
        let is_last = pending.is_empty();
        match fs::symlink_metadata(&candidate) {
            Ok(m) if m.file_type().is_symlink() && (follow_last || !is_last) => {
                links += 1;
                if links > 40 {
                    return Err(FsError::SymlinkLoop(path.display().to_string()));
                }
                let target = fs::read_link(&candidate).map_err(io_err(&candidate))?;
                if target.is_absolute() {
                    resolved.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
            }
            _ => resolved.push(part),
        }
    }
    Ok(root.join(resolved.iter().collect::<PathBuf>()))
}

/// The normal and `..` components of `path`, dropping `/` and `.`.
fn components(path: &Path) -> Vec<std::ffi::OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

/// How COPY writes what it copies.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    /// uid and gid for every copied file and created parent directory (`--chown`; 0:0 for the
    /// context); `None` keeps the owners the files have in the source (a stage or an image).
    pub owner: Option<(u32, u32)>,
    /// When set (`--chmod`), the mode of every copied file and directory.
    pub mode: Option<Mode>,
    /// `--parents`: keep each source's path (relative to the source root) under the destination.
    pub parents: bool,
}

/// A `--chmod` value: octal (`755`) or symbolic (`u+x,go-w`, `a=rX`), as chmod(1) reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Set exactly these bits.
    Octal(u32),
    /// Change the source's bits clause by clause.
    Symbolic(Vec<ModeClause>),
}

/// One clause of a symbolic mode: who, how, what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModeClause {
    who: u32,
    op: char,
    perm: u32,
    /// `X`: execute only for directories or files already executable by someone.
    exec_if: bool,
}

impl Mode {
    /// Parses a `--chmod` value; `None` when it is neither octal nor symbolic.
    pub fn parse(s: &str) -> Option<Mode> {
        if !s.is_empty() && s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return u32::from_str_radix(s, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .map(Mode::Octal);
        }
        let mut clauses = Vec::new();
        for clause in s.split(',') {
            let op_at = clause.find(['+', '-', '='])?;
            let (who_s, rest) = clause.split_at(op_at);
            let mut who = 0;
            for c in who_s.chars() {
                who |= match c {
                    'u' => 0o4700,
                    'g' => 0o2070,
                    'o' => 0o1007,
                    'a' => 0o7777,
                    _ => return None,
                };
            }
            if who == 0 {
                who = 0o7777;
            }
            let mut chars = rest.chars();
            let op = chars.next()?;
            let (mut perm, mut exec_if) = (0, false);
            for c in chars {
                perm |= match c {
                    'r' => 0o444,
                    'w' => 0o222,
                    'x' => 0o111,
                    'X' => {
                        exec_if = true;
                        0
                    }
                    's' => 0o6000,
                    't' => 0o1000,
                    _ => return None,
                };
            }
            clauses.push(ModeClause {
                who,
                op,
                perm,
                exec_if,
            });
        }
        (!clauses.is_empty()).then_some(Mode::Symbolic(clauses))
    }

    /// The mode for a file whose current permission bits are `current`.
    pub fn apply(&self, current: u32, is_dir: bool) -> u32 {
        match self {
            Mode::Octal(m) => *m,
            Mode::Symbolic(clauses) => {
                let mut mode = current & 0o7777;
                for c in clauses {
                    let mut perm = c.perm;
                    if c.exec_if && (is_dir || mode & 0o111 != 0) {
                        perm |= 0o111;
                    }
                    let bits = perm & c.who;
                    match c.op {
                        '+' => mode |= bits,
                        '-' => mode &= !bits,
                        _ => mode = (mode & !(c.who & 0o7777)) | bits,
                    }
                }
                mode
            }
        }
    }
}

/// Which paths of a COPY source tree may be read: the context's `.dockerignore` rules.
/// Stages and images have no ignore rules: use [`CopyFilter::none`].
#[derive(Clone, Copy)]
pub struct CopyFilter<'a> {
    ignore: Option<&'a Dockerignore>,
    /// `COPY --exclude` patterns, same syntax.
    exclude: Option<&'a Dockerignore>,
}

impl<'a> CopyFilter<'a> {
    /// Everything may be read.
    pub fn none() -> CopyFilter<'static> {
        CopyFilter {
            ignore: None,
            exclude: None,
        }
    }

    /// These rules and also the `--exclude` patterns `exclude`.
    pub fn with_exclude(self, exclude: &'a Dockerignore) -> CopyFilter<'a> {
        CopyFilter {
            exclude: Some(exclude),
            ..self
        }
    }

    /// The rules of a `.dockerignore` file.
    pub fn dockerignore(ignore: &'a Dockerignore) -> CopyFilter<'a> {
        CopyFilter {
            ignore: Some(ignore),
            exclude: None,
        }
    }

    /// The `--exclude` patterns, if any.
    pub fn exclude(&self) -> Option<&'a Dockerignore> {
        self.exclude
    }

    pub(crate) fn excluded(&self, rel: &str) -> bool {
        !rel.is_empty()
            && [self.ignore, self.exclude]
                .into_iter()
                .flatten()
                .any(|i| i.is_excluded(rel))
    }

    pub(crate) fn must_descend(&self, rel: &str) -> bool {
        [self.ignore, self.exclude]
            .into_iter()
            .flatten()
            .any(|i| i.may_include_below(rel))
    }
}

/// Copies `sources` (paths relative to `source_root`, as written in the Dockerfile, with
/// `*`, `?` and `[...]` wildcards) to `dest` (an absolute path in the rootfs), with Docker's
/// rules: a directory's contents are copied, not the directory; a destination ending in `/`,
/// or several sources, means a directory; missing parents are created; what `filter` excludes
/// is neither copied nor named. Returns the changes it made (see the module docs).
pub fn copy_into(
    source_root: &Path,
    sources: &[String],
    rootfs: &Path,
    dest: &str,
    opts: CopyOptions,
    filter: CopyFilter<'_>,
) -> Result<Vec<Change>, FsError> {
    let mut w = Written::new(rootfs);
    copy_with(source_root, sources, dest, opts, filter, &mut w)?;
    Ok(w.changes())
}

/// [`copy_into`] for a rootfs that only a layer reads afterwards: each regular file is made a
/// placeholder (its size, owner, mode, mtime and xattrs, no data) and its source is returned,
/// so that the layer reads the bytes from there
/// ([`ossb_image::layer::write_layer_from`]) instead of from a copy. The sources must stay
/// as they are until the layer is written (a size that changed is the layer's error).
pub fn copy_into_referencing(
    source_root: &Path,
    sources: &[String],
    rootfs: &Path,
    dest: &str,
    opts: CopyOptions,
    filter: CopyFilter<'_>,
) -> Result<(Vec<Change>, ContentSources), FsError> {
    let mut w = Written::new(rootfs);
    w.contents = Some(ContentSources::new());
    copy_with(source_root, sources, dest, opts, filter, &mut w)?;
    Ok((w.changes(), w.contents.take().unwrap_or_default()))
}

fn copy_with(
    source_root: &Path,
    sources: &[String],
    dest: &str,
    opts: CopyOptions,
    filter: CopyFilter<'_>,
    w: &mut Written<'_>,
) -> Result<(), FsError> {
    let own = &opts;
    let rootfs = w.rootfs;
    let mut matched = Vec::new();
    for source in sources {
        matched.extend(expand_source(source_root, source, filter)?);
    }
    // A wildcard may match nothing when another source matches (BuildKit allows it).
    if matched.is_empty() {
        return Err(FsError::SourceMissing(sources.join(" ")));
    }
    let dest_is_dir = dest.ends_with('/') || matched.len() > 1 || sources.len() > 1 || opts.parents;
    let target = resolve_in_root(rootfs, dest, true)?;
    if dest_is_dir && target.exists() && !target.is_dir() {
        return Err(FsError::DestNotDir(dest.to_string()));
    }
    for (rel, from) in matched {
        // Hard links are kept within one source's tree, not across sources (as BuildKit copies
        // each source on its own).
        w.links.clear();
        let meta = fs::symlink_metadata(&from).map_err(io_err(&from))?;
        if opts.parents {
            // The source's own path is kept below the destination, resolved inside the rootfs
            // (it may go through the rootfs's symlinks).
            let kept = target
                .strip_prefix(rootfs)
                .unwrap_or(Path::new(""))
                .join(&rel);
            if meta.is_dir() {
                let to = resolve_path_in_root(rootfs, &kept, true)?;
                let created = make_dirs(rootfs, &to, own, w)?;
                copy_tree(&from, &rel, &to, own, filter, w, Made::Top { created })?;
            } else {
                let parent = kept.parent().unwrap_or(Path::new(""));
                let parent = resolve_path_in_root(rootfs, parent, true)?;
                make_dirs(rootfs, &parent, own, w)?;
                let to = parent.join(kept.file_name().unwrap_or_default());
                copy_entry(&from, &rel, &to, &meta, own, w)?;
            }
        } else if meta.is_dir() {
            let created = make_dirs(rootfs, &target, own, w)?;
            copy_tree(&from, &rel, &target, own, filter, w, Made::Top { created })?;
        } else {
            let to = if dest_is_dir || target.is_dir() {
                make_dirs(rootfs, &target, own, w)?;
                // Named after the source as written, even when it is a symlink that was followed.
                let name = Path::new(&rel)
                    .file_name()
                    .or(from.file_name())
                    .unwrap_or_default();
                target.join(name)
            } else {
                if let Some(parent) = target.parent() {
                    make_dirs(rootfs, parent, own, w)?;
                }
                target.clone()
            };
            copy_entry(&from, &rel, &to, &meta, own, w)?;
        }
    }
    Ok(())
}

/// The changes of one file step, by path relative to the rootfs. Paths are recorded where
/// they are in the rootfs: callers pass host paths whose directories are resolved inside it.
struct Written<'a> {
    rootfs: &'a Path,
    changes: BTreeMap<PathBuf, ChangeKind>,
    /// Source files with several links, by (device, inode), and where this copy put them
    /// first: later names become hard links to it, as BuildKit keeps them.
    links: std::collections::HashMap<(u64, u64), PathBuf>,
    /// When set, regular files are placeholders and this says where their bytes are.
    contents: Option<ContentSources>,
}

impl<'a> Written<'a> {
    fn new(rootfs: &'a Path) -> Self {
        Written {
            rootfs,
            changes: BTreeMap::new(),
            links: std::collections::HashMap::new(),
            contents: None,
        }
    }

    /// Records `path` (a host path in the rootfs); the first kind recorded for a path stays
    /// (added and modified are written alike).
    fn record(&mut self, path: &Path, kind: ChangeKind) {
        match path.strip_prefix(self.rootfs) {
            Ok(rel) if !rel.as_os_str().is_empty() => {
                self.changes.entry(rel.to_path_buf()).or_insert(kind);
            }
            // The rootfs itself is never a change; nothing is written outside it.
            _ => {}
        }
    }

    /// Records the directory `path` as modified if its owner, mode or mtime differ from
    /// `before` (what a metadata diff compares for a directory).
    fn record_dir(&mut self, path: &Path, before: &fs::Metadata) -> Result<(), FsError> {
        let after = fs::symlink_metadata(path).map_err(io_err(path))?;
        if (
            after.mode(),
            after.uid(),
            after.gid(),
            after.mtime(),
            after.mtime_nsec(),
        ) != (
            before.mode(),
            before.uid(),
            before.gid(),
            before.mtime(),
            before.mtime_nsec(),
        ) {
            self.record(path, ChangeKind::Modified);
        }
        Ok(())
    }

    /// Records that the bytes of `path` (a host path in the rootfs) are `source`'s when the
    /// copy makes placeholders; returns whether it does.
    fn reference(&mut self, path: &Path, source: &Path) -> bool {
        let Some(contents) = &mut self.contents else {
            return false;
        };
        if let Ok(rel) = path.strip_prefix(self.rootfs) {
            contents.insert(rel.to_path_buf(), source.to_path_buf());
        }
        true
    }

    fn unreference(&mut self, path: &Path) {
        if let (Some(contents), Ok(rel)) = (&mut self.contents, path.strip_prefix(self.rootfs)) {
            contents.remove(rel);
        }
    }

    fn changes(&self) -> Vec<Change> {
        self.changes
            .iter()
            .map(|(path, kind)| Change {
                path: path.clone(),
                kind: *kind,
            })
            .collect()
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// The context paths one COPY source names: `(relative path, host path)`, in sorted order,
/// leaving out what `filter` excludes. A wildcard may match nothing; a plain path must exist.
pub fn expand_source(
    root: &Path,
    source: &str,
    filter: CopyFilter<'_>,
) -> Result<Vec<(String, PathBuf)>, FsError> {
    let clean: Vec<&str> = source
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if !has_wildcard(source) {
        let rel = clean.join("/");
        let from = resolve_in_root(root, &rel, true)?;
        if filter.excluded(&rel) || fs::symlink_metadata(&from).is_err() {
            return Err(FsError::SourceMissing(source.to_string()));
        }
        return Ok(vec![(rel, from)]);
    }
    // Walk the pattern one segment at a time, as filepath.Match does per component.
    let mut found: Vec<String> = vec![String::new()];
    for segment in &clean {
        let mut next = Vec::new();
        for dir in &found {
            let host = resolve_in_root(root, dir, true)?;
            if !has_wildcard(segment) {
                let rel = join_rel(dir, segment);
                if fs::symlink_metadata(host.join(segment)).is_ok() {
                    next.push(rel);
                }
                continue;
            }
            let Ok(entries) = fs::read_dir(&host) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            next.extend(
                names
                    .into_iter()
                    .filter(|n| wildcard_match(segment, n))
                    .map(|n| join_rel(dir, &n)),
            );
        }
        found = next;
    }
    found.retain(|rel| !filter.excluded(rel));
    // A wildcard that matches nothing is not an error by itself: the copy fails only when no
    // source matched at all (BuildKit's AllowEmptyWildcard).
    found
        .into_iter()
        .map(|rel| Ok((rel.clone(), resolve_in_root(root, &rel, true)?)))
        .collect()
}

pub(crate) fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Shell-style matching of one path segment: `*`, `?`, `[abc]`, `[a-z]`, `[^a]`, `\x`.
///
/// Only the last `*` is ever backtracked to (a later star can take over anything an earlier one
/// would), so matching takes time proportional to the pattern times the name, whatever the
/// stars: `*a*a*a*a*b` cannot grind a worker.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Where the last star was, and where in the name its match ends so far.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if p.get(pi) == Some(&'*') {
            star = Some((pi + 1, ni));
            pi += 1;
            continue;
        }
        if let Some(next) = match_one(&p, pi, n[ni]) {
            pi = next;
            ni += 1;
            continue;
        }
        match star {
            Some((after, taken)) => {
                // The star takes one more character; the rest starts again after it.
                pi = after;
                ni = taken + 1;
                star = Some((after, taken + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Matches the one-character element of the pattern at `pi` against `c`; returns the index
/// after the element on a match.
fn match_one(p: &[char], pi: usize, c: char) -> Option<usize> {
    match p.get(pi)? {
        '*' => None,
        '?' => Some(pi + 1),
        '[' => match class_match(&p[pi + 1..], c) {
            Some((true, rest)) => Some(p.len() - rest.len()),
            Some((false, _)) => None,
            // An unterminated class matches a literal '['.
            None => (c == '[').then_some(pi + 1),
        },
        '\\' if pi + 1 < p.len() => (p[pi + 1] == c).then_some(pi + 2),
        lit => (*lit == c).then_some(pi + 1),
    }
}

/// Matches `c` against the class starting after `[`; returns the result and the pattern after `]`.
fn class_match(p: &[char], c: char) -> Option<(bool, &[char])> {
    let (negated, mut i) = match p.first() {
        Some('^') | Some('!') => (true, 1),
        _ => (false, 0),
    };
    let mut hit = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((hit != negated, &p[i + 1..]));
        }
        first = false;
        let lo = p[i];
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            hit |= lo <= c && c <= p[i + 2];
            i += 3;
        } else {
            hit |= lo == c;
            i += 1;
        }
    }
    None
}

/// Creates `dir` (a host path inside `rootfs`, resolved inside it) and its missing parents,
/// as BuildKit's copy makes them: owned by the `--chown` owner (root without one), mode 0755
/// or an octal `--chmod`'s. Returns whether `dir` itself was made.
fn make_dirs(
    rootfs: &Path,
    dir: &Path,
    own: &CopyOptions,
    w: &mut Written<'_>,
) -> Result<bool, FsError> {
    if dir.is_dir() || dir == rootfs {
        return Ok(false);
    }
    if let Some(parent) = dir.parent() {
        make_dirs(rootfs, parent, own, w)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            w.record(dir, ChangeKind::Added);
            if let Some((uid, gid)) = own.owner {
                lchown(dir, Some(uid), Some(gid)).map_err(io_err(dir))?;
            }
            let mode = match own.mode {
                Some(Mode::Octal(bits)) => bits,
                _ => 0o755,
            };
            fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err(dir))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(FsError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// How the directory a source directory is copied into came to be.
#[derive(Clone, Copy)]
enum Made {
    /// The destination of the COPY itself: made by [`make_dirs`] (0755 or the octal --chmod,
    /// the --chown owner) or already there.
    Top { created: bool },
    /// A directory inside the copied tree: made by the copy, or already in the rootfs.
    Nested { created: bool },
}

/// Copies the contents of the directory `from` into the directory `to` (resolved inside the
/// rootfs). As BuildKit's copy: a directory the copy made inside the tree takes the metadata
/// of its source; the destination of the COPY keeps what `make_dirs` gave it (a `COPY ./app
/// ./app` of a 0775 directory makes a 0755 one); a directory that was there keeps its owner,
/// mode and modification time.
fn copy_tree(
    from: &Path,
    rel: &str,
    to: &Path,
    own: &CopyOptions,
    filter: CopyFilter<'_>,
    w: &mut Written<'_>,
    made: Made,
) -> Result<(), FsError> {
    let before = fs::symlink_metadata(to).map_err(io_err(to))?;
    let mut entries: Vec<_> = fs::read_dir(from)
        .map_err(io_err(from))?
        .collect::<Result<_, _>>()
        .map_err(io_err(from))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let src = entry.path();
        let child_rel = join_rel(rel, &entry.file_name().to_string_lossy());
        let meta = fs::symlink_metadata(&src).map_err(io_err(&src))?;
        let excluded = filter.excluded(&child_rel);
        if excluded && !(meta.is_dir() && filter.must_descend(&child_rel)) {
            continue;
        }
        let dst = to.join(entry.file_name());
        if meta.is_dir() {
            let (dst, created) = dest_dir(w, &dst)?;
            copy_tree(
                &src,
                &child_rel,
                &dst,
                own,
                filter,
                w,
                Made::Nested { created },
            )?;
        } else {
            copy_entry(&src, &child_rel, &dst, &meta, own, w)?;
        }
    }
    let meta = fs::symlink_metadata(from).map_err(io_err(from))?;
    match made {
        Made::Nested { created: true } => apply_metadata(to, &meta, own)?,
        // BuildKit leaves the time of creation here; the source's keeps layers reproducible.
        Made::Top { created: true } => set_mtime(to, filetime_of(&meta)).map_err(io_err(to))?,
        Made::Top { created: false } | Made::Nested { created: false } => {
            set_mtime(to, filetime_of(&before)).map_err(io_err(to))?
        }
    }
    w.record_dir(to, &before)
}

/// The directory a source directory is copied into at `dst`: an existing directory, or where
/// a symlink there leads *inside the rootfs* when that is a directory (never a host path),
/// or a new directory replacing whatever else is there (then `true`: made here).
fn dest_dir(w: &mut Written<'_>, dst: &Path) -> Result<(PathBuf, bool), FsError> {
    let kind = match fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => return Ok((dst.to_path_buf(), false)),
        Ok(m) if m.file_type().is_symlink() => {
            let rel = dst.strip_prefix(w.rootfs).unwrap_or(dst);
            let real = resolve_path_in_root(w.rootfs, rel, true)?;
            if fs::symlink_metadata(&real).is_ok_and(|m| m.is_dir()) {
                return Ok((real, false));
            }
            ChangeKind::Modified
        }
        Ok(_) => ChangeKind::Modified,
        Err(_) => ChangeKind::Added,
    };
    remove_existing(dst)?;
    fs::create_dir(dst).map_err(io_err(dst))?;
    w.record(dst, kind);
    Ok((dst.to_path_buf(), true))
}

fn remove_existing(path: &Path) -> Result<(), FsError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => fs::remove_file(path).map_err(io_err(path)),
        Err(_) => Ok(()),
    }
}

/// Copies one non-directory entry (`rel` is its path in the source, for messages); symlinks
/// are copied as links, never followed; fifos and device nodes are made anew and never opened
/// (as BuildKit's copy does), a socket becomes an empty file.
fn copy_entry(
    from: &Path,
    rel: &str,
    to: &Path,
    meta: &fs::Metadata,
    own: &CopyOptions,
    w: &mut Written<'_>,
) -> Result<(), FsError> {
    if to.is_dir()
        && !fs::symlink_metadata(to)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
    {
        return copy_entry(
            from,
            rel,
            &to.join(from.file_name().unwrap_or_default()),
            meta,
            own,
            w,
        );
    }
    let kind = match fs::symlink_metadata(to) {
        Ok(_) => ChangeKind::Modified,
        Err(_) => ChangeKind::Added,
    };
    w.record(to, kind);
    remove_existing(to)?;
    // What an earlier source put here is gone: only the bytes recorded below are this path's.
    w.unreference(to);
    if meta.file_type().is_symlink() {
        let target = fs::read_link(from).map_err(io_err(from))?;
        std::os::unix::fs::symlink(&target, to).map_err(io_err(to))?;
        let (uid, gid) = own.owner.unwrap_or((meta.uid(), meta.gid()));
        lchown(to, Some(uid), Some(gid)).map_err(io_err(to))?;
        // The link's own time, as BuildKit's copy keeps it (fsutil): left at "now",
        // the layer would change with every cold build.
        return set_mtime(to, filetime_of(meta)).map_err(io_err(to));
    }
    if meta.nlink() > 1 {
        if let Some(first) = w.links.get(&(meta.dev(), meta.ino())).cloned() {
            // Whichever name the layer writes first carries the bytes.
            w.reference(to, from);
            return fs::hard_link(first, to).map_err(io_err(to));
        }
        w.links.insert((meta.dev(), meta.ino()), to.to_path_buf());
    }
    if !meta.is_file() {
        make_special(rel, to, meta)?;
        apply_metadata(to, meta, own)?;
        return Ok(());
    }
    if w.reference(to, from) {
        fs::File::create(to)
            .and_then(|f| f.set_len(meta.len()))
            .map_err(io_err(to))?;
    } else {
        fs::copy(from, to).map_err(io_err(to))?;
    }
    apply_metadata(to, meta, own)?;
    // After chown, which clears file capabilities.
    copy_xattrs(from, to);
    Ok(())
}

/// Makes the fifo or device node `meta` describes at `to` (BuildKit's `copyDevice`); a socket
/// is made an empty file, as BuildKit's "socket copied as stub". Device nodes need real root:
/// in a user namespace the kernel refuses them, and the error names the source.
fn make_special(rel: &str, to: &Path, meta: &fs::Metadata) -> Result<(), FsError> {
    use nix::sys::stat::{mknod, Mode, SFlag};
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let perm = Mode::from_bits_truncate(meta.mode() & 0o7777);
    let (kind, what) = if ft.is_fifo() {
        (SFlag::S_IFIFO, "named pipe")
    } else if ft.is_char_device() {
        (SFlag::S_IFCHR, "character device")
    } else if ft.is_block_device() {
        (SFlag::S_IFBLK, "block device")
    } else {
        // A socket (the only type left): the stub BuildKit makes.
        fs::File::create(to).map_err(io_err(to))?;
        return Ok(());
    };
    let rdev = if kind == SFlag::S_IFIFO {
        0
    } else {
        meta.rdev()
    };
    mknod(to, kind, perm, rdev).map_err(|errno| FsError::Special {
        path: rel.to_string(),
        what,
        source: io::Error::from(errno),
    })
}

/// Copies the extended attributes of `from` to `to` (user.*, security.capability and the rest
/// the kernel lets us set), best effort: a filesystem without xattrs just has none.
fn copy_xattrs(from: &Path, to: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(src), Ok(dst)) = (
        std::ffi::CString::new(from.as_os_str().as_bytes()),
        std::ffi::CString::new(to.as_os_str().as_bytes()),
    ) else {
        return;
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffer is valid for its length; the path is NUL-terminated.
    let n = unsafe { libc::llistxattr(src.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return;
    }
    for name in names[..n as usize]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
    {
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 65536];
        // SAFETY: as above; the name is NUL-terminated.
        let len = unsafe {
            libc::lgetxattr(
                src.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            continue;
        }
        // SAFETY: as above; `len` bytes of `value` are initialized.
        unsafe {
            libc::lsetxattr(
                dst.as_ptr(),
                cname.as_ptr(),
                value.as_ptr().cast(),
                len as usize,
                0,
            )
        };
    }
}

fn apply_metadata(path: &Path, meta: &fs::Metadata, own: &CopyOptions) -> Result<(), FsError> {
    let (uid, gid) = own.owner.unwrap_or((meta.uid(), meta.gid()));
    lchown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
    let mode = match &own.mode {
        Some(m) => m.apply(meta.mode(), meta.is_dir()),
        None => meta.mode() & 0o7777,
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    let mtime = filetime_of(meta);
    set_mtime(path, mtime).map_err(io_err(path))
}

fn filetime_of(meta: &fs::Metadata) -> libc::timespec {
    libc::timespec {
        tv_sec: meta.mtime(),
        tv_nsec: meta.mtime_nsec(),
    }
}

fn set_mtime(path: &Path, mtime: libc::timespec) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let times = [mtime, mtime];
    // SAFETY: c is a valid NUL-terminated path and times points to two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Creates the WORKDIR `dir` (absolute, in the rootfs) if missing, owned by `owner`. Returns
/// the directories it created, as changes (parents first).
pub fn make_workdir(rootfs: &Path, dir: &str, owner: (u32, u32)) -> Result<Vec<Change>, FsError> {
    let target = resolve_in_root(rootfs, dir, true)?;
    if target.is_dir() {
        return Ok(Vec::new());
    }
    let mut missing = Vec::new();
    let mut cur = target.as_path();
    while !cur.exists() && cur != rootfs {
        missing.push(cur.to_path_buf());
        cur = match cur.parent() {
            Some(p) => p,
            None => break,
        };
    }
    let mut w = Written::new(rootfs);
    for d in missing.iter().rev() {
        fs::create_dir(d).map_err(io_err(d))?;
        w.record(d, ChangeKind::Added);
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(io_err(d))?;
        lchown(d, Some(owner.0), Some(owner.1)).map_err(io_err(d))?;
    }
    Ok(w.changes())
}

/// A user resolved in the rootfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The uid.
    pub uid: u32,
    /// The primary gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Home directory, for $HOME.
    pub home: String,
}

/// Resolves a USER value (`name`, `uid`, `name:group`, `uid:gid`) against the rootfs's
/// `/etc/passwd` and `/etc/group`, as Docker does: a numeric uid needs no passwd entry.
pub fn lookup_user(rootfs: &Path, spec: &str) -> Result<User, FsError> {
    lookup(rootfs, spec, false)
}

/// The owner (uid, gid) of what WORKDIR or `COPY --chown` creates: as [`lookup_user`], but
/// as in BuildKit's file operations the user and group `root` need no entry (an image without
/// /etc/passwd, such as `FROM scratch`, may still say `USER root`), and a user given by id
/// alone is that group id too, whatever /etc/passwd says (`--chown=1000` is 1000:1000, as
/// BuildKit documents), so a `COPY --link`, which has no /etc/passwd, owns files alike.
pub fn lookup_owner(rootfs: &Path, spec: &str) -> Result<(u32, u32), FsError> {
    let user = lookup(rootfs, spec, true)?;
    match spec.parse::<u32>() {
        Ok(id) => Ok((id, id)),
        Err(_) => Ok((user.uid, user.gid)),
    }
}

fn lookup(rootfs: &Path, spec: &str, root_is_zero: bool) -> Result<User, FsError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = read_db(rootfs, "/etc/passwd");
    let groups_db = read_db(rootfs, "/etc/group");
    let entry = passwd.iter().find(|f| {
        f.first().map(String::as_str) == Some(user_part)
            || (user_part.parse::<u32>().is_ok() && f.get(2).map(String::as_str) == Some(user_part))
    });
    let (uid, mut gid, name, home) = match (entry, user_part.parse::<u32>()) {
        (Some(f), _) => (
            f.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
            f.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
            f.first().cloned(),
            f.get(5).cloned().unwrap_or_else(|| "/".into()),
        ),
        (None, Ok(uid)) => (uid, 0, None, "/".into()),
        (None, Err(_)) if root_is_zero && user_part == "root" => (0, 0, None, "/".into()),
        (None, Err(_)) => return Err(FsError::UnknownUser(user_part.to_string())),
    };
    if let Some(g) = group_part {
        gid = match groups_db
            .iter()
            .find(|f| f.first().map(String::as_str) == Some(g))
        {
            Some(f) => f.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
            None if root_is_zero && g == "root" => 0,
            None => g
                .parse()
                .map_err(|_| FsError::UnknownGroup(g.to_string()))?,
        };
    }
    let mut groups = vec![gid];
    if let (Some(name), None) = (&name, group_part) {
        for f in &groups_db {
            let members = f.get(3).map(String::as_str).unwrap_or("");
            if members.split(',').any(|m| m == name) {
                if let Some(g) = f.get(2).and_then(|s| s.parse().ok()) {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    Ok(User {
        uid,
        gid,
        groups,
        home,
    })
}

fn read_db(rootfs: &Path, path: &str) -> Vec<Vec<String>> {
    let Ok(file) = resolve_in_root(rootfs, path, true) else {
        return Vec::new();
    };
    fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn resolution_never_leaves_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/tmp", root.join("abs")).unwrap();
        symlink("../../../../..", root.join("etc/up")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(&root, "/abs/x", true).unwrap(),
            root.join("tmp/x")
        );
        assert_eq!(
            resolve_in_root(&root, "etc/up/etc/passwd", true).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(&root, "/../../x", true).unwrap(),
            root.join("x")
        );
        assert_eq!(
            resolve_in_root(&root, "/abs", false).unwrap(),
            root.join("abs")
        );
        assert!(matches!(
            resolve_in_root(&root, "/loop/x", true),
            Err(FsError::SymlinkLoop(_))
        ));
    }

    /// As BuildKit's copy: a fifo is made anew (never opened, so the copy cannot hang), a
    /// socket becomes an empty file, a device node is made where the kernel allows it and
    /// otherwise fails naming its path in the context.
    #[test]
    fn special_files_are_made_anew_never_opened() {
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(ctx.join("sub")).unwrap();
        fs::create_dir(&root).unwrap();
        nix::unistd::mkfifo(
            &ctx.join("sub/pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(ctx.join("sub/sock")).unwrap();
        copy_into(
            &ctx,
            &[".".into()],
            &root,
            "/ctx/",
            CopyOptions::default(),
            CopyFilter::none(),
        )
        .unwrap();
        let pipe = fs::symlink_metadata(root.join("ctx/sub/pipe")).unwrap();
        assert!(pipe.file_type().is_fifo());
        assert_eq!(pipe.mode() & 0o7777, 0o640);
        let sock = fs::symlink_metadata(root.join("ctx/sub/sock")).unwrap();
        assert!(sock.is_file() && sock.len() == 0);

        let dev = ctx.join("sub/null");
        let made = nix::sys::stat::mknod(
            &dev,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        );
        if made.is_err() {
            // Not real root (a user namespace): the copy above covered what can be made.
            return;
        }
        let copied = copy_into(
            &ctx,
            &["sub/null".into()],
            &root,
            "/null",
            CopyOptions::default(),
            CopyFilter::none(),
        );
        match copied {
            Ok(_) => {
                let m = fs::symlink_metadata(root.join("null")).unwrap();
                assert!(m.file_type().is_char_device());
                assert_eq!(m.rdev(), nix::sys::stat::makedev(1, 3));
            }
            Err(e) => {
                let shown = e.to_string();
                assert!(
                    shown.starts_with("COPY of sub/null: cannot make the character device"),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn copies_with_docker_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(ctx.join("src/sub")).unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::write(ctx.join("a.txt"), "a").unwrap();
        fs::write(ctx.join("src/sub/b.txt"), "b").unwrap();
        let own = CopyOptions::default();
        copy_into(
            &ctx,
            &["a.txt".into()],
            &root,
            "/app/",
            own.clone(),
            CopyFilter::none(),
        )
        .unwrap();
        copy_into(
            &ctx,
            &["a.txt".into()],
            &root,
            "/renamed.txt",
            own.clone(),
            CopyFilter::none(),
        )
        .unwrap();
        copy_into(
            &ctx,
            &["src".into()],
            &root,
            "/dst",
            own.clone(),
            CopyFilter::none(),
        )
        .unwrap();
        assert_eq!(fs::read_to_string(root.join("app/a.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(root.join("renamed.txt")).unwrap(), "a");
        assert_eq!(fs::read_to_string(root.join("dst/sub/b.txt")).unwrap(), "b");
        assert!(matches!(
            copy_into(
                &ctx,
                &["nope".into()],
                &root,
                "/x",
                own.clone(),
                CopyFilter::none()
            ),
            Err(FsError::SourceMissing(_))
        ));
    }

    /// Directory modes as BuildKit's copy gives them (checked against Docker 20.10's BuildKit
    /// and fsutil's copy): the destination a directory's contents go into is made 0755 (or
    /// the octal --chmod's, parents too), whatever the source directory's mode; directories
    /// inside the tree keep their source's; a directory already there keeps its own.
    #[test]
    fn directory_modes_follow_buildkit() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(ctx.join("app/sub")).unwrap();
        fs::write(ctx.join("app/f"), "x").unwrap();
        fs::set_permissions(ctx.join("app"), fs::Permissions::from_mode(0o775)).unwrap();
        fs::set_permissions(ctx.join("app/sub"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::create_dir_all(root.join("existing/sub")).unwrap();
        fs::set_permissions(root.join("existing"), fs::Permissions::from_mode(0o751)).unwrap();
        fs::set_permissions(root.join("existing/sub"), fs::Permissions::from_mode(0o705)).unwrap();
        let copy = |dest: &str, own: CopyOptions| {
            copy_into(&ctx, &["app".into()], &root, dest, own, CopyFilter::none()).unwrap()
        };
        copy("/srv/app", CopyOptions::default());
        assert_eq!(mode(&root.join("srv/app")), 0o755);
        assert_eq!(mode(&root.join("srv/app/sub")), 0o700);
        copy("/existing", CopyOptions::default());
        assert_eq!(mode(&root.join("existing")), 0o751);
        assert_eq!(mode(&root.join("existing/sub")), 0o705);
        let chmod = CopyOptions {
            mode: Some(Mode::parse("710").unwrap()),
            ..CopyOptions::default()
        };
        copy("/made/by/chmod", chmod);
        for made in ["made", "made/by", "made/by/chmod", "made/by/chmod/sub"] {
            assert_eq!(mode(&root.join(made)), 0o710, "{made}");
        }
    }

    #[test]
    fn copy_through_a_symlinked_destination_stays_inside() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(&ctx).unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(ctx.join("f"), "x").unwrap();
        symlink(&outside, root.join("evil")).unwrap();
        copy_into(
            &ctx,
            &["f".into()],
            &root,
            "/evil/",
            CopyOptions::default(),
            CopyFilter::none(),
        )
        .unwrap();
        assert!(
            fs::read_dir(&outside).unwrap().next().is_none(),
            "wrote outside the rootfs"
        );
        assert!(root
            .join(outside.strip_prefix("/").unwrap())
            .join("f")
            .exists());
    }

    #[test]
    fn wildcards_and_dockerignore_choose_the_sources() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(ctx.join("src/keep")).unwrap();
        fs::create_dir_all(ctx.join("node_modules/x")).unwrap();
        fs::create_dir_all(&root).unwrap();
        for f in [
            "a.json",
            "b.json",
            "c.txt",
            "src/main.rs",
            "src/keep/k.rs",
            "node_modules/x/y.js",
            "secret.env",
        ] {
            fs::write(ctx.join(f), f).unwrap();
        }
        let ignore = Dockerignore::parse("node_modules\n*.env\nsrc\n!src/keep\n").unwrap();
        let filter = CopyFilter::dockerignore(&ignore);
        let own = CopyOptions::default();
        copy_into(&ctx, &["*.json".into()], &root, "/j/", own.clone(), filter).unwrap();
        assert!(
            root.join("j/a.json").exists()
                && root.join("j/b.json").exists()
                && !root.join("j/c.txt").exists()
        );
        copy_into(&ctx, &[".".into()], &root, "/all", own.clone(), filter).unwrap();
        assert!(root.join("all/c.txt").exists());
        assert!(!root.join("all/node_modules").exists());
        assert!(!root.join("all/secret.env").exists());
        assert!(!root.join("all/src/main.rs").exists());
        assert!(
            root.join("all/src/keep/k.rs").exists(),
            "an exception re-includes below an excluded folder"
        );
        assert!(matches!(
            copy_into(
                &ctx,
                &["secret.env".into()],
                &root,
                "/s",
                own.clone(),
                filter
            ),
            Err(FsError::SourceMissing(_))
        ));
        assert!(matches!(
            copy_into(&ctx, &["*.none".into()], &root, "/s/", own.clone(), filter),
            Err(FsError::SourceMissing(_))
        ));
    }

    #[test]
    fn chmod_modes_parse_and_apply_like_chmod() {
        assert_eq!(Mode::parse("755").unwrap().apply(0o600, false), 0o755);
        assert_eq!(Mode::parse("u+x").unwrap().apply(0o644, false), 0o744);
        assert_eq!(Mode::parse("go-w").unwrap().apply(0o666, false), 0o644);
        assert_eq!(Mode::parse("a=rX").unwrap().apply(0o640, false), 0o444);
        assert_eq!(Mode::parse("a=rX").unwrap().apply(0o750, true), 0o555);
        assert_eq!(
            Mode::parse("u=rwx,g=rx,o=").unwrap().apply(0o777, false),
            0o750
        );
        assert_eq!(Mode::parse("+x").unwrap().apply(0o644, false), 0o755);
        for bad in ["", "9", "u+q", "z=r", "u"] {
            assert!(Mode::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parents_keep_paths_and_exclude_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        let root = dir.path().join("root");
        fs::create_dir_all(ctx.join("a/b")).unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::write(ctx.join("a/b/one.txt"), "1").unwrap();
        fs::write(ctx.join("a/b/two.log"), "2").unwrap();
        let opts = CopyOptions {
            parents: true,
            ..Default::default()
        };
        copy_into(
            &ctx,
            &["a/b/*.txt".into()],
            &root,
            "/out/",
            opts,
            CopyFilter::none(),
        )
        .unwrap();
        assert!(root.join("out/a/b/one.txt").exists());
        assert!(!root.join("out/a/b/two.log").exists());
        let exclude = Dockerignore::parse("**/*.log").unwrap();
        copy_into(
            &ctx,
            &["a".into()],
            &root,
            "/ex/",
            CopyOptions::default(),
            CopyFilter::none().with_exclude(&exclude),
        )
        .unwrap();
        assert!(root.join("ex/b/one.txt").exists());
        assert!(!root.join("ex/b/two.log").exists());
    }

    #[test]
    fn wildcard_matching_follows_filepath_match() {
        for (p, n, want) in [
            ("*.json", "a.json", true),
            ("*.json", "a.jsonx", false),
            ("?.txt", "a.txt", true),
            ("[a-c]*", "banana", true),
            ("[^a-c]*", "banana", false),
            ("[!a]x", "bx", true),
            ("\\*", "*", true),
            ("\\*", "a", false),
            ("[", "[", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyyb", false),
            ("*", "", true),
            ("a*", "a", true),
            ("**x", "yx", true),
            ("a?c*", "abc", true),
            ("*[b]", "ab", true),
        ] {
            assert_eq!(wildcard_match(p, n), want, "{p} vs {n}");
            assert_eq!(
                backtrack(
                    &p.chars().collect::<Vec<_>>(),
                    &n.chars().collect::<Vec<_>>()
                ),
                want,
                "{p} vs {n}"
            );
        }
        // Many stars against a long name that almost matches: quick, not exponential.
        let stars = format!("{}b", "*a".repeat(30));
        assert!(!wildcard_match(&stars, &"a".repeat(250)));
    }

    /// Plain backtracking, the reference the one-star-memory matcher is checked against.
    fn backtrack(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| backtrack(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && backtrack(&p[1..], &n[1..]),
            Some('[') => {
                let Some(c) = n.first() else { return false };
                match class_match(&p[1..], *c) {
                    Some((true, rest)) => backtrack(rest, &n[1..]),
                    Some((false, _)) => false,
                    None => *c == '[' && backtrack(&p[1..], &n[1..]),
                }
            }
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && backtrack(&p[2..], &n[1..]),
            Some(c) => n.first() == Some(c) && backtrack(&p[1..], &n[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn wildcards_agree_with_backtracking(p in "[ab*?\\[\\]^-]{0,7}", n in "[ab\\[-]{0,8}") {
            let (pc, nc): (Vec<char>, Vec<char>) = (p.chars().collect(), n.chars().collect());
            proptest::prop_assert_eq!(wildcard_match(&p, &n), backtrack(&pc, &nc), "{} vs {}", p, n);
        }
    }

    #[test]
    fn looks_up_users_like_docker() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            root.join("etc/group"),
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\n",
        )
        .unwrap();
        assert_eq!(
            lookup_user(root, "app").unwrap(),
            User {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 10],
                home: "/home/app".into()
            }
        );
        assert_eq!(lookup_user(root, "4242").unwrap().gid, 0);
        assert_eq!(lookup_user(root, "app:wheel").unwrap().gid, 10);
        assert!(matches!(
            lookup_user(root, "ghost"),
            Err(FsError::UnknownUser(_))
        ));
    }

    /// WORKDIR and COPY --chown in an image without /etc/passwd: `root` is uid and gid 0 (as
    /// BuildKit's file operations have it); other names still need entries. A RUN's user
    /// (`lookup_user`) still does, as runc's.
    #[test]
    fn owners_named_root_need_no_passwd() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(lookup_owner(root, "root").unwrap(), (0, 0));
        assert_eq!(lookup_owner(root, "root:root").unwrap(), (0, 0));
        assert_eq!(lookup_owner(root, "9999:root").unwrap(), (9999, 0));
        assert_eq!(lookup_owner(root, "9999").unwrap(), (9999, 9999));
        assert!(matches!(
            lookup_owner(root, "foo"),
            Err(FsError::UnknownUser(_))
        ));
        assert!(matches!(
            lookup_owner(root, "root:wheel"),
            Err(FsError::UnknownGroup(_))
        ));
        assert!(matches!(
            lookup_user(root, "root"),
            Err(FsError::UnknownUser(_))
        ));
        fs::create_dir(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:7:8::/root:/bin/sh\n").unwrap();
        assert_eq!(lookup_owner(root, "root").unwrap(), (7, 8), "an entry wins");
        fs::write(
            root.join("etc/passwd"),
            "app:x:1000:100::/home/app:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(lookup_owner(root, "app").unwrap(), (1000, 100));
        assert_eq!(
            lookup_owner(root, "1000").unwrap(),
            (1000, 1000),
            "an id alone is the group too, as BuildKit's"
        );
    }

    /// Every path under `root`, not `root` itself (symlinks not followed).
    fn walkdir_entries(root: &Path) -> Vec<PathBuf> {
        let mut all = Vec::new();
        let mut dirs = vec![root.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if fs::symlink_metadata(&p).unwrap().is_dir() {
                    dirs.push(p.clone());
                }
                all.push(p);
            }
        }
        all
    }

    /// Sets the mtime of every path under `root` (deepest first) to `secs`.
    fn age(root: &Path, secs: i64) {
        let mut all = walkdir_entries(root);
        all.push(root.to_path_buf());
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in all {
            let t = nix::sys::time::TimeSpec::new(secs, 0);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &p,
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
        }
    }

    #[test]
    fn recorded_changes_give_the_layer_a_metadata_diff_gives() {
        use crate::snapshot::Snapshot;
        use ossb_image::layer::{write_layer, Compression, LayerOptions};
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        for d in ["src/sub", "dirsrc/inner"] {
            fs::create_dir_all(ctx.join(d)).unwrap();
        }
        for (f, c) in [
            ("a.txt", "a"),
            ("src/sub/b.txt", "b"),
            ("src/c.txt", "c"),
            ("src/over", "a file where a directory was"),
            ("dirsrc/inner/x", "x"),
        ] {
            fs::write(ctx.join(f), c).unwrap();
        }
        symlink("c.txt", ctx.join("src/lnk")).unwrap();
        age(&ctx, 1_500_000);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for r in [&a, &b] {
            for d in ["app/over/deep", "realsub", "etc"] {
                fs::create_dir_all(r.join(d)).unwrap();
            }
            fs::write(r.join("app/a.txt"), "old").unwrap();
            fs::write(r.join("app/keep"), "k").unwrap();
            fs::write(r.join("etc/hosts"), "h").unwrap();
            fs::write(r.join("inner"), "a file where a directory goes").unwrap();
            symlink("/realsub", r.join("app/sub")).unwrap();
            age(r, 1_000_000);
        }
        let owner = if nix::unistd::geteuid().is_root() {
            (1000, 1000)
        } else {
            (0, 0)
        };
        let steps = |r: &Path| -> Vec<Change> {
            let opts = CopyOptions {
                owner: Some(owner),
                ..Default::default()
            };
            let none = CopyFilter::none();
            let mut changes = Vec::new();
            for (sources, dest) in [
                (vec!["a.txt"], "/app/"),
                (vec!["src"], "/app/"),
                (vec!["src"], "/new/deep/"),
                (vec!["dirsrc"], "/"),
                (vec!["a.txt"], "/etc/hosts"),
            ] {
                let sources: Vec<String> = sources.into_iter().map(String::from).collect();
                changes.extend(copy_into(&ctx, &sources, r, dest, opts.clone(), none).unwrap());
            }
            let parents = CopyOptions {
                parents: true,
                ..opts.clone()
            };
            changes.extend(
                copy_into(&ctx, &["src/sub/b.txt".into()], r, "/p/", parents, none).unwrap(),
            );
            changes.extend(make_workdir(r, "/w/x", owner).unwrap());
            changes.extend(make_workdir(r, "/app", owner).unwrap());
            changes
        };
        let before = Snapshot::take(&a, &[]).unwrap();
        steps(&a);
        let diffed = before.diff(&Snapshot::take(&a, &[]).unwrap());
        let recorded = steps(&b);
        let layer = |r: &Path, changes: &[Change]| {
            let mut blob = Vec::new();
            let opts = LayerOptions {
                compression: Compression::None,
                source_date_epoch: Some(2_000_000),
                level: None,
            };
            write_layer(r, changes, &mut blob, &opts).unwrap();
            blob
        };
        let paths = |c: &[Change]| {
            let mut p: Vec<PathBuf> = c.iter().map(|c| c.path.clone()).collect();
            p.sort();
            p.dedup();
            p
        };
        let (la, lb) = (layer(&a, &diffed), layer(&b, &recorded));
        assert!(
            la == lb,
            "diff {:#?}\nrecorded {:#?}",
            paths(&diffed),
            paths(&recorded)
        );
        let listed = paths(&recorded);
        for p in [
            "realsub/b.txt",
            "app/over/over",
            "inner/x",
            "etc/hosts",
            "w/x",
        ] {
            assert!(listed.contains(&PathBuf::from(p)), "{p}: {listed:#?}");
        }
        assert!(
            !listed.iter().any(|p| p.starts_with("app/sub")),
            "{listed:#?}"
        );
    }

    /// A COPY by reference (placeholders in the rootfs, the bytes read from the context) gives
    /// the layer a real copy gives, hard links, --chown and --chmod included, and writes no
    /// file's bytes into the rootfs.
    #[test]
    fn a_copy_by_reference_gives_the_layer_of_a_real_copy() {
        use ossb_image::layer::{write_layer, write_layer_from, Compression, LayerOptions};
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        fs::create_dir_all(ctx.join("data/sub")).unwrap();
        fs::write(ctx.join("data/big.bin"), vec![7u8; 3 << 20]).unwrap();
        fs::write(ctx.join("data/sub/small.txt"), "hello\n").unwrap();
        fs::hard_link(ctx.join("data/big.bin"), ctx.join("data/sub/again.bin")).unwrap();
        std::os::unix::fs::symlink("big.bin", ctx.join("data/link")).unwrap();
        fs::write(ctx.join("data/empty"), "").unwrap();
        age(&ctx, 1_500_000);
        let opts = LayerOptions {
            compression: Compression::Gzip,
            source_date_epoch: None,
            level: None,
        };
        for chmod in [None, Mode::parse("640")] {
            let own = CopyOptions {
                owner: Some((0, 0)),
                mode: chmod.clone(),
                parents: false,
            };
            let (copied, referenced) = (dir.path().join("copied"), dir.path().join("ref"));
            for root in [&copied, &referenced] {
                let _ = fs::remove_dir_all(root);
                fs::create_dir_all(root).unwrap();
            }
            let sources = ["data/".to_string()];
            let changes = copy_into(
                &ctx,
                &sources,
                &copied,
                "/d/",
                own.clone(),
                CopyFilter::none(),
            )
            .unwrap();
            let (ref_changes, contents) =
                copy_into_referencing(&ctx, &sources, &referenced, "/d/", own, CopyFilter::none())
                    .unwrap();
            assert_eq!(changes, ref_changes);
            assert!(contents.contains_key(Path::new("d/big.bin")));
            assert_eq!(
                contents[Path::new("d/sub/small.txt")],
                ctx.join("data/sub/small.txt")
            );
            // Every copied entry keeps its source's mtime, symlinks included (BuildKit's copy
            // sets them with AT_SYMLINK_NOFOLLOW), so neither copy depends on when it ran.
            for root in [&copied, &referenced] {
                for e in walkdir_entries(&root.join("d")) {
                    let m = fs::symlink_metadata(&e).unwrap();
                    assert_eq!(m.mtime(), 1_500_000, "{}", e.display());
                }
            }
            // The directory the COPY makes takes the time it was made (as in BuildKit), which
            // differs between the two copies when they straddle a second: give both one time.
            let made = std::time::SystemTime::now();
            for root in [&copied, &referenced] {
                let d = fs::File::open(root.join("d")).unwrap();
                d.set_modified(made).unwrap();
            }
            // Placeholders: the size without the bytes.
            let big = referenced.join("d/big.bin");
            assert_eq!(fs::metadata(&big).unwrap().len(), 3 << 20);
            assert!(fs::read(&big).unwrap().iter().all(|b| *b == 0));
            let mut real = Vec::new();
            let a = write_layer(&copied, &changes, &mut real, &opts).unwrap();
            let mut by_ref = Vec::new();
            let b =
                write_layer_from(&referenced, &ref_changes, &contents, &mut by_ref, &opts).unwrap();
            assert_eq!(a, b, "chmod {chmod:?}");
            assert!(real == by_ref);
        }
    }
}
