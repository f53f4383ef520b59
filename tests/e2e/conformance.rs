//! Conformance with the peer: every Dockerfile of `tests/conformance/` is built by ossb and by
//! `buildah bud` in the same run, and the two images are compared: the config fields a container
//! runtime reads, and the flattened filesystems (both unpacked by umoci from OCI layouts, then
//! walked here: type, mode, owner, size, content, link target, hardlink groups, xattrs; mtimes
//! aside).
//!
//! The cases are the project's own (`tests/conformance/own/`, one per feature area) and those of
//! Kaniko's integration corpus that build offline (`tests/conformance/kaniko/`, Apache-2.0, see its
//! LICENSE and SOURCE). Kaniko's files are kept as published; the test rewrites their base images
//! to the local busybox by the literal substitutions listed with each case (a digest pin, alpine,
//! debian or any other image becomes `<registry>/library/busybox:latest`), because the tests reach
//! no registry on the internet; the cases that need Debian's useradd and groupadd get the debootstrap Debian of
//! `scripts/testenv.sh start --debian` instead. Our own Dockerfiles take the base as `--build-arg
//! BUSYBOX=...`.
//!
//! Every difference must be either fixed or listed in [`KNOWN`] with its kind (a bug in ossb not
//! fixed yet, or a justified divergence: buildah differs from Docker/BuildKit, or the case is
//! time dependent) and the reason. The test fails on an unlisted difference, on a listed bug that
//! no longer occurs (so that the list stays true: remove the entry once the bug is fixed), and on
//! a case that fails to build (unless listed). The report (`-- --nocapture`) says how many cases
//! match exactly. `OSSB_CONFORMANCE_ONLY=own/metadata,kaniko/env` runs only those cases.

use crate::support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// One Dockerfile to build with both builders.
struct Case {
    /// `own` or `kaniko`.
    suite: &'static str,
    name: &'static str,
    /// The build context, relative to tests/conformance/.
    context: &'static str,
    /// The Dockerfile, relative to the context.
    dockerfile: &'static str,
    /// `--build-arg`s; `{busybox}` and `{registry}` are replaced.
    args: &'static [&'static str],
    target: Option<&'static str>,
    /// Literal text substitutions applied to the Dockerfile (each must match).
    rewrite: &'static [(&'static str, &'static str)],
    /// A shell script run in the copy of the context before the builds (what git cannot keep).
    setup: &'static str,
}

impl Case {
    /// The case's name in the report and in [`KNOWN`]: `suite/name`.
    fn id(&self) -> String {
        format!("{}/{}", self.suite, self.name)
    }
}

const OWN_ARGS: &[&str] = &["BUSYBOX={busybox}"];

const fn own(name: &'static str, context: &'static str) -> Case {
    Case {
        suite: "own",
        name,
        context,
        dockerfile: "Dockerfile",
        args: OWN_ARGS,
        target: None,
        rewrite: &[],
        setup: "",
    }
}

const fn kaniko(name: &'static str, rewrite: &'static [(&'static str, &'static str)]) -> Case {
    Case {
        suite: "kaniko",
        name,
        context: "kaniko",
        dockerfile: "",
        args: &[],
        target: None,
        rewrite,
        setup: "",
    }
}

const ALPINE_PIN: &str =
    "alpine@sha256:5ce5f501c457015c4b91f91a15ac69157d9b06f1a75cf9107bf2b62e0843983a";
const DEBIAN: &[(&str, &str)] = &[("debian:10.13", "{busybox}")];
/// Cases that need Debian's own tools (useradd, groupadd): the debootstrap Debian of
/// `scripts/testenv.sh start --debian`.
const REAL_DEBIAN: &[(&str, &str)] = &[("debian:10.13", "{debian}")];
const ALPINE: &[(&str, &str)] = &[(ALPINE_PIN, "{busybox}")];
/// The static busybox of Debian has no adduser: the user is added by hand instead.
const ALPINE_ADDUSER: &[(&str, &str)] = &[
    (ALPINE_PIN, "{busybox}"),
    (
        "yes | adduser -u 1001 dev",
        "echo 'dev:x:1001:1001::/home/dev:/bin/sh' >> /etc/passwd && echo 'dev:x:1001:' >> /etc/group",
    ),
];
const BUSYBOX_LATEST: &[(&str, &str)] = &[("busybox:latest", "{busybox}")];
/// Kaniko's COPY test without the two lines buildah cannot build (see KNOWN).
const COPY_MINUS_FAILING: &[(&str, &str)] = &[
    (ALPINE_PIN, "{busybox}"),
    ("COPY context/bar/doesnotexist* context/foo hello\n", ""),
    ("COPY context/arr[[]0].txt /mydir/\n", ""),
];
/// Kaniko's offline cases (A or B in its OFFLINE_CLASSIFICATION.tsv) that are not compared,
/// and why: printed with the report.
const NOT_COMPARED: &[(&str, &str)] = &[(
    "add",
    "ADD of https URLs: needs the internet (the rest of its features are in own/ and build.rs)",
)];
const BUSYBOX_PIN: &[(&str, &str)] = &[(
    "busybox@sha256:1bd6df27274fef1dd36eb529d0f4c8033f61c675d6b04213dd913f902f7cafb5",
    "{busybox}",
)];

