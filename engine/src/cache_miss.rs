//! Why a step missed the cache: a key is a hash, so to say what changed the engine remembers,
//! per step *position*, the named inputs that went into the key the last time the step ran or
//! hit, and compares them with this build's when the key is new.
//!
//! A position is what a user calls "the same step" across edits: the build's scope (the
//! context directory and the Dockerfile's name; a cluster task's tags and Dockerfile name),
//! the platform being built, the stage's name (`stage-N` for an unnamed stage, by its
//! Dockerfile index) and the instruction's index in the stage. Inserting a step shifts the
//! positions after it: those say their instruction changed, which is what the user did.
//!
//! The inputs are listed in the order they go into the key: the stage's root (base image,
//! platform, layer settings), then for each step its parent, its instruction, the build args
//! it sees, the presence of each secret it mounts (never a value or a digest of one), then
//! what it reads (context files, stages, images, downloads). The first one that differs is
//! the reason; a step whose parent changed reports why the parent did: "parent step ran"
//! when it ran, or the parent's own change when it did not (an `ENV` edited, a `FROM` whose
//! image moved), so the root cause is named at the first miss of a chain.
//!
//! Storage, in the cache directory: one small JSON record per stage position
//! (`cache/positions/<id>.json`, read once per stage, written only when a key changed), and
//! for each COPY or bind mount of context files a side file listing every file's path and an
//! 8-byte digest of what it fed into the checksum (front-coded paths: about 20 bytes a file),
//! written only when that input changed and read only to name the changed path. Both are
//! written atomically; the directory is bounded ([`MAX_RECORDS`] records, [`MAX_BYTES`]).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ossb_worker::checksum::EntryDigest;
use serde::{Deserialize, Serialize};

/// Stage records kept; beyond it the least recently used go (with their file lists).
pub const MAX_RECORDS: usize = 4096;
/// Bytes kept in records and file lists; beyond it the least recently used go.
pub const MAX_BYTES: u64 = 512 << 20;
/// File lists longer than this are not kept: a miss then names no path ("context files
/// changed").
const MAX_FILES: usize = 1_000_000;
const FILES_MAGIC: &[u8] = b"ossb-files-v1\n";

/// One named input of a key: what it is and a digest of its bytes (16 bytes, hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// `parent`, `instruction`, `build arg NAME`, `secret ID`, `context files`, ...
    pub name: String,
    /// Hex of the first 16 bytes of a digest of the input's bytes.
    pub digest: String,
    /// What may be shown of the value (a base image's manifest digest, `present`/`absent`
    /// for a secret); never a build arg's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shown: Option<String>,
}

impl Input {
    /// The input `name` of `bytes`.
    pub fn new(name: impl Into<String>, bytes: &[u8]) -> Input {
        let hash = blake3::hash(bytes);
        Input {
            name: name.into(),
            digest: hash.to_hex()[..32].to_string(),
            shown: None,
        }
    }

    /// The same, with a value that may be shown.
    pub fn shown(mut self, value: impl Into<String>) -> Input {
        self.shown = Some(value.into());
        self
    }
}

/// The inputs of one step's key the last time it ran or hit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The key (hex).
    pub key: String,
    /// Its inputs, in key order.
    pub inputs: Vec<Input>,
}

/// The records of one stage position.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// The stage's root key (hex) and its inputs (base image, platform, layer settings).
    pub root: Option<StepRecord>,
    /// Each step's record, by its index in the stage.
    pub steps: Vec<Option<StepRecord>>,
}

/// Why a step ran although a previous build had a step at its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Why {
    /// No build recorded this position (or its record was pruned).
    NoPreviousBuild,
    /// `--no-cache`.
    NoCache,
    /// The step before it in the key chain ran in this build.
    ParentRan,
    /// An input changed: what (`build arg VERSION changed`), and the line of the step where
    /// it changed when that is an earlier step that did not run (an `ENV` edited).
    Changed {
        /// What changed, as shown.
        what: String,
        /// The Dockerfile line of the step where it changed, when not this one.
        line: Option<usize>,
    },
    /// Its inputs are those of the last build, but the cache no longer holds its result.
    ResultGone,
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Why::NoPreviousBuild => f.write_str("no previous build of this step"),
            Why::NoCache => f.write_str("--no-cache"),
            Why::ParentRan => f.write_str("parent step ran"),
            Why::Changed { what, line: None } => f.write_str(what),
            Why::Changed {
                what,
                line: Some(line),
            } => write!(f, "{what} at line {line}"),
            Why::ResultGone => {
                f.write_str("inputs unchanged, but the cache no longer holds the result")
            }
        }
    }
}

