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
        let mut args = vec![
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "-t",
            &image,
            "--push",
        ];
        args.extend_from_slice(flags);
        args.push(ctx.to_str().unwrap());
        let env_vars: Vec<(&str, &str)> = epoch.iter().chain(extra).copied().collect();
        ossb_with(&env, &cache, &args, &env_vars).success(&format!("ossb build ({tag})"));
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
}
