//! `ossb bake` (issue 18): buildx's bake files resolved by `ossb-bake`, each target built
//! through `ossb build`'s own path.

use std::path::Path;
use std::process::Command;

use crate::support::*;

fn bake(env: &TestEnv, dir: &std::path::Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_ossb"))
        .arg("bake")
        .args(args)
        .current_dir(dir)
        .env("OSSB_CACHE_DIR", dir.join("cache"))
        .env("DOCKER_CONFIG", env.var("DOCKER_CONFIG"))
        .output()
        .expect("running ossb bake");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `--print` gives the JSON buildx prints (a case from buildx's documentation: a matrix with
/// `name`), and `--set '*.platform=...'` reaches every target.
#[test]
fn bake_print_matches_buildx() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    let case = workspace().join("bake/tests/data/buildx-docs/matrix-name");
    std::fs::copy(
        case.join("docker-bake.hcl"),
        dir.path().join("docker-bake.hcl"),
    )
    .unwrap();
    let printed = bake(&env, dir.path(), &["--print", "app"]).success("ossb bake --print");
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap()).unwrap();
    let got: serde_json::Value = serde_json::from_str(&printed.stdout).unwrap();
    assert_eq!(got, expected);
    let set = bake(
        &env,
        dir.path(),
        &["--print", "--set", "*.platform=linux/arm64", "app"],
    )
    .success("ossb bake --print --set");
    let got: serde_json::Value = serde_json::from_str(&set.stdout).unwrap();
    for name in ["app-foo", "app-bar"] {
        assert_eq!(
            got["target"][name]["platforms"][0], "linux/arm64",
            "{got:#}"
        );
    }
}

/// Three targets on one base stage: the shared RUN runs once, every image is pushed and runs.
#[test]
fn bake_builds_three_targets_sharing_a_stage_once() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("bake-shared");
    let busybox = format!("{reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {busybox} AS base\nRUN echo ran-{marker} && echo {marker} > /shared\n\
             FROM base AS app\nARG NAME\nRUN echo \"$NAME\" > /name\nCMD [\"sh\", \"-c\", \"cat /shared /name\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("docker-bake.hcl"),
        format!(
            "variable \"REPO\" {{ default = \"{reg}/tests/{marker}\" }}\n\
             group \"default\" {{ targets = [\"one\", \"two\", \"three\"] }}\n\
             target \"common\" {{ target = \"app\" }}\n\
             target \"one\" {{\n  inherits = [\"common\"]\n  args = {{ NAME = \"one\" }}\n  tags = [\"${{REPO}}:one\"]\n}}\n\
             target \"two\" {{\n  inherits = [\"common\"]\n  args = {{ NAME = \"two\" }}\n  tags = [\"${{REPO}}:two\"]\n}}\n\
             target \"three\" {{\n  inherits = [\"common\"]\n  args = {{ NAME = \"three\" }}\n  tags = [\"${{REPO}}:three\"]\n}}\n"
        ),
    )
    .unwrap();
    let meta = dir.path().join("meta.json");
    let out = bake(
        &env,
        dir.path(),
        &[
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "--push",
            "--metadata-file",
            meta.to_str().unwrap(),
        ],
    )
    .success("ossb bake --push");
    // One entry per target, with buildx's keys.
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
    for name in ["one", "two", "three"] {
        assert!(
            meta[name]["containerimage.digest"]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{meta:#}"
        );
    }
    let runs = out
        .stderr
        .lines()
        .filter(|l| l.contains(&format!("ran-{marker}")) && !l.contains("RUN"))
        .count();
    assert_eq!(
        runs, 1,
        "the shared stage's RUN ran {runs} times:\n{}",
        out.stderr
    );
    for name in ["one", "two", "three"] {
        let run = podman_run(&format!("{reg}/tests/{marker}:{name}"), &[]).success("podman run");
        assert_eq!(run.stdout, format!("{marker}\n{name}\n"));
    }
}

