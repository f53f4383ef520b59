//! The command line, as DESIGN.md fixes it (docker build / buildx conventions).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};
use ossb_engine::remote_cache::{parse_cache, parse_cache_export};
use ossb_engine::{Annotations, BuildRequest, BuildResult, Output};
use ossb_image::layer::Compression;
use ossb_image::oci::MediaTypes;
use ossb_image::registry::{Mirror, RegistryConfig, RegistryOptions};
use ossb_protocol::{Digest, Platform};
use ossb_worker::mounts::{Secret, SecretBytes};

/// ossb: build OCI images from Dockerfiles, without a daemon and without privileges.
#[derive(Parser, Debug)]
#[command(name = "ossb", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build an image from a Dockerfile and a context directory.
    Build(Box<BuildArgs>),
    /// Build the targets of bake files (docker-bake.hcl, docker-bake.json, compose), as
    /// `docker buildx bake`.
    Bake(Box<crate::bake::BakeArgs>),
    /// Inspect or prune the build cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Tools for looking inside ossb.
    Debug {
        #[command(subcommand)]
        command: DebugCommand,
    },
    /// Certificates of a build cluster (every connection is mutual TLS).
    Certs {
        #[command(subcommand)]
        command: crate::cluster::CertsCommand,
    },
    /// Serve the peer cache of a build cluster.
    CacheNode(crate::cluster::CacheNodeArgs),
    /// Run a build cluster's coordinator: accepts builds from ossb-submit, schedules them on
    /// workers, pushes the merged index.
    Coordinator(crate::cluster::CoordinatorArgs),
    /// Run a build cluster's worker: builds what the coordinator gives it.
    Worker(Box<crate::cluster::WorkerArgs>),
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Size, entries and hit rate of recent builds.
    Info {
        /// The cache directory (default $OSSB_CACHE_DIR, else $XDG_CACHE_HOME/ossb).
        #[arg(long = "cache-dir", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Remove cached steps and blobs (waits for running builds on the same cache to finish).
    Prune {
        /// Remove everything, cache mounts included.
        #[arg(long)]
        all: bool,
        /// Remove the least recently used until the cache is at most this size (e.g. 10GB).
        #[arg(long = "keep-storage", value_name = "SIZE")]
        keep_storage: Option<String>,
        /// Only what matches: until=DURATION (unused for that long, e.g. 24h).
        #[arg(long, value_name = "until=DURATION")]
        filter: Vec<String>,
        /// The cache directory (default $OSSB_CACHE_DIR, else $XDG_CACHE_HOME/ossb).
        #[arg(long = "cache-dir", value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DebugCommand {
    /// Print a Dockerfile's parse tree in BuildKit's dump format.
    Parse {
        /// The Dockerfile (`-` for stdin).
        file: String,
    },
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// tty on a terminal, plain otherwise.
    Auto,
    /// Plain lines with a live status line (running step, elapsed time, estimate).
    Tty,
    /// One line per event.
    Plain,
    /// One JSON object per event, log line and error, on stdout (for log collectors).
    Json,
    /// Nothing but errors and, on success, the image ID on stdout.
    Quiet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// Rootless if user namespaces work, else chroot.
    Auto,
    /// A user namespace with mount, pid, uts and ipc namespaces per RUN.
    Rootless,
    /// chroot only, for pods that refuse namespaces (needs root in the container).
    Chroot,
}

impl From<Isolation> for ossb_worker::sandbox::Isolation {
    fn from(i: Isolation) -> Self {
        match i {
            Isolation::Auto => Self::Auto,
            Isolation::Rootless => Self::Rootless,
            Isolation::Chroot => Self::Chroot,
        }
    }
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The build context directory.
    pub context: PathBuf,
    /// The Dockerfile (default: CONTEXT/Dockerfile; `-` reads it from stdin).
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    pub file: Option<String>,
    /// Name and tag of the image, e.g. registry:5000/app:1.0 (repeatable).
    #[arg(short = 't', long = "tag", value_name = "REF")]
    pub tags: Vec<String>,
    /// Target platforms, comma-separated, e.g. linux/amd64,linux/arm64 (default: this
    /// machine's). Several platforms give one image per platform and an index over them.
    #[arg(long, value_name = "PLATFORMS")]
    pub platform: Option<String>,
    /// A build argument, KEY=VALUE (or KEY to take it from the environment; repeatable).
    #[arg(long = "build-arg", value_name = "KEY=VALUE")]
    pub build_args: Vec<String>,
    /// The stage to build (default: the last).
    #[arg(long, value_name = "STAGE")]
    pub target: Option<String>,
    /// Push the image to the registry of each tag (same as --output type=registry).
    #[arg(long)]
    pub push: bool,
    /// Where the image goes: type=registry | type=oci,dest=PATH[,tar=false] |
    /// type=docker,dest=PATH | type=local,dest=DIR (or a bare DIR); any may add
    /// compression=gzip|zstd|uncompressed and oci-mediatypes=true|false.
    #[arg(short = 'o', long = "output", value_name = "SPEC")]
    pub outputs: Vec<String>,
    /// Run every step, using no cached result.
    #[arg(long = "no-cache")]
    pub no_cache: bool,
    /// The cache directory (default $OSSB_CACHE_DIR, else $XDG_CACHE_HOME/ossb).
    #[arg(long = "cache-dir", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Read cached steps from a registry repository (REF or type=registry,ref=REF) or a
    /// directory (type=local,src=DIR) (repeatable).
    #[arg(long = "cache-from", value_name = "REF")]
    pub cache_from: Vec<String>,
    /// Store every step's result in a registry repository (REF or type=registry,ref=REF) or a
    /// directory (type=local,dest=DIR).
    #[arg(long = "cache-to", value_name = "REF")]
    pub cache_to: Option<String>,
    /// How progress is shown.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Print only the image ID on success (and errors): --progress quiet.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// An OCI annotation, [TYPE:]KEY=VALUE (repeatable), TYPE being manifest (the default),
    /// manifest-descriptor or index (multi-platform builds), or several joined by commas.
    #[arg(long = "annotation", value_name = "[TYPE:]KEY=VALUE")]
    pub annotations: Vec<String>,
    /// A label for the image, KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// A registry whose TLS certificate is not verified, or that speaks plain HTTP when it has
    /// no TLS, HOST:PORT (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// A pull-through mirror, REGISTRY=HOST:PORT (repeatable), e.g. docker.io=mirror:5000: tried
    /// first for pulls from REGISTRY, which is used when the mirror fails.
    #[arg(long = "registry-mirror", value_name = "REGISTRY=HOST:PORT")]
    pub registry_mirrors: Vec<String>,
    /// A CA certificate to trust for a registry, HOST:PORT=CAFILE (repeatable).
    #[arg(long = "registry-certificate", value_name = "HOST:PORT=CAFILE")]
    pub registry_certificates: Vec<String>,
    /// How RUN steps are isolated.
    #[arg(long, value_enum, default_value = "auto")]
    pub isolation: Isolation,
    /// The network of RUN steps that do not name one (RUN --network): default, none or host.
    /// default and host are the same here: the network ossb itself runs in.
    #[arg(long, value_name = "MODE", default_value = "default")]
    pub network: ossb_dockerfile::Network,
    /// A line for every RUN's /etc/hosts, NAME:IP (or NAME=IP; repeatable).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_hosts: Vec<String>,
    /// Accepted as docker's: ossb always resolves base image tags at their registry.
    #[arg(long)]
    pub pull: bool,
    /// A SLSA provenance attestation, as buildx: true, false, or mode=min|max,version=v0.2|v1,
    /// builder-id=URL. On by default (mode=min) for a pushed image, unless
    /// BUILDX_NO_DEFAULT_ATTESTATIONS=1.
    #[arg(long, value_name = "VALUE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub provenance: Option<String>,
    /// An SPDX SBOM attestation of each platform's image, as buildx: true or false.
    #[arg(long, value_name = "VALUE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub sbom: Option<String>,
    /// An attestation, as buildx: type=provenance[,mode=max,...] or type=sbom (repeatable).
    #[arg(long, value_name = "type=TYPE,...")]
    pub attest: Vec<String>,
    /// buildx's --load (into the Docker daemon): refused, ossb has no daemon; write a
    /// `docker load` archive with --output type=docker,dest=FILE instead.
    #[arg(long)]
    pub load: bool,
    /// A named context, NAME=VALUE (repeatable): a directory, docker-image://REF,
    /// oci-layout://PATH[:TAG][@DIGEST], an https:// tarball or a git URL. `FROM NAME`,
    /// `COPY --from=NAME` and `RUN --mount from=NAME` read it; it replaces a stage named NAME.
    #[arg(long = "build-context", value_name = "NAME=VALUE")]
    pub build_contexts: Vec<String>,
    /// A secret for RUN --mount=type=secret: id=ID,src=PATH, or id=ID,env=VAR to take it from
    /// the environment (repeatable). Never stored in the image, its history or the logs.
    #[arg(long = "secret", value_name = "id=ID,src=PATH|env=VAR")]
    pub secrets: Vec<String>,
    /// An SSH agent for RUN --mount=type=ssh: `default` ($SSH_AUTH_SOCK) or ID=SOCKET
    /// (repeatable). The step gets a forwarded socket, never the agent's keys.
    #[arg(long = "ssh", value_name = "default|ID=SOCKET")]
    pub ssh: Vec<String>,
    /// Write build metadata (containerimage.digest, ...) as JSON to this file.
    #[arg(long = "metadata-file", value_name = "PATH")]
    pub metadata_file: Option<PathBuf>,
    /// Write the image ID (the config digest) to this file.
    #[arg(long, value_name = "PATH")]
    pub iidfile: Option<PathBuf>,
    /// `--call` and `--check` (build checks, outline, targets instead of a build).
    #[command(flatten)]
    pub call: crate::check::CallFlags,
}

/// What the CLI does itself after the build.
pub struct Extras {
    pub progress: ProgressMode,
    /// Said before the build starts.
    pub warnings: Vec<String>,
    metadata_file: Option<PathBuf>,
    iidfile: Option<PathBuf>,
}

/// The image ID of `--iidfile` and `--quiet`. As BuildKit: the config digest for one platform,
/// the index digest for several.
pub fn image_id(result: &BuildResult) -> Digest {
    result.config_digest.unwrap_or(result.image.digest)
}

impl Extras {
    /// Writes --metadata-file and --iidfile.
    pub fn write_files(
        &self,
        req: &BuildRequest,
        result: &BuildResult,
        misses: &[crate::display::CacheMiss],
    ) -> Result<(), String> {
        if let Some(path) = &self.iidfile {
            let id = image_id(result);
            ossb_image::export::write_file_atomically(path, id.to_string().as_bytes())
                .map_err(|e| e.to_string())?;
        }
        if let Some(path) = &self.metadata_file {
            let text =
                serde_json::to_string_pretty(&metadata(req, result, misses)).unwrap_or_default();
            ossb_image::export::write_file_atomically(path, text.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// What `--metadata-file` says of a build, with buildx's keys, and ossb's own
/// `ossb.cache-misses`: each step that ran although an earlier build had it, and why.
pub fn metadata(
    req: &BuildRequest,
    result: &BuildResult,
    misses: &[crate::display::CacheMiss],
) -> serde_json::Value {
    let mut meta = serde_json::Map::new();
    meta.insert(
        "containerimage.digest".into(),
        result.image.digest.to_string().into(),
    );
    if let Some(config) = &result.config_digest {
        meta.insert(
            "containerimage.config.digest".into(),
            config.to_string().into(),
        );
    }
    meta.insert(
        "containerimage.descriptor".into(),
        serde_json::to_value(&result.image).unwrap_or_default(),
    );
    if !req.tags.is_empty() {
        meta.insert("image.name".into(), req.tags.join(",").into());
    }
    meta.insert(
        "ossb.cache-misses".into(),
        crate::display::MissLog::json(misses),
    );
    meta.into()
}

fn key_values(
    flag: &str,
    values: &[String],
    from_env: bool,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for v in values {
        match v.split_once('=') {
            Some((k, val)) if !k.is_empty() => {
                out.insert(k.to_string(), val.to_string());
            }
            None if from_env && !v.is_empty() => {
                // As docker: `--build-arg NAME` takes NAME from the environment, if set.
                if let Ok(val) = std::env::var(v) {
                    out.insert(v.clone(), val);
                }
            }
            _ => return Err(format!("{flag} {v:?}: expected KEY=VALUE")),
        }
    }
    Ok(out)
}

/// The exporter options an `--output` may carry beside its type and destination, as BuildKit's
/// image, registry, OCI and docker exporters take them: layer settings (`compression=`,
/// `compression-level=`, `force-compression=`, `oci-mediatypes=`, `rewrite-timestamp=`), the
/// attestations' layout (`oci-artifact=`) and the image's names (`name=`, `push-by-digest=`,
/// `name-canonical=`). `None`: not given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ExporterSettings {
    compression: Option<Compression>,
    compression_level: Option<u32>,
    force_compression: Option<bool>,
    media_types: Option<MediaTypes>,
    rewrite_timestamp: Option<bool>,
    oci_artifact: Option<bool>,
    names: Option<Vec<String>>,
    push_by_digest: Option<bool>,
    name_canonical: Option<bool>,
}

impl ExporterSettings {
    /// Takes `other`'s options that are not given yet; an option both give differently is an
    /// error (one build writes one image).
    fn merge(&mut self, other: &ExporterSettings) -> Result<(), String> {
        fn take<T: PartialEq + Clone>(
            mine: &mut Option<T>,
            theirs: &Option<T>,
            name: &str,
        ) -> Result<(), String> {
            match (&*mine, theirs) {
                (Some(a), Some(b)) if a != b => Err(format!(
                    "--output: the outputs disagree on {name}; one build writes one image"
                )),
                (None, Some(b)) => {
                    *mine = Some(b.clone());
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        take(&mut self.compression, &other.compression, "compression")?;
        take(
            &mut self.compression_level,
            &other.compression_level,
            "compression-level",
        )?;
        take(
            &mut self.force_compression,
            &other.force_compression,
            "force-compression",
        )?;
        take(&mut self.media_types, &other.media_types, "oci-mediatypes")?;
        take(
            &mut self.rewrite_timestamp,
            &other.rewrite_timestamp,
            "rewrite-timestamp",
        )?;
        take(&mut self.oci_artifact, &other.oci_artifact, "oci-artifact")?;
        take(&mut self.names, &other.names, "name")?;
        take(
            &mut self.push_by_digest,
            &other.push_by_digest,
            "push-by-digest",
        )?;
        take(
            &mut self.name_canonical,
            &other.name_canonical,
            "name-canonical",
        )
    }
}

/// One CSV record's fields, as Go's `encoding/csv` (buildx's `csvvalue`) reads an `--output`: a
/// field that starts with `"` runs to the closing quote, commas included (`"name=a,b"`), and
/// `""` inside it is one quote.
fn csv_fields(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("a quoted field has no closing quote".into()),
                }
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Ok(out);
                }
                Some(',') => {}
                Some(_) => return Err("extraneous or missing \" in quoted-field".into()),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(field);
                        return Ok(out);
                    }
                    Some(',') => break,
                    Some('"') => return Err("bare \" in non-quoted-field".into()),
                    Some(c) => field.push(c),
                }
            }
        }
        out.push(field);
    }
}

