//! The build context by content, and builds as they travel.
//!
//! The client lists its context ([`scan`]): directories, symlinks, and files named by their
//! sha256, leaving out what `.dockerignore` excludes. Only files the coordinator lacks are
//! uploaded; a worker fetches only files it lacks and lays the context out again
//! ([`materialize`]) before running the engine on it. Named contexts (`--build-context`)
//! travel the same way; secrets and registry CAs travel as bytes in the spec and are written
//! to files of the task's directory on the worker ([`TaskFiles`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ossb_dockerfile::dockerignore::{self, Dockerignore};
use ossb_dockerfile::Network;
use ossb_image::oci::MediaTypes;
use ossb_image::registry::{Mirror, RegistryConfig, RegistryOptions};
use ossb_image::store::BlobStore;
use ossb_protocol::cluster::{
    check_path, BuildSpec, BuiltStage as WireStage, ContextEntry, EntryKind, TaskSpec,
};
use ossb_protocol::Digest;
use ossb_worker::mounts::{Secret, SecretBytes};
use ossb_worker::sandbox::Isolation;

use ossb_engine::build::{Annotations, BuildError, BuildRequest, BuiltStage, Output};
use ossb_engine::cache::CacheKey;
use ossb_engine::remote_cache::CacheLocation;
use ossb_engine::ContextSource;

/// The context of `req` as entries, and where each file's content is on this machine.
pub fn scan(req: &BuildRequest) -> Result<(Vec<ContextEntry>, BTreeMap<Digest, PathBuf>), String> {
    let ignore = match dockerignore::ignore_file(&req.context, Path::new(&req.dockerfile_name)) {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Some(Dockerignore::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    let mut entries = Vec::new();
    let mut files = BTreeMap::new();
    walk(&req.context, "", ignore.as_ref(), &mut entries, &mut files)?;
    Ok((entries, files))
}

/// The directory contexts of `req` (`--build-context NAME=DIR`) as entries, adding where each
/// file's content is to `files` (a directory's own `.dockerignore` is applied on the worker, as
/// `ossb build` applies it).
pub fn scan_named(
    req: &BuildRequest,
    files: &mut BTreeMap<Digest, PathBuf>,
) -> Result<Vec<(String, Vec<ContextEntry>)>, String> {
    let mut out = Vec::new();
    for (name, source) in &req.build_contexts {
        let ContextSource::Dir(dir) = source else {
            continue;
        };
        if !dir.is_dir() {
            return Err(format!(
                "--build-context {name}={}: not a directory",
                dir.display()
            ));
        }
        let mut entries = Vec::new();
        walk(dir, "", None, &mut entries, files)?;
        out.push((name.clone(), entries));
    }
    Ok(out)
}

fn walk(
    dir: &Path,
    rel: &str,
    ignore: Option<&Dockerignore>,
    entries: &mut Vec<ContextEntry>,
    files: &mut BTreeMap<Digest, PathBuf>,
) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let read = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut children: Vec<_> = read.filter_map(Result::ok).collect();
    children.sort_by_key(|e| e.file_name());
    for child in children {
        let name = child.file_name().to_string_lossy().into_owned();
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let full = child.path();
        let meta =
            std::fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
        // The ignore files themselves always travel: the engine reads them.
        let keep = name.ends_with(".dockerignore") || name == "Dockerfile";
        let excluded = !keep && ignore.is_some_and(|i| i.is_excluded(&path));
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            if excluded && !ignore.is_some_and(|i| i.may_include_below(&path)) {
                continue;
            }
            entries.push(ContextEntry {
                path: path.clone(),
                mode,
                kind: EntryKind::Dir,
            });
            walk(&full, &path, ignore, entries, files)?;
        } else if excluded {
            continue;
        } else if meta.file_type().is_symlink() {
            let target =
                std::fs::read_link(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            entries.push(ContextEntry {
                path,
                mode,
                kind: EntryKind::Symlink(target.to_string_lossy().into_owned()),
            });
        } else if meta.is_file() || meta.file_type().is_socket() {
            // A socket travels as an empty file (BuildKit's stub); it is never opened.
            let (digest, size) = if meta.is_file() {
                let mut file =
                    std::fs::File::open(&full).map_err(|e| format!("{}: {e}", full.display()))?;
                let mut hasher = ossb_protocol::Sha256Writer::new(std::io::sink());
                std::io::copy(&mut file, &mut hasher)
                    .map_err(|e| format!("{}: {e}", full.display()))?;
                let (digest, size, _) = hasher.finish();
                files.insert(digest, full);
                (digest, size)
            } else {
                let empty = Digest::of(b"");
                files.insert(empty, PathBuf::from("/dev/null"));
                (empty, 0)
            };
            entries.push(ContextEntry {
                path,
                mode,
                kind: EntryKind::File { digest, size },
            });
        } else {
            // Never opened: a fifo would wait for a writer forever.
            let ft = meta.file_type();
            let kind = if ft.is_fifo() {
                EntryKind::Fifo
            } else {
                EntryKind::Device {
                    block: ft.is_block_device(),
                    rdev: meta.rdev(),
                }
            };
            entries.push(ContextEntry { path, mode, kind });
        }
    }
    Ok(())
}

/// The files of a context: (digest, size), by digest, each once.
pub fn file_digests(entries: &[ContextEntry]) -> Vec<(Digest, u64)> {
    let mut out: Vec<(Digest, u64)> = entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::File { digest, size } => Some((digest, size)),
            _ => None,
        })
        .collect();
    by_digest_once(&mut out);
    out
}

