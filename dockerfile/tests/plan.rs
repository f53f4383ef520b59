//! Planning: stages, ARG scoping, expansion, history text, pruning, ONBUILD, errors.

use std::collections::HashMap;

use ossb_dockerfile::*;

fn plan_of(src: &str, args: &[(&str, &str)], target: Option<&str>) -> Result<BuildPlan, Error> {
    let df = parse(src, "Dockerfile")?;
    let mut opts = PlanOptions {
        target_platform: "linux/arm64".parse().unwrap(),
        build_platform: "linux/amd64".parse().unwrap(),
        ..PlanOptions::default()
    };
    opts.target = target.map(str::to_string);
    for (k, v) in args {
        opts.build_args.insert(k.to_string(), v.to_string());
    }
    plan(&df, &opts, &HashMap::new())
}

fn history(p: &BuildPlan, stage: usize) -> Vec<String> {
    p.stages[stage]
        .steps
        .iter()
        .map(|s| s.created_by.clone())
        .collect()
}

#[test]
fn plans_a_simple_stage_with_buildkit_history() {
    let p = plan_of(
        "FROM alpine:3.20\nARG V=1\nENV A=b C=\"$V x\"\nWORKDIR app\nUSER nobody\nLABEL k=v\nEXPOSE 80 53/udp\n\
         COPY --chown=nobody f g ./\nRUN echo $A\nCMD echo hi\nENTRYPOINT [\"/bin/x\"]\n",
        &[("V", "2")],
        None,
    )
    .unwrap();
    assert_eq!(p.stages.len(), 1);
    assert_eq!(p.stages[0].base, Base::Image("alpine:3.20".into()));
    assert_eq!(
        history(&p, 0),
        vec![
            "ARG V=2",
            "ENV A=b C=2 x",
            "WORKDIR /app",
            "USER nobody",
            "LABEL k=v",
            "EXPOSE [53/udp 80/tcp]",
            "COPY --chown=nobody f g ./ # buildkit",
            "RUN |1 V=2 /bin/sh -c echo $A # buildkit",
            "CMD [\"/bin/sh\" \"-c\" \"echo hi\"]",
            "ENTRYPOINT [\"/bin/x\"]",
        ]
    );
    let Instruction::Run(run) = &p.stages[0].steps[7].instruction else {
        panic!()
    };
    assert_eq!(run.argv, vec!["/bin/sh", "-c", "echo $A"]);
    assert_eq!(run.build_env, vec![("V".to_string(), "2".to_string())]);
    assert_eq!(run.working_dir, "/app");
    let Instruction::Copy(c) = &p.stages[0].steps[6].instruction else {
        panic!()
    };
    assert_eq!(c.sources, vec!["f", "g"]);
    assert_eq!(c.dest, "/app/");
    assert!(p.stages[0]
        .env
        .contains(&("C".to_string(), "2 x".to_string())));
}

#[test]
fn global_args_reach_from_but_not_stages_unless_redeclared() {
    let src = "ARG BASE=debian\nARG TAG=12\nFROM ${BASE}:${TAG} AS one\nRUN echo $TAG\nARG TAG\nRUN echo x\n";
    let p = plan_of(src, &[("TAG", "11")], None).unwrap();
    assert_eq!(p.stages[0].base, Base::Image("debian:11".into()));
    let h = history(&p, 0);
    assert_eq!(h[0], "RUN /bin/sh -c echo $TAG # buildkit");
    assert_eq!(h[1], "ARG TAG=11");
    assert_eq!(h[2], "RUN |1 TAG=11 /bin/sh -c echo x # buildkit");
}

#[test]
fn predefined_platform_args() {
    let src = "FROM --platform=$BUILDPLATFORM golang AS build\nARG TARGETARCH\nARG BUILDOS\nRUN echo $TARGETARCH\n\
               FROM alpine\nCOPY --from=build /out /out\n";
    let p = plan_of(src, &[], None).unwrap();
    assert_eq!(p.stages[0].platform, Some("linux/amd64".parse().unwrap()));
    assert_eq!(history(&p, 0)[0], "ARG TARGETARCH=arm64");
    assert_eq!(history(&p, 0)[1], "ARG BUILDOS=linux");
    let Instruction::Copy(c) = &p.stages[1].steps[0].instruction else {
        panic!()
    };
    assert_eq!(c.from, Some(Source::Stage(0)));
}

