use super::*;
use serde_json::Value;

fn subject() -> Vec<Subject> {
    vec![Subject {
        name: "pkg:docker/app@1?platform=linux%2Famd64".into(),
        digest: Digest::of(b"image manifest"),
    }]
}

fn facts(mode: Mode) -> Provenance {
    let linux: Platform = "linux/amd64".parse().unwrap();
    Provenance {
        builder_id: "https://ci.example/run/7".into(),
        build_type: None,
        config_source: Some(Material::git(
            "https://user:hunter2@git.example/app.git",
            "0123456789abcdef0123456789abcdef01234567",
        )),
        entry_point: "Dockerfile".into(),
        build_args: BTreeMap::from([("SECRET_NAME".into(), "just-an-arg".into())]),
        labels: BTreeMap::from([("team".into(), "infra".into())]),
        target: Some("final".into()),
        secret_ids: vec!["npm_token".into(), "aws".into(), "npm_token".into()],
        ssh_ids: vec!["default".into()],
        locals: vec!["context".into(), "dockerfile".into()],
        contexts: BTreeMap::new(),
        builder_platform: linux.clone(),
        materials: vec![Material::sha256(
            "pkg:docker/debian@bookworm?platform=linux%2Famd64",
            &Digest::of(b"debian"),
        )],
        vcs: BTreeMap::from([
            (
                "source".into(),
                "https://user:hunter2@git.example/app.git".into(),
            ),
            (
                "revision".into(),
                "0123456789abcdef0123456789abcdef01234567".into(),
            ),
        ]),
        invocation_id: "build-1".into(),
        started: Some(1_700_000_000),
        finished: Some(1_700_000_042),
        reproducible: true,
        hermetic: false,
        parameters_complete: true,
        materials_complete: false,
        mode,
        steps: vec![
            BuildStep {
                instruction: "FROM debian:bookworm".into(),
                inputs: vec![StepInput::Material(0)],
                platform: linux.clone(),
                layer: None,
                worker: Some("worker-a".into()),
            },
            BuildStep {
                instruction: "RUN apt-get install -y jq".into(),
                inputs: vec![StepInput::Step(0)],
                platform: linux,
                layer: Some(Digest::of(b"layer")),
                worker: None,
            },
        ],
        source: Some(SourceFile {
            filename: "Dockerfile".into(),
            data: b"FROM debian:bookworm\n".to_vec(),
        }),
    }
}

fn predicate(version: SlsaVersion, p: &Provenance) -> (Value, Vec<u8>) {
    let st = provenance_statement(version, &subject(), p).unwrap();
    let v: Value = serde_json::from_slice(&st.bytes).unwrap();
    assert_eq!(v["predicateType"], st.predicate_type);
    (v["predicate"].clone(), st.bytes)
}

#[test]
fn statement_is_about_the_image_manifest() {
    for version in [SlsaVersion::V02, SlsaVersion::V1] {
        let st = provenance_statement(version, &subject(), &facts(Mode::Min)).unwrap();
        let v: Value = serde_json::from_slice(&st.bytes).unwrap();
        assert_eq!(v["_type"], "https://in-toto.io/Statement/v1");
        assert_eq!(
            v["subject"][0]["digest"]["sha256"],
            Digest::of(b"image manifest").hex()
        );
        assert_eq!(
            v["subject"][0]["name"],
            "pkg:docker/app@1?platform=linux%2Famd64"
        );
        assert_eq!(st.file_name, "provenance.json");
    }
}

#[test]
fn predicate_types_follow_the_version() {
    let v02 = provenance_statement(SlsaVersion::V02, &subject(), &facts(Mode::Min)).unwrap();
    let v1 = provenance_statement(SlsaVersion::V1, &subject(), &facts(Mode::Min)).unwrap();
    assert_eq!(v02.predicate_type, "https://slsa.dev/provenance/v0.2");
    assert_eq!(v1.predicate_type, "https://slsa.dev/provenance/v1");
}

#[test]
fn same_facts_give_the_same_bytes() {
    for version in [SlsaVersion::V02, SlsaVersion::V1] {
        for mode in [Mode::Min, Mode::Max] {
            let a = provenance_statement(version, &subject(), &facts(mode)).unwrap();
            let b = provenance_statement(version, &subject(), &facts(mode)).unwrap();
            assert_eq!(a, b);
            // Canonical: no whitespace outside strings, keys sorted.
            let v: Value = serde_json::from_slice(&a.bytes).unwrap();
            assert_eq!(crate::json::to_canonical(&v), a.bytes);
        }
    }
}

