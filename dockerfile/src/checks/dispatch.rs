//! The checks of each instruction of a stage, with the variables in scope where it stands:
//! `UndefinedVar`, `JSONArgsRecommended`, `WorkdirRelativePath`,
//! `MultipleInstructionsDisallowed`, `LegacyKeyValueFormat`, `SecretsUsedInArgOrEnv`,
//! `ExposeProtoCasing`, `ExposeInvalidFormat` and `CopyIgnoredFile`. The walk also notes what
//! the outline of a target shows (its ARGs, secrets and SSH sockets).
//!
//! The scope is BuildKit's: the base image's environment (a stage built on another starts
//! where that one ended), then ENV and the ARGs with a value; an ARG without one is declared
//! but not set. Words are expanded where BuildKit expands them (ENV, LABEL, ADD, COPY, WORKDIR,
//! USER, VOLUME, STOPSIGNAL, RUN --mount, ARG defaults; not RUN, CMD or ENTRYPOINT, which the
//! shell expands).

use super::config::CheckConfig;
use super::outline::OutlineMount;
use super::stages::{arg_pairs, doc_comment, set, ArgInfo, Base, From, Globals, StageDef};
use super::{expose, rules, suggest, Checker};
use crate::flags::Flags;
use crate::shell::{Env, Lexer};
use crate::{Error, Node, DEFAULT_PATH};

/// Arguments BuildKit never puts in the environment.
const NON_ENV_ARGS: [&str; 2] = ["BUILDKIT_SBOM_SCAN_CONTEXT", "BUILDKIT_SBOM_SCAN_STAGE"];

/// Everything the walk over the stages learned.
pub(crate) struct Walk<'a> {
    pub stages: Vec<StageDef<'a>>,
    pub froms: Vec<From>,
    pub globals: Globals,
    pub target: usize,
    /// Each dispatched stage's scope at its end.
    pub states: Vec<Option<State>>,
    /// What each dispatched stage declares.
    pub outlines: Vec<StageOutline>,
}

impl<'a> Walk<'a> {
    pub fn new(
        stages: Vec<StageDef<'a>>,
        froms: Vec<From>,
        globals: Globals,
        target: usize,
    ) -> Walk<'a> {
        let n = stages.len();
        Walk {
            stages,
            froms,
            globals,
            target,
            states: vec![None; n],
            outlines: vec![StageOutline::default(); n],
        }
    }
}

/// A stage's scope as its instructions run.
#[derive(Debug, Clone)]
pub(crate) struct State {
    /// Variables with values, in order.
    env: Vec<(String, String)>,
    /// ARGs declared in the stage (with or without a value).
    declared: Vec<String>,
    /// The base image's config is unknown: a variable may come from it.
    env_unknown: bool,
    /// A SHELL is set (by the base image or an instruction).
    shell_set: bool,
    /// A WORKDIR of the Dockerfile ran.
    workdir_set: bool,
    /// The OS the stage is built for.
    os: String,
}

/// What the outline shows of one stage.
#[derive(Debug, Clone, Default)]
pub(crate) struct StageOutline {
    /// Arguments the stage uses: those its FROM line reads and those it declares.
    pub used: Vec<String>,
    /// The stage's own ARG definitions (an ARG without a default inherits the global one).
    pub args: Vec<ArgInfo>,
    pub secrets: Vec<OutlineMount>,
    pub ssh: Vec<OutlineMount>,
}

/// One stage being walked.
struct Cx {
    st: State,
    outline: StageOutline,
    cmd: Option<(usize, usize)>,
    entrypoint: Option<(usize, usize)>,
    healthcheck: Option<(usize, usize)>,
}

