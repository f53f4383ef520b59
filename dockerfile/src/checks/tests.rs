//! Each rule, reported and not, mostly on the cases of BuildKit's own lint tests
//! (`frontend/dockerfile/dockerfile_lint_test.go`), with its messages and lines.

use super::*;
use std::collections::HashMap;

fn opts() -> CheckOptions {
    CheckOptions {
        target_platform: "linux/amd64".parse().unwrap(),
        build_platform: "linux/amd64".parse().unwrap(),
        all_stages: true,
        ..CheckOptions::default()
    }
}

fn report_with(src: &str, o: &CheckOptions) -> Report {
    let df = crate::parse(src, "Dockerfile").unwrap();
    check(&df, o).unwrap()
}

/// `Rule: message (line N)` of every warning.
fn lint_with(src: &str, o: &CheckOptions) -> Vec<String> {
    report_with(src, o)
        .warnings
        .iter()
        .map(Warning::short)
        .collect()
}

fn lint(src: &str) -> Vec<String> {
    lint_with(src, &opts())
}

/// Only the warnings of `rule`.
fn only(rule: &str, src: &str) -> Vec<String> {
    lint(src)
        .into_iter()
        .filter(|w| w.starts_with(&format!("{rule}:")))
        .collect()
}

#[test]
fn stage_name_casing() {
    assert_eq!(
        lint("\n# warning: stage name should be lowercase\n#\nFROM scratch AS BadStageName\n\n# warning: 'as' should match 'FROM' cmd casing.\n#\nFROM scratch as base2\n\nFROM scratch AS base3\n"),
        [
            "StageNameCasing: Stage name 'BadStageName' should be lowercase (line 4)",
            "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 8)",
        ]
    );
    assert!(lint("FROM scratch AS lower-case.name_1\n").is_empty());
}

#[test]
fn from_as_casing() {
    assert_eq!(
        lint("\n#\nfrom scratch AS base\n\nfrom scratch as base2\n"),
        ["FromAsCasing: 'AS' and 'from' keywords' casing do not match (line 3)"]
    );
    // A mixed-case FROM is ConsistentInstructionCasing's, not this rule's.
    assert!(only("FromAsCasing", "From scratch as base\nFROM scratch AS b2\n").is_empty());
    assert!(
        lint("FROM scratch AS a\nfrom scratch as b\nFROM a\nCOPY --from=b / /\n")
            .iter()
            .all(|w| !w.starts_with("FromAsCasing"))
    );
}

#[test]
fn no_empty_continuation() {
    assert_eq!(
        lint("\nFROM scratch\n# warning: empty continuation line\nCOPY Dockerfile \\\n\n.\nCOPY Dockerfile \\\n.\n"),
        ["NoEmptyContinuation: Empty continuation line (line 6)"]
    );
    // A comment is not an empty line.
    assert!(lint("FROM scratch\nEXPOSE \\\n# Port\n80\n").is_empty());
}

#[test]
fn consistent_instruction_casing() {
    let rule = "ConsistentInstructionCasing";
    assert_eq!(
        only(rule, "\n#\nFrom scratch as base\nFROM scratch AS base2\n"),
        ["ConsistentInstructionCasing: Command 'From' should match the case of the command majority (uppercase) (line 3)"]
    );
    assert_eq!(
        only(rule, "FROM scratch\ncopy Dockerfile /foo\nCOPY Dockerfile /bar\n"),
        ["ConsistentInstructionCasing: Command 'copy' should match the case of the command majority (uppercase) (line 2)"]
    );
    assert_eq!(
        only(rule, "frOM scratch as base\nfrom scratch as base2\n"),
        ["ConsistentInstructionCasing: Command 'frOM' should match the case of the command majority (lowercase) (line 1)"]
    );
    assert_eq!(
        only(rule, "from scratch\nCOPY Dockerfile /foo\ncopy Dockerfile /bar\n"),
        ["ConsistentInstructionCasing: Command 'COPY' should match the case of the command majority (lowercase) (line 2)"]
    );
    assert_eq!(
        only(rule, "from scratch\nCOPY a /foo\nCOPY b /bar\nCOPY c /baz\n"),
        ["ConsistentInstructionCasing: Command 'from' should match the case of the command majority (uppercase) (line 1)"]
    );
    assert!(lint("from scratch\ncopy Dockerfile /foo\ncopy Dockerfile /bar\n").is_empty());
    assert!(lint("FROM scratch\nCOPY Dockerfile /foo\n").is_empty());
    // ARGs before the first FROM are not counted.
    assert!(only(rule, "arg a=1\narg b=2\nFROM scratch\nCOPY x /\n").is_empty());
    assert!(lint("FROM alpine\nRUN <<'EOT'\nenv\nEOT\n").is_empty());
}