fn cases() -> Vec<Case> {
    let mut cases = vec![
        own("env_expansion", "own/env_expansion"),
        own("workdir_user", "own/workdir_user"),
        own("metadata", "own/metadata"),
        own("shell_forms", "own/shell_forms"),
        own("healthcheck_none", "own/healthcheck_none"),
        own("multistage", "own/multistage"),
        Case {
            setup: "printf 'hard\\n' > hard-1 && ln hard-1 hard-2 && printf 'x\\n' > xattr.txt \
                    && setfattr -n user.conformance -v yes xattr.txt && mkdir emptydir",
            ..own("copy_context", "own/copy_context")
        },
        own("whiteouts", "own/whiteouts"),
        own("links_perms", "own/links_perms"),
        Case {
            args: &["BUSYBOX={busybox}", "TAG=custom"],
            ..own("scratch_args", "own/scratch_args")
        },
        Case {
            target: Some("second"),
            ..own("target_stage", "own/target_stage")
        },
        own("run_forms", "own/run_forms"),
    ];
    let kaniko_cases = [
        kaniko("add_chown_intermediate_dirs", ALPINE_ADDUSER),
        kaniko("arg_blank_with_quotes", BUSYBOX_LATEST),
        kaniko("arg_from_quotes", BUSYBOX_LATEST),
        kaniko("arg_from_single_quotes", BUSYBOX_LATEST),
        kaniko("arg_multi", BUSYBOX_LATEST),
        kaniko(
            "arg_multi_empty_val",
            &[
                (
                    "FROM busybox${VARIANT}:1.3${VERSION}",
                    "FROM {registry}/library/busybox${VARIANT}:${VERSION}",
                ),
                ("ARG VERSION=1", "ARG VERSION=latest"),
            ],
        ),
        kaniko("arg_multi_with_quotes", BUSYBOX_LATEST),
        Case {
            args: &["SSH_PUBLIC_KEY=Pµbl1cK€Y"],
            ..kaniko("arg_secret", DEBIAN)
        },
        kaniko(
            "arg_two_level",
            &[
                ("ARG A=3.9", "ARG A=latest"),
                ("alpine:${A}", "{registry}/library/busybox:${A}"),
            ],
        ),
        kaniko("cache", DEBIAN),
        kaniko("cache_oci", DEBIAN),
        kaniko("cache_perm_oci", &[("FROM busybox", "FROM {busybox}")]),
        kaniko(
            "cache_copy_oci",
            &[("google/cloud-sdk:256.0.0-alpine", "{busybox}")],
        ),
        kaniko("daemons", &[("FROM busybox", "FROM {busybox}")]),
        kaniko("issue_704", &[("FROM alpine", "FROM {busybox}")]),
        kaniko(
            "cache_copy",
            &[("google/cloud-sdk:256.0.0-alpine", "{busybox}")],
        ),
        kaniko("cache_perm", &[("FROM busybox", "FROM {busybox}")]),
        kaniko("cmd", &[("debian:12", "{busybox}")]),
        kaniko(
            "complex_substitution",
            &[(
                "docker.io/library/busybox:latest@sha256:afe605d272837ce1732f390966166c2afff5391208ddd57de10942748694049d",
                "{busybox}",
            )],
        ),
        kaniko("copy", ALPINE),
        Case {
            // The same without the two lines that fail (see KNOWN), so that the other 17 COPYs
            // are compared; buildah also fails on the file `arr[0].txt` matched by a wildcard,
            // which is removed.
            dockerfile: "dockerfiles/Dockerfile_test_copy",
            setup: "rm 'context/arr[0].txt'",
            ..kaniko("copy_minus_failing_lines", COPY_MINUS_FAILING)
        },
        kaniko("copy_chown_intermediate_dirs", ALPINE_ADDUSER),
        // Kaniko builds these two from a tarball and a GCS bucket; here from the same context,
        // without the lines neither builder can build (as copy_minus_failing_lines).
        Case {
            setup: "rm 'context/arr[0].txt'",
            ..kaniko("copy_reproducible", COPY_MINUS_FAILING)
        },
        Case {
            setup: "rm 'context/arr[0].txt'",
            ..kaniko("copy_bucket", COPY_MINUS_FAILING)
        },
        kaniko("copy_same_file_many_times", ALPINE),
        kaniko(
            "copy_root_multistage",
            &[("busybox:1.31", "{busybox}"), (ALPINE_PIN, "{busybox}")],
        ),
        kaniko(
            "copy_symlink",
            &[("FROM busybox as t", "FROM {busybox} as t")],
        ),
        kaniko("copyadd_chmod", ALPINE),
        kaniko(
            "dangling_symlink",
            &[(
                "busybox:latest@sha256:b26cd013274a657b86e706210ddd5cc1f82f50155791199d29b9e86e935ce135",
                "{busybox}",
            )],
        ),
        kaniko("deleted_file_cached", &[("FROM alpine", "FROM {busybox}")]),
        kaniko("dockerignore", &[]),
        kaniko("env", DEBIAN),
        kaniko("expose", DEBIAN),
        kaniko("extract_fs", DEBIAN),
        kaniko(
            "from_multistage_capital",
            &[("FROM alpine as", "FROM {busybox} as")],
        ),
        kaniko("ignore", &[]),
        kaniko("issue_519", &[("FROM alpine as", "FROM {busybox} as")]),
        kaniko("issue_647", &[("alpine:3.8", "{busybox}")]),
        kaniko("label", DEBIAN),
        kaniko("maintainer", &[]),
        kaniko(
            "meta_arg",
            &[
                ("ARG REGISTRY=docker.io", "ARG REGISTRY={registry}"),
                ("ARG IMAGE=debian", "ARG IMAGE=library/busybox"),
                ("ARG TAG=9.11", "ARG TAG=latest"),
                // busybox's touch takes no bare number as a date.
                ("touch -d 0", "touch -d @0"),
            ],
        ),
        kaniko("metadata", &[("debian:10.2", "{busybox}")]),
        Case {
            args: &["file=/foo2"],
            // busybox has no /etc/os-release: COPY --from=<image> takes /etc/passwd instead.
            ..kaniko(
                "multistage",
                &[
                    ("debian:10.13", "{busybox}"),
                    (
                        "fedora@sha256:c4cc32b09c6ae3f1353e7e33a8dda93dc41676b923d6d89afa996b421cc5aa48",
                        "{busybox}",
                    ),
                    ("/etc/os-release", "/etc/passwd"),
                ],
            )
        },
        kaniko(
            "multistage_args_issue_1911",
            &[("alpine:latest", "{busybox}")],
        ),
        kaniko("mv_add", BUSYBOX_PIN),
        kaniko("registry", BUSYBOX_PIN),
        kaniko(
            "replaced_symlinks",
            &[(
                "alpine@sha256:ab00606a42621fb68f2ed6ad3c88be54397f981a7b70a79db3d1172b11c4367d",
                "{busybox}",
            )],
        ),
        Case {
            args: &["file=/file"],
            ..kaniko("run", DEBIAN)
        },
        kaniko("run_2", DEBIAN),
        Case {
            args: &["file=/file"],
            ..kaniko("run_new", DEBIAN)
        },
        Case {
            args: &["file=/file"],
            ..kaniko("run_redo", DEBIAN)
        },
        Case {
            // Kaniko's own arguments for this file (integration/images.go).
            args: &[
                "image=scratch",
                "hello=hello-value",
                "file=context/foo",
                "file3=context/b*",
            ],
            ..kaniko("scratch", &[])
        },
        kaniko(
            "snapshotter_ignorelist",
            &[(
                "alpine@sha256:def822f9851ca422481ec6fee59a9966f12b351c62ccb9aca841526ffaa9f748",
                "{busybox}",
            )],
        ),
        Case {
            args: &["file=/foo2"],
            target: Some("second"),
            ..kaniko("target", &[("gcr.io/distroless/base:latest", "{busybox}")])
        },
        kaniko("user", DEBIAN),
        kaniko("user_run", REAL_DEBIAN),
        kaniko("user_home", REAL_DEBIAN),
        kaniko("user_nonexisting", REAL_DEBIAN),
        kaniko("workdir_with_user", REAL_DEBIAN),
        kaniko("copy_chown_nonexisting_user", REAL_DEBIAN),
        kaniko("volume", DEBIAN),
        kaniko("volume_2", DEBIAN),
        kaniko("volume_3", ALPINE),
        kaniko(
            "volume_4",
            &[(
                "rabbitmq@sha256:57b028a4bb9592ece3915e3e9cdbbaecb3eb82b753aaaf5250f8d25d81d318e2",
                "{busybox}",
            )],
        ),
        kaniko(
            "whitelist",
            &[(
                "debian@sha256:38236c068c393272ad02db100e09cac36a5465149e2924a035ee60d6c60c38fe",
                "{busybox}",
            )],
        ),
        Case {
            args: &["workdir=/arg/workdir"],
            ..kaniko("workdir", DEBIAN)
        },
        Case {
            context: "kaniko/dockerfiles-with-context/issue-1315",
            dockerfile: "Dockerfile",
            ..kaniko("issue-1315", &[("alpine:3.11", "{busybox}")])
        },
        Case {
            context: "kaniko/dockerfiles-with-context/issue-2075",
            dockerfile: "Dockerfile",
            ..kaniko(
                "issue-2075",
                &[
                    ("docker.io/debian:bullseye-slim", "{busybox}"),
                    // busybox has no /usr/local/bin.
                    ("cp /tmp/top1", "mkdir -p /usr/local/bin; cp /tmp/top1"),
                ],
            )
        },
        Case {
            context: "kaniko/dockerfiles-with-context/issue-721",
            dockerfile: "Dockerfile",
            ..kaniko("issue-721", &[("FROM alpine", "FROM {busybox}")])
        },
    ];
    cases.extend(kaniko_cases);
    cases
}

