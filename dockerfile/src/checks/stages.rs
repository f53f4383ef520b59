//! The checks of instructions as they are read and of the stages as a whole: stage names
//! and their casing, `AS` casing, `MAINTAINER`, instruction casing, the FROM lines (their
//! arguments, platforms, default values) and the base images' platforms.

use std::collections::BTreeSet;

use ossb_protocol::Platform;

use super::config::CheckConfig;
use super::{reference, rules, suggest, CheckOptions, Checker};
use crate::flags::Flags;
use crate::shell::Lexer;
use crate::{Error, Node};

/// A stage as written: its FROM and the instructions up to the next.
pub(crate) struct StageDef<'a> {
    pub node: &'a Node,
    /// The stage's name, lower-cased, if it has one.
    pub name: Option<String>,
    pub flags: Flags,
    pub commands: Vec<(&'a Node, Flags)>,
}

/// What a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Base {
    Scratch,
    /// An earlier stage.
    Stage(usize),
    /// An image, by the name the FROM gives after expansion.
    Image(String),
}

/// A stage's FROM line, resolved with the global arguments.
pub(crate) struct From {
    pub base: Base,
    /// `--platform`, when given.
    pub platform: Option<Platform>,
    /// The global arguments the FROM line used.
    pub used: Vec<String>,
}

impl From {
    /// The platform the stage is built for.
    pub fn platform(&self, opts: &CheckOptions) -> Platform {
        self.platform
            .clone()
            .unwrap_or_else(|| opts.target_platform.clone())
    }
}

/// A global (before the first FROM) argument, or one a stage declares, as the outline
/// shows it.
#[derive(Debug, Clone)]
pub(crate) struct ArgInfo {
    pub name: String,
    pub value: Option<String>,
    pub description: String,
    pub lines: (usize, usize),
    /// Global arguments its default used.
    pub deps: Vec<String>,
}

/// The global scope: BuildKit's predefined arguments and the ARGs before the first FROM.
pub(crate) struct Globals {
    /// Variables with values, in order.
    pub env: Vec<(String, String)>,
    /// Every global ARG declared, with or without a value.
    pub args: Vec<ArgInfo>,
}

/// Variables BuildKit gives every build without an ARG; `--build-arg` may override them.
fn predefined(opts: &CheckOptions, target: &str) -> Vec<(String, String)> {
    let (b, t) = (&opts.build_platform, &opts.target_platform);
    let v = |p: &Option<String>| p.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = [
        ("BUILDPLATFORM", b.to_string()),
        ("BUILDOS", b.os.clone()),
        ("BUILDOSVERSION", String::new()),
        ("BUILDARCH", b.architecture.clone()),
        ("BUILDVARIANT", v(&b.variant)),
        ("TARGETPLATFORM", t.to_string()),
        ("TARGETOS", t.os.clone()),
        ("TARGETOSVERSION", String::new()),
        ("TARGETARCH", t.architecture.clone()),
        ("TARGETVARIANT", v(&t.variant)),
        ("TARGETSTAGE", target.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in env.iter_mut() {
        if let Some(o) = opts.build_args.get(k.as_str()) {
            *v = o.clone();
        }
    }
    env
}

/// Sets `k` in an ordered environment, in place when it is there.
pub(crate) fn set(env: &mut Vec<(String, String)>, k: &str, v: &str) {
    match env.iter_mut().find(|e| e.0 == k) {
        Some(e) => e.1 = v.to_string(),
        None => env.push((k.to_string(), v.to_string())),
    }
}

/// The description BuildKit takes from the comments before a definition: the rest of the
/// first comment that starts with `name `.
pub(crate) fn doc_comment(comments: &[String], name: &str) -> String {
    if name.is_empty() {
        return String::new();
    }
    let prefix = format!("{name} ");
    comments
        .iter()
        .find_map(|c| c.strip_prefix(&prefix))
        .unwrap_or_default()
        .to_string()
}

/// An ARG instruction's `name[=default]` words.
pub(crate) fn arg_pairs(node: &Node) -> Vec<(String, Option<String>)> {
    node.args
        .iter()
        .map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        })
        .collect()
}

