//! The step cache: content-based keys (BuildKit style) and the local record of what each key
//! produced.
//!
//! A key is blake3(parent key, the step's expanded instruction, the checksums of what it
//! reads). The chain starts from the base image's manifest digest (or `scratch`), the platform
//! and the layer settings, so the same Dockerfile, context and bases give the same keys on any
//! machine. A record (`<cache>/cache/keys/<key>.json`) names the layer blob the step produced,
//! or none for a step that changed nothing; the blob lives in the blob store.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ossb_image::oci::Descriptor;
use ossb_image::store::{BlobStore, Lease};
use ossb_protocol::{Digest, Platform};
use serde::{Deserialize, Serialize};

/// The content hashes of context files read by earlier builds, in the cache directory
/// (`ossb_worker::checksum::ChecksumCache`).
pub const CHECKSUMS_FILE: &str = "checksums";

/// A step's cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of a stage's starting point: a base image (by manifest digest) or scratch, for a
    /// platform, with the settings that change layer bytes.
    pub fn root(base: Option<&Digest>, platform: &Platform, settings: &str) -> CacheKey {
        let mut h = blake3::Hasher::new();
        h.update(b"ossb-cache-v2\0");
        h.update(&ossb_dockerfile::KEY_VERSION.to_be_bytes());
        match base {
            Some(d) => h.update(d.to_string().as_bytes()),
            None => h.update(b"scratch"),
        };
        h.update(b"\0");
        h.update(platform.to_string().as_bytes());
        h.update(b"\0");
        h.update(settings.as_bytes());
        CacheKey(*h.finalize().as_bytes())
    }

    /// The key of a step after `self`: its instruction's canonical bytes
    /// ([`ossb_dockerfile::instruction_key_bytes`]) and the checksums of its inputs.
    pub fn child(&self, instruction: &[u8], inputs: &[&[u8]]) -> CacheKey {
        let mut h = blake3::Hasher::new();
        h.update(&self.0);
        h.update(&(instruction.len() as u64).to_be_bytes());
        h.update(instruction);
        for input in inputs {
            h.update(&(input.len() as u64).to_be_bytes());
            h.update(input);
        }
        CacheKey(*h.finalize().as_bytes())
    }

    /// The root of every linked layer's key (`COPY --link`, [`ossb_dockerfile::linked`]) for a
    /// platform and the layer settings: no base image, no parent step, as BuildKit copies a
    /// linked layer onto scratch. Apart from the roots of stages by its domain string.
    pub fn link_root(platform: &Platform, settings: &str) -> CacheKey {
        let mut h = blake3::Hasher::new();
        h.update(b"ossb-link-v1\0");
        h.update(&ossb_dockerfile::KEY_VERSION.to_be_bytes());
        h.update(platform.to_string().as_bytes());
        h.update(b"\0");
        h.update(settings.as_bytes());
        CacheKey(*h.finalize().as_bytes())
    }

    /// The chain's key once the linked layer whose key is `layer` is put on `self`: what
    /// runs later reads both, so it depends on both.
    pub fn with_linked(&self, layer: &CacheKey) -> CacheKey {
        self.child(b"ossb-link-merge", &[layer.as_bytes()])
    }

    /// A key computed elsewhere (a cluster's task), from [`CacheKey::as_bytes`].
    pub fn from_bytes(bytes: [u8; 32]) -> CacheKey {
        CacheKey(bytes)
    }

    /// The raw bytes, to feed into another key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex.
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key whose [`CacheKey::hex`] is `hex`; `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<CacheKey> {
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(CacheKey(bytes))
    }
}

/// A step's keys: the one its record is kept under, and the stage's key after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepKeys {
    /// The key of the step's record (its layer).
    pub record: CacheKey,
    /// The key of the stage after the step, the parent of the next step.
    pub chain: CacheKey,
    /// Whether the step is a linked COPY/ADD: its record's key has no parent.
    pub linked: bool,
}

impl StepKeys {
    /// The keys of `instruction` after `parent`, with the checksums of what it reads. Most
    /// steps' record and chain key are one: `parent`'s child. A linked COPY/ADD's record key
    /// is a child of `link_root` ([`CacheKey::link_root`]) instead, so a new base image or an
    /// earlier step that changed finds its layer again, and the chain goes on from `parent`
    /// with that layer on it ([`CacheKey::with_linked`]).
    pub fn of(
        parent: &CacheKey,
        link_root: &CacheKey,
        instruction: &ossb_dockerfile::Instruction,
        inputs: &[&[u8]],
    ) -> StepKeys {
        match ossb_dockerfile::link_layer_key_bytes(instruction) {
            Some(bytes) => {
                let record = link_root.child(&bytes, inputs);
                StepKeys {
                    record,
                    chain: parent.with_linked(&record),
                    linked: true,
                }
            }
            None => {
                let key =
                    parent.child(&ossb_dockerfile::instruction_key_bytes(instruction), inputs);
                StepKeys {
                    record: key,
                    chain: key,
                    linked: false,
                }
            }
        }
    }
}

/// What a cached step produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheRecord {
    /// The layer, or `None` when the step changed no file.
    pub layer: Option<Descriptor>,
    /// The layer's uncompressed digest.
    pub diff_id: Option<Digest>,
    /// How long the step took when it ran, for estimates.
    pub duration_ms: u64,
    /// When the record was written (seconds since the epoch).
    pub created: i64,
}

/// One level of the step cache chain ([`crate::step_cache`], as BuildKit's combined cache):
/// the local step cache, a `--cache-from` source, the build cluster's step records.
pub trait CacheLevel: Send + Sync {
    /// This level's record of `key`, its layer blob brought into `store`; `None` when it has
    /// no usable one. The cluster's level answers once no other task builds the key, and its
    /// `None` is the claim to build it (others asking meanwhile wait for its [`put`]).
    ///
    /// [`put`]: CacheLevel::put
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, Option<CacheRecord>>;
    /// Keeps the record of a step this build ran (a level that only serves keeps nothing).
    /// Best effort: a failure costs a rebuild, never a wrong layer.
    fn put<'a>(
        &'a self,
        key: &'a CacheKey,
        record: &'a CacheRecord,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, ()>;
    /// Brings the blob `digest` into `store` (a layer of a stage another task built, brought
    /// when a step reads it); its size. Only the cluster's level brings blobs.
    fn blob<'a>(
        &'a self,
        digest: &'a Digest,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, Result<u64, String>> {
        let _ = store;
        Box::pin(std::future::ready(Err(format!(
            "no cache level brings blobs ({digest})"
        ))))
    }
    /// Brings into `store` a blob of an image the build reads late (`COPY --from=IMAGE`, an
    /// image named context) through the cluster's single-flight: from a peer, or fetched from
    /// the registry once for every worker. Best effort: the engine's pull fetches what is still
    /// missing. Only the cluster's level does anything.
    fn image_blob<'a>(
        &'a self,
        reference: &'a ossb_image::Reference,
        blob: &'a Descriptor,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        let _ = (reference, blob, store);
        Box::pin(std::future::ready(()))
    }
}

impl CacheLevel for LocalCache {
    /// A record whose layer blob is still in the store (touched: it was used now).
    fn get<'a>(
        &'a self,
        key: &'a CacheKey,
        store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, Option<CacheRecord>> {
        let record = LocalCache::get(self, key).filter(|r| match &r.layer {
            Some(layer) if store.contains(&layer.digest) => {
                store.touch(&layer.digest);
                true
            }
            Some(_) => false,
            None => true,
        });
        Box::pin(std::future::ready(record))
    }

    fn put<'a>(
        &'a self,
        key: &'a CacheKey,
        record: &'a CacheRecord,
        _store: &'a BlobStore,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        let _ = LocalCache::put(self, key, record);
        Box::pin(std::future::ready(()))
    }
}

/// The records of one cache directory.
#[derive(Clone, Debug)]
pub struct LocalCache {
    dir: PathBuf,
}

impl LocalCache {
    /// The cache under `cache_dir`.
    pub fn open(cache_dir: &Path) -> io::Result<LocalCache> {
        let dir = cache_dir.join("cache/keys");
        fs::create_dir_all(&dir)?;
        Ok(LocalCache { dir })
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.json", key.hex()))
    }

    /// The record of `key`, if any. Reading it marks it used (its mtime), for pruning.
    pub fn get(&self, key: &CacheKey) -> Option<CacheRecord> {
        let path = self.path(key);
        let record = serde_json::from_slice(&fs::read(&path).ok()?).ok()?;
        mark_used(&path);
        Some(record)
    }

    /// Records what `key` produced (atomically: a reader sees the old record or the new one).
    pub fn put(&self, key: &CacheKey, record: &CacheRecord) -> io::Result<()> {
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        serde_json::to_writer(&mut tmp, record)?;
        tmp.persist(self.path(key)).map_err(|e| e.error)?;
        Ok(())
    }

    /// Every record with its key file's path, last use time and record.
    pub fn entries(&self) -> io::Result<Vec<(PathBuf, std::time::SystemTime, CacheRecord)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(bytes) = fs::read(&path) else { continue };
            let Ok(record) = serde_json::from_slice::<CacheRecord>(&bytes) else {
                continue;
            };
            let used = entry.metadata()?.modified()?;
            out.push((path, used, record));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_depend_on_everything_they_name() {
        let p: Platform = "linux/amd64".parse().unwrap();
        let base = Digest::of(b"manifest");
        let root = CacheKey::root(Some(&base), &p, "gzip");
        assert_eq!(root, CacheKey::root(Some(&base), &p, "gzip"));
        assert_ne!(root, CacheKey::root(None, &p, "gzip"));
        assert_ne!(
            root,
            CacheKey::root(Some(&base), &"linux/arm64".parse().unwrap(), "gzip")
        );
        assert_ne!(root, CacheKey::root(Some(&base), &p, "zstd"));
        let a = root.child(b"RUN make", &[]);
        assert_eq!(a, root.child(b"RUN make", &[]));
        assert_ne!(a, root.child(b"RUN make install", &[]));
        assert_ne!(a, root.child(b"RUN make", &[b"x"]));
        assert_eq!(a.hex().len(), 64);
        // Inputs are delimited: moving bytes from one input to the next changes the key.
        assert_ne!(
            root.child(b"COPY", &[b"ab", b"c"]),
            root.child(b"COPY", &[b"a", b"bc"])
        );
    }

    /// A key computed once: a change of how keys are made (which would miss every cache there
    /// is, local, registry and cluster) fails here until it is made on purpose.
    #[test]
    fn golden_key() {
        let p: Platform = "linux/amd64".parse().unwrap();
        let root = CacheKey::root(Some(&Digest::of(b"manifest")), &p, "gzip;epoch=none");
        let step = ossb_dockerfile::Instruction::Workdir("/app".into());
        let key = root.child(
            &ossb_dockerfile::instruction_key_bytes(&step),
            &[Digest::of(b"input").as_bytes()],
        );
        assert_eq!(
            key.hex(),
            "36925e308fbb98192b40b30e6041892f5205ad22e6c6a9b027c6b90345e297f7"
        );
    }

    /// The instruction of the last step of `FROM {base}` + `text`.
    fn step_of(base: &str, text: &str) -> ossb_dockerfile::Instruction {
        let df = ossb_dockerfile::parse(&format!("FROM {base}\n{text}\n"), "Dockerfile").unwrap();
        let plan = ossb_dockerfile::plan(
            &df,
            &ossb_dockerfile::PlanOptions::default(),
            &std::collections::HashMap::new(),
        )
        .unwrap();
        let stage = plan.stages.last().unwrap();
        stage.steps.last().unwrap().instruction.clone()
    }

    /// A linked COPY's layer key follows its instruction and what it reads, never the base
    /// image or the steps before it; the chain after it follows both.
    #[test]
    fn a_linked_layer_key_has_no_parent() {
        let p: Platform = "linux/amd64".parse().unwrap();
        let link_root = CacheKey::link_root(&p, "gzip");
        let base1 = CacheKey::root(Some(&Digest::of(b"base one")), &p, "gzip");
        let base2 = CacheKey::root(Some(&Digest::of(b"base two")), &p, "gzip");
        let after_run = base1.child(b"RUN make", &[]);
        let files = Digest::of(b"files");
        let keys = |parent: &CacheKey, text: &str, input: &Digest| {
            StepKeys::of(
                parent,
                &link_root,
                &step_of("scratch", text),
                &[input.as_bytes()],
            )
        };
        let link = "COPY --link app /app";
        let a = keys(&base1, link, &files);
        assert!(a.linked);
        assert_eq!(a.record, keys(&base2, link, &files).record, "another base");
        assert_eq!(
            a.record,
            keys(&after_run, link, &files).record,
            "another step below"
        );
        assert_ne!(
            a.chain,
            keys(&base2, link, &files).chain,
            "the chain reads the base"
        );
        assert_ne!(a.chain, a.record);
        // The stage's USER decides nothing in a copy; a WORKDIR under a relative dest does.
        let under = |pre: &str, text: &str| {
            StepKeys::of(
                &base1,
                &link_root,
                &step_of("scratch", &format!("{pre}\n{text}")),
                &[files.as_bytes()],
            )
            .record
        };
        assert_eq!(a.record, under("USER 1000", link));
        assert_ne!(
            under("WORKDIR /a", "COPY --link app app"),
            under("WORKDIR /b", "COPY --link app app")
        );
        // It changes with every input.
        for other in [
            keys(&base1, link, &Digest::of(b"other files")),
            keys(&base1, "COPY --link app /srv", &files),
            keys(&base1, "COPY --link --chown=1000:1000 app /app", &files),
            keys(&base1, "COPY --link --from=alpine app /app", &files),
            keys(&base1, "COPY --link --exclude=*.md app /app", &files),
            keys(&base1, "ADD --link app /app", &files),
        ] {
            assert!(other.linked);
            assert_ne!(a.record, other.record);
        }
        // Without --link, or with --chmod (BuildKit copies onto the stage then), a step.
        for text in ["COPY app /app", "COPY --link --chmod=755 app /app"] {
            let k1 = keys(&base1, text, &files);
            assert!(!k1.linked, "{text}");
            assert_eq!(k1.record, k1.chain);
            assert_ne!(k1.record, keys(&base2, text, &files).record, "{text}");
        }
    }

    /// A linked layer's key computed once (see `golden_key`).
    #[test]
    fn golden_link_key() {
        let p: Platform = "linux/amd64".parse().unwrap();
        let link_root = CacheKey::link_root(&p, "gzip;epoch=none");
        let parent = CacheKey::root(Some(&Digest::of(b"manifest")), &p, "gzip;epoch=none");
        let keys = StepKeys::of(
            &parent,
            &link_root,
            &step_of("scratch", "COPY --link --chown=1:2 app /app"),
            &[Digest::of(b"input").as_bytes()],
        );
        assert_eq!(
            keys.record.hex(),
            "90d02f8df676f544f556961bafe474634c27c5aa4eb588c57b2584d4c3793e6c"
        );
        assert_eq!(
            keys.chain.hex(),
            "e81126f389aef40e685fba2a546b4ea5effd01fd7d28dab62f038f96552dd1f0"
        );
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = LocalCache::open(dir.path()).unwrap();
        let key = CacheKey::root(None, &"linux/amd64".parse().unwrap(), "");
        assert!(cache.get(&key).is_none());
        let record = CacheRecord {
            layer: None,
            diff_id: None,
            duration_ms: 5,
            created: 1,
        };
        cache.put(&key, &record).unwrap();
        assert_eq!(cache.get(&key).unwrap().duration_ms, 5);
        assert_eq!(cache.entries().unwrap().len(), 1);
    }
}

/// What `ossb cache info` reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CacheInfo {
    /// Blobs in the store.
    pub blobs: usize,
    /// Their total size.
    pub bytes: u64,
    /// Step records.
    pub records: usize,
    /// Bytes in what interrupted builds left behind (work directories, temporary files),
    /// which `prune` removes.
    pub leftover_bytes: u64,
    /// Unpacked filesystems kept between builds (`<cache>/rootfs`): how many, bytes on disk.
    pub trees: (usize, u64),
    /// Recent builds: `(steps run, steps cached)`.
    pub recent: Vec<BuildStats>,
}

/// One build's cache use, appended to `<cache>/cache/builds.jsonl`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct BuildStats {
    /// When it finished.
    pub time: i64,
    /// Steps executed.
    pub run: usize,
    /// Steps taken from the cache.
    pub cached: usize,
}

/// Marks the record file `path` used now (its mtime), for pruning; best effort.
pub(crate) fn mark_used(path: &Path) {
    let _ = fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()));
}

/// Writes `bytes` to `path` through a temporary file beside it and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    io::Write::write_all(&mut tmp, bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Appends a build's statistics (kept to the last 100).
pub fn record_build(cache_dir: &Path, stats: BuildStats) -> io::Result<()> {
    let path = cache_dir.join("cache/builds.jsonl");
    let mut lines: Vec<String> = fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    lines.push(serde_json::to_string(&stats)?);
    let keep = lines.len().saturating_sub(100);
    write_atomic(&path, (lines[keep..].join("\n") + "\n").as_bytes())
}

/// The size and use of the cache in `cache_dir`.
pub fn info(cache_dir: &Path) -> io::Result<CacheInfo> {
    let mut out = CacheInfo::default();
    let usage = BlobStore::open(cache_dir)
        .and_then(|s| s.usage())
        .map_err(io::Error::other)?;
    out.blobs = usage.blobs as usize;
    out.bytes = usage.bytes;
    out.records = LocalCache::open(cache_dir)?.entries()?.len();
    out.leftover_bytes = leftovers(cache_dir)?.iter().map(|(_, _, size)| size).sum();
    let trees = kept_trees(cache_dir)?;
    out.trees = (trees.len(), trees.iter().map(|(_, _, size)| size).sum());
    out.recent = fs::read_to_string(cache_dir.join("cache/builds.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let skip = out.recent.len().saturating_sub(10);
    out.recent.drain(..skip);
    Ok(out)
}

/// What to prune.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    /// Everything.
    pub all: bool,
    /// Only what has not been used for this long.
    pub older_than: Option<std::time::Duration>,
    /// Delete the least recently used until the store is at most this size.
    pub keep_bytes: Option<u64>,
    /// Blobs used since then stay, whatever the other options say: what the build that
    /// collects made or read (its image, which its caller may still read or push).
    pub spare_used_since: Option<std::time::SystemTime>,
}

/// What `prune` removed.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct PruneReport {
    /// Records removed.
    pub records: usize,
    /// Blobs removed.
    pub blobs: usize,
    /// Bytes freed (blobs and leftovers).
    pub bytes: u64,
    /// Work directories and temporary files of interrupted builds removed.
    pub leftovers: usize,
    /// Unpacked filesystems kept between builds removed.
    pub trees: usize,
}

/// Removes cache records and blobs: all of them, those unused for `older_than`, or beyond
/// `keep_bytes` the least recently used, blobs no step record refers to first. With no option, what
/// has not been used for 48 hours (as BuildKit's default garbage collection keeps). Waits for
/// running builds to finish first.
pub fn prune(cache_dir: &Path, opts: &PruneOptions) -> io::Result<PruneReport> {
    let store = BlobStore::open(cache_dir).map_err(io::Error::other)?;
    let lease = Lease::exclusive(&store).map_err(io::Error::other)?;
    prune_locked(cache_dir, opts, &lease)
}

/// [`prune`] by the holder of the cache's exclusive `_lease`.
pub fn prune_locked(
    cache_dir: &Path,
    opts: &PruneOptions,
    _lease: &Lease,
) -> io::Result<PruneReport> {
    let store = BlobStore::open(cache_dir).map_err(io::Error::other)?;
    let now = std::time::SystemTime::now();
    let older_than = match (opts.all, opts.older_than, opts.keep_bytes) {
        (true, _, _) => Some(std::time::Duration::ZERO),
        (false, Some(d), _) => Some(d),
        (false, None, Some(_)) => None,
        (false, None, None) => Some(std::time::Duration::from_secs(48 * 3600)),
    };
    let stale = |t: std::time::SystemTime| {
        older_than.is_some_and(|d| now.duration_since(t).unwrap_or_default() >= d)
    };
    let mut report = PruneReport::default();
    let cache = LocalCache::open(cache_dir)?;
    let entries = cache.entries()?;
    // The layers step records refer to, and their compressed copies: what makes the next
    // build fast, kept longest.
    let copies = crate::compressed_copies::CompressedCopies::open(cache_dir);
    let referenced: std::collections::HashSet<Digest> = entries
        .iter()
        .filter(|(_, used, _)| !stale(*used))
        .filter_map(|(_, _, record)| record.layer.as_ref().map(|l| l.digest))
        .chain(copies.digests(|used| !stale(used))?)
        .collect();
    let mut blobs = store.blobs().map_err(io::Error::other)?;
    // For keep-storage: blobs no step record refers to (base image layers, configs and
    // manifests a pull brings back) before step layers, the oldest first in each.
    blobs.sort_by_key(|b| (referenced.contains(&b.digest), b.last_used));
    let mut total: u64 = blobs.iter().map(|b| b.size).sum();
    let mut removed = std::collections::HashSet::new();
    for blob in &blobs {
        if opts.spare_used_since.is_some_and(|t| blob.last_used >= t) {
            continue;
        }
        let over = opts.keep_bytes.is_some_and(|k| total > k);
        if stale(blob.last_used) || over {
            store.remove(&blob.digest).map_err(io::Error::other)?;
            total -= blob.size;
            report.blobs += 1;
            report.bytes += blob.size;
            removed.insert(blob.digest);
        }
    }
    for (path, used, record) in entries {
        let blob_gone = record
            .layer
            .as_ref()
            .is_some_and(|l| removed.contains(&l.digest));
        if stale(used) || blob_gone {
            fs::remove_file(path)?;
            report.records += 1;
        }
    }
    // Compressed copies go with their blob, or when stale as step records do.
    report.records += copies.prune(|copy, used| stale(used) || removed.contains(&copy.digest))?;
    // Under the exclusive lease no build runs: every work directory is a killed build's, and
    // temporary files are interrupted writes (kept a while: a partial download resumes).
    // SBOM scans kept by layer digests go as step records do, when stale.
    let kept_while_fresh = [
        cache_dir.join("tmp"),
        cache_dir.join("sbom"),
        cache_dir.join(crate::attestations::STAMPS),
    ];
    for (path, modified, size) in leftovers(cache_dir)? {
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if kept_while_fresh.contains(&parent) && !stale(modified) {
            continue;
        }
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                report.leftovers += 1;
                report.bytes += size;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }
    report.leftovers += ossb_worker::sandbox::remove_stale_step_files();
    // Kept trees go when unused as long as a step record would, and all with --all.
    // (Not listed when nothing can be stale: a tree's size is a walk of its files.)
    let trees = match older_than {
        Some(_) => kept_trees(cache_dir)?,
        None => Vec::new(),
    };
    for (path, kept, size) in trees {
        if stale(kept) {
            match fs::remove_dir_all(&path) {
                Ok(()) => {
                    report.trees += 1;
                    report.bytes += size;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
            }
        }
    }
    // The inputs cache-miss reasons compare with go as step records do.
    let positions = crate::cache_miss::Positions::open(cache_dir);
    if let Some(before) = older_than.and_then(|d| now.checked_sub(d)) {
        positions.prune(Some(before))?;
    }
    if opts.all {
        // RUN --mount=type=cache directories.
        let mounts = cache_dir.join("run-mounts");
        if mounts.exists() {
            fs::remove_dir_all(&mounts)?;
        }
        match fs::remove_file(cache_dir.join(CHECKSUMS_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(report)
}

/// What interrupted builds may leave: the entries of `work/` (a build's directory, removed
/// when the build ends) and of the store's `tmp/`, with their last change and size on disk.
fn leftovers(cache_dir: &Path) -> io::Result<Vec<(PathBuf, std::time::SystemTime, u64)>> {
    let mut out = Vec::new();
    for dir in [
        cache_dir.join("work"),
        cache_dir.join("tmp"),
        cache_dir.join("sbom"),
        cache_dir.join(crate::attestations::STAMPS),
    ] {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            out.push((path.clone(), modified, disk_usage(&path)));
        }
    }
    Ok(out)
}

/// The unpacked filesystems kept between builds (`crate::rootfs_pool`), with when each was
/// kept and its size on disk.
fn kept_trees(cache_dir: &Path) -> io::Result<Vec<(PathBuf, std::time::SystemTime, u64)>> {
    let entries = match fs::read_dir(cache_dir.join("rootfs")) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let kept = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        out.push((path.clone(), kept, disk_usage(&path)));
    }
    Ok(out)
}

/// Bytes a file or tree takes on disk (not following symlinks).
fn disk_usage(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    own + fs::read_dir(path)
        .map(|d| d.flatten().map(|e| disk_usage(&e.path())).sum())
        .unwrap_or(0)
}

/// Parses `10GB`, `512MiB`, `1.5g`, `1000` (bytes) for `--keep-storage`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0_f64.powi(4),
        _ => return None,
    };
    Some((n * mult) as u64)
}

/// Parses Go-style durations as `--filter until=` takes them: `24h`, `90m`, `1h30m`, `10s`.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        total += n * match c {
            'd' => 86_400.0,
            'h' => 3600.0,
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    Some(std::time::Duration::from_secs_f64(total))
}

#[cfg(test)]
mod prune_tests {
    use super::*;

    /// Makes `path` look last used `secs` seconds ago.
    fn age(path: &Path, secs: u64) {
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }

    #[test]
    fn parses_sizes_and_durations() {
        assert_eq!(parse_size("10GB"), Some(10 * 1024 * 1024 * 1024));
        assert_eq!(parse_size("512mib"), Some(512 * 1024 * 1024));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(
            parse_duration("1h30m"),
            Some(std::time::Duration::from_secs(5400))
        );
        assert_eq!(
            parse_duration("24h"),
            Some(std::time::Duration::from_secs(86_400))
        );
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("5x"), None);
    }

    /// SBOM scans kept by layer digests go when stale, as step records do.
    #[test]
    fn prune_removes_stale_sbom_scans() {
        let dir = tempfile::tempdir().unwrap();
        ossb_image::store::BlobStore::open(dir.path()).unwrap();
        let scans = dir.path().join("sbom");
        fs::create_dir_all(&scans).unwrap();
        fs::write(scans.join("v1-fresh.json"), "[]").unwrap();
        fs::write(scans.join("v1-old.json"), "[]").unwrap();
        age(&scans.join("v1-old.json"), 72 * 3600);
        prune(dir.path(), &PruneOptions::default()).unwrap();
        assert!(scans.join("v1-fresh.json").exists());
        assert!(!scans.join("v1-old.json").exists());
    }

    #[test]
    fn keep_storage_spares_what_was_used_since_the_collecting_build_began() {
        let dir = tempfile::tempdir().unwrap();
        let store = ossb_image::store::BlobStore::open(dir.path()).unwrap();
        let old = store.put(&vec![1u8; 1000]).unwrap();
        let older = store.put(&vec![3u8; 1000]).unwrap();
        let used = store.put(&vec![2u8; 1000]).unwrap();
        age(&store.path(&old), 3600);
        age(&store.path(&older), 7200);
        let now = std::time::SystemTime::now();
        // Asked to keep less than the used blob alone: the older ones go, the used one stays.
        let report = prune(
            dir.path(),
            &PruneOptions {
                keep_bytes: Some(500),
                spare_used_since: Some(now - std::time::Duration::from_secs(60)),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(report.blobs, 2);
        assert!(store.contains(&used) && !store.contains(&old) && !store.contains(&older));
    }

    #[test]
    fn prune_all_empties_the_cache_and_keep_storage_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ossb_image::store::BlobStore::open(dir.path()).unwrap();
        let old = store.put(&vec![1u8; 1000]).unwrap();
        let new = store.put(&vec![2u8; 1000]).unwrap();
        crate::cache_miss::Positions::open(dir.path())
            .save("stage", &Default::default())
            .unwrap();
        age(&store.path(&old), 3600);
        let report = prune(
            dir.path(),
            &PruneOptions {
                keep_bytes: Some(1500),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(report.blobs, 1);
        assert!(!store.contains(&old) && store.contains(&new));
        prune(
            dir.path(),
            &PruneOptions {
                all: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!store.contains(&new));
        assert_eq!(info(dir.path()).unwrap().blobs, 0);
        // The records cache-miss reasons compare with go too.
        assert!(fs::read_dir(dir.path().join("cache/positions"))
            .unwrap()
            .next()
            .is_none());
    }

    /// Over `--keep-storage`, blobs no step record refers to go before step layers, even
    /// when they were used more recently.
    #[test]
    fn keep_storage_keeps_the_layers_step_records_refer_to() {
        let dir = tempfile::tempdir().unwrap();
        let store = ossb_image::store::BlobStore::open(dir.path()).unwrap();
        let layer = store.put(&vec![1u8; 1000]).unwrap();
        let base = store.put(&vec![2u8; 1000]).unwrap();
        age(&store.path(&layer), 3600);
        let cache = LocalCache::open(dir.path()).unwrap();
        let key = CacheKey::root(None, &"linux/amd64".parse().unwrap(), "");
        let record = CacheRecord {
            layer: Some(Descriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: layer,
                size: 1000,
                platform: None,
                annotations: None,
            }),
            diff_id: Some(layer),
            duration_ms: 1,
            created: 0,
        };
        cache.put(&key, &record).unwrap();
        let report = prune(
            dir.path(),
            &PruneOptions {
                keep_bytes: Some(1500),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((report.blobs, report.records), (1, 0));
        assert!(store.contains(&layer) && !store.contains(&base));
    }

    /// A build killed with SIGKILL leaves its work directory and temporary files: prune
    /// removes the work directory (no build runs while it prunes) and temporary files once
    /// stale, and `info` counts them.
    #[test]
    fn prune_removes_what_killed_builds_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = ossb_image::store::BlobStore::open(dir.path()).unwrap();
        let kept = store.put(b"kept").unwrap();
        let rootfs = dir.path().join("work/build-x1/linux-amd64-stage-0/usr");
        fs::create_dir_all(&rootfs).unwrap();
        fs::write(rootfs.join("big"), vec![7u8; 64 << 10]).unwrap();
        let partial = dir.path().join("tmp/.tmpPARTIAL");
        fs::write(&partial, vec![1u8; 8 << 10]).unwrap();
        assert!(info(dir.path()).unwrap().leftover_bytes >= 72 << 10);
        // Within the default 48 hours: the fresh temporary file stays, the work dir goes.
        let report = prune(dir.path(), &PruneOptions::default()).unwrap();
        assert_eq!(report.leftovers, 1);
        assert!(!dir.path().join("work/build-x1").exists());
        assert!(partial.exists() && store.contains(&kept));
        let report = prune(
            dir.path(),
            &PruneOptions {
                older_than: Some(std::time::Duration::ZERO),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(report.leftovers >= 1 && !partial.exists());
    }

    #[test]
    fn prune_removes_kept_trees_when_stale_or_all() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("rootfs/0123/tree/etc");
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("hostname"), vec![1u8; 8 << 10]).unwrap();
        assert_eq!(info(dir.path()).unwrap().trees.0, 1);
        assert!(info(dir.path()).unwrap().trees.1 >= 8 << 10);
        let report = prune(dir.path(), &PruneOptions::default()).unwrap();
        assert_eq!(report.trees, 0, "a tree kept just now is fresh");
        let all = PruneOptions {
            all: true,
            ..Default::default()
        };
        assert_eq!(prune(dir.path(), &all).unwrap().trees, 1);
        assert!(!dir.path().join("rootfs/0123").exists());
    }
}

/// How long steps took in earlier builds, by the step's history text, for time estimates:
/// `<cache>/cache/durations.json`.
#[derive(Debug, Default)]
pub struct Durations {
    path: PathBuf,
    by_step: std::collections::HashMap<String, u64>,
}

impl Durations {
    fn key(step: &str) -> String {
        blake3::hash(step.as_bytes()).to_hex()[..32].to_string()
    }

    /// The durations recorded in `cache_dir` (none when the file is missing or unreadable).
    pub fn load(cache_dir: &Path) -> Durations {
        let path = cache_dir.join("cache/durations.json");
        let by_step = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Durations { path, by_step }
    }

    /// The last duration of `step`, in milliseconds.
    pub fn get(&self, step: &str) -> Option<u64> {
        self.by_step.get(&Self::key(step)).copied()
    }

    /// Records a duration.
    pub fn set(&mut self, step: &str, ms: u64) {
        self.by_step.insert(Self::key(step), ms);
    }

    /// Writes the file (best effort: estimates are a convenience).
    pub fn save(&self) {
        if let Ok(mut tmp) =
            tempfile::NamedTempFile::new_in(self.path.parent().unwrap_or(Path::new(".")))
        {
            if serde_json::to_writer(&mut tmp, &self.by_step).is_ok() {
                let _ = tmp.persist(&self.path);
            }
        }
    }
}
