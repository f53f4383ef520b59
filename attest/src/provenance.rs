//! SLSA provenance predicates (v0.2 and v1) in the shape BuildKit gives them, from the facts
//! of one platform's build. See `FORMAT.md` for each field and where we differ.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use ossb_protocol::{Digest, Platform};
use serde_json::{json, Map, Value};

use crate::statement::{statement, Statement, Subject};
use crate::AttestError;

/// SLSA provenance v0.2's predicate type.
pub const PREDICATE_SLSA_V02: &str = "https://slsa.dev/provenance/v0.2";
/// SLSA provenance v1's predicate type.
pub const PREDICATE_SLSA_V1: &str = "https://slsa.dev/provenance/v1";
/// Our build type, for both versions: `FORMAT.md` defines what its parameters and
/// `buildConfig` mean (the parameters are BuildKit's; `buildConfig` is our step list).
pub const OSSB_BUILD_TYPE: &str = "https://ossb.dev/attestations/build@v1";
/// BuildKit's build type in v0.2 predicates.
pub const BUILDKIT_BUILD_TYPE_V02: &str = "https://mobyproject.org/buildkit@v1";
/// BuildKit's build type in v1 predicates.
pub const BUILDKIT_BUILD_TYPE_V1: &str =
    "https://github.com/moby/buildkit/blob/master/docs/attestations/slsa-definitions.md";
/// The frontend every ossb build is: BuildKit's Dockerfile frontend's name.
pub const DOCKERFILE_FRONTEND: &str = "dockerfile.v0";

// BuildKit's extension keys; kept so tools that read the VCS source from them (Docker Scout,
// buildx) find it in ours.
const METADATA_V02: &str = "https://mobyproject.org/buildkit@v1#metadata";
const HERMETIC_V02: &str = "https://mobyproject.org/buildkit@v1#hermetic";

/// Which SLSA provenance format (buildx's `version=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlsaVersion {
    /// `https://slsa.dev/provenance/v0.2`.
    V02,
    /// `https://slsa.dev/provenance/v1`.
    V1,
}

/// How much the provenance tells (buildx's `mode=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Inputs and parameters, without build args, labels, secret or SSH ids.
    Min,
    /// Everything: also build args, secret and SSH ids, the Dockerfile and every step.
    Max,
}

/// Something the build read from outside, with its digest: a base image, a file by URL, a
/// git commit, the context's checksum.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Material {
    /// What it is: `pkg:docker/NAME@TAG?platform=...`, the URL, the git URL.
    pub uri: String,
    /// The digest's algorithm: `sha256`, or `sha1` for a git commit.
    pub algorithm: String,
    /// The digest's lowercase hex value.
    pub hex: String,
}

impl Material {
    /// A material identified by a sha256 digest.
    pub fn sha256(uri: impl Into<String>, digest: &Digest) -> Material {
        Material {
            uri: uri.into(),
            algorithm: "sha256".into(),
            hex: digest.hex(),
        }
    }

    /// A git commit: sha1, or sha256 for a 64-digit commit (a sha256 repository), as BuildKit.
    pub fn git(url: impl Into<String>, commit: &str) -> Material {
        let algorithm = if commit.len() == 64 { "sha256" } else { "sha1" };
        Material {
            uri: url.into(),
            algorithm: algorithm.into(),
            hex: commit.to_ascii_lowercase(),
        }
    }
}

/// What a build step read: an earlier step's result or a material.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepInput {
    /// The step at this index of [`Provenance::steps`] (written `stepN`).
    Step(usize),
    /// The material at this index of [`Provenance::materials`] (written `material:N`).
    Material(usize),
}

/// One build step, as `mode=max` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildStep {
    /// The instruction as the image history shows it (expanded build args; never secrets).
    pub instruction: String,
    /// What it read.
    pub inputs: Vec<StepInput>,
    /// The platform it built for.
    pub platform: Platform,
    /// The layer it made, if any.
    pub layer: Option<Digest>,
    /// The cluster worker that ran it, if the build ran in a cluster.
    pub worker: Option<String>,
}

/// The Dockerfile, which `mode=max` includes as BuildKit does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// Its name as given (`Dockerfile`).
    pub filename: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// The facts of one platform's build that its provenance states.