impl State {
    fn new(env: Vec<(String, String)>, os: &str) -> State {
        let mut st = State {
            env,
            declared: Vec::new(),
            env_unknown: false,
            shell_set: false,
            workdir_set: false,
            os: os.to_string(),
        };
        // BuildKit makes sure PATH is set, except on Windows.
        if os != "windows" && Env::get(&st.env, "PATH").is_none() {
            st.env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        st
    }
}

/// `/x` on Linux; on Windows also `C:\x` and `\x`.
fn is_abs(path: &str, os: &str) -> bool {
    if os != "windows" {
        return path.starts_with('/');
    }
    let b = path.as_bytes();
    let rest = if b.len() >= 2 && b[1] == b':' && b[0].is_ascii_alphabetic() {
        &path[2..]
    } else {
        path
    };
    rest.starts_with(['/', '\\'])
}

/// Whether an ARG or ENV name looks like it holds a secret (BuildKit's word lists: a `_`-separated
/// part is a secret word and none is an allowed one).
fn secret_name(key: &str) -> bool {
    const DENY: [&str; 10] = [
        "apikey",
        "auth",
        "credential",
        "credentials",
        "key",
        "password",
        "pword",
        "passwd",
        "secret",
        "token",
    ];
    const ALLOW: [&str; 3] = ["public", "file", "version"];
    let parts: Vec<String> = key.split('_').map(str::to_lowercase).collect();
    parts.iter().any(|p| DENY.contains(&p.as_str()))
        && !parts.iter().any(|p| ALLOW.contains(&p.as_str()))
}

/// An `ADD` source the build fetches rather than reads from the context.
fn remote_source(src: &str) -> bool {
    let lower = src.to_lowercase();
    ["http://", "https://", "git://", "git@", "ssh://"]
        .iter()
        .any(|p| lower.starts_with(p))
        || (lower.contains(".git") && lower.contains("://"))
}

impl<'a> Checker<'a> {
    /// Walks stage `i`'s instructions (and the ONBUILD triggers it inherits) with its scope.
    pub(crate) fn dispatch(&mut self, walk: &mut Walk<'a>, i: usize) -> Result<(), Error> {
        let node = walk.stages[i].node;
        let lines = (node.start_line, node.end_line);
        let os = walk.froms[i].platform(self.opts).os;
        let mut triggers: Vec<Node> = Vec::new();
        let st = match &walk.froms[i].base {
            Base::Stage(j) => {
                for (c, _) in &walk.stages[*j].commands {
                    if let (true, Some(child)) = (c.name() == "ONBUILD", &c.child) {
                        triggers.push((**child).clone());
                    }
                }
                walk.states[*j].clone().unwrap_or_else(|| State {
                    env_unknown: true,
                    ..State::new(Vec::new(), &os)
                })
            }
            Base::Scratch => State::new(Vec::new(), &os),
            Base::Image(name) => match self.opts.bases.get(name) {
                Some(b) => {
                    for t in &b.info.onbuild {
                        let parsed = crate::parse(t, &self.df.file_name)
                            .map_err(|e| self.error_at(node, e.message))?;
                        triggers.extend(parsed.instructions.into_iter().take(1));
                    }
                    State {
                        shell_set: !b.info.shell.is_empty(),
                        ..State::new(b.info.env.clone(), &os)
                    }
                }
                None => State {
                    env_unknown: true,
                    ..State::new(Vec::new(), &os)
                },
            },
        };
        let mut cx = Cx {
            st,
            outline: StageOutline {
                used: walk.froms[i].used.clone(),
                ..StageOutline::default()
            },
            cmd: None,
            entrypoint: None,
            healthcheck: None,
        };
        for mut t in triggers {
            t.start_line = lines.0;
            t.end_line = lines.1;
            let flags = crate::plan::checked_flags(self.df, &t)?;
            self.instruction(&mut cx, &walk.globals, &t, &flags)?;
        }
        let commands: Vec<(&Node, Flags)> = walk.stages[i]
            .commands
            .iter()
            .map(|(n, f)| (*n, f.clone()))
            .collect();
        for (n, flags) in commands {
            self.instruction(&mut cx, &walk.globals, n, &flags)?;
        }
        walk.states[i] = Some(cx.st);
        walk.outlines[i] = cx.outline;
        Ok(())
    }