/// The files of a build's main and named contexts: (digest, size), by digest, each once.
pub fn all_file_digests(spec: &BuildSpec) -> Vec<(Digest, u64)> {
    let mut out = file_digests(&spec.context);
    for (_, entries) in &spec.build_contexts {
        out.extend(file_digests(entries));
    }
    by_digest_once(&mut out);
    out
}

fn by_digest_once(files: &mut Vec<(Digest, u64)>) {
    files.sort();
    files.dedup_by_key(|(d, _)| *d);
}

/// Lays the context out in `dest` (an empty directory) from the files in `store`. The entry
/// list comes from a client and is not trusted: paths that would leave `dest` (`..`, absolute,
/// or under a symlink of the list) are refused, and nothing is written through a symlink.
pub fn materialize(entries: &[ContextEntry], store: &BlobStore, dest: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut dirs = Vec::new();
    for e in entries {
        check_path(&e.path)?;
        let rel = Path::new(&e.path);
        make_parents(dest, rel)?;
        let path = dest.join(rel);
        // Named as in the context: the worker's own directories mean nothing to the user.
        let err =
            |what: &str, x: std::io::Error| format!("{what} {:?} of the context: {x}", e.path);
        match &e.kind {
            EntryKind::Dir => match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => dirs.push((path, e.mode)),
                Ok(_) => return Err(format!("context path {:?} is listed twice", e.path)),
                Err(_) => {
                    std::fs::create_dir(&path).map_err(|x| err("creating", x))?;
                    dirs.push((path, e.mode));
                }
            },
            EntryKind::File { digest, .. } => {
                // create_new: an existing name, a symlink included, is an error, not followed.
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|x| err("writing", x))?;
                let mut from = std::fs::File::open(store.path(digest))
                    .map_err(|x| err("reading the content of", x))?;
                std::io::copy(&mut from, &mut out).map_err(|x| err("writing", x))?;
                out.set_permissions(std::fs::Permissions::from_mode(e.mode))
                    .map_err(|x| err("chmod", x))?;
            }
            EntryKind::Symlink(target) => {
                std::os::unix::fs::symlink(target, &path).map_err(|x| err("linking", x))?;
            }
            EntryKind::Fifo | EntryKind::Device { .. } => {
                use nix::sys::stat::{mknod, Mode, SFlag};
                let (kind, rdev) = match e.kind {
                    EntryKind::Device { block: true, rdev } => (SFlag::S_IFBLK, rdev),
                    EntryKind::Device { block: false, rdev } => (SFlag::S_IFCHR, rdev),
                    _ => (SFlag::S_IFIFO, 0),
                };
                mknod(&path, kind, Mode::from_bits_truncate(e.mode & 0o7777), rdev).map_err(|x| {
                    format!("making the {} {:?} of the context: {x} (device nodes need root outside a user namespace; add it to .dockerignore)",
                        if kind == SFlag::S_IFIFO { "named pipe" } else { "device node" }, e.path)
                })?;
            }
        }
    }
    // Directory modes last, children first: a read-only directory is filled before it is
    // made read-only.
    for (path, mode) in dirs.iter().rev() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
            .map_err(|x| format!("chmod {}: {x}", path.display()))?;
    }
    Ok(())
}