#[test]
fn duplicate_stage_name() {
    assert_eq!(
        lint("\nFROM scratch AS b\nFROM scratch AS b\n"),
        ["DuplicateStageName: Duplicate stage name \"b\", stage names should be unique (line 3)"]
    );
    assert!(lint("FROM scratch AS b1\nFROM scratch AS b2\n").is_empty());
    // Stage names are compared as BuildKit keeps them, lower-cased.
    assert_eq!(
        only(
            "DuplicateStageName",
            "FROM scratch AS b\nFROM scratch AS B\n"
        )
        .len(),
        1
    );
}

#[test]
fn reserved_stage_name() {
    assert_eq!(
        lint("\nFROM scratch AS scratch\nFROM scratch AS context\n"),
        [
            "ReservedStageName: Stage name should not use the same name as reserved stage \"scratch\" (line 2)",
            "ReservedStageName: Stage name should not use the same name as reserved stage \"context\" (line 3)",
        ]
    );
    assert!(lint("FROM scratch\nFROM scratch AS a\n").is_empty());
}

#[test]
fn json_args_recommended() {
    assert_eq!(
        lint("FROM scratch\nCMD mycommand\n"),
        ["JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 2)"]
    );
    assert_eq!(
        lint("FROM scratch\nENTRYPOINT mycommand\n"),
        ["JSONArgsRecommended: JSON arguments recommended for ENTRYPOINT to prevent unintended behavior related to OS signals (line 2)"]
    );
    assert!(lint("FROM scratch\nCMD [\"mycommand\"]\nENTRYPOINT [\"a\", \"b\"]\n").is_empty());
    // A SHELL says the shell form is meant, also when the stage's base set it.
    assert!(lint("FROM scratch\nSHELL [\"/usr/bin/customshell\"]\nCMD mycommand\n").is_empty());
    assert!(lint("FROM scratch AS base\nSHELL [\"/usr/bin/customshell\"]\n\nFROM base\nENTRYPOINT mycommand\n").is_empty());
    // Or the base image's config.
    let mut o = opts();
    o.bases.insert(
        "shelly".into(),
        BaseImage {
            info: crate::BaseImageInfo {
                shell: vec!["pwsh".into(), "-c".into()],
                ..Default::default()
            },
            platform: None,
        },
    );
    assert!(lint_with("FROM shelly\nCMD Get-Date\n", &o).is_empty());
    // RUN's shell form is not this rule's business.
    assert!(lint("FROM scratch\nRUN make\n").is_empty());
}

#[test]
fn maintainer_deprecated() {
    assert_eq!(
        lint("\nFROM scratch\nMAINTAINER me@example.org\n"),
        ["MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label (line 3)"]
    );
    assert!(
        lint("FROM scratch\nLABEL org.opencontainers.image.authors=\"me@example.org\"\n")
            .is_empty()
    );
}

#[test]
fn warnings_before_an_error_are_kept() {
    let r = report_with(
        "\nFROM scratch AS BadStageName\nMAINTAINER me@example.org\nBADCMD\n",
        &opts(),
    );
    let short: Vec<String> = r.warnings.iter().map(Warning::short).collect();
    assert_eq!(
        short,
        [
            "StageNameCasing: Stage name 'BadStageName' should be lowercase (line 2)",
            "MaintainerDeprecated: Maintainer instruction is deprecated in favor of using label (line 3)",
        ]
    );
    let e = r.error.unwrap();
    assert_eq!(
        (e.line, e.message.as_str()),
        (4, "unknown instruction: BADCMD")
    );
}

#[test]
fn undefined_arg_in_from() {
    for ok in [
        "ARG base=scratch\nFROM $base\nCOPY Dockerfile .\n",
        "ARG BUILDPLATFORM=linux/amd64\nFROM --platform=$BUILDPLATFORM scratch\n",
        "FROM --platform=$BUILDPLATFORM scratch\n",
        "ARG DEBUG\nFROM scratch${DEBUG}\n",
        "ARG DEBUG\nFROM scra${DEBUG:-tch}\n",
        "ARG DEBUG=\"\"\nFROM scratch${DEBUG-@bogus}\n",
        "FROM busybox:${TARGETARCH}-${TARGETSTAGE}\n",
    ] {
        assert!(only("UndefinedArgInFrom", ok).is_empty(), "{ok}");
    }
    let r = report_with(
        "\nFROM --platform=$BULIDPLATFORM scratch\nCOPY Dockerfile .\n",
        &opts(),
    );
    assert_eq!(
        r.warnings.iter().map(Warning::short).collect::<Vec<_>>(),
        ["UndefinedArgInFrom: FROM argument 'BULIDPLATFORM' is not declared (did you mean BUILDPLATFORM?) (line 2)"]
    );
    assert!(r
        .error
        .unwrap()
        .message
        .starts_with("empty platform value from expression $BULIDPLATFORM"));
    assert_eq!(
        only("UndefinedArgInFrom", "ARG MY_OS=linux\nARG MY_ARCH=amd64\nFROM --platform=linux/${MYARCH} busybox\n"),
        ["UndefinedArgInFrom: FROM argument 'MYARCH' is not declared (did you mean MY_ARCH?) (line 3)"]
    );
    assert_eq!(
        lint("\nARG tag=latest\nFROM busybox:${tag}${version} AS b\nCOPY Dockerfile .\n"),
        ["UndefinedArgInFrom: FROM argument 'version' is not declared (line 3)"]
    );
}

