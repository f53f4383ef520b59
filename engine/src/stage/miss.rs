//! A step's named key inputs and, when its key is new, why ([`crate::cache_miss`]): what the
//! step's key was made of, by name, compared with what its position's last build had.

use super::*;
use crate::cache_miss::{self, Difference, Input, StagePosition, StepRecord, Why};

/// What one of a step's inputs (in [`PlatformBuild::step_inputs`] order) is, for its name in
/// the step's record.
pub(super) enum InputName {
    /// Files of the build context: the sources as the step reads them, so the list of files
    /// can be made again when the input changed.
    Context {
        /// `context files`, or `context files of the mount at /src`.
        name: String,
        sources: Vec<String>,
        /// Whether `.dockerignore` applies (COPY) or not (a bind mount).
        ignore: bool,
        exclude: Option<Dockerignore>,
    },
    /// Anything else: a stage, an image (its digest shown), a named context, a download.
    Other(String, Option<String>),
}

impl InputName {
    fn name(&self) -> &str {
        match self {
            InputName::Context { name, .. } | InputName::Other(name, _) => name,
        }
    }
}

/// What a step's explanation decided before its cache lookup.
pub(super) struct Explained {
    /// The record to keep for the step's position once it finished.
    pub record: StepRecord,
    /// Why it runs, if it does.
    pub why: Why,
    /// Why the chain's key differs from the last build's after this step, when it does not
    /// run (a hit, or a step that changes no file); `None`: unchanged.
    pub chain: Option<Why>,
}

/// The stage's root inputs: the base image by manifest digest (or scratch, or the stage it
/// starts from), the platform, the layer settings.
pub(super) fn root_inputs(
    base: &str,
    digest: &str,
    platform: &Platform,
    settings: &str,
) -> Vec<Input> {
    vec![
        Input::new(base, digest.as_bytes()).shown(digest),
        Input::new("platform", platform.to_string().as_bytes()).shown(platform.to_string()),
        Input::new("layer settings", settings.as_bytes()).shown(settings),
    ]
}

/// Why a stage's chain starts changed: the difference of its root from the last build's.
/// A stage starting from another inherits that stage's reason (`from`).
pub(super) fn root_why(difference: Option<Difference<'_>>, from: Option<&Why>) -> Option<Why> {
    let difference = difference?;
    if let (Difference::Changed { new, .. }, Some(why)) = (&difference, from) {
        if new.name.starts_with("stage ") {
            return Some(why.clone());
        }
    }
    Some(Why::Changed {
        what: cache_miss::describe(&difference),
        line: None,
    })
}

