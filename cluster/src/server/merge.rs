//! The platforms' manifests merged into the image (an index for several) and pushed last.

use super::*;

/// Merges the platforms' manifests (an index for several) and pushes the top under each tag,
/// last: the workers pushed the manifests and their blobs by digest already.
pub(super) async fn merge_and_push(
    spec: &BuildSpec,
    outcomes: Vec<PlatformOutcome>,
    cache_peers: Vec<String>,
) -> Result<BuiltImage, Failure> {
    let bad =
        |e: serde_json::Error| failure(format!("a worker sent an invalid descriptor: {e}"), 1);
    let descriptors: Vec<Descriptor> = outcomes
        .iter()
        .map(|o| serde_json::from_str(&o.descriptor_json))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    let types = media_types(spec);
    let (top, top_bytes, manifests) = match (descriptors.as_slice(), outcomes.as_slice()) {
        ([one], [o]) => (one.clone(), o.manifest.clone(), Vec::new()),
        _ => {
            let (top, bytes) = ossb_engine::build::index_of(
                &descriptors,
                types,
                &crate::context::annotations_of(spec)
                    .unwrap_or_default()
                    .index,
            );
            (
                top,
                bytes,
                outcomes.iter().map(|o| o.manifest.clone()).collect(),
            )
        }
    };
    let mut pushed = Vec::new();
    if spec.push {
        // An empty store: pushing the top alone reads nothing from it. The registry CAs the
        // client sent are written beside it, for as long as the push lasts.
        let scratch = tempfile::tempdir().map_err(|e| failure(e.to_string(), 1))?;
        let store =
            BlobStore::open(scratch.path().join("store")).map_err(|e| failure(e.to_string(), 1))?;
        let certificates = TaskFiles::write(
            &BuildSpec {
                registry_certificates: spec.registry_certificates.clone(),
                ..Default::default()
            },
            &store,
            scratch.path(),
        )
        .map_err(|e| failure(e, 1))?
        .certificates;
        let registry = Registry::with_config(
            &registry_options(spec, &certificates),
            &registry_config(spec),
        )
        .map_err(|e| failure(e.to_string(), 1))?;
        for tag in &spec.tags {
            let reference = parse_reference(tag).map_err(|e| failure(e.to_string(), 2))?;
            registry
                .push(&reference, &store, &[], &top_bytes, &top.media_type)
                .await
                .map_err(|e| failure(e.to_string(), 1))?;
            tracing::info!(reference = %reference.whole(), digest = %top.digest, "pushed");
            pushed.push(format!("{}@{}", reference.whole(), top.digest));
        }
    }
    let mut blobs: Vec<Digest> = outcomes.iter().flat_map(|o| o.blobs.clone()).collect();
    blobs.sort();
    blobs.dedup();
    Ok(BuiltImage {
        descriptor_json: serde_json::to_string(&top).unwrap_or_default(),
        top: top_bytes,
        manifests,
        blobs,
        config: match outcomes.as_slice() {
            [one] => Some(one.config),
            _ => None,
        },
        pushed,
        run: outcomes.iter().map(|o| o.run).sum(),
        cached: outcomes.iter().map(|o| o.cached).sum(),
        size: outcomes.iter().map(|o| o.size).sum(),
        cache_peers,
    })
}
