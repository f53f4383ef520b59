//! A worker's control channel: registration, heartbeats, task results; a worker that goes
//! silent or away is lost and its tasks are queued again.

use super::*;

/// A worker's control stream: tasks go out, heartbeats, events and results come in.
pub(super) async fn worker_channel(
    state: &Arc<State>,
    info: WorkerInfo,
    mut tx: SendStream,
    mut rx: RecvStream,
) -> Result<(), ClusterError> {
    let id = state.next_id();
    let name = info.name.clone();
    let (task_tx, mut task_rx) = mpsc::unbounded_channel();
    send(
        &mut tx,
        ClusterMessage::Registered {
            worker: name.clone(),
        },
    )
    .await?;
    tracing::info!(worker = %name, platform = %info.platform, emulates = ?info.emulates.iter().map(|p| p.to_string()).collect::<Vec<_>>(), slots = info.slots, "worker registered");
    state.lock().workers.insert(
        id,
        Worker {
            info,
            tasks: task_tx,
            last_seen: Instant::now(),
            running: HashSet::new(),
            holds: HashSet::new(),
            draining: false,
        },
    );
    state.wake.notify_one();
    let writer = tokio::spawn(async move {
        while let Some(m) = task_rx.recv().await {
            if send(&mut tx, m).await.is_err() {
                break;
            }
        }
    });
    let result = loop {
        let message = match recv(&mut rx, &name).await {
            Ok(m) => m,
            Err(e) => break Err(e),
        };
        let mut inner = state.lock();
        let Some(worker) = inner.workers.get_mut(&id) else {
            // Dropped as lost: whatever it says now is too late.
            break Ok(());
        };
        worker.last_seen = Instant::now();
        match message {
            ClusterMessage::Heartbeat { draining, .. } => {
                if std::mem::replace(&mut worker.draining, draining) != draining {
                    if draining {
                        tracing::info!(worker = %name, "worker draining to collect its cache: no task is sent to it until it is done");
                    } else {
                        tracing::info!(worker = %name, "worker done collecting its cache");
                        state.wake.notify_one();
                    }
                }
            }
            ClusterMessage::TaskEvent { task, event } => {
                if let Some(t) = inner.tasks.get(&task).filter(|t| t.worker == Some(id)) {
                    let _ = t.events.send((task, event));
                }
            }
            ClusterMessage::TaskDone { task, result } => {
                let peers = worker.info.cache_peers.clone();
                let native = worker.info.platform.clone();
                worker.running.remove(&task);
                if inner.tasks.get(&task).is_some_and(|t| t.worker == Some(id)) {
                    release(&mut inner, task);
                }
                if let Some(mut t) = inner.tasks.remove(&task).filter(|t| t.worker == Some(id)) {
                    if let Some(w) = inner.workers.get_mut(&id) {
                        w.holds.extend(t.context.iter().copied());
                    }
                    if let Ok(outcome) = &result {
                        let steps = inner.counters.steps.entry(name.clone()).or_default();
                        steps.0 += outcome.run;
                        steps.1 += outcome.cached;
                        let mode = if t.runs_on == native {
                            "native"
                        } else {
                            "emulated"
                        };
                        let by_mode = inner
                            .counters
                            .steps_by_mode
                            .entry((t.runs_on.to_string(), mode))
                            .or_default();
                        by_mode.0 += outcome.run;
                        by_mode.1 += outcome.cached;
                        let i = inner.counters.inputs.entry(name.clone()).or_default();
                        i.local_blobs += outcome.inputs.local_blobs;
                        i.peer_blobs += outcome.inputs.peer_blobs;
                        i.peer_bytes += outcome.inputs.peer_bytes;
                        i.registry_blobs += outcome.inputs.registry_blobs;
                        i.registry_bytes += outcome.inputs.registry_bytes;
                        if let Some(key) = t.key {
                            if inner.built_on.len() > 100_000 {
                                inner.built_on.clear();
                            }
                            inner.built_on.insert(key, id);
                        }
                    }
                    // The tasks waiting for this stage may go; the worker that built it is
                    // where they find its layers.
                    if let Ok(outcome) = &result {
                        for other in inner.tasks.values_mut() {
                            if other.deps.contains(&task) {
                                other.deps.retain(|d| *d != task);
                                other.ready_at = Instant::now();
                                other.prefer.get_or_insert(id);
                                // It starts from the stage as built, never building it again.
                                if other.stage_deps.contains(&task) {
                                    other.spec.needs.extend(outcome.stage.clone());
                                }
                                // Another target's image, read as a named context.
                                for (_, name, target) in
                                    other.context_deps.iter().filter(|(t, _, _)| *t == task)
                                {
                                    other.spec.contexts.push(BuiltContext {
                                        name: name.clone(),
                                        target: target.clone(),
                                        descriptor_json: outcome.descriptor_json.clone(),
                                        manifest: outcome.manifest.clone(),
                                        blobs: outcome.blobs.clone(),
                                    });
                                }
                            }
                        }
                    }
                    if let Some(done) = t.done.take() {
                        let _ = done.send((result, peers));
                    }
                }
                drop(inner);
                state.wake.notify_one();
            }
            other => {
                drop(inner);
                tracing::warn!(worker = %name, message = ?other, "unexpected message from a worker");
            }
        }
    };
    writer.abort();
    lose_worker(state, id, "its connection closed");
    result
}

/// Drops a worker and queues its tasks again, first.
pub(super) fn lose_worker(state: &State, id: u64, why: &str) {
    let mut inner = state.lock();
    let Some(worker) = inner.workers.remove(&id) else {
        return;
    };
    inner.counters.workers_lost += 1;
    tracing::warn!(worker = %worker.info.name, reason = why, tasks = worker.running.len(), "worker lost");
    inner.built_on.retain(|_, w| *w != id);
    for task in worker.running {
        release(&mut inner, task);
        if let Some(t) = inner.tasks.get_mut(&task) {
            t.worker = None;
            // A fresh grace period: the lost worker may have been the only one of its
            // platform, and may come back.
            t.queued_at = Instant::now();
            t.ready_at = t.queued_at;
            t.told = false;
            let _ = t.events.send((
                task,
                BuildEvent::Info(format!(
                    "worker {} was lost ({why}): building {} again elsewhere",
                    worker.info.name, t.spec.platform
                )),
            ));
            inner.queue.push_front(task);
            inner.counters.tasks_rescheduled += 1;
        }
    }
    drop(inner);
    state.wake.notify_one();
}

/// Drops workers that stopped heartbeating.
pub(super) async fn watch_workers(state: Arc<State>) {
    loop {
        tokio::time::sleep(crate::HEARTBEAT / 2).await;
        let silent: Vec<u64> = state
            .lock()
            .workers
            .iter()
            .filter(|(_, w)| w.last_seen.elapsed() > crate::WORKER_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in silent {
            lose_worker(&state, id, "no heartbeat");
        }
    }
}
