//! The registry client against real registries (the test environment's plain registry, behind
//! a fault-injecting proxy and behind a token-auth proxy of our own) and real consumers
//! (skopeo). These drive `ossb_image::registry` directly: the faults and the token flow are
//! the point, not the build.

use std::path::Path;
use std::time::Duration;

use ossb_image::oci::{
    media_type, to_canonical_json, Descriptor, DescriptorPlatform, ImageConfig, Index, Manifest,
};
use ossb_image::registry::{
    parse_reference, Mirror, PushOptions, Registry, RegistryConfig, RegistryError, RegistryOptions,
    RetryPolicy,
};
use ossb_image::store::BlobStore;
use ossb_protocol::{Digest, Platform};

use crate::fault_proxy::{Fault, Proxy, Rule};
use crate::support::*;
use crate::token_server::TokenAuthority;

/// An image made for a test, in its own store.
struct TestImage {
    manifest: Descriptor,
    config: Descriptor,
    layers: Vec<Descriptor>,
    /// Each layer's bytes, as the registry must serve them.
    layer_bytes: Vec<Vec<u8>>,
}

/// Bytes that no earlier run pushed (so HEAD never finds them), incompressible.
fn random_bytes(len: usize, seed: &str) -> Vec<u8> {
    let mut x = u64::from_str_radix(&sha256_of(unique(seed).as_bytes())[..16], 16).unwrap() | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_of(bytes: &[u8]) -> String {
    Digest::of(bytes).hex()
}

/// A gzip layer tar holding one file of `size` random bytes; returns (blob, diff_id).
fn layer(dir: &Path, name: &str, size: usize) -> (Vec<u8>, Digest) {
    let root = dir.join(format!("layer-{name}"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(name), random_bytes(size, name)).unwrap();
    let tar = dir.join(format!("{name}.tar"));
    tool(
        "tar",
        &[
            "-C",
            root.to_str().unwrap(),
            "--owner=0",
            "--group=0",
            "-cf",
            tar.to_str().unwrap(),
            name,
        ],
    )
    .success("tar");
    let diff_id = Digest::of(&std::fs::read(&tar).unwrap());
    tool("gzip", &["-n", "-f", tar.to_str().unwrap()]).success("gzip");
    let gz = std::fs::read(dir.join(format!("{name}.tar.gz"))).unwrap();
    (gz, diff_id)
}

fn put(store: &BlobStore, media_type: &str, bytes: &[u8]) -> Descriptor {
    let digest = store.put(bytes).unwrap();
    Descriptor {
        media_type: media_type.into(),
        digest,
        size: bytes.len() as u64,
        platform: None,
        annotations: None,
    }
}

/// An image for `platform` whose layers are `layers` (name, size), plus `shared` layers
/// given as bytes (to share blobs between images).
fn make_image(
    store: &BlobStore,
    dir: &Path,
    platform: &str,
    shared: &[(Vec<u8>, Digest)],
    layers: &[(&str, usize)],
) -> TestImage {
    let mut all: Vec<(Vec<u8>, Digest)> = shared.to_vec();
    for (name, size) in layers {
        all.push(layer(
            dir,
            &format!("{name}-{}", platform.replace('/', "-")),
            *size,
        ));
    }
    let p: Platform = platform.parse().unwrap();
    let mut config = ImageConfig {
        architecture: p.architecture.clone(),
        os: p.os.clone(),
        variant: p.variant.clone(),
        ..Default::default()
    };
    config.config.cmd = Some(vec!["/bin/true".into()]);
    config.rootfs.diff_ids = all.iter().map(|(_, d)| *d).collect();
    let config = put(store, media_type::OCI_CONFIG, &to_canonical_json(&config));
    let layer_descs: Vec<Descriptor> = all
        .iter()
        .map(|(b, _)| put(store, media_type::OCI_LAYER_GZIP, b))
        .collect();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.into()),
        config: config.clone(),
        layers: layer_descs.clone(),
        annotations: None,
    };
    let mut manifest_desc = put(
        store,
        media_type::OCI_MANIFEST,
        &to_canonical_json(&manifest),
    );
    manifest_desc.platform = Some(DescriptorPlatform::from(&p));
    TestImage {
        manifest: manifest_desc,
        config,
        layers: layer_descs,
        layer_bytes: all.into_iter().map(|(b, _)| b).collect(),
    }
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(400),
        max_retry_after: Duration::from_secs(5),
    }
}