#[test]
fn workdir_relative_path() {
    assert_eq!(
        lint("\nFROM scratch\nWORKDIR app/\n"),
        ["WorkdirRelativePath: Relative workdir \"app/\" can have unexpected results if the base image changes (line 3)"]
    );
    // Once an absolute WORKDIR ran, in the stage or a stage it is built on, relative ones are fine.
    assert!(lint("\nFROM scratch AS a\nWORKDIR /app\n\nFROM a AS b\nWORKDIR subdir/\n").is_empty());
    assert!(lint("FROM scratch\nWORKDIR /app\nWORKDIR src\n").is_empty());
    // The expanded path counts.
    assert!(lint("FROM scratch\nENV D=/srv\nWORKDIR $D/app\n").is_empty());
}

#[test]
fn undefined_var() {
    assert!(lint("\nFROM scratch\nARG foo\nCOPY Dockerfile${foo} .\n").is_empty());
    assert!(lint("FROM alpine AS base\nARG foo=Dockerfile\n\nFROM base\nCOPY $foo .\n").is_empty());
    assert!(lint("FROM alpine\nRUN echo $PATH\n").is_empty());
    assert_eq!(
        lint("\nFROM scratch\nCOPY $foo .\nARG foo=bar\nRUN echo $foo\n"),
        ["UndefinedVar: Usage of undefined variable '$foo' (line 3)"]
    );
    assert_eq!(
        lint("\nFROM scratch\nARG DIR_BINARIES=binaries/\nARG DIR_ASSETS=assets/\nARG DIR_CONFIG=config/\nCOPY $DIR_ASSET .\n"),
        ["UndefinedVar: Usage of undefined variable '$DIR_ASSET' (did you mean $DIR_ASSETS?) (line 6)"]
    );
    assert_eq!(
        lint("\nFROM scratch\nENV PATH=$PAHT:/tmp/bin\n"),
        ["UndefinedVar: Usage of undefined variable '$PAHT' (did you mean $PATH?) (line 3)"]
    );
    assert_eq!(
        lint("FROM scratch AS base\nARG VERSION=$foo\n"),
        ["UndefinedVar: Usage of undefined variable '$foo' (line 2)"]
    );
    // Global ARGs are not in a stage's scope unless it declares them again.
    assert_eq!(
        lint("ARG V=1\nFROM scratch\nCOPY a$V /\n"),
        ["UndefinedVar: Usage of undefined variable '$V' (line 3)"]
    );
    assert!(lint("ARG V=1\nFROM scratch\nARG V\nCOPY a$V /\n").is_empty());
    // ENV's words see the scope before the instruction; later instructions see the new one.
    assert_eq!(
        lint("FROM scratch\nENV A=1 B=$A\nENV C=$A\n"),
        ["UndefinedVar: Usage of undefined variable '$A' (line 2)"]
    );
    // Where BuildKit expands: USER, VOLUME, STOPSIGNAL, WORKDIR, LABEL, ADD/COPY flags and
    // heredocs, RUN --mount; not RUN, CMD, ENTRYPOINT, HEALTHCHECK, or a quoted heredoc.
    let every = "FROM scratch\nUSER $u\nVOLUME $v\nSTOPSIGNAL $s\nLABEL l=$l\nCOPY --chown=$c a /\nRUN --mount=type=cache,target=$t true\nCOPY <<EOF /x\n$h\nEOF\n";
    assert_eq!(only("UndefinedVar", every).len(), 7, "{:?}", lint(every));
    assert!(lint("FROM scratch\nRUN echo $x\nCMD [\"$y\"]\nHEALTHCHECK CMD [\"$z\"]\nCOPY <<'EOF' /x\n$h\nEOF\n")
        .iter()
        .all(|w| !w.starts_with("UndefinedVar")));
    // Build args give the value of a declared ARG; the default is then not expanded.
    let mut o = opts();
    o.build_args.insert("V".into(), "1".into());
    assert!(lint_with("FROM scratch\nARG V=$nope\nCOPY a$V /\n", &o).is_empty());
}