/// Whether a known divergence is ossb's bug or a justified difference.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// ossb is wrong (Docker/BuildKit and buildah agree); reported to the lead, not fixed yet.
    Bug,
    /// ossb is right or the difference is not a defect (buildah differs from Docker/BuildKit,
    /// or the content is time dependent).
    Justified,
}

/// A difference the test accepts, with the reason. `item` is the difference's name as the
/// report prints it: `config <Field>`, `<path> <field>` (`presence`, `type`, `mode`, `uid`,
/// `gid`, `size`, `content`, `target`, `rdev`, `xattrs`, `hardlinks`) or `build`.
struct Known {
    case: &'static str,
    item: &'static str,
    kind: Kind,
    why: &'static str,
}

/// Reasons shared by several entries of [`KNOWN`].
const OVERLAY_HARDLINKS: &str = "justified, seen only when ossb diffs RUN by metadata snapshots (no overlayfs): appending to one name of a hardlink group in a later RUN keeps the group (POSIX semantics), while an overlayfs copy-up (buildah, Docker overlay2, ossb on overlayfs) breaks the link";
const ENV_ORDER: &str = "justified: an ENV of a name the image already has replaces it in place in BuildKit (addEnv), as in ossb; buildah moves it to the end";
const VOLUME_DIRS: &str = "justified: buildah creates VOLUME directories and discards what a later RUN writes under them (the classic builder's behaviour); BuildKit only records VOLUME in the config, as ossb does";
const WORKDIR_ALWAYS: &str = "justified: BuildKit creates the WORKDIR directory at the WORKDIR instruction even when nothing uses it, as ossb does; buildah creates it only when a later RUN/COPY needs it";
const COPY_CREATED_DIR_META: &str = "justified: a destination directory created by COPY of a directory takes the source directory's metadata (with --chmod/--chown applied) in BuildKit (fsutil copyDirectory: copyFileInfo when created), as in ossb; buildah makes it 0755";

