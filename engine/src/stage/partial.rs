//! A COPY --from of a few files of a stage that is not unpacked here reads only the layers
//! that hold them (see [`ossb_image::layer::locate`]): the final stage of a cluster build
//! copying a binary out of a stage another worker built brings and unpacks one small layer,
//! not the whole toolchain image.

use std::collections::HashSet;

use ossb_image::layer::Found;

use super::*;

impl PlatformBuild<'_> {
    /// The directory a COPY reads `sources` of the finished stage `state` from: the stage's
    /// rootfs when it is unpacked (or must be), else a directory holding just those files,
    /// taken from the topmost layers that decide them. `id` names that directory.
    pub(super) async fn copy_source_root(
        &self,
        state: &StageState,
        copy: &ossb_dockerfile::Copy,
        id: usize,
    ) -> Result<PathBuf, StepError> {
        if state.materialized || state.unpacked_for_readers.initialized() {
            return self.source_rootfs(state).await;
        }
        let paths = match plain_files(copy) {
            Some(paths) => paths,
            None => return self.source_rootfs(state).await,
        };
        let dir = self.shared.work.join(format!("copy-source-{id}"));
        let shown: Vec<String> = paths.iter().map(|p| format!("/{}", p.display())).collect();
        let (progress, t) = self.shared.start(format!(
            "reading {} from the stage's layers that hold them",
            shown.join(", ")
        ));
        let read = self.read_files(&state.layers, paths, &dir).await;
        let partial = self.shared.finish(progress, t, read)?;
        if partial {
            Ok(dir)
        } else {
            let _ = std::fs::remove_dir_all(&dir);
            self.source_rootfs(state).await
        }
    }
}

/// The sources of `copy` as clean paths in the stage, when each names one path plainly (no
/// wildcard, escape, `..` or trailing `/`, not the root) and nothing asks for more than the
/// files themselves (`--parents` keeps their directories, `--exclude` walks a tree).
fn plain_files(copy: &ossb_dockerfile::Copy) -> Option<Vec<PathBuf>> {
    if copy.parents || !copy.exclude.is_empty() || !copy.heredocs.is_empty() {
        return None;
    }
    copy.sources
        .iter()
        .map(|source| {
            let plain = !source.contains(['*', '?', '[', '\\'])
                && !source.ends_with('/')
                && !source.split('/').any(|c| c == "..");
            let clean: Vec<&str> = source
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .collect();
            (plain && !clean.is_empty()).then(|| PathBuf::from(clean.join("/")))
        })
        .collect()
}

impl PlatformBuild<'_> {
    /// Writes into `dir` the files `paths` as the topmost layers of `layers` that decide them
    /// hold them, bringing each layer it reads (top first); `false` (and `dir` left for the
    /// caller to remove) when some path is not a regular file that one layer decides, so only
    /// the whole rootfs answers.
    async fn read_files(
        &self,
        layers: &[Descriptor],
        paths: Vec<PathBuf>,
        dir: &Path,
    ) -> Result<bool, StepError> {
        let mut left = paths;
        let mut decided: Vec<(Descriptor, HashSet<PathBuf>)> = Vec::new();
        for layer in layers.iter().rev() {
            if left.is_empty() {
                break;
            }
            self.shared.bring(std::slice::from_ref(layer)).await?;
            let (store, digest, asked) = (self.shared.store.clone(), layer.digest, left.clone());
            let found = tokio::task::spawn_blocking(move || {
                let blob = std::io::BufReader::new(store.open_blob(&digest)?);
                layer::locate(blob, &asked)
                    .map_err(|source| StepError::UnpackLayer { digest, source })
            })
            .await??;
            if found.contains(&Found::Other) {
                return Ok(false);
            }
            let here: HashSet<PathBuf> = left
                .iter()
                .zip(&found)
                .filter(|(_, f)| **f == Found::File)
                .map(|(p, _)| p.clone())
                .collect();
            if !here.is_empty() {
                left.retain(|p| !here.contains(p));
                decided.push((layer.clone(), here));
            }
        }
        if !left.is_empty() {
            // Not in the image: the whole rootfs gives the COPY its usual error.
            return Ok(false);
        }
        let (store, dir) = (self.shared.store.clone(), dir.to_path_buf());
        tokio::task::spawn_blocking(move || write_files(&store, decided, &dir)).await??;
        Ok(true)
    }
}

/// Writes the files each layer decides into a fresh `dir`, bottom layer first as the image
/// stacks them (directories and symlinks of those layers come along; the COPY of a file never
/// reads them).
fn write_files(
    store: &BlobStore,
    decided: Vec<(Descriptor, HashSet<PathBuf>)>,
    dir: &Path,
) -> Result<(), StepError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|source| StepError::Rootfs {
            doing: "clearing a COPY source directory",
            source,
        })?;
    }
    std::fs::create_dir_all(dir).map_err(|source| StepError::Rootfs {
        doing: "creating a COPY source directory",
        source,
    })?;
    for (layer, wanted) in decided.into_iter().rev() {
        let wanted = std::sync::Arc::new(wanted);
        let options = ApplyOptions {
            only: Some(std::sync::Arc::new(move |path: &Path, _, _| {
                wanted.contains(path)
            })),
            ..Default::default()
        };
        let blob = std::io::BufReader::new(store.open_blob(&layer.digest)?);
        let report =
            layer::apply_layer(blob, dir, &options).map_err(|source| StepError::UnpackLayer {
                digest: layer.digest,
                source,
            })?;
        for line in report.warnings() {
            tracing::warn!("layer {}: {line}", layer.digest);
        }
    }
    Ok(())
}