    /// One instruction.
    fn instruction(
        &mut self,
        cx: &mut Cx,
        globals: &Globals,
        node: &Node,
        flags: &Flags,
    ) -> Result<(), Error> {
        let config = self.config.with_comments(&node.comments);
        let lines = (node.start_line, node.end_line);
        match node.name().as_str() {
            "ENV" | "LABEL" => {
                let mut pairs = Vec::new();
                for c in node.args.chunks(3) {
                    let k = self.expand(cx, &config, node, &c[0])?;
                    let v = self.expand(cx, &config, node, &c[1])?;
                    pairs.push((k, v, c.get(2).is_some_and(String::is_empty)));
                }
                let env = node.name() == "ENV";
                for (k, v, legacy) in pairs {
                    if legacy {
                        let n = &node.keyword;
                        self.warn(
                            &config,
                            &rules::LEGACY_KEY_VALUE_FORMAT,
                            lines,
                            format!("\"{n} key=value\" should be used instead of legacy \"{n} key value\" format"),
                        );
                    }
                    if env {
                        self.secret(&config, lines, "ENV", &k);
                        set(&mut cx.st.env, &k, &v);
                    }
                }
            }
            "ARG" => self.arg(cx, &config, globals, node)?,
            "ADD" | "COPY" => self.copy(cx, &config, node, flags)?,
            "WORKDIR" => {
                let path = self.expand(cx, &config, node, &node.args[0])?;
                if !cx.st.workdir_set && !is_abs(&path, &cx.st.os) {
                    self.warn(
                        &config,
                        &rules::WORKDIR_RELATIVE_PATH,
                        lines,
                        format!(
                            "Relative workdir {} can have unexpected results if the base image changes",
                            crate::go_quote(&path)
                        ),
                    );
                }
                cx.st.workdir_set = true;
            }
            "USER" | "VOLUME" | "STOPSIGNAL" => {
                for a in &node.args {
                    self.expand(cx, &config, node, a)?;
                }
            }
            "RUN" => self.mounts(cx, &config, node, flags)?,
            "EXPOSE" => {
                let lexer = Lexer::new(self.df.escape);
                for a in &node.args {
                    let words = lexer
                        .process_words(a, &cx.st.env)
                        .map_err(|e| self.error_at(node, e.message))?;
                    for port in words {
                        let found = expose::check(&port).map_err(|m| self.error_at(node, m))?;
                        if found.proto_casing {
                            self.warn(
                                &config,
                                &rules::EXPOSE_PROTO_CASING,
                                lines,
                                format!("Defined protocol '{port}' in EXPOSE instruction should be lowercase"),
                            );
                        }
                        if found.host_mapping {
                            self.warn(
                                &config,
                                &rules::EXPOSE_INVALID_FORMAT,
                                lines,
                                format!("EXPOSE instruction should not define an IP address or host-port mapping, found '{port}'"),
                            );
                        }
                    }
                }
            }
            "CMD" | "ENTRYPOINT" => {
                let slot = if node.name() == "CMD" {
                    &mut cx.cmd
                } else {
                    &mut cx.entrypoint
                };
                let previous = slot.replace(lines);
                self.used_once(&config, node, previous);
                if !node.json && !cx.st.shell_set {
                    self.warn(
                        &config,
                        &rules::JSON_ARGS_RECOMMENDED,
                        lines,
                        format!(
                            "JSON arguments recommended for {} to prevent unintended behavior related to OS signals",
                            node.keyword
                        ),
                    );
                }
            }
            "HEALTHCHECK" => {
                let previous = cx.healthcheck.replace(lines);
                self.used_once(&config, node, previous);
            }
            "SHELL" => cx.st.shell_set = !node.args.is_empty(),
            _ => {}
        }
        Ok(())
    }

    /// `MultipleInstructionsDisallowed`, reported where the overridden one is.
    fn used_once(&mut self, config: &CheckConfig, node: &Node, previous: Option<(usize, usize)>) {
        if let Some(at) = previous {
            self.warn(
                config,
                &rules::MULTIPLE_INSTRUCTIONS_DISALLOWED,
                at,
                format!(
                    "Multiple {} instructions should not be used in the same stage because only the last one will be used",
                    node.keyword
                ),
            );
        }
    }

    /// `SecretsUsedInArgOrEnv`.
    fn secret(
        &mut self,
        config: &CheckConfig,
        lines: (usize, usize),
        instruction: &str,
        key: &str,
    ) {
        if secret_name(key) {
            self.warn(
                config,
                &rules::SECRETS_USED_IN_ARG_OR_ENV,
                lines,
                format!(
                    "Do not use ARG or ENV instructions for sensitive data ({instruction} {})",
                    crate::go_quote(key)
                ),
            );
        }
    }