/// A target of a cluster bake whose own stage fails fails the bake, and only itself: the
/// targets that share its base are built and pushed all the same. So does a target whose
/// stage does not exist (refused when planned, exit 2).
#[test]
fn a_failed_target_of_a_cluster_bake_leaves_the_others_built() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = crate::cluster::Cluster::start_with(&env, &[("amd64-a", &[])]);
    let reg = cluster.registry.clone();
    let bb = cluster.busybox(&env);
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("cluster-bake-fail");
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {bb} AS base\nRUN echo {marker} > /shared\n\
             FROM base AS app\nARG NAME\nRUN test \"$NAME\" != bad && echo \"$NAME\" > /name\n\
             CMD [\"sh\", \"-c\", \"cat /shared /name\"]\n"
        ),
    )
    .unwrap();
    let mut hcl = format!(
        "group \"default\" {{ targets = [\"one\", \"bad\", \"two\", \"missing\"] }}\n\
         target \"missing\" {{\n  target = \"nostage\"\n  tags = [\"{reg}/tests/{marker}:missing\"]\n}}\n",
    );
    for name in ["one", "bad", "two"] {
        hcl.push_str(&format!(
            "target \"{name}\" {{\n  target = \"app\"\n  args = {{ NAME = \"{name}\" }}\n  tags = [\"{reg}/tests/{marker}:{name}\"]\n}}\n"
        ));
    }
    std::fs::write(dir.path().join("docker-bake.hcl"), hcl).unwrap();
    let out = cluster
        .submit_bake(&["--insecure-registry", &reg, "--push"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        matches!(out.status.code(), Some(1 | 2)),
        "{stderr}\n{}",
        cluster.logs()
    );
    assert!(stderr.contains("error: target bad:"), "{stderr}");
    // Each target's end came on the bake's stream, not by asking after it broke.
    assert!(!stderr.contains("lost the coordinator"), "{stderr}");
    assert!(
        stderr.contains("error: target missing:") && stderr.contains("nostage"),
        "{stderr}"
    );
    assert!(!stderr.contains("error: target one"), "{stderr}");
    for name in ["one", "two"] {
        let run = podman_run(&format!("{reg}/tests/{marker}:{name}"), &[]).success("podman run");
        assert_eq!(run.stdout, format!("{marker}\n{name}\n"));
    }
}