/// A boolean exporter option as Go's `strconv.ParseBool` reads it (BuildKit's); `empty` is
/// what an empty value means (true for the options BuildKit takes bare, else an error).
fn parse_bool(spec: &str, name: &str, value: &str, empty: Option<bool>) -> Result<bool, String> {
    match value {
        "" if empty.is_some() => Ok(empty.unwrap_or_default()),
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        other => Err(format!(
            "--output {spec:?}: {name}={other} must be true or false"
        )),
    }
}

/// One `--output` value: `type=registry`, `type=image,push=true`, `type=oci,dest=PATH[,tar=false]`,
/// `type=docker,dest=PATH`, `type=local,dest=DIR`, `type=tar,dest=FILE`, `type=cacheonly`, or a
/// bare path (`type=local`, as buildx); fields as CSV (quotes keep commas); each may add the
/// exporter options of [`ExporterSettings`].
fn parse_output(spec: &str) -> Result<(Output, ExporterSettings), String> {
    if !spec.contains('=') && !spec.is_empty() {
        return Ok((
            Output::Local {
                dest: PathBuf::from(spec),
            },
            ExporterSettings::default(),
        ));
    }
    let mut fields = BTreeMap::new();
    for part in csv_fields(spec).map_err(|e| format!("--output {spec:?}: {e}"))? {
        match part.split_once('=') {
            Some((k, v)) => {
                fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
            None => {
                return Err(format!(
                    "--output {spec:?}: expected type=...,key=value (e.g. type=oci,dest=image.tar)"
                ))
            }
        }
    }
    // BuildKit takes these bare (`push-by-digest=`) as true.
    const BARE_TRUE: [&str; 6] = [
        "push",
        "push-by-digest",
        "name-canonical",
        "force-compression",
        "unpack",
        "store",
    ];
    let bool_field = |name: &str, default: bool| -> Result<bool, String> {
        match fields.get(name) {
            None => Ok(default),
            Some(v) => parse_bool(spec, name, v, BARE_TRUE.contains(&name).then_some(true)),
        }
    };
    let given = |name: &str| -> Result<Option<bool>, String> {
        fields
            .contains_key(name)
            .then(|| bool_field(name, false))
            .transpose()
    };
    let dest = |kind: &str| -> Result<PathBuf, String> {
        fields
            .get("dest")
            .map(PathBuf::from)
            .ok_or_else(|| format!("--output {spec:?}: type={kind} needs dest=PATH"))
    };
    let settings = ExporterSettings {
        compression: match fields.get("compression") {
            None => None,
            Some(name) => Some(
                name.parse::<Compression>()
                    .map_err(|e| format!("--output {spec:?}: {e}"))?,
            ),
        },
        compression_level: match fields.get("compression-level") {
            None => None,
            Some(v) => Some(v.parse::<u32>().map_err(|_| {
                format!(
                    "--output {spec:?}: compression-level={v} is not a level (gzip 0-9, zstd 0-22)"
                )
            })?),
        },
        force_compression: given("force-compression")?,
        media_types: given("oci-mediatypes")?.map(|oci| match oci {
            true => MediaTypes::Oci,
            false => MediaTypes::Docker,
        }),
        rewrite_timestamp: given("rewrite-timestamp")?,
        oci_artifact: given("oci-artifact")?,
        names: fields.get("name").map(|names| {
            names
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect()
        }),
        push_by_digest: given("push-by-digest")?,
        name_canonical: given("name-canonical")?,
    };
    if let (Some(level), Some(compression)) = (settings.compression_level, settings.compression) {
        ossb_engine::build::check_level(compression, level)
            .map_err(|e| format!("--output {spec:?}: {e}"))?;
    }
    if settings.oci_artifact == Some(true) && settings.media_types == Some(MediaTypes::Docker) {
        // BuildKit's words: an artifact manifest is an OCI one.
        return Err(format!("--output {spec:?}: exporter option \"oci-artifact=true\" conflicts with \"oci-mediatypes=false\""));
    }
    if bool_field("unpack", false)? {
        return Err(format!("--output {spec:?}: unpack=true unpacks the image into a containerd image store, and ossb has none: leave it out (push, or write type=oci / type=docker and load that)"));
    }
    // `store=` (keep the image in the daemon's store) is accepted and means nothing here, as
    // on BuildKit's OCI worker, which has no image store either.
    bool_field("store", true)?;
    let output = match fields.get("type").map(String::as_str) {
        Some("registry") => Output::Registry,
        Some("image") if bool_field("push", false)? => Output::Registry,
        Some("image") => return Err(format!("--output {spec:?}: type=image without push=true has no image store to go to here (there is no daemon); use type=registry, oci or docker")),
        Some("oci") => Output::Oci { dest: dest("oci")?, tar: bool_field("tar", true)? },
        Some("docker") => Output::Docker { dest: dest("docker")? },
        Some("local") => Output::Local { dest: dest("local")? },
        Some("tar") => Output::Tar { dest: dest("tar")? },
        Some("cacheonly") => Output::CacheOnly,
        Some(other) => return Err(format!("--output {spec:?}: unknown type {other:?} (expected registry, oci, docker, local, tar or cacheonly)")),
        None => return Err(format!("--output {spec:?}: missing type= (e.g. type=registry)")),
    };
    Ok((output, settings))
}

/// The variables that steer buildx's reading of the context's git facts.
fn git_env() -> BTreeMap<String, String> {
    ["BUILDX_GIT_INFO", "BUILDX_GIT_CHECK_DIRTY"]
        .into_iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect()
}

/// `--platform a,b`: each platform once, in the order given; the host's when absent.
fn parse_platforms(list: Option<&str>) -> Result<Vec<Platform>, String> {
    let Some(list) = list else {
        return Ok(vec![Platform::host()]);
    };
    let mut out: Vec<Platform> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p: Platform = item.parse().map_err(|e| format!("--platform: {e}"))?;
        if p.os != "linux" {
            return Err(format!("--platform {item}: only linux images can be built (the RUN sandbox runs Linux processes)"));
        }
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(format!("--platform {list:?}: no platform given"));
    }
    Ok(out)
}

