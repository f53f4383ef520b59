//! Build checks: BuildKit's Dockerfile lint rules (`frontend/dockerfile/docs/rules/`), run
//! over a parsed Dockerfile, the build arguments and what is known of the base images.
//!
//! They run in BuildKit's order, which is the order a build prints them in: the parser's
//! empty continuation lines; each instruction as it is read (casing of stage names and `AS`,
//! `MAINTAINER`); the stages as a whole (names, instruction casing, the FROM lines with their
//! arguments and platforms); then every stage the build needs (every stage for `--check`
//! without `--target`), instruction by instruction with the variables in scope at that point
//! (undefined variables, exec form, relative WORKDIR, repeated CMD, legacy `ENV k v`,
//! secrets in ARG/ENV, EXPOSE, files .dockerignore leaves out).
//!
//! ```
//! use ossb_dockerfile::checks::{check, CheckOptions};
//! let df = ossb_dockerfile::parse("FROM alpine as build\nCMD make\n", "Dockerfile").unwrap();
//! let report = check(&df, &CheckOptions::default()).unwrap();
//! let short: Vec<String> = report.warnings.iter().map(|w| w.short()).collect();
//! assert_eq!(short, [
//!     "FromAsCasing: 'as' and 'FROM' keywords' casing do not match (line 1)",
//!     "JSONArgsRecommended: JSON arguments recommended for CMD to prevent unintended behavior related to OS signals (line 2)",
//! ]);
//! ```
//!
//! A base image whose config the caller could not give is unknown: variables it may define
//! are then not reported as undefined (no false positive), everything else is checked.

mod config;
mod dispatch;
mod expose;
mod json;
mod outline;
mod print;
mod reference;
pub mod rules;
mod stages;
mod suggest;

use std::collections::{BTreeMap, HashMap};

use ossb_protocol::Platform;

use crate::dockerignore::Dockerignore;
use crate::{BaseImageInfo, Dockerfile, Error};

pub use config::{directive, CheckConfig, CHECK_BUILD_ARG};
pub use outline::{Outline, OutlineArg, OutlineMount, Target};
pub use print::{
    error_text, lint_json, lint_text, outline_json, outline_text, summary, targets_json,
    targets_text,
};
pub use rules::{Rule, RULES};

/// A rule that reported, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The rule.
    pub rule: &'static Rule,
    /// What it found, in BuildKit's words.
    pub message: String,
    /// 1-based first line of the instruction it is about.
    pub start_line: usize,
    /// 1-based last line.
    pub end_line: usize,
}

impl Warning {
    /// `Rule: message (line N)`, one line of a build's summary (BuildKit's `LintFormatShort`).
    pub fn short(&self) -> String {
        let mut s = format!("{}: {}", self.rule.name, self.message);
        if self.start_line > 0 {
            s.push_str(&format!(" (line {})", self.start_line));
        }
        s
    }
}

/// What the checks know of a base image: its config and the platform it was found for.
#[derive(Debug, Clone, Default)]
pub struct BaseImage {
    /// Environment, SHELL and ONBUILD triggers of its config.
    pub info: BaseImageInfo,
    /// The platform its config declares.
    pub platform: Option<Platform>,
}

/// What the checks run over besides the Dockerfile.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// `--build-arg`s (`BUILDKIT_DOCKERFILE_CHECK` among them replaces the `# check=`
    /// directive).
    pub build_args: BTreeMap<String, String>,
    /// `--target`; the last stage when `None`.
    pub target: Option<String>,
    /// Check every stage, not only those the target needs (`--check` without `--target`).
    pub all_stages: bool,
    /// The platform checked for (a multi-platform build checks its first).
    pub target_platform: Platform,
    /// The platform the build runs on.
    pub build_platform: Platform,
    /// The build's `.dockerignore`, for `CopyIgnoredFile`.
    pub dockerignore: Option<Dockerignore>,
    /// Base image configs by the name a FROM gives after its ARGs are expanded (what
    /// [`base_images`] lists). An image not here is taken as unknown.
    pub bases: HashMap<String, BaseImage>,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            build_args: BTreeMap::new(),
            target: None,
            all_stages: false,
            target_platform: Platform::host(),
            build_platform: Platform::host(),
            dockerignore: None,
            bases: HashMap::new(),
        }
    }
}

/// What the checks found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The warnings, in the order BuildKit reports them.
    pub warnings: Vec<Warning>,
    /// The configuration they ran with.
    pub config: CheckConfig,
    /// The error that stopped them, as the build would meet it: what came before it is
    /// reported, nothing after.
    pub error: Option<Error>,
}

impl Report {
    /// The error a build fails with when its checks run with `error=true` and a rule
    /// reported: `lint violation found for rules: A, B` (rules sorted by name).
    pub fn violation(&self) -> Option<String> {
        if !self.config.error || self.warnings.is_empty() {
            return None;
        }
        let mut names: Vec<&str> = self.warnings.iter().map(|w| w.rule.name).collect();
        names.sort_unstable();
        names.dedup();
        Some(format!(
            "lint violation found for rules: {}",
            names.join(", ")
        ))
    }
}

