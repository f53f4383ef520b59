//! Build checks through the binary: `--check` and `--call=check|outline|targets` print what
//! buildx prints and build nothing; every build summarizes its warnings at the end; with
//! `# check=error=true` a failing check fails the build before any step; the base image's
//! config (from the registry) decides what is defined.

use crate::support::*;

fn busybox(env: &TestEnv) -> String {
    crate::build::busybox(env)
}

/// `ossb build ARGS... CTX` against the plain registry.
fn build(env: &TestEnv, cache: &std::path::Path, ctx: &std::path::Path, args: &[&str]) -> Run {
    let reg = env.registry();
    let mut all = vec!["build", "--insecure-registry", &reg];
    all.extend_from_slice(args);
    all.push(ctx.to_str().unwrap());
    ossb(env, cache, &all)
}

#[test]
fn check_prints_each_warning_with_its_source_and_exits_1() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!("\nfrOM {} as base\ncOpy Dockerfile .\n", busybox(&env)),
        &[],
    );
    let cache = dir.path().join("cache");
    let run = build(&env, &cache, &ctx, &["--check"]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    let file = ctx.join("Dockerfile").display().to_string();
    assert!(
        run.stdout
            .starts_with("Check complete, 2 warnings have been found!\n"),
        "{}",
        run.stdout
    );
    for expected in [
        "\nWARNING: ConsistentInstructionCasing - https://docs.docker.com/go/dockerfile/rule/consistent-instruction-casing/\nCommand 'frOM' should match the case of the command majority (uppercase)\n",
        &format!("{file}:2\n--------------------\n   1 |     \n   2 | >>> frOM "),
        &format!("{file}:3\n"),
        "   3 | >>> cOpy Dockerfile .\n",
    ] {
        assert!(run.stdout.contains(expected), "{expected:?} not in:\n{}", run.stdout);
    }
    // Nothing ran: no vertex was printed.
    assert!(!run.stderr.contains("#1 "), "{}", run.stderr);

    // Without warnings it says so and succeeds; ignorestatus=true succeeds despite them.
    let clean = context(
        &dir.path().join("clean"),
        &format!("FROM {} AS base\nCOPY Dockerfile .\n", busybox(&env)),
        &[],
    );
    let run = build(&env, &cache, &clean, &["--check"]).success("a clean --check");
    assert_eq!(run.stdout, "Check complete, no warnings found.\n");
    build(&env, &cache, &ctx, &["--call=check,ignorestatus=true"])
        .success("--call=check,ignorestatus=true");
}

#[test]
fn check_json_is_buildkit_s_lint_result() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    // buildx's own test of --call=check,format=json: three warnings.
    let ctx = context(
        dir.path(),
        &format!(
            "\nfrOM {} as base\ncOpy Dockerfile .\nfrom scratch\nCOPy --from=base \\\n  /Dockerfile \\\n  /\n\t",
            busybox(&env)
        ),
        &[],
    );
    let run = build(
        &env,
        &dir.path().join("cache"),
        &ctx,
        &["--call=check,format=json"],
    );
    assert_ne!(run.code, 0);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let warnings = v["warnings"].as_array().unwrap();
    let rules: Vec<(&str, u64)> = warnings
        .iter()
        .map(|w| {
            (
                w["ruleName"].as_str().unwrap(),
                w["location"]["ranges"][0]["start"]["line"]
                    .as_u64()
                    .unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rules,
        [
            ("ConsistentInstructionCasing", 2),
            ("ConsistentInstructionCasing", 3),
            ("ConsistentInstructionCasing", 5)
        ]
    );
    assert_eq!(
        warnings[2]["detail"],
        "Command 'COPy' should match the case of the command majority (lowercase)"
    );
    assert_eq!(warnings[2]["location"]["ranges"][0]["end"]["line"], 7);
    assert_eq!(v["sources"][0]["language"], "Dockerfile");
    assert!(v.get("buildError").is_none());
}

#[test]
fn undefined_variables_are_judged_with_the_base_image_s_environment() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // A base image whose config defines APP_HOME.
    let base = format!("{}/{}:1", env.registry(), unique("checks-base"));
    let base_ctx = context(
        &dir.path().join("base"),
        &format!("FROM {}\nENV APP_HOME=/srv/app\n", busybox(&env)),
        &[],
    );
    build(
        &env,
        &cache,
        &base_ctx,
        &["--push", "--tag", &base, "--provenance=false"],
    )
    .success("pushing the base");
    let ctx = context(
        dir.path(),
        &format!("FROM {base}\nWORKDIR $APP_HOME\nCOPY Dockerfile $APP_HOM/\n"),
        &[],
    );
    let run = build(&env, &cache, &ctx, &["--call=check,format=json"]);
    let v: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", run.stdout, run.stderr));
    let details: Vec<&str> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["detail"].as_str().unwrap())
        .collect();
    assert_eq!(
        details,
        ["Usage of undefined variable '$APP_HOM' (did you mean $APP_HOME?)"]
    );
    // A build asks the registry too, when a variable is not defined by the Dockerfile.
    let run = build(&env, &cache, &ctx, &["--progress", "plain"]).success("the build");
    assert!(
        run.stderr.contains(" 1 warning found (use --check to expand):\n - UndefinedVar: Usage of undefined variable '$APP_HOM' (did you mean $APP_HOME?) (line 3)\n"),
        "{}",
        run.stderr
    );
    let fine = context(
        &dir.path().join("fine"),
        &format!("FROM {base}\nCOPY Dockerfile $APP_HOME/\n"),
        &[],
    );
    let run = build(&env, &cache, &fine, &["--progress", "plain"]).success("a build");
    assert!(!run.stderr.contains("found (use --check"), "{}", run.stderr);
}