/// The differences the test accepts, each with its reason (one line each: a table).
#[rustfmt::skip]
const KNOWN: &[Known] = &[
    // ---- bugs in ossb, reported to the lead
    Known { case: "kaniko/copy", item: "build (buildah fails)", kind: Kind::Justified, why: "buildah fails on `COPY context/arr[[]0].txt`: it globs the matched name `arr[0].txt` again; BuildKit and ossb copy it (ossb also accepts a wildcard that matches nothing beside other sources, as BuildKit does)" },
    // ---- justified divergences
    Known { case: "kaniko/env", item: "config Env order", kind: Kind::Justified, why: ENV_ORDER },
    Known { case: "own/env_expansion", item: "config Env order", kind: Kind::Justified, why: ENV_ORDER },
    Known { case: "kaniko/cache", item: "/date content", kind: Kind::Justified, why: "time dependent: `RUN date > /date`" },
    Known { case: "kaniko/cache_oci", item: "/date content", kind: Kind::Justified, why: "time dependent: `RUN date > /date`" },
    Known { case: "kaniko/multistage", item: "/date content", kind: Kind::Justified, why: "time dependent: `RUN date > /date`" },
    Known { case: "kaniko/cmd", item: "config Entrypoint", kind: Kind::Justified, why: "`ENTRYPOINT [\"myentrypoint\"] # This should ...` is not valid JSON (comments only start lines), so BuildKit takes the shell form, as ossb does; buildah's parser drops the trailing text and takes the exec form" },
    Known { case: "own/shell_forms", item: "config Cmd", kind: Kind::Justified, why: "a shell-form CMD after SHELL [\"/bin/sh\", \"-e\", \"-c\"] runs in that shell in BuildKit (dispatchCmd: withShell), as in ossb; buildah keeps /bin/sh -c for CMD (its RUN does use the SHELL)" },
    Known { case: "kaniko/copyadd_chmod", item: "/dir777 mode", kind: Kind::Justified, why: COPY_CREATED_DIR_META },
    Known { case: "own/multistage", item: "/chowned mode", kind: Kind::Justified, why: COPY_CREATED_DIR_META },
    Known { case: "kaniko/expose", item: "config ExposedPorts", kind: Kind::Justified, why: "buildah drops `EXPOSE $port/$protocol` (83/tcp) after `EXPOSE $port/udp`; BuildKit records both, as ossb does" },
    Known { case: "own/links_perms", item: "/l/file size", kind: Kind::Justified, why: OVERLAY_HARDLINKS },
    Known { case: "own/links_perms", item: "/l/file content", kind: Kind::Justified, why: OVERLAY_HARDLINKS },
    Known { case: "own/links_perms", item: "/l/file hardlinks", kind: Kind::Justified, why: OVERLAY_HARDLINKS },
    Known { case: "own/links_perms", item: "/l/hard1 hardlinks", kind: Kind::Justified, why: OVERLAY_HARDLINKS },
    Known { case: "own/links_perms", item: "/l/hard2 size", kind: Kind::Justified, why: OVERLAY_HARDLINKS },
    Known { case: "own/links_perms", item: "/l/hard2 content", kind: Kind::Justified, why: OVERLAY_HARDLINKS },
    Known { case: "own/links_perms", item: "/l/hard2 hardlinks", kind: Kind::Justified, why: OVERLAY_HARDLINKS },
    Known { case: "kaniko/volume", item: "/baz presence", kind: Kind::Justified, why: VOLUME_DIRS },
    Known { case: "kaniko/volume", item: "/baz/bat presence", kind: Kind::Justified, why: VOLUME_DIRS },
    Known { case: "kaniko/volume", item: "/foo/bar presence", kind: Kind::Justified, why: VOLUME_DIRS },
    Known { case: "kaniko/volume", item: "/qux presence", kind: Kind::Justified, why: VOLUME_DIRS },
    Known { case: "kaniko/volume", item: "/qux/quux presence", kind: Kind::Justified, why: VOLUME_DIRS },
    Known { case: "kaniko/volume", item: "/tmp/hey presence", kind: Kind::Justified, why: VOLUME_DIRS },
    Known { case: "kaniko/volume_2", item: "build (ossb fails)", kind: Kind::Justified, why: "VOLUME /foo1 then `RUN echo hello > /foo1/hello`: BuildKit does not create VOLUME directories, so the RUN fails there as in ossb; buildah creates them" },
    Known { case: "kaniko/workdir", item: "/another*", kind: Kind::Justified, why: WORKDIR_ALWAYS },
    Known { case: "kaniko/workdir", item: "/arg*", kind: Kind::Justified, why: WORKDIR_ALWAYS },
    Known { case: "kaniko/workdir", item: "/new*", kind: Kind::Justified, why: WORKDIR_ALWAYS },
    Known { case: "own/workdir_user", item: "/created-as-root presence", kind: Kind::Justified, why: WORKDIR_ALWAYS },
    Known { case: "kaniko/workdir_with_user", item: "/workdir/w uid", kind: Kind::Justified, why: "justified: BuildKit makes /workdir/w at `WORKDIR /workdir/w/uid` under USER 9999 (its mkdir with parents chowns every directory it creates), as ossb does; buildah makes it only at the later COPY, as root" },
    Known { case: "kaniko/workdir_with_user", item: "/workdir/w gid", kind: Kind::Justified, why: "justified: BuildKit makes /workdir/w under USER 9999 as 9999:9999 (a user given by id alone is that group id too: llb.WithUser, then readUser's ByID), as ossb does; buildah makes it only at the later COPY, as root" },
    Known { case: "kaniko/workdir_with_user", item: "/workdir/w/*", kind: Kind::Justified, why: WORKDIR_ALWAYS },
    Known { case: "kaniko/workdir_with_user", item: "/workdir/wo*", kind: Kind::Justified, why: WORKDIR_ALWAYS },
];