/// Makes the parents of `rel` under `dest` as real directories; a parent that is anything
/// else (a symlink of the list above all) is refused.
fn make_parents(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut dir = dest.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for part in parent.components() {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(format!(
                    "context path {:?} is under {}, which is not a directory",
                    rel,
                    dir.strip_prefix(dest).unwrap_or(&dir).display()
                ))
            }
            Err(_) => {
                std::fs::create_dir(&dir).map_err(|x| format!("creating {}: {x}", dir.display()))?
            }
        }
    }
    Ok(())
}

/// The named contexts a worker resolves itself (images, downloads, git), as (name, value).
/// An OCI layout or a bake target's image is on this machine, out of the workers' reach:
/// refused (exit 2).
fn context_sources(req: &BuildRequest) -> Result<Vec<(String, String)>, BuildError> {
    let mut out = Vec::new();
    for (name, source) in &req.build_contexts {
        match source {
            ContextSource::Dir(_) => {}
            ContextSource::Image(_) | ContextSource::Url(_) | ContextSource::Git(_) => {
                out.push((name.clone(), source.provenance_value(name)))
            }
            ContextSource::OciLayout { .. } | ContextSource::Built { .. } => {
                return Err(BuildError::Usage(format!(
                    "--build-context {name}={}: a build cluster cannot read an image on this machine; push it to a registry and name it with docker-image://, or build with `ossb build`",
                    source.provenance_value(name)
                )))
            }
        }
    }
    Ok(out)
}