/// A client that speaks plain HTTP to `insecure` and reads credentials from `auth_json`.
fn client(dir: &Path, insecure: &[&str], auth_json: &str, config: RegistryConfig) -> Registry {
    let auth_file = dir.join(format!("auth-{}.json", unique("cfg")));
    std::fs::write(&auth_file, auth_json).unwrap();
    let options = RegistryOptions {
        insecure: insecure.iter().map(|s| s.to_string()).collect(),
        certificates: Vec::new(),
    };
    let config = RegistryConfig {
        auth_file: Some(auth_file),
        ..config
    };
    Registry::with_config(&options, &config).unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn amd64() -> Platform {
    "linux/amd64".parse().unwrap()
}

/// Pushes through 500s, a 503 on HEAD, a chunk upload that breaks off, and a 429 with
/// Retry-After; pulls through a 500, a download reset by a TCP RST halfway (resumed by Range),
/// one that is closed halfway, and a flipped byte. Both succeed, skopeo reads what was pushed, and the pulled bytes are exact.
#[test]
fn push_and_pull_survive_injected_faults_and_never_store_corrupt_bytes() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let image = make_image(
        &store,
        dir.path(),
        "linux/amd64",
        &[],
        &[("big", 3 << 20), ("small", 200 << 10)],
    );
    let proxy = Proxy::start(&env.registry(), None);
    let registry = client(
        dir.path(),
        &[&proxy.addr],
        "{}",
        RegistryConfig {
            retry: fast_retry(6),
            chunk_size: 1 << 20,
            ..Default::default()
        },
    );
    let repo = unique("faults");
    let reference = parse_reference(&format!("{}/tests/{repo}:v1", proxy.addr)).unwrap();
    proxy.inject(Rule::new("HEAD", "/blobs/", Fault::Status(503), 1));
    proxy.inject(Rule::new(
        "PATCH",
        "/blobs/uploads/",
        Fault::BreakRequest,
        1,
    ));
    proxy.inject(Rule::new("PUT", "/blobs/uploads/", Fault::RetryAfter(1), 1));
    proxy.inject(Rule::new("PUT", "/manifests/", Fault::Status(500), 1));
    let rt = runtime();
    let pushed = rt
        .block_on(registry.push_image(&reference, &store, &image.manifest, &PushOptions::default()))
        .unwrap_or_else(|e| panic!("push through faults failed: {e}\n{:#?}", proxy.seen()));
    assert_eq!(pushed, image.manifest.digest);
    let seen = proxy.seen();
    assert!(seen
        .iter()
        .any(|s| s.method == "PATCH" && s.fault == Some(Fault::BreakRequest)));
    assert!(
        seen.iter()
            .filter(|s| s.method == "PATCH" && s.status == 202)
            .count()
            >= 3
    );
    // Retry-After: 1 was honoured before the upload was tried again.
    let throttled = seen.iter().position(|s| s.status == 429).expect("a 429");
    let digest_param = |p: &str| p.split("digest=").nth(1).map(str::to_string);
    let throttled_blob = digest_param(&seen[throttled].path).expect("the 429 was a blob PUT");
    let next_put = seen[throttled + 1..]
        .iter()
        .find(|s| s.method == "PUT" && digest_param(&s.path) == Some(throttled_blob.clone()))
        .expect("the upload was tried again");
    assert!(
        next_put.at.duration_since(seen[throttled].at) >= Duration::from_millis(950),
        "Retry-After not honoured"
    );

    // skopeo, talking to the registry itself, sees the manifest ossb pushed.
    let inspect = tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            &format!("docker://{}/tests/{repo}:v1", env.registry()),
        ],
    )
    .success("skopeo inspect");
    let info: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(info["Digest"], image.manifest.digest.to_string());
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);

    // Pull through faults into a fresh store.
    proxy.clear();
    proxy.forget();
    let big = image.layers[0].digest.to_string();
    let small = image.layers[1].digest.to_string();
    proxy.inject(Rule::new("GET", "/manifests/", Fault::Status(500), 1));
    proxy.inject(Rule::new(
        "GET",
        &format!("/blobs/{big}"),
        Fault::ResetResponse,
        1,
    ));
    proxy.inject(Rule::new(
        "GET",
        &format!("/blobs/{}", image.config.digest),
        Fault::BreakResponse,
        1,
    ));
    proxy.inject(Rule::new(
        "GET",
        &format!("/blobs/{small}"),
        Fault::CorruptByte,
        1,
    ));
    let fresh = BlobStore::open(dir.path().join("fresh")).unwrap();
    let pulled = rt
        .block_on(registry.pull(&reference, &amd64(), &fresh))
        .unwrap_or_else(|e| panic!("pull through faults failed: {e}\n{:#?}", proxy.seen()));
    assert_eq!(pulled.manifest_digest, image.manifest.digest);
    for (d, bytes) in image.layers.iter().zip(&image.layer_bytes) {
        assert_eq!(&fresh.read(&d.digest).unwrap(), bytes, "layer {}", d.digest);
    }
    assert_eq!(
        fresh.read(&image.config.digest).unwrap(),
        store.read(&image.config.digest).unwrap()
    );
    let seen = proxy.seen();
    let resumed = seen
        .iter()
        .find(|s| s.path.ends_with(&big) && s.range.is_some())
        .unwrap_or_else(|| panic!("the broken download was not resumed by Range: {seen:#?}"));
    assert!(resumed.range.as_deref().unwrap().starts_with("bytes="));
    assert_eq!(resumed.status, 206);
    assert!(seen.iter().filter(|s| s.path.ends_with(&small)).count() >= 2);
    assert_eq!(std::fs::read_dir(fresh.tmp_dir()).unwrap().count(), 0);
}

