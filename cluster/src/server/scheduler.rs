//! Scheduling: queued tasks whose stages are built go to a worker of their platform (native
//! first), preferring the one that built their inputs, then the one holding most of the context.

use super::*;

pub(super) async fn schedule_loop(state: Arc<State>) {
    loop {
        schedule(&state);
        // Woken by new tasks, new workers and finished tasks; the timeout catches the rest.
        let _ = tokio::time::timeout(crate::HEARTBEAT, state.wake.notified()).await;
    }
}

/// Forgets that `task` builds its key and the steps it claimed (it ended, was cancelled, or
/// lost its worker); the tasks waiting for those steps may build them now.
pub(super) fn release(inner: &mut Inner, task: u64) {
    if let Some(key) = inner.tasks.get(&task).and_then(|t| t.key) {
        if inner.building.get(&key) == Some(&task) {
            inner.building.remove(&key);
        }
    }
    inner.claims.retain(|_, claim| {
        if claim.task != task {
            return true;
        }
        for waiter in std::mem::take(&mut claim.waiters) {
            let _ = waiter.send(());
        }
        false
    });
}

/// Assigns queued tasks to workers with a free slot. A task whose identical twin runs waits
/// for it; a task no worker can build fails once the grace period is over.
pub(super) fn schedule(state: &State) {
    let started = Instant::now();
    let mut inner = state.lock();
    let mut waiting = VecDeque::new();
    let mut unschedulable = Vec::new();
    let uptime = state.started.elapsed();
    while let Some(task_id) = inner.queue.pop_front() {
        let Some(task) = inner.tasks.get(&task_id) else {
            continue;
        };
        if !task.deps.is_empty() {
            // Its stage needs stages still being built.
            waiting.push_back(task_id);
            continue;
        }
        let (key, platform, queued_at, told) =
            (task.key, task.runs_on.clone(), task.queued_at, task.told);
        if let Some(twin) = key.and_then(|k| inner.building.get(&k).copied()) {
            if twin != task_id {
                if !told {
                    let on = inner
                        .tasks
                        .get(&twin)
                        .and_then(|t| t.worker)
                        .and_then(|w| inner.workers.get(&w))
                        .map(|w| w.info.name.clone())
                        .unwrap_or_default();
                    inner.counters.tasks_waited_identical += 1;
                    if let Some(t) = inner.tasks.get_mut(&task_id) {
                        t.told = true;
                        let _ = t.events.send((
                            task_id,
                            BuildEvent::Info(format!(
                                "{platform}: an identical build runs on worker {on}; waiting for it, then its steps come from that worker's cache"
                            )),
                        ));
                    }
                }
                waiting.push_back(task_id);
                continue;
            }
        }
        let preferred = key
            .and_then(|k| inner.built_on.get(&k).copied())
            .or(inner.tasks[&task_id].prefer);
        let context = &inner.tasks[&task_id].context;
        match pick_worker(&inner.workers, &platform, context, preferred) {
            Some(w) => {
                let task = inner.tasks.get_mut(&task_id).expect("present above");
                task.worker = Some(w);
                let spec = task.spec.clone();
                let events = task.events.clone();
                let ready = task.ready_at.elapsed();
                inner.dispatch_latency.record(ready);
                if let Some(key) = key {
                    inner.building.insert(key, task_id);
                }
                let emulated = inner.workers[&w].info.platform != platform;
                let worker = inner.workers.get_mut(&w).expect("picked from the map");
                worker.running.insert(task_id);
                let name = worker.info.name.clone();
                let sent = worker
                    .tasks
                    .send(ClusterMessage::Task(Box::new(spec.clone())));
                let how = if emulated { "emulated" } else { "native" };
                tracing::info!(build = %spec.build, task = task_id, platform = %spec.platform, stage = ?spec.stage, runs_on = %platform, worker = %name, how, "task scheduled");
                let _ = events.send((
                    task_id,
                    BuildEvent::Info(format!(
                        "{}{} scheduled on worker {name} ({how})",
                        spec.platform,
                        stage_label(&spec)
                    )),
                ));
                if sent.is_err() {
                    // Its channel is gone; the worker is being dropped and the task will be
                    // queued again then.
                    tracing::warn!(worker = %name, "worker channel closed");
                }
            }
            None if !can_build(&inner.workers, &platform) => {
                // Counted from the coordinator's start too: after a restart, workers need a
                // moment to register again.
                if queued_at.elapsed().min(uptime) >= crate::NO_WORKER_GRACE {
                    unschedulable.push(task_id);
                    continue;
                }
                if let Some(t) = inner.tasks.get_mut(&task_id).filter(|t| !t.told) {
                    t.told = true;
                    let _ = t.events.send((
                        task_id,
                        BuildEvent::Info(format!(
                            "no worker builds {platform} yet; waiting up to {}s for one to register",
                            crate::NO_WORKER_GRACE.as_secs()
                        )),
                    ));
                }
                waiting.push_back(task_id);
            }
            None => waiting.push_back(task_id),
        }
    }
    inner.queue = waiting;
    inner.pass_latency.record(started.elapsed());
    if unschedulable.is_empty() {
        return;
    }
    let roster = roster(&inner.workers);
    for task_id in unschedulable {
        let Some(mut t) = inner.tasks.remove(&task_id) else {
            continue;
        };
        inner.counters.tasks_unschedulable += 1;
        let p = &t.runs_on;
        let message = format!(
            "no worker can build {p}: none runs it natively and none emulates it ({} waited for one to register). The cluster has {roster}. Start a worker with --platform {p}, or one with --emulate {p} (QEMU through binfmt_misc)",
            humanize(crate::NO_WORKER_GRACE)
        );
        tracing::warn!(build = %t.spec.build, task = task_id, platform = %p, "no worker can build the platform");
        if let Some(done) = t.done.take() {
            let _ = done.send((Err(failure(message, 1)), Vec::new()));
        }
    }
}