impl Globals {
    /// The global scope with `build_args` (BuildKit's `buildMetaArgs`). The predefined
    /// platform arguments take their `--build-arg` overrides in any case.
    pub fn new(
        checker: &Checker,
        meta: &[&Node],
        stages: &[StageDef],
        build_args: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Result<Globals, Error> {
        let target = match &checker.opts.target {
            Some(t) => t.clone(),
            None => stages
                .last()
                .and_then(|s| s.name.clone())
                .unwrap_or_default(),
        };
        let target = if target.is_empty() {
            "default"
        } else {
            &target
        };
        let mut env = predefined(checker.opts, target);
        let mut args: Vec<ArgInfo> = Vec::new();
        let lexer = Lexer::new(checker.df.escape);
        for node in meta {
            for (key, default) in arg_pairs(node) {
                let mut info = ArgInfo {
                    name: key.clone(),
                    value: None,
                    description: doc_comment(&node.comments, &key),
                    lines: (node.start_line, node.end_line),
                    deps: Vec::new(),
                };
                match (build_args.and_then(|b| b.get(&key)), default) {
                    (Some(v), _) => info.value = Some(v.clone()),
                    (None, Some(d)) => {
                        let e = lexer
                            .process(&d, &env)
                            .map_err(|e| checker.error_at(node, e.message))?;
                        let self_reference = e.matched.contains(&key);
                        let mut deps: Vec<String> =
                            e.matched.into_iter().filter(|m| *m != key).collect();
                        if let (true, Some(old)) =
                            (self_reference, args.iter().find(|a| a.name == key))
                        {
                            deps.extend(old.deps.iter().cloned());
                        }
                        info.deps = deps;
                        info.value = Some(e.result);
                    }
                    (None, None) => {}
                }
                if let Some(v) = &info.value {
                    set(&mut env, &key, v);
                }
                args.retain(|a| a.name != key);
                args.push(info);
            }
        }
        Ok(Globals { env, args })
    }

    /// Names an argument of a FROM line may use: every global ARG and predefined argument.
    fn known(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.args.iter().map(|a| a.name.as_str()).collect();
        for (k, _) in &self.env {
            if !names.contains(&k.as_str()) {
                names.push(k);
            }
        }
        names
    }
}

impl<'a> Checker<'a> {
    /// Splits the Dockerfile into global ARGs and stages, reporting what BuildKit reports as
    /// it reads each instruction; the first invalid instruction stops it.
    pub(crate) fn split(&mut self) -> Result<(Vec<&'a Node>, Vec<StageDef<'a>>), Error> {
        let df = self.df;
        let mut meta = Vec::new();
        let mut stages: Vec<StageDef<'a>> = Vec::new();
        for node in &df.instructions {
            let config = self.config.with_comments(&node.comments);
            let name = node.name();
            let lines = (node.start_line, node.end_line);
            if name == "MAINTAINER" {
                self.warn(
                    &config,
                    &rules::MAINTAINER_DEPRECATED,
                    lines,
                    "Maintainer instruction is deprecated in favor of using label".into(),
                );
            }
            if name == "FROM" {
                self.casing_of_from(&config, node);
            }
            let flags = crate::plan::checked_flags(df, node)?;
            match name.as_str() {
                "FROM" => {
                    let stage_name = (node.args.len() == 3).then(|| node.args[2].to_lowercase());
                    if let Some(n) = &stage_name {
                        self.definition_description(&config, "FROM", std::slice::from_ref(n), node);
                    }
                    stages.push(StageDef {
                        node,
                        name: stage_name,
                        flags,
                        commands: Vec::new(),
                    });
                }
                _ => {
                    if name == "ARG" {
                        let keys: Vec<String> =
                            arg_pairs(node).into_iter().map(|(k, _)| k).collect();
                        self.definition_description(&config, "ARG", &keys, node);
                    }
                    match stages.last_mut() {
                        Some(stage) => stage.commands.push((node, flags)),
                        None if name == "ARG" => meta.push(node),
                        None => {
                            return Err(self
                                .error_at(node, "no build stage in current context")
                                .with_hint("only ARG can come before the first FROM"))
                        }
                    }
                }
            }
        }
        if stages.is_empty() {
            return Err(
                Error::new(&df.file_name, "no build stage in current context")
                    .with_hint("a Dockerfile needs at least one FROM"),
            );
        }
        Ok((meta, stages))
    }