/// The spec of `req` to send to the coordinator, with the scanned contexts. Secrets and
/// registry CA files are read here: their bytes travel (over mutual TLS) in the spec.
pub fn spec_of(
    req: &BuildRequest,
    context: Vec<ContextEntry>,
    build_contexts: Vec<(String, Vec<ContextEntry>)>,
) -> Result<BuildSpec, BuildError> {
    if !req.ssh.is_empty() {
        // The agent's socket is on this machine; a worker cannot reach it.
        return Err(BuildError::Usage(
            "--ssh is not supported by a build cluster: the SSH agent stays on this machine. Build with `ossb build --ssh ...`, or give the workers what the step needs another way (a --secret)".into(),
        ));
    }
    let mut secrets = Vec::new();
    for (id, secret) in &req.secrets {
        let value = secret.read().map_err(|e| {
            BuildError::Usage(format!("--secret id={id}: cannot read {secret:?}: {e}"))
        })?;
        secrets.push(ossb_protocol::cluster::Secret {
            id: id.clone(),
            value,
        });
    }
    let mut registry_certificates = Vec::new();
    for (host, path) in &req.registry.certificates {
        let pem = std::fs::read_to_string(path).map_err(|e| {
            BuildError::Usage(format!(
                "--registry-certificate {host}={}: cannot read it: {e}",
                path.display()
            ))
        })?;
        registry_certificates.push((host.clone(), pem));
    }
    let context_sources = context_sources(req)?;
    Ok(BuildSpec {
        context_sources,
        dockerfile: req.dockerfile.clone(),
        dockerfile_name: req.dockerfile_name.clone(),
        tags: req.tags.clone(),
        platforms: req.platforms.clone(),
        build_args: req.build_args.clone().into_iter().collect(),
        target: req.target.clone(),
        labels: req.labels.clone().into_iter().collect(),
        push: req.outputs.contains(&Output::Registry),
        download: req
            .outputs
            .iter()
            .any(|o| !matches!(o, Output::Registry | Output::CacheOnly)),
        no_cache: req.no_cache,
        cache_from: req
            .cache_from
            .iter()
            .map(registry_cache)
            .collect::<Result<_, _>>()?,
        cache_to: match &req.cache_to {
            Some(to) => {
                if let Some(location) = &to.location {
                    registry_cache(location)?;
                }
                Some(to.to_string())
            }
            None => None,
        },
        insecure_registries: req.registry.insecure.clone(),
        registry_mirrors: req
            .registry_config
            .mirrors
            .iter()
            .map(|m| (m.registry.clone(), m.mirror.clone()))
            .collect(),
        compression: req.compression.name().into(),
        oci_media_types: req.media_types == MediaTypes::Oci,
        source_date_epoch: req.source_date_epoch,
        context,
        build_contexts,
        secrets,
        registry_certificates,
        network: req.network.to_string(),
        extra_hosts: req.extra_hosts.clone(),
        annotations: req
            .annotations
            .entries()
            .map(|(kind, k, v)| (kind.to_string(), k.clone(), v.clone()))
            .collect(),
        attest: crate::attest::spec_of(&req.attestations),
        export: ossb_protocol::cluster::ExportSpec {
            compression_level: req.export.compression_level,
            force_compression: req.export.force_compression,
            push_by_digest: req.export.push_by_digest,
            name_canonical: req.export.name_canonical,
        },
    })
}

/// The build's exporter options as the spec carries them.
pub fn export_of(spec: &BuildSpec) -> ossb_engine::ExportOptions {
    let e = &spec.export;
    ossb_engine::ExportOptions {
        compression_level: e.compression_level,
        force_compression: e.force_compression,
        push_by_digest: e.push_by_digest,
        name_canonical: e.name_canonical,
    }
}

/// A cache location a cluster can use: a registry repository. A directory is on the
/// submitter's machine, out of the workers' reach.
fn registry_cache(location: &CacheLocation) -> Result<String, BuildError> {
    match location {
        CacheLocation::Registry(repo) => Ok(repo.clone()),
        CacheLocation::Local(dir) => Err(BuildError::Usage(format!(
            "a type=local cache ({}) is on this machine, out of a build cluster's reach: use a registry cache (type=registry,ref=REF); the cluster also keeps its own step cache",
            dir.display()
        ))),
    }
}

/// The build's `--annotation`s as the spec carries them; a kind `ossb-submit` never sends is
/// refused (the coordinator checks before any task is made).
pub fn annotations_of(spec: &BuildSpec) -> Result<Annotations, String> {
    let mut out = Annotations::default();
    for (kind, key, value) in &spec.annotations {
        let map = out.of_kind(kind).ok_or_else(|| {
            format!(
                "annotation kind {:?} is not one of {}",
                ossb_dockerfile::clip(kind, 60),
                Annotations::KINDS.join(", ")
            )
        })?;
        map.insert(key.clone(), value.clone());
    }
    Ok(out)
}

/// The build's `--network` as the spec carries it.
pub fn network_of(spec: &BuildSpec) -> Result<Network, String> {
    match spec.network.as_str() {
        "" => Ok(Network::Default),
        other => other.parse(),
    }
}

