//! The platforms' manifests merged into the image (an index for several, or with
//! attestations) and pushed last.

use super::*;

/// Merges the platforms' manifests (an index for several) and pushes the top under each tag,
/// last: the workers pushed the manifests and their blobs by digest already. A push asked to
/// be attested gets each platform's attestation manifest, written here from every task's
/// facts and the exporting task's SBOM (the engine's writer, as `ossb build`'s), pushed by
/// digest before the index that lists it after the images. `started`: when the build began;
/// `state_dir`: the coordinator's (the provenance stamps a rebuild that runs nothing keeps).
pub(super) async fn merge_and_push(
    spec: &BuildSpec,
    outcomes: Vec<PlatformOutcome>,
    cache_peers: Vec<String>,
    started: i64,
    state_dir: &Path,
) -> Result<BuiltImage, Failure> {
    let bad =
        |e: serde_json::Error| failure(format!("a worker sent an invalid descriptor: {e}"), 1);
    let descriptors: Vec<Descriptor> = outcomes
        .iter()
        .map(|o| serde_json::from_str(&o.descriptor_json))
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    let types = media_types(spec);
    // The attestation manifests go in a scratch store, pushed with the index. The registry
    // CAs the client sent are written beside it, for as long as the push lasts.
    let scratch = tempfile::tempdir().map_err(|e| failure(e.to_string(), 1))?;
    let store =
        BlobStore::open(scratch.path().join("store")).map_err(|e| failure(e.to_string(), 1))?;
    let (attested, statement_files) =
        match spec.attest != ossb_protocol::cluster::AttestSpec::default() {
            true => attest(spec, &outcomes, &descriptors, &store, started, state_dir)?,
            false => (Vec::new(), Vec::new()),
        };
    let index = |manifests: &[Descriptor]| {
        ossb_engine::build::index_of(
            manifests,
            types,
            &crate::context::annotations_of(spec)
                .unwrap_or_default()
                .index,
        )
    };
    let (top, top_bytes, manifests) = match (descriptors.as_slice(), outcomes.as_slice()) {
        ([one], [o]) if attested.is_empty() => (one.clone(), o.manifest.clone(), Vec::new()),
        _ => {
            let (top, bytes) = index(&[descriptors.clone(), attested.clone()].concat());
            // The attestation manifests and their blobs travel with the image's manifests:
            // small, and only here (a download writes them into an OCI layout).
            let mut manifests: Vec<Vec<u8>> = outcomes.iter().map(|o| o.manifest.clone()).collect();
            for attestation in &attested {
                manifests.extend(attestation_blobs(&store, attestation)?);
            }
            (top, bytes, manifests)
        }
    };
    let mut pushed = Vec::new();
    if spec.push {
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
        let export = crate::context::export_of(spec);
        for tag in &spec.tags {
            let reference = parse_reference(tag).map_err(|e| failure(e.to_string(), 2))?;
            for attestation in &attested {
                push_by_digest(&registry, &store, &reference, attestation).await?;
            }
            // The tag, and by digest with name-canonical; by digest alone with push-by-digest.
            let references = ossb_engine::build::push_references(tag, &top.digest, &export)
                .map_err(|e| failure(e.to_string(), 2))?;
            for reference in references {
                registry
                    .push(&reference, &store, &[], &top_bytes, &top.media_type)
                    .await
                    .map_err(|e| failure(e.to_string(), 1))?;
                tracing::info!(reference = %reference.whole(), digest = %top.digest, "pushed");
                pushed.push(ossb_engine::build::pushed_name(&reference, &top.digest));
            }
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
        statement_files,
    })
}

/// The attestation manifests written, and the file name of each statement (by digest) in a
/// local export.
type Attested = (Vec<Descriptor>, Vec<(Digest, String)>);

/// Writes each platform's attestation manifest into `store`; their descriptors, and the file
/// name of each statement in a local export.
fn attest(
    spec: &BuildSpec,
    outcomes: &[PlatformOutcome],
    descriptors: &[Descriptor],
    store: &BlobStore,
    started: i64,
    state_dir: &Path,
) -> Result<Attested, Failure> {
    let inputs = crate::attest::inputs_of(spec);
    let finished = ossb_engine::build::now();
    let ran_nothing = outcomes.iter().all(|o| o.run == 0);
    let attestations: Vec<ossb_engine::attestations::Attestation> = outcomes
        .iter()
        .zip(descriptors)
        .map(|(o, d)| {
            let platform = d
                .platform
                .as_ref()
                .map(|p| p.platform())
                .unwrap_or_else(ossb_protocol::Platform::host);
            let facts = crate::attest::facts_from_wire(&o.facts);
            ossb_engine::attestations::Attestation::new(
                &inputs,
                platform,
                &facts,
                o.sbom.clone(),
                started,
                finished,
            )
            .with_extra_sboms(o.extra_sboms.clone())
            .keep_stamp_when_unchanged(state_dir, &d.digest, ran_nothing)
        })
        .collect();
    let pairs: Vec<_> = descriptors.iter().zip(&attestations).collect();
    let err = |e: ossb_attest::AttestError| failure(format!("writing the attestations: {e}"), 1);
    let manifests =
        ossb_engine::attestations::write_manifests(store, &inputs, &pairs).map_err(err)?;
    let files = ossb_engine::attestations::statement_files(&inputs, &pairs).map_err(err)?;
    Ok((manifests, files))
}

/// Pushes an attestation manifest and its blobs to `reference`'s repository, by digest.
async fn push_by_digest(
    registry: &Registry,
    store: &BlobStore,
    reference: &ossb_image::Reference,
    manifest: &Descriptor,
) -> Result<(), Failure> {
    let err = |e: String| {
        failure(
            format!("pushing an attestation to {}: {e}", reference.whole()),
            1,
        )
    };
    let bytes = store
        .read(&manifest.digest)
        .map_err(|e| err(e.to_string()))?;
    let parsed: ossb_image::oci::Manifest =
        serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
    let by_digest = parse_reference(&format!(
        "{}/{}@{}",
        reference.registry(),
        reference.repository(),
        manifest.digest
    ))
    .map_err(|e| err(e.to_string()))?;
    let blobs: Vec<Descriptor> = parsed
        .layers
        .iter()
        .cloned()
        .chain(std::iter::once(parsed.config))
        .collect();
    registry
        .push(&by_digest, store, &blobs, &bytes, &manifest.media_type)
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// An attestation manifest's bytes, then its config's and its statements'.
fn attestation_blobs(store: &BlobStore, manifest: &Descriptor) -> Result<Vec<Vec<u8>>, Failure> {
    let err = |e: String| failure(format!("reading an attestation back: {e}"), 1);
    let bytes = store
        .read(&manifest.digest)
        .map_err(|e| err(e.to_string()))?;
    let parsed: ossb_image::oci::Manifest =
        serde_json::from_slice(&bytes).map_err(|e| err(e.to_string()))?;
    let mut out = vec![bytes];
    for blob in parsed.layers.iter().chain(std::iter::once(&parsed.config)) {
        out.push(store.read(&blob.digest).map_err(|e| err(e.to_string()))?);
    }
    Ok(out)
}