/// The first input of `new` that differs from `old`, in key order: changed, new, or (after
/// all of `new`) one `old` had that is gone.
#[derive(Debug, PartialEq, Eq)]
pub enum Difference<'a> {
    /// `new` has it with another digest.
    Changed { old: &'a Input, new: &'a Input },
    /// Only `new` has it.
    Added(&'a Input),
    /// Only `old` has it.
    Removed(&'a Input),
}

/// The first difference between two input lists, in `new`'s order; `None` when they agree.
pub fn first_difference<'a>(old: &'a [Input], new: &'a [Input]) -> Option<Difference<'a>> {
    for input in new {
        match old.iter().find(|o| o.name == input.name) {
            None => return Some(Difference::Added(input)),
            Some(o) if o.digest != input.digest => {
                return Some(Difference::Changed { old: o, new: input })
            }
            Some(_) => {}
        }
    }
    old.iter()
        .find(|o| !new.iter().any(|n| n.name == o.name))
        .map(Difference::Removed)
}

/// How a difference other than the parent's is shown; a context input's changed path is
/// named by the caller ([`first_changed_path`]).
pub fn describe(difference: &Difference<'_>) -> String {
    match difference {
        Difference::Changed { old, new } => match (&old.shown, &new.shown) {
            (Some(was), Some(now)) if new.name.starts_with("secret ") => {
                format!("{} is now {now} (was {was})", new.name)
            }
            (Some(was), Some(now)) => format!("{} changed ({was} -> {now})", new.name),
            _ => format!("{} changed", new.name),
        },
        Difference::Added(new) => match &new.shown {
            Some(now) if new.name.starts_with("secret ") => format!("{} is now {now}", new.name),
            _ => format!("{} is new", new.name),
        },
        Difference::Removed(old) => format!("{} is gone", old.name),
    }
}

/// The first path (in the order the checksum walks: sorted, depth first) whose entry differs
/// between two lists of the same input, and how: `changed`, `added` or `removed`.
pub fn first_changed_path<'a>(
    old: &'a [EntryDigest],
    new: &'a [EntryDigest],
) -> Option<(&'a str, &'static str)> {
    let (mut i, mut j) = (0, 0);
    loop {
        match (old.get(i), new.get(j)) {
            (None, None) => return None,
            (Some((p, _)), None) => return Some((p, "removed")),
            (None, Some((p, _))) => return Some((p, "added")),
            (Some((op, od)), Some((np, nd))) => {
                if op == np {
                    if od != nd {
                        return Some((np, "changed"));
                    }
                    i += 1;
                    j += 1;
                } else if path_order(op, np) == std::cmp::Ordering::Less {
                    return Some((op, "removed"));
                } else {
                    return Some((np, "added"));
                }
            }
        }
    }
}