/// A download that stalls halfway (the registry sends nothing more): the read times out, the
/// pull resumes by Range from where it stopped instead of waiting for the stall, and the blob
/// arrives whole.
#[test]
fn a_stalled_download_times_out_and_resumes() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let image = make_image(&store, dir.path(), "linux/amd64", &[], &[("big", 2 << 20)]);
    let proxy = Proxy::start(&env.registry(), None);
    let registry = client(
        dir.path(),
        &[&proxy.addr],
        "{}",
        RegistryConfig {
            retry: fast_retry(4),
            read_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let reference =
        parse_reference(&format!("{}/tests/{}:v1", proxy.addr, unique("stall"))).unwrap();
    let rt = runtime();
    rt.block_on(registry.push_image(&reference, &store, &image.manifest, &PushOptions::default()))
        .unwrap();
    let big = image.layers[0].digest.to_string();
    proxy.forget();
    proxy.inject(Rule::new(
        "GET",
        &format!("/blobs/{big}"),
        Fault::Stall(20),
        1,
    ));
    let fresh = BlobStore::open(dir.path().join("fresh")).unwrap();
    let started = std::time::Instant::now();
    rt.block_on(registry.pull(&reference, &amd64(), &fresh))
        .unwrap_or_else(|e| panic!("pull through a stall failed: {e}\n{:#?}", proxy.seen()));
    let took = started.elapsed();
    assert_eq!(
        fresh.read(&image.layers[0].digest).unwrap(),
        image.layer_bytes[0]
    );
    assert!(
        took < Duration::from_secs(15),
        "waited out the stall: {took:?}"
    );
    let seen = proxy.seen();
    assert!(
        seen.iter()
            .any(|s| s.path.ends_with(&big) && s.range.is_some() && s.status == 206),
        "not resumed by Range: {seen:#?}"
    );
}

/// A registry that always serves a flipped byte: the pull fails, names the blob and says
/// the bytes were wrong; nothing is stored.
#[test]
fn a_registry_serving_wrong_bytes_fails_the_pull_and_stores_nothing() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let image = make_image(&store, dir.path(), "linux/amd64", &[], &[("one", 64 << 10)]);
    let proxy = Proxy::start(&env.registry(), None);
    let registry = client(
        dir.path(),
        &[&proxy.addr],
        "{}",
        RegistryConfig {
            retry: fast_retry(3),
            ..Default::default()
        },
    );
    let reference =
        parse_reference(&format!("{}/tests/{}:v1", proxy.addr, unique("corrupt"))).unwrap();
    let rt = runtime();
    rt.block_on(registry.push_image(&reference, &store, &image.manifest, &PushOptions::default()))
        .unwrap();
    let layer = image.layers[0].digest;
    proxy.inject(Rule::new(
        "GET",
        &format!("/blobs/{layer}"),
        Fault::CorruptByte,
        usize::MAX,
    ));
    let fresh = BlobStore::open(dir.path().join("fresh")).unwrap();
    let err = rt
        .block_on(registry.pull(&reference, &amd64(), &fresh))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&layer.to_string()), "names the blob: {err}");
    assert!(err.contains(&proxy.addr), "names the registry: {err}");
    assert!(err.contains("do not match their digest"), "says why: {err}");
    assert!(!fresh.contains(&layer));
    assert_eq!(std::fs::read_dir(fresh.tmp_dir()).unwrap().count(), 0);
}

