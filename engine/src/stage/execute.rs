//! Running a step that changes files: RUN in the sandbox, the change it made (overlay, a
//! snapshot diff, or what COPY wrote), the layer.

use super::*;
use ossb_image::layer::ContentSources;

impl PlatformBuild<'_> {
    /// Executes a step that changes files and records its layer. The change list comes from
    /// what the step touched, never from a walk of the whole rootfs, except where that cannot
    /// be known (see [`ChangeSource`]); every source gives the same layer bytes for the same
    /// change.
    pub(super) async fn execute(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &Done,
        id: usize,
        started: Instant,
    ) -> Result<CacheRecord, StepError> {
        let is_run = matches!(step.instruction, Instruction::Run(_));
        let source = self.change_source(step, &state.rootfs).await;
        let upper = match source {
            ChangeSource::Overlay => ossb_worker::overlay::Upper::create(&state.rootfs)
                .map_err(|e| tracing::debug!("no overlay for this step: {e}"))
                .ok(),
            _ => None,
        };
        tracing::debug!(
            step = %step.title(),
            source = ?source,
            overlay = upper.is_some(),
            "finding the step's changes"
        );
        let before = match (source, &upper) {
            (ChangeSource::Recorded, _) | (_, Some(_)) => None,
            _ => Some(snapshot(&state.rootfs, is_run).await?),
        };
        let mount_points = match &step.instruction {
            Instruction::Run(_) => {
                sandbox::prepare_mount_points(&state.rootfs).map_err(StepError::MountPoints)?
            }
            _ => Vec::new(),
        };
        let overlay = upper.as_ref().map(|u| u.dirs());
        let result = self
            .apply_fs_step(step, state, done, id, started, overlay)
            .await;
        sandbox::remove_mount_points(&mount_points);
        let written = result?;
        let changes = match (before, upper) {
            (Some(before), _) => before.diff(&snapshot(&state.rootfs, is_run).await?),
            (None, Some(upper)) => {
                let rootfs = state.rootfs.clone();
                tokio::task::spawn_blocking(move || {
                    let created: Vec<PathBuf> = written.into_iter().map(|c| c.path).collect();
                    upper.merge(&rootfs, &mount_point_paths(), &created)
                })
                .await?
                .map_err(StepError::OverlayMerge)?
            }
            (None, None) => written,
        };
        let (layer, diff_id) = if changes.is_empty() {
            (None, None)
        } else {
            let (layer, diff_id) = self
                .write_layer(&state.rootfs, changes, ContentSources::new())
                .await?;
            (Some(layer), Some(diff_id))
        };
        Ok(CacheRecord {
            layer,
            diff_id,
            duration_ms: started.elapsed().as_millis() as u64,
            created: crate::build::now(),
        })
    }

    /// Runs a COPY or ADD of a stage that is not unpacked (every earlier step came from the
    /// cache) on a skeleton of its layers instead of unpacking them, so that it costs what it
    /// copies. `None` when the step needs the real rootfs (see [`ossb_worker::base`]).
    pub(super) async fn execute_on_skeleton(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &Done,
        id: usize,
        started: Instant,
    ) -> Result<Option<CacheRecord>, StepError> {
        let (Instruction::Copy(copy) | Instruction::Add(copy)) = &step.instruction else {
            return Ok(None);
        };
        if state.materialized
            || !state.skeleton_ok
            || std::env::var_os("OSSB_COPY_ON_ROOTFS").is_some()
            || self.change_source(step, &state.rootfs).await != ChangeSource::Recorded
        {
            return Ok(None);
        }
        self.shared.bring(&state.layers).await?;
        let store = self.shared.store.clone();
        let layers = state.layers.clone();
        let tree = tokio::task::spawn_blocking(move || -> Result<BaseTree, StepError> {
            let mut listings = Vec::with_capacity(layers.len());
            for layer in &layers {
                listings.push(store.layer_listing(&layer.digest)?);
            }
            Ok(BaseTree::from_layers(&listings)?)
        })
        .await?;
        let tree = match tree {
            Ok(tree) => std::sync::Arc::new(tree),
            Err(e) => {
                tracing::debug!(step = %step.title(), "no skeleton: {e}");
                return Ok(None);
            }
        };
        let dir = self.shared.work.join(format!("skeleton-{id}"));
        std::fs::create_dir_all(&dir).map_err(|source| StepError::Io {
            path: dir.clone(),
            source,
        })?;
        let cwd = state.cwd();
        let is_add = matches!(step.instruction, Instruction::Add(_));
        let target = CopyTarget::Skeleton(tree.clone(), dir.clone());
        // The skeleton is removed once the layer is written: only the layer reads it.
        let result = self
            .copy_step(copy, is_add, &cwd, done, id, target, true)
            .await;
        let outcome = match result {
            Ok((changes, _)) if changes.is_empty() => Ok(Some((None, None))),
            Ok((changes, contents)) => self
                .write_layer(&dir, changes, contents)
                .await
                .map(|(layer, diff_id)| Some((Some(layer), Some(diff_id)))),
            Err(CopyFailure::Failed(m)) => Err(m),
            Err(CopyFailure::NeedsRootfs(why)) => {
                tracing::debug!(step = %step.title(), "no skeleton: {why}");
                Ok(None)
            }
        };
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        tracing::debug!(
            step = %step.title(),
            paths = tree.len(),
            skeleton = matches!(outcome, Ok(Some(_))),
            "copy on a skeleton of the layers"
        );
        Ok(outcome?.map(|(layer, diff_id)| CacheRecord {
            layer,
            diff_id,
            duration_ms: started.elapsed().as_millis() as u64,
            created: crate::build::now(),
        }))
    }

    /// Where a step's change list comes from (see [`ChangeSource`]).
    pub(super) async fn change_source(&self, step: &Step, rootfs: &Path) -> ChangeSource {
        if ossb_worker::overlay::fallback_forced() {
            return ChangeSource::Snapshots;
        }
        match &step.instruction {
            Instruction::Run(_) => {
                let exe = self.req().sandbox_exe.clone();
                let dir = rootfs.parent().unwrap_or(Path::new("/")).to_path_buf();
                let usable = tokio::task::spawn_blocking(move || {
                    ossb_worker::overlay::supported(&exe, &dir)
                })
                .await
                .unwrap_or(false);
                if usable {
                    ChangeSource::Overlay
                } else {
                    ChangeSource::Snapshots
                }
            }
            Instruction::Add(copy) if add_unpacks_archive(copy, &self.req().context) => {
                ChangeSource::Snapshots
            }
            _ => ChangeSource::Recorded,
        }
    }

    /// Applies a file-changing step; returns the changes the engine made itself (COPY, ADD,
    /// WORKDIR, and RUN's working directory), which are complete for all but RUN and archive
    /// ADD. A RUN runs on `overlay` when given.
    pub(super) async fn apply_fs_step(
        &self,
        step: &Step,
        state: &mut StageState,
        done: &Done,
        id: usize,
        started: Instant,
        overlay: Option<&ossb_worker::overlay::OverlayDirs>,
    ) -> Result<Vec<Change>, StepError> {
        let req = self.req();
        let cwd = state.cwd();
        let cfg = &mut state.config.config;
        let user = cfg
            .user
            .clone()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "0".into());
        match &step.instruction {
            Instruction::Workdir(dir) => {
                let owner = wfs::lookup_owner(&state.rootfs, &user)?;
                Ok(wfs::make_workdir(&state.rootfs, dir, owner)?)
            }
            Instruction::Run(run) => {
                // The stages this RUN mounts, unpacked now that it runs.
                let mut stages: HashMap<usize, PathBuf> = HashMap::new();
                for m in &run.mounts {
                    if let Some(Source::Stage(i)) = m.from {
                        if let (Some(s), false) = (done.get(&i), stages.contains_key(&i)) {
                            stages.insert(i, self.source_rootfs(s).await?);
                        }
                    }
                }
                let mut images: HashMap<String, PathBuf> = self
                    .copy_images
                    .iter()
                    .map(|(name, (root, _))| (name.clone(), root.clone()))
                    .collect();
                for ((name, platform), resolved) in &self.contexts {
                    let root = match resolved.as_ref() {
                        context::ResolvedContext::Files { root, .. } => root,
                        context::ResolvedContext::Image {
                            root: Some(root), ..
                        } => root,
                        context::ResolvedContext::Image { root: None, .. } => continue,
                    };
                    if *platform == self.platform {
                        images.insert(name.clone(), root.clone());
                    }
                }
                let ctx = RunContext {
                    images: &images,
                    rootfs: &state.rootfs,
                    config: cfg,
                    default_user: &user,
                    default_cwd: &cwd,
                    sandbox_exe: &req.sandbox_exe,
                    context: &req.context,
                    stages: &stages,
                    cache_dir: &req.cache_dir,
                    isolation: req.isolation,
                    secrets: &req.secrets,
                    ssh: &req.ssh,
                    overlay,
                };
                let ran = run::execute(&ctx, run, |line| {
                    self.shared.progress.event(Event::Output {
                        id,
                        elapsed: started.elapsed(),
                        line: line.to_string(),
                    })
                })
                .await;
                self.shared.say_adaptation();
                ran
            }
            Instruction::Copy(copy) | Instruction::Add(copy) => {
                let is_add = matches!(step.instruction, Instruction::Add(_));
                let target = CopyTarget::Rootfs(state.rootfs.clone());
                // Later steps read the rootfs: the files are copied.
                self.copy_step(copy, is_add, &cwd, done, id, target, false)
                    .await
                    .map(|(changes, _)| changes)
                    .map_err(|e| match e {
                        CopyFailure::Failed(e) => e,
                        // Only a skeleton needs the rootfs: not reached here.
                        CopyFailure::NeedsRootfs(why) => SkeletonError::NeedsRootfs(why).into(),
                    })
            }
            _ => Ok(Vec::new()),
        }
    }
}