impl PlatformBuild<'_> {
    /// The build's scope of positions ([`crate::cache_miss`]): the context directory and the
    /// Dockerfile; a cluster task's context is a directory of the worker's, so its tags and
    /// Dockerfile instead.
    pub(super) fn position_scope(&self) -> String {
        let req = self.req();
        if req.stage.is_some() {
            return format!("cluster\0{}\0{}", req.tags.join(","), req.dockerfile_name);
        }
        // Both as absolute paths: `ossb build app` and `ossb build /src/app` are the same build.
        let context = std::fs::canonicalize(&req.context).unwrap_or_else(|_| req.context.clone());
        let dockerfile = std::fs::canonicalize(&req.dockerfile_name)
            .map_or_else(|_| req.dockerfile_name.clone(), |p| p.display().to_string());
        format!("{}\0{}", context.display(), dockerfile)
    }

    /// The position of `stage` (named `name`) and why its root key differs from the last
    /// build's there.
    pub(super) fn stage_position(
        &self,
        stage: &ossb_dockerfile::Stage,
        name: &str,
        key: &CacheKey,
        settings: &str,
        done: &Done,
    ) -> (StagePosition, Option<Why>) {
        let platform = stage.platform.as_ref().unwrap_or(&self.platform);
        let (base, digest, from) = match &stage.base {
            Base::Scratch => ("base image".to_string(), "scratch".to_string(), None),
            Base::Image(reference) => {
                let digest = self
                    .pulled
                    .get(&pulled_key(reference, platform))
                    .map_or_else(|| key.hex(), |p| p.manifest_digest.to_string());
                (format!("base image {reference}"), digest, None)
            }
            Base::Stage(dep) => {
                let dep = done.get(dep);
                (
                    format!("stage {}", dep.map_or("", |d| d.name.as_str())),
                    key.hex(),
                    dep.and_then(|d| d.why.as_ref()),
                )
            }
            Base::Context(context) => (format!("build context {context}"), key.hex(), None),
        };
        let mut position = StagePosition::open(
            &self.req().cache_dir,
            &self.position_scope(),
            &self.platform.to_string(),
            name,
            stage.steps.len(),
        );
        let inputs = root_inputs(&base, &digest, platform, settings);
        let why = root_why(position.root(&key.hex(), inputs), from);
        (position, why)
    }

    /// The name of what a step reads from `from`, in its record.
    pub(super) fn input_name(
        &self,
        from: Option<&Source>,
        context: impl FnOnce() -> InputName,
        done: &Done,
    ) -> InputName {
        match from {
            None => context(),
            Some(Source::Stage(i)) => {
                let name = done
                    .get(i)
                    .map_or_else(|| format!("stage {i}"), |s| s.name.clone());
                InputName::Other(format!("stage {name}"), None)
            }
            Some(Source::Context(name)) => InputName::Other(format!("build context {name}"), None),
            Some(Source::Image(image)) => InputName::Other(
                format!("image {image}"),
                self.copy_images.get(image).map(|(_, d)| d.to_string()),
            ),
        }
    }

    /// The secrets a RUN mounts: (id, given, whether its absence goes into the key). Only
    /// presence: never a value nor a digest of one. An optional secret that was not given
    /// enters the key as absent, so a build that gives it runs the step again (a required
    /// one fails the step when missing).
    pub(super) fn secret_presence(&self, step: &Step) -> Vec<(String, bool, bool)> {
        let Instruction::Run(run) = &step.instruction else {
            return Vec::new();
        };
        run.mounts
            .iter()
            .filter(|m| m.kind == ossb_dockerfile::MountType::Secret)
            .map(|m| {
                let id = m.id.clone().unwrap_or_default();
                let given = self.req().secrets.contains_key(&id);
                (id, given, !given && !m.required)
            })
            .collect()
    }

    /// Compares step `n`'s inputs with its position's last build. `parent` is the key before
    /// the step, `chain` why it differs from the last build's (`None`: it does not).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn explain(
        &self,
        step: &Step,
        n: usize,
        parent: &CacheKey,
        key: &CacheKey,
        inputs: &[(InputName, Vec<u8>)],
        secrets: &[(String, bool, bool)],
        chain: Option<&Why>,
        position: &StagePosition,
    ) -> Explained {
        let no_cache = self.req().no_cache;
        let old = position.old_step(n);
        if let Some(old) = old.filter(|o| o.key == key.hex()) {
            return Explained {
                record: old.clone(),
                why: if no_cache {
                    Why::NoCache
                } else {
                    Why::ResultGone
                },
                chain: None,
            };
        }
        let record = StepRecord {
            key: key.hex(),
            inputs: named_inputs(step, parent, inputs, secrets),
        };
        // The files of each context input whose digest is new, listed once: kept for the next
        // build, and compared with the last build's to name the changed path.
        let mut lists: Vec<Option<Vec<ossb_worker::checksum::EntryDigest>>> = Vec::new();
        for ((name, _), input) in inputs
            .iter()
            .zip(&record.inputs[record.inputs.len() - inputs.len()..])
        {
            let unchanged = old.is_some_and(|o| o.inputs.contains(input));
            let list = match name {
                InputName::Context { .. } if !unchanged => self.context_files(name),
                _ => None,
            };
            lists.push(list);
        }
        let why = self.why(n, &record, old, inputs, &lists, chain, position);
        // Kept once the last build's were compared: they replace them.
        let offset = record.inputs.len() - inputs.len();
        for (input, list) in record.inputs[offset..].iter().zip(&lists) {
            if let Some(list) = list {
                position.keep_files(n, input, list);
            }
        }
        let Some(why) = why else {
            return Explained {
                record,
                why: if no_cache {
                    Why::NoCache
                } else {
                    Why::NoPreviousBuild
                },
                chain: Some(Why::NoPreviousBuild),
            };
        };
        // Later steps that inherit this change name the line where it happened.
        let chain = Some(match &why {
            Why::Changed { what, line: None } => Why::Changed {
                what: what.clone(),
                line: Some(step.location.start_line),
            },
            other => other.clone(),
        });
        Explained {
            record,
            why: if no_cache { Why::NoCache } else { why },
            chain,
        }
    }

    /// Why step `n`'s new `record` differs from the last build's `old` (`None`: there was
    /// none), with the files of its context inputs (`lists`) to name a changed path.
    #[allow(clippy::too_many_arguments)]
    fn why(
        &self,
        n: usize,
        record: &StepRecord,
        old: Option<&StepRecord>,
        inputs: &[(InputName, Vec<u8>)],
        lists: &[Option<Vec<ossb_worker::checksum::EntryDigest>>],
        chain: Option<&Why>,
        position: &StagePosition,
    ) -> Option<Why> {
        let old = old?;
        let why = match cache_miss::first_difference(&old.inputs, &record.inputs) {
            None => Why::Changed {
                what: "inputs changed".into(),
                line: None,
            },
            Some(Difference::Changed { new, .. }) if new.name == "parent" => match chain {
                Some(why) => why.clone(),
                None => Why::Changed {
                    what: "parent step changed".into(),
                    line: None,
                },
            },
            Some(difference) => {
                let what = match &difference {
                    Difference::Changed { old: was, new } => {
                        let at = record.inputs.iter().position(|i| i == *new).unwrap_or(0);
                        let offset = record.inputs.len() - inputs.len();
                        at.checked_sub(offset)
                            .and_then(|k| {
                                let (name, _) = &inputs[k];
                                let new_list = lists[k].as_ref()?;
                                let old_list = position.old_files(n, was)?;
                                let (path, how) =
                                    cache_miss::first_changed_path(&old_list, new_list)?;
                                Some(match name {
                                    InputName::Context { name, .. } if name != "context files" => {
                                        format!("context file {path} {how} ({name})")
                                    }
                                    _ => format!("context file {path} {how}"),
                                })
                            })
                            .unwrap_or_else(|| cache_miss::describe(&difference))
                    }
                    _ => cache_miss::describe(&difference),
                };
                Why::Changed { what, line: None }
            }
        };
        Some(why)
    }

    /// The files a context input reads, with what each contributed to its checksum; `None`
    /// when they cannot be listed (the step reports the error itself).
    fn context_files(&self, name: &InputName) -> Option<Vec<ossb_worker::checksum::EntryDigest>> {
        let InputName::Context {
            sources,
            ignore,
            exclude,
            ..
        } = name
        else {
            return None;
        };
        let mut filter = match (&self.shared.ignore, ignore) {
            (Some(rules), true) => CopyFilter::dockerignore(rules),
            _ => CopyFilter::none(),
        };
        if let Some(ex) = exclude {
            filter = filter.with_exclude(ex);
        }
        ossb_worker::checksum::sources_entries_cached(
            &self.req().context,
            sources,
            filter,
            &self.shared.checksums,
        )
        .ok()
        .map(|(_, entries)| entries)
    }
}