/// A push that fails for good says which blob, what the registry answered, and what to try.
#[test]
fn a_failed_push_names_the_blob_the_answer_and_a_hint() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let image = make_image(&store, dir.path(), "linux/amd64", &[], &[("one", 10 << 10)]);
    let proxy = Proxy::start(&env.registry(), None);
    proxy.inject(Rule::new(
        "PUT",
        "/blobs/uploads/",
        Fault::Status(502),
        usize::MAX,
    ));
    let registry = client(
        dir.path(),
        &[&proxy.addr],
        "{}",
        RegistryConfig {
            retry: fast_retry(3),
            ..Default::default()
        },
    );
    let reference =
        parse_reference(&format!("{}/tests/{}:v1", proxy.addr, unique("fail"))).unwrap();
    let err = runtime()
        .block_on(registry.push_image(&reference, &store, &image.manifest, &PushOptions::default()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("push blob sha256:"), "{err}");
    assert!(err.contains("502"), "the registry's answer: {err}");
    assert!(
        err.contains("injected failure"),
        "the registry's body: {err}"
    );
    assert!(
        err.contains("hint:") && err.contains("tried 3 times"),
        "{err}"
    );
}

/// The Bearer flow against our token server: Basic credentials get push tokens, one token
/// covers push on the target and pull on the mount source, the shared layer is mounted (not
/// uploaded), anonymous clients may pull but not push, an identity token works through the
/// refresh-token grant, and a wrong password fails without being printed.
#[test]
fn bearer_tokens_with_several_scopes_mount_blobs_across_repositories() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let authority = TokenAuthority::start("alice", "open-sesame", "refresh-me");
    let proxy = Proxy::start(&env.registry(), Some(authority.clone()));
    let host = proxy.addr.clone();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let base = make_image(
        &store,
        dir.path(),
        "linux/amd64",
        &[],
        &[("base", 300 << 10)],
    );
    let shared = vec![(base.layer_bytes[0].clone(), {
        let c: ImageConfig =
            serde_json::from_slice(&store.read(&base.config.digest).unwrap()).unwrap();
        c.rootfs.diff_ids[0]
    })];
    let app = make_image(
        &store,
        dir.path(),
        "linux/amd64",
        &shared,
        &[("app", 20 << 10)],
    );
    let ns = unique("tokentest");
    let creds = format!(
        r#"{{"auths":{{"{host}":{{"auth":"{}"}}}}}}"#,
        crate::base64("alice:open-sesame")
    );
    let config = || RegistryConfig {
        retry: fast_retry(3),
        ..Default::default()
    };
    let rt = runtime();
    let registry = client(dir.path(), &[&host], &creds, config());
    let base_ref = parse_reference(&format!("{host}/{ns}/base:1")).unwrap();
    rt.block_on(registry.push_image(&base_ref, &store, &base.manifest, &PushOptions::default()))
        .unwrap_or_else(|e| panic!("push with a token failed: {e}"));
    proxy.forget();
    let app_ref = parse_reference(&format!("{host}/{ns}/app:1")).unwrap();
    let options = PushOptions {
        mount_from: vec![format!("{ns}/base")],
    };
    rt.block_on(registry.push_image(&app_ref, &store, &app.manifest, &options))
        .unwrap_or_else(|e| panic!("push with a mount failed: {e}"));
    let shared_hex = base.layers[0].digest.hex();
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|s| s.method == "POST"
            && s.path.contains("mount=")
            && s.path.contains(&shared_hex)
            && s.status == 201),
        "the shared layer was not mounted: {seen:#?}"
    );
    assert!(
        !seen
            .iter()
            .any(|s| (s.method == "PUT" || s.method == "PATCH") && s.path.contains(&shared_hex)),
        "the shared layer was uploaded again"
    );
    let asked = authority.requests();
    assert!(
        asked.iter().any(|r| r.how == "basic"
            && r.scopes.contains(&format!("repository:{ns}/app:pull,push"))
            && r.scopes.contains(&format!("repository:{ns}/base:pull"))),
        "no token asked for both scopes: {asked:#?}"
    );

    // Anonymous: pull yes, push no.
    let anonymous = client(dir.path(), &[&host], "{}", config());
    let fresh = BlobStore::open(dir.path().join("anon")).unwrap();
    rt.block_on(anonymous.pull(&app_ref, &amd64(), &fresh))
        .unwrap_or_else(|e| panic!("anonymous pull failed: {e}"));
    let err = rt
        .block_on(anonymous.push_image(
            &parse_reference(&format!("{host}/{ns}/anon:1")).unwrap(),
            &store,
            &app.manifest,
            &PushOptions::default(),
        ))
        .unwrap_err();
    assert!(matches!(err, RegistryError::Auth { .. }), "{err}");

    // An identity token (what `docker login` stores for OAuth registries).
    let identity = client(
        dir.path(),
        &[&host],
        &format!(r#"{{"auths":{{"{host}":{{"auth":"","identitytoken":"refresh-me"}}}}}}"#),
        config(),
    );
    rt.block_on(identity.push_image(
        &parse_reference(&format!("{host}/{ns}/app:2")).unwrap(),
        &store,
        &app.manifest,
        &PushOptions::default(),
    ))
    .unwrap_or_else(|e| panic!("push with an identity token failed: {e}"));
    assert!(authority
        .requests()
        .iter()
        .any(|r| r.method == "POST" && r.how == "refresh_token"));

    // A wrong password: an authentication error that never shows the password.
    let wrong = client(
        dir.path(),
        &[&host],
        &format!(
            r#"{{"auths":{{"{host}":{{"auth":"{}"}}}}}}"#,
            crate::base64("alice:not-the-password")
        ),
        config(),
    );
    let err = rt
        .block_on(wrong.push_image(&app_ref, &store, &app.manifest, &PushOptions::default()))
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Auth { .. }), "{text}");
    assert!(
        text.contains(&host) && text.contains("authentication failed"),
        "{text}"
    );
    assert!(!text.contains("not-the-password"), "{text}");

    // skopeo reads through the token flow too (a real consumer of the token server).
    tool(
        "skopeo",
        &[
            "inspect",
            "--tls-verify=false",
            "--creds",
            "alice:open-sesame",
            &format!("docker://{host}/{ns}/app:1"),
        ],
    )
    .success("skopeo inspect through the token server");
}