impl Known {
    /// Whether this entry explains a difference: the same item, or any item starting with
    /// `item` without its trailing `*`.
    fn covers(&self, item: &str) -> bool {
        match self.item.strip_suffix('*') {
            Some(prefix) => item.starts_with(prefix),
            None => self.item == item,
        }
    }
}

/// What the test compares of an image config (`config` of the OCI image configuration).
const CONFIG_FIELDS: &[&str] = &[
    "Env",
    "Cmd",
    "Entrypoint",
    "WorkingDir",
    "User",
    "ExposedPorts",
    "Volumes",
    "Labels",
    "StopSignal",
    "Healthcheck",
    "Shell",
    "OnBuild",
    "Author",
];

/// One difference between the two images.
#[derive(Debug)]
struct Diff {
    item: String,
    ossb: String,
    buildah: String,
}

struct Outcome {
    name: String,
    diffs: Vec<Diff>,
    secs: f64,
}

#[test]
fn ossb_and_buildah_build_the_same_images() {
    let Some(env) = TestEnv::get() else { return };
    let work = tempfile::tempdir().unwrap();
    let tools = Tools::new(&env, work.path());
    let cases = cases();
    let only = std::env::var("OSSB_CONFORMANCE_ONLY").ok();
    let selected: Vec<&Case> = cases
        .iter()
        .filter(|c| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == c.id() || n == c.name))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let outcomes = Mutex::new(Vec::new());
    // Two builds at a time: the machine has two cores and each builder is mostly waiting.
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(case) = selected.get(i) else { break };
                let start = std::time::Instant::now();
                // A harness failure (umoci, a missing tool) is reported as the case's result
                // instead of stopping the other cases.
                let diffs = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_case(&tools, case)
                }))
                .unwrap_or_else(|e| {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    vec![Diff {
                        item: "harness".into(),
                        ossb: msg,
                        buildah: String::new(),
                    }]
                });
                outcomes.lock().unwrap().push(Outcome {
                    name: case.id(),
                    diffs,
                    secs: start.elapsed().as_secs_f64(),
                });
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap();
    outcomes.sort_by(|a, b| a.name.cmp(&b.name));
    let verdict = judge(&outcomes, only.is_some());
    tools.cleanup();
    assert!(verdict.is_empty(), "conformance with buildah:\n{verdict}");
}

/// Prints the report and returns what fails the test (empty when it passes).
fn judge(outcomes: &[Outcome], partial: bool) -> String {
    let mut failures = String::new();
    let (mut exact, mut documented) = (0, 0);
    let mut used = BTreeSet::new();
    eprintln!("conformance: ossb vs buildah bud, {} cases", outcomes.len());
    for o in outcomes {
        let mut unexplained = Vec::new();
        let mut explained = Vec::new();
        for d in &o.diffs {
            match KNOWN
                .iter()
                .position(|k| k.case == o.name && k.covers(&d.item))
            {
                Some(i) => {
                    used.insert(i);
                    explained.push((d, &KNOWN[i]));
                }
                None => unexplained.push(d),
            }
        }
        let status = if o.diffs.is_empty() {
            exact += 1;
            "MATCH".to_string()
        } else if unexplained.is_empty() {
            documented += 1;
            let bugs = explained
                .iter()
                .filter(|(_, k)| k.kind == Kind::Bug)
                .count();
            format!("KNOWN ({} bug, {} justified)", bugs, explained.len() - bugs)
        } else {
            format!("DIFFERENT ({} undocumented)", unexplained.len())
        };
        eprintln!("  {:<32} {:>5.1}s  {status}", o.name, o.secs);
        for (d, k) in &explained {
            eprintln!(
                "      {:?}: {}: ossb {} | buildah {} ({})",
                k.kind, d.item, d.ossb, d.buildah, k.why
            );
        }
        for d in &unexplained {
            let line = format!(
                "{}: {}: ossb {} | buildah {}",
                o.name, d.item, d.ossb, d.buildah
            );
            eprintln!("      UNDOCUMENTED {line}");
            failures.push_str(&line);
            failures.push('\n');
        }
    }
    if !partial {
        for (i, k) in KNOWN.iter().enumerate() {
            if !used.contains(&i) && k.kind == Kind::Justified {
                // ossb now matching buildah where either is acceptable is no failure (e.g. the
                // hardlink case depends on whether ossb's RUN snapshot goes through overlayfs).
                eprintln!(
                    "  note: {} {}: justified divergence not seen this run",
                    k.case, k.item
                );
            } else if !used.contains(&i) {
                let line = format!(
                    "{}: {}: listed as a known divergence ({:?}) but it no longer occurs: remove it from KNOWN in tests/e2e/conformance.rs",
                    k.case, k.item, k.kind
                );
                eprintln!("  STALE {line}");
                failures.push_str(&line);
                failures.push('\n');
            }
        }
    }
    for (name, why) in NOT_COMPARED {
        eprintln!("  not compared: kaniko/{name}: {why}");
    }
    eprintln!(
        "conformance: {exact} of {} cases match buildah exactly, {documented} differ only in documented ways, {} have undocumented differences",
        outcomes.len(),
        outcomes.len() - exact - documented
    );
    failures
}

/// The two builders and where their outputs go.
struct Tools {
    work: PathBuf,
    registry: String,
    busybox: String,
    debian: String,
    ossb_cache: PathBuf,
    docker_config: String,
    buildah_root: PathBuf,
    buildah_runroot: PathBuf,
}