/// A step's named inputs, in key order: parent, instruction (without the build args it
/// sees), each build arg, each secret's presence, then what it reads.
fn named_inputs(
    step: &Step,
    parent: &CacheKey,
    inputs: &[(InputName, Vec<u8>)],
    secrets: &[(String, bool, bool)],
) -> Vec<Input> {
    let mut out = vec![Input::new("parent", parent.as_bytes())];
    let mut instruction = step.instruction.clone();
    let mut args: Vec<(String, Vec<u8>)> = Vec::new();
    match &mut instruction {
        Instruction::Run(run) => {
            for (name, value) in std::mem::take(&mut run.build_env) {
                args.push((name, value.into_bytes()));
            }
        }
        Instruction::Arg(list) => {
            for (name, value) in list.iter_mut() {
                let bytes = match value.take() {
                    Some(v) => [b"=".as_slice(), v.as_bytes()].concat(),
                    None => Vec::new(),
                };
                args.push((name.clone(), bytes));
            }
        }
        _ => {}
    }
    out.push(Input::new(
        "instruction",
        &ossb_dockerfile::instruction_key_bytes(&instruction),
    ));
    for (name, value) in args {
        out.push(Input::new(format!("build arg {name}"), &value));
    }
    for (id, given, _) in secrets {
        let presence = if *given { "present" } else { "absent" };
        out.push(Input::new(format!("secret {id}"), presence.as_bytes()).shown(presence));
    }
    for (name, bytes) in inputs {
        let mut input = Input::new(name.name(), bytes);
        if let InputName::Other(_, Some(shown)) = name {
            input = input.shown(shown.clone());
        }
        out.push(input);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_step(build_env: &[(&str, &str)]) -> Step {
        let text = "FROM scratch\nRUN make\n";
        let df = ossb_dockerfile::parse(text, "Dockerfile").unwrap();
        let plan = ossb_dockerfile::plan(
            &df,
            &ossb_dockerfile::PlanOptions::default(),
            &HashMap::new(),
        )
        .unwrap();
        let mut step = plan.stages[0].steps[0].clone();
        if let Instruction::Run(run) = &mut step.instruction {
            run.build_env = build_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        }
        step
    }

    /// A build arg's value is its own input, apart from the instruction: changing it names
    /// the arg, not the instruction.
    #[test]
    fn build_args_are_inputs_of_their_own() {
        let parent = CacheKey::from_bytes([1; 32]);
        let old = named_inputs(&run_step(&[("V", "1")]), &parent, &[], &[]);
        let new = named_inputs(&run_step(&[("V", "2")]), &parent, &[], &[]);
        let names: Vec<&str> = new.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["parent", "instruction", "build arg V"]);
        let d = cache_miss::first_difference(&old, &new).unwrap();
        assert_eq!(cache_miss::describe(&d), "build arg V changed");
        let secrets = [("token".to_string(), true, false)];
        let with = named_inputs(&run_step(&[("V", "1")]), &parent, &[], &secrets);
        let d = cache_miss::first_difference(&old, &with).unwrap();
        assert_eq!(cache_miss::describe(&d), "secret token is now present");
    }

    #[test]
    fn a_stage_inherits_the_reason_of_the_stage_it_starts_from() {
        let old = vec![Input::new("stage build", b"1")];
        let new = vec![Input::new("stage build", b"2")];
        let why = Why::Changed {
            what: "build arg V changed".into(),
            line: Some(3),
        };
        let d = cache_miss::first_difference(&old, &new);
        assert_eq!(root_why(d, Some(&why)), Some(why));
        let p: Platform = "linux/amd64".parse().unwrap();
        let old = root_inputs("base image alpine", "sha256:aaa", &p, "gzip");
        let new = root_inputs("base image alpine", "sha256:bbb", &p, "gzip");
        let d = cache_miss::first_difference(&old, &new);
        assert_eq!(
            root_why(d, None).unwrap().to_string(),
            "base image alpine changed (sha256:aaa -> sha256:bbb)"
        );
    }
}