#[test]
fn min_has_no_build_config_and_max_has_the_steps() {
    let (min, _) = predicate(SlsaVersion::V02, &facts(Mode::Min));
    assert!(min.get("buildConfig").is_none());
    let (min1, _) = predicate(SlsaVersion::V1, &facts(Mode::Min));
    assert!(min1["buildDefinition"]["internalParameters"]
        .get("buildConfig")
        .is_none());

    let (max, _) = predicate(SlsaVersion::V02, &facts(Mode::Max));
    let steps = max["buildConfig"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["id"], "step0");
    assert_eq!(steps[0]["inputs"], serde_json::json!(["material:0"]));
    assert_eq!(steps[0]["worker"], "worker-a");
    assert_eq!(steps[1]["inputs"], serde_json::json!(["step0"]));
    assert_eq!(steps[1]["layer"], Digest::of(b"layer").to_string());
    assert_eq!(steps[1]["platform"], "linux/amd64");
    let (max1, _) = predicate(SlsaVersion::V1, &facts(Mode::Max));
    assert_eq!(
        max1["buildDefinition"]["internalParameters"]["buildConfig"],
        max["buildConfig"]
    );
}

#[test]
fn min_leaves_out_args_secrets_and_ssh_and_says_so() {
    let (min, _) = predicate(SlsaVersion::V02, &facts(Mode::Min));
    let params = &min["invocation"]["parameters"];
    assert_eq!(params["args"], serde_json::json!({"target": "final"}));
    assert!(params.get("secrets").is_none() && params.get("ssh").is_none());
    assert_eq!(min["metadata"]["completeness"]["parameters"], false);
    assert!(
        min["metadata"]["https://mobyproject.org/buildkit@v1#metadata"]
            .get("source")
            .is_none()
    );

    let mut no_args = facts(Mode::Min);
    no_args.build_args.clear();
    no_args.labels.clear();
    let (min, _) = predicate(SlsaVersion::V1, &no_args);
    assert_eq!(
        min["runDetails"]["metadata"]["buildkit_completeness"]["request"],
        true
    );
}

#[test]
fn max_names_secrets_by_id_and_keeps_args_named_like_secrets() {
    let (max, _) = predicate(SlsaVersion::V02, &facts(Mode::Max));
    let params = &max["invocation"]["parameters"];
    assert_eq!(
        params["secrets"],
        serde_json::json!([{"id": "aws"}, {"id": "npm_token"}])
    );
    assert_eq!(params["ssh"], serde_json::json!([{"id": "default"}]));
    assert_eq!(params["args"]["build-arg:SECRET_NAME"], "just-an-arg");
    assert_eq!(params["args"]["label:team"], "infra");
    assert_eq!(
        params["locals"],
        serde_json::json!([{"name": "context"}, {"name": "dockerfile"}])
    );
}