#[test]
fn prunes_stages_the_target_does_not_need() {
    let src =
        "FROM alpine AS a\nRUN a\nFROM alpine AS b\nRUN b\nFROM a AS c\nCOPY --from=1 /x /x\n\
               FROM busybox AS d\nRUN d\n";
    let p = plan_of(src, &[], Some("c")).unwrap();
    let idx: Vec<usize> = p.stages.iter().map(|s| s.index).collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(p.target, 2);
    assert_eq!(p.stages[2].base, Base::Stage(0));
    let p = plan_of(src, &[], None).unwrap();
    assert_eq!(p.stages.len(), 1);
    assert_eq!(p.stages[0].name.as_deref(), Some("d"));
    let df = parse(src, "Dockerfile").unwrap();
    let opts = PlanOptions {
        target: Some("c".into()),
        ..PlanOptions::default()
    };
    assert_eq!(base_images(&df, &opts).unwrap(), vec!["alpine"]);
}

/// A cluster's stage task names its stage by Dockerfile index; the plan holds what it needs,
/// and each stage says which others it needs.
#[test]
fn a_stage_chosen_by_index_and_each_stage_s_deps() {
    let src = "FROM alpine AS a\nRUN a\nFROM alpine AS b\nRUN --mount=from=a,target=/m b\n\
               FROM b AS c\nCOPY --from=0 /x /x\nFROM busybox AS d\nRUN d\n";
    let df = parse(src, "Dockerfile").unwrap();
    let opts = PlanOptions {
        target: Some("d".into()),
        target_index: Some(2),
        ..PlanOptions::default()
    };
    let p = plan(&df, &opts, &HashMap::new()).unwrap();
    let idx: Vec<usize> = p.stages.iter().map(|s| s.index).collect();
    assert_eq!(idx, vec![0, 1, 2]);
    assert_eq!(p.target, 2);
    assert_eq!(p.stages[0].deps(), Vec::<usize>::new());
    assert_eq!(p.stages[1].reads(), vec![0]);
    assert_eq!(p.stages[2].reads(), vec![0]);
    assert_eq!(p.stages[2].deps(), vec![0, 1]);
    let opts = PlanOptions {
        target_index: Some(4),
        ..PlanOptions::default()
    };
    let e = plan(&df, &opts, &HashMap::new()).unwrap_err();
    assert!(
        e.message.contains("stage 4 does not exist"),
        "{}",
        e.message
    );
}

#[test]
fn unknown_target_names_the_closest_stage() {
    let e = plan_of("FROM a AS builder\nFROM b\n", &[], Some("biulder")).unwrap_err();
    assert_eq!(e.message, "target stage 'biulder' could not be found");
    assert_eq!(e.hint.as_deref(), Some("did you mean builder?"));
}

#[test]
fn copy_from_a_misspelt_stage_is_an_error() {
    let e = plan_of(
        "FROM a AS builder\nFROM b\nCOPY --from=biulder /x /y\n",
        &[],
        None,
    )
    .unwrap_err();
    assert_eq!(e.message, "stage 'biulder' not found");
    assert_eq!(e.line, 3);
    assert_eq!(e.hint.as_deref(), Some("did you mean builder?"));
    let p = plan_of("FROM b\nCOPY --from=nginx:1 /x /y\n", &[], None).unwrap();
    let Instruction::Copy(c) = &p.stages[0].steps[0].instruction else {
        panic!()
    };
    assert_eq!(c.from, Some(Source::Image("nginx:1".into())));
}

#[test]
fn errors_point_at_the_line_with_a_hint() {
    let e = plan_of("FROM a\nCOPPY . /app\n", &[], None).unwrap_err();
    assert_eq!(e.to_string(), "Dockerfile:2:1: unknown instruction: COPPY\n 2 | COPPY . /app\n   | ^\n hint: did you mean COPY?");
    let e = plan_of("FROM a\nCOPY --chwon=1 . /app\n", &[], None).unwrap_err();
    assert_eq!(e.message, "unknown flag --chwon for COPY");
    assert_eq!(e.column, 6);
    assert_eq!(e.hint.as_deref(), Some("did you mean --chown?"));
    assert!(plan_of("RUN x\nFROM a\n", &[], None).is_err());
    assert!(plan_of(
        "FROM a\nRUN ${X:?must be set}\nENV Y=${X:?must be set}\n",
        &[],
        None
    )
    .is_err());
}