    /// `StageNameCasing` and `FromAsCasing` of one FROM line.
    fn casing_of_from(&mut self, config: &CheckConfig, node: &Node) {
        let lines = (node.start_line, node.end_line);
        if node.args.len() == 3 && node.args[2] != node.args[2].to_lowercase() {
            self.warn(
                config,
                &rules::STAGE_NAME_CASING,
                lines,
                format!("Stage name '{}' should be lowercase", node.args[2]),
            );
        }
        if node.args.len() >= 3 {
            let from = &node.keyword;
            let as_ = &node.args[1];
            let lower = *from == from.to_lowercase();
            let upper = *from == from.to_uppercase();
            let mismatch = (lower && *as_ != as_.to_lowercase())
                || (!lower && upper && *as_ != as_.to_uppercase());
            if mismatch {
                self.warn(
                    config,
                    &rules::FROM_AS_CASING,
                    lines,
                    format!("'{as_}' and '{from}' keywords' casing do not match"),
                );
            }
        }
    }

    /// `InvalidDefinitionDescription` (experimental): the comment right before a named stage
    /// or an ARG should start with the name it describes.
    fn definition_description(
        &mut self,
        config: &CheckConfig,
        instruction: &str,
        keys: &[String],
        node: &Node,
    ) {
        let Some(last) = node.comments.last() else {
            return;
        };
        if keys.is_empty() {
            return;
        }
        let first = last.split(' ').next().unwrap_or_default();
        if keys.iter().any(|k| k == first) {
            return;
        }
        let example = if keys.len() > 1 {
            "<arg_key>"
        } else {
            &keys[0]
        };
        self.warn(
            config,
            &rules::INVALID_DEFINITION_DESCRIPTION,
            (node.start_line, node.end_line),
            format!(
                "Comment for {instruction} should follow the format: `# {example} <description>`"
            ),
        );
    }

    /// `ReservedStageName` and `DuplicateStageName`.
    pub(crate) fn stage_names(&mut self, config: &CheckConfig, stages: &[StageDef]) {
        let mut seen: Vec<&str> = Vec::new();
        for stage in stages {
            let Some(name) = stage.name.as_deref() else {
                continue;
            };
            let lines = (stage.node.start_line, stage.node.end_line);
            if matches!(name, "context" | "scratch") {
                self.warn(
                    config,
                    &rules::RESERVED_STAGE_NAME,
                    lines,
                    format!(
                        "Stage name should not use the same name as reserved stage {}",
                        crate::go_quote(name)
                    ),
                );
            }
            if seen.contains(&name) {
                self.warn(
                    config,
                    &rules::DUPLICATE_STAGE_NAME,
                    lines,
                    format!(
                        "Duplicate stage name {}, stage names should be unique",
                        crate::go_quote(name)
                    ),
                );
            }
            seen.push(name);
        }
    }

    /// `ConsistentInstructionCasing`: every keyword of the stages (the global ARGs do not
    /// count) in the case most of them use, upper case on a tie.
    pub(crate) fn instruction_casing(&mut self, config: &CheckConfig, stages: &[StageDef]) {
        let keywords = || {
            stages
                .iter()
                .flat_map(|s| std::iter::once(s.node).chain(s.commands.iter().map(|c| c.0)))
        };
        let (mut lower, mut upper) = (0, 0);
        for node in keywords() {
            let k = &node.keyword;
            if *k == k.to_lowercase() {
                lower += 1;
            } else if *k == k.to_uppercase() {
                upper += 1;
            }
        }
        let majority_lower = lower > upper;
        for node in keywords() {
            let k = &node.keyword;
            let casing = if majority_lower && *k != k.to_lowercase() {
                "lowercase"
            } else if !majority_lower && *k != k.to_uppercase() {
                "uppercase"
            } else {
                continue;
            };
            self.warn(
                config,
                &rules::CONSISTENT_INSTRUCTION_CASING,
                (node.start_line, node.end_line),
                format!("Command '{k}' should match the case of the command majority ({casing})"),
            );
        }
    }