/// `--build-context NAME=VALUE`: a directory, `docker-image://`, `oci-layout://`, an https
/// tarball or a git URL (`ossb_engine::ContextSource`); names as BuildKit matches them.
fn parse_build_contexts(
    specs: &[String],
) -> Result<BTreeMap<String, ossb_engine::ContextSource>, String> {
    let mut out = BTreeMap::new();
    for spec in specs {
        let (name, source) = ossb_engine::parse_build_context(spec).map_err(|e| e.to_string())?;
        out.insert(name, source);
    }
    Ok(out)
}

/// Parses `--secret` as buildx does: `id=ID` with `src=PATH` (`type=file`, the default) or
/// `env=VAR` (`type=env`, where `src=` names the variable); `id=ID` alone reads the variable ID
/// when it is set, else the file ID.
///
/// A secret from the environment stays in this process's memory: no file of it is written
/// anywhere (a build killed outright would leave one behind).
fn parse_secrets(specs: &[String]) -> Result<BTreeMap<String, Secret>, String> {
    let mut secrets = BTreeMap::new();
    for spec in specs {
        let usage = || format!("--secret {spec:?}: expected id=ID,src=PATH or id=ID,env=VAR");
        let (mut id, mut src, mut env, mut from_env) = (None, None, None, None);
        for part in spec.split(',') {
            match part.split_once('=') {
                Some(("id", v)) => id = Some(v.to_string()),
                Some(("src" | "source", v)) => src = Some(v.to_string()),
                Some(("env", v)) => env = Some(v.to_string()),
                Some(("type", "file")) => from_env = Some(false),
                Some(("type", "env")) => from_env = Some(true),
                Some(("type", other)) => {
                    return Err(format!(
                        "--secret {spec:?}: unsupported type {other:?} (file or env)"
                    ))
                }
                _ => return Err(usage()),
            }
        }
        let id = id.filter(|i| !i.is_empty()).ok_or_else(usage)?;
        if from_env == Some(true) && env.is_none() {
            env = src.take();
        }
        if from_env.is_none() && src.is_none() && env.is_none() {
            if std::env::var_os(&id).is_some() {
                env = Some(id.clone());
            } else {
                src = Some(id.clone());
            }
        }
        let secret = match (src, env) {
            (Some(src), None) => {
                let src = PathBuf::from(src);
                if !src.is_file() {
                    return Err(format!(
                        "--secret id={id}: {} is not a readable file",
                        src.display()
                    ));
                }
                Secret::File(src)
            }
            (None, Some(var)) => {
                use std::os::unix::ffi::OsStringExt;
                let value = std::env::var_os(&var).ok_or_else(|| {
                    format!("--secret id={id}: the environment variable {var} is not set")
                })?;
                Secret::Value(SecretBytes(value.into_vec()))
            }
            _ => return Err(usage()),
        };
        secrets.insert(id, secret);
    }
    Ok(secrets)
}