#[test]
fn onbuild_triggers_of_the_base_run_first() {
    let df = parse("FROM base\nRUN after\n", "Dockerfile").unwrap();
    let mut bases = HashMap::new();
    bases.insert(
        "base".to_string(),
        BaseImageInfo {
            env: vec![
                ("PATH".into(), "/bin".into()),
                ("HOME".into(), "/root".into()),
            ],
            onbuild: vec!["COPY . /src".into(), "RUN make -C $HOME".into()],
            working_dir: "/w".into(),
            ..BaseImageInfo::default()
        },
    );
    let p = plan(&df, &PlanOptions::default(), &bases).unwrap();
    let h = history(&p, 0);
    assert_eq!(
        h,
        vec![
            "COPY . /src # buildkit",
            "RUN /bin/sh -c make -C $HOME # buildkit",
            "RUN /bin/sh -c after # buildkit"
        ]
    );
    assert_eq!(p.stages[0].steps[0].location.start_line, 1);
}

#[test]
fn heredocs_become_files_and_scripts() {
    let src = "FROM a\nENV N=x\nCOPY <<EOF <<'RAW' /d/\nhello $N\nEOF\nraw $N\nRAW\nRUN <<EOT\n#!/bin/bash\necho hi\nEOT\n\
               RUN <<-EOT\n\techo $N\n\tEOT\nRUN cat <<A > f\nline\nA\n";
    let p = plan_of(src, &[], None).unwrap();
    let steps = &p.stages[0].steps;
    let Instruction::Copy(c) = &steps[1].instruction else {
        panic!()
    };
    assert_eq!(c.heredocs[0].name, "EOF");
    assert_eq!(c.heredocs[0].content, "hello x\n");
    assert_eq!(c.heredocs[1].content, "raw $N\n");
    assert_eq!(steps[1].created_by, "COPY <<EOF <<RAW /d/ # buildkit");
    let Instruction::Run(r) = &steps[2].instruction else {
        panic!()
    };
    assert_eq!(r.argv, vec!["/bin/sh", "-c", "/dev/pipes/EOT"]);
    assert_eq!(r.heredocs[0].content, "#!/bin/bash\necho hi\n");
    let Instruction::Run(r) = &steps[3].instruction else {
        panic!()
    };
    assert_eq!(r.argv, vec!["/bin/sh", "-c", "echo $N\n"]);
    let Instruction::Run(r) = &steps[4].instruction else {
        panic!()
    };
    assert_eq!(r.argv, vec!["/bin/sh", "-c", "cat <<A > f\nline\nA"]);
}

#[test]
fn run_mounts_network_and_security() {
    let src = "FROM a AS deps\nFROM a\nWORKDIR /src\nRUN --mount=type=cache,target=/root/.cache,sharing=locked \
               --mount=type=bind,from=deps,source=/x,target=x --mount=type=secret,id=tok --network=none \
               --security=insecure make\n";
    let p = plan_of(src, &[], None).unwrap();
    let Instruction::Run(r) = &p.stages[1].steps[1].instruction else {
        panic!()
    };
    assert_eq!(r.mounts.len(), 3);
    assert_eq!(r.mounts[0].kind, MountType::Cache);
    assert_eq!(r.mounts[0].sharing, Sharing::Locked);
    assert!(!r.mounts[0].read_only);
    assert_eq!(r.mounts[1].from, Some(Source::Stage(0)));
    assert_eq!(r.mounts[1].target, "/src/x");
    assert!(r.mounts[1].read_only);
    assert_eq!(r.mounts[2].target, "/run/secrets/tok");
    assert_eq!(r.network, Network::None);
    assert_eq!(r.security, Security::Insecure);
    let e = plan_of("FROM a\nRUN --mount=type=cahce,target=/x make\n", &[], None).unwrap_err();
    assert_eq!(e.hint.as_deref(), Some("did you mean cache?"));
}

