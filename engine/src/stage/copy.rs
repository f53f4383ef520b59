//! COPY and ADD into a rootfs, a skeleton of the stage's layers, or an empty directory (a
//! linked COPY/ADD, `--link`).

use super::*;
use ossb_image::layer::ContentSources;

impl PlatformBuild<'_> {
    /// Runs a linked COPY/ADD (`--link`, [`ossb_dockerfile::linked`]) as BuildKit does: into an
    /// empty directory, never reading the stage's files, and the whole directory is the layer
    /// (the caller puts it on the stage). Missing parents of the destination are made as any
    /// copy makes them (0755, the `--chown` owner), so in the image they replace what the
    /// layers below have there, symlinks included; a destination without a trailing `/` is a
    /// file even where the layers below have a directory.
    pub(super) async fn execute_linked(
        &self,
        step: &Step,
        copy: &ossb_dockerfile::Copy,
        state: &StageState,
        done: &Done,
        id: usize,
        started: Instant,
    ) -> Result<CacheRecord, StepError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StepError::Io { path, source }
        };
        let dir = tempfile::Builder::new()
            .prefix("link-")
            .tempdir_in(&self.shared.work)
            .map_err(io(&self.shared.work))?;
        let root = dir.path().join("root");
        std::fs::create_dir(&root).map_err(io(&root))?;
        let is_add = matches!(step.instruction, Instruction::Add(_));
        // What an archive holds is not listed in advance: its changes come from snapshots.
        let before = match is_add && add_unpacks_archive(copy, &self.req().context) {
            true => Some(snapshot(&root, false).await?),
            false => None,
        };
        let cwd = state.cwd();
        let target = CopyTarget::Rootfs(root.clone());
        // The directory is the layer and goes with it: its files can be placeholders.
        let (written, contents) = self
            .copy_step(copy, is_add, &cwd, done, id, target, true)
            .await
            .map_err(|e| match e {
                CopyFailure::Failed(e) => e,
                // Only a skeleton needs the rootfs: not reached here.
                CopyFailure::NeedsRootfs(why) => SkeletonError::NeedsRootfs(why).into(),
            })?;
        let changes = match before {
            Some(before) => before.diff(&snapshot(&root, false).await?),
            None => written,
        };
        let (layer, diff_id) = match changes.is_empty() {
            true => (None, None),
            false => {
                let (layer, diff_id) = self.write_layer(&root, changes, contents).await?;
                (Some(layer), Some(diff_id))
            }
        };
        let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
        Ok(CacheRecord {
            layer,
            diff_id,
            duration_ms: started.elapsed().as_millis() as u64,
            created: crate::build::now(),
        })
    }

    /// COPY or ADD onto `target`. On a skeleton the files the copy looks at are made from the
    /// base's listings first (see [`ossb_worker::base`]); `NeedsRootfs` says the step must run
    /// on the unpacked rootfs instead.
    ///
    /// With `only_layer_reads` (nothing but the step's layer reads `target` afterwards), the
    /// files copied from the build context are placeholders whose bytes the layer reads from
    /// the context (the returned sources, see [`ossb_worker::fs::copy_into_referencing`]): a
    /// large COPY is read once instead of copied and read back. Other sources (stages,
    /// images, downloads, heredocs) are copied: they may be gone or changed by then.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn copy_step(
        &self,
        copy: &ossb_dockerfile::Copy,
        is_add: bool,
        cwd: &str,
        done: &Done,
        id: usize,
        target: CopyTarget,
        only_layer_reads: bool,
    ) -> Result<(Vec<Change>, ContentSources), CopyFailure> {
        let req = self.req();
        let from_context = copy.from.is_none();
        let source_root = match &copy.from {
            None => req.context.clone(),
            Some(Source::Stage(i)) => match done.get(i) {
                Some(s) => self.copy_source_root(s, copy, id).await?,
                None => {
                    return Err(StepError::StageNotBuilt {
                        from: "COPY --from",
                        stage: *i,
                    }
                    .into())
                }
            },
            Some(Source::Context(name)) => self.context_source(name)?.0,
            Some(Source::Image(image)) => match self.copy_images.get(image) {
                Some((root, _)) => root.clone(),
                None => {
                    return Err(StepError::ImageNotPulled {
                        from: "COPY --from",
                        image: image.clone(),
                    }
                    .into())
                }
            },
        };
        // --chown, else 0:0 from the context (and downloads, heredocs, named contexts),
        // else the owners the files have in the stage or image copied from.
        let from_build = match &copy.from {
            None => false,
            Some(Source::Stage(_) | Source::Image(_)) => true,
            Some(Source::Context(name)) => self.context_source(name)?.2,
        };
        let chown = copy.chown.clone();
        let default_owner = if from_build { None } else { Some((0, 0)) };
        let mode = match &copy.chmod {
            Some(m) => Some(Mode::parse(m).ok_or_else(|| StepError::Chmod(m.clone()))?),
            None => None,
        };
        let exclude = exclude_rules(copy)?;
        // Files that do not come from the source root: downloads and heredocs.
        let mut extra: Vec<(PathBuf, String)> = Vec::new();
        let mut local = Vec::new();
        for source in &copy.sources {
            if is_add && add::is_remote(source) {
                let fetched = add::fetch(
                    source,
                    copy.checksum.as_deref(),
                    copy.keep_git_dir.unwrap_or(false),
                    &self.shared.work,
                )
                .await?;
                extra.extend(fetched.names.into_iter().map(|n| (fetched.dir.clone(), n)));
            } else {
                local.push(source.clone());
            }
        }
        if !copy.heredocs.is_empty() {
            let dir = self.shared.work.join(format!("heredocs-{id}"));
            for doc in &copy.heredocs {
                write_inline_file(&dir, &doc.name, &doc.content, doc.mode)?;
                extra.push((dir.clone(), doc.name.clone()));
            }
        }
        let dest = absolute_in(cwd, &copy.dest);
        // Keep the trailing slash: it means "a directory"; several sources mean one too.
        let dest = if (copy.dest.ends_with('/') || local.len() + extra.len() > 1)
            && !dest.ends_with('/')
        {
            format!("{dest}/")
        } else {
            dest
        };
        let ignore = match &copy.from {
            None => self.shared.ignore.clone(),
            // A local directory context's own .dockerignore, as BuildKit's.
            Some(Source::Context(name)) => self.context_source(name)?.1,
            Some(_) => None,
        };
        let parents = copy.parents;
        let unpack = is_add && from_context && copy.unpack != Some(false);
        let by_reference = only_layer_reads && from_context;
        tokio::task::spawn_blocking(move || -> Result<_, CopyFailure> {
            let mut changes = Vec::new();
            let mut contents = ContentSources::new();
            let mut filter = match &ignore {
                Some(rules) => CopyFilter::dockerignore(rules),
                None => CopyFilter::none(),
            };
            if let Some(exclude) = &exclude {
                filter = filter.with_exclude(exclude);
            }
            let mut plain = Vec::new();
            let mut archives = Vec::new();
            for source in local {
                // A missing source is left to the copy, which names it.
                let matched = match unpack {
                    true => wfs::expand_source(&source_root, &source, filter).unwrap_or_default(),
                    false => Vec::new(),
                };
                let mut rest = Vec::new();
                for (rel, path) in &matched {
                    match (path.is_file(), add::archive_kind(path)) {
                        (true, Some(_)) => archives.push(path.clone()),
                        _ => rest.push(rel.clone()),
                    }
                }
                // Each archive a wildcard matches is unpacked, the other matches copied.
                if matched.len() == rest.len() {
                    plain.push(source);
                } else {
                    plain.extend(rest);
                }
            }
            let rootfs = match &target {
                CopyTarget::Rootfs(rootfs) => rootfs.clone(),
                CopyTarget::Skeleton(tree, dir) => {
                    if !archives.is_empty() {
                        return Err(CopyFailure::NeedsRootfs("ADD unpacks an archive".into()));
                    }
                    let mut skeleton = Skeleton::new(tree, dir);
                    let need = |e: SkeletonError| match e {
                        SkeletonError::NeedsRootfs(m) => CopyFailure::NeedsRootfs(m),
                        SkeletonError::Fs(e) => e.into(),
                    };
                    if chown.is_some() {
                        skeleton.prepare_accounts().map_err(need)?;
                    }
                    if !plain.is_empty() {
                        skeleton
                            .prepare_copy(&source_root, &plain, &dest, parents, filter)
                            .map_err(need)?;
                    }
                    for (dir, name) in &extra {
                        skeleton
                            .prepare_copy(
                                dir,
                                std::slice::from_ref(name),
                                &dest,
                                parents,
                                CopyFilter::none(),
                            )
                            .map_err(need)?;
                    }
                    skeleton.materialize().map_err(need)?;
                    dir.clone()
                }
            };
            let owner = match &chown {
                Some(spec) => Some(wfs::lookup_owner(&rootfs, spec)?),
                None => default_owner,
            };
            let opts = CopyOptions {
                owner,
                mode,
                parents,
            };
            for path in archives {
                add::extract(&path, &rootfs, &dest)?;
            }
            if !plain.is_empty() && by_reference {
                let (copied, sources) = wfs::copy_into_referencing(
                    &source_root,
                    &plain,
                    &rootfs,
                    &dest,
                    opts.clone(),
                    filter,
                )?;
                changes.extend(copied);
                contents.extend(sources);
            } else if !plain.is_empty() {
                changes.extend(wfs::copy_into(
                    &source_root,
                    &plain,
                    &rootfs,
                    &dest,
                    opts.clone(),
                    filter,
                )?);
            }
            for (dir, name) in extra {
                // A later source written over a placeholder replaces its bytes too.
                let copied = wfs::copy_into(
                    &dir,
                    &[name],
                    &rootfs,
                    &dest,
                    opts.clone(),
                    CopyFilter::none(),
                )?;
                for change in &copied {
                    contents.remove(&change.path);
                }
                changes.extend(copied);
            }
            Ok((changes, contents))
        })
        .await?
    }
}
