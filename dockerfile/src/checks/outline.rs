//! What `--call=outline` and `--call=targets` show: a target's build arguments (with values
//! and the descriptions their comments give), secrets and SSH sockets, as BuildKit's
//! `dockerfile2llb/outline.go` gathers them; and every stage with its description.

use super::dispatch::Walk;
use super::stages::{doc_comment, stage_deps, ArgInfo, Base, StageDef};

/// A target's outline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outline {
    /// The target stage's name (empty for an unnamed last stage).
    pub name: String,
    /// Its description (`# name what it is` before its FROM).
    pub description: String,
    /// The build arguments it uses, in Dockerfile order.
    pub args: Vec<OutlineArg>,
    /// The secrets its RUN --mount=type=secret read.
    pub secrets: Vec<OutlineMount>,
    /// The SSH sockets its RUN --mount=type=ssh use.
    pub ssh: Vec<OutlineMount>,
}

/// A build argument of the outline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlineArg {
    /// Its name.
    pub name: String,
    /// Its value: the `--build-arg`, else its default (expanded), else empty.
    pub value: String,
    /// Its description (`# NAME what it is` before the ARG).
    pub description: String,
    /// 1-based first line of its ARG.
    pub start_line: usize,
    /// 1-based last line.
    pub end_line: usize,
}

/// A secret or SSH socket of the outline.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutlineMount {
    /// The secret's id (or the mount target's file name) or the SSH id (`default`).
    pub name: String,
    /// `required` was given.
    pub required: bool,
    /// 1-based first line of the RUN that mounts it first.
    pub start_line: usize,
    /// 1-based last line.
    pub end_line: usize,
}

/// A stage a build can target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    /// Its name (empty for an unnamed stage).
    pub name: String,
    /// It is the last stage, built when no `--target` is given.
    pub default: bool,
    /// Its description (`# name what it is` before its FROM).
    pub description: String,
    /// The base as written (ARGs not expanded).
    pub base: String,
    /// `--platform` as written.
    pub platform: String,
    /// 1-based first line of its FROM.
    pub start_line: usize,
    /// 1-based last line.
    pub end_line: usize,
}

/// Every stage, in order.
pub(crate) fn targets(stages: &[StageDef]) -> Vec<Target> {
    stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = s.name.clone().unwrap_or_default();
            Target {
                description: doc_comment(&s.node.comments, &name),
                name,
                default: i + 1 == stages.len(),
                base: s.node.args[0].clone(),
                platform: s.flags.get("platform").unwrap_or_default().to_string(),
                start_line: s.node.start_line,
                end_line: s.node.end_line,
            }
        })
        .collect()
}

/// The outline of the walk's target: what it and every stage it needs (its base stages and
/// the stages it copies from) use, each name once, in Dockerfile order.
pub(crate) fn of_target(walk: &Walk) -> Outline {
    let target = &walk.stages[walk.target];
    let name = target.name.clone().unwrap_or_default();
    let mut args = Vec::new();
    let mut secrets = Vec::new();
    let mut ssh = Vec::new();
    let mut seen = Vec::new();
    collect(
        walk,
        walk.target,
        &mut seen,
        &mut args,
        &mut secrets,
        &mut ssh,
    );
    args.sort_by_key(|a: &OutlineArg| a.start_line);
    secrets.sort_by_key(|s: &OutlineMount| s.start_line);
    ssh.sort_by_key(|s: &OutlineMount| s.start_line);
    Outline {
        description: doc_comment(&target.node.comments, &name),
        name,
        args,
        secrets,
        ssh,
    }
}

fn collect(
    walk: &Walk,
    i: usize,
    seen: &mut Vec<usize>,
    args: &mut Vec<OutlineArg>,
    secrets: &mut Vec<OutlineMount>,
    ssh: &mut Vec<OutlineMount>,
) {
    if seen.contains(&i) {
        return;
    }
    seen.push(i);
    let outline = &walk.outlines[i];
    // What the stage uses, and the global arguments their defaults used, transitively.
    let mut used: Vec<String> = outline.used.clone();
    let mut k = 0;
    while k < used.len() {
        if let Some(info) = info_of(walk, i, &used[k]) {
            for d in &info.deps {
                if !used.contains(d) {
                    used.push(d.clone());
                }
            }
        }
        k += 1;
    }
    for name in &used {
        if args.iter().any(|a: &OutlineArg| a.name == *name) {
            continue;
        }
        if let Some(info) = info_of(walk, i, name) {
            args.push(OutlineArg {
                name: info.name.clone(),
                value: info.value.clone().unwrap_or_default(),
                description: info.description.clone(),
                start_line: info.lines.0,
                end_line: info.lines.1,
            });
        }
    }
    for s in &outline.secrets {
        if !secrets.iter().any(|x| x.name == s.name) {
            secrets.push(s.clone());
        }
    }
    for s in &outline.ssh {
        if !ssh.iter().any(|x| x.name == s.name) {
            ssh.push(s.clone());
        }
    }
    if let Base::Stage(j) = walk.froms[i].base {
        collect(walk, j, seen, args, secrets, ssh);
    }
    for j in stage_deps(&walk.stages, i) {
        collect(walk, j, seen, args, secrets, ssh);
    }
}

/// The definition of argument `name` as stage `i` sees it: its own ARG, else the global one.
fn info_of<'w>(walk: &'w Walk, i: usize, name: &str) -> Option<&'w ArgInfo> {
    walk.outlines[i]
        .args
        .iter()
        .find(|a| a.name == name)
        .or_else(|| walk.globals.args.iter().find(|a| a.name == name))
}