#[test]
fn every_other_instruction() {
    let src = "FROM a\nMAINTAINER me\nSHELL [\"/bin/bash\", \"-c\"]\nRUN x\nVOLUME /data\nSTOPSIGNAL SIGKILL\n\
               HEALTHCHECK --interval=30s --retries=3 CMD curl -f http://x/\nONBUILD RUN y\n\
               ADD --checksum=sha256:abc --keep-git-dir https://x/y.tgz /y\nARG D=/d2\nVOLUME [\"$D\"]\n";
    let p = plan_of(src, &[], None).unwrap();
    let h = history(&p, 0);
    assert_eq!(h[0], "MAINTAINER me");
    assert_eq!(h[1], "SHELL [/bin/bash -c]");
    assert_eq!(h[2], "RUN /bin/bash -c x # buildkit");
    assert_eq!(h[3], "VOLUME [/data]");
    assert_eq!(h[4], "STOPSIGNAL SIGKILL");
    assert_eq!(
        h[5],
        "HEALTHCHECK {Test:[CMD-SHELL curl -f http://x/] Interval:30s Timeout:0s StartPeriod:0s StartInterval:0s Retries:3}"
    );
    assert_eq!(h[6], "");
    assert_eq!(h[7], "ADD https://x/y.tgz /y # buildkit");
    assert_eq!(h[9], "VOLUME [/d2]");
    let Instruction::OnBuild(t) = &p.stages[0].steps[6].instruction else {
        panic!()
    };
    assert_eq!(t, "RUN y");
    let Instruction::Add(a) = &p.stages[0].steps[7].instruction else {
        panic!()
    };
    assert_eq!(a.checksum.as_deref(), Some("sha256:abc"));
    assert_eq!(a.keep_git_dir, Some(true));
    let Instruction::Maintainer(m) = &p.stages[0].steps[0].instruction else {
        panic!()
    };
    assert_eq!(m, "me");
}

#[test]
fn base_images_come_with_their_platform() {
    let df = parse(
        "FROM --platform=$BUILDPLATFORM golang AS b\nFROM alpine\nCOPY --from=b /x /x\n",
        "D",
    )
    .unwrap();
    let opts = PlanOptions {
        target_platform: "linux/arm64".parse().unwrap(),
        build_platform: "linux/amd64".parse().unwrap(),
        ..PlanOptions::default()
    };
    let b = base_images_with_platforms(&df, &opts).unwrap();
    assert_eq!(
        b,
        vec![
            ("golang".to_string(), "linux/amd64".parse().unwrap()),
            ("alpine".to_string(), "linux/arm64".parse().unwrap())
        ]
    );
}