    /// `InvalidDefaultArgInFrom`: with no `--build-arg` at all, every FROM must still name a
    /// valid image. Abandoned silently where the defaults cannot be expanded (the build then
    /// fails with that error).
    pub(crate) fn default_args_in_from(
        &mut self,
        config: &CheckConfig,
        meta: &[&Node],
        stages: &[StageDef],
    ) {
        let Ok(defaults) = Globals::new(self, meta, stages, None) else {
            return;
        };
        let lexer = Lexer::new(self.df.escape);
        for stage in stages {
            let raw = &stage.node.args[0];
            let Ok(e) = lexer.process(raw, &defaults.env) else {
                return;
            };
            if !reference::valid(&e.result) {
                self.warn(
                    config,
                    &rules::INVALID_DEFAULT_ARG_IN_FROM,
                    (stage.node.start_line, stage.node.end_line),
                    format!(
                        "Default value for ARG {raw} results in empty or invalid base image name"
                    ),
                );
            }
        }
    }

    /// Resolves every stage's FROM line with the global arguments, reporting
    /// `UndefinedArgInFrom`, `RedundantTargetPlatform` and `FromPlatformFlagConstDisallowed`.
    pub(crate) fn froms(
        &mut self,
        globals: &Globals,
        stages: &[StageDef],
    ) -> Result<Vec<From>, Error> {
        let lexer = Lexer::new(self.df.escape);
        let known: Vec<String> = globals.known().into_iter().map(str::to_string).collect();
        let mut froms = Vec::new();
        for (i, stage) in stages.iter().enumerate() {
            let node = stage.node;
            let config = self.config.with_comments(&node.comments);
            let lines = (node.start_line, node.end_line);
            let raw = &node.args[0];
            let e = lexer
                .process(raw, &globals.env)
                .map_err(|e| self.error_at(node, e.message))?;
            self.undeclared_in_from(&config, lines, &known, &e.unmatched);
            if e.result.is_empty() {
                return Err(self
                    .error_at(node, format!("base name ({raw}) should not be blank"))
                    .with_hint("pass the ARG it uses with --build-arg or give the ARG a default"));
            }
            let mut used: Vec<String> = e.matched.iter().cloned().collect();
            let mut platform = None;
            if let Some(p) = stage.flags.get("platform") {
                let pe = lexer
                    .process(p, &globals.env)
                    .map_err(|e| self.error_at(node, e.message))?;
                self.undeclared_in_from(&config, lines, &known, &pe.unmatched);
                if pe.matched.len() == 1
                    && pe.unmatched.is_empty()
                    && pe.matched.contains("TARGETPLATFORM")
                    && crate::shell::Env::get(&globals.env, "TARGETPLATFORM")
                        == Some(pe.result.as_str())
                {
                    self.warn(
                        &config,
                        &rules::REDUNDANT_TARGET_PLATFORM,
                        lines,
                        format!("Setting platform to predefined {p} in FROM is redundant as this is the default behavior"),
                    );
                }
                let parsed = pe.result.parse::<Platform>();
                if pe.matched.is_empty() && pe.unmatched.is_empty() {
                    if let Ok(c) = &parsed {
                        let name = stage.name.as_deref().unwrap_or_default();
                        if !name.contains(c.os.as_str()) && !name.contains(c.architecture.as_str())
                        {
                            self.warn(
                                &config,
                                &rules::FROM_PLATFORM_FLAG_CONST_DISALLOWED,
                                lines,
                                format!(
                                    "FROM --platform flag should not use constant value {}",
                                    crate::go_quote(&pe.result)
                                ),
                            );
                        }
                    }
                }
                if pe.result.is_empty() {
                    let mut e =
                        self.error_at(node, format!("empty platform value from expression {p}"));
                    if let Some(s) = pe
                        .unmatched
                        .iter()
                        .find_map(|u| suggest::search(u, known.iter().map(String::as_str)))
                    {
                        e = e.with_hint(format!("did you mean {s}?"));
                    }
                    return Err(e);
                }
                platform = Some(parsed.map_err(|err| {
                    self.error_at(node, format!("failed to parse platform {p}: {err}"))
                })?);
                used.extend(pe.matched.iter().cloned());
            }
            let lower = e.result.to_lowercase();
            let base = match stages[..i]
                .iter()
                .rposition(|s| s.name.as_deref() == Some(lower.as_str()))
            {
                Some(j) => Base::Stage(j),
                None if lower == "scratch" => Base::Scratch,
                None => Base::Image(e.result.clone()),
            };
            froms.push(From {
                base,
                platform,
                used,
            });
        }
        Ok(froms)
    }