#[test]
fn undefined_var_uses_the_base_image_environment() {
    let mut o = opts();
    o.bases.insert(
        "python".into(),
        BaseImage {
            info: crate::BaseImageInfo {
                env: vec![("PYTHON_VERSION".into(), "3.13".into())],
                ..Default::default()
            },
            platform: None,
        },
    );
    assert!(lint_with("FROM python AS base\nARG VERSION=$PYTHON_VERSION\n", &o).is_empty());
    assert_eq!(
        lint_with("FROM python\nENV X=$PYTHON_VERSON\n", &o),
        ["UndefinedVar: Usage of undefined variable '$PYTHON_VERSON' (did you mean $PYTHON_VERSION?) (line 2)"]
    );
    // A base whose config is unknown may define anything: nothing is said.
    assert!(lint("FROM python AS base\nARG VERSION=$PYTHON_VERSION\n").is_empty());
    assert!(lint("FROM python AS base\nFROM base\nENV X=$Y\n").is_empty());
}

#[test]
fn multiple_instructions_disallowed() {
    let w = |i: &str, l: usize| {
        format!("MultipleInstructionsDisallowed: Multiple {i} instructions should not be used in the same stage because only the last one will be used (line {l})")
    };
    assert_eq!(
        lint("\nFROM scratch\nENTRYPOINT [\"/myapp\"]\nENTRYPOINT [\"/myotherapp\"]\nCMD [\"/myapp\"]\nCMD [\"/myotherapp\"]\nHEALTHCHECK CMD [\"/myapp\"]\nHEALTHCHECK CMD [\"/myotherapp\"]\n"),
        [w("ENTRYPOINT", 3), w("CMD", 5), w("HEALTHCHECK", 7)]
    );
    assert_eq!(
        lint("\nFROM scratch\nENTRYPOINT [\"/myapp\"]\nCMD [\"/myapp\"]\nHEALTHCHECK CMD [\"/myapp\"]\nCOPY <<EOF /a.txt\nHello, World!\nEOF\nENTRYPOINT [\"/myotherapp\"]\nCMD [\"/myotherapp\"]\nHEALTHCHECK CMD [\"/myotherapp\"]\n"),
        [w("ENTRYPOINT", 3), w("CMD", 4), w("HEALTHCHECK", 5)]
    );
    assert!(lint("\nFROM scratch AS a\nENTRYPOINT [\"/myapp\"]\nCMD [\"/myapp\"]\nHEALTHCHECK CMD [\"/myapp\"]\n\nFROM a AS b\nENTRYPOINT [\"/myotherapp\"]\nCMD [\"/myotherapp\"]\nHEALTHCHECK CMD [\"/myotherapp\"]\n").is_empty());
}

#[test]
fn legacy_key_value_format() {
    assert_eq!(
        lint("\nFROM scratch\nENV testkey value\nLABEL key value\n"),
        [
            "LegacyKeyValueFormat: \"ENV key=value\" should be used instead of legacy \"ENV key value\" format (line 3)",
            "LegacyKeyValueFormat: \"LABEL key=value\" should be used instead of legacy \"LABEL key value\" format (line 4)",
        ]
    );
    assert!(lint("FROM scratch\nENV testkey=value\nLABEL key=value\n").is_empty());
    // Only in stages that are checked: a build of `c` does not look at `b`; --check does.
    let src =
        "\nFROM scratch AS a\n\nFROM a AS b\nENV testkey value\nLABEL key value\n\nFROM a AS c\n";
    let mut o = opts();
    o.all_stages = false;
    assert!(lint_with(src, &o).is_empty());
    assert_eq!(lint(src).len(), 2);
}

#[test]
fn invalid_base_image_platform() {
    let mut o = opts();
    o.all_stages = false;
    o.bases.insert(
        "busybox:arm".into(),
        BaseImage {
            info: Default::default(),
            platform: Some("linux/arm64".parse().unwrap()),
        },
    );
    o.bases.insert(
        "busybox:amd".into(),
        BaseImage {
            info: Default::default(),
            platform: Some("linux/amd64".parse().unwrap()),
        },
    );
    assert_eq!(
        lint_with("FROM busybox:arm\n", &o),
        ["InvalidBaseImagePlatform: Base image busybox:arm was pulled with platform \"linux/arm64\", expected \"linux/amd64\" for current build (line 1)"]
    );
    assert!(lint_with("FROM busybox:amd\n", &o).is_empty());
    // Only for stages the build uses.
    assert!(lint_with("FROM busybox:arm AS unused\nFROM busybox:amd\n", &o).is_empty());
}