impl Tools {
    fn new(env: &TestEnv, work: &Path) -> Tools {
        let registry = env.registry();
        Tools {
            work: work.to_path_buf(),
            busybox: format!("{registry}/{}", env.var("OSSB_TEST_BUSYBOX")),
            // scripts/test.sh starts the environment with --debian.
            debian: format!("{registry}/{}", env.var("OSSB_TEST_DEBIAN")),
            registry,
            ossb_cache: work.join("ossb-cache"),
            docker_config: env.var("DOCKER_CONFIG"),
            buildah_root: work.join("buildah-root"),
            buildah_runroot: work.join("buildah-runroot"),
        }
    }

    fn fill(&self, text: &str) -> String {
        text.replace("{busybox}", &self.busybox)
            .replace("{debian}", &self.debian)
            .replace("{registry}", &self.registry)
    }

    fn buildah(&self) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args(["600", "buildah", "--root"])
            .arg(&self.buildah_root)
            .arg("--runroot")
            .arg(&self.buildah_runroot)
            .args(["--storage-driver", "overlay"]);
        cmd
    }

    /// Removes buildah's images so that its overlay storage can be deleted with the temp dir.
    fn cleanup(&self) {
        let _ = self.buildah().args(["rmi", "--all", "--force"]).output();
    }
}

/// Builds one case with both builders and returns the differences.
fn run_case(tools: &Tools, case: &Case) -> Vec<Diff> {
    let dir = tools.work.join(format!("{}-{}", case.suite, case.name));
    std::fs::create_dir_all(&dir).unwrap();
    let ctx = dir.join("ctx");
    let source = workspace().join("tests/conformance").join(case.context);
    let copied = Command::new("cp")
        .arg("-a")
        .arg(&source)
        .arg(&ctx)
        .status()
        .unwrap();
    assert!(copied.success(), "cp -a {}", source.display());
    if !case.setup.is_empty() {
        let out = Command::new("sh")
            .args(["-ec", case.setup])
            .current_dir(&ctx)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: setup failed: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dockerfile = dir.join("Dockerfile");
    let dockerfile_name = if case.dockerfile.is_empty() {
        format!("dockerfiles/Dockerfile_test_{}", case.name)
    } else {
        case.dockerfile.to_string()
    };
    let mut text = std::fs::read_to_string(ctx.join(&dockerfile_name)).unwrap();
    for (from, to) in case.rewrite {
        assert!(
            text.contains(from),
            "{}: the rewrite of {from:?} matches nothing in {dockerfile_name}",
            case.name
        );
        text = text.replace(from, to);
    }
    std::fs::write(&dockerfile, tools.fill(&text)).unwrap();
    let args: Vec<String> = case.args.iter().map(|a| tools.fill(a)).collect();

    let ossb_layout = dir.join("ossb-layout");
    let buildah_layout = dir.join("buildah-layout");
    let ossb_built = build_ossb(tools, case, &ctx, &dockerfile, &args, &ossb_layout);
    let buildah_built = build_buildah(tools, case, &ctx, &dockerfile, &args, &buildah_layout);
    let (ossb_ref, (buildah_ref, buildah_config)) = match (ossb_built, buildah_built) {
        (Ok(o), Ok(b)) => (o, b),
        (o, b) => {
            // Which side failed is part of the item, so that a known difference never
            // excuses the other side failing.
            let item = match (&o, &b) {
                (Err(_), Err(_)) => "build (both fail)",
                (Err(_), Ok(_)) => "build (ossb fails)",
                _ => "build (buildah fails)",
            };
            return vec![Diff {
                item: item.into(),
                ossb: o.map_or_else(|e| format!("failed: {e}"), |_| "built".into()),
                buildah: b.map_or_else(|e| format!("failed: {e}"), |_| "built".into()),
            }];
        }
    };
    let mut diffs = compare_configs(&config_of(&ossb_layout), &buildah_config);
    let ossb_fs = snapshot(&unpack(&ossb_layout, &ossb_ref, &dir.join("ossb-bundle")));
    let buildah_fs = snapshot(&unpack(
        &buildah_layout,
        &buildah_ref,
        &dir.join("buildah-bundle"),
    ));
    diffs.extend(compare_trees(&ossb_fs, &buildah_fs));
    // Keep the disk small: 50 cases of unpacked busybox add up.
    let _ = std::fs::remove_dir_all(&dir);
    diffs
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

/// Builds with ossb into an OCI layout; returns the layout's ref name.
fn build_ossb(
    tools: &Tools,
    case: &Case,
    ctx: &Path,
    dockerfile: &Path,
    args: &[String],
    layout: &Path,
) -> Result<String, String> {
    let mut cmd = Command::new("timeout");
    cmd.arg("600")
        .arg(env!("CARGO_BIN_EXE_ossb"))
        .args(["build", "--progress", "plain", "--insecure-registry"])
        .arg(&tools.registry)
        .arg("-f")
        .arg(dockerfile)
        .args([
            "-t",
            &format!("conformance/{}-{}:latest", case.suite, case.name),
        ])
        .arg("--output")
        .arg(format!("type=oci,dest={},tar=false", layout.display()))
        .env("OSSB_CACHE_DIR", &tools.ossb_cache)
        .env("DOCKER_CONFIG", &tools.docker_config);
    for a in args {
        cmd.args(["--build-arg", a]);
    }
    if let Some(t) = case.target {
        cmd.args(["--target", t]);
    }
    let out = cmd.arg(ctx).output().unwrap();
    if !out.status.success() {
        return Err(tail(&String::from_utf8_lossy(&out.stderr)));
    }
    Ok(ref_name(layout))
}

/// Builds with `buildah bud` and pushes the image into an OCI layout; returns the layout's ref
/// and the image config as buildah stores it (the push to OCI drops the Docker-only fields).
fn build_buildah(
    tools: &Tools,
    case: &Case,
    ctx: &Path,
    dockerfile: &Path,
    args: &[String],
    layout: &Path,
) -> Result<(String, serde_json::Value), String> {
    let image = format!("localhost/conformance/{}-{}:latest", case.suite, case.name);
    let mut cmd = tools.buildah();
    // chroot isolation: crun does not work here and runc needs more set-up (ENVIRONMENT.md).
    // Docker format: buildah's OCI format drops SHELL, HEALTHCHECK and ONBUILD (it warns), and
    // ignores SHELL for RUN too.
    cmd.args([
        "bud",
        "--isolation",
        "chroot",
        "--tls-verify=false",
        "--layers",
        "--format",
        "docker",
        "-t",
        &image,
        "-f",
    ])
    .arg(dockerfile);
    for a in args {
        cmd.args(["--build-arg", a]);
    }
    if let Some(t) = case.target {
        cmd.args(["--target", t]);
    }
    let out = cmd.arg(ctx).output().unwrap();
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        return Err(tail(&text));
    }
    let out = tools
        .buildah()
        .args(["push", &image])
        .arg(format!("oci:{}:{}", layout.display(), case.name))
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "buildah push: {}",
            tail(&String::from_utf8_lossy(&out.stderr))
        ));
    }
    let out = tools
        .buildah()
        .args(["inspect", "--type", "image", &image])
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(format!(
            "buildah inspect: {}",
            tail(&String::from_utf8_lossy(&out.stderr))
        ));
    }
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut config = inspect["Docker"]["config"].clone();
    config["Author"] = inspect["Docker"]["author"].clone();
    Ok((case.name.to_string(), config))
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn blob(layout: &Path, digest: &serde_json::Value) -> PathBuf {
    let digest = digest.as_str().expect("a digest");
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").expect("a sha256 digest"))
}