/// A cluster bake hands one target's image to another as its named context
/// (`contexts = { base = "target:base" }`): the coordinator gives the reading task the image
/// its task made (through the peer cache, no registry), the linked target is not pushed, and
/// the image built on it runs. A cycle of such contexts is refused before anything is sent.
#[test]
fn a_cluster_bake_feeds_one_target_into_another() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = crate::cluster::Cluster::start_with(&env, &[("amd64-a", &[]), ("amd64-b", &[])]);
    let reg = cluster.registry.clone();
    let bb = cluster.busybox(&env);
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("cluster-bake-link");
    let image = format!("{reg}/tests/{marker}:app");
    write_linked_bake(
        dir.path(),
        &format!("FROM {bb}\nENV FROM_BASE={marker}\nRUN echo {marker} > /base-marker\n"),
        &format!("  tags = [\"{reg}/tests/{marker}:base\"]\n"),
        &format!(
            "FROM base AS app\nRUN test \"$FROM_BASE\" = \"$(cat /base-marker)\" && cp /base-marker /app-marker\n\
             FROM {bb} AS other\nCOPY --from=base /base-marker /copied\n\
             FROM app\nCOPY --from=other /copied /copied\nCMD [\"cat\", \"/app-marker\", \"/copied\"]\n"
        ),
        &image,
    );
    let out = cluster
        .submit_bake(&["--insecure-registry", &reg, "--push", "app"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", cluster.logs());
    assert!(
        stderr.contains("context base (target base's image)"),
        "the app's tasks were handed the base target's image\n{stderr}"
    );
    let run = podman_run(&image, &[]).success("podman run");
    assert_eq!(run.stdout, format!("{marker}\n{marker}\n"));
    // Only linked, the base target is cache-only: nothing went to its tag.
    let tags = tool(
        "skopeo",
        &[
            "list-tags",
            "--tls-verify=false",
            &format!("docker://{reg}/tests/{marker}"),
        ],
    )
    .success("skopeo list-tags")
    .stdout;
    assert!(
        tags.contains("\"app\"") && !tags.contains("\"base\""),
        "{tags}"
    );

    std::fs::write(
        dir.path().join("docker-bake.hcl"),
        "target \"a\" {\n  contexts = { x = \"target:b\" }\n}\ntarget \"b\" {\n  contexts = { y = \"target:a\" }\n}\n",
    )
    .unwrap();
    let cycle = cluster
        .submit_bake(&["a"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cycle.stderr);
    assert_eq!(cycle.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("target: contexts"), "{stderr}");
}

/// Writes a bake of two targets in `dir`: `base` (its Dockerfile, and `base_attrs` lines in its
/// block) and `app`, which reads it as its `base` context and is tagged `image`.
fn write_linked_bake(dir: &Path, base: &str, base_attrs: &str, app: &str, image: &str) {
    std::fs::write(dir.join("base.Dockerfile"), base).unwrap();
    std::fs::write(dir.join("app.Dockerfile"), app).unwrap();
    std::fs::write(
        dir.join("docker-bake.hcl"),
        format!(
            "target \"base\" {{\n  dockerfile = \"base.Dockerfile\"\n{base_attrs}}}\n\
             target \"app\" {{\n  dockerfile = \"app.Dockerfile\"\n  contexts = {{ base = \"target:base\" }}\n  tags = [\"{image}\"]\n}}\n"
        ),
    )
    .unwrap();
}

/// `ossb-submit bake --push app` in `dir` with `env`, the coordinator killed with SIGKILL and
/// restarted once the client's log shows `started`: how the client ended, and its log.
fn bake_through_a_restart(
    cluster: &mut crate::cluster::Cluster,
    dir: &Path,
    env: &[(&str, &str)],
    started: &str,
) -> (std::process::ExitStatus, String) {
    // Outside the context, which the client reads while the log grows.
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("submit.log");
    let reg = cluster.registry.clone();
    let mut child = cluster
        .submit_bake(&["--insecure-registry", &reg, "--push", "app"])
        .envs(env.iter().copied())
        .current_dir(dir)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    crate::cluster::wait_for_text(cluster, &log, started, 120);
    cluster.restart_coordinator();
    let status = crate::cluster::wait_child(cluster, &mut child, &log, 240);
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

/// The coordinator killed with SIGKILL while a cluster bake runs, then restarted on the same
/// state dir: the bake's targets run again as one graph, so the target that reads another
/// through `target:` still finds it (resumed as builds of their own, it failed with exit 2),
/// and the client, which lost the connection, is told how each ended and exits 0. A target
/// with a secret is not kept, and the one reading it says so.
#[test]
fn a_cluster_bake_survives_a_killed_coordinator() {
    let Some(env) = TestEnv::get() else { return };
    let mut cluster = crate::cluster::Cluster::start_with(&env, &[("worker-a", &["--slots", "1"])]);
    let reg = cluster.registry.clone();
    let bb = cluster.busybox(&env);
    let dir = tempfile::tempdir().unwrap();
    let app = "FROM base\nRUN cp /base-marker /app-marker\nCMD [\"cat\", \"/app-marker\"]\n";
    let marker = unique("cluster-bake-restart");
    let image = format!("{reg}/tests/{marker}:app");
    write_linked_bake(
        dir.path(),
        &format!("FROM {bb}\nRUN echo start-{marker} && sleep 5 && echo {marker} > /base-marker\n"),
        "",
        app,
        &image,
    );
    let (status, text) =
        bake_through_a_restart(&mut cluster, dir.path(), &[], &format!("start-{marker}"));
    assert!(status.success(), "{text}\n{}", cluster.logs());
    assert!(text.contains("lost the coordinator"), "{text}");
    let run = podman_run(&image, &[]).success("podman run of a bake that outlived its coordinator");
    assert_eq!(run.stdout, format!("{marker}\n"));

    // A target with a secret is never written to disk, so it cannot resume: the target reading
    // it fails saying why, not that the bake has no such target.
    let marker = unique("cluster-bake-restart-secret");
    write_linked_bake(
        dir.path(),
        &format!("FROM {bb}\nRUN --mount=type=secret,id=tok echo start-{marker} && sleep 5 && echo {marker} > /base-marker\n"),
        "  secret = [\"id=tok,env=BAKE_TOK\"]\n",
        app,
        &image,
    );
    let (status, text) = bake_through_a_restart(
        &mut cluster,
        dir.path(),
        &[("BAKE_TOK", "not-on-disk")],
        &format!("start-{marker}"),
    );
    assert_eq!(status.code(), Some(1), "{text}\n{}", cluster.logs());
    assert!(
        text.contains(
            "target base of the bake could not be resumed after the coordinator restarted"
        ),
        "{text}"
    );
}

/// Bad bake files exit 2 and name the file and line; an unknown target is named.
#[test]
fn bad_bake_files_exit_2_with_file_and_line() {
    let Some(env) = TestEnv::get() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("docker-bake.hcl"),
        "target \"a\" {\n  inherits = [\"b\"]\n}\ntarget \"b\" {\n  inherits = [\"a\"]\n}\n",
    )
    .unwrap();
    let cycle = bake(&env, dir.path(), &["--print", "a"]);
    assert_eq!(cycle.code, 2, "{}", cycle.stderr);
    assert!(
        cycle.stderr.contains("docker-bake.hcl:"),
        "{}",
        cycle.stderr
    );
    let unknown = bake(&env, dir.path(), &["--print", "nope"]);
    assert_eq!(unknown.code, 2, "{}", unknown.stderr);
    assert!(unknown.stderr.contains("nope"), "{}", unknown.stderr);
    std::fs::write(
        dir.path().join("docker-bake.hcl"),
        "target \"a\" {\n  tags = [upper(\"a\", \"b\")]\n}\n",
    )
    .unwrap();
    let arity = bake(&env, dir.path(), &["--print", "a"]);
    assert_eq!(arity.code, 2, "{}", arity.stderr);
    assert!(
        arity.stderr.contains("docker-bake.hcl:2"),
        "{}",
        arity.stderr
    );
}

/// A compose file's three services with `build:` sections: all three are built and pushed
/// under their `image:` names.
#[test]
fn bake_builds_the_services_of_a_compose_file() {
    let Some(env) = TestEnv::get() else { return };
    let reg = env.registry();
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("bake-compose");
    let busybox = format!("{reg}/{}", env.var("OSSB_TEST_BUSYBOX"));
    for name in ["web", "api", "worker"] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(
            sub.join("Dockerfile"),
            format!("FROM {busybox}\nARG WHO\nRUN echo \"$WHO\" > /who\nCMD [\"cat\", \"/who\"]\n"),
        )
        .unwrap();
    }
    let mut compose = String::from("services:\n");
    for name in ["web", "api", "worker"] {
        compose.push_str(&format!(
            "  {name}:\n    image: {reg}/tests/{marker}-{name}:1\n    build:\n      context: ./{name}\n      args:\n        WHO: {name}\n"
        ));
    }
    std::fs::write(dir.path().join("compose.yaml"), compose).unwrap();
    bake(
        &env,
        dir.path(),
        &["--progress", "plain", "--insecure-registry", &reg, "--push"],
    )
    .success("ossb bake of a compose file");
    for name in ["web", "api", "worker"] {
        let run = podman_run(&format!("{reg}/tests/{marker}-{name}:1"), &[]).success("podman run");
        assert_eq!(run.stdout, format!("{name}\n"));
    }
}

/// The same bake through the cluster (`ossb-submit bake`): the coordinator plans every
/// target at once as one graph, so the stage they share is one task (scheduled once, its step
/// run once cluster-wide by the coordinator's metrics) and the targets' own stages run on both
/// one-slot workers at the same time (their RUNs' windows overlap); every image runs.
#[test]
fn the_cluster_bakes_targets_as_one_graph_and_builds_the_shared_stage_once() {
    let Some(env) = TestEnv::get() else { return };
    let one_slot: &[&str] = &["--slots", "1"];
    let cluster =
        crate::cluster::Cluster::start_with(&env, &[("amd64-a", one_slot), ("amd64-b", one_slot)]);
    let reg = cluster.registry.clone();
    let bb = cluster.busybox(&env);
    let dir = tempfile::tempdir().unwrap();
    let marker = unique("cluster-bake");
    // Each target's RUN says when it began and ended (the machine's uptime, one clock for
    // both workers).
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {bb} AS base\nRUN echo {marker} > /shared\n\
             FROM base AS app\nARG NAME\n\
             RUN echo \"began=$NAME@$(cut -d' ' -f1 /proc/uptime)\" && sleep 2 && echo \"$NAME\" > /name && echo \"ended=$NAME@$(cut -d' ' -f1 /proc/uptime)\"\n\
             CMD [\"sh\", \"-c\", \"cat /shared /name\"]\n"
        ),
    )
    .unwrap();
    let mut hcl = String::from("group \"default\" { targets = [\"one\", \"two\", \"three\"] }\n");
    for name in ["one", "two", "three"] {
        hcl.push_str(&format!(
            "target \"{name}\" {{\n  target = \"app\"\n  args = {{ NAME = \"{name}\" }}\n  tags = [\"{reg}/tests/{marker}:{name}\"]\n}}\n"
        ));
    }
    std::fs::write(dir.path().join("docker-bake.hcl"), hcl).unwrap();
    let before = crate::cluster::sum_of(
        &cluster.metrics_text(),
        "ossb_steps_total",
        "result=\"run\"",
    );
    let out = cluster
        .submit_bake(&["--insecure-registry", &reg, "--push"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", cluster.logs());
    let ran = crate::cluster::sum_of(
        &cluster.metrics_text(),
        "ossb_steps_total",
        "result=\"run\"",
    ) - before;
    assert_eq!(ran, 4, "the shared step and one per target\n{stderr}");
    // One task for the shared stage, one per target for its own.
    let scheduled = |stage: &str| {
        stderr
            .lines()
            .filter(|l| l.contains(&format!("stage {stage} scheduled on worker ")))
            .count()
    };
    assert_eq!(scheduled("0"), 1, "the shared stage is one task\n{stderr}");
    assert_eq!(scheduled("1"), 3, "{stderr}");
    assert_eq!(
        stderr.matches("built once, by the task of target").count(),
        2,
        "two targets are told another's task builds their base\n{stderr}"
    );
    let workers: std::collections::BTreeSet<&str> = stderr
        .lines()
        .filter_map(|l| l.split("scheduled on worker ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .collect();
    assert!(
        workers.len() >= 2,
        "the targets ran on {workers:?}\n{stderr}"
    );
    // With one slot each, two targets' windows overlap only on two workers at once.
    let at = |word: &str, name: &str| -> f64 {
        let needle = format!("{word}={name}@");
        let line = stderr
            .lines()
            .find_map(|l| l.split(&needle).nth(1))
            .unwrap_or_else(|| panic!("no {needle} in\n{stderr}"));
        line.trim().parse().unwrap()
    };
    let windows: Vec<(f64, f64)> = ["one", "two", "three"]
        .iter()
        .map(|n| (at("began", n), at("ended", n)))
        .collect();
    let overlap = windows
        .iter()
        .enumerate()
        .any(|(i, a)| windows.iter().skip(i + 1).any(|b| a.0 < b.1 && b.0 < a.1));
    assert!(overlap, "no two targets ran at once: {windows:?}\n{stderr}");
    for name in ["one", "two", "three"] {
        let run = podman_run(&format!("{reg}/tests/{marker}:{name}"), &[]).success("podman run");
        assert_eq!(run.stdout, format!("{marker}\n{name}\n"));
    }
}