    /// Expands `word` in the stage's scope, reporting the variables nothing defines.
    fn expand(
        &mut self,
        cx: &Cx,
        config: &CheckConfig,
        node: &Node,
        word: &str,
    ) -> Result<String, Error> {
        self.expand_with(cx, config, node, word, Lexer::new(self.df.escape))
    }

    fn expand_with(
        &mut self,
        cx: &Cx,
        config: &CheckConfig,
        node: &Node,
        word: &str,
        lexer: Lexer,
    ) -> Result<String, Error> {
        let e = lexer
            .process(word, &cx.st.env)
            .map_err(|e| self.error_at(node, e.message))?;
        if !cx.st.env_unknown {
            for var in &e.unmatched {
                if cx.st.declared.contains(var) || NON_ENV_ARGS.contains(&var.as_str()) {
                    continue;
                }
                let mut message = format!("Usage of undefined variable '${var}'");
                if let Some(s) = suggest::search(var, cx.st.env.iter().map(|(k, _)| k.as_str())) {
                    message.push_str(&format!(" (did you mean ${s}?)"));
                }
                self.warn(
                    config,
                    &rules::UNDEFINED_VAR,
                    (node.start_line, node.end_line),
                    message,
                );
            }
        }
        Ok(e.result)
    }

    /// ARG: each name declared, its value from `--build-arg`, its default or the global ARG.
    fn arg(
        &mut self,
        cx: &mut Cx,
        config: &CheckConfig,
        globals: &Globals,
        node: &Node,
    ) -> Result<(), Error> {
        let lines = (node.start_line, node.end_line);
        for (key, default) in arg_pairs(node) {
            self.secret(config, lines, "ARG", &key);
            let given = self.opts.build_args.get(&key).cloned();
            let mut inherited = false;
            let value = match (given, default) {
                (Some(v), _) => Some(v),
                (None, Some(d)) => Some(self.expand(cx, config, node, &d)?),
                (None, None) => {
                    let global = Env::get(&globals.env, &key).map(str::to_string);
                    inherited = global.is_some();
                    global
                }
            };
            if let Some(v) = &value {
                if !NON_ENV_ARGS.contains(&key.as_str()) {
                    set(&mut cx.st.env, &key, v);
                }
            }
            if !inherited {
                cx.outline.args.retain(|a| a.name != key);
                cx.outline.args.push(ArgInfo {
                    name: key.clone(),
                    value,
                    description: doc_comment(&node.comments, &key),
                    lines,
                    deps: Vec::new(),
                });
            }
            if !cx.outline.used.contains(&key) {
                cx.outline.used.push(key.clone());
            }
            cx.st.declared.push(key);
        }
        Ok(())
    }

    /// ADD and COPY: flags, sources, destination and heredocs expanded; `CopyIgnoredFile`.
    fn copy(
        &mut self,
        cx: &mut Cx,
        config: &CheckConfig,
        node: &Node,
        flags: &Flags,
    ) -> Result<(), Error> {
        let add = node.name() == "ADD";
        let mut names = vec!["chown", "chmod"];
        if add {
            names.push("checksum");
        }
        for f in names {
            if let Some(v) = flags.get(f) {
                self.expand(cx, config, node, v)?;
            }
        }
        let n = node.args.len();
        let mut sources = Vec::new();
        for src in &node.args[..n.saturating_sub(1)] {
            if !node.heredocs.is_empty() && crate::parse_heredoc(src).is_some() {
                continue;
            }
            sources.push(self.expand(cx, config, node, src)?);
        }
        if let Some(dest) = node.args.last() {
            self.expand(cx, config, node, dest)?;
        }
        let raw = Lexer {
            skip_process_quotes: true,
            ..Lexer::new('\\')
        };
        for h in node.heredocs.iter().filter(|h| h.expand) {
            self.expand_with(cx, config, node, &h.content, raw)?;
        }
        if add || flags.get("from").is_none() {
            self.ignored_sources(config, node, add, &sources);
        }
        Ok(())
    }

