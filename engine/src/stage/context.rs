//! Named contexts (`--build-context`) resolved for a platform: an image (pulled, read from an
//! OCI layout, or an earlier bake target's from the store) gives a config and layers; a
//! directory (local, an unpacked download, a git checkout) gives files, and as a `FROM` base
//! one layer of those files (owned by root, as the context's files are when copied), as
//! BuildKit's local, HTTP and git sources make a stage's root.

use super::*;
use crate::named_context::ContextSource;

/// A named context resolved for one platform.
pub(crate) enum ResolvedContext {
    /// Files: `COPY --from` reads `root` through `ignore` (a local directory's own
    /// `.dockerignore`).
    Files {
        root: PathBuf,
        ignore: Option<Dockerignore>,
    },
    /// An image; `root` is its filesystem once unpacked (for `COPY --from` and mounts).
    Image {
        pulled: Box<PulledImage>,
        root: Option<PathBuf>,
    },
}

/// A resolution failure: a user's error (exit 2) naming the context and what to do.
fn refused(name: &str, source: &ContextSource, detail: impl std::fmt::Display) -> BuildError {
    BuildError::Usage(format!(
        "--build-context {name}={}: {detail}",
        ossb_protocol::clip(&source.provenance_value(name), 300)
    ))
}

impl PlatformBuild<'_> {
    /// Resolves the named context `name` for `platform` (once per build and platform).
    pub(super) async fn resolve_context(
        &mut self,
        name: &str,
        platform: &Platform,
    ) -> Result<(), BuildError> {
        let slot = (name.to_string(), platform.clone());
        if self.contexts.contains_key(&slot) {
            return Ok(());
        }
        let req = self.shared.req;
        let source = req
            .build_contexts
            .get(name)
            .ok_or_else(|| BuildError::Local(format!("named context {name} is not defined")))?;
        let resolved = match source {
            ContextSource::Dir(dir) => {
                let ignore =
                    match std::fs::read_to_string(dir.join(".dockerignore")) {
                        Ok(text) => Some(Dockerignore::parse(&text).map_err(|e| {
                            refused(name, source, format!("its .dockerignore: {e}"))
                        })?),
                        Err(_) => None,
                    };
                ResolvedContext::Files {
                    root: dir.clone(),
                    ignore,
                }
            }
            ContextSource::Url(url) | ContextSource::Git(url) => {
                let (id, t) = self.shared.start(format!(
                    "[context {name}] {}",
                    ossb_protocol::clip(url, 200)
                ));
                let result = self.fetch_files(name, url).await;
                let root = self
                    .shared
                    .finish(id, t, result)
                    .map_err(|e| refused(name, source, e))?;
                ResolvedContext::Files { root, ignore: None }
            }
            ContextSource::Image(reference) => {
                let pulled = self.pull_read(reference, platform).await.map_err(|e| {
                    refused(
                        name,
                        source,
                        format!("{e} (check the reference, that the registry is reachable and that you are logged in)"),
                    )
                })?;
                ResolvedContext::Image {
                    pulled: Box::new(pulled),
                    root: None,
                }
            }
            ContextSource::OciLayout { path, tag, digest } => {
                let pulled = self
                    .load_layout(name, path, tag.as_deref(), digest.as_ref(), platform)
                    .await
                    .map_err(|e| refused(name, source, e))?;
                ResolvedContext::Image {
                    pulled: Box::new(pulled),
                    root: None,
                }
            }
            ContextSource::Built { target, image } => {
                let store = self.shared.store.clone();
                let (digest, p) = (image.digest, platform.clone());
                let pulled = tokio::task::spawn_blocking(move || {
                    ossb_image::layout::load(ossb_image::layout::Blobs::Store, &digest, &p, &store)
                })
                .await
                .map_err(local("loading a target's image"))?
                .map_err(|e| refused(name, source, format!("the image of target {target}: {e}")))?;
                // The target's own plain tars are layers whose compression its build deferred
                // (it exports nothing): the image reading them compresses them as it asks, as
                // BuildKit's exporter does a linked target's layers.
                let mut pulled = pulled;
                for layer in &mut pulled.manifest.layers {
                    if layer::Compression::of_media_type(&layer.media_type)
                        == Some(layer::Compression::None)
                    {
                        layer
                            .annotations
                            .get_or_insert_with(Default::default)
                            .insert(super::image::DEFERRED.into(), "true".into());
                    }
                }
                ResolvedContext::Image {
                    pulled: Box::new(pulled),
                    root: None,
                }
            }
        };
        self.contexts.insert(slot, std::sync::Arc::new(resolved));
        Ok(())
    }

    /// Downloads (and unpacks) a URL or clones a git repository, with ADD's code; returns the
    /// directory that is the context.
    async fn fetch_files(&self, name: &str, url: &str) -> Result<PathBuf, StepError> {
        let fetched = add::fetch(url, None, false, &self.shared.work).await?;
        self.shared.facts.material(&self.platform, fetched.material);
        if add::is_git(url) {
            return Ok(fetched.dir);
        }
        let file = fetched
            .dir
            .join(fetched.names.first().map(String::as_str).unwrap_or(""));
        let dir = self.shared.work.join(format!(
            "context-{}",
            blake3::hash(format!("{name}\0{url}").as_bytes()).to_hex()
        ));
        if dir.exists() {
            return Ok(dir);
        }
        let staging = self.shared.work.join(format!(
            "context-{}.tmp",
            blake3::hash(url.as_bytes()).to_hex()
        ));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|source| StepError::Io {
            path: staging.clone(),
            source,
        })?;
        let (file2, staging2) = (file.clone(), staging.clone());
        tokio::task::spawn_blocking(move || -> Result<(), StepError> {
            match add::archive_kind(&file2) {
                // Unpacked as ADD unpacks: nothing lands outside the directory.
                Some(_) => add::extract(&file2, &staging2, "/")?,
                // Not an archive: the file itself, named as BuildKit's HTTP context names it.
                None => {
                    std::fs::copy(&file2, staging2.join("context")).map_err(|source| {
                        StepError::Io {
                            path: file2.clone(),
                            source,
                        }
                    })?;
                }
            }
            Ok(())
        })
        .await??;
        std::fs::rename(&staging, &dir).map_err(|source| StepError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Reads the image of an OCI layout for `platform` into the store, blobs verified.
    async fn load_layout(
        &self,
        name: &str,
        path: &Path,
        tag: Option<&str>,
        digest: Option<&Digest>,
        platform: &Platform,
    ) -> Result<PulledImage, ossb_image::layout::LayoutError> {
        let (id, t) = self.shared.start(format!(
            "[context {name}] load {} from an OCI layout",
            path.display()
        ));
        let (store, path2, tag, digest, p) = (
            self.shared.store.clone(),
            path.to_path_buf(),
            tag.map(str::to_string),
            digest.copied(),
            platform.clone(),
        );
        let result = tokio::task::spawn_blocking(move || {
            if !path2.join("index.json").is_file() {
                return Err(ossb_image::layout::LayoutError::NotALayout(path2));
            }
            let top = match (digest, tag) {
                (Some(d), _) => d,
                (None, Some(t)) => ossb_image::layout::resolve_tag(&path2, &t)?,
                (None, None) => ossb_image::layout::resolve_tag(&path2, "latest")?,
            };
            let pulled = ossb_image::layout::load(
                ossb_image::layout::Blobs::Layout(&path2),
                &top,
                &p,
                &store,
            )?;
            Ok((top, pulled))
        })
        .await
        .unwrap_or_else(|e| {
            Err(ossb_image::layout::LayoutError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })
        });
        let (top, pulled) = self.shared.finish(id, t, result)?;
        // As BuildKit: an `oci` package URL of the context's name at the digest asked for,
        // with the manifest's digest.
        if let Ok(reference) = parse_reference(&format!("{name}@{top}")) {
            let purl = ossb_attest::image_purl(&reference, Some(platform)).replacen(
                "pkg:docker/",
                "pkg:oci/",
                1,
            );
            self.shared.facts.material(
                &self.platform,
                ossb_attest::Material::sha256(purl, &pulled.manifest_digest),
            );
        }
        Ok(pulled)
    }

    /// Unpacks the image contexts `COPY --from` or `RUN --mount from=` read, for this
    /// platform (the image's filesystem, as for an image named there).
    pub(super) async fn unpack_context(&mut self, name: &str) -> Result<(), BuildError> {
        let platform = self.platform.clone();
        self.resolve_context(name, &platform).await?;
        let slot = (name.to_string(), platform);
        let Some(resolved) = self.contexts.get(&slot).cloned() else {
            return Ok(());
        };
        let ResolvedContext::Image { pulled, root: None } = resolved.as_ref() else {
            return Ok(());
        };
        let root = self
            .unpack_to_read(pulled, format!("[context {name}] unpacking to read from"))
            .await?;
        let unpacked = ResolvedContext::Image {
            pulled: pulled.clone(),
            root: Some(root),
        };
        self.contexts.insert(slot, std::sync::Arc::new(unpacked));
        Ok(())
    }

    /// The resolved context `name` for `platform`.
    pub(super) fn context(
        &self,
        name: &str,
        platform: &Platform,
    ) -> Result<&ResolvedContext, StepError> {
        self.contexts
            .get(&(name.to_string(), platform.clone()))
            .map(|c| c.as_ref())
            .ok_or_else(|| StepError::ImageNotPulled {
                from: "named context",
                image: name.to_string(),
            })
    }

    /// Where `COPY --from=name` reads, the filter of its files, and whether they keep their
    /// owners (an image's do; a directory's become root's).
    pub(super) fn context_source(
        &self,
        name: &str,
    ) -> Result<(PathBuf, Option<Dockerignore>, bool), StepError> {
        match self.context(name, &self.platform)? {
            ResolvedContext::Files { root, ignore } => Ok((root.clone(), ignore.clone(), false)),
            ResolvedContext::Image {
                root: Some(root), ..
            } => Ok((root.clone(), None, true)),
            ResolvedContext::Image { root: None, .. } => Err(StepError::ImageNotPulled {
                from: "COPY --from",
                image: name.to_string(),
            }),
        }
    }

    /// What a stage starting from the context `name` starts with: config, layers, the key of
    /// its root, and the step that made its layer (for `--cache-to mode=min`).
    pub(super) async fn context_base(
        &self,
        name: &str,
        platform: &Platform,
        settings: &str,
    ) -> Result<BaseState, BuildError> {
        match self
            .context(name, platform)
            .map_err(|e| BuildError::Local(e.to_string()))?
        {
            ResolvedContext::Image { pulled, .. } => Ok((
                pulled.config.clone(),
                pulled.manifest.layers.clone(),
                CacheKey::root(
                    Some(&pulled.manifest_digest),
                    &pulled.config.platform(),
                    settings,
                ),
                Vec::new(),
            )),
            ResolvedContext::Files { root, ignore } => {
                self.files_base(name, root, ignore.as_ref(), platform, settings)
                    .await
            }
        }
    }

    /// A stage that starts from files: one layer holding them, keyed by their content and
    /// made through the step cache (a fully cached build writes nothing).
    async fn files_base(
        &self,
        name: &str,
        root: &Path,
        ignore: Option<&Dockerignore>,
        platform: &Platform,
        settings: &str,
    ) -> Result<BaseState, BuildError> {
        let mut config = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
            ..Default::default()
        };
        config.config.set_env("PATH", ossb_dockerfile::DEFAULT_PATH);
        let filter = match ignore {
            Some(rules) => CopyFilter::dockerignore(rules),
            None => CopyFilter::none(),
        };
        let sum = sources_checksum_cached(root, &[".".into()], filter, &self.shared.checksums)
            .map_err(|e| BuildError::Local(format!("--build-context {name}: {e}")))?;
        let key = CacheKey::root(None, platform, settings)
            .child(format!("context:{name}").as_bytes(), &[&sum[..]]);
        let record = match step_cache::get_or_claim(self.shared, platform, &key).await {
            step_cache::Lookup::Hit(record) => *record,
            step_cache::Lookup::Miss(claim) => {
                let (id, t) = self
                    .shared
                    .start(format!("[context {name}] files as the stage's root"));
                let result = self.files_layer(root, ignore).await;
                let record = self
                    .shared
                    .finish(id, t, result)
                    .map_err(|e| BuildError::Local(format!("--build-context {name}: {e}")))?;
                step_cache::put(self.shared, &key, &record, claim).await;
                record
            }
        };
        step_cache::export(self.shared, platform, &key, &record);
        let mut layers = Vec::new();
        if let (Some(layer), Some(diff_id)) = (&record.layer, record.diff_id) {
            config.rootfs.diff_ids.push(diff_id);
            layers.push(layer.clone());
        }
        Ok((config, layers, key, vec![(key, record)]))
    }

    /// Copies the files into an empty directory as root's and writes their layer.
    async fn files_layer(
        &self,
        root: &Path,
        ignore: Option<&Dockerignore>,
    ) -> Result<CacheRecord, StepError> {
        let started = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("context-root-")
            .tempdir_in(&self.shared.work)
            .map_err(|source| StepError::Io {
                path: self.shared.work.clone(),
                source,
            })?;
        let (root2, dir2, ignore) = (
            root.to_path_buf(),
            dir.path().to_path_buf(),
            ignore.cloned(),
        );
        let changes = tokio::task::spawn_blocking(move || {
            let filter = match &ignore {
                Some(rules) => CopyFilter::dockerignore(rules),
                None => CopyFilter::none(),
            };
            let opts = CopyOptions {
                owner: Some((0, 0)),
                mode: None,
                parents: false,
            };
            wfs::copy_into(&root2, &[".".into()], &dir2, "/", opts, filter)
        })
        .await??;
        let (layer, diff_id) = match changes.is_empty() {
            true => (None, None),
            false => {
                let (l, d) = self
                    .write_layer(dir.path(), changes, Default::default())
                    .await?;
                (Some(l), Some(d))
            }
        };
        Ok(CacheRecord {
            layer,
            diff_id,
            duration_ms: started.elapsed().as_millis() as u64,
            created: crate::build::now(),
        })
    }
}

/// What a stage starts from: config, layers, root key, the chain of steps so far.
pub(super) type BaseState = (
    ImageConfig,
    Vec<Descriptor>,
    CacheKey,
    Vec<(CacheKey, CacheRecord)>,
);
