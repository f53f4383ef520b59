//! The task split: one task per stage and platform, in the stage graph of the plan; and what
//! makes two tasks the same.

use super::*;

/// One task of a build before it is queued: a stage of one platform's plan.
pub(super) struct StagePlan {
    /// The platform whose image the stage is part of.
    pub(super) platform: Platform,
    /// The stage's index in the Dockerfile.
    pub(super) stage: usize,
    /// Where it runs: its FROM --platform, else `platform`.
    pub(super) runs_on: Platform,
    /// Whether it is the platform's image (the target stage).
    pub(super) export: bool,
    /// The stages it needs, as positions in the build's list of stage plans.
    pub(super) deps: Vec<usize>,
    /// BUILDPLATFORM.
    pub(super) build_platform: Platform,
    /// What makes it the same stage as another build's (see [`super::graph::stage_keys`]).
    pub(super) key: Digest,
}

/// The stage tasks of a build: for each platform, every stage its target needs, with the
/// stages each needs. The stage graph depends on the Dockerfile and the arguments only, so it
/// is planned here without the base images (the workers plan again with them).
pub(super) fn stage_tasks(
    df: &ossb_dockerfile::Dockerfile,
    spec: &BuildSpec,
    build_platform: &Platform,
) -> Result<Vec<StagePlan>, Failure> {
    let mut out = Vec::new();
    crate::context::network_of(spec).map_err(|e| failure(e, 2))?;
    for platform in &spec.platforms {
        // Planned as the platform's whole build would be, by the engine's own options.
        let whole = TaskSpec {
            task: 0,
            build: String::new(),
            platform: platform.clone(),
            stage: None,
            export: true,
            build_platform: build_platform.clone(),
            needs: Vec::new(),
            spec: spec.clone(),
            contexts: Vec::new(),
        };
        let mut opts = crate::context::request_of(&whole, Default::default(), Vec::new())
            .plan_options(platform);
        // The stage graph depends on which names are contexts (one may replace a stage).
        opts.named_contexts = spec
            .build_contexts
            .iter()
            .map(|(n, _)| n)
            .chain(spec.context_sources.iter().map(|(n, _)| n))
            .cloned()
            .collect();
        let plan = ossb_dockerfile::plan(df, &opts, &HashMap::new())
            .map_err(|e| failure(e.to_string(), 2))?;
        let keys = super::graph::stage_keys(&plan, spec, platform, build_platform)?;
        let offset = out.len();
        for node in plan.graph() {
            let mut deps = node.deps.clone();
            // The exporting task scans the stages BUILDKIT_SBOM_SCAN_STAGE names: it waits
            // for them and is handed them, as for a stage it reads.
            if node.is_target && spec.attest.sbom {
                deps.extend(plan.sbom_scan.stages.iter().map(|(p, _)| *p));
                deps.sort();
                deps.dedup();
            }
            out.push(StagePlan {
                platform: platform.clone(),
                stage: node.index,
                runs_on: node.platform.unwrap_or_else(|| platform.clone()),
                export: node.is_target,
                deps: deps.iter().map(|d| offset + d).collect(),
                build_platform: build_platform.clone(),
                key: keys[node.position],
            });
        }
    }
    Ok(out)
}

/// BUILDPLATFORM of a build: the first platform asked for that a worker runs natively, else
/// the native platform of a worker, else the first platform asked for.
pub(super) fn choose_build_platform(
    workers: &HashMap<u64, Worker>,
    wanted: &[Platform],
) -> Platform {
    wanted
        .iter()
        .find(|p| workers.values().any(|w| w.info.platform == **p))
        .or_else(|| {
            workers
                .values()
                .map(|w| &w.info.platform)
                .min_by_key(|p| p.to_string())
        })
        .or(wanted.first())
        .cloned()
        .unwrap_or_else(Platform::host)
}

/// ` stage N` for messages about a stage task.
pub(super) fn stage_label(spec: &TaskSpec) -> String {
    spec.stage
        .map(|i| format!(" stage {i}"))
        .unwrap_or_default()
}

/// What makes two tasks identical: everything that goes into their steps' cache keys and
/// their image (not the tags, nor where the image goes). Only in the coordinator's memory.
pub(super) fn task_key(task: &TaskSpec) -> Option<Digest> {
    let spec = &task.spec;
    if spec.no_cache {
        return None;
    }
    // postcard: the wire encoding, field by field in declaration order, never `Debug` text.
    let bytes = postcard::to_allocvec(&(
        "ossb-task-v1",
        (&task.platform, task.stage, &task.build_platform),
        (&spec.dockerfile, &spec.dockerfile_name, &spec.build_args),
        (
            &spec.target,
            &spec.labels,
            &spec.context,
            (&spec.build_contexts, &spec.context_sources),
        ),
        &spec.cache_from,
        (&spec.network, &spec.extra_hosts, &spec.annotations),
        (
            &spec.compression,
            spec.oci_media_types,
            spec.source_date_epoch,
            (spec.export.compression_level, spec.export.force_compression),
        ),
        // A task asked for the SBOM returns one (and the extra ones): not the same outcome.
        spec.attest.sbom,
    ))
    .ok()?;
    Some(Digest::of(&bytes))
}