    /// `CopyIgnoredFile`: a source `.dockerignore` leaves out of the context. Not judged when
    /// the file has exceptions (`!pattern`), as BuildKit; nor for absolute sources, which
    /// BuildKit matches against patterns in a way that never applies to them in practice.
    fn ignored_sources(
        &mut self,
        config: &CheckConfig,
        node: &Node,
        add: bool,
        sources: &[String],
    ) {
        let Some(ignore) = &self.opts.dockerignore else {
            return;
        };
        let patterns = ignore.patterns();
        if patterns.iter().any(|p| p.starts_with('!')) {
            return;
        }
        let root_ignored = patterns
            .iter()
            .any(|p| matches!(p.as_str(), "*" | "**" | "**/*"));
        let mut found = Vec::new();
        for src in sources {
            if add && remote_source(src) {
                continue;
            }
            let cleaned = ossb_protocol::clean_path(src);
            let excluded = if cleaned == "." || cleaned == "/" {
                root_ignored
            } else {
                !cleaned.starts_with('/') && ignore.is_excluded(&cleaned)
            };
            if excluded {
                found.push(cleaned);
            }
        }
        let cmd = if add { "Add" } else { "Copy" };
        for f in found {
            self.warn(
                config,
                &rules::COPY_IGNORED_FILE,
                (node.start_line, node.end_line),
                format!(
                    "Attempting to {cmd} file {} that is excluded by .dockerignore",
                    crate::go_quote(&f)
                ),
            );
        }
    }

    /// RUN --mount: every `key=value` expanded; secrets and SSH sockets noted for the outline.
    fn mounts(
        &mut self,
        cx: &mut Cx,
        config: &CheckConfig,
        node: &Node,
        flags: &Flags,
    ) -> Result<(), Error> {
        for spec in flags.all("mount") {
            let mut fields: Vec<(String, Option<String>)> = Vec::new();
            for field in crate::plan::split_csv(&spec) {
                match field.split_once('=') {
                    Some((k, v)) => {
                        let v = self.expand(cx, config, node, v)?;
                        fields.push((k.to_lowercase(), Some(v)));
                    }
                    None => fields.push((field.to_lowercase(), None)),
                }
            }
            let get = |k: &[&str]| {
                fields
                    .iter()
                    .rev()
                    .find(|(n, v)| k.contains(&n.as_str()) && v.is_some())
                    .and_then(|(_, v)| v.clone())
            };
            let kind = get(&["type"]).unwrap_or_default().to_lowercase();
            let required = fields.iter().any(|(k, v)| {
                k == "required"
                    && v.as_deref()
                        .is_none_or(|v| matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True"))
            });
            let id = get(&["id"]).filter(|s| !s.is_empty());
            let mount = |name: String| OutlineMount {
                name,
                required,
                start_line: node.start_line,
                end_line: node.end_line,
            };
            match kind.as_str() {
                "secret" => {
                    let target = get(&["target", "dst", "destination"]);
                    let name = id
                        .or_else(|| get(&["source", "src"]).filter(|s| !s.is_empty()))
                        .or_else(|| {
                            target.map(|t| t.rsplit('/').next().unwrap_or_default().to_string())
                        });
                    if let Some(name) = name.filter(|n| !n.is_empty()) {
                        if !cx.outline.secrets.iter().any(|s| s.name == name) {
                            cx.outline.secrets.push(mount(name));
                        }
                    }
                }
                "ssh" => {
                    let name = id.unwrap_or_else(|| "default".into());
                    if !cx.outline.ssh.iter().any(|s| s.name == name) {
                        cx.outline.ssh.push(mount(name));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_as_buildkit() {
        for yes in [
            "SECRET_PASSPHRASE",
            "SUPER_Secret",
            "password",
            "auth",
            "apikey",
            "git_key",
            "super_duper_secret_token",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(secret_name(yes), "{yes}");
        }
        for no in [
            "sunflower",
            "PUBLIC_KEY",
            "public_token",
            "GPG_KEYS",
            "KEY_FILE",
            "TOKEN_VERSION",
            "MONKEY",
        ] {
            assert!(!secret_name(no), "{no}");
        }
    }

    #[test]
    fn absolute_paths_per_os() {
        assert!(is_abs("/app", "linux"));
        assert!(!is_abs("app/", "linux"));
        assert!(!is_abs("C:\\app", "linux"));
        assert!(is_abs("C:\\app", "windows"));
        assert!(is_abs("\\app", "windows"));
        assert!(!is_abs("app", "windows"));
    }
}