#[test]
fn a_build_summarizes_its_warnings_at_the_end() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!(
            "FROM {} as base\nRUN echo built > /built\nCMD cat /built\n",
            busybox(&env)
        ),
        &[],
    );
    let cache = dir.path().join("cache");
    let run = build(&env, &cache, &ctx, &["--progress", "plain"]).success("a build with warnings");
    let expected = " 2 warnings found (use --check to expand):\n - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)\n - JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 3)\n";
    assert!(run.stderr.contains(expected), "{}", run.stderr);
    assert!(run.stderr.contains("RUN echo built"), "{}", run.stderr);

    // JSON progress: one `check` event per warning.
    let run = build(&env, &cache, &ctx, &["--progress", "json"]).success("a JSON build");
    let checks: Vec<serde_json::Value> = run
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "check")
        .collect();
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[1]["rule"], "JSONArgsRecommended");
    assert_eq!(checks[1]["line"], 3);
    assert_eq!(
        checks[1]["url"],
        "https://docs.docker.com/go/dockerfile/rule/json-args-recommended/"
    );

    // Skipped checks say nothing; the build argument replaces the directive, and is no
    // unused build argument.
    let skipped = context(
        &dir.path().join("skipped"),
        &format!("# check=skip=all\nFROM {} as base\nCMD x\n", busybox(&env)),
        &[],
    );
    let run = build(&env, &cache, &skipped, &["--progress", "plain"]).success("skip=all");
    assert!(!run.stderr.contains("found (use --check"), "{}", run.stderr);
    let run = build(
        &env,
        &cache,
        &ctx,
        &[
            "--progress",
            "plain",
            "--build-arg",
            "BUILDKIT_DOCKERFILE_CHECK=skip=FromAsCasing",
        ],
    )
    .success("BUILDKIT_DOCKERFILE_CHECK");
    assert!(
        run.stderr
            .contains(" 1 warning found (use --check to expand):\n - JSONArgsRecommended"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("not consumed"), "{}", run.stderr);
}

