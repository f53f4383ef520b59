//! One engine: Dockerfiles with references across stages, built by `ossb build` and by a
//! two-worker cluster (which splits them into stage tasks), run the same number of steps and,
//! with `SOURCE_DATE_EPOCH`, push the same image digest.

use crate::cluster::{sum_of, Cluster};
use crate::support::*;

/// A case: its name, the Dockerfile (`{bb}` the base, `{m}` a marker unique to the run, so
/// that no case finds another's steps in the cluster's cache), the platforms, extra arguments.
struct Case {
    name: &'static str,
    dockerfile: &'static str,
    platforms: &'static str,
    args: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "copy-from-chain",
        dockerfile: "FROM {bb} AS a\nRUN echo a-{m} > /a\n\
            FROM {bb} AS b\nCOPY --from=a /a /a\nRUN cat /a > /b\n\
            FROM {bb} AS c\nCOPY --from=b /b /b\nRUN cat /b > /c\n\
            FROM {bb}\nCOPY --from=c /c /c\n",
        platforms: "linux/amd64",
        args: &[],
    },
    Case {
        name: "mount-from-stage",
        dockerfile: "FROM {bb} AS tools\nRUN echo tool-{m} > /tool\n\
            FROM {bb}\nRUN --mount=type=bind,from=tools,target=/t cp /t/tool /used\n",
        platforms: "linux/amd64",
        args: &[],
    },
    Case {
        name: "target-of-a-middle-stage",
        dockerfile: "FROM {bb} AS a\nRUN echo a-{m} > /a\n\
            FROM {bb} AS middle\nCOPY --from=a /a /a\nRUN cat /a > /middle\n\
            FROM {bb}\nCOPY --from=middle /middle /m\nRUN echo never-built\n",
        platforms: "linux/amd64",
        args: &["--target", "middle"],
    },
    Case {
        name: "a-stage-of-two-platforms",
        dockerfile: "FROM {bb} AS common\nRUN echo common-{m} > /common\n\
            FROM {bb}\nCOPY --from=common /common /common\nRUN uname -m > /arch\n",
        platforms: "linux/amd64,linux/arm64",
        args: &[],
    },
    Case {
        name: "buildplatform-stage",
        dockerfile: "FROM --platform=$BUILDPLATFORM {bb} AS tools\nARG TARGETARCH\n\
            RUN echo tools-{m}-for-$TARGETARCH > /tools\n\
            FROM {bb}\nCOPY --from=tools /tools /tools\n",
        platforms: "linux/amd64,linux/arm64",
        args: &[],
    },
    Case {
        name: "buildplatform-stage-shared",
        dockerfile: "FROM --platform=$BUILDPLATFORM {bb} AS tools\nRUN echo tools-{m} > /tools\n\
            FROM {bb}\nCOPY --from=tools /tools /tools\nRUN cat /tools > /copy\n",
        platforms: "linux/amd64,linux/arm64",
        args: &[],
    },
    Case {
        name: "diamond",
        dockerfile: "FROM {bb} AS root\nRUN echo root-{m} > /root.txt\n\
            FROM root AS left\nRUN echo left > /left\n\
            FROM root AS right\nRUN echo right > /right\n\
            FROM {bb}\nCOPY --from=left /left /left\nCOPY --from=right /right /right\n",
        platforms: "linux/amd64",
        args: &[],
    },
    Case {
        name: "stage-by-index-and-unused-stage",
        dockerfile: "FROM {bb}\nRUN echo zero-{m} > /zero\n\
            FROM {bb} AS unused\nRUN echo never-built\n\
            FROM {bb}\nCOPY --from=0 /zero /zero\n",
        platforms: "linux/amd64",
        args: &[],
    },
    Case {
        name: "stage-read-by-two-stages",
        dockerfile: "FROM {bb} AS a\nRUN echo a-{m} > /a\n\
            FROM {bb} AS b\nRUN echo b > /b\n\
            FROM {bb} AS x\nCOPY --from=b /b /b\nRUN echo \"x $(cat /b)\" > /x\n\
            FROM {bb}\nCOPY --from=a /a /a\nCOPY --from=x /x /x\n",
        platforms: "linux/amd64",
        args: &[],
    },
    Case {
        name: "context-and-stages",
        dockerfile:
            "FROM {bb} AS gen\nCOPY f.txt /f.txt\nRUN cat /f.txt > /gen && echo {m} >> /gen\n\
            FROM gen AS more\nRUN wc -c /gen > /more\n\
            FROM {bb}\nCOPY --from=more /gen /more /out/\nCOPY f.txt /f.txt\n",
        platforms: "linux/amd64,linux/arm64",
        args: &[],
    },
];

