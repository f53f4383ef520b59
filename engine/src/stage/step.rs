//! One step: its cache key (the instruction's canonical bytes and what it reads), the cache
//! chain, and the record it adds to the stage. A linked COPY/ADD (`--link`) is kept under a
//! key without its parent ([`StepKeys`]) and runs into an empty directory, never on the stage.

use super::miss::InputName;
use super::*;
use crate::cache::StepKeys;
use crate::cache_miss::{StagePosition, Why};

impl PlatformBuild<'_> {
    /// Runs one step. Returns whether it came from the cache.
    pub(super) async fn run_step(
        &self,
        (step, n): (&Step, usize),
        state: &mut StageState,
        done: &Done,
        vertex: &mut Vertex,
        position: &mut StagePosition,
    ) -> Result<bool, StepError> {
        let changes_fs = apply_metadata(
            &step.instruction,
            &mut state.config.config,
            &mut state.cmd_set,
        );
        if let Instruction::Maintainer(author) = &step.instruction {
            state.config.author = Some(author.clone());
        }
        let inputs = self.step_inputs(step, done).await?;
        let secrets = self.secret_presence(step);
        let absent: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|(_, _, in_key)| *in_key)
            .map(|(id, _, _)| [b"secret absent\0".as_slice(), id.as_bytes()].concat())
            .collect();
        let input_refs: Vec<&[u8]> = inputs
            .iter()
            .map(|(_, bytes)| bytes.as_slice())
            .chain(absent.iter().map(Vec::as_slice))
            .collect();
        let parent = state.key;
        let link_root = CacheKey::link_root(&self.platform, &layer_settings(self.req()));
        let keys = StepKeys::of(&parent, &link_root, &step.instruction, &input_refs);
        // The key the step's record is kept under; a linked layer's has no parent.
        let key = keys.record;
        state.key = keys.chain;
        let (explained_parent, chain) = match keys.linked {
            true => (&link_root, None),
            false => (&parent, state.why.as_ref()),
        };
        let explained = self.explain(
            step,
            n,
            explained_parent,
            &key,
            &inputs,
            &secrets,
            chain,
            position,
        );
        // After a linked layer the chain differs where its parent did, else where the layer did.
        let mut chain_why = match keys.linked {
            true => state.why.clone().or_else(|| explained.chain.clone()),
            false => explained.chain.clone(),
        };
        let mut cached = false;
        let mut empty_layer = true;
        // When the step's layer was made (a cache hit keeps its first build's time).
        let mut layer_created = None;
        if changes_fs {
            let record = match step_cache::get_or_claim(self.shared, &self.platform, &key).await {
                step_cache::Lookup::Hit(record) => {
                    let record = *record;
                    cached = true;
                    self.keep_in_step(state, &record).await?;
                    record
                }
                step_cache::Lookup::Miss(claim) => {
                    let id = vertex.start(self.shared);
                    let reason = explained.why.to_string();
                    self.shared.progress.event(Event::CacheMiss { id, reason });
                    // What runs after it inherits no older reason: its parent ran.
                    chain_why = Some(Why::ParentRan);
                    let started = vertex.started;
                    let record = if let Some(copy) = ossb_dockerfile::linked(&step.instruction) {
                        let record = self
                            .execute_linked(step, copy, state, done, id, started)
                            .await?;
                        // Made beside the rootfs: it goes on top, as a cache hit's.
                        self.keep_in_step(state, &record).await?;
                        record
                    } else {
                        match self
                            .execute_on_skeleton(step, state, done, id, started)
                            .await?
                        {
                            Some(record) => record,
                            None => {
                                self.materialize(state).await?;
                                self.execute(step, state, done, id, started).await?
                            }
                        }
                    };
                    step_cache::put(self.shared, &key, &record, claim).await;
                    record
                }
            };
            step_cache::export(self.shared, &self.platform, &key, &record);
            state.chain.push((key, record.clone()));
            if let (Some(layer), Some(diff_id)) = (record.layer, record.diff_id) {
                state.config.rootfs.diff_ids.push(diff_id);
                state.layers.push(layer);
                empty_layer = false;
                layer_created = Some(record.created);
            }
            {
                let mut stats = self.shared.stats.lock().unwrap_or_else(|e| e.into_inner());
                if cached {
                    stats.cached += 1;
                } else {
                    stats.run += 1;
                }
            }
            let ran = (!cached).then(|| vertex.started.elapsed().as_millis() as u64);
            self.shared.step_finished(&step.created_by, ran);
        }
        state.why = chain_why;
        position.keep(n, explained.record);
        if !step.created_by.is_empty() {
            // As BuildKit: a layer's entry has its layer's time, so a fully cached build gives
            // the same image; one without a layer gets its time when the image is written
            // (`image::history_times`). SOURCE_DATE_EPOCH makes them all the epoch.
            let created = match (self.req().source_date_epoch, layer_created) {
                (Some(_), _) => Some(self.shared.created.clone()),
                (None, Some(t)) => ossb_protocol::rfc3339(t),
                (None, None) => None,
            };
            state.config.history.push(History {
                created,
                created_by: Some(step.created_by.clone()),
                comment: Some("buildkit.dockerfile.v0".into()),
                empty_layer: empty_layer.then_some(true),
                ..Default::default()
            });
        }
        Ok(cached)
    }

    /// Puts a step's layer that did not come from running on the unpacked rootfs (a cache
    /// hit, a linked layer), keeping the rootfs in step with the layers.
    async fn keep_in_step(
        &self,
        state: &StageState,
        record: &CacheRecord,
    ) -> Result<(), StepError> {
        if let (true, Some(layer)) = (state.materialized, &record.layer) {
            unpack(
                &self.shared.store,
                std::slice::from_ref(layer),
                &state.rootfs,
            )
            .await?;
        }
        Ok(())
    }

    /// What a step reads besides its instruction, for its cache key: the checksums of COPY's
    /// context files, the key of a stage it copies from.
    pub(super) async fn step_inputs(
        &self,
        step: &Step,
        done: &Done,
    ) -> Result<Vec<(InputName, Vec<u8>)>, StepError> {
        if let Instruction::Run(run) = &step.instruction {
            return self.bind_mount_inputs(run, done);
        }
        let (Instruction::Copy(copy) | Instruction::Add(copy)) = &step.instruction else {
            return Ok(Vec::new());
        };
        let is_add = matches!(step.instruction, Instruction::Add(_));
        let mut inputs = Vec::new();
        let (remote, local): (Vec<&String>, Vec<&String>) = copy
            .sources
            .iter()
            .partition(|s| is_add && add::is_remote(s));
        for source in remote {
            // Fetched now (once per build) and keyed by content or commit; the step reuses it.
            let fetched = add::fetch(
                source,
                copy.checksum.as_deref(),
                copy.keep_git_dir.unwrap_or(false),
                &self.shared.work,
            )
            .await?;
            self.shared.facts.material(&self.platform, fetched.material);
            let name = InputName::Other(format!("download {source}"), None);
            inputs.push((name, fetched.key));
        }
        let local: Vec<String> = local.into_iter().cloned().collect();
        if copy.from.is_some() || !local.is_empty() {
            let mut filter = match &self.shared.ignore {
                Some(rules) => CopyFilter::dockerignore(rules),
                None => CopyFilter::none(),
            };
            let exclude = exclude_rules(copy)?;
            if let Some(ex) = &exclude {
                filter = filter.with_exclude(ex);
            }
            let bytes =
                self.source_input(copy.from.as_ref(), &local, filter, done, "COPY --from")?;
            let name = self.input_name(
                copy.from.as_ref(),
                || InputName::Context {
                    name: "context files".into(),
                    sources: local.clone(),
                    ignore: true,
                    exclude,
                },
                done,
            );
            inputs.push((name, bytes));
        }
        Ok(inputs)
    }

    /// What a step reads from `from` (the paths `sources` in it), for its cache key: the
    /// checksum of those files in the build context (through `context_filter`) or a named
    /// context, the key of a stage, the manifest digest of an image.
    pub(super) fn source_input(
        &self,
        from: Option<&Source>,
        sources: &[String],
        context_filter: CopyFilter<'_>,
        done: &Done,
        what: &'static str,
    ) -> Result<Vec<u8>, StepError> {
        let checksum = |dir: &Path, filter| {
            sources_checksum_cached(dir, sources, filter, &self.shared.checksums)
                .map(|sum| sum.to_vec())
                .map_err(StepError::Fs)
        };
        match from {
            None => checksum(&self.req().context, context_filter),
            Some(Source::Stage(i)) => match done.get(i) {
                Some(s) => Ok(s.key.as_bytes().to_vec()),
                None => Err(StepError::StageNotBuilt {
                    from: what,
                    stage: *i,
                }),
            },
            Some(Source::Context(name)) => match self.context(name, &self.platform)? {
                context::ResolvedContext::Files { root, ignore } => {
                    let filter = match ignore {
                        Some(rules) => CopyFilter::dockerignore(rules),
                        None => CopyFilter::none(),
                    };
                    // The COPY's --exclude rules change the key too.
                    let filter = match context_filter.exclude() {
                        Some(ex) => filter.with_exclude(ex),
                        None => filter,
                    };
                    checksum(root, filter)
                }
                context::ResolvedContext::Image { pulled, .. } => {
                    Ok(pulled.manifest_digest.as_bytes().to_vec())
                }
            },
            Some(Source::Image(image)) => match self.copy_images.get(image) {
                Some((_, digest)) => Ok(digest.as_bytes().to_vec()),
                None => Err(StepError::ImageNotPulled {
                    from: what,
                    image: image.clone(),
                }),
            },
        }
    }

    /// What a RUN's bind mounts read, for its cache key: the checksum of a context source,
    /// the key of a stage. Secrets and cache mounts stay out of the key, as in BuildKit.
    pub(super) fn bind_mount_inputs(
        &self,
        run: &ossb_dockerfile::Run,
        done: &Done,
    ) -> Result<Vec<(InputName, Vec<u8>)>, StepError> {
        let mut inputs = Vec::new();
        for mount in run
            .mounts
            .iter()
            .filter(|m| m.kind == ossb_dockerfile::MountType::Bind)
        {
            let source = mount.source.clone().unwrap_or_else(|| ".".into());
            let bytes = self.source_input(
                mount.from.as_ref(),
                std::slice::from_ref(&source),
                CopyFilter::none(),
                done,
                "RUN --mount from",
            )?;
            let name = self.input_name(
                mount.from.as_ref(),
                || InputName::Context {
                    name: format!("context files of the mount at {}", mount.target),
                    sources: vec![source.clone()],
                    ignore: false,
                    exclude: None,
                },
                done,
            );
            inputs.push((name, bytes));
        }
        Ok(inputs)
    }
}