#[test]
fn error_true_fails_the_build_before_any_step() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!(
            "# check=error=true\nFROM {} as base\nRUN echo ran > /ran\n",
            busybox(&env)
        ),
        &[],
    );
    let cache = dir.path().join("cache");
    let run = build(&env, &cache, &ctx, &["--progress", "plain"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(" - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 2)"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("lint violation found for rules: FromAsCasing"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("RUN echo ran"),
        "a step ran:\n{}",
        run.stderr
    );

    // --check reports the violation as an error too.
    let run = build(&env, &cache, &ctx, &["--check"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("error: lint violation found for rules: FromAsCasing"),
        "{}",
        run.stderr
    );

    // Skipping the rule lets the build run.
    build(
        &env,
        &cache,
        &ctx,
        &[
            "--build-arg",
            "BUILDKIT_DOCKERFILE_CHECK=skip=FromAsCasing;error=true",
        ],
    )
    .success("the rule skipped");
}

#[test]
fn bad_check_settings_and_calls_are_clear_errors() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let ctx = context(
        dir.path(),
        &format!("# check=bogus\nFROM {}\n", busybox(&env)),
        &[],
    );
    let run = build(&env, &cache, &ctx, &[]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("failed to parse check options: invalid check option \"bogus\""),
        "{}",
        run.stderr
    );
    let run = build(&env, &cache, &ctx, &["--check"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("invalid check option"),
        "{}",
        run.stderr
    );
    let run = build(&env, &cache, &ctx, &["--call=frobnicate"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("unknown method"), "{}", run.stderr);
    // A Dockerfile error is reported after the warnings found before it, with its source.
    let broken = context(
        &dir.path().join("broken"),
        &format!("FROM {} AS Base\nBOGUS x\n", busybox(&env)),
        &[],
    );
    let run = build(&env, &cache, &broken, &["--check"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("StageNameCasing"), "{}", run.stdout);
    assert!(
        run.stderr.contains("unknown instruction: BOGUS"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(">>> BOGUS x"), "{}", run.stderr);
}

#[test]
fn outline_and_targets_as_buildx_prints_them() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bb = busybox(&env);
    // buildx's outline test, with the local busybox for every base.
    let ctx = context(
        dir.path(),
        &format!(
            "\n# first builds the first thing\nFROM {bb} AS first\nRUN --mount=type=secret,target=/etc/passwd,required=true --mount=type=ssh true\n\nFROM {bb} AS second\nRUN --mount=type=secret,id=unused --mount=type=ssh,id=ssh2 true\n\nFROM scratch AS third\n# BAR is the secret's suffix\nARG BAR\nRUN --mount=type=secret,id=second${{BAR}} true\n\nFROM third AS target\nCOPY --from=first /foo /\nRUN --mount=type=ssh,id=ssh3,required true\n\nFROM second\n"
        ),
        &[],
    );
    let cache = dir.path().join("cache");
    let args = ["--build-arg=BAR=678", "--target=target"];
    let run = build(
        &env,
        &cache,
        &ctx,
        &[&args[..], &["--call=outline,format=json"]].concat(),
    )
    .success("outline json");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["name"], "target");
    assert_eq!(v["args"][0]["name"], "BAR");
    assert_eq!(v["args"][0]["value"], "678");
    assert_eq!(v["args"][0]["description"], "is the secret's suffix");
    let names = |k: &str| -> Vec<(String, bool)> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["required"].as_bool().unwrap_or(false),
                )
            })
            .collect()
    };
    assert_eq!(
        names("secrets"),
        [("passwd".into(), true), ("second678".into(), false)]
    );
    assert_eq!(
        names("ssh"),
        [("default".into(), false), ("ssh3".into(), true)]
    );
    assert_eq!(v["sources"].as_array().unwrap().len(), 1);

    let run = build(
        &env,
        &cache,
        &ctx,
        &[&args[..], &["--call=outline"]].concat(),
    )
    .success("outline");
    assert_eq!(
        run.stdout,
        "TARGET: target\n\nBUILD ARG   VALUE   DESCRIPTION\nBAR         678     is the secret's suffix\n\nSECRET      REQUIRED\npasswd      true\nsecond678   \n\nSSH       REQUIRED\ndefault   \nssh3      true\n\n"
    );

    let run = build(&env, &cache, &ctx, &["--call=targets"]).success("targets");
    assert_eq!(
        run.stdout,
        "TARGET    DESCRIPTION\nfirst     builds the first thing\nsecond    \nthird     \ntarget    \n(default) \n"
    );
    let run = build(&env, &cache, &ctx, &["--call", "targets,format=json"]).success("targets json");
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["targets"].as_array().unwrap().len(), 5);
    assert_eq!(v["targets"][0]["description"], "builds the first thing");
    assert_eq!(v["targets"][4]["default"], true);
    assert_eq!(v["targets"][2]["base"], "scratch");
}

#[test]
fn a_base_image_of_another_platform_is_reported() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // A single-platform arm64 image (a manifest, not an index).
    let arm = format!("{}/{}:1", env.registry(), unique("checks-arm64"));
    let base_ctx = context(
        &dir.path().join("base"),
        &format!("FROM {}\nENV ARCH=arm64\n", busybox(&env)),
        &[],
    );
    build(
        &env,
        &cache,
        &base_ctx,
        &[
            "--platform",
            "linux/arm64",
            "--push",
            "--tag",
            &arm,
            "--provenance=false",
        ],
    )
    .success("pushing an arm64 image");
    let ctx = context(dir.path(), &format!("FROM {arm}\n"), &[]);
    let run = build(
        &env,
        &cache,
        &ctx,
        &["--platform", "linux/amd64", "--check"],
    );
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    let expected = format!(
        "\nWARNING: InvalidBaseImagePlatform\nBase image {arm} was pulled with platform \"linux/arm64\", expected \"linux/amd64\" for current build\n"
    );
    assert!(run.stdout.contains(&expected), "{}", run.stdout);
}