///
/// Caller's contract: nothing here may hold a secret's value. There is no field for one:
/// secrets are named by id only, and `build_args` must be build args (`--build-arg`), never
/// secret values passed some other way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provenance {
    /// `builder.id`: who built (buildx's `builder-id`, e.g. a CI run URL); may be empty.
    pub builder_id: String,
    /// The build type; `None` writes [`OSSB_BUILD_TYPE`].
    pub build_type: Option<String>,
    /// Where the build definition came from when it is a git checkout: the repository URL
    /// and commit. Credentials in the URL are redacted.
    pub config_source: Option<Material>,
    /// The Dockerfile's path in the context (`configSource.entryPoint` / `path`).
    pub entry_point: String,
    /// `--build-arg` values (written `build-arg:NAME`; `mode=max` only).
    pub build_args: BTreeMap<String, String>,
    /// `--label` values (written `label:NAME`; `mode=max` only).
    pub labels: BTreeMap<String, String>,
    /// `--target`, if given.
    pub target: Option<String>,
    /// Ids of the secrets offered to the build (`mode=max` only); never their values.
    pub secret_ids: Vec<String>,
    /// Ids of the SSH agents offered to the build (`mode=max` only).
    pub ssh_ids: Vec<String>,
    /// Names of the local directories the build read (`context`, `dockerfile`, and the named
    /// contexts that are directories).
    pub locals: Vec<String>,
    /// The named contexts as the frontend received them (buildx's `context:NAME` values:
    /// `local:NAME`, `docker-image://REF`, a URL, `target:NAME`), by name; in both modes, with
    /// credentials in URLs redacted, as BuildKit.
    pub contexts: BTreeMap<String, String>,
    /// The platform of the machine that ran the build (BuildKit: its own platform).
    pub builder_platform: Platform,
    /// Every input with a digest.
    pub materials: Vec<Material>,
    /// The VCS facts of the context (`source`, `revision`), as BuildKit's `vcs:*` args.
    pub vcs: BTreeMap<String, String>,
    /// This build's id.
    pub invocation_id: String,
    /// When it started, seconds since the epoch.
    pub started: Option<i64>,
    /// When it finished.
    pub finished: Option<i64>,
    /// Whether the caller claims a rebuild gives the same bytes (buildx's `reproducible=`).
    pub reproducible: bool,
    /// Whether the build had no network access and all its inputs are materials.
    pub hermetic: bool,
    /// Whether the parameters are complete (`mode=min` leaving args out makes them not).
    pub parameters_complete: bool,
    /// Whether `materials` lists every input (a local context not listed makes it not).
    pub materials_complete: bool,
    /// How much to tell.
    pub mode: Mode,
    /// The steps, in build order (`mode=max` only).
    pub steps: Vec<BuildStep>,
    /// The Dockerfile (`mode=max` only).
    pub source: Option<SourceFile>,
}

/// The provenance statement of `p` about `subjects`, in SLSA `version`, as canonical JSON.
pub fn provenance_statement(
    version: SlsaVersion,
    subjects: &[Subject],
    p: &Provenance,
) -> Result<Statement, AttestError> {
    let (predicate_type, predicate) = match version {
        SlsaVersion::V02 => (PREDICATE_SLSA_V02, predicate_v02(p)?),
        SlsaVersion::V1 => (PREDICATE_SLSA_V1, predicate_v1(p)?),
    };
    Ok(Statement {
        predicate_type: predicate_type.into(),
        file_name: crate::local::PROVENANCE_FILE.into(),
        bytes: statement(subjects, predicate_type, predicate),
    })
}

fn predicate_v02(p: &Provenance) -> Result<Value, AttestError> {
    let (parameters, parameters_complete) = parameters(p);
    let mut config_source = config_source(p);
    if !p.entry_point.is_empty() {
        config_source.insert("entryPoint".into(), json!(p.entry_point));
    }
    let mut metadata = Map::new();
    metadata.insert("buildInvocationID".into(), json!(p.invocation_id));
    insert_time(&mut metadata, "buildStartedOn", p.started)?;
    insert_time(&mut metadata, "buildFinishedOn", p.finished)?;
    metadata.insert(
        "completeness".into(),
        json!({
            "parameters": parameters_complete,
            // BuildKit always claims it: the environment is the builder platform only.
            "environment": true,
            "materials": p.materials_complete,
        }),
    );
    metadata.insert("reproducible".into(), json!(p.reproducible));
    metadata.insert(METADATA_V02.into(), buildkit_metadata(p));
    if p.hermetic {
        metadata.insert(HERMETIC_V02.into(), json!(true));
    }
    let mut predicate = Map::new();
    predicate.insert("builder".into(), json!({ "id": p.builder_id }));
    predicate.insert(
        "buildType".into(),
        json!(p.build_type.as_deref().unwrap_or(OSSB_BUILD_TYPE)),
    );
    predicate.insert(
        "invocation".into(),
        json!({
            "configSource": config_source,
            "parameters": parameters,
            "environment": { "platform": p.builder_platform.to_string() },
        }),
    );
    if let Some(config) = build_config(p)? {
        predicate.insert("buildConfig".into(), config);
    }
    predicate.insert("metadata".into(), Value::Object(metadata));
    if !p.materials.is_empty() {
        predicate.insert("materials".into(), materials(p));
    }
    Ok(Value::Object(predicate))
}

