//! A bake session: every target of a submitted bake checked, their context files received
//! once, and their tasks run as one graph ([`run_graph`]); each target is a build of its own
//! (a record, an outcome sent as it ends).

use ossb_protocol::cluster::BakeSpec;

use crate::records::BakeTarget;

use super::*;

/// Serves one submitted bake on the client's stream until every target ended.
pub(super) async fn run_bake(
    state: &Arc<State>,
    mut bake: BakeSpec,
    tx: &mut SendStream,
    rx: &mut RecvStream,
) -> Result<(), ClusterError> {
    let refuse = |message: String, exit_code: i32| {
        ClusterMessage::Finished(BuildOutcome {
            result: Err(failure(message, exit_code)),
        })
    };
    if bake.targets.is_empty() {
        send(tx, refuse("the bake has no target".into(), 2)).await?;
        return Ok(());
    }
    // Every target must be buildable before anything is received.
    let mut dfs = Vec::with_capacity(bake.targets.len());
    for target in &bake.targets {
        match check(&target.spec) {
            Ok(df) => dfs.push(df),
            Err(f) => {
                let name = ossb_dockerfile::clip(&target.name, 100);
                send(
                    tx,
                    refuse(format!("target {name}: {}", f.message), f.exit_code),
                )
                .await?;
                return Ok(());
            }
        }
    }
    // A target another reads as a named context hands its image over through the peer
    // cache: its task must publish it, as for a download.
    let linked: Vec<String> = bake
        .targets
        .iter()
        .flat_map(|t| t.spec.context_sources.iter())
        .filter_map(|(_, v)| v.strip_prefix("target:").map(str::to_string))
        .collect();
    for target in &mut bake.targets {
        if linked.contains(&target.name) {
            target.spec.download = true;
        }
    }
    let ids: Vec<String> = bake
        .targets
        .iter()
        .map(|_| format!("b{}", state.next_id()))
        .collect();
    let records: Vec<Record> = bake
        .targets
        .iter()
        .zip(&ids)
        .map(|(t, id)| Record {
            id: id.clone(),
            status: Status::Queued,
            platforms: t.spec.platforms.iter().map(|p| p.to_string()).collect(),
            tags: t.spec.tags.clone(),
            submitted: ossb_engine::build::now(),
            digest: None,
            image: None,
            error: None,
            exit_code: None,
            bake: Some(BakeTarget {
                bake: ids[0].clone(),
                target: t.name.clone(),
            }),
        })
        .collect();
    for record in &records {
        save_record(state, record, None);
    }
    let mut gauges: Vec<Gauge> = records.iter().map(|_| Gauge::new(state)).collect();
    let mut files: Vec<(Digest, u64)> = bake
        .targets
        .iter()
        .flat_map(|t| all_file_digests(&t.spec))
        .collect();
    files.sort();
    files.dedup_by_key(|(d, _)| *d);
    let ends = match receive(state, &files, tx, rx).await {
        Ok(context) => {
            // Kept until each ends, so that a restarted coordinator runs them again, as one
            // graph ([`resume`]); in one transaction, so that it finds all or none.
            let running: Vec<Record> = records
                .iter()
                .map(|r| Record {
                    status: Status::Running,
                    ..r.clone()
                })
                .collect();
            let builds: Vec<_> = running
                .iter()
                .zip(&bake.targets)
                .map(|(r, t)| (r, Some(&t.spec)))
                .collect();
            if let Err(e) = state.records.save_all(&builds) {
                tracing::warn!(error = %e, "bake records not saved");
            }
            let builds = records.iter().map(|r| r.id.clone()).collect();
            match send(tx, ClusterMessage::BakeAccepted { builds }).await {
                Ok(()) => {
                    let targets: Vec<Target> = bake
                        .targets
                        .iter()
                        .zip(&records)
                        .zip(&dfs)
                        .map(|((t, r), df)| Target {
                            name: &t.name,
                            build: &r.id,
                            spec: &t.spec,
                            df,
                        })
                        .collect();
                    run_graph(state, &targets, context, &mut gauges, Some(tx), true).await
                }
                Err(e) => {
                    let f = failure(format!("receiving the bake: {e}"), 1);
                    records.iter().map(|_| Err(f.clone())).collect()
                }
            }
        }
        Err(f) => {
            drop(gauges);
            for record in records {
                record_outcome(state, record, &Err(f.clone()));
            }
            send(
                tx,
                ClusterMessage::Finished(BuildOutcome { result: Err(f) }),
            )
            .await?;
            return Ok(());
        }
    };
    drop(gauges);
    for (record, end) in records.into_iter().zip(&ends) {
        record_outcome(state, record, end);
    }
    let _ = tx.finish();
    Ok(())
}