#[test]
fn redundant_target_platform() {
    assert_eq!(
        lint("\nFROM --platform=$TARGETPLATFORM scratch\n"),
        ["RedundantTargetPlatform: Setting platform to predefined $TARGETPLATFORM in FROM is redundant as this is the default behavior (line 2)"]
    );
    assert_eq!(
        lint("FROM --platform=${TARGETPLATFORM} scratch\n"),
        ["RedundantTargetPlatform: Setting platform to predefined ${TARGETPLATFORM} in FROM is redundant as this is the default behavior (line 1)"]
    );
    assert!(lint("FROM --platform=$BUILDPLATFORM scratch\n").is_empty());
    assert!(lint("FROM --platform=${TARGETOS}/${TARGETARCH} scratch\n").is_empty());
}

#[test]
fn secrets_used_in_arg_or_env() {
    let w = |i: &str, k: &str, l: usize| {
        format!("SecretsUsedInArgOrEnv: Do not use ARG or ENV instructions for sensitive data ({i} \"{k}\") (line {l})")
    };
    assert_eq!(
        lint("\nFROM scratch\nARG SECRET_PASSPHRASE\nENV SUPER_Secret=foo\nENV password=bar secret=baz\nARG super_duper_secret_token=foo auth=bar\nENV apikey=bar sunflower=foo\nENV git_key=\nENV PUBLIC_KEY=\nARG public_token\n"),
        [
            w("ARG", "SECRET_PASSPHRASE", 3),
            w("ENV", "SUPER_Secret", 4),
            w("ENV", "password", 5),
            w("ENV", "secret", 5),
            w("ARG", "super_duper_secret_token", 6),
            w("ARG", "auth", 6),
            w("ENV", "apikey", 7),
            w("ENV", "git_key", 8),
        ]
    );
    // Global ARGs are not checked (BuildKit checks a stage's ARGs only).
    assert!(lint("ARG GITHUB_TOKEN\nFROM scratch\n").is_empty());
}

#[test]
fn invalid_default_arg_in_from() {
    let mut o = opts();
    o.build_args.insert("VERSION".into(), "latest".into());
    assert_eq!(
        lint_with("\nARG VERSION\nFROM busybox:$VERSION\n", &o),
        ["InvalidDefaultArgInFrom: Default value for ARG busybox:$VERSION results in empty or invalid base image name (line 3)"]
    );
    assert_eq!(
        lint("ARG IMAGE\nFROM $IMAGE\n")
            .into_iter()
            .filter(|w| w.starts_with("InvalidDefaultArgInFrom"))
            .collect::<Vec<_>>(),
        ["InvalidDefaultArgInFrom: Default value for ARG $IMAGE results in empty or invalid base image name (line 2)"]
    );
    assert_eq!(
        only("InvalidDefaultArgInFrom", "ARG SFX=\"box:\"\nFROM busy${SFX}\n"),
        ["InvalidDefaultArgInFrom: Default value for ARG busy${SFX} results in empty or invalid base image name (line 2)"]
    );
    assert!(lint("ARG VERSION=\"latest\"\nFROM busybox:${VERSION}\n").is_empty());
    assert!(lint("ARG BUSYBOX_VARIANT=\"\"\nFROM busybox:stable${BUSYBOX_VARIANT}\n").is_empty());
    assert!(lint("ARG BUSYBOX_VARIANT\nFROM busybox:stable${BUSYBOX_VARIANT}\n").is_empty());
    assert!(lint("ARG TAG\nFROM alpine:${TAG:-3.14}\n").is_empty());
}

#[test]
fn from_platform_flag_const_disallowed() {
    assert_eq!(
        lint("\nFROM --platform=linux/amd64 scratch\n"),
        ["FromPlatformFlagConstDisallowed: FROM --platform flag should not use constant value \"linux/amd64\" (line 2)"]
    );
    assert!(lint("FROM --platform=linux/amd64 scratch AS my_amd64_stage\n").is_empty());
    assert!(lint("FROM --platform=linux/amd64 scratch AS linux\n").is_empty());
    assert!(lint("FROM --platform=$BUILDPLATFORM scratch\n").is_empty());
}

#[test]
fn copy_ignored_file() {
    let mut o = opts();
    o.dockerignore = Some(Dockerignore::parse("\nDockerfile\n*/tmp/*\n").unwrap());
    assert_eq!(
        lint_with("\nFROM scratch\nCOPY Dockerfile .\nADD Dockerfile /windy\nCOPY ./tmp/helloworld.txt /x\nCOPY a/tmp/b /y\n", &o),
        [
            "CopyIgnoredFile: Attempting to Copy file \"Dockerfile\" that is excluded by .dockerignore (line 3)",
            "CopyIgnoredFile: Attempting to Add file \"Dockerfile\" that is excluded by .dockerignore (line 4)",
            "CopyIgnoredFile: Attempting to Copy file \"a/tmp/b\" that is excluded by .dockerignore (line 6)",
        ]
    );
    // COPY --from reads a stage, ADD a URL: not the context.
    o.dockerignore = Some(Dockerignore::parse("foobar\n").unwrap());
    assert!(lint_with("FROM scratch AS base\nCOPY Dockerfile /foobar\n\nFROM base\nCOPY --from=base /foobar /Dockerfile\nADD https://example.com/foobar /\n", &o).is_empty());
    // With an exception anywhere, BuildKit does not judge.
    o.dockerignore = Some(Dockerignore::parse("Dockerfile\n!keep\n").unwrap());
    assert!(lint_with("FROM scratch\nCOPY Dockerfile .\n", &o).is_empty());
    // The context root only when everything is ignored.
    o.dockerignore = Some(Dockerignore::parse("*\n").unwrap());
    assert_eq!(
        lint_with("FROM scratch\nCOPY . /app\n", &o),
        ["CopyIgnoredFile: Attempting to Copy file \".\" that is excluded by .dockerignore (line 2)"]
    );
    o.dockerignore = Some(Dockerignore::parse("node_modules\n").unwrap());
    assert!(lint_with("FROM scratch\nCOPY . /app\n", &o).is_empty());
}