fn predicate_v1(p: &Provenance) -> Result<Value, AttestError> {
    let (request, request_complete) = parameters(p);
    let mut config_source = config_source(p);
    if !p.entry_point.is_empty() {
        config_source.insert("path".into(), json!(p.entry_point));
    }
    let mut internal = Map::new();
    if let Some(config) = build_config(p)? {
        internal.insert("buildConfig".into(), config);
    }
    internal.insert(
        "builderPlatform".into(),
        json!(p.builder_platform.to_string()),
    );
    let mut definition = Map::new();
    definition.insert(
        "buildType".into(),
        json!(p.build_type.as_deref().unwrap_or(OSSB_BUILD_TYPE)),
    );
    definition.insert(
        "externalParameters".into(),
        json!({ "configSource": config_source, "request": request }),
    );
    definition.insert("internalParameters".into(), Value::Object(internal));
    if !p.materials.is_empty() {
        definition.insert("resolvedDependencies".into(), materials(p));
    }

    let mut metadata = Map::new();
    if !p.invocation_id.is_empty() {
        metadata.insert("invocationId".into(), json!(p.invocation_id));
    }
    insert_time(&mut metadata, "startedOn", p.started)?;
    insert_time(&mut metadata, "finishedOn", p.finished)?;
    metadata.insert("buildkit_metadata".into(), buildkit_metadata(p));
    if p.hermetic {
        metadata.insert("buildkit_hermetic".into(), json!(true));
    }
    metadata.insert(
        "buildkit_completeness".into(),
        json!({
            "request": request_complete,
            "resolvedDependencies": p.materials_complete,
        }),
    );
    if p.reproducible {
        metadata.insert("buildkit_reproducible".into(), json!(true));
    }
    Ok(json!({
        "buildDefinition": definition,
        "runDetails": {
            "builder": { "id": p.builder_id },
            "metadata": metadata,
        },
    }))
}

/// The request parameters (v0.2 `invocation.parameters`, v1 `externalParameters.request`)
/// and whether they are complete. In `mode=min`, as BuildKit, build args, labels, secret and
/// SSH ids are left out, and leaving out an arg or label makes the parameters incomplete.
fn parameters(p: &Provenance) -> (Value, bool) {
    let max = p.mode == Mode::Max;
    let mut args = BTreeMap::new();
    if max {
        for (k, v) in &p.build_args {
            args.insert(format!("build-arg:{k}"), v.clone());
        }
        for (k, v) in &p.labels {
            args.insert(format!("label:{k}"), v.clone());
        }
    }
    if let Some(target) = &p.target {
        args.insert("target".into(), target.clone());
    }
    for (name, value) in &p.contexts {
        args.insert(format!("context:{name}"), redact_credentials(value));
    }
    let left_out = !max && (!p.build_args.is_empty() || !p.labels.is_empty());
    let mut out = Map::new();
    out.insert("frontend".into(), json!(DOCKERFILE_FRONTEND));
    if !args.is_empty() {
        out.insert("args".into(), json!(args));
    }
    if max {
        if let Some(ids) = ids(&p.secret_ids) {
            out.insert("secrets".into(), ids);
        }
        if let Some(ids) = ids(&p.ssh_ids) {
            out.insert("ssh".into(), ids);
        }
    }
    let locals: BTreeSet<&String> = p.locals.iter().collect();
    if !locals.is_empty() {
        let locals: Vec<Value> = locals.into_iter().map(|n| json!({ "name": n })).collect();
        out.insert("locals".into(), Value::Array(locals));
    }
    (Value::Object(out), p.parameters_complete && !left_out)
}

