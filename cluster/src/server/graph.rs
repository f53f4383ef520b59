//! Builds as one graph of stage tasks: a build's targets (one, or every target of a bake)
//! planned together, a stage two targets plan alike made one task that each is handed, each
//! target merged and pushed as soon as its own tasks are done.
//!
//! Alike means the same [`stage_key`]: the stage's planned steps (every build argument already
//! expanded into them), what it starts from and reads (the keys of those stages in turn), its
//! platforms and everything of the build that reaches a step, so that the two would get the
//! same step cache keys. What only the image gets (tags, labels, annotations, where it goes)
//! is left out; so are the build arguments, which reach the stage only through its plan.

use ossb_dockerfile::{Base, BuildPlan, Instruction, Source};

use super::*;

/// The identity of every stage of `plan` for a graph (see the module documentation), by
/// position in the plan. `platform`: the image's; a stage's own FROM --platform is part of it.
pub(super) fn stage_keys(
    plan: &BuildPlan,
    spec: &BuildSpec,
    platform: &Platform,
    build_platform: &Platform,
) -> Result<Vec<Digest>, Failure> {
    // What reaches a step, or is not known to leave it alone.
    let inputs = BuildSpec {
        tags: Vec::new(),
        push: false,
        download: false,
        build_args: Vec::new(),
        target: None,
        labels: Vec::new(),
        annotations: Vec::new(),
        attest: Default::default(),
        // Steps are keyed by which secrets exist, not by their bytes.
        secrets: spec
            .secrets
            .iter()
            .map(|s| ossb_protocol::cluster::Secret {
                id: s.id.clone(),
                value: Vec::new(),
            })
            .collect(),
        ..spec.clone()
    };
    let inputs = postcard::to_allocvec(&inputs)
        .map_err(|e| failure(format!("encoding the build: {e}"), 1))?;
    let mut keys: Vec<Option<Digest>> = vec![None; plan.stages.len()];
    for position in 0..plan.stages.len() {
        key_of(
            plan,
            position,
            &inputs,
            platform,
            build_platform,
            &mut keys,
            0,
        )?;
    }
    Ok(keys.into_iter().flatten().collect())
}

fn key_of(
    plan: &BuildPlan,
    position: usize,
    inputs: &[u8],
    platform: &Platform,
    build_platform: &Platform,
    keys: &mut Vec<Option<Digest>>,
    depth: usize,
) -> Result<Digest, Failure> {
    if let Some(k) = keys[position] {
        return Ok(k);
    }
    if depth > plan.stages.len() {
        return Err(failure(
            "the stages of the plan depend on each other in a cycle",
            2,
        ));
    }
    let stage = &plan.stages[position];
    let dep = |p: usize, keys: &mut Vec<Option<Digest>>| {
        key_of(plan, p, inputs, platform, build_platform, keys, depth + 1)
    };
    let base = match &stage.base {
        Base::Scratch => (0u8, String::new(), None),
        Base::Image(reference) => (1, reference.clone(), None),
        Base::Stage(p) => (2, String::new(), Some(dep(*p, keys)?)),
        Base::Context(name) => (3, name.clone(), None),
    };
    let mut steps = Vec::with_capacity(stage.steps.len());
    for step in &stage.steps {
        // The stages a step reads are written without their position in its bytes: their
        // keys, in the order the step names them, stand for them.
        let mut reads = Vec::new();
        match &step.instruction {
            Instruction::Copy(c) | Instruction::Add(c) => {
                if let Some(Source::Stage(p)) = c.from {
                    reads.push(dep(p, keys)?);
                }
            }
            Instruction::Run(r) => {
                for m in &r.mounts {
                    if let Some(Source::Stage(p)) = m.from {
                        reads.push(dep(p, keys)?);
                    }
                }
            }
            _ => {}
        }
        steps.push((
            ossb_dockerfile::instruction_key_bytes(&step.instruction),
            step.created_by.clone(),
            (
                step.location.start_line as u64,
                step.location.end_line as u64,
            ),
            reads,
        ));
    }
    let runs_on = stage.platform.as_ref().unwrap_or(platform);
    let bytes = postcard::to_allocvec(&(
        "ossb-stage-v1",
        inputs,
        (platform, runs_on, build_platform),
        stage.index as u64,
        base,
        steps,
    ))
    .map_err(|e| failure(format!("encoding stage {}: {e}", stage.index), 1))?;
    let key = Digest::of(&bytes);
    keys[position] = Some(key);
    Ok(key)
}

