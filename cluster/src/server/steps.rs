//! The cluster's step cache: a task claims a step key (and gets its record, the right to build
//! it, or waits for the task that builds it) and publishes what it built.

use super::*;

/// Answers a task's claim of step `key`: the record when some task built it (for a
/// `--no-cache` build, a task of the same build), else the right to build it; while another
/// task builds it, waits for that one to publish it or end.
pub(super) async fn claim_step(
    state: &State,
    task: u64,
    key: [u8; 32],
    tx: &mut SendStream,
) -> Result<(), ClusterError> {
    enum Answer {
        Gone,
        Record(String),
        Build,
        Wait(oneshot::Receiver<()>),
    }
    let mut waited = false;
    loop {
        // Decided under the lock, answered after it (the guard never lives across an await).
        let answer = {
            let mut inner = state.lock();
            match inner.tasks.get(&task) {
                None => Answer::Gone,
                Some(t) => {
                    let (build, no_cache) = (t.spec.build.clone(), t.spec.spec.no_cache);
                    let record = inner
                        .steps
                        .get(&key)
                        .filter(|e| !no_cache || e.build == build)
                        .map(|e| e.record.clone());
                    match record {
                        Some(record) => {
                            inner.counters.steps_from_cluster += 1;
                            Answer::Record(record)
                        }
                        None => match inner.claims.get_mut(&key) {
                            Some(claim) if claim.task != task => {
                                let (wake, wait) = oneshot::channel();
                                claim.waiters.push(wake);
                                if !waited {
                                    waited = true;
                                    inner.counters.steps_waited += 1;
                                }
                                Answer::Wait(wait)
                            }
                            _ => {
                                inner.claims.insert(
                                    key,
                                    StepClaim {
                                        task,
                                        waiters: Vec::new(),
                                    },
                                );
                                inner.counters.steps_claimed += 1;
                                Answer::Build
                            }
                        },
                    }
                }
            }
        };
        match answer {
            Answer::Gone => {
                send_error(tx, format!("task {task} is not running here")).await;
                return Ok(());
            }
            Answer::Record(record) => return send(tx, ClusterMessage::StepRecord { record }).await,
            Answer::Build => return send(tx, ClusterMessage::BuildStep).await,
            // The builder published the step or ended (then this task may build it).
            Answer::Wait(wait) => {
                let _ = wait.await;
            }
        }
    }
}

/// Records a step a task built, and wakes the tasks waiting for it.
pub(super) fn publish_step(state: &State, task: u64, key: [u8; 32], record: String) {
    let mut inner = state.lock();
    let build = inner
        .tasks
        .get(&task)
        .map(|t| t.spec.build.clone())
        .unwrap_or_default();
    let step = StepRecord { record, build };
    let _ = state.step_writes.send((key, step.clone()));
    if inner.steps.insert(key, step).is_none() {
        inner.step_order.push_back(key);
        while inner.step_order.len() > MAX_STEP_RECORDS {
            if let Some(old) = inner.step_order.pop_front() {
                inner.steps.remove(&old);
            }
        }
    }
    if inner.claims.get(&key).is_some_and(|c| c.task == task) {
        if let Some(claim) = inner.claims.remove(&key) {
            for waiter in claim.waiters {
                let _ = waiter.send(());
            }
        }
    }
}

/// Writes published step records to the state database, as many per transaction as have
/// arrived meanwhile (one commit, one fsync, per batch rather than per step).
pub(super) async fn save_steps(
    records: Arc<Records>,
    mut writes: mpsc::UnboundedReceiver<([u8; 32], StepRecord)>,
) {
    while let Some(first) = writes.recv().await {
        let mut batch = vec![first];
        while let Ok(more) = writes.try_recv() {
            batch.push(more);
        }
        let records = records.clone();
        let saved =
            tokio::task::spawn_blocking(move || records.add_steps(&batch, MAX_STEP_RECORDS)).await;
        match saved {
            Ok(Ok(())) => {}
            // The steps stay in memory; only a restart would forget them.
            Ok(Err(e)) => tracing::warn!(error = %e, "step records not saved"),
            Err(e) => tracing::warn!(error = %e, "step records not saved"),
        }
    }
}