/// `[{"id": ...}]`, sorted and each once, or `None` when there are none.
fn ids(ids: &[String]) -> Option<Value> {
    let ids: BTreeSet<&String> = ids.iter().collect();
    (!ids.is_empty()).then(|| Value::Array(ids.into_iter().map(|id| json!({ "id": id })).collect()))
}

fn config_source(p: &Provenance) -> Map<String, Value> {
    let mut out = Map::new();
    if let Some(m) = &p.config_source {
        out.insert("uri".into(), json!(redact_credentials(&m.uri)));
        out.insert("digest".into(), json!({ m.algorithm.clone(): m.hex }));
    }
    out
}

fn materials(p: &Provenance) -> Value {
    Value::Array(
        p.materials
            .iter()
            .map(|m| json!({ "uri": redact_credentials(&m.uri), "digest": { m.algorithm.clone(): m.hex } }))
            .collect(),
    )
}

/// BuildKit's metadata extension: the VCS facts always, the Dockerfile in `mode=max`.
fn buildkit_metadata(p: &Provenance) -> Value {
    let mut out = Map::new();
    let vcs: BTreeMap<&String, String> = p
        .vcs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| {
            (
                k,
                if k == "source" {
                    redact_credentials(v)
                } else {
                    v.clone()
                },
            )
        })
        .collect();
    if !vcs.is_empty() {
        out.insert("vcs".into(), json!(vcs));
    }
    if let (Mode::Max, Some(src)) = (p.mode, &p.source) {
        out.insert(
            "source".into(),
            json!({ "infos": [{
                "filename": src.filename,
                "language": "Dockerfile",
                "data": base64::engine::general_purpose::STANDARD.encode(&src.data),
            }] }),
        );
    }
    Value::Object(out)
}

/// `buildConfig` in `mode=max`: our steps where BuildKit writes its LLB.
fn build_config(p: &Provenance) -> Result<Option<Value>, AttestError> {
    if p.mode == Mode::Min {
        return Ok(None);
    }
    let mut steps = Vec::with_capacity(p.steps.len());
    for (i, step) in p.steps.iter().enumerate() {
        let mut inputs = Vec::with_capacity(step.inputs.len());
        for input in &step.inputs {
            inputs.push(match *input {
                StepInput::Step(n) if n < i => format!("step{n}"),
                StepInput::Material(n) if n < p.materials.len() => format!("material:{n}"),
                bad => {
                    return Err(AttestError::BadStepInput {
                        step: i,
                        input: format!("{bad:?}"),
                    })
                }
            });
        }
        let mut s = Map::new();
        s.insert("id".into(), json!(format!("step{i}")));
        s.insert("instruction".into(), json!(step.instruction));
        if !inputs.is_empty() {
            s.insert("inputs".into(), json!(inputs));
        }
        s.insert("platform".into(), json!(step.platform.to_string()));
        if let Some(layer) = &step.layer {
            s.insert("layer".into(), json!(layer.to_string()));
        }
        if let Some(worker) = &step.worker {
            s.insert("worker".into(), json!(worker));
        }
        steps.push(Value::Object(s));
    }
    Ok(Some(json!({ "steps": steps })))
}

fn insert_time(
    map: &mut Map<String, Value>,
    key: &str,
    secs: Option<i64>,
) -> Result<(), AttestError> {
    if let Some(secs) = secs {
        map.insert(
            key.into(),
            json!(ossb_protocol::rfc3339(secs).ok_or(AttestError::Timestamp(secs))?),
        );
    }
    Ok(())
}

/// A URL with its credentials masked, as BuildKit's `urlutil.RedactCredentials`: a user name
/// and a password both become `xxxxx` (`https://xxxxx:xxxxx@host/...`; a token given as the
/// user name alone, `https://xxxxx@host/...`). Anything that is not a `scheme://` URL (git's
/// `git@host:repo`) is returned unchanged, as Go's parser refuses it.
pub fn redact_credentials(uri: &str) -> String {
    const MASK: &str = "xxxxx";
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return uri.to_string();
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let userinfo = match (user.is_empty(), password) {
        (false, Some(_)) => format!("{MASK}:{MASK}"),
        (false, None) => MASK.to_string(),
        (true, Some(_)) => format!(":{MASK}"),
        (true, None) => String::new(),
    };
    format!("{scheme}://{userinfo}@{host}{tail}")
}

#[cfg(test)]
mod tests;