/// The bake targets whose images target `t`'s named contexts are (`target:NAME` in its
/// `context_sources`), as (context name, target position). A name no target has, or a cycle
/// of such contexts, is the user's error.
fn links_of(targets: &[Target<'_>]) -> Result<Vec<Vec<(String, usize)>>, Failure> {
    let mut links = Vec::with_capacity(targets.len());
    for target in targets {
        let mut own = Vec::new();
        for (context, value) in &target.spec.context_sources {
            let Some(name) = value.strip_prefix("target:") else {
                continue;
            };
            let x = targets
                .iter()
                .position(|t| t.name == name && !name.is_empty())
                .ok_or_else(|| {
                    failure(
                        format!(
                            "context {context} = \"target:{}\": no such target in the bake",
                            ossb_dockerfile::clip(name, 100)
                        ),
                        2,
                    )
                })?;
            own.push((context.clone(), x));
        }
        links.push(own);
    }
    Ok(links)
}

/// The targets in an order where each comes after those whose images it reads.
fn link_order(
    targets: &[Target<'_>],
    links: &[Vec<(String, usize)>],
) -> Result<Vec<usize>, Failure> {
    let mut order = Vec::with_capacity(links.len());
    let mut state = vec![0u8; links.len()]; // 0 new, 1 on the path, 2 placed
    fn visit(
        t: usize,
        links: &[Vec<(String, usize)>],
        state: &mut [u8],
        order: &mut Vec<usize>,
    ) -> Result<(), usize> {
        match state[t] {
            2 => return Ok(()),
            1 => return Err(t),
            _ => {}
        }
        state[t] = 1;
        for (_, x) in &links[t] {
            visit(*x, links, state, order)?;
        }
        state[t] = 2;
        order.push(t);
        Ok(())
    }
    for t in 0..links.len() {
        visit(t, links, &mut state, &mut order).map_err(|at| {
            failure(
                format!(
                    "the target: contexts of target {} form a cycle",
                    targets[at].name
                ),
                2,
            )
        })?;
    }
    Ok(order)
}

/// One target of a graph: a build of its own (its record, names, where its image goes)
/// whose stage tasks may be other targets' too.
pub(super) struct Target<'a> {
    /// Its name in the bake (empty for a build).
    pub(super) name: &'a str,
    /// Its build id.
    pub(super) build: &'a str,
    pub(super) spec: &'a BuildSpec,
    pub(super) df: &'a ossb_dockerfile::Dockerfile,
}

/// Runs every target's tasks as one graph (a stage planned alike by several targets is one
/// task, built once and handed to each), then merges and pushes each target's image as soon
/// as its tasks are done. Events go to the client when there is one: as the build's own
/// ([`ClusterMessage::Event`]), or for a bake tagged with their target
/// ([`ClusterMessage::TargetEvent`]), each target's end told as it ends
/// ([`ClusterMessage::TargetFinished`]). A task that fails for good fails the targets that
/// need it; the tasks only they needed are cancelled, the other targets go on.
pub(super) async fn run_graph(
    state: &Arc<State>,
    targets: &[Target<'_>],
    context: Vec<Digest>,
    gauges: &mut [Gauge<'_>],
    mut client: Option<&mut SendStream>,
    bake: bool,
) -> Vec<Result<BuiltImage, Failure>> {
    let mut told = vec![false; targets.len()];
    let ends = run_targets(
        state,
        targets,
        context,
        gauges,
        &mut client,
        bake,
        &mut told,
    )
    .await;
    // A bake's client waits for every target's end, those that never started too.
    if let (true, Some(tx)) = (bake, client) {
        for (t, end) in ends.iter().enumerate().filter(|(t, _)| !told[*t]) {
            let outcome = BuildOutcome {
                result: end.clone(),
            };
            let finished = ClusterMessage::TargetFinished {
                target: t as u32,
                outcome,
            };
            if send(tx, finished).await.is_err() {
                break;
            }
        }
    }
    ends
}

/// [`run_graph`]'s work; `told`: the targets whose end the client was told.
async fn run_targets(
    state: &Arc<State>,
    targets: &[Target<'_>],
    context: Vec<Digest>,
    gauges: &mut [Gauge<'_>],
    client: &mut Option<&mut SendStream>,
    bake: bool,
    told: &mut [bool],
) -> Vec<Result<BuiltImage, Failure>> {
    let started = ossb_engine::build::now();
    for d in &context {
        state.store.touch(d);
    }
    let wrap = |target: usize, event: BuildEvent| match bake {
        true => ClusterMessage::TargetEvent {
            target: target as u32,
            event,
        },
        false => ClusterMessage::Event(event),
    };
    let mut ends: Vec<Option<Result<BuiltImage, Failure>>> = targets.iter().map(|_| None).collect();
    let mut plans: Vec<Vec<StagePlan>> = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        let spec = target.spec;
        tracing::info!(build = target.build, platforms = ?spec.platforms.iter().map(|p| p.to_string()).collect::<Vec<_>>(), context_files = context.len(), "build accepted");
        let build_platform = choose_build_platform(&state.lock().workers, &spec.platforms);
        match stage_tasks(target.df, spec, &build_platform) {
            Ok(stages) => plans.push(stages),
            Err(f) => {
                ends[t] = Some(Err(f));
                plans.push(Vec::new());
                continue;
            }
        }
        let build_args = spec.build_args.iter().cloned().collect();
        if let Some(warning) = ossb_engine::build::unused_build_args_warning(
            target.df,
            &build_args,
            spec.target.as_deref(),
        ) {
            if let Some(tx) = client.as_deref_mut() {
                let _ = send(tx, wrap(t, BuildEvent::Info(warning))).await;
            }
        }
    }

    // A target reading another's image: its stages wait for that image's task (of the same
    // platform), and their keys hold that image's, so that they are never taken for stages
    // that read something else.
    let links = match links_of(targets).and_then(|l| link_order(targets, &l).map(|o| (l, o))) {
        Ok(found) => found,
        Err(f) => return targets.iter().map(|_| Err(f.clone())).collect(),
    };
    let (links, order) = links;
    for &t in &order {
        if links[t].is_empty() || ends[t].is_some() {
            continue;
        }
        let mut linked = Vec::new();
        for (context, x) in &links[t] {
            let images: Vec<Digest> = plans[*x]
                .iter()
                .filter(|s| s.export)
                .map(|s| s.key)
                .collect();
            linked.push((context.clone(), images));
        }
        for stage in &mut plans[t] {
            let bytes = postcard::to_allocvec(&("ossb-stage-linked-v1", stage.key, &linked))
                .unwrap_or_default();
            stage.key = Digest::of(&bytes);
        }
    }

    // Task ids: each target's image stages get a task of their own; every other stage goes
    // to the task of the first stage planned alike (an image stage first: its stage as built
    // is handed on before the target's labels go on the image).
    let total: usize = plans.iter().map(Vec::len).sum();
    let first = {
        let mut inner = state.lock();
        let first = inner.next_id + 1;
        inner.next_id += total as u64;
        first
    };
    let mut next = first;
    let mut by_key: HashMap<Digest, u64> = HashMap::new();
    let mut ids: Vec<Vec<u64>> = plans.iter().map(|p| vec![0; p.len()]).collect();
    for (t, stages) in plans.iter().enumerate() {
        for (n, stage) in stages.iter().enumerate().filter(|(_, s)| s.export) {
            ids[t][n] = next;
            by_key.entry(stage.key).or_insert(next);
            next += 1;
        }
    }
    let mut owner: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
    for (t, stages) in plans.iter().enumerate() {
        for (n, stage) in stages.iter().enumerate() {
            if !stage.export {
                ids[t][n] = *by_key.entry(stage.key).or_insert_with(|| {
                    next += 1;
                    next - 1
                });
            }
            owner.entry(ids[t][n]).or_insert((t, n));
        }
    }
    // What each target waits for: its tasks, and on which platform's image each is.
    let mut tasks_of: Vec<BTreeMap<u64, Platform>> = plans
        .iter()
        .enumerate()
        .map(|(t, stages)| {
            stages
                .iter()
                .enumerate()
                .map(|(n, s)| (ids[t][n], s.platform.clone()))
                .collect()
        })
        .collect();
    // The image tasks each task's named contexts are: (task, context, its target's name).
    let mut context_deps: HashMap<u64, Vec<(u64, String, String)>> = HashMap::new();
    for (t, stages) in plans.iter().enumerate() {
        for (n, stage) in stages.iter().enumerate() {
            // Every task of the target gets them, as every task of a build gets its named
            // contexts: the worker's plan must know the name is a context, not an image.
            for (context, x) in &links[t] {
                let image = plans[*x]
                    .iter()
                    .position(|s| s.export && s.platform == stage.platform)
                    .map(|m| ids[*x][m]);
                let Some(image) = image else {
                    let f = failure(
                        format!(
                            "context {context} is target {}'s image, and target {} builds none for {}",
                            targets[*x].name, targets[*x].name, stage.platform
                        ),
                        2,
                    );
                    return targets.iter().map(|_| Err(f.clone())).collect();
                };
                let deps = context_deps.entry(ids[t][n]).or_default();
                if !deps.iter().any(|(i, c, _)| *i == image && c == context) {
                    deps.push((image, context.clone(), targets[*x].name.to_string()));
                }
                // It fails when that image fails.
                tasks_of[t].insert(image, stage.platform.clone());
            }
        }
    }
    if bake {
        // Said once per target: which of its stages another target's task builds.
        for (t, stages) in plans.iter().enumerate() {
            for (n, stage) in stages.iter().enumerate() {
                let (o, _) = owner[&ids[t][n]];
                if o != t {
                    let line = format!(
                        "stage {} ({}): built once, by the task of target {}",
                        stage.stage, stage.platform, targets[o].name
                    );
                    if let Some(tx) = client.as_deref_mut() {
                        let _ = send(tx, wrap(t, BuildEvent::Info(line))).await;
                    }
                }
            }
        }
    }

    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let mut pending = Vec::new();
    for (t, gauge) in gauges.iter_mut().enumerate() {
        if ends[t].is_none() {
            gauge.start_running();
        }
    }
    {
        let mut inner = state.lock();
        for (&task, &(t, n)) in &owner {
            let stage = &plans[t][n];
            let (done_tx, done_rx) = oneshot::channel();
            let spec = TaskSpec {
                task,
                build: targets[t].build.to_string(),
                platform: stage.platform.clone(),
                stage: Some(stage.stage as u32),
                export: stage.export,
                build_platform: stage.build_platform.clone(),
                needs: Vec::new(),
                spec: targets[t].spec.clone(),
                contexts: Vec::new(),
            };
            let key = task_key(&spec);
            let contexts = context_deps.remove(&task).unwrap_or_default();
            let mut deps: Vec<u64> = stage.deps.iter().map(|d| ids[t][*d]).collect();
            deps.extend(contexts.iter().map(|(image, _, _)| *image));
            deps.sort();
            deps.dedup();
            inner.tasks.insert(
                task,
                Task {
                    spec,
                    runs_on: stage.runs_on.clone(),
                    deps,
                    stage_deps: stage.deps.iter().map(|d| ids[t][*d]).collect(),
                    context_deps: contexts,
                    prefer: None,
                    worker: None,
                    events: events_tx.clone(),
                    done: Some(done_tx),
                    context: context.clone(),
                    key,
                    queued_at: Instant::now(),
                    ready_at: Instant::now(),
                    told: false,
                },
            );
            inner.queue.push_back(task);
            pending.push((task, done_rx));
        }
    }
    state.wake.notify_one();
    drop(events_tx);

    // Events are renumbered per target (each task's engine counts from 1) and go to the
    // target whose stage made the task.
    let mut numbering: Vec<Numbering> = targets.iter().map(|_| (HashMap::new(), 0)).collect();
    let mut results: futures_util::stream::FuturesUnordered<_> = pending
        .into_iter()
        .map(|(task, rx)| async move { (task, rx.await) })
        .collect();
    let mut merges = futures_util::stream::FuturesUnordered::new();
    let mut outcomes: HashMap<u64, (PlatformOutcome, Vec<String>)> = HashMap::new();
    // Targets whose tasks all succeeded with nothing to wait for: none of them ran any.
    for (t, tasks) in tasks_of.iter().enumerate() {
        if tasks.is_empty() && ends[t].is_none() {
            ends[t] = Some(Err(failure("the build has no stage to run", 1)));
        }
    }
    let mut merging = vec![false; targets.len()];
    let mut events_open = true;
    while !results.is_empty() || !merges.is_empty() {
        tokio::select! {
            Some((task, r)) = futures_util::StreamExt::next(&mut results), if !results.is_empty() => {
                let r = r.unwrap_or_else(|_| (Err(failure("a task was dropped by the coordinator", 1)), Vec::new()));
                match r {
                    (Ok(o), peers) => {
                        outcomes.insert(task, (o, peers));
                        for (t, tasks) in tasks_of.iter().enumerate() {
                            let waiting = ends[t].is_none() && !merging[t] && tasks.contains_key(&task);
                            if waiting && tasks.keys().all(|k| outcomes.contains_key(k)) {
                                // Done with its tasks; merged and pushed while the others go on.
                                merging[t] = true;
                                let images = images_of(&plans[t], &ids[t], &outcomes);
                                // The peers of every task of the target hold its blobs.
                                let mut peers: Vec<String> = tasks
                                    .keys()
                                    .filter_map(|k| outcomes.get(k))
                                    .flat_map(|(_, p)| p.iter().cloned())
                                    .collect();
                                peers.sort();
                                peers.dedup();
                                merges.push(merge_target(t, targets[t].spec, images, peers, started, &state.state_dir));
                            }
                        }
                    }
                    (Err(f), _) => {
                        for (t, tasks) in tasks_of.iter().enumerate() {
                            if ends[t].is_none() && !merging[t] && tasks.contains_key(&task) {
                                ends[t] = Some(Err(f.clone()));
                                told[t] = end_target(client, bake, t, &f).await;
                            }
                        }
                        // What only failed targets wait for stops now rather than run on.
                        let live: HashSet<u64> = tasks_of
                            .iter()
                            .enumerate()
                            .filter(|(t, _)| ends[*t].is_none() && !merging[*t])
                            .flat_map(|(_, tasks)| tasks.keys().copied())
                            .collect();
                        let orphans: Vec<u64> = owner
                            .keys()
                            .copied()
                            .filter(|k| !outcomes.contains_key(k) && *k != task && !live.contains(k))
                            .collect();
                        if !orphans.is_empty() {
                            let (o, n) = owner[&task];
                            cancel_tasks(state, &orphans, &format!("{} failed", plans[o][n].platform));
                        }
                    }
                }
            }
            Some((t, merged)) = futures_util::StreamExt::next(&mut merges), if !merges.is_empty() => {
                if bake {
                    if let Some(tx) = client.as_deref_mut() {
                        let outcome = BuildOutcome { result: merged.clone() };
                        told[t] = send(tx, ClusterMessage::TargetFinished { target: t as u32, outcome }).await.is_ok();
                    }
                }
                ends[t] = Some(merged);
            }
            event = events_rx.recv(), if events_open => {
                let Some((task, event)) = event else {
                    events_open = false;
                    continue;
                };
                forward(client, &owner, &tasks_of, targets, &mut numbering, task, event, &wrap).await;
            }
        }
    }
    while let Ok((task, event)) = events_rx.try_recv() {
        forward(
            client,
            &owner,
            &tasks_of,
            targets,
            &mut numbering,
            task,
            event,
            &wrap,
        )
        .await;
    }
    ends.into_iter()
        .map(|e| e.unwrap_or_else(|| Err(failure("the target was never started", 1))))
        .collect()
}

/// A target's vertex ids: by (task, the task's own id), and the last given.
type Numbering = (HashMap<(u64, u64), u64>, u64);

/// Tells a bake's client that target `t` failed (a build's client hears it with the build's
/// end); whether it was told.
async fn end_target(
    client: &mut Option<&mut SendStream>,
    bake: bool,
    t: usize,
    f: &Failure,
) -> bool {
    let (true, Some(tx)) = (bake, client.as_deref_mut()) else {
        return false;
    };
    let outcome = BuildOutcome {
        result: Err(f.clone()),
    };
    let finished = ClusterMessage::TargetFinished {
        target: t as u32,
        outcome,
    };
    send(tx, finished).await.is_ok()
}

/// Sends a task's event to the client, numbered for the target whose stage made the task.
#[allow(clippy::too_many_arguments)]
async fn forward(
    client: &mut Option<&mut SendStream>,
    owner: &BTreeMap<u64, (usize, usize)>,
    tasks_of: &[BTreeMap<u64, Platform>],
    targets: &[Target<'_>],
    numbering: &mut [Numbering],
    task: u64,
    event: BuildEvent,
    wrap: &impl Fn(usize, BuildEvent) -> ClusterMessage,
) {
    let Some(&(t, _)) = owner.get(&task) else {
        return;
    };
    let multi = targets[t].spec.platforms.len() > 1;
    let (ids, next) = &mut numbering[t];
    let event = renumber(event, task, ids, next, multi.then(|| &tasks_of[t][&task]));
    // A client that went away stops getting events; the build goes on.
    if let Some(tx) = client.as_deref_mut() {
        if send(tx, wrap(t, event)).await.is_err() {
            *client = None;
        }
    }
}

/// A target's platform images, in the order asked for, each with the steps every task of its
/// platform ran and took from a cache and what they read and ran (for its provenance).
fn images_of(
    stages: &[StagePlan],
    ids: &[u64],
    outcomes: &HashMap<u64, (PlatformOutcome, Vec<String>)>,
) -> Vec<PlatformOutcome> {
    let mut images = Vec::new();
    for (n, stage) in stages.iter().enumerate().filter(|(_, s)| s.export) {
        let Some((image, _)) = outcomes.get(&ids[n]) else {
            continue;
        };
        let mut image = image.clone();
        let mut tasks: Vec<u64> = stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.platform == stage.platform)
            .map(|(m, _)| ids[m])
            .collect();
        tasks.sort();
        tasks.dedup();
        let platform_tasks = || tasks.iter().filter_map(|t| outcomes.get(t)).map(|(o, _)| o);
        image.run = platform_tasks().map(|o| o.run).sum();
        image.cached = platform_tasks().map(|o| o.cached).sum();
        let mut facts = ossb_engine::attestations::PlatformFacts::default();
        for o in platform_tasks() {
            facts.merge(crate::attest::facts_from_wire(&o.facts));
        }
        image.facts = crate::attest::facts_to_wire(&facts, "");
        images.push(image);
    }
    images
}

/// Merges and pushes target `t`'s image.
async fn merge_target(
    t: usize,
    spec: &BuildSpec,
    images: Vec<PlatformOutcome>,
    peers: Vec<String>,
    started: i64,
    state_dir: &Path,
) -> (usize, Result<BuiltImage, Failure>) {
    let result = match images.len() == spec.platforms.len() {
        true => merge_and_push(spec, images, peers, started, state_dir).await,
        false => Err(failure("no image was built for a platform of the build", 1)),
    };
    (t, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of every stage of `spec`'s plan for linux/amd64, by stage name.
    fn keys(spec: &BuildSpec) -> BTreeMap<String, Digest> {
        let df = ossb_dockerfile::parse(&spec.dockerfile, "Dockerfile").unwrap();
        let amd: Platform = "linux/amd64".parse().unwrap();
        stage_tasks(&df, spec, &amd)
            .unwrap()
            .iter()
            .map(|s| (s.stage.to_string(), s.key))
            .collect()
    }

    /// A `target:` context naming no target of the bake, or a cycle of them, is the user's
    /// error; linked targets come after the targets they read.
    #[test]
    fn target_contexts_are_ordered_and_cycles_refused() {
        let df = ossb_dockerfile::parse("FROM scratch\n", "Dockerfile").unwrap();
        let spec = |links: &[(&str, &str)]| BuildSpec {
            context_sources: links
                .iter()
                .map(|(c, t)| (c.to_string(), format!("target:{t}")))
                .collect(),
            ..Default::default()
        };
        let specs = [
            spec(&[("base", "base")]),
            spec(&[]),
            spec(&[("x", "app"), ("y", "base")]),
        ];
        let names = ["app", "base", "top"];
        let targets: Vec<Target> = specs
            .iter()
            .zip(names)
            .map(|(spec, name)| Target {
                name,
                build: name,
                spec,
                df: &df,
            })
            .collect();
        let links = links_of(&targets).unwrap();
        assert_eq!(links[2], vec![("x".to_string(), 0), ("y".to_string(), 1)]);
        assert_eq!(link_order(&targets, &links).unwrap(), vec![1, 0, 2]);
        let cyclic = [spec(&[("b", "b")]), spec(&[("a", "a")])];
        let targets: Vec<Target> = cyclic
            .iter()
            .zip(["a", "b"])
            .map(|(spec, name)| Target {
                name,
                build: name,
                spec,
                df: &df,
            })
            .collect();
        let err = link_order(&targets, &links_of(&targets).unwrap()).unwrap_err();
        assert_eq!(err.exit_code, 2);
        assert!(err.message.contains("cycle"), "{}", err.message);
        let unknown = [spec(&[("b", "nope")])];
        let targets = [Target {
            name: "a",
            build: "a",
            spec: &unknown[0],
            df: &df,
        }];
        let err = links_of(&targets).unwrap_err();
        assert_eq!(err.exit_code, 2);
        assert!(err.message.contains("nope"), "{}", err.message);
    }

    /// Two targets of a bake share a stage when its plan is the same: a build argument only a
    /// later stage declares, tags, labels and secrets' bytes leave it alike; an argument it
    /// declares or its FROM reads, or another platform, make it another stage.
    #[test]
    fn stages_planned_alike_share_a_key() {
        let spec = BuildSpec {
            dockerfile: "ARG BASE=busybox\nFROM $BASE AS base\nARG LEVEL\nRUN make $LEVEL\n\
                         FROM base AS app\nARG NAME\nRUN echo $NAME\n"
                .into(),
            dockerfile_name: "Dockerfile".into(),
            platforms: vec!["linux/amd64".parse().unwrap()],
            target: Some("app".into()),
            build_args: vec![("NAME".into(), "one".into())],
            ..Default::default()
        };
        let one = keys(&spec);
        let two = keys(&BuildSpec {
            build_args: vec![("NAME".into(), "two".into())],
            tags: vec!["r/two:1".into()],
            labels: vec![("a".into(), "b".into())],
            ..spec.clone()
        });
        assert_eq!(one["0"], two["0"], "the base is the same stage");
        assert_ne!(one["1"], two["1"], "NAME reaches the app's RUN");
        let level = keys(&BuildSpec {
            build_args: vec![("LEVEL".into(), "2".into())],
            ..spec.clone()
        });
        assert_ne!(one["0"], level["0"], "LEVEL reaches the base's RUN");
        assert_ne!(one["1"], level["1"], "and so the stage built on it");
        let other_base = keys(&BuildSpec {
            build_args: vec![("BASE".into(), "alpine".into())],
            ..spec.clone()
        });
        assert_ne!(one["0"], other_base["0"], "the FROM reads BASE");
        let secret = |value: &[u8]| BuildSpec {
            secrets: vec![ossb_protocol::cluster::Secret {
                id: "tok".into(),
                value: value.to_vec(),
            }],
            ..spec.clone()
        };
        assert_eq!(keys(&secret(b"a"))["0"], keys(&secret(b"b"))["0"]);
        assert_ne!(
            keys(&secret(b"a"))["0"],
            one["0"],
            "which secrets exist counts"
        );
        let arm = keys(&BuildSpec {
            platforms: vec!["linux/arm64".parse().unwrap()],
            ..spec.clone()
        });
        assert_ne!(one["0"], arm["0"]);
    }
}