/// Where a worker runs a task (nowhere, by default: the coordinator plans a build with the
/// request of a task it never runs).
#[derive(Default)]
pub struct TaskPlace {
    /// The context laid out.
    pub context: PathBuf,
    /// The worker's cache directory.
    pub cache_dir: PathBuf,
    /// The ossb binary.
    pub sandbox_exe: PathBuf,
    /// How RUN steps are isolated.
    pub isolation: Isolation,
    /// The files written for the task (named contexts, secrets, registry CAs).
    pub files: TaskFiles,
}

/// What a task needs besides its context: the named contexts laid out and the registry CAs as
/// files, in the task's directory, which is removed when the task ends; the secrets in memory
/// only (no file of a secret outlives a worker killed in the middle of a task).
#[derive(Clone, Debug, Default)]
pub struct TaskFiles {
    /// Named contexts by name: the directories laid out here, and the sources workers
    /// resolve themselves (images, downloads, git).
    pub build_contexts: BTreeMap<String, ContextSource>,
    /// Secrets by id, as values.
    pub secrets: BTreeMap<String, ossb_worker::mounts::Secret>,
    /// Registry CA files by host.
    pub certificates: Vec<(String, PathBuf)>,
}

impl TaskFiles {
    /// Writes what `spec` carries under `dir` (an empty directory only this process reads),
    /// laying named contexts out from `store`.
    pub fn write(spec: &BuildSpec, store: &BlobStore, dir: &Path) -> Result<TaskFiles, String> {
        let mut files = TaskFiles::default();
        for (i, (name, entries)) in spec.build_contexts.iter().enumerate() {
            // Named by position: a context's name is the user's text, not a safe file name.
            let dest = dir.join(format!("context-{i}"));
            std::fs::create_dir_all(&dest)
                .map_err(|e| format!("creating {}: {e}", dest.display()))?;
            materialize(entries, store, &dest).map_err(|e| format!("named context {name}: {e}"))?;
            files
                .build_contexts
                .insert(name.clone(), ContextSource::Dir(dest));
        }
        for (name, value) in &spec.context_sources {
            // Another bake target's image: the task carries it (`TaskSpec::contexts`).
            if value.starts_with("target:") {
                continue;
            }
            match ContextSource::parse(value) {
                Ok(
                    source @ (ContextSource::Image(_)
                    | ContextSource::Url(_)
                    | ContextSource::Git(_)),
                ) => {
                    files.build_contexts.insert(name.clone(), source);
                }
                Ok(_) => {
                    return Err(format!(
                        "named context {name}: {value} cannot be resolved on a worker"
                    ))
                }
                Err(e) => return Err(format!("named context {name}: {e}")),
            }
        }
        for secret in &spec.secrets {
            files.secrets.insert(
                secret.id.clone(),
                Secret::Value(SecretBytes(secret.value.clone())),
            );
        }
        if !spec.registry_certificates.is_empty() {
            let private = dir.join("private");
            create_private_dir(&private)?;
            for (i, (host, pem)) in spec.registry_certificates.iter().enumerate() {
                let path = private.join(format!("ca-{i}.crt"));
                write_private(&path, pem.as_bytes())?;
                files.certificates.push((host.clone(), path));
            }
        }
        Ok(files)
    }
}

fn create_private_dir(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))
}