fn ref_name(layout: &Path) -> String {
    let index = read_json(&layout.join("index.json"));
    index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: index.json names no ref: {index}", layout.display()))
        .to_string()
}

/// The image config (`config` object, with the top-level `author` as `Author`) of the
/// layout's one image.
fn config_of(layout: &Path) -> serde_json::Value {
    let index = read_json(&layout.join("index.json"));
    let manifest = read_json(&blob(layout, &index["manifests"][0]["digest"]));
    let config = read_json(&blob(layout, &manifest["config"]["digest"]));
    let mut c = config["config"].clone();
    if c.is_null() {
        c = serde_json::json!({});
    }
    c["Author"] = config["author"].clone();
    c
}

/// Normalizes what means the same: an absent field, null, an empty map, list or string;
/// buildah's own `io.buildah.version` label (it stamps every image with it; BuildKit adds
/// nothing).
fn normalized(config: &serde_json::Value, field: &str) -> serde_json::Value {
    let mut v = config
        .get(field)
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    if field == "Labels" {
        if let Some(m) = v.as_object_mut() {
            m.remove("io.buildah.version");
        }
    }
    match &v {
        serde_json::Value::Object(m) if m.is_empty() => serde_json::Value::Null,
        serde_json::Value::Array(a) if a.is_empty() => serde_json::Value::Null,
        serde_json::Value::String(s) if s.is_empty() => serde_json::Value::Null,
        _ => v,
    }
}

fn compare_configs(ossb: &serde_json::Value, buildah: &serde_json::Value) -> Vec<Diff> {
    CONFIG_FIELDS
        .iter()
        .filter_map(|f| {
            let (o, b) = (normalized(ossb, f), normalized(buildah, f));
            if o == b {
                return None;
            }
            // The same variables in another order is its own, lesser difference.
            let sorted = |v: &serde_json::Value| {
                let mut items: Vec<String> = v
                    .as_array()
                    .map(|a| a.iter().map(|x| x.to_string()).collect())
                    .unwrap_or_default();
                items.sort();
                items
            };
            let item = if *f == "Env" && sorted(&o) == sorted(&b) {
                "config Env order".to_string()
            } else {
                format!("config {f}")
            };
            Some(Diff {
                item,
                ossb: o.to_string(),
                buildah: b.to_string(),
            })
        })
        .collect()
}

fn unpack(layout: &Path, reference: &str, bundle: &Path) -> PathBuf {
    let image = format!("{}:{reference}", layout.display());
    // `raw unpack`: only the rootfs (plain `unpack` also makes a runtime config, which fails
    // for a USER that the image's /etc/passwd lacks).
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(bundle).unwrap();
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--image", &image])
        .arg(&rootfs)
        .output()
        .expect("running umoci (installed by scripts/testenv.sh)");
    assert!(
        out.status.success(),
        "umoci unpack {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    rootfs
}

/// What the test compares of one filesystem entry.
#[derive(Clone, Debug, Default)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: Option<u64>,
    /// A hash of the content (files), and the content itself when short text.
    content: Option<(u64, String)>,
    target: Option<String>,
    rdev: Option<u64>,
    xattrs: BTreeMap<String, String>,
    /// All paths of the file's hardlink group (nlink > 1), joined.
    hardlinks: Option<String>,
}

/// Walks an unpacked rootfs: every entry by its absolute path inside the image.
fn snapshot(root: &Path) -> BTreeMap<String, Entry> {
    let mut entries = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    walk_into(root, root, &mut entries, &mut inodes);
    for paths in inodes.values().filter(|p| p.len() > 1) {
        let group = paths.join(",");
        for p in paths {
            entries.get_mut(p).unwrap().hardlinks = Some(group.clone());
        }
    }
    for (path, xattrs) in xattrs_of(root) {
        if let Some(e) = entries.get_mut(&path) {
            e.xattrs = xattrs;
        }
    }
    entries
}