/// `busybox` means docker.io/library/busybox:latest; with a mirror for docker.io it is pulled
/// from the mirror (no internet needed). A mirror that is down falls back to the origin.
#[test]
fn mirrors_are_tried_first_and_fall_back_to_the_origin() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(&env.registry(), None);
    let mirror: Mirror = format!("docker.io={}", proxy.addr).parse().unwrap();
    let registry = client(
        dir.path(),
        &[&proxy.addr, &env.registry(), "127.0.0.1:9"],
        "{}",
        RegistryConfig {
            mirrors: vec![
                mirror,
                format!("{}=127.0.0.1:9", env.registry()).parse().unwrap(),
            ],
            retry: fast_retry(2),
            ..Default::default()
        },
    );
    let rt = runtime();
    let busybox = parse_reference("busybox").unwrap();
    assert_eq!(busybox.whole(), "docker.io/library/busybox:latest");
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let pulled = rt
        .block_on(registry.pull(&busybox, &amd64(), &store))
        .unwrap_or_else(|e| panic!("pull of busybox through the mirror failed: {e}"));
    assert!(proxy
        .seen()
        .iter()
        .any(|s| s.path == "/v2/library/busybox/manifests/latest"));
    assert!(store.contains(&pulled.manifest.layers[0].digest));

    let origin = parse_reference(&format!(
        "{}/{}",
        env.registry(),
        env.var("OSSB_TEST_BUSYBOX")
    ))
    .unwrap();
    let other = BlobStore::open(dir.path().join("other")).unwrap();
    let again = rt
        .block_on(registry.pull(&origin, &amd64(), &other))
        .unwrap_or_else(|e| panic!("fallback to the origin failed: {e}"));
    assert_eq!(again.manifest_digest, pulled.manifest_digest);
}

