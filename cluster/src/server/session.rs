//! A build session: a submission is checked, its context received, its tasks made and run,
//! and its outcome recorded and sent back.

use super::*;

/// Serves one submitted build on the client's stream until it ends.
pub(super) async fn run_build(
    state: &Arc<State>,
    spec: BuildSpec,
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<(), ClusterError> {
    let build = format!("b{}", state.next_id());
    let record = Record {
        id: build.clone(),
        status: Status::Queued,
        platforms: spec.platforms.iter().map(|p| p.to_string()).collect(),
        tags: spec.tags.clone(),
        submitted: ossb_engine::build::now(),
        digest: None,
        image: None,
        error: None,
        exit_code: None,
        bake: None,
    };
    save_record(state, &record, None);
    let mut gauge = Gauge::new(state);
    let outcome = match admit(state, &spec, tx, rx).await {
        Ok((df, context)) => {
            // Kept until the build ends, so that a restarted coordinator runs it again.
            let running = Record {
                status: Status::Running,
                ..record.clone()
            };
            save_record(state, &running, Some(&spec));
            match send(
                tx,
                ClusterMessage::Accepted {
                    build: build.clone(),
                },
            )
            .await
            {
                Ok(()) => run_tasks(state, &build, &spec, &df, context, &mut gauge, Some(tx)).await,
                Err(e) => Err(failure(format!("receiving the build: {e}"), 1)),
            }
        }
        Err(f) => Err(f),
    };
    drop(gauge);
    record_outcome(state, record, &outcome);
    send(
        tx,
        ClusterMessage::Finished(BuildOutcome { result: outcome }),
    )
    .await?;
    let _ = tx.finish();
    Ok(())
}

/// Runs again what a previous run of the coordinator had accepted and not finished: a build,
/// or the targets of a bake as one graph, so that they still share stages and read each other
/// through `target:`. Their client, if still there, asks how each ended
/// ([`ClusterMessage::Status`]).
pub(super) async fn resume(state: Arc<State>, targets: Vec<(Record, BuildSpec)>) {
    await_workers(&state).await;
    let bake = targets.iter().any(|(r, _)| r.bake.is_some());
    let names: HashSet<&str> = targets
        .iter()
        .filter_map(|(r, _)| r.bake.as_ref().map(|b| b.target.as_str()))
        .collect();
    let mut gauges: Vec<Gauge> = targets.iter().map(|_| Gauge::new(&state)).collect();
    let checked: Result<Vec<_>, Failure> = targets
        .iter()
        .map(|(_, spec)| {
            // A target the previous run never wrote down (one with secrets) cannot be read.
            let linked = spec.context_sources.iter().filter_map(|(_, v)| v.strip_prefix("target:"));
            if let Some(gone) = linked.into_iter().find(|t| !names.contains(t)) {
                return Err(failure(
                    format!("target {gone} of the bake could not be resumed after the coordinator restarted (a target with secrets is never written to disk); submit the bake again"),
                    1,
                ));
            }
            let df = check(spec)?;
            let context: Vec<Digest> = all_file_digests(spec).iter().map(|(d, _)| *d).collect();
            if let Some(d) = context.iter().find(|d| !state.store.contains(d)) {
                let what = if bake { "bake" } else { "build" };
                return Err(failure(
                    format!("the context file {d} is no longer in the coordinator's state dir; submit the {what} again"),
                    1,
                ));
            }
            Ok((df, context))
        })
        .collect();
    let ends = match checked {
        Ok(checked) => {
            let mut context: Vec<Digest> = checked
                .iter()
                .flat_map(|(_, c)| c.iter().copied())
                .collect();
            context.sort();
            context.dedup();
            let graph: Vec<Target> = targets
                .iter()
                .zip(&checked)
                .map(|((record, spec), (df, _))| Target {
                    name: record.bake.as_ref().map_or("", |b| b.target.as_str()),
                    build: &record.id,
                    spec,
                    df,
                })
                .collect();
            run_graph(&state, &graph, context, &mut gauges, None, bake).await
        }
        Err(f) => targets.iter().map(|_| Err(f.clone())).collect(),
    };
    drop(gauges);
    for ((record, _), end) in targets.into_iter().zip(&ends) {
        record_outcome(&state, record, end);
    }
}

/// Waits, after a restart, until a worker is back (they reconnect within a heartbeat or two;
/// the build platforms are chosen among them), at most [`crate::NO_WORKER_GRACE`].
async fn await_workers(state: &State) {
    let deadline = Instant::now() + crate::NO_WORKER_GRACE;
    while state.lock().workers.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Saves a build record; a failure to is logged (the build goes on; only a restart would
/// not know it).
pub(super) fn save_record(state: &State, record: &Record, submission: Option<&BuildSpec>) {
    if let Err(e) = state.records.save(record, submission) {
        tracing::warn!(build = %record.id, error = %e, "build record not saved");
    }
}

/// Counts and records how a build ended.
pub(super) fn record_outcome(
    state: &State,
    mut record: Record,
    outcome: &Result<BuiltImage, Failure>,
) {
    {
        let mut inner = state.lock();
        match outcome {
            Ok(_) => inner.counters.succeeded += 1,
            Err(_) => inner.counters.failed += 1,
        }
    }
    match outcome {
        Ok(image) => {
            record.status = Status::Succeeded;
            record.digest = serde_json::from_str::<Descriptor>(&image.descriptor_json)
                .ok()
                .map(|d| d.digest.to_string());
            record.image = Some(image.clone());
            tracing::info!(build = %record.id, digest = ?record.digest, "build succeeded");
        }
        Err(f) => {
            record.status = Status::Failed;
            record.error = Some(f.message.clone());
            record.exit_code = Some(f.exit_code);
            tracing::info!(build = %record.id, error = %f.message, "build failed");
        }
    }
    save_record(state, &record, None);
}

/// The blobs one submission waits for, registered as wanted until dropped.
pub(super) struct Wanted<'a> {
    state: &'a State,
    digests: Vec<Digest>,
}

impl<'a> Wanted<'a> {
    fn new(state: &'a State, blobs: &[(Digest, u64)]) -> Wanted<'a> {
        let mut inner = state.lock();
        for (d, size) in blobs {
            inner.wanted.insert(*d, *size);
            *inner.wanted_by.entry(*d).or_default() += 1;
        }
        Wanted {
            state,
            digests: blobs.iter().map(|(d, _)| *d).collect(),
        }
    }
}

impl Drop for Wanted<'_> {
    fn drop(&mut self) {
        let mut inner = self.state.lock();
        for d in &self.digests {
            let left = inner.wanted_by.get_mut(d).map(|n| {
                *n -= 1;
                *n
            });
            if left == Some(0) {
                inner.wanted_by.remove(d);
                inner.wanted.remove(d);
            }
        }
    }
}

/// Counts a build as queued, then as running, until dropped.
pub(super) struct Gauge<'a> {
    state: &'a State,
    running: bool,
}

impl<'a> Gauge<'a> {
    pub(super) fn new(state: &'a State) -> Gauge<'a> {
        state.lock().counters.queued += 1;
        Gauge {
            state,
            running: false,
        }
    }

    pub(super) fn start_running(&mut self) {
        let mut inner = self.state.lock();
        inner.counters.queued = inner.counters.queued.saturating_sub(1);
        inner.counters.running += 1;
        self.running = true;
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        let mut inner = self.state.lock();
        let c = &mut inner.counters;
        if self.running {
            c.running = c.running.saturating_sub(1);
        } else {
            c.queued = c.queued.saturating_sub(1);
        }
    }
}

pub(super) fn failure(message: impl Into<String>, exit_code: i32) -> Failure {
    Failure {
        message: message.into(),
        exit_code,
    }
}

/// What a submission must be before anything is received: exit code 2 for what the user
/// must fix. Returns the parsed Dockerfile.
pub(super) fn check(spec: &BuildSpec) -> Result<ossb_dockerfile::Dockerfile, Failure> {
    let caches = spec
        .cache_from
        .iter()
        .map(|c| ossb_engine::remote_cache::parse_cache(c))
        .chain(spec.cache_to.iter().filter_map(|c| {
            ossb_engine::remote_cache::parse_cache_export(c)
                .map(|to| to.location)
                .transpose()
        }))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| failure(e.to_string(), 2))?;
    ossb_engine::build::check_references(&spec.tags, &caches)
        .map_err(|e| failure(e.to_string(), 2))?;
    let df = ossb_dockerfile::parse(&spec.dockerfile, &spec.dockerfile_name)
        .map_err(|e| failure(e.to_string(), 2))?;
    if spec.platforms.is_empty() {
        return Err(failure("no platform to build for", 2));
    }
    let compression = spec
        .compression
        .parse::<ossb_image::layer::Compression>()
        .map_err(|e| failure(e, 2))?;
    if let Some(level) = spec.export.compression_level {
        ossb_engine::build::check_level(compression, level)
            .map_err(|e| failure(e.to_string(), 2))?;
    }
    if spec.export.push_by_digest {
        if let Some(tagged) = spec
            .tags
            .iter()
            .find(|t| !ossb_engine::build::is_name_only(t))
        {
            return Err(failure(
                format!(
                    "push-by-digest=true: can't push tagged ref {} by digest: name the repository only",
                    ossb_dockerfile::clip(tagged, 200)
                ),
                2,
            ));
        }
    }
    crate::context::annotations_of(spec).map_err(|e| failure(e, 2))?;
    for (name, entries) in std::iter::once(("the context", &spec.context))
        .chain(spec.build_contexts.iter().map(|(n, e)| (n.as_str(), e)))
    {
        ossb_protocol::cluster::check_entries(entries)
            .map_err(|e| failure(format!("{}: {e}", ossb_dockerfile::clip(name, 100)), 2))?;
    }
    Ok(df)
}

/// Checks a submission and receives the context files the coordinator lacks. Returns the
/// Dockerfile and the digests of every context file.
async fn admit(
    state: &Arc<State>,
    spec: &BuildSpec,
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<(ossb_dockerfile::Dockerfile, Vec<Digest>), Failure> {
    let df = check(spec)?;
    let context = receive(state, &all_file_digests(spec), tx, rx).await?;
    Ok((df, context))
}

/// Asks the client for the files of `files` the coordinator lacks and waits until it has
/// uploaded them. Returns the digests of every file.
pub(super) async fn receive(
    state: &Arc<State>,
    files: &[(Digest, u64)],
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<Vec<Digest>, Failure> {
    let context: Vec<Digest> = files.iter().map(|(d, _)| *d).collect();
    let missing: Vec<(Digest, u64)> = files
        .iter()
        .filter(|(d, _)| !state.store.contains(d))
        .copied()
        .collect();
    let net = |e: ClusterError| failure(format!("receiving the build: {e}"), 1);
    let _wanted = Wanted::new(state, &missing);
    send(
        tx,
        ClusterMessage::NeedBlobs {
            digests: missing.iter().map(|(d, _)| *d).collect(),
        },
    )
    .await
    .map_err(net)?;
    match recv(rx, "the client").await.map_err(net)? {
        ClusterMessage::UploadsDone => {}
        other => {
            return Err(failure(
                format!("expected UploadsDone, got {}", other.kind()),
                1,
            ))
        }
    }
    if let Some(d) = context.iter().find(|d| !state.store.contains(d)) {
        return Err(failure(format!("the context file {d} was not uploaded"), 1));
    }
    Ok(context)
}

/// Runs every platform's tasks of an accepted build, then merges and pushes: the graph of one
/// target ([`run_graph`]). Events go to the client when there is one (a resumed build has
/// none).
async fn run_tasks(
    state: &Arc<State>,
    build: &str,
    spec: &BuildSpec,
    df: &ossb_dockerfile::Dockerfile,
    context: Vec<Digest>,
    gauge: &mut Gauge<'_>,
    client: Option<&mut SendStream>,
) -> Result<BuiltImage, Failure> {
    let target = Target {
        name: "",
        build,
        spec,
        df,
    };
    let mut ends = run_graph(
        state,
        &[target],
        context,
        std::slice::from_mut(gauge),
        client,
        false,
    )
    .await;
    ends.pop()
        .unwrap_or_else(|| Err(failure("the build has no outcome", 1)))
}

/// Gives a task's event a build-wide vertex id, and names the platform in vertex names of a
/// multi-platform build.
pub(super) fn renumber(
    event: BuildEvent,
    task: u64,
    ids: &mut HashMap<(u64, u64), u64>,
    next: &mut u64,
    platform: Option<&Platform>,
) -> BuildEvent {
    let mut map = |id: u64| {
        *ids.entry((task, id)).or_insert_with(|| {
            *next += 1;
            *next
        })
    };
    match event {
        BuildEvent::Started { id, name } => {
            let name = match platform {
                Some(p) if name.starts_with('[') && !name.starts_with(&format!("[{p}")) => {
                    format!("[{p} {}", &name[1..])
                }
                _ => name,
            };
            BuildEvent::Started { id: map(id), name }
        }
        BuildEvent::Output {
            id,
            elapsed_ms,
            line,
        } => BuildEvent::Output {
            id: map(id),
            elapsed_ms,
            line,
        },
        BuildEvent::Done { id, elapsed_ms } => BuildEvent::Done {
            id: map(id),
            elapsed_ms,
        },
        BuildEvent::Failed {
            id,
            elapsed_ms,
            message,
        } => BuildEvent::Failed {
            id: map(id),
            elapsed_ms,
            message,
        },
        BuildEvent::Cached { id } => BuildEvent::Cached { id: map(id) },
        BuildEvent::CacheMiss { id, reason } => BuildEvent::CacheMiss {
            id: map(id),
            reason,
        },
        BuildEvent::Transfer { id, received, sent } => BuildEvent::Transfer {
            id: map(id),
            received,
            sent,
        },
        other => other,
    }
}
