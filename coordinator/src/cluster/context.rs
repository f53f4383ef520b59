//! The build context by content, and builds as they travel.
//!
//! The client lists its context ([`scan`]): directories, symlinks, and files named by their
//! sha256, leaving out what `.dockerignore` excludes. Only files the coordinator lacks are
//! uploaded; a worker fetches only files it lacks and lays the context out again
//! ([`materialize`]) before running the engine on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ossb_dockerfile::dockerignore::{self, Dockerignore};
use ossb_image::layer::Compression;
use ossb_image::oci::MediaTypes;
use ossb_image::registry::{Mirror, RegistryConfig, RegistryOptions};
use ossb_image::store::BlobStore;
use ossb_protocol::cluster::{BuildSpec, ContextEntry, EntryKind};
use ossb_protocol::{Digest, Platform};
use ossb_worker::sandbox::Isolation;

use crate::build::{BuildError, BuildRequest, Output};

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

fn walk(
    dir: &Path,
    rel: &str,
    ignore: Option<&Dockerignore>,
    entries: &mut Vec<ContextEntry>,
    files: &mut BTreeMap<Digest, PathBuf>,
) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
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
        } else if meta.is_file() {
            let mut file =
                std::fs::File::open(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            let mut hasher = ossb_protocol::Sha256Writer::new(std::io::sink());
            std::io::copy(&mut file, &mut hasher)
                .map_err(|e| format!("{}: {e}", full.display()))?;
            let (digest, size, _) = hasher.finish();
            files.insert(digest, full);
            entries.push(ContextEntry {
                path,
                mode,
                kind: EntryKind::File { digest, size },
            });
        }
        // Sockets, fifos and devices are not part of a build context.
    }
    Ok(())
}