/// `--ssh` values as buildx reads them: `ID` (`default` included) is the agent of
/// `$SSH_AUTH_SOCK`, `ID=SOCKET` another agent's socket. buildx also takes key files; ossb
/// forwards agents only, and says how to load a key into one.
fn parse_ssh(specs: &[String]) -> Result<BTreeMap<String, PathBuf>, String> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = BTreeMap::new();
    for spec in specs {
        let (id, path) = match spec.split_once('=') {
            Some((id, path)) => (id, PathBuf::from(path)),
            None => match std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) {
                Some(sock) => (spec.as_str(), PathBuf::from(sock)),
                None => {
                    return Err(format!(
                        "--ssh {spec}: SSH_AUTH_SOCK is not set, so there is no agent to forward: start one (eval $(ssh-agent) && ssh-add KEY) or pass --ssh {spec}=SOCKET"
                    ))
                }
            },
        };
        if id.is_empty() || path.as_os_str().is_empty() || path.to_string_lossy().contains(',') {
            return Err(format!("--ssh {spec:?}: expected default, ID or ID=SOCKET (one agent socket; key files are not read: load them into an agent with ssh-add)"));
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {}
            Ok(_) => {
                return Err(format!(
                    "--ssh {id}: {} is not an agent socket; ossb forwards SSH agents, not key files: eval $(ssh-agent) && ssh-add {}, then --ssh {id}",
                    path.display(),
                    path.display()
                ))
            }
            Err(e) => return Err(format!("--ssh {id}: {}: {e}", path.display())),
        }
        out.insert(id.to_string(), path);
    }
    Ok(out)
}