    /// `UndefinedArgInFrom` for each variable of a FROM line nothing declares.
    fn undeclared_in_from(
        &mut self,
        config: &CheckConfig,
        lines: (usize, usize),
        known: &[String],
        unmatched: &BTreeSet<String>,
    ) {
        for var in unmatched {
            if known.contains(var) {
                continue;
            }
            let mut message = format!("FROM argument '{var}' is not declared");
            if let Some(s) = suggest::search(var, known.iter().map(String::as_str)) {
                message.push_str(&format!(" (did you mean {s}?)"));
            }
            self.warn(config, &rules::UNDEFINED_ARG_IN_FROM, lines, message);
        }
    }

    /// The stage `--target` names (the last one without it).
    pub(crate) fn target(&self, stages: &[StageDef]) -> Result<usize, Error> {
        let Some(t) = &self.opts.target else {
            return Ok(stages.len() - 1);
        };
        let lower = t.to_lowercase();
        if let Some(i) = stages
            .iter()
            .rposition(|s| s.name.as_deref() == Some(lower.as_str()))
        {
            return Ok(i);
        }
        let mut e = Error::new(
            &self.df.file_name,
            format!("target stage {} could not be found", crate::go_quote(t)),
        );
        let names = stages.iter().filter_map(|s| s.name.as_deref());
        if let Some(s) = suggest::search(t, names) {
            e = e.with_hint(format!("did you mean {s}?"));
        }
        Err(e)
    }

    /// Which stages are dispatched: all of them for `all_stages`, else those the target
    /// needs (its base stages and the stages its COPY --from and RUN --mount from= read).
    pub(crate) fn dispatched(
        &self,
        stages: &[StageDef],
        froms: &[From],
        target: usize,
    ) -> Vec<bool> {
        if self.opts.all_stages {
            return vec![true; stages.len()];
        }
        let mut needed = vec![false; stages.len()];
        let mut todo = vec![target];
        while let Some(i) = todo.pop() {
            if needed[i] {
                continue;
            }
            needed[i] = true;
            if let Base::Stage(j) = froms[i].base {
                todo.push(j);
            }
            todo.extend(stage_deps(stages, i));
        }
        needed
    }

    /// `InvalidBaseImagePlatform`: a base image whose config declares another OS or
    /// architecture than the stage is built for.
    pub(crate) fn base_platforms(
        &mut self,
        config: &CheckConfig,
        stages: &[StageDef],
        froms: &[From],
        dispatched: &[bool],
    ) {
        for (i, from) in froms.iter().enumerate() {
            let Base::Image(name) = &from.base else {
                continue;
            };
            let Some(actual) = self.opts.bases.get(name).and_then(|b| b.platform.clone()) else {
                continue;
            };
            let expected = from.platform(self.opts);
            if dispatched[i]
                && (expected.os != actual.os || expected.architecture != actual.architecture)
            {
                let node = stages[i].node;
                self.warn(
                    config,
                    &rules::INVALID_BASE_IMAGE_PLATFORM,
                    (node.start_line, node.end_line),
                    format!(
                        "Base image {name} was pulled with platform {}, expected {} for current build",
                        crate::go_quote(&actual.to_string()),
                        crate::go_quote(&expected.to_string())
                    ),
                );
            }
        }
    }
}

/// The stages stage `i` reads with COPY --from and RUN --mount from= (by name or index).
pub(crate) fn stage_deps(stages: &[StageDef], i: usize) -> Vec<usize> {
    let by_name = |v: &str| {
        let lower = v.to_lowercase();
        stages
            .iter()
            .rposition(|s| s.name.as_deref() == Some(lower.as_str()))
    };
    let mut out = Vec::new();
    for (node, flags) in &stages[i].commands {
        match node.name().as_str() {
            "COPY" => {
                if let Some(from) = flags.get("from") {
                    let dep = by_name(from)
                        .or_else(|| from.parse::<usize>().ok().filter(|j| *j < stages.len()));
                    out.extend(dep);
                }
            }
            "RUN" => {
                for m in flags.all("mount") {
                    for field in crate::plan::split_csv(&m) {
                        if let Some((k, v)) = field.split_once('=') {
                            if k.eq_ignore_ascii_case("from") {
                                out.extend(by_name(v));
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out.retain(|j| *j != i);
    out
}