#[test]
fn invalid_definition_description_is_experimental() {
    let bad = "# bar this is the bar\nARG foo=bar\n# BasE this is the BasE image\nFROM scratch AS base\n# definitely a bad comment\nARG version=latest\n# definitely a bad comment\nARG foo=baz bar=qux baz=quux\n";
    assert!(lint(bad).is_empty());
    let on = format!("# check=experimental=InvalidDefinitionDescription\n{bad}");
    assert_eq!(
        lint(&on),
        [
            "InvalidDefinitionDescription: Comment for ARG should follow the format: `# foo <description>` (line 3)",
            "InvalidDefinitionDescription: Comment for FROM should follow the format: `# base <description>` (line 5)",
            "InvalidDefinitionDescription: Comment for ARG should follow the format: `# version <description>` (line 7)",
            "InvalidDefinitionDescription: Comment for ARG should follow the format: `# <arg_key> <description>` (line 9)",
        ]
    );
    let good = "# check=experimental=InvalidDefinitionDescription\n# foo this is the foo\nARG foo=bar\n\n# base this is the base image\nFROM scratch AS base\n\n# version this is the version number\nARG version=latest\n\n# baz this is the baz\nARG foo=baz bar=qux baz=quux\n#\nARG bit=bat\n\n# comment for something other than ARG or FROM\nCOPY Dockerfile .\n";
    assert!(lint(good).is_empty(), "{:?}", lint(good));
}

#[test]
fn expose_proto_casing_and_invalid_format() {
    assert_eq!(
        lint("FROM scratch\nEXPOSE 80/TcP 8080/udp\n"),
        ["ExposeProtoCasing: Defined protocol '80/TcP' in EXPOSE instruction should be lowercase (line 2)"]
    );
    assert_eq!(
        lint("FROM scratch\nEXPOSE 127.0.0.1:80:80\nEXPOSE 80:80\nEXPOSE 80\n"),
        [
            "ExposeInvalidFormat: EXPOSE instruction should not define an IP address or host-port mapping, found '127.0.0.1:80:80' (line 2)",
            "ExposeInvalidFormat: EXPOSE instruction should not define an IP address or host-port mapping, found '80:80' (line 3)",
        ]
    );
    // Ports from variables are checked once expanded.
    assert_eq!(
        only(
            "ExposeProtoCasing",
            "FROM scratch\nENV P=\"53/UDP 80\"\nEXPOSE $P\n"
        )
        .len(),
        1
    );
}

#[test]
fn check_directive_skip_error_and_the_build_arg() {
    let src = "FROM scratch as base\ncopy Dockerfile .\n";
    assert_eq!(lint(src).len(), 2);
    assert!(lint(&format!("#check=skip=all\n{src}")).is_empty());
    assert!(lint(&format!("#check=skip=all;error=true\n{src}")).is_empty());
    assert!(lint(&format!(
        "#check=skip=ConsistentInstructionCasing,FromAsCasing\n{src}"
    ))
    .is_empty());
    let r = report_with(
        &format!("#check=skip=ConsistentInstructionCasing;error=true\n{src}"),
        &opts(),
    );
    assert_eq!(r.warnings.len(), 1);
    assert_eq!(
        r.violation().as_deref(),
        Some("lint violation found for rules: FromAsCasing")
    );
    // Without error=true, warnings do not fail anything.
    assert_eq!(report_with(src, &opts()).violation(), None);
    // The build argument replaces the directive.
    let mut o = opts();
    o.build_args.insert(
        CHECK_BUILD_ARG.into(),
        "skip=ConsistentInstructionCasing;error=true".into(),
    );
    let r = report_with(&format!("#check=skip=all\n{src}"), &o);
    assert_eq!(r.warnings.len(), 1);
    assert!(r.violation().is_some());
    o.build_args
        .insert(CHECK_BUILD_ARG.into(), "skip=all".into());
    let r = report_with(&format!("#check=error=true\n{src}"), &o);
    assert!(r.warnings.is_empty() && r.violation().is_none());
    // A bad value is an error.
    let df = crate::parse("# check=skip\nFROM scratch\n", "Dockerfile").unwrap();
    assert_eq!(
        check(&df, &opts()).unwrap_err().message,
        "failed to parse check options: invalid check option \"skip\""
    );
}