pub(super) fn humanize(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// Whether any registered worker builds `platform`, natively or emulated, busy or not.
pub(super) fn can_build(workers: &HashMap<u64, Worker>, platform: &Platform) -> bool {
    workers
        .values()
        .any(|w| w.info.platform == *platform || w.info.emulates.contains(platform))
}

/// The registered workers for a message: `a (linux/amd64), b (linux/amd64; emulates
/// linux/arm64)`, or that there are none.
pub(super) fn roster(workers: &HashMap<u64, Worker>) -> String {
    let mut names: Vec<String> = workers
        .values()
        .map(|w| {
            let emulates: Vec<String> = w.info.emulates.iter().map(|p| p.to_string()).collect();
            if emulates.is_empty() {
                format!("{} ({})", w.info.name, w.info.platform)
            } else {
                format!(
                    "{} ({}; emulates {})",
                    w.info.name,
                    w.info.platform,
                    emulates.join(", ")
                )
            }
        })
        .collect();
    if names.is_empty() {
        return "no workers registered".into();
    }
    names.sort();
    format!("these workers: {}", names.join(", "))
}

/// Withdraws `tasks` (queued or running) and tells their workers to stop them.
pub(super) fn cancel_tasks(state: &State, tasks: &[u64], why: &str) {
    let mut inner = state.lock();
    for &task in tasks {
        release(&mut inner, task);
        let Some(t) = inner.tasks.remove(&task) else {
            continue;
        };
        inner.queue.retain(|q| *q != task);
        inner.counters.tasks_cancelled += 1;
        let _ = t.events.send((
            task,
            BuildEvent::Info(format!("{} cancelled: {why}", t.spec.platform)),
        ));
        if let Some(w) = t.worker.and_then(|w| inner.workers.get_mut(&w)) {
            w.running.remove(&task);
            tracing::info!(build = %t.spec.build, task, worker = %w.info.name, "task cancelled");
            let _ = w.tasks.send(ClusterMessage::CancelTask { task });
        }
    }
    drop(inner);
    state.wake.notify_one();
}

/// The worker for a task of `platform`: native workers when any is registered, else emulating
/// ones; among those with a free slot, the one that holds most of the context, then the least
/// busy.
pub(super) fn pick_worker(
    workers: &HashMap<u64, Worker>,
    platform: &Platform,
    context: &[Digest],
    preferred: Option<u64>,
) -> Option<u64> {
    let native: Vec<(&u64, &Worker)> = workers
        .iter()
        .filter(|(_, w)| w.info.platform == *platform)
        .collect();
    let pool = if native.is_empty() {
        workers
            .iter()
            .filter(|(_, w)| w.info.emulates.contains(platform))
            .collect()
    } else {
        native
    };
    pool.into_iter()
        .filter(|(_, w)| !w.draining && (w.running.len() as u32) < w.info.slots.max(1))
        .max_by_key(|(id, w)| {
            let held = context.iter().filter(|d| w.holds.contains(d)).count();
            (
                preferred == Some(**id),
                held,
                std::cmp::Reverse(w.running.len()),
                std::cmp::Reverse(**id),
            )
        })
        .map(|(id, _)| *id)
}