/// The walk's order: by path components (a directory's entries right after it).
fn path_order(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// The position records of a cache directory.
#[derive(Clone, Debug)]
pub struct Positions {
    dir: PathBuf,
}

impl Positions {
    /// The records under `cache_dir`.
    pub fn open(cache_dir: &Path) -> Positions {
        Positions {
            dir: cache_dir.join("cache/positions"),
        }
    }

    /// The id of a stage position.
    pub fn stage_id(scope: &str, platform: &str, stage: &str) -> String {
        let mut h = blake3::Hasher::new();
        for part in [scope, platform, stage] {
            h.update(&(part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().to_hex()[..32].to_string()
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn files_path(&self, id: &str, step: usize, input: &str) -> PathBuf {
        let input = &blake3::hash(input.as_bytes()).to_hex()[..16];
        self.dir.join(format!("{id}-{step}-{input}.files"))
    }

    /// The record of stage position `id`; an empty one when there is none (or it is
    /// unreadable: an explanation is never worth a failed build).
    pub fn load(&self, id: &str) -> StageRecord {
        let path = self.record_path(id);
        let Ok(bytes) = fs::read(&path) else {
            return StageRecord::default();
        };
        // Used now: the bound removes the least recently used first.
        crate::cache::mark_used(&path);
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    /// Writes the record of stage position `id` (atomically), then keeps the directory within
    /// its bounds.
    pub fn save(&self, id: &str, record: &StageRecord) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer(&mut tmp, record)?;
        tmp.persist(self.record_path(id)).map_err(|e| e.error)?;
        self.bound(MAX_RECORDS, MAX_BYTES)
    }

    /// Keeps the list of files an input of step `step` read, for the input's `checksum`.
    pub fn save_files(
        &self,
        id: &str,
        step: usize,
        input: &str,
        checksum: &[u8],
        entries: &[EntryDigest],
    ) -> io::Result<()> {
        let path = self.files_path(id, step, input);
        if entries.len() > MAX_FILES {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        io::Write::write_all(&mut tmp, &encode_files(checksum, entries))?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    /// The list kept for an input of step `step`, if it is the list of `checksum` (the
    /// input's digest, as [`Positions::save_files`] was given it).
    pub fn load_files(
        &self,
        id: &str,
        step: usize,
        input: &str,
        checksum: &str,
    ) -> Option<Vec<EntryDigest>> {
        let bytes = fs::read(self.files_path(id, step, input)).ok()?;
        let (sum, entries) = decode_files(&bytes)?;
        (sum == checksum.as_bytes()).then_some(entries)
    }

    /// Removes the least recently used records (with their file lists) beyond `records`
    /// records or `bytes` bytes.
    fn bound(&self, records: usize, bytes: u64) -> io::Result<()> {
        let mut files: Vec<(PathBuf, std::time::SystemTime, u64)> = Vec::new();
        for entry in fs::read_dir(&self.dir)?.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let used = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            files.push((entry.path(), used, meta.len()));
        }
        let count = files
            .iter()
            .filter(|(p, _, _)| p.extension().is_some_and(|e| e == "json"))
            .count();
        let mut total: u64 = files.iter().map(|(_, _, n)| n).sum();
        if count <= records && total <= bytes {
            return Ok(());
        }
        let mut stages: Vec<&(PathBuf, std::time::SystemTime, u64)> = files
            .iter()
            .filter(|(p, _, _)| p.extension().is_some_and(|e| e == "json"))
            .collect();
        stages.sort_by_key(|(_, used, _)| *used);
        let mut left = count;
        for (path, _, size) in stages {
            if left <= records && total <= bytes {
                break;
            }
            let id = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let _ = fs::remove_file(path);
            total = total.saturating_sub(*size);
            left -= 1;
            for (side, _, n) in &files {
                let name = side
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.starts_with(&format!("{id}-")) && name.ends_with(".files") {
                    let _ = fs::remove_file(side);
                    total = total.saturating_sub(*n);
                }
            }
        }
        Ok(())
    }

    /// Removes every record (prune `--all`) or those not used since `before`.
    pub fn prune(&self, before: Option<std::time::SystemTime>) -> io::Result<usize> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let used = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            if before.is_none_or(|b| used < b) && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// One stage position's records as a build goes through its steps: the last build's, read
/// once, and this build's, written when the stage is left (also when a step failed: the steps
/// that finished are remembered, the failed one keeps its old record).
pub struct StagePosition {
    positions: Positions,
    id: String,
    old: StageRecord,
    new: StageRecord,
    changed: bool,
}

impl StagePosition {
    /// The position of a stage of `steps` steps.
    pub fn open(cache_dir: &Path, scope: &str, platform: &str, stage: &str, steps: usize) -> Self {
        let positions = Positions::open(cache_dir);
        let id = Positions::stage_id(scope, platform, stage);
        let old = positions.load(&id);
        let mut new = old.clone();
        new.steps.resize(steps, None);
        let changed = new.steps.len() != old.steps.len();
        StagePosition {
            positions,
            id,
            old,
            new,
            changed,
        }
    }

    /// Records the stage's root; returns the difference from the last build's root, if its
    /// key changed (`None` also when there was no last build).
    pub fn root(&mut self, key: &str, inputs: Vec<Input>) -> Option<Difference<'_>> {
        let record = StepRecord {
            key: key.to_string(),
            inputs,
        };
        if self.old.root.as_ref().is_some_and(|r| r.key == key) {
            return None;
        }
        self.changed = true;
        self.new.root = Some(record);
        let old = self.old.root.as_ref()?;
        first_difference(&old.inputs, &self.new.root.as_ref()?.inputs)
    }

    /// The last build's record of step `n`.
    pub fn old_step(&self, n: usize) -> Option<&StepRecord> {
        self.old.steps.get(n)?.as_ref()
    }

    /// Keeps this build's record of step `n` (it ran or hit).
    pub fn keep(&mut self, n: usize, record: StepRecord) {
        if n >= self.new.steps.len() {
            self.new.steps.resize(n + 1, None);
        }
        if self.new.steps[n].as_ref() != Some(&record) {
            self.new.steps[n] = Some(record);
            self.changed = true;
        }
    }

    /// Keeps the list of files `input` of step `n` read (best effort).
    pub fn keep_files(&self, n: usize, input: &Input, entries: &[EntryDigest]) {
        if let Err(e) =
            self.positions
                .save_files(&self.id, n, &input.name, input.digest.as_bytes(), entries)
        {
            tracing::debug!("keeping the file list of a step: {e}");
        }
    }

    /// The list of files an input of step `n` read in the last build, if kept.
    pub fn old_files(&self, n: usize, input: &Input) -> Option<Vec<EntryDigest>> {
        self.positions
            .load_files(&self.id, n, &input.name, &input.digest)
    }
}

impl Drop for StagePosition {
    fn drop(&mut self) {
        if self.changed {
            if let Err(e) = self.positions.save(&self.id, &self.new) {
                tracing::debug!("keeping the inputs of a stage's steps: {e}");
            }
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn get_varint(data: &[u8], at: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *data.get(*at)?;
        *at += 1;
        n |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(n);
        }
    }
    None
}

/// A file list: magic, the checksum it belongs to, then per entry the length of the prefix
/// shared with the previous path, the rest of the path, the 8-byte digest.
fn encode_files(checksum: &[u8], entries: &[EntryDigest]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FILES_MAGIC.len() + 40 + entries.len() * 24);
    out.extend_from_slice(FILES_MAGIC);
    put_varint(&mut out, checksum.len() as u64);
    out.extend_from_slice(checksum);
    put_varint(&mut out, entries.len() as u64);
    let mut previous: &[u8] = &[];
    for (path, digest) in entries {
        let path = path.as_bytes();
        let shared = previous
            .iter()
            .zip(path)
            .take_while(|(a, b)| a == b)
            .count();
        put_varint(&mut out, shared as u64);
        put_varint(&mut out, (path.len() - shared) as u64);
        out.extend_from_slice(&path[shared..]);
        out.extend_from_slice(digest);
        previous = path;
    }
    out
}

fn decode_files(data: &[u8]) -> Option<(Vec<u8>, Vec<EntryDigest>)> {
    let mut at = FILES_MAGIC.len();
    if data.get(..at)? != FILES_MAGIC {
        return None;
    }
    let n = get_varint(data, &mut at)? as usize;
    let checksum = data.get(at..at.checked_add(n)?)?.to_vec();
    at += n;
    let count = get_varint(data, &mut at)? as usize;
    let mut entries = Vec::with_capacity(count.min(MAX_FILES));
    let mut previous: Vec<u8> = Vec::new();
    for _ in 0..count {
        let shared = get_varint(data, &mut at)? as usize;
        let rest = get_varint(data, &mut at)? as usize;
        let mut path = previous.get(..shared)?.to_vec();
        path.extend_from_slice(data.get(at..at.checked_add(rest)?)?);
        at += rest;
        let digest: [u8; 8] = data.get(at..at + 8)?.try_into().ok()?;
        at += 8;
        entries.push((String::from_utf8(path.clone()).ok()?, digest));
        previous = path;
    }
    Some((checksum, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn inputs(list: &[(&str, &str)]) -> Vec<Input> {
        list.iter()
            .map(|(n, v)| Input::new(*n, v.as_bytes()))
            .collect()
    }

    #[test]
    fn the_first_difference_in_key_order_is_the_reason() {
        let old = inputs(&[
            ("parent", "p"),
            ("instruction", "RUN make"),
            ("build arg A", "1"),
            ("build arg B", "1"),
        ]);
        assert_eq!(first_difference(&old, &old), None);
        // Two changes: the one earlier in the key is named.
        let new = inputs(&[
            ("parent", "p"),
            ("instruction", "RUN make"),
            ("build arg A", "2"),
            ("build arg B", "2"),
        ]);
        let d = first_difference(&old, &new).unwrap();
        assert_eq!(describe(&d), "build arg A changed");
        let new = inputs(&[("parent", "q"), ("instruction", "RUN make all")]);
        assert!(
            matches!(first_difference(&old, &new), Some(Difference::Changed { new, .. }) if new.name == "parent")
        );
        // An input only one side has.
        let new = inputs(&[
            ("parent", "p"),
            ("instruction", "RUN make"),
            ("build arg A", "1"),
        ]);
        assert_eq!(
            describe(&first_difference(&old, &new).unwrap()),
            "build arg B is gone"
        );
        let new = [old.clone(), inputs(&[("build arg C", "x")])].concat();
        assert_eq!(
            describe(&first_difference(&old, &new).unwrap()),
            "build arg C is new"
        );
    }

    /// A secret's presence is shown; a build arg's value never is.
    #[test]
    fn secrets_show_presence_and_base_images_their_digest() {
        let old = [Input::new("secret token", b"absent").shown("absent")];
        let new = [Input::new("secret token", b"present").shown("present")];
        assert_eq!(
            describe(&first_difference(&old, &new).unwrap()),
            "secret token is now present (was absent)"
        );
        let old = [Input::new("base image alpine", b"1").shown("sha256:aaa")];
        let new = [Input::new("base image alpine", b"2").shown("sha256:bbb")];
        assert_eq!(
            describe(&first_difference(&old, &new).unwrap()),
            "base image alpine changed (sha256:aaa -> sha256:bbb)"
        );
        let old = [Input::new("build arg PASSWORD", b"hunter2")];
        let new = [Input::new("build arg PASSWORD", b"hunter3")];
        let text = describe(&first_difference(&old, &new).unwrap());
        assert_eq!(text, "build arg PASSWORD changed");
        assert!(!serde_json::to_string(&new).unwrap().contains("hunter"));
    }

    #[test]
    fn names_the_first_changed_added_or_removed_path() {
        let list = |l: &[(&str, u8)]| -> Vec<EntryDigest> {
            l.iter().map(|(p, d)| (p.to_string(), [*d; 8])).collect()
        };
        let old = list(&[("src", 0), ("src/a", 1), ("src/b", 2), ("src/c", 3)]);
        assert_eq!(first_changed_path(&old, &old), None);
        let new = list(&[("src", 0), ("src/a", 1), ("src/b", 9), ("src/c", 9)]);
        assert_eq!(first_changed_path(&old, &new), Some(("src/b", "changed")));
        let new = list(&[("src", 0), ("src/a", 1), ("src/c", 3)]);
        assert_eq!(first_changed_path(&old, &new), Some(("src/b", "removed")));
        let new = list(&[("src", 0), ("src/a", 1), ("src/a/x", 5), ("src/b", 2)]);
        assert_eq!(first_changed_path(&old, &new), Some(("src/a/x", "added")));
        // "src/a.txt" sorts after "src/a/..." in a walk (by component), not by bytes.
        let old = list(&[("src", 0), ("src/a", 1), ("src/a/x", 2), ("src/a.txt", 3)]);
        let new = list(&[("src", 0), ("src/a", 1), ("src/a.txt", 3)]);
        assert_eq!(first_changed_path(&old, &new), Some(("src/a/x", "removed")));
    }

    #[test]
    fn records_and_file_lists_round_trip_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let positions = Positions::open(dir.path());
        let id = Positions::stage_id("/ctx\0Dockerfile", "linux/amd64", "stage-0");
        assert_eq!(positions.load(&id), StageRecord::default());
        let record = StageRecord {
            root: None,
            steps: vec![Some(StepRecord {
                key: "k".into(),
                inputs: inputs(&[("parent", "p")]),
            })],
        };
        positions.save(&id, &record).unwrap();
        assert_eq!(positions.load(&id), record);
        let entries: Vec<EntryDigest> = (0..1000)
            .map(|i| (format!("src/dir{}/file{i}.txt", i / 100), [i as u8; 8]))
            .collect();
        let sum = hex(&[7u8; 16]);
        positions
            .save_files(&id, 0, "context files", sum.as_bytes(), &entries)
            .unwrap();
        let size = fs::metadata(positions.files_path(&id, 0, "context files"))
            .unwrap()
            .len();
        assert!(size < 1000 * 20, "front-coded: {size} bytes");
        assert_eq!(
            positions.load_files(&id, 0, "context files", &sum),
            Some(entries)
        );
        // Another checksum's list is not this one's.
        assert_eq!(
            positions.load_files(&id, 0, "context files", &hex(&[8u8; 16])),
            None
        );
        // Over the bound: the least recently used record goes, with its file list.
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options()
            .write(true)
            .open(positions.record_path(&id))
            .unwrap()
            .set_modified(past)
            .unwrap();
        positions.save("other", &record).unwrap();
        positions.bound(1, MAX_BYTES).unwrap();
        assert_eq!(positions.load(&id), StageRecord::default());
        assert!(!positions.files_path(&id, 0, "context files").exists());
        assert_eq!(positions.load("other"), record);
        assert_eq!(positions.prune(None).unwrap(), 1);
    }
}