#[test]
fn check_comments_apply_to_one_instruction() {
    let src = "FROM scratch\n# check=skip=JSONArgsRecommended\nCMD make\nENTRYPOINT run\n";
    assert_eq!(
        lint(src),
        ["JSONArgsRecommended: JSON arguments recommended for ENTRYPOINT to prevent unintended behavior related to OS signals (line 4)"]
    );
}

#[test]
fn onbuild_triggers_of_a_parent_stage_are_checked_in_the_child() {
    assert_eq!(
        lint("FROM scratch AS parent\nONBUILD COPY $nope /\n\nFROM parent\n"),
        ["UndefinedVar: Usage of undefined variable '$nope' (line 4)"]
    );
}

#[test]
fn outline_of_a_target_as_buildx_shows_it() {
    let src = "\nFROM busybox AS first\nRUN --mount=type=secret,target=/etc/passwd,required=true --mount=type=ssh true\n\nFROM alpine AS second\nRUN --mount=type=secret,id=unused --mount=type=ssh,id=ssh2 true\n\nFROM scratch AS third\nARG BAR\nRUN --mount=type=secret,id=second${BAR} true\n\nFROM third AS target\nCOPY --from=first /foo /\nRUN --mount=type=ssh,id=ssh3,required true\n\nFROM second\n";
    let df = crate::parse(src, "Dockerfile").unwrap();
    let mut o = opts();
    o.all_stages = false;
    o.target = Some("target".into());
    o.build_args.insert("BAR".into(), "678".into());
    let out = outline(&df, &o).unwrap();
    assert_eq!(out.name, "target");
    let args: Vec<(&str, &str)> = out
        .args
        .iter()
        .map(|a| (a.name.as_str(), a.value.as_str()))
        .collect();
    assert_eq!(args, [("BAR", "678")]);
    let secrets: Vec<(&str, bool)> = out
        .secrets
        .iter()
        .map(|s| (s.name.as_str(), s.required))
        .collect();
    assert_eq!(secrets, [("passwd", true), ("second678", false)]);
    let ssh: Vec<(&str, bool)> = out
        .ssh
        .iter()
        .map(|s| (s.name.as_str(), s.required))
        .collect();
    assert_eq!(ssh, [("default", false), ("ssh3", true)]);
    assert_eq!(
        outline_text(&out),
        "TARGET: target\n\nBUILD ARG   VALUE   DESCRIPTION\nBAR         678     \n\nSECRET      REQUIRED\npasswd      true\nsecond678   \n\nSSH       REQUIRED\ndefault   \nssh3      true\n\n"
    );
}

#[test]
fn outline_args_with_descriptions_and_global_dependencies() {
    let src = "# REGISTRY where images come from\nARG REGISTRY=docker.io\nARG IMAGE=${REGISTRY}/library/alpine\nARG UNUSED=1\n# base the base stage\nFROM ${IMAGE} AS base\n# VERSION of the app\nARG VERSION=1.0\n";
    let df = crate::parse(src, "Dockerfile").unwrap();
    let out = outline(
        &df,
        &CheckOptions {
            all_stages: false,
            ..opts()
        },
    )
    .unwrap();
    let args: Vec<(&str, &str, &str)> = out
        .args
        .iter()
        .map(|a| (a.name.as_str(), a.value.as_str(), a.description.as_str()))
        .collect();
    assert_eq!(
        args,
        [
            ("REGISTRY", "docker.io", "where images come from"),
            ("IMAGE", "docker.io/library/alpine", ""),
            ("VERSION", "1.0", "of the app"),
        ]
    );
    assert_eq!(out.description, "the base stage");
}

#[test]
fn targets_with_descriptions_as_buildx_shows_them() {
    let src = "\n# build defines stage for compiling the binary\nFROM alpine AS build\nRUN true\n\nFROM busybox as second\nRUN false\n\nFROM alpine\nRUN false\n\n# binary returns the compiled binary\nFROM second AS binary\n";
    let df = crate::parse(src, "Dockerfile").unwrap();
    let t = targets(&df).unwrap();
    let got: Vec<(&str, &str, &str, bool)> = t
        .iter()
        .map(|t| {
            (
                t.name.as_str(),
                t.description.as_str(),
                t.base.as_str(),
                t.default,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "build",
                "defines stage for compiling the binary",
                "alpine",
                false
            ),
            ("second", "", "busybox", false),
            ("", "", "alpine", false),
            ("binary", "returns the compiled binary", "second", true),
        ]
    );
    assert_eq!(
        targets_text(&t),
        "TARGET           DESCRIPTION\nbuild            defines stage for compiling the binary\nsecond           \n                 \nbinary (default) returns the compiled binary\n"
    );
}