/// The file digests of a context.
pub fn file_digests(entries: &[ContextEntry]) -> Vec<Digest> {
    let mut out: Vec<Digest> = entries
        .iter()
        .filter_map(|e| match e.kind {
            EntryKind::File { digest, .. } => Some(digest),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Lays the context out in `dest` (an empty directory) from the files in `store`. Paths that
/// would leave `dest` are refused.
pub fn materialize(entries: &[ContextEntry], store: &BlobStore, dest: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for e in entries {
        let rel = Path::new(&e.path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(format!(
                "context path {:?} is not a plain relative path",
                e.path
            ));
        }
        let path = dest.join(rel);
        let err = |what: &str, x: std::io::Error| format!("{what} {}: {x}", path.display());
        match &e.kind {
            EntryKind::Dir => {
                std::fs::create_dir_all(&path).map_err(|x| err("creating", x))?;
            }
            EntryKind::File { digest, .. } => {
                std::fs::copy(store.path(digest), &path).map_err(|x| err("writing", x))?;
            }
            EntryKind::Symlink(target) => {
                std::os::unix::fs::symlink(target, &path).map_err(|x| err("linking", x))?;
                continue;
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(e.mode))
            .map_err(|x| err("chmod", x))?;
    }
    // Directories last written above may have lost write permission for their children;
    // modes were applied in order (parents first), which is what a context needs.
    Ok(())
}

/// The spec of `req` to send to the coordinator, with the scanned context.
pub fn spec_of(req: &BuildRequest, context: Vec<ContextEntry>) -> Result<BuildSpec, BuildError> {
    if !req.secrets.is_empty() {
        return Err(BuildError::Usage(
            "--secret is not sent to a build cluster yet; build with `ossb build` instead".into(),
        ));
    }
    if !req.build_contexts.is_empty() {
        return Err(BuildError::Usage(
            "--build-context is not sent to a build cluster yet; build with `ossb build` instead"
                .into(),
        ));
    }
    if !req.registry.certificates.is_empty() {
        return Err(BuildError::Usage("--registry-certificate is not sent to a build cluster: the cluster's workers trust their own CAs".into()));
    }
    Ok(BuildSpec {
        dockerfile: req.dockerfile.clone(),
        dockerfile_name: req.dockerfile_name.clone(),
        tags: req.tags.clone(),
        platforms: req.platforms.clone(),
        build_args: req.build_args.clone().into_iter().collect(),
        target: req.target.clone(),
        labels: req.labels.clone().into_iter().collect(),
        push: req.outputs.contains(&Output::Registry),
        download: req.outputs.iter().any(|o| *o != Output::Registry),
        no_cache: req.no_cache,
        cache_from: req.cache_from.clone(),
        cache_to: req.cache_to.clone(),
        insecure_registries: req.registry.insecure.clone(),
        registry_mirrors: req
            .registry_config
            .mirrors
            .iter()
            .map(|m| (m.registry.clone(), m.mirror.clone()))
            .collect(),
        compression: match req.compression {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::None => "uncompressed",
        }
        .into(),
        oci_media_types: req.media_types == MediaTypes::Oci,
        source_date_epoch: req.source_date_epoch,
        context,
    })
}

/// Where a worker runs a task.
pub struct TaskPlace {
    /// The context laid out.
    pub context: PathBuf,
    /// The worker's cache directory.
    pub cache_dir: PathBuf,
    /// The ossb binary.
    pub sandbox_exe: PathBuf,
    /// How RUN steps are isolated.
    pub isolation: Isolation,
}

/// The engine's request for one platform of `spec`, with no output: the worker pushes by
/// digest itself.
pub fn request_of(spec: &BuildSpec, platform: &Platform, place: TaskPlace) -> BuildRequest {
    BuildRequest {
        context: place.context,
        dockerfile: spec.dockerfile.clone(),
        dockerfile_name: spec.dockerfile_name.clone(),
        tags: spec.tags.clone(),
        platforms: vec![platform.clone()],
        build_args: spec.build_args.iter().cloned().collect(),
        target: spec.target.clone(),
        labels: spec.labels.iter().cloned().collect(),
        outputs: Vec::new(),
        cache_dir: place.cache_dir,
        no_cache: spec.no_cache,
        cache_from: spec.cache_from.clone(),
        cache_to: spec.cache_to.clone(),
        registry: registry_options(spec),
        registry_config: registry_config(spec),
        compression: match spec.compression.as_str() {
            "zstd" => Compression::Zstd,
            "uncompressed" => Compression::None,
            _ => Compression::Gzip,
        },
        media_types: media_types(spec),
        source_date_epoch: spec.source_date_epoch,
        sandbox_exe: place.sandbox_exe,
        isolation: place.isolation,
        secrets: BTreeMap::new(),
        build_contexts: BTreeMap::new(),
    }
}

/// The registry hosts of `spec` spoken to over HTTP.
pub fn registry_options(spec: &BuildSpec) -> RegistryOptions {
    RegistryOptions {
        insecure: spec.insecure_registries.clone(),
        certificates: Vec::new(),
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
        let req = BuildRequest {
            context: ctx.clone(),
            dockerfile: String::new(),
            dockerfile_name: ctx.join("Dockerfile").display().to_string(),
            ..request_of(
                &BuildSpec::default(),
                &Platform::host(),
                TaskPlace {
                    context: ctx.clone(),
                    cache_dir: dir.path().join("cache"),
                    sandbox_exe: PathBuf::new(),
                    isolation: Isolation::Auto,
                },
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
                "src/link"
            ]
        );
        // Two files with the same content are one blob.
        assert_eq!(file_digests(&entries).len(), 3);
        let store = BlobStore::open(dir.path().join("store")).unwrap();
        for path in files.values() {
            store.put(&std::fs::read(path).unwrap()).unwrap();
        }
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        materialize(&entries, &store, &out).unwrap();
        assert_eq!(std::fs::read_to_string(out.join("src/link")).unwrap(), "a");
        assert!(!out.join("debug.log").exists());

        let evil = [ContextEntry {
            path: "../x".into(),
            mode: 0o644,
            kind: EntryKind::Dir,
        }];
        assert!(materialize(&evil, &store, &out).is_err());
    }
}