/// Writes a file only its owner can read (0600 from its creation, never wider).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    file.write_all(bytes)
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// The engine's request for a task: its stage of one platform of the build, starting from the
/// stages `built` (those of the task's needs whose layers this worker holds). No output: the
/// worker pushes by digest itself.
pub fn request_of(task: &TaskSpec, place: TaskPlace, built: Vec<BuiltStage>) -> BuildRequest {
    let spec = &task.spec;
    BuildRequest {
        context: place.context,
        dockerfile: spec.dockerfile.clone(),
        dockerfile_name: spec.dockerfile_name.clone(),
        tags: spec.tags.clone(),
        platforms: vec![task.platform.clone()],
        build_args: spec.build_args.iter().cloned().collect(),
        target: spec.target.clone(),
        labels: spec.labels.iter().cloned().collect(),
        outputs: Vec::new(),
        cache_dir: place.cache_dir,
        no_cache: spec.no_cache,
        cache_from: spec
            .cache_from
            .iter()
            .cloned()
            .map(CacheLocation::Registry)
            .collect(),
        // Checked by the coordinator before any task was made (session::check). With
        // mode=min only the task exporting the image stores steps: its own, those the image
        // holds (the stages it reads were other tasks', and may be only COPY --from sources).
        cache_to: spec
            .cache_to
            .as_deref()
            .and_then(|c| ossb_engine::remote_cache::parse_cache_export(c).ok())
            .filter(|c| task.export || c.mode == ossb_engine::remote_cache::CacheMode::Max),
        registry: registry_options(spec, &place.files.certificates),
        registry_config: registry_config(spec),
        // Checked by the coordinator before any task was made (build_outcome).
        compression: spec.compression.parse().unwrap_or_default(),
        // A task's layers go to other workers and the merged push through the peer cache.
        defer_compression: false,
        media_types: media_types(spec),
        // Checked by the coordinator before any task was made (session::check).
        export: export_of(spec),
        source_date_epoch: spec.source_date_epoch,
        sandbox_exe: place.sandbox_exe,
        isolation: place.isolation,
        secrets: place.files.secrets,
        // An agent is on the submitter's machine: spec_of refuses --ssh.
        ssh: BTreeMap::new(),
        build_contexts: place.files.build_contexts,
        stage: task.stage.map(|s| s as usize),
        built_stages: built,
        build_platform: Some(task.build_platform.clone()),
        // Checked by the coordinator before any task was made (stage_tasks).
        network: network_of(spec).unwrap_or_default(),
        extra_hosts: spec.extra_hosts.clone(),
        // Checked by the coordinator before any task was made (build_outcome).
        annotations: annotations_of(spec).unwrap_or_default(),
        // The coordinator writes the attestations of the build as a whole, from every task's
        // facts; the task that exports a platform's image scans it for its SBOM.
        attestations: ossb_engine::Attestations {
            provenance: None,
            sbom: task.export && spec.attest.sbom,
            ..Default::default()
        },
    }
}

/// A stage a task built, as it travels to the tasks reading it.
pub fn stage_to_wire(stage: &BuiltStage) -> Result<WireStage, String> {
    let json = |e: serde_json::Error| format!("encoding stage {}: {e}", stage.index);
    Ok(WireStage {
        index: stage.index as u32,
        key: *stage.key.as_bytes(),
        config_json: serde_json::to_string(&stage.config).map_err(json)?,
        layers_json: serde_json::to_string(&stage.layers).map_err(json)?,
    })
}

/// A stage another task built, for the engine.
pub fn stage_from_wire(stage: &WireStage) -> Result<BuiltStage, String> {
    let json =
        |e: serde_json::Error| format!("stage {} as another task built it: {e}", stage.index);
    Ok(BuiltStage {
        index: stage.index as usize,
        key: CacheKey::from_bytes(stage.key),
        config: serde_json::from_str(&stage.config_json).map_err(json)?,
        layers: serde_json::from_str(&stage.layers_json).map_err(json)?,
    })
}

/// The registry hosts of `spec` spoken to over HTTP, and the CA files (written from the
/// spec's certificates by [`TaskFiles::write`]) of those with their own CA.
pub fn registry_options(spec: &BuildSpec, certificates: &[(String, PathBuf)]) -> RegistryOptions {
    RegistryOptions {
        insecure: spec.insecure_registries.clone(),
        certificates: certificates.to_vec(),
    }
}

/// The mirrors of `spec`.
pub fn registry_config(spec: &BuildSpec) -> RegistryConfig {
    RegistryConfig {
        mirrors: spec
            .registry_mirrors
            .iter()
            .map(|(registry, mirror)| Mirror {
                registry: registry.clone(),
                mirror: mirror.clone(),
            })
            .collect(),
        ..Default::default()
    }
}