/// The build's `--network` is the network of each RUN that names none; one that names its
/// own keeps it.
#[test]
fn the_build_network_is_the_default_of_run_steps() {
    let src = "FROM scratch\nRUN a\nRUN --network=host b\nRUN --network=default c\n";
    let df = parse(src, "Dockerfile").unwrap();
    let networks = |network| {
        let opts = PlanOptions {
            network,
            ..PlanOptions::default()
        };
        let p = plan(&df, &opts, &HashMap::new()).unwrap();
        p.stages[0]
            .steps
            .iter()
            .filter_map(|s| match &s.instruction {
                Instruction::Run(r) => Some(r.network),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        networks(Network::None),
        [Network::None, Network::Host, Network::None]
    );
    assert_eq!(
        networks(Network::Default),
        [Network::Default, Network::Host, Network::Default]
    );
    assert_eq!("none".parse::<Network>(), Ok(Network::None));
    assert!("bridge"
        .parse::<Network>()
        .unwrap_err()
        .contains("default, none or host"));
}

/// `RUN --mount=type=ssh`: id `default` and target /run/buildkit/ssh_agent.N for the Nth ssh
/// mount of the step, as BuildKit.
#[test]
fn ssh_mounts_default_their_id_and_numbered_targets() {
    let src = "FROM scratch\nRUN --mount=type=ssh --mount=type=cache,target=/c --mount=type=ssh,id=gh,required --mount=type=ssh,target=/s,uid=1000,mode=0400 x\n";
    let df = parse(src, "Dockerfile").unwrap();
    let p = plan(&df, &PlanOptions::default(), &HashMap::new()).unwrap();
    let Instruction::Run(run) = &p.stages[0].steps[0].instruction else {
        panic!("not a RUN")
    };
    let ssh: Vec<_> = run
        .mounts
        .iter()
        .filter(|m| m.kind == MountType::Ssh)
        .map(|m| (m.id.as_deref().unwrap(), m.target.as_str(), m.required))
        .collect();
    assert_eq!(
        ssh,
        [
            ("default", "/run/buildkit/ssh_agent.0", false),
            ("gh", "/run/buildkit/ssh_agent.1", true),
            ("default", "/s", false),
        ]
    );
}

/// The build's `--add-host` lines go with every RUN (and so into its cache key).
#[test]
fn extra_hosts_go_with_every_run() {
    let df = parse("FROM scratch\nRUN a\nCOPY x /x\nRUN b\n", "Dockerfile").unwrap();
    let opts = PlanOptions {
        extra_hosts: vec![("reg.internal".into(), "10.0.0.5".into())],
        ..PlanOptions::default()
    };
    let p = plan(&df, &opts, &HashMap::new()).unwrap();
    let runs: Vec<_> = p.stages[0]
        .steps
        .iter()
        .filter_map(|s| match &s.instruction {
            Instruction::Run(r) => Some(r.extra_hosts.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(runs, vec![opts.extra_hosts.clone(); 2]);
}

#[test]
fn build_args_no_arg_declares_are_reported_as_the_classic_builder_does() {
    let src = "ARG GLOBAL\nFROM scratch AS a\nARG IN_A\nFROM scratch AS b\nARG IN_B\n";
    let df = parse(src, "Dockerfile").unwrap();
    let mut opts = PlanOptions::default();
    for k in ["GLOBAL", "IN_A", "IN_B", "NOPE", "HTTP_PROXY", "no_proxy"] {
        opts.build_args.insert(k.into(), "v".into());
    }
    assert_eq!(unused_build_args(&df, &opts), vec!["NOPE".to_string()]);
    // Stages after the target do not consume (the classic builder stops at the target).
    opts.target = Some("a".into());
    assert_eq!(
        unused_build_args(&df, &opts),
        vec!["IN_B".to_string(), "NOPE".to_string()]
    );
}

#[test]
fn variables_that_outgrow_what_exec_takes_are_refused_with_their_line() {
    // Each ARG repeats the one before ten times: 10^14 bytes if nothing stopped it.
    let mut src = String::from("FROM scratch\nARG A0=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n");
    for i in 1..14 {
        src.push_str(&format!(
            "ARG A{i}={}\n",
            format!("${{A{}}}", i - 1).repeat(10)
        ));
    }
    src.push_str("RUN true\n");
    let started = std::time::Instant::now();
    let e = plan_of(&src, &[], None).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(e.line, 6, "{e}");
    assert!(e.message.contains("at most 131071 bytes"), "{e}");
    assert!(
        e.to_string().len() < 2000,
        "the error repeats the value: {} bytes",
        e.to_string().len()
    );
    // The same for ENV, and for a global ARG given a huge value with --build-arg.
    let e = plan_of(
        "FROM scratch\nARG A\nENV B=$A$A\n",
        &[("A", &"x".repeat(100_000))],
        None,
    )
    .unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    let e = plan_of(
        "ARG A\nFROM scratch\n",
        &[("A", &"x".repeat(200_000))],
        None,
    )
    .unwrap_err();
    assert_eq!(e.line, 1, "{e}");
    // Nesting far past the limit is an error at its line, not a crash.
    let deep = format!(
        "FROM scratch\nENV B={}x{}\n",
        "${A:-".repeat(2500),
        "}".repeat(2500)
    );
    let e = plan_of(&deep, &[], None).unwrap_err();
    assert_eq!(e.line, 2, "{e}");
    assert!(e.message.contains("nest deeper than 64 levels"), "{e}");
}

/// BUILDKIT_SBOM_SCAN_STAGE / _CONTEXT as BuildKit reads them: a global ARG reaches every
/// stage, a stage's own ARG overrides it, a value may list stage names (unnamed stages are
/// `stage-N`), only declared ARGs count, and the args never reach a RUN's environment.
#[test]
fn sbom_scan_args_pick_the_stages_and_context_to_scan() {
    let src = "ARG BUILDKIT_SBOM_SCAN_STAGE=false\nFROM alpine AS build\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nRUN true\n\
               FROM alpine\nRUN true\nFROM alpine AS unused\nARG BUILDKIT_SBOM_SCAN_STAGE=true\n\
               FROM scratch\nARG BUILDKIT_SBOM_SCAN_CONTEXT=true\nARG BUILDKIT_SBOM_SCAN_STAGE\n\
               COPY --from=build /a /a\nCOPY --from=1 /b /b\nRUN x\n";
    let p = plan_of(src, &[], None).unwrap();
    let names: Vec<&str> = p.sbom_scan.stages.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        ["build"],
        "the unused stage is never built, so never scanned"
    );
    assert!(p.sbom_scan.context);
    let (position, _) = p.sbom_scan.stages[0];
    assert_eq!(p.stages[position].name.as_deref(), Some("build"));
    // A list of names, the unnamed stage as stage-1; the global value reaches every stage.
    let p = plan_of(src, &[("BUILDKIT_SBOM_SCAN_STAGE", "stage-1,nope")], None).unwrap();
    let names: Vec<&str> = p.sbom_scan.stages.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["stage-1"]);
    // A --build-arg alone declares nothing.
    let p = plan_of(
        "FROM alpine AS a\nRUN true\nFROM scratch\nCOPY --from=a /a /a\n",
        &[
            ("BUILDKIT_SBOM_SCAN_STAGE", "true"),
            ("BUILDKIT_SBOM_SCAN_CONTEXT", "true"),
        ],
        None,
    )
    .unwrap();
    assert_eq!(p.sbom_scan, SbomScan::default());
    // Never in a RUN's environment (BuildKit's nonEnvArgs); still in its history.
    let p = plan_of(
        "FROM alpine\nARG BUILDKIT_SBOM_SCAN_CONTEXT=true\nARG V=1\nRUN echo $BUILDKIT_SBOM_SCAN_CONTEXT\n",
        &[],
        None,
    )
    .unwrap();
    let Instruction::Run(run) = &p.stages[0].steps[2].instruction else {
        panic!()
    };
    assert_eq!(run.build_env, vec![("V".to_string(), "1".to_string())]);
    assert_eq!(
        history(&p, 0)[2],
        "RUN |2 BUILDKIT_SBOM_SCAN_CONTEXT=true V=1 /bin/sh -c echo $BUILDKIT_SBOM_SCAN_CONTEXT # buildkit"
    );
}

#[test]
fn built_stages_are_not_walked_through() {
    let text = "FROM scratch AS a\nFROM a AS b\nFROM scratch AS c\nFROM scratch\n\
                COPY --from=b /x /x\nCOPY --from=c /y /y\n";
    let p = plan_of(text, &[], None).unwrap();
    assert_eq!(p.stages_to_run(|_| false), [true; 4]);
    // b built by another task: a, which only b needed, is not gone through either.
    assert_eq!(p.stages_to_run(|s| s == 1), [false, false, true, true]);
}

#[test]
fn the_context_paths_a_task_reads_are_those_of_the_stages_it_runs() {
    let text = "FROM scratch AS a\nCOPY src/a* /a/\nADD https://example.com/x.tgz git@h:r.git /\n\
                FROM busybox AS b\nRUN --mount=type=bind,source=tools,target=/t true\n\
                RUN --mount=type=bind,target=/all true\nCOPY --from=a /a /a\n\
                FROM scratch\nCOPY --from=b /b /b\nCOPY ./docs /docs\nADD local.tar /\n";
    let p = plan_of(text, &[], None).unwrap();
    let all = p.context_reads(&p.stages_to_run(|_| false)).unwrap();
    assert_eq!(all, [".", "./docs", "local.tar", "src/a*", "tools"]);
    // The final stage alone (a and b built by other tasks): only its own sources.
    let last = p.context_reads(&p.stages_to_run(|s| s < 2)).unwrap();
    assert_eq!(last, ["./docs", "local.tar"]);
    // Scanning the context for the SBOM reads all of it.
    let text = "ARG BUILDKIT_SBOM_SCAN_CONTEXT=true\nFROM scratch\nARG BUILDKIT_SBOM_SCAN_CONTEXT\nCOPY a /a\n";
    let p = plan_of(text, &[], None).unwrap();
    assert_eq!(p.context_reads(&p.stages_to_run(|_| false)), None);
}