/// `N steps run` from `ossb build`'s summary line.
fn steps_run(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            let (before, _) = l.split_once(" steps run, ")?;
            before.rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no \"N steps run\" in:\n{stderr}"))
}

/// The digest of what a tag names, as pushed (index or manifest).
fn pushed_digest(image: &str) -> String {
    let raw = inspect_raw(image);
    crate::cluster::index_digest(&raw.stdout)
}

#[test]
fn ossb_build_and_the_cluster_run_the_same_steps_and_push_the_same_images() {
    let Some(env) = TestEnv::get() else { return };
    let cluster = Cluster::start(&env);
    let reg = cluster.registry.clone();
    let bb = cluster.busybox(&env);
    let work = tempfile::tempdir().unwrap();
    let mut differences = Vec::new();
    for case in CASES {
        let marker = unique(case.name);
        let dockerfile = case.dockerfile.replace("{bb}", &bb).replace("{m}", &marker);
        let ctx = context(
            &work.path().join(case.name),
            &dockerfile,
            &[("f.txt", "from the context\n")],
        );
        let ctx = ctx.to_str().unwrap();

        // One tag for both: the default provenance names the image it attests by its tag, so
        // the attested indexes are the same bytes only under the same name.
        let local_image = format!("{reg}/tests/{marker}:1");
        let mut args = vec![
            "build",
            "--progress",
            "plain",
            "--insecure-registry",
            &reg,
            "--platform",
            case.platforms,
            "-t",
            &local_image,
            "--push",
        ];
        args.extend_from_slice(case.args);
        args.push(ctx);
        let cache = work.path().join(format!("cache-{}", case.name));
        let local = ossb_with(&env, &cache, &args, &[("SOURCE_DATE_EPOCH", "1700000000")])
            .success(case.name);
        let local_steps = steps_run(&local.stderr);
        let local_digest = pushed_digest(&local_image);

        let cluster_image = local_image.clone();
        let before = sum_of(
            &cluster.metrics_text(),
            "ossb_steps_total",
            "result=\"run\"",
        );
        let mut submit = cluster.submit(
            &cluster.tls,
            &[
                "--platform",
                case.platforms,
                "--insecure-registry",
                &reg,
                "-t",
                &cluster_image,
                "--push",
            ],
        );
        submit
            .args(case.args)
            .arg(ctx)
            .env("SOURCE_DATE_EPOCH", "1700000000");
        let out = submit.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}: the cluster failed:\n{stderr}\n{}",
            case.name,
            cluster.logs()
        );
        let cluster_steps = sum_of(
            &cluster.metrics_text(),
            "ossb_steps_total",
            "result=\"run\"",
        ) - before;
        let cluster_digest = pushed_digest(&cluster_image);
        if local_steps != cluster_steps || local_digest != cluster_digest {
            differences.push(format!(
                "{}: steps run locally {local_steps}, in the cluster {cluster_steps}; \
                 digest locally {local_digest}, in the cluster {cluster_digest}",
                case.name
            ));
        }
    }
    assert!(differences.is_empty(), "{differences:#?}");
}