/// `--annotation [TYPE[,TYPE...]:]KEY=VALUE` as buildx's, for the types ossb writes.
fn parse_annotations(
    specs: &[String],
    platforms: usize,
    media_types: MediaTypes,
) -> Result<Annotations, String> {
    let mut out = Annotations::default();
    if !specs.is_empty() && media_types == MediaTypes::Docker {
        return Err("--annotation needs OCI media types: Docker's manifests have no annotations (drop oci-mediatypes=false)".into());
    }
    for spec in specs {
        let (target, value) = spec
            .split_once('=')
            .ok_or_else(|| format!("--annotation {spec:?}: expected [TYPE:]KEY=VALUE"))?;
        let (types, key) = target.split_once(':').unwrap_or(("manifest", target));
        if key.is_empty() {
            return Err(format!("--annotation {spec:?}: expected [TYPE:]KEY=VALUE"));
        }
        if types.contains('[') {
            return Err(format!("--annotation {spec}: annotations for one platform ([PLATFORM]) are not supported: leave the platform out to annotate every one"));
        }
        for kind in types.split(',') {
            match kind {
                "index" if platforms <= 1 => return Err(format!("--annotation {spec}: a single-platform build has no index; annotate the manifest (drop `index:`)")),
                "index-descriptor" => return Err(format!("--annotation {spec}: index-descriptor annotations are not written by ossb; use index or manifest")),
                _ => {}
            }
            let map = out.of_kind(kind).ok_or_else(|| {
                format!(
                    "--annotation {spec}: unknown type {kind:?} ({})",
                    Annotations::KINDS.join(", ")
                )
            })?;
            map.insert(key.to_string(), value.to_string());
        }
    }
    Ok(out)
}

/// `--add-host NAME:IP` (or `NAME=IP`, which reads better for IPv6), as docker's.
fn parse_add_hosts(specs: &[String]) -> Result<Vec<(String, String)>, String> {
    specs
        .iter()
        .map(|spec| {
            let (name, ip) = spec
                .split_once('=')
                .or_else(|| spec.split_once(':'))
                .ok_or_else(|| format!("--add-host {spec:?}: expected NAME:IP"))?;
            if ip == "host-gateway" {
                return Err(format!("--add-host {spec}: host-gateway is the address a Docker daemon gives its containers' host; ossb runs steps in the host's network: use 127.0.0.1 or the host's address"));
            }
            let bare = ip.trim_start_matches('[').trim_end_matches(']');
            let valid_name = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
            if !valid_name || bare.parse::<std::net::IpAddr>().is_err() {
                return Err(format!(
                    "--add-host {spec:?}: expected NAME:IP with an IPv4 or IPv6 address"
                ));
            }
            Ok((name.to_string(), bare.to_string()))
        })
        .collect()
}

/// The cache directory when `--cache-dir` is not given.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OSSB_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("ossb");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache/ossb")
}

impl BuildArgs {
    /// How progress is shown: `--quiet` is `--progress quiet`.
    pub fn progress_mode(&self) -> ProgressMode {
        if self.quiet {
            ProgressMode::Quiet
        } else {
            self.progress
        }
    }