fn walk_into(
    root: &Path,
    dir: &Path,
    entries: &mut BTreeMap<String, Entry>,
    inodes: &mut BTreeMap<u64, Vec<String>>,
) {
    let mut children: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    children.sort();
    for path in children {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let name = format!("/{}", path.strip_prefix(root).unwrap().display());
        let ft = meta.file_type();
        let mut e = Entry {
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            ..Entry::default()
        };
        if ft.is_dir() {
            e.kind = "dir";
        } else if ft.is_symlink() {
            e.kind = "symlink";
            e.target = Some(std::fs::read_link(&path).unwrap().display().to_string());
        } else if ft.is_file() {
            e.kind = "file";
            e.size = Some(meta.len());
            let bytes = std::fs::read(&path).unwrap();
            let text = match std::str::from_utf8(&bytes) {
                Ok(t) if bytes.len() <= 400 => format!("{t:?}"),
                _ => String::new(),
            };
            e.content = Some((hash(&bytes), text));
            if meta.nlink() > 1 {
                inodes.entry(meta.ino()).or_default().push(name.clone());
            }
        } else {
            e.kind = if ft.is_char_device() {
                "char"
            } else if ft.is_block_device() {
                "block"
            } else if ft.is_fifo() {
                "fifo"
            } else {
                "socket"
            };
            e.rdev = Some(meta.rdev());
        }
        entries.insert(name, e);
        if ft.is_dir() {
            walk_into(root, &path, entries, inodes);
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same bytes give the same value within this process.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Every xattr under `root` (not following symlinks), by path inside the image, from one
/// `getfattr -R` (std has no xattr calls and this package may not depend on libc).
fn xattrs_of(root: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let out = Command::new("getfattr")
        .args(["-R", "-h", "-d", "-m", "-", "-e", "hex", "--absolute-names"])
        .arg(root)
        .output()
        .expect("running getfattr (package attr, installed by scripts/testenv.sh)");
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = root.display().to_string();
    let mut all = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if let Some(file) = line.strip_prefix("# file: ") {
            let path = file.strip_prefix(&prefix).unwrap_or(file);
            current = Some(if path.is_empty() {
                "/".into()
            } else {
                path.into()
            });
        } else if let (Some(path), Some((k, v))) = (&current, line.split_once('=')) {
            all.entry(path.clone())
                .or_insert_with(BTreeMap::new)
                .insert(k.to_string(), v.to_string());
        }
    }
    all
}

/// What buildah leaves behind after a RUN with chroot isolation and BuildKit does not: empty
/// mount points for the files it bind-mounts (/etc/hosts, /etc/hostname, /etc/resolv.conf) and
/// /run. They are dropped when ossb's image lacks them and buildah's are empty.
fn buildah_run_artifact(path: &str, e: &Entry) -> bool {
    match path {
        "/etc/hosts" | "/etc/hostname" | "/etc/resolv.conf" => {
            e.kind == "file" && e.size == Some(0)
        }
        "/run" => e.kind == "dir",
        _ => false,
    }
}

fn compare_trees(ossb: &BTreeMap<String, Entry>, buildah: &BTreeMap<String, Entry>) -> Vec<Diff> {
    let mut diffs = Vec::new();
    let paths: BTreeSet<&String> = ossb.keys().chain(buildah.keys()).collect();
    let show = |e: &Entry| format!("{} {:04o} {}:{}", e.kind, e.mode, e.uid, e.gid);
    for path in paths {
        match (ossb.get(path), buildah.get(path)) {
            (Some(o), None) => diffs.push(Diff {
                item: format!("{path} presence"),
                ossb: show(o),
                buildah: "absent".into(),
            }),
            (None, Some(b)) => {
                if !buildah_run_artifact(path, b) {
                    diffs.push(Diff {
                        item: format!("{path} presence"),
                        ossb: "absent".into(),
                        buildah: show(b),
                    });
                }
            }
            (Some(o), Some(b)) => diffs.extend(compare_entries(path, o, b)),
            (None, None) => unreachable!(),
        }
    }
    diffs
}

fn compare_entries(path: &str, o: &Entry, b: &Entry) -> Vec<Diff> {
    let mut diffs = Vec::new();
    let mut field = |name: &str, ov: String, bv: String| {
        if ov != bv {
            diffs.push(Diff {
                item: format!("{path} {name}"),
                ossb: ov,
                buildah: bv,
            });
        }
    };
    field("type", o.kind.into(), b.kind.into());
    if o.kind != b.kind {
        return diffs;
    }
    field("mode", format!("{:04o}", o.mode), format!("{:04o}", b.mode));
    field("uid", o.uid.to_string(), b.uid.to_string());
    field("gid", o.gid.to_string(), b.gid.to_string());
    field("size", format!("{:?}", o.size), format!("{:?}", b.size));
    let content = |e: &Entry| match &e.content {
        Some((h, text)) if text.is_empty() => format!("{h:016x}"),
        Some((_, text)) => text.clone(),
        None => "-".into(),
    };
    if o.content.as_ref().map(|c| c.0) != b.content.as_ref().map(|c| c.0) {
        field("content", content(o), content(b));
    }
    field(
        "target",
        format!("{:?}", o.target),
        format!("{:?}", b.target),
    );
    field("rdev", format!("{:?}", o.rdev), format!("{:?}", b.rdev));
    field(
        "xattrs",
        format!("{:?}", o.xattrs),
        format!("{:?}", b.xattrs),
    );
    field(
        "hardlinks",
        format!("{:?}", o.hardlinks),
        format!("{:?}", b.hardlinks),
    );
    diffs
}