/// Runs the checks. Fails only when the check configuration itself is bad (the directive
/// or `BUILDKIT_DOCKERFILE_CHECK`); a Dockerfile error stops the checks and is returned in
/// [`Report::error`].
pub fn check(df: &Dockerfile, opts: &CheckOptions) -> Result<Report, Error> {
    let config =
        CheckConfig::for_build(df, &opts.build_args).map_err(|m| Error::new(&df.file_name, m))?;
    let mut checker = Checker {
        df,
        opts,
        config,
        warnings: Vec::new(),
    };
    let walk = checker.run();
    Ok(Report {
        warnings: checker.warnings,
        config: checker.config,
        error: walk.err(),
    })
}

/// The base images whose configs the checks use, by the name their FROM gives after ARG
/// expansion, with the platform each is wanted for: every image stage for
/// `all_stages`, else those the target needs. Empty when the Dockerfile has an error there.
pub fn base_images(df: &Dockerfile, opts: &CheckOptions) -> Vec<(String, Platform)> {
    let mut checker = Checker {
        df,
        opts,
        config: CheckConfig {
            skip_all: true,
            ..CheckConfig::default()
        },
        warnings: Vec::new(),
    };
    checker.images().unwrap_or_default()
}

/// The target's build arguments, secrets and SSH sockets (`--call=outline`).
pub fn outline(df: &Dockerfile, opts: &CheckOptions) -> Result<Outline, Error> {
    let mut checker = Checker {
        df,
        opts,
        config: CheckConfig {
            skip_all: true,
            ..CheckConfig::default()
        },
        warnings: Vec::new(),
    };
    let walk = checker.run()?;
    Ok(outline::of_target(&walk))
}

/// Every stage a build can target, with its description (`--call=targets`).
pub fn targets(df: &Dockerfile) -> Result<Vec<Target>, Error> {
    let opts = CheckOptions::default();
    let mut checker = Checker {
        df,
        opts: &opts,
        config: CheckConfig {
            skip_all: true,
            ..CheckConfig::default()
        },
        warnings: Vec::new(),
    };
    let (_, stages) = checker.split()?;
    Ok(outline::targets(&stages))
}

/// One run of the checks.
pub(crate) struct Checker<'a> {
    pub df: &'a Dockerfile,
    pub opts: &'a CheckOptions,
    pub config: CheckConfig,
    pub warnings: Vec<Warning>,
}

impl<'a> Checker<'a> {
    /// Reports `rule` for the lines `(start, end)` if `config` lets it run.
    pub(crate) fn warn(
        &mut self,
        config: &CheckConfig,
        rule: &'static Rule,
        lines: (usize, usize),
        message: String,
    ) {
        if config.runs(rule) {
            self.warnings.push(Warning {
                rule,
                message,
                start_line: lines.0,
                end_line: lines.1,
            });
        }
    }

    /// The error `message` at `node`'s first line.
    pub(crate) fn error_at(&self, node: &crate::Node, message: impl Into<String>) -> Error {
        Error::at(
            &self.df.file_name,
            node.start_line,
            &self.df.source_lines,
            message,
        )
    }

    /// Every phase, in BuildKit's order; what the stages declared, for the outline.
    fn run(&mut self) -> Result<dispatch::Walk<'a>, Error> {
        self.empty_continuations();
        let (meta, stages) = self.split()?;
        let global = self.config.clone();
        self.stage_names(&global, &stages);
        self.instruction_casing(&global, &stages);
        self.default_args_in_from(&global, &meta, &stages);
        let globals = stages::Globals::new(self, &meta, &stages, Some(&self.opts.build_args))?;
        let froms = self.froms(&globals, &stages)?;
        let target = self.target(&stages)?;
        let dispatched = self.dispatched(&stages, &froms, target);
        self.base_platforms(&global, &stages, &froms, &dispatched);
        let mut walk = dispatch::Walk::new(stages, froms, globals, target);
        for (i, _) in dispatched.iter().enumerate().filter(|(_, d)| **d) {
            self.dispatch(&mut walk, i)?;
        }
        Ok(walk)
    }

    /// The images [`base_images`] lists.
    fn images(&mut self) -> Result<Vec<(String, Platform)>, Error> {
        let (meta, stages) = self.split()?;
        let globals = stages::Globals::new(self, &meta, &stages, Some(&self.opts.build_args))?;
        let froms = self.froms(&globals, &stages)?;
        let target = self.target(&stages)?;
        let dispatched = self.dispatched(&stages, &froms, target);
        let mut out: Vec<(String, Platform)> = Vec::new();
        for (i, from) in froms.iter().enumerate() {
            if let (true, stages::Base::Image(name)) = (dispatched[i], &from.base) {
                let entry = (name.clone(), from.platform(self.opts));
                if !out.contains(&entry) {
                    out.push(entry);
                }
            }
        }
        Ok(out)
    }

    /// `NoEmptyContinuation`, from what the parser noticed.
    fn empty_continuations(&mut self) {
        let config = self.config.clone();
        for w in &self.df.warnings {
            if w.message.starts_with("Empty continuation line") {
                self.warn(
                    &config,
                    &rules::NO_EMPTY_CONTINUATION,
                    (w.line, w.line),
                    "Empty continuation line".into(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