    /// Validates the flags and turns them into a build request.
    pub fn into_request(self) -> Result<(BuildRequest, Extras), String> {
        if self.load {
            return Err("--load needs a Docker daemon, and ossb has none: write an archive with --output type=docker,dest=image.tar and `docker load -i image.tar` (or `podman load`), or push with --push".into());
        }
        if self.quiet && !matches!(self.progress, ProgressMode::Auto | ProgressMode::Quiet) {
            return Err(format!(
                "--quiet and --progress {} cannot be used together: --quiet is --progress quiet",
                self.progress
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            ));
        }
        let platforms = parse_platforms(self.platform.as_deref())?;
        // Before the Dockerfile, which would otherwise be reported missing inside it.
        if !self.context.is_dir() {
            return Err(format!(
                "the build context {} is not a directory: give the directory whose files the Dockerfile's COPY and ADD read (`ossb build [OPTIONS] DIR`)",
                self.context.display()
            ));
        }
        let (dockerfile, dockerfile_name) = match self.file.as_deref() {
            Some("-") => {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| format!("reading the Dockerfile from stdin: {e}"))?;
                (s, "Dockerfile".to_string())
            }
            file => {
                let path = file
                    .map(PathBuf::from)
                    .unwrap_or_else(|| self.context.join("Dockerfile"));
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("cannot read the Dockerfile {}: {e}", path.display()))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("the Dockerfile {} is not valid UTF-8", path.display()))?;
                (text, path.display().to_string())
            }
        };
        let parsed = self
            .outputs
            .iter()
            .map(|o| parse_output(o))
            .collect::<Result<Vec<_>, _>>()?;
        let mut settings = ExporterSettings::default();
        for (_, s) in &parsed {
            settings.merge(s)?;
        }
        let mut warnings = Vec::new();
        // As buildx: -t names the image for every exporter; name= is for builds without one.
        let tags = match (&settings.names, self.tags.is_empty()) {
            (Some(names), true) => names.clone(),
            (Some(_), false) => {
                warnings.push(
                    "warning: --output name= is ignored: the image is named by -t, as buildx does"
                        .to_string(),
                );
                self.tags.clone()
            }
            (None, _) => self.tags.clone(),
        };
        let compression = settings.compression.unwrap_or(Compression::Gzip);
        if let Some(level) = settings.compression_level {
            ossb_engine::build::check_level(compression, level).map_err(|e| e.to_string())?;
            if compression == Compression::None {
                warnings.push(format!("warning: --output compression-level={level} has no effect on uncompressed layers"));
            }
        }
        let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.is_empty() => Some(
                v.parse::<i64>()
                    .map_err(|_| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"))?,
            ),
            _ => None,
        };
        // ossb clamps the mtimes of every layer it writes to SOURCE_DATE_EPOCH whenever it is
        // set, and leaves base images' layers as they are, as BuildKit's rewrite-timestamp.
        if settings.rewrite_timestamp == Some(true) && source_date_epoch.is_none() {
            warnings.push("warning: rewrite-timestamp is specified, but no source-date-epoch was found (set SOURCE_DATE_EPOCH)".to_string());
        }
        let mut outputs: Vec<Output> = parsed.into_iter().map(|(o, _)| o).collect();
        if self.push && !outputs.contains(&Output::Registry) {
            outputs.push(Output::Registry);
        }
        if outputs.contains(&Output::Registry) && tags.is_empty() {
            return Err(
                "--push needs at least one --tag (or --output ...,name=) naming the registry and repository".into(),
            );
        }
        let (mut attestations, attest_warnings) = crate::attest::parse(
            self.provenance.as_deref(),
            self.sbom.as_deref(),
            &self.attest,
            // BuildKit refuses attestations with Docker media types: no default one then.
            outputs.contains(&Output::Registry)
                && !crate::attest::no_default_from_env()
                && settings.media_types.unwrap_or_default() == MediaTypes::Oci,
        )?;
        attestations.oci_artifact = settings.oci_artifact.unwrap_or(false);
        if attestations.any() {
            // As buildx: the client reads the context's git facts (a cluster's workers never
            // see the work tree).
            let dockerfile = self.file.as_deref().filter(|f| *f != "-").map(Path::new);
            attestations.vcs = ossb_engine::attestations::vcs_of(
                &self.context,
                dockerfile,
                &git_env(),
            )
            .map_err(|e| {
                format!("reading the context's git facts (BUILDX_GIT_INFO=0 skips them): {e}")
            })?;
        }
        let mut certificates = Vec::new();
        for spec in &self.registry_certificates {
            let (host, file) = spec.split_once('=').ok_or_else(|| {
                format!("--registry-certificate {spec:?}: expected HOST:PORT=CAFILE")
            })?;
            certificates.push((host.to_string(), PathBuf::from(file)));
        }
        let cache_to = match &self.cache_to {
            Some(c) => Some(parse_cache_export(c).map_err(|e| format!("--cache-to: {e}"))?),
            None => None,
        };
        warnings.extend(attest_warnings);
        for (option, why) in cache_to.iter().flat_map(|c| &c.no_effect) {
            warnings.push(format!("--cache-to {option} has no effect: {why}"));
        }
        let context = self.context.clone();
        let secrets = parse_secrets(&self.secrets)?;
        let annotations = parse_annotations(
            &self.annotations,
            platforms.len(),
            settings.media_types.unwrap_or_default(),
        )?;
        let defer_compression = !BuildRequest::outputs_read_blobs(&outputs, cache_to.as_ref());
        let request = BuildRequest {
            context,
            dockerfile,
            dockerfile_name,
            tags,
            platforms,
            no_cache: self.no_cache,
            cache_from: self
                .cache_from
                .iter()
                .map(|c| parse_cache(c).map_err(|e| format!("--cache-from: {e}")))
                .collect::<Result<_, _>>()?,
            cache_to: cache_to.clone(),
            build_args: key_values("--build-arg", &self.build_args, true)?,
            target: self.target.clone(),
            labels: key_values("--label", &self.labels, false)?,
            outputs,
            cache_dir: self.cache_dir.clone().unwrap_or_else(default_cache_dir),
            registry: RegistryOptions {
                insecure: self.insecure_registries.clone(),
                certificates,
            },
            registry_config: RegistryConfig {
                mirrors: self
                    .registry_mirrors
                    .iter()
                    .map(|m| {
                        m.parse::<Mirror>()
                            .map_err(|e| format!("--registry-mirror {m:?}: {e}"))
                    })
                    .collect::<Result<_, _>>()?,
                ..Default::default()
            },
            defer_compression,
            compression,
            media_types: settings.media_types.unwrap_or_default(),
            export: ossb_engine::ExportOptions {
                compression_level: settings.compression_level,
                force_compression: settings.force_compression.unwrap_or(false),
                push_by_digest: settings.push_by_digest.unwrap_or(false),
                name_canonical: settings.name_canonical.unwrap_or(false),
            },
            source_date_epoch,
            sandbox_exe: std::env::current_exe()
                .map_err(|e| format!("cannot find the ossb binary: {e}"))?,
            isolation: self.isolation.into(),
            secrets,
            ssh: parse_ssh(&self.ssh)?,
            build_contexts: parse_build_contexts(&self.build_contexts)?,
            stage: None,
            built_stages: Vec::new(),
            build_platform: None,
            network: self.network,
            extra_hosts: parse_add_hosts(&self.add_hosts)?,
            annotations,
            attestations,
        };
        request.check().map_err(|e| e.to_string())?;
        Ok((
            request,
            Extras {
                progress: self.progress_mode(),
                metadata_file: self.metadata_file,
                iidfile: self.iidfile,
                warnings,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_outputs() {
        assert_eq!(parse_output("type=registry").unwrap().0, Output::Registry);
        assert_eq!(
            parse_output("type=docker,dest=a.tar").unwrap().0,
            Output::Docker {
                dest: "a.tar".into()
            }
        );
        assert_eq!(
            parse_output("out").unwrap().0,
            Output::Local { dest: "out".into() }
        );
        let (_, s) = parse_output("type=registry,compression=zstd,oci-mediatypes=false").unwrap();
        assert_eq!(
            (s.compression, s.media_types),
            (Some(Compression::Zstd), Some(MediaTypes::Docker))
        );
        assert!(parse_output("type=registry,compression=lz4").is_err());
        assert_eq!(
            parse_output("type=oci,dest=x.tar").unwrap().0,
            Output::Oci {
                dest: "x.tar".into(),
                tar: true
            }
        );
        assert_eq!(
            parse_output("type=oci,dest=dir,tar=false").unwrap().0,
            Output::Oci {
                dest: "dir".into(),
                tar: false
            }
        );
        assert!(parse_output("type=oci").is_err());
        assert!(parse_output("type=bogus").is_err());
        assert_eq!(
            parse_output("type=tar,dest=fs.tar").unwrap().0,
            Output::Tar {
                dest: "fs.tar".into()
            }
        );
        assert!(parse_output("type=tar").is_err());
        assert_eq!(parse_output("type=cacheonly").unwrap().0, Output::CacheOnly);
        assert!(parse_output("").is_err());
    }

    /// The image exporter's options as BuildKit takes them: CSV quoting for several names,
    /// Go's booleans (bare ones true), the level's range per compression, and what ossb
    /// cannot do refused by name.
    #[test]
    fn parses_image_exporter_options() {
        let (output, s) = parse_output(
            r#"type=image,"name=r:5000/a,r:5000/b",push=true,push-by-digest=,name-canonical=1,compression=zstd,compression-level=19,force-compression=true,rewrite-timestamp=True,store=false"#,
        )
        .unwrap();
        assert_eq!(output, Output::Registry);
        assert_eq!(
            s,
            ExporterSettings {
                compression: Some(Compression::Zstd),
                compression_level: Some(19),
                force_compression: Some(true),
                rewrite_timestamp: Some(true),
                names: Some(vec!["r:5000/a".into(), "r:5000/b".into()]),
                push_by_digest: Some(true),
                name_canonical: Some(true),
                ..Default::default()
            }
        );
        assert_eq!(
            csv_fields(r#"a=1,"b=x,""y""",c="#).unwrap(),
            ["a=1", r#"b=x,"y""#, "c="]
        );
        for (spec, error) in [
            (
                "type=registry,compression=gzip,compression-level=10",
                "compression-level=10 is out of range for compression=gzip (0-9)",
            ),
            (
                "type=registry,compression=zstd,compression-level=23",
                "compression-level=23 is out of range for compression=zstd (0-22)",
            ),
            (
                "type=registry,compression-level=-1",
                "compression-level=-1 is not a level",
            ),
            (
                "type=registry,force-compression=yes",
                "force-compression=yes must be true or false",
            ),
            (
                "type=registry,rewrite-timestamp=",
                "rewrite-timestamp= must be true or false",
            ),
            (
                "type=registry,unpack=true",
                "unpack=true unpacks the image into a containerd image store",
            ),
            (r#"type=registry,"name=a"#, "no closing quote"),
            (r#"type=registry,name="a,b""#, "bare \""),
        ] {
            let err = parse_output(spec).err().unwrap_or_default();
            assert!(err.contains(error), "{spec}: {err}");
        }
        assert!(parse_output("type=registry,unpack=false,store=true").is_ok());
    }

    #[test]
    fn parses_platform_lists() {
        let p = parse_platforms(Some("linux/amd64, linux/arm64,linux/amd64")).unwrap();
        assert_eq!(
            p.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            ["linux/amd64", "linux/arm64"]
        );
        assert!(parse_platforms(Some("windows/amd64")).is_err());
        assert!(parse_platforms(Some("linux")).is_err());
        assert_eq!(parse_platforms(None).unwrap(), vec![Platform::host()]);
    }

    #[test]
    fn parses_key_values() {
        let kv = key_values("--label", &["a=1".into(), "b=x=y".into()], false).unwrap();
        assert_eq!(kv["b"], "x=y");
        assert!(key_values("--label", &["=1".into()], false).is_err());
    }

    #[test]
    fn parses_secrets_from_files_and_the_environment_as_buildx() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-a-file").unwrap();
        let path = std::env::var("PATH").unwrap();
        let specs: Vec<String> = [
            format!("id=f,src={}", file.display()),
            format!("type=file,id=g,source={}", file.display()),
            "id=e,env=PATH".to_string(),
            "type=env,id=s,src=PATH".to_string(),
            // id alone: the variable when it is set, else the file of that name.
            "id=PATH".to_string(),
            format!("id={}", file.display()),
        ]
        .into();
        let secrets = parse_secrets(&specs).unwrap();
        for id in ["f", "g"] {
            assert_eq!(secrets[id], Secret::File(file.clone()));
        }
        assert_eq!(
            secrets[&file.display().to_string()].read().unwrap(),
            b"from-a-file"
        );
        // From the environment: held as values, never written to a file.
        for id in ["e", "s", "PATH"] {
            assert_eq!(
                secrets[id],
                Secret::Value(SecretBytes(path.clone().into_bytes())),
                "{id}"
            );
            assert!(
                !format!("{:?}", secrets[id]).contains(&path),
                "Debug shows the value"
            );
        }

        for (spec, error) in [
            (
                "id=x,env=OSSB_UNIT_TEST_UNSET_VARIABLE",
                "OSSB_UNIT_TEST_UNSET_VARIABLE is not set",
            ),
            (
                "id=x,src=/nonexistent/secret",
                "/nonexistent/secret is not a readable file",
            ),
            ("id=x,type=ssh", "unsupported type \"ssh\""),
            ("src=/etc/hostname", "expected id=ID"),
            ("id=x,src=/etc/hostname,env=PATH", "expected id=ID"),
            ("id=x,bogus=1", "expected id=ID"),
        ] {
            let err = parse_secrets(&[spec.to_string()]).err().unwrap_or_default();
            assert!(err.contains(error), "{spec}: {err}");
        }
    }

    /// The flags CI scripts carry over from `docker buildx build`: accepted where ossb does
    /// what they ask, refused with what to do instead where it cannot.
    #[test]
    fn docker_compatible_flags_are_accepted_or_refused_with_a_way_out() {
        use clap::Parser;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        let ctx = dir.path().to_str().unwrap();
        let request = |flags: &[&str]| -> Result<BuildRequest, String> {
            let mut argv = vec!["ossb", "build"];
            argv.extend_from_slice(flags);
            argv.push(ctx);
            let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
            let Command::Build(args) = cli.command else {
                panic!("not a build")
            };
            args.into_request().map(|(r, _)| r)
        };
        for ok in [
            &["--pull"][..],
            &["--provenance=false"],
            &["--sbom=false", "--provenance=0"],
            &["--network", "host"],
            &["-q"],
            &["--quiet", "--progress", "quiet"],
            &[
                "--add-host",
                "a.b:10.0.0.1",
                "--add-host=c=::1",
                "--add-host",
                "d:[fd00::2]",
            ],
        ] {
            request(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        assert_eq!(
            request(&["--network=none"]).unwrap().network,
            ossb_dockerfile::Network::None
        );
        assert_eq!(
            request(&["--add-host", "c=::1", "--add-host", "d:[fd00::2]"])
                .unwrap()
                .extra_hosts,
            [("c".into(), "::1".into()), ("d".into(), "fd00::2".into())]
        );
        // name= names the image when no -t does; push-by-digest takes repositories only.
        let named = request(&["-o", "type=registry,\"name=r:5000/a,r:5000/b\""]).unwrap();
        assert_eq!(named.tags, ["r:5000/a", "r:5000/b"]);
        assert_eq!(
            request(&["-t", "r:5000/t:1", "-o", "type=registry,name=r:5000/a"])
                .unwrap()
                .tags,
            ["r:5000/t:1"]
        );
        let by_digest = request(&[
            "-o",
            "type=image,name=r:5000/a,push=true,push-by-digest=true,name-canonical=true",
        ])
        .unwrap();
        assert!(by_digest.export.push_by_digest && by_digest.export.name_canonical);
        // Without compression=, the level is gzip's.
        let level = request(&["-o", "type=oci,dest=x,compression-level=9"]).unwrap();
        assert_eq!(
            (level.compression, level.export.compression_level),
            (Compression::Gzip, Some(9))
        );
        for (flags, error) in [
            (&["--load"][..], "--output type=docker,dest="),
            (&["--provenance=mode=full"], "expected min or max"),
            (&["--attest", "type=vex"], "unknown type"),
            (&["--network", "bridge"], "use default, none or host"),
            (&["-q", "--progress", "json"], "--quiet and --progress json"),
            (&["--add-host", "h:host-gateway"], "use 127.0.0.1"),
            (&["--add-host", "h:999.1.1.1"], "expected NAME:IP"),
            (&["--add-host", "h"], "expected NAME:IP"),
            (
                &["-o", "type=registry,name=r:5000/a:1,push-by-digest=true"],
                "can't push tagged ref r:5000/a:1 by digest",
            ),
            (
                &["-o", "type=registry,compression-level=12"],
                "compression-level=12 is out of range for compression=gzip (0-9)",
            ),
        ] {
            let err = request(flags).err().unwrap_or_default();
            assert!(err.contains(error), "{flags:?}: {err}");
        }
    }
}