/// A two-platform index is pushed after its manifests; skopeo copies every platform; a pull
/// selects by platform (arm64 = arm64/v8), and a missing platform lists the ones there are.
#[test]
fn index_push_is_complete_and_pull_selects_the_platform() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    let amd = make_image(&store, dir.path(), "linux/amd64", &[], &[("a", 50 << 10)]);
    let arm = make_image(
        &store,
        dir.path(),
        "linux/arm64/v8",
        &[],
        &[("b", 50 << 10)],
    );
    let mut arm_desc = arm.manifest.clone();
    arm_desc.platform.as_mut().unwrap().variant = Some("v8".into());
    let index = Index {
        schema_version: 2,
        media_type: Some(media_type::OCI_INDEX.into()),
        manifests: vec![amd.manifest.clone(), arm_desc],
        annotations: None,
    };
    let index_desc = put(&store, media_type::OCI_INDEX, &to_canonical_json(&index));
    let proxy = Proxy::start(&env.registry(), None);
    let registry = client(dir.path(), &[&proxy.addr], "{}", RegistryConfig::default());
    let name = format!("tests/{}", unique("multi"));
    let reference = parse_reference(&format!("{}/{name}:v1", proxy.addr)).unwrap();
    let rt = runtime();
    let digest = rt
        .block_on(registry.push_image(&reference, &store, &index_desc, &PushOptions::default()))
        .unwrap();
    assert_eq!(digest, index_desc.digest);
    let puts: Vec<_> = proxy
        .seen()
        .into_iter()
        .filter(|s| s.method == "PUT" && s.path.contains("/manifests/"))
        .collect();
    assert_eq!(puts.len(), 3);
    assert!(
        puts[2].path.ends_with("/manifests/v1"),
        "the index goes last: {puts:#?}"
    );

    let layout = dir.path().join("copied");
    tool(
        "skopeo",
        &[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{}/{name}:v1", env.registry()),
            &format!("oci:{}:v1", layout.display()),
        ],
    )
    .success("skopeo copy --all");
    let copied: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        copied["manifests"][0]["digest"],
        index_desc.digest.to_string()
    );

    let fresh = BlobStore::open(dir.path().join("fresh")).unwrap();
    let pulled = rt
        .block_on(registry.pull(&reference, &"linux/arm64".parse().unwrap(), &fresh))
        .unwrap();
    assert_eq!(pulled.manifest_digest, arm.manifest.digest);
    let err = rt
        .block_on(registry.pull(&reference, &"linux/arm/v7".parse().unwrap(), &fresh))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("linux/arm/v7") && err.contains("linux/amd64, linux/arm64"),
        "{err}"
    );
}