/// The caller's contract made concrete: a build's secret values live beside the facts but
/// there is no field to pass them through, so no statement can hold one.
#[test]
fn secret_values_have_no_way_in() {
    let secret_values = [
        ("npm_token", "npm-v4lue-never-written"),
        ("aws", "AKIA-never-written"),
    ];
    let p = facts(Mode::Max);
    for version in [SlsaVersion::V02, SlsaVersion::V1] {
        let st = provenance_statement(version, &subject(), &p).unwrap();
        let text = String::from_utf8(st.bytes).unwrap();
        for (id, value) in secret_values {
            assert!(text.contains(&format!(r#"{{"id":"{id}"}}"#)));
            assert!(!text.contains(value));
        }
        assert!(!text.contains("hunter2"), "a URL's password is redacted");
    }
}

#[test]
fn v02_fields_are_where_buildkit_puts_them() {
    let (p, _) = predicate(SlsaVersion::V02, &facts(Mode::Max));
    assert_eq!(p["builder"]["id"], "https://ci.example/run/7");
    assert_eq!(p["buildType"], OSSB_BUILD_TYPE);
    assert_eq!(
        p["invocation"]["configSource"],
        serde_json::json!({
            "uri": "https://xxxxx:xxxxx@git.example/app.git",
            "digest": {"sha1": "0123456789abcdef0123456789abcdef01234567"},
            "entryPoint": "Dockerfile",
        })
    );
    assert_eq!(p["invocation"]["parameters"]["frontend"], "dockerfile.v0");
    assert_eq!(
        p["invocation"]["environment"],
        serde_json::json!({"platform": "linux/amd64"})
    );
    assert_eq!(
        p["materials"],
        serde_json::json!([{
            "uri": "pkg:docker/debian@bookworm?platform=linux%2Famd64",
            "digest": {"sha256": Digest::of(b"debian").hex()},
        }])
    );
    let m = &p["metadata"];
    assert_eq!(m["buildInvocationID"], "build-1");
    assert_eq!(m["buildStartedOn"], "2023-11-14T22:13:20Z");
    assert_eq!(m["buildFinishedOn"], "2023-11-14T22:14:02Z");
    assert_eq!(
        m["completeness"],
        serde_json::json!({"parameters": true, "environment": true, "materials": false})
    );
    assert_eq!(m["reproducible"], true);
    let bk = &m["https://mobyproject.org/buildkit@v1#metadata"];
    assert_eq!(
        bk["vcs"]["source"],
        "https://xxxxx:xxxxx@git.example/app.git"
    );
    assert_eq!(
        bk["source"]["infos"][0]["data"],
        "RlJPTSBkZWJpYW46Ym9va3dvcm0K"
    );
    assert!(m
        .get("https://mobyproject.org/buildkit@v1#hermetic")
        .is_none());
}

#[test]
fn v1_fields_are_where_buildkit_puts_them() {
    let mut f = facts(Mode::Min);
    f.hermetic = true;
    f.build_type = Some(BUILDKIT_BUILD_TYPE_V1.into());
    let (p, _) = predicate(SlsaVersion::V1, &f);
    let def = &p["buildDefinition"];
    assert_eq!(def["buildType"], BUILDKIT_BUILD_TYPE_V1);
    assert_eq!(
        def["externalParameters"]["configSource"]["path"],
        "Dockerfile"
    );
    assert_eq!(
        def["externalParameters"]["request"]["frontend"],
        "dockerfile.v0"
    );
    assert_eq!(
        def["internalParameters"],
        serde_json::json!({"builderPlatform": "linux/amd64"})
    );
    assert_eq!(
        def["resolvedDependencies"][0]["digest"]["sha256"],
        Digest::of(b"debian").hex()
    );
    let run = &p["runDetails"];
    assert_eq!(
        run["builder"],
        serde_json::json!({"id": "https://ci.example/run/7"})
    );
    let m = &run["metadata"];
    assert_eq!(m["invocationId"], "build-1");
    assert_eq!(m["startedOn"], "2023-11-14T22:13:20Z");
    assert_eq!(m["finishedOn"], "2023-11-14T22:14:02Z");
    assert_eq!(m["buildkit_hermetic"], true);
    assert_eq!(m["buildkit_reproducible"], true);
    assert_eq!(
        m["buildkit_completeness"],
        serde_json::json!({"request": false, "resolvedDependencies": false})
    );
    assert!(m["buildkit_metadata"]["vcs"].is_object());
}

#[test]
fn a_step_reading_a_later_step_or_missing_material_is_refused() {
    for bad in [StepInput::Step(1), StepInput::Material(5)] {
        let mut p = facts(Mode::Max);
        p.steps[0].inputs = vec![bad];
        assert!(matches!(
            provenance_statement(SlsaVersion::V02, &subject(), &p),
            Err(AttestError::BadStepInput { step: 0, .. })
        ));
    }
}

#[test]
fn a_timestamp_out_of_range_is_an_error_not_a_panic() {
    let mut p = facts(Mode::Min);
    p.finished = Some(i64::MAX);
    assert!(matches!(
        provenance_statement(SlsaVersion::V1, &subject(), &p),
        Err(AttestError::Timestamp(_))
    ));
}

/// As BuildKit's `urlutil.RedactCredentials` (its own test cases): a token is often the
/// user name alone, so the user name goes too.
#[test]
fn redacts_user_names_and_passwords() {
    let r = redact_credentials;
    assert_eq!(r("https://u:p@h/x?y#z"), "https://xxxxx:xxxxx@h/x?y#z");
    assert_eq!(r("https://ghp_t0ken@h/x"), "https://xxxxx@h/x");
    assert_eq!(r("https://:p@h/x"), "https://:xxxxx@h/x");
    assert_eq!(r("git@github.com:o/r.git"), "git@github.com:o/r.git");
    assert_eq!(r("https://h/a@b"), "https://h/a@b");
    assert_eq!(r("https://h/x"), "https://h/x");
}

#[test]
fn named_contexts_are_args_in_both_modes_with_credentials_redacted() {
    for mode in [Mode::Min, Mode::Max] {
        let mut p = facts(mode);
        p.contexts = BTreeMap::from([
            ("base".into(), "docker-image://alpine:3.20".into()),
            (
                "src".into(),
                "https://user:hunter2@git.example/src.git#v1".into(),
            ),
            ("assets".into(), "local:assets".into()),
        ]);
        let (v02, bytes) = predicate(SlsaVersion::V02, &p);
        let args = &v02["invocation"]["parameters"]["args"];
        assert_eq!(args["context:base"], "docker-image://alpine:3.20");
        assert_eq!(args["context:assets"], "local:assets");
        assert_eq!(
            args["context:src"],
            "https://xxxxx:xxxxx@git.example/src.git#v1"
        );
        assert!(!String::from_utf8_lossy(&bytes).contains("hunter2"));
        let (v1, _) = predicate(SlsaVersion::V1, &p);
        let request = &v1["buildDefinition"]["externalParameters"]["request"];
        assert_eq!(
            request["args"]["context:base"],
            "docker-image://alpine:3.20"
        );
    }
}
