//! Attestations as BuildKit writes them (issue 17): SLSA provenance and SPDX SBOM statements
//! in per-platform attestation manifests of the pushed index, checked with real consumers
//! (skopeo, podman) and the reference validators (in-toto-attestation, spdx-tools,
//! ntia-conformance-checker, in `.testenv/venv-attest`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::*;

const SECRET: &str = "s3cr3t-VALUE-never-in-an-attestation";

fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("valid JSON")
}

/// The validators' venv made by scripts/testenv.sh.
fn venv(env: &TestEnv) -> PathBuf {
    PathBuf::from(env.var("OSSB_TEST_ATTEST_VENV"))
}

/// Runs the in-toto-attestation model over statement files.
fn validate_statements(env: &TestEnv, files: &[&Path]) {
    let script = workspace().join("attest/tests/validate.py");
    let mut args = vec![script.to_str().unwrap()];
    args.extend(files.iter().map(|f| f.to_str().unwrap()));
    tool(venv(env).join("bin/python").to_str().unwrap(), &args)
        .success("validating the statements with in-toto-attestation");
}

/// Runs `pyspdxtools -i` and `ntia-checker` over an SPDX document.
fn validate_spdx(env: &TestEnv, document: &Path) {
    let bin = venv(env).join("bin");
    tool(
        bin.join("pyspdxtools").to_str().unwrap(),
        &["-i", document.to_str().unwrap()],
    )
    .success("pyspdxtools -i");
    let report = document.with_extension("ntia.json");
    tool(
        bin.join("ntia-checker").to_str().unwrap(),
        &[
            "-c",
            "ntia",
            "-r",
            "json",
            "-o",
            report.to_str().unwrap(),
            document.to_str().unwrap(),
        ],
    );
    let report = std::fs::read(&report).expect("ntia-checker wrote its report");
    let report = json(&report);
    assert_eq!(
        report["isNtiaConformant"],
        Value::Bool(true),
        "ntia-checker: {report:#}"
    );
}

/// The image pushed as `image`, copied with every manifest into an OCI layout by skopeo.
fn copy_all(image: &str, dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{image}"),
            &format!("oci:{}:x", layout.display()),
        ],
    )
    .success("skopeo copy --all");
    layout
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex)).expect("the blob is in the layout")
}