/// The media types of `spec`.
pub fn media_types(spec: &BuildSpec) -> MediaTypes {
    if spec.oci_media_types {
        MediaTypes::Oci
    } else {
        MediaTypes::Docker
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ossb_protocol::Platform;

    #[test]
    fn annotations_of_an_unknown_kind_are_refused() {
        let mut spec = BuildSpec {
            annotations: vec![("index".into(), "a".into(), "1".into())],
            ..Default::default()
        };
        assert_eq!(annotations_of(&spec).unwrap().index["a"], "1");
        spec.annotations
            .push(("manifest-list".into(), "b".into(), "2".into()));
        let e = annotations_of(&spec).unwrap_err();
        assert!(
            e.contains("\"manifest-list\" is not one of manifest"),
            "{e}"
        );
    }

    #[test]
    fn context_round_trips_by_content_and_honours_dockerignore() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        std::fs::create_dir_all(ctx.join("src/skip")).unwrap();
        std::fs::write(ctx.join("Dockerfile"), "FROM scratch\n").unwrap();
        std::fs::write(ctx.join(".dockerignore"), "src/skip\n*.log\n").unwrap();
        std::fs::write(ctx.join("src/a.txt"), "a").unwrap();
        std::fs::write(ctx.join("src/b.txt"), "a").unwrap();
        std::fs::write(ctx.join("src/skip/x"), "x").unwrap();
        std::fs::write(ctx.join("debug.log"), "x").unwrap();
        std::os::unix::fs::symlink("a.txt", ctx.join("src/link")).unwrap();
        // Special files are listed, never opened: a fifo would hang the scan.
        nix::unistd::mkfifo(
            &ctx.join("src/pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(ctx.join("src/sock")).unwrap();
        let req = BuildRequest {
            context: ctx.clone(),
            dockerfile: String::new(),
            dockerfile_name: ctx.join("Dockerfile").display().to_string(),
            ..request_of(
                &TaskSpec {
                    task: 1,
                    build: "b".into(),
                    platform: Platform::host(),
                    stage: None,
                    export: true,
                    build_platform: Platform::host(),
                    needs: Vec::new(),
                    spec: BuildSpec::default(),
                    contexts: Vec::new(),
                },
                TaskPlace {
                    context: ctx.clone(),
                    cache_dir: dir.path().join("cache"),
                    sandbox_exe: PathBuf::new(),
                    isolation: Isolation::Auto,
                    files: TaskFiles::default(),
                },
                Vec::new(),
            )
        };
        let (entries, files) = scan(&req).unwrap();
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                ".dockerignore",
                "Dockerfile",
                "src",
                "src/a.txt",
                "src/b.txt",
                "src/link",
                "src/pipe",
                "src/sock"
            ]
        );
        assert_eq!(entries[6].kind, EntryKind::Fifo);
        assert_eq!(
            entries[7].kind,
            EntryKind::File {
                digest: Digest::of(b""),
                size: 0
            }
        );
        // Two files with the same content are one blob; the socket is an empty one.
        assert_eq!(file_digests(&entries).len(), 4);
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        for path in files.values() {
            store.put(&std::fs::read(path).unwrap()).unwrap();
        }
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        materialize(&entries, &store, &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("src/link")).unwrap(), "a");
        assert!(!out.join("debug.log").exists());
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(out.join("src/pipe"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(std::fs::read(out.join("src/sock")).unwrap(), b"");

        let evil = [ContextEntry {
            path: "../x".into(),
            mode: 0o644,
            kind: EntryKind::Dir,
        }];
        assert!(materialize(&evil, &store, &out).is_err());
    }

    /// A submitter's entry list is not trusted: a symlink of the list must not carry a later
    /// file, directory or chmod outside the destination.
    #[test]
    fn materialize_never_writes_through_a_symlink_of_the_list() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let digest = store.put(b"pwned").unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = |path: &str| ContextEntry {
            path: path.into(),
            mode: 0o777,
            kind: EntryKind::Symlink(outside.to_string_lossy().into_owned()),
        };
        let file = |path: &str| ContextEntry {
            path: path.into(),
            mode: 0o644,
            kind: EntryKind::File { digest, size: 5 },
        };
        let cases = [
            vec![link("a"), file("a/f")],
            vec![link("a"), file("a")],
            vec![
                link("a"),
                ContextEntry {
                    path: "a".into(),
                    mode: 0o777,
                    kind: EntryKind::Dir,
                },
            ],
            vec![link("a"), file("a/sub/f")],
            vec![file("f"), file("f/g")],
            vec![file("f"), file("f")],
        ];
        for (n, entries) in cases.iter().enumerate() {
            let out = dir.path().join(format!("out-{n}"));
            std::fs::create_dir(&out).unwrap();
            assert!(materialize(entries, &store, &out).is_err(), "case {n}");
            assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "case {n}");
            let mode = std::fs::metadata(&outside).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o755, "case {n}");
        }
    }

    #[test]
    fn materialize_fills_read_only_directories_before_closing_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let digest = store.put(b"x").unwrap();
        let entries = [
            ContextEntry {
                path: "ro".into(),
                mode: 0o555,
                kind: EntryKind::Dir,
            },
            ContextEntry {
                path: "ro/f".into(),
                mode: 0o600,
                kind: EntryKind::File { digest, size: 1 },
            },
        ];
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        materialize(&entries, &store, &out).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.join("ro")), 0o555);
        assert_eq!(mode(&out.join("ro/f")), 0o600);
        assert_eq!(std::fs::read(out.join("ro/f")).unwrap(), b"x");
    }

    #[test]
    fn task_files_are_private_and_named_contexts_laid_out() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        let digest = store.put(b"named").unwrap();
        let spec = BuildSpec {
            build_contexts: vec![(
                "../evil name".into(),
                vec![ContextEntry {
                    path: "f.txt".into(),
                    mode: 0o644,
                    kind: EntryKind::File { digest, size: 5 },
                }],
            )],
            secrets: vec![ossb_protocol::cluster::Secret {
                id: "tok".into(),
                value: b"hunter2".to_vec(),
            }],
            registry_certificates: vec![("reg:5000".into(), "PEM".into())],
            ..Default::default()
        };
        let task = dir.path().join("task");
        std::fs::create_dir(&task).unwrap();
        let files = TaskFiles::write(&spec, &store, &task).unwrap();
        let named = &files.build_contexts["../evil name"];
        let ContextSource::Dir(named) = named else {
            panic!("a directory context is laid out as a directory: {named:?}");
        };
        assert!(named.starts_with(&task));
        assert_eq!(std::fs::read(named.join("f.txt")).unwrap(), b"named");
        assert_eq!(files.secrets["tok"].read().unwrap(), b"hunter2");
        assert_eq!(format!("{:?}", files.secrets["tok"]), "<secret, 7 bytes>");
        // No file holds the secret.
        let mut found = Vec::new();
        let mut todo = vec![task.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if std::fs::read(&p)
                    .unwrap()
                    .windows(7)
                    .any(|w| w == b"hunter2")
                {
                    found.push(p);
                }
            }
        }
        assert!(found.is_empty(), "{found:?}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.certificates[0].1), 0o600);
        assert_eq!(mode(files.certificates[0].1.parent().unwrap()), 0o700);
        assert_eq!(files.certificates[0].0, "reg:5000");
        assert_eq!(std::fs::read(&files.certificates[0].1).unwrap(), b"PEM");
        let opts = registry_options(&spec, &files.certificates);
        assert_eq!(opts.certificates, files.certificates);
    }
}