#[test]
fn check_text_is_buildx_s() {
    let src = "\nfrOM busybox as base\ncOpy Dockerfile .\n\t";
    let r = report_with(src, &opts());
    assert_eq!(
        lint_text("Dockerfile", src, &r),
        "Check complete, 2 warnings have been found!\n\nWARNING: ConsistentInstructionCasing - https://docs.docker.com/go/dockerfile/rule/consistent-instruction-casing/\nCommand 'frOM' should match the case of the command majority (uppercase)\nDockerfile:2\n--------------------\n   1 |     \n   2 | >>> frOM busybox as base\n   3 |     cOpy Dockerfile .\n   4 |     \t\n--------------------\n\nWARNING: ConsistentInstructionCasing - https://docs.docker.com/go/dockerfile/rule/consistent-instruction-casing/\nCommand 'cOpy' should match the case of the command majority (uppercase)\nDockerfile:3\n--------------------\n   1 |     \n   2 |     frOM busybox as base\n   3 | >>> cOpy Dockerfile .\n   4 |     \t\n--------------------\n"
    );
    let clean = report_with("FROM scratch\n", &opts());
    assert_eq!(
        lint_text("Dockerfile", "FROM scratch\n", &clean),
        "Check complete, no warnings found.\n"
    );
}

#[test]
fn check_json_is_buildkit_s_lint_result() {
    let src = "FROM scratch\nCMD x\n";
    let r = report_with(src, &opts());
    assert_eq!(
        lint_json("Dockerfile", src, &r),
        "{\n  \"warnings\": [\n    {\n      \"ruleName\": \"JSONArgsRecommended\",\n      \"description\": \"JSON arguments recommended for ENTRYPOINT/CMD to prevent unintended behavior related to OS signals\",\n      \"url\": \"https://docs.docker.com/go/dockerfile/rule/json-args-recommended/\",\n      \"detail\": \"JSON arguments recommended for CMD to prevent unintended behavior related to OS signals\",\n      \"location\": {\n        \"ranges\": [\n          {\n            \"start\": {\n              \"line\": 2\n            },\n            \"end\": {\n              \"line\": 2\n            }\n          }\n        ]\n      }\n    }\n  ],\n  \"sources\": [\n    {\n      \"filename\": \"Dockerfile\",\n      \"data\": \"RlJPTSBzY3JhdGNoCkNNRCB4Cg==\",\n      \"language\": \"Dockerfile\"\n    }\n  ]\n}"
    );
    let clean = report_with("FROM scratch\n", &opts());
    assert!(
        lint_json("Dockerfile", "FROM scratch\n", &clean).starts_with("{\n  \"warnings\": null,")
    );
}

#[test]
fn summary_lines_as_buildx() {
    let r = report_with("FROM scratch as base\nCMD x\n", &opts());
    assert_eq!(
        summary(&r.warnings),
        "2 warnings found (use --check to expand):\n - FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)\n - JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 2)\n"
    );
    assert_eq!(summary(&[]), "");
}

#[test]
fn base_images_lists_what_the_checks_read() {
    let src =
        "ARG TAG=3.20\nFROM alpine:${TAG} AS a\nFROM --platform=linux/arm64 debian AS b\nFROM a\n";
    let df = crate::parse(src, "Dockerfile").unwrap();
    let all = base_images(&df, &opts());
    let names: Vec<String> = all.iter().map(|(n, p)| format!("{n} {p}")).collect();
    assert_eq!(names, ["alpine:3.20 linux/amd64", "debian linux/arm64"]);
    let mut o = opts();
    o.all_stages = false;
    assert_eq!(base_images(&df, &o).len(), 1);
}

#[test]
fn hostile_input_is_an_error_not_a_panic() {
    for src in [
        "FROM ${",
        "FROM scratch\nCOPY ${x a\n",
        "FROM scratch\nEXPOSE 80/bogus\n",
        "FROM --platform=bogus scratch\n",
        "ARG A=${\nFROM scratch\n",
        "FROM scratch\nWORKDIR ${x:?no}\n",
        "FROM scratch\nARG A=${B:?nope}\n",
    ] {
        let df = crate::parse(src, "Dockerfile").unwrap();
        let r = check(&df, &opts()).unwrap();
        assert!(r.error.is_some(), "{src}");
        let _ = lint_text("Dockerfile", src, &r);
        let _ = lint_json("Dockerfile", src, &r);
    }
    let _ = HashMap::<String, String>::new();
}