/// A two-platform push with `--provenance=mode=max --sbom=true`: the index holds the two
/// images and one attestation manifest per image (platform unknown/unknown, the reference
/// annotations), whose in-toto statements name that image's manifest digest as subject, with
/// the right predicate types. podman and skopeo still pick the image. The statements pass the
/// in-toto model, the SBOM spdx-tools and the NTIA checker, and the value of a secret the
/// build used is nowhere in the pushed blobs.
#[test]
fn a_two_platform_push_carries_provenance_and_sbom_per_image() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let busybox = format!("{reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {busybox}\nARG GREETING\nRUN --mount=type=secret,id=token test -s /run/secrets/token && echo \"$GREETING\" > /greeting\nCMD [\"cat\", \"/greeting\"]\n"
        ),
        &[],
    );
    let secret = dir.path().join("token");
    std::fs::write(&secret, SECRET).unwrap();
    let image = format!("{reg}/tests/{}:1", unique("attest"));
    ossb(
        &env,
        &dir.path().join("cache"),
        &[
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "--platform",
            "linux/amd64,linux/arm64",
            "--build-arg",
            "GREETING=hello",
            "--secret",
            &format!("id=token,src={}", secret.display()),
            "--provenance=mode=max",
            "--sbom=true",
            "-t",
            &image,
            "--push",
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build --provenance=mode=max --sbom=true --push");
    let index = json(inspect_raw(&image).stdout.as_bytes());
    let manifests = index["manifests"].as_array().expect("an index");
    assert_eq!(manifests.len(), 4, "{index:#}");
    let images: Vec<&Value> = manifests
        .iter()
        .filter(|m| m["platform"]["os"] == "linux")
        .collect();
    let attestations: Vec<&Value> = manifests
        .iter()
        .filter(|m| m["platform"]["os"] == "unknown")
        .collect();
    assert_eq!((images.len(), attestations.len()), (2, 2), "{index:#}");
    let layout = copy_all(&image, dir.path());
    let mut statements = Vec::new();
    for attestation in &attestations {
        assert_eq!(attestation["platform"]["architecture"], "unknown");
        let annotations = &attestation["annotations"];
        assert_eq!(
            annotations["vnd.docker.reference.type"],
            "attestation-manifest"
        );
        let subject = annotations["vnd.docker.reference.digest"].as_str().unwrap();
        assert!(
            images.iter().any(|i| i["digest"] == subject),
            "{subject} is not an image of the index"
        );
        let manifest = json(&blob(&layout, attestation["digest"].as_str().unwrap()));
        let mut types = BTreeSet::new();
        for layer in manifest["layers"].as_array().unwrap() {
            assert_eq!(layer["mediaType"], "application/vnd.in-toto+json");
            let kind = layer["annotations"]["in-toto.io/predicate-type"]
                .as_str()
                .unwrap()
                .to_string();
            let bytes = blob(&layout, layer["digest"].as_str().unwrap());
            let statement = json(&bytes);
            assert_eq!(statement["predicateType"], kind.as_str());
            assert_eq!(
                format!(
                    "sha256:{}",
                    statement["subject"][0]["digest"]["sha256"]
                        .as_str()
                        .unwrap()
                ),
                subject,
                "the statement's subject is not its image"
            );
            types.insert(kind.clone());
            statements.push((kind, bytes, statement));
        }
        assert_eq!(
            types,
            BTreeSet::from([
                "https://slsa.dev/provenance/v0.2".to_string(),
                "https://spdx.dev/Document".to_string()
            ])
        );
    }
    // mode=max: the steps, the build arg, the secret's id; the base image by digest.
    let (_, _, provenance) = statements
        .iter()
        .find(|(k, _, _)| k.contains("slsa"))
        .unwrap();
    let text = provenance.to_string();
    assert!(
        text.contains("GREETING") && text.contains("token"),
        "{provenance:#}"
    );
    let materials = provenance["predicate"]["materials"].as_array().unwrap();
    assert!(
        materials
            .iter()
            .any(|m| m["uri"].as_str().unwrap().contains("busybox")
                && m["digest"]["sha256"].is_string()),
        "{provenance:#}"
    );
    // The secret's value reaches no blob of the image.
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "the secret's value is in a pushed blob"
        );
    }
    // The validators.
    let files: Vec<PathBuf> = statements
        .iter()
        .enumerate()
        .map(|(i, (_, bytes, _))| {
            let f = dir.path().join(format!("statement{i}.json"));
            std::fs::write(&f, bytes).unwrap();
            f
        })
        .collect();
    validate_statements(
        &env,
        &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    let (_, _, sbom) = statements
        .iter()
        .find(|(k, _, _)| k.contains("spdx"))
        .unwrap();
    let document = dir.path().join("sbom.spdx.json");
    std::fs::write(&document, sbom["predicate"].to_string()).unwrap();
    validate_spdx(&env, &document);
    // Consumers pick the image, never an attestation.
    let amd64 = images
        .iter()
        .find(|i| i["platform"]["architecture"] == "amd64")
        .unwrap();
    let inspected = json(
        tool(
            "skopeo",
            &[
                "inspect",
                "--tls-verify=false",
                &format!("docker://{image}"),
            ],
        )
        .success("skopeo inspect")
        .stdout
        .as_bytes(),
    );
    // (skopeo's Digest is the index's; the config is the amd64 image's.)
    assert_eq!(inspected["Architecture"], "amd64", "{inspected:#}");
    assert_eq!(inspected["Os"], "linux");
    let amd64_manifest = json(&blob(&layout, amd64["digest"].as_str().unwrap()));
    let layers: Vec<&str> = amd64_manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let inspected_layers: Vec<&str> = inspected["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(inspected_layers, layers, "skopeo picked another manifest");
    let run = podman_run(&image, &[]).success("podman run of the attested image");
    assert_eq!(run.stdout.trim(), "hello");
}

/// `--provenance=false` and `BUILDX_NO_DEFAULT_ATTESTATIONS=1` give exactly the image of a
/// build that writes none (one platform: a plain manifest, the same digest as the OCI
/// export's); the default push carries a `mode=min` provenance about that same manifest.
/// With SOURCE_DATE_EPOCH the attested index is the same bytes build after build.
/// `ossb build -t image --push` of `ctx` with `flags` and the environment `vars`, caching in
/// `cache`; its progress output.
fn push_build(
    env: &TestEnv,
    cache: &Path,
    ctx: &Path,
    image: &str,
    flags: &[&str],
    vars: &[(&str, &str)],
) -> String {
    let reg = env.registry();
    let mut args = vec![
        "build",
        "--progress",
        "plain",
        "--insecure-registry",
        &reg,
        "-t",
        image,
        "--push",
    ];
    args.extend_from_slice(flags);
    args.push(ctx.to_str().unwrap());
    ossb_with(env, cache, &args, vars)
        .success(&format!("ossb build --push {image}"))
        .stderr
}

#[test]
fn attestations_are_off_on_request_and_reproducible() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let busybox = format!("{reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let ctx = context(
        dir.path(),
        &format!("FROM {busybox}\nRUN echo reproducible > /r\n"),
        &[],
    );
    let repo = format!("{reg}/tests/{}", unique("noattest"));
    let epoch = [("SOURCE_DATE_EPOCH", "1700000000")];
    // Each build from a cold cache of its own; `run` names it. The statements name the tag
    // (their subject), so builds compared for reproducibility push the same tag.
    let push_as = |tag: &str, run: &str, flags: &[&str], extra: &[(&str, &str)]| -> String {
        let image = format!("{repo}:{tag}");
        let cache = dir.path().join(format!("cache-{run}"));
        let env_vars: Vec<(&str, &str)> = epoch.iter().chain(extra).copied().collect();
        push_build(&env, &cache, &ctx, &image, flags, &env_vars);
        let raw = inspect_raw(&image).stdout;
        format!("sha256:{}", ossb_protocol::Digest::of(raw.as_bytes()).hex())
    };
    let push = |tag: &str, flags: &[&str], extra: &[(&str, &str)]| push_as(tag, tag, flags, extra);
    let off = push("off", &["--provenance=false"], &[]);
    let no_default = push("nodefault", &[], &[("BUILDX_NO_DEFAULT_ATTESTATIONS", "1")]);
    assert_eq!(off, no_default);
    let oci = dir.path().join("oci");
    ossb_with(
        &env,
        &dir.path().join("cache-oci"),
        &[
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "--output",
            &format!("type=oci,dest={},tar=false", oci.display()),
            ctx.to_str().unwrap(),
        ],
        &epoch,
    )
    .success("ossb build --output type=oci");
    let layout_index = json(&std::fs::read(oci.join("index.json")).unwrap());
    assert_eq!(
        layout_index["manifests"][0]["digest"].as_str().unwrap(),
        off,
        "an image without attestations differs from today's"
    );
    let plain = json(inspect_raw(&format!("{repo}:off")).stdout.as_bytes());
    assert_eq!(
        plain["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // The default: an index of the same image and its provenance (mode=min: no steps).
    let default = push("default", &[], &[]);
    let index = json(inspect_raw(&format!("{repo}:default")).stdout.as_bytes());
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2, "{index:#}");
    assert_eq!(manifests[0]["digest"].as_str().unwrap(), off);
    assert_eq!(
        manifests[1]["annotations"]["vnd.docker.reference.digest"]
            .as_str()
            .unwrap(),
        off
    );
    let layout = copy_all(&format!("{repo}:default"), dir.path());
    let attestation = json(&blob(&layout, manifests[1]["digest"].as_str().unwrap()));
    let statement = json(&blob(
        &layout,
        attestation["layers"][0]["digest"].as_str().unwrap(),
    ));
    assert_eq!(
        statement["predicateType"],
        "https://slsa.dev/provenance/v0.2"
    );
    assert!(
        statement["predicate"].get("buildConfig").is_none(),
        "{statement:#}"
    );
    // Reproducible: another build from a cold cache gives the same index.
    assert_eq!(push_as("default", "again", &[], &[]), default);
    let max = ["--provenance=mode=max,version=v1", "--sbom=true"];
    assert_eq!(
        push_as("max", "max1", &max, &[]),
        push_as("max", "max2", &max, &[])
    );
}

/// A rebuild that runs nothing keeps the provenance of the build that made its image (times
/// and invocation id; BuildKit stamps each build anew), so the attestation, the index and the
/// tag's digest stay and the push sends nothing new. Anything else the provenance records
/// makes a new one: an added build arg does (`mode=max` records args), though the image stays
/// the same.
#[test]
fn a_rebuild_that_runs_nothing_keeps_its_provenance() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let busybox = format!("{reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let ctx = context(
        dir.path(),
        &format!("FROM {busybox}\nRUN echo kept > /k\n"),
        &[],
    );
    let image = format!("{reg}/tests/{}:latest", unique("stamp"));
    let cache = dir.path().join("cache");
    let push = |extra: &[&str]| -> (Value, String) {
        let flags = [&["--provenance=mode=max"], extra].concat();
        let debug = [("OSSB_LOG", "ossb_image::registry=debug")];
        let log = push_build(&env, &cache, &ctx, &image, &flags, &debug);
        // Whole seconds apart: a new stamp would differ.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        (json(inspect_raw(&image).stdout.as_bytes()), log)
    };
    let (first, _) = push(&[]);
    assert_eq!(first["manifests"].as_array().unwrap().len(), 2, "{first:#}");
    let (again, log) = push(&[]);
    assert!(log.contains("0 steps run"), "{log}");
    assert_eq!(again, first, "a fully cached rebuild pushed another index");
    // The registry has that index under the tag: one HEAD, nothing uploaded or put.
    assert!(
        log.contains("already in the registry under the tag"),
        "{log}"
    );

    let (with_arg, log) = push(&["--build-arg", "UNUSED=1"]);
    assert!(!log.contains("already in the registry"), "{log}");
    assert_eq!(
        with_arg["manifests"][0], first["manifests"][0],
        "the image stays"
    );
    assert_ne!(
        with_arg["manifests"][1]["digest"], first["manifests"][1]["digest"],
        "a new build arg must be in a new provenance"
    );
    // Back as the first build asked: its provenance again, stamp and all.
    let (back, _) = push(&[]);
    assert_eq!(back, first);
}