/// `podman run IMAGE COMMAND...` with the settings this machine needs.
fn podman_exec(image: &str, command: &[&str]) -> Run {
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
        "--network",
        "host",
        "--tls-verify=false",
        image,
    ];
    args.extend_from_slice(command);
    tool("podman", &args)
}

/// Pulls the test busybox into a fresh store.
fn pulled_busybox(env: &TestEnv, dir: &Path) -> (BlobStore, Descriptor, Registry) {
    let store = BlobStore::open(dir.join("store")).unwrap();
    let registry = client(dir, &[&env.registry()], "{}", RegistryConfig::default());
    let reference = parse_reference(&format!(
        "{}/{}",
        env.registry(),
        env.var("OSSB_TEST_BUSYBOX")
    ))
    .unwrap();
    let pulled = runtime()
        .block_on(registry.pull(&reference, &amd64(), &store))
        .unwrap();
    let bytes = store.read(&pulled.manifest_digest).unwrap();
    let desc = Descriptor {
        media_type: pulled
            .manifest
            .media_type
            .clone()
            .unwrap_or_else(|| media_type::OCI_MANIFEST.into()),
        digest: pulled.manifest_digest,
        size: bytes.len() as u64,
        platform: None,
        annotations: None,
    };
    (store, desc, registry)
}

/// An image written with Docker media types is pushed as such: skopeo sees a Docker schema 2
/// manifest, and podman runs it.
#[test]
fn docker_media_types_are_pushed_and_run() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (store, oci, registry) = pulled_busybox(&env, dir.path());
    let manifest: Manifest = serde_json::from_slice(&store.read(&oci.digest).unwrap()).unwrap();
    let docker = manifest
        .with_media_types(ossb_image::oci::MediaTypes::Docker)
        .unwrap();
    let desc = put(
        &store,
        media_type::DOCKER_MANIFEST,
        &to_canonical_json(&docker),
    );
    let image = format!("{}/tests/{}:docker", env.registry(), unique("dockertypes"));
    runtime()
        .block_on(registry.push_image(
            &parse_reference(&image).unwrap(),
            &store,
            &desc,
            &PushOptions {
                mount_from: vec!["library/busybox".into()],
            },
        ))
        .unwrap();
    let raw = inspect_raw(&image);
    let raw: serde_json::Value = serde_json::from_str(&raw.stdout).unwrap();
    assert_eq!(raw["mediaType"], media_type::DOCKER_MANIFEST);
    assert_eq!(raw["config"]["mediaType"], media_type::DOCKER_CONFIG);
    assert_eq!(raw["layers"][0]["mediaType"], media_type::DOCKER_LAYER_GZIP);
    let run = podman_exec(&image, &["echo", "docker types run"]).success("podman run");
    assert_eq!(run.stdout.trim(), "docker types run");
}

/// The Docker archive loads into podman (tags kept) and runs; the local exporter writes the
/// image's filesystem.
#[test]
fn docker_archive_loads_in_podman_and_local_output_has_the_files() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (store, desc, _) = pulled_busybox(&env, dir.path());
    let name = format!("localhost/ossb-test/{}:archived", unique("archive"));
    let archive = dir.path().join("image.tar");
    ossb_image::export::write_docker_archive(
        &store,
        &[ossb_image::export::NamedImage {
            descriptor: desc.clone(),
            names: vec![name.clone()],
        }],
        &archive,
        &amd64(),
    )
    .unwrap();
    let load = tool("podman", &["load", "-i", archive.to_str().unwrap()]).success("podman load");
    assert!(load.stdout.contains(&name), "podman load:\n{}", load.stdout);
    let run = podman_exec(&name, &["echo", "loaded from a docker archive"]).success("podman run");
    assert_eq!(run.stdout.trim(), "loaded from a docker archive");
    let _ = tool("podman", &["rmi", &name]);

    let local = dir.path().join("rootfs");
    let skipped = ossb_image::export::write_local(
        &store,
        &desc,
        &local,
        &ossb_image::layer::ApplyOptions::default(),
    )
    .unwrap();
    assert!(local.join("bin/busybox").is_file(), "skipped: {skipped:?}");
    assert!(local.join("etc/passwd").is_file());
}