/// The SBOM of the Debian image with `apt-get install jq`: every package of the image's dpkg
/// status is in it, with its version, jq among them. A local export writes the statements
/// beside the files, as BuildKit does, about those files.
#[test]
fn the_sbom_of_debian_with_jq_lists_every_dpkg_package() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {reg}/{}\nRUN apt-get update && apt-get install -y --no-install-recommends jq && rm -rf /var/lib/apt/lists/*\n",
            env.var("OSSB_TEST_DEBIAN")
        ),
        &[],
    );
    let out = dir.path().join("out");
    ossb(
        &env,
        &dir.path().join("cache"),
        &[
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "--sbom=true",
            "--provenance=true",
            // Named, so the image component of the SBOM has a supplier (the repository).
            "-t",
            &format!("{reg}/tests/debian-jq:1"),
            "--output",
            &format!("type=local,dest={}", out.display()),
            ctx.to_str().unwrap(),
        ],
    )
    .success("ossb build --sbom=true -o type=local");
    let statement = json(&std::fs::read(out.join("sbom.spdx.json")).expect("sbom.spdx.json"));
    assert_eq!(statement["predicateType"], "https://spdx.dev/Document");
    let provenance = json(&std::fs::read(out.join("provenance.json")).expect("provenance.json"));
    let subjects = provenance["subject"].as_array().unwrap();
    assert!(
        subjects.iter().any(|s| s["name"] == "usr/bin/jq"),
        "a local export's statements are about its files"
    );
    let packages: BTreeSet<(String, String)> = statement["predicate"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                p["versionInfo"].as_str()?.to_string(),
            ))
        })
        .collect();
    let status = std::fs::read_to_string(out.join("var/lib/dpkg/status")).unwrap();
    let mut installed = Vec::new();
    for stanza in status.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if let (Some(name), Some(version), Some(state)) =
            (field("Package:"), field("Version:"), field("Status:"))
        {
            if state.ends_with(" installed") {
                installed.push((name, version));
            }
        }
    }
    assert!(
        installed.len() > 80,
        "{} packages in the status",
        installed.len()
    );
    let missing: Vec<_> = installed.iter().filter(|p| !packages.contains(p)).collect();
    assert!(missing.is_empty(), "missing from the SBOM: {missing:?}");
    assert!(installed.iter().any(|(n, _)| n == "jq"));
    let document = dir.path().join("debian.spdx.json");
    std::fs::write(&document, statement["predicate"].to_string()).unwrap();
    validate_spdx(&env, &document);
    eprintln!(
        "SBOM of debian+jq: {} packages, {} in dpkg status",
        packages.len(),
        installed.len()
    );
    cross_check_with_distro2sbom(&env, &out, &statement["predicate"]);
}

/// Compares ossb's SPDX packages with those of an independent generator, distro2sbom (PyPI),
/// run over the same exported root (it asks `dpkg --root` for the installed packages): every
/// package it lists must be in ossb's SBOM with the same version, and every Debian package of
/// ossb's must be in its list. ossb's other packages (the image itself, non-dpkg ecosystems)
/// are printed with their kind, as the reason distro2sbom does not have them.
fn cross_check_with_distro2sbom(env: &TestEnv, root: &Path, ossb_document: &Value) {
    let theirs_file = root.with_extension("distro2sbom.json");
    tool(
        venv(env).join("bin/distro2sbom").to_str().unwrap(),
        &[
            "--distro",
            "deb",
            "--system",
            "--root",
            root.to_str().unwrap(),
            "--sbom",
            "spdx",
            "--format",
            "json",
            "-o",
            theirs_file.to_str().unwrap(),
        ],
    )
    .success("distro2sbom --system --root");
    let theirs_document = json(&std::fs::read(&theirs_file).expect("distro2sbom wrote its SBOM"));
    // Its one OPERATING-SYSTEM package is the distribution (named from /etc/os-release), not
    // a dpkg package; ossb names the distribution in the purls' `distro` qualifier instead.
    let theirs: BTreeSet<(String, String)> = document_packages(&theirs_document)
        .filter(|p| p["primaryPackagePurpose"] != "OPERATING-SYSTEM")
        .map(name_version)
        .collect();
    let mut ours_deb = BTreeSet::new();
    let mut ours_other = Vec::new();
    for package in document_packages(ossb_document) {
        let purl = package["externalRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["referenceType"] == "purl")
            .and_then(|r| r["referenceLocator"].as_str())
            .unwrap_or_default();
        if purl.starts_with("pkg:deb/") {
            ours_deb.insert(name_version(package));
        } else {
            let kind = match package["primaryPackagePurpose"].as_str() {
                Some("CONTAINER") => "the image itself".to_string(),
                _ if purl.is_empty() => "no purl".to_string(),
                _ => format!("{} package", purl.split('/').next().unwrap_or(purl)),
            };
            let (name, version) = name_version(package);
            ours_other.push(format!("{name} {version} ({kind})"));
        }
    }
    let missing: Vec<_> = theirs.difference(&ours_deb).collect();
    let extra_deb: Vec<_> = ours_deb.difference(&theirs).collect();
    eprintln!(
        "distro2sbom 0.6.0 over the exported root: {} dpkg packages; ossb: {} packages, {} of \
         them Debian packages; in both with the same version: {}; distro2sbom only: {:?}; ossb's \
         Debian packages distro2sbom lacks: {:?}; ossb's others: {:?}",
        theirs.len(),
        ours_deb.len() + ours_other.len(),
        ours_deb.len(),
        theirs.intersection(&ours_deb).count(),
        missing,
        extra_deb,
        ours_other
    );
    assert!(
        theirs.len() > 80 && theirs.iter().any(|(n, _)| n == "jq"),
        "distro2sbom found too little: {theirs:?}"
    );
    assert!(
        missing.is_empty(),
        "packages distro2sbom lists that ossb's SBOM lacks (or lists with another version): {missing:?}"
    );
    assert!(
        extra_deb.is_empty(),
        "Debian packages in ossb's SBOM that distro2sbom does not list: {extra_deb:?}"
    );
}

/// The package objects of an SPDX document.
fn document_packages(document: &Value) -> impl Iterator<Item = &Value> {
    document["packages"]
        .as_array()
        .expect("an SPDX document has packages")
        .iter()
}

fn name_version(package: &Value) -> (String, String) {
    let field = |f: &str| package[f].as_str().unwrap_or_default().to_string();
    (field("name"), field("versionInfo"))
}

/// The same through the cluster: the coordinator writes each platform's attestation manifest
/// from every task's facts (the mode=max steps name the worker that ran them) and the SBOM
/// the exporting task scanned, pushes them by digest, and lists them after the images.
#[test]
fn the_cluster_attests_what_its_workers_built() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = crate::cluster::Cluster::start(&env);
    let reg = cluster.registry.clone();
    let bb = cluster.busybox(&env);
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("cluster-attest");
    let ctx = context(
        dir.path(),
        &format!("FROM {bb} AS a\nRUN echo {marker} > /a\nFROM {bb}\nCOPY --from=a /a /a\n"),
        &[],
    );
    let image = format!("{reg}/tests/{marker}:1");
    let mut submit = cluster.submit(
        &cluster.tls,
        &[
            "--platform",
            "linux/amd64,linux/arm64",
            "--insecure-registry",
            &reg,
            "--provenance=mode=max",
            "--sbom=true",
            "-t",
            &image,
            "--push",
        ],
    );
    submit.arg(&ctx);
    let out = submit.output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let index = json(inspect_raw(&image).stdout.as_bytes());
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 4, "{index:#}");
    let layout = copy_all(&image, dir.path());
    for attestation in manifests
        .iter()
        .filter(|m| m["platform"]["os"] == "unknown")
    {
        let subject = attestation["annotations"]["vnd.docker.reference.digest"]
            .as_str()
            .unwrap();
        let manifest = json(&blob(&layout, attestation["digest"].as_str().unwrap()));
        let statements: Vec<Value> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| json(&blob(&layout, l["digest"].as_str().unwrap())))
            .collect();
        assert_eq!(statements.len(), 2);
        for s in &statements {
            assert_eq!(
                format!(
                    "sha256:{}",
                    s["subject"][0]["digest"]["sha256"].as_str().unwrap()
                ),
                subject
            );
        }
        let provenance = statements
            .iter()
            .find(|s| s["predicateType"] == "https://slsa.dev/provenance/v0.2")
            .expect("a provenance");
        let steps = provenance["predicate"]["buildConfig"]["steps"]
            .as_array()
            .unwrap_or_else(|| panic!("{provenance:#}"));
        assert_eq!(steps.len(), 2, "{provenance:#}");
        for step in steps {
            let worker = step["worker"].as_str().unwrap_or_default();
            assert!(
                worker.starts_with("amd64") || worker.starts_with("arm64"),
                "a step without its worker: {step:#}"
            );
        }
        assert!(statements
            .iter()
            .any(|s| s["predicateType"] == "https://spdx.dev/Document"));
    }
    // Submitted again: every step cached cluster-wide, the provenance of the first build is
    // kept (as `ossb build` keeps it), so the index is the same.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = submit.output().unwrap();
    assert!(again.status.success(), "{}", cluster.logs());
    assert_eq!(json(inspect_raw(&image).stdout.as_bytes()), index);
}

const GIT_TOKEN: &str = "ghp-GIT-TOKEN-never-in-an-attestation";

/// Python distribution metadata the SBOM scanner finds (a dist-info in site-packages).
fn dist_info(name: &str, version: &str) -> (String, String) {
    (
        format!("venv/lib/python3.11/site-packages/{name}-{version}.dist-info/METADATA"),
        // An author: NTIA's minimum elements need a supplier for each component.
        format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nAuthor: A. Author\n"),
    )
}

fn git(dir: &Path, args: &[&str]) {
    let mut all = vec!["-c", "user.name=t", "-c", "user.email=t@example.com"];
    all.extend_from_slice(args);
    let out = std::process::Command::new("git")
        .args(&all)
        .current_dir(dir)
        .output()
        .expect("git (installed by scripts/testenv.sh)");
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

/// The SPDX packages of a statement, as (name, version).
fn spdx_packages(statement: &Value) -> BTreeSet<(String, String)> {
    statement["predicate"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            Some((
                p["name"].as_str()?.to_string(),
                p["versionInfo"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// BUILDKIT_SBOM_SCAN_STAGE and _CONTEXT as BuildKit: an ARG in a stage adds that stage's
/// SBOM, an ARG in the target stage the context's (without what .dockerignore leaves out),
/// each a statement of its own about the image after the image's own. A context in a git work
/// tree gives the provenance its `vcs` facts (remote with credentials masked, commit,
/// directories) unless BUILDX_GIT_INFO=0, and the remote's token is in no blob.
/// `oci-artifact=true` writes BuildKit v0.32's artifact layout. Everything passes the
/// validators.
#[test]
fn extra_sboms_git_facts_and_the_artifact_layout() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let busybox = format!("{reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    let (stage_file, stage_meta) = dist_info("stagepkg", "1.0");
    let (ctx_file, ctx_meta) = dist_info("ctxpkg", "2.0");
    let (hidden_file, hidden_meta) = dist_info("hiddenpkg", "3.0");
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {busybox} AS build\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY {stage_file} /{stage_file}\n\
             FROM {busybox}\nARG BUILDKIT_SBOM_SCAN_CONTEXT=true\nCOPY --from=build /{stage_file} /built\n"
        ),
        &[
            (&stage_file, &stage_meta),
            (&format!("app/{ctx_file}"), &ctx_meta),
            (&format!("ignored/{hidden_file}"), &hidden_meta),
            (".dockerignore", "ignored\n"),
        ],
    );
    git(&ctx, &["init", "-q", "-b", "main"]);
    git(&ctx, &["add", "."]);
    git(&ctx, &["commit", "-q", "-m", "one"]);
    git(
        &ctx,
        &[
            "remote",
            "add",
            "origin",
            &format!("https://bob:{GIT_TOKEN}@example.com/org/app.git"),
        ],
    );
    let head = tool("git", &["-C", ctx.to_str().unwrap(), "rev-parse", "HEAD"])
        .success("git rev-parse")
        .stdout
        .trim()
        .to_string();
    let image = format!("{reg}/tests/{}:1", unique("extra-sbom"));
    let build = |image: &str, output: &str, extra_env: &[(&str, &str)]| {
        ossb_with(
            &env,
            &dir.path().join("cache"),
            &[
                "build",
                "--progress",
                "plain",
                "--insecure-registry",
                &reg,
                "--sbom=true",
                "--provenance=mode=min",
                "-t",
                image,
                "--output",
                output,
                ctx.to_str().unwrap(),
            ],
            extra_env,
        )
        .success("ossb build --sbom=true with BUILDKIT_SBOM_SCAN_*");
    };
    build(&image, "type=registry,oci-artifact=true", &[]);
    let layout = copy_all(&image, dir.path());
    let index = json(inspect_raw(&image).stdout.as_bytes());
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["os"] == "unknown")
        .expect("an attestation manifest");
    let image_digest = entry["annotations"]["vnd.docker.reference.digest"]
        .as_str()
        .unwrap();
    let manifest = json(&blob(&layout, entry["digest"].as_str().unwrap()));
    // BuildKit v0.32's artifact layout.
    assert_eq!(
        manifest["artifactType"],
        "application/vnd.docker.attestation.manifest.v1+json"
    );
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.oci.empty.v1+json"
    );
    assert_eq!(manifest["subject"]["digest"], image_digest, "{manifest:#}");
    let statements: Vec<(Vec<u8>, Value)> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let bytes = blob(&layout, l["digest"].as_str().unwrap());
            let v = json(&bytes);
            assert_eq!(
                v["predicateType"],
                l["annotations"]["in-toto.io/predicate-type"]
            );
            assert_eq!(
                format!(
                    "sha256:{}",
                    v["subject"][0]["digest"]["sha256"].as_str().unwrap()
                ),
                image_digest
            );
            (bytes, v)
        })
        .collect();
    let kinds: Vec<&str> = statements
        .iter()
        .map(|(_, s)| s["predicateType"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "https://slsa.dev/provenance/v0.2",
            "https://spdx.dev/Document",
            "https://spdx.dev/Document",
            "https://spdx.dev/Document"
        ]
    );
    // The image's own SBOM first, then `build` and `context` (by name, as BuildKit sorts).
    let (image_sbom, stage_sbom, context_sbom) =
        (&statements[1].1, &statements[2].1, &statements[3].1);
    let stagepkg = ("stagepkg".to_string(), "1.0".to_string());
    let ctxpkg = ("ctxpkg".to_string(), "2.0".to_string());
    let hidden = ("hiddenpkg".to_string(), "3.0".to_string());
    assert!(
        !spdx_packages(image_sbom).contains(&stagepkg),
        "the image holds no dist-info"
    );
    assert!(
        spdx_packages(stage_sbom).contains(&stagepkg),
        "{stage_sbom:#}"
    );
    assert!(
        spdx_packages(context_sbom).contains(&ctxpkg),
        "{context_sbom:#}"
    );
    assert!(
        !spdx_packages(context_sbom).contains(&hidden),
        "the context's SBOM reads what .dockerignore leaves out"
    );
    // The git facts, the remote's credentials masked as BuildKit masks them.
    let provenance = &statements[0].1;
    let vcs =
        &provenance["predicate"]["metadata"]["https://mobyproject.org/buildkit@v1#metadata"]["vcs"];
    assert_eq!(
        vcs["source"], "https://xxxxx:xxxxx@example.com/org/app.git",
        "{vcs:#}"
    );
    assert_eq!(vcs["revision"], head.as_str());
    assert_eq!(vcs["localdir:context"], ".");
    assert_eq!(vcs["localdir:dockerfile"], ".");
    for entry in std::fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        assert!(
            !bytes
                .windows(GIT_TOKEN.len())
                .any(|w| w == GIT_TOKEN.as_bytes()),
            "the git remote's token is in a pushed blob"
        );
    }
    // The validators.
    let files: Vec<PathBuf> = statements
        .iter()
        .enumerate()
        .map(|(i, (bytes, _))| {
            let f = dir.path().join(format!("extra{i}.json"));
            std::fs::write(&f, bytes).unwrap();
            f
        })
        .collect();
    validate_statements(
        &env,
        &files.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    for (i, (_, s)) in statements.iter().enumerate().skip(1) {
        let document = dir.path().join(format!("extra{i}.spdx.json"));
        std::fs::write(&document, s["predicate"].to_string()).unwrap();
        validate_spdx(&env, &document);
    }
    // A local export writes them beside its files, named as BuildKit's scanner names them.
    let out = dir.path().join("local");
    build(
        &image,
        &format!("type=local,dest={}", out.display()),
        &[("BUILDX_GIT_INFO", "0")],
    );
    for name in [
        "provenance.json",
        "sbom.spdx.json",
        "sbom-build.spdx.json",
        "sbom-context.spdx.json",
    ] {
        assert!(out.join(name).is_file(), "{name} is not beside the export");
    }
    let local = json(&std::fs::read(out.join("provenance.json")).unwrap());
    assert!(
        local["predicate"]["metadata"]["https://mobyproject.org/buildkit@v1#metadata"]
            .get("vcs")
            .is_none(),
        "BUILDX_GIT_INFO=0 leaves the git facts out: {local:#}"
    );
}

/// `oci-artifact=` is BuildKit's exporter option: a bad value, or with Docker media types,
/// is refused before anything is built.
#[test]
fn oci_artifact_is_checked_as_buildkit_checks_it() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), "FROM scratch\n", &[]);
    for (output, says) in [
        (
            "type=oci,dest=x,oci-artifact=maybe",
            "oci-artifact=maybe must be true or false",
        ),
        (
            "type=oci,dest=x,oci-artifact=true,oci-mediatypes=false",
            "conflicts with \"oci-mediatypes=false\"",
        ),
    ] {
        let run = ossb(
            &env,
            &dir.path().join("cache"),
            &["build", "--output", output, ctx.to_str().unwrap()],
        );
        assert_eq!(run.code, 2, "{output}: {}", run.stderr);
        assert!(run.stderr.contains(says), "{output}: {}", run.stderr);
    }
}

/// A cluster's downloads carry the attestations as `ossb build`'s outputs do: `type=local`
/// writes the same statement files beside the same files (byte for byte, with
/// SOURCE_DATE_EPOCH), `type=oci` the same attested index. The stage BUILDKIT_SBOM_SCAN_STAGE
/// names is built by another task than the image's, which the exporting task waits for.
#[test]
fn the_clusters_downloads_carry_the_attestations_of_a_local_build() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = crate::cluster::Cluster::start(&env);
    let reg = cluster.registry.clone();
    let bb = cluster.busybox(&env);
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("cluster-download");
    let site = "/venv/lib/python3.11/site-packages/apkg-1.0.dist-info";
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {bb} AS a\nARG BUILDKIT_SBOM_SCAN_STAGE=true\n\
             RUN mkdir -p {site} && printf 'Name: apkg\\nVersion: 1.0\\n' > {site}/METADATA && echo {marker} > /a\n\
             FROM {bb} AS b\nCOPY --from=a /a /b\n\
             FROM {bb}\nCOPY --from=b /b /c\n"
        ),
        &[],
    );
    let epoch = ("SOURCE_DATE_EPOCH", "1700000000");
    let flags = ["--provenance=true", "--sbom=true", "-t", "example.com/dl:1"];
    let outputs = |root: &Path| {
        [
            "--output".to_string(),
            format!("type=local,dest={}", root.join("local").display()),
            "--output".to_string(),
            format!("type=oci,dest={},tar=false", root.join("oci").display()),
        ]
    };
    let remote = dir.path().join("remote");
    let mut submit = cluster.submit(&cluster.tls, &["--insecure-registry", &reg]);
    submit
        .args(flags)
        .args(outputs(&remote))
        .arg(&ctx)
        .env(epoch.0, epoch.1);
    let out = submit.output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
    let here = dir.path().join("here");
    let mut args = vec!["build", "--progress", "plain", "--insecure-registry", &reg];
    args.extend(flags);
    let outs = outputs(&here);
    args.extend(outs.iter().map(String::as_str));
    args.push(ctx.to_str().unwrap());
    ossb_with(&env, &dir.path().join("cache"), &args, &[epoch]).success("ossb build of the same");
    for name in ["provenance.json", "sbom.spdx.json", "sbom-a.spdx.json"] {
        let read = |root: &Path| {
            std::fs::read(root.join("local").join(name))
                .unwrap_or_else(|e| panic!("{name} beside {}: {e}", root.display()))
        };
        assert_eq!(
            String::from_utf8(read(&remote)).unwrap(),
            String::from_utf8(read(&here)).unwrap(),
            "{name} differs between the cluster's download and ossb build's export"
        );
    }
    let sbom = json(&std::fs::read(remote.join("local/sbom-a.spdx.json")).unwrap());
    assert!(spdx_packages(&sbom).contains(&("apkg".to_string(), "1.0".to_string())));
    let index = |root: &Path| json(&std::fs::read(root.join("oci/index.json")).unwrap());
    assert_eq!(
        index(&remote),
        index(&here),
        "the OCI layouts' indexes differ"
    );
    // The layout holds the attestation manifest and its statements.
    let top = index(&remote);
    let top_index = json(&blob(
        &remote.join("oci"),
        top["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let attestation = top_index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["os"] == "unknown")
        .expect("the layout's index lists the attestation manifest");
    let manifest = json(&blob(
        &remote.join("oci"),
        attestation["digest"].as_str().unwrap(),
    ));
    assert_eq!(
        manifest["layers"].as_array().unwrap().len(),
        3,
        "{manifest:#}"
    );
}
