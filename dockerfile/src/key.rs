//! The canonical bytes of a planned instruction, from which the engine computes cache keys.
//!
//! Explicit and versioned, never `Debug` text: every field is written in a fixed order with a
//! tag, strings with their length, so no two different instructions give the same bytes, and
//! renaming a field or deriving a trait changes nothing. A change of what is written is a
//! change of every key: bump [`KEY_VERSION`] (and the golden keys of the tests).
//!
//! A stage an instruction reads (`COPY --from=stage`, `RUN --mount from=stage`) is written
//! without its position: positions change when a plan is pruned for a `--target`, so the same
//! step would get another key in another plan. The engine puts the stage's own key among the
//! step's inputs instead.
//!
//! A linked COPY or ADD (`--link`, see [`linked`]) has a second encoding,
//! [`link_layer_key_bytes`], for the key of its layer alone: it leaves out what the layers
//! below decide (the stage's USER, which a copy ignores anyway), so that the layer's key has
//! no parent.

use std::time::Duration;

use crate::plan::{
    Copy, Healthcheck, InlineFile, Instruction, Mount, MountType, Network, Run, Security, Sharing,
    Source,
};

/// The version of the encoding; part of every key.
pub const KEY_VERSION: u32 = 1;

/// The canonical bytes of `instruction`, [`KEY_VERSION`] first.
pub fn instruction_key_bytes(instruction: &Instruction) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(256));
    w.u32(KEY_VERSION);
    match instruction {
        Instruction::Run(run) => {
            w.tag(b'R');
            w.run(run);
        }
        Instruction::Copy(copy) => {
            w.tag(b'C');
            w.copy(copy);
        }
        Instruction::Add(copy) => {
            w.tag(b'A');
            w.copy(copy);
        }
        Instruction::Env(pairs) => {
            w.tag(b'E');
            w.pairs(pairs);
        }
        Instruction::Workdir(dir) => {
            w.tag(b'W');
            w.str(dir);
        }
        Instruction::User(user) => {
            w.tag(b'U');
            w.str(user);
        }
        Instruction::Label(pairs) => {
            w.tag(b'L');
            w.pairs(pairs);
        }
        Instruction::Maintainer(author) => {
            w.tag(b'M');
            w.str(author);
        }
        Instruction::Expose(ports) => {
            w.tag(b'X');
            w.strs(ports);
        }
        Instruction::Cmd(argv) => {
            w.tag(b'c');
            w.strs(argv);
        }
        Instruction::Entrypoint(argv) => {
            w.tag(b'e');
            w.strs(argv);
        }
        Instruction::Volume(paths) => {
            w.tag(b'V');
            w.strs(paths);
        }
        Instruction::StopSignal(signal) => {
            w.tag(b'S');
            w.str(signal);
        }
        Instruction::Healthcheck(check) => {
            w.tag(b'H');
            w.healthcheck(check);
        }
        Instruction::Shell(argv) => {
            w.tag(b's');
            w.strs(argv);
        }
        Instruction::OnBuild(trigger) => {
            w.tag(b'O');
            w.str(trigger);
        }
        Instruction::Arg(args) => {
            w.tag(b'a');
            w.len(args.len());
            for (name, value) in args {
                w.str(name);
                w.opt_str(value.as_deref());
            }
        }
    }
    w.0
}

/// The COPY or ADD of `instruction` when it makes a linked layer: `--link` without `--chmod`,
/// as BuildKit's dockerfile2llb merges it (with `--chmod` it makes an ordinary copy onto the
/// stage's files, `--link` or not).
pub fn linked(instruction: &Instruction) -> Option<&Copy> {
    match instruction {
        Instruction::Copy(c) | Instruction::Add(c) if c.link && c.chmod.is_none() => Some(c),
        _ => None,
    }
}

/// The canonical bytes of a linked step's layer ([`linked`]), [`KEY_VERSION`] first; `None`
/// for any other step. Every field of the instruction but the stage's USER (which decides
/// nothing in a copy: files are root's without `--chown`), under tags of their own, so a
/// linked layer's key never equals a step's. The destination is already absolute (a relative
/// one was joined to the stage's WORKDIR), so a WORKDIR that moves it changes these bytes.
pub fn link_layer_key_bytes(instruction: &Instruction) -> Option<Vec<u8>> {
    let copy = linked(instruction)?;
    let mut w = Writer(Vec::with_capacity(256));
    w.u32(KEY_VERSION);
    w.tag(match instruction {
        Instruction::Add(_) => b'k',
        _ => b'K',
    });
    w.copy_fields(copy);
    Some(w.0)
}

struct Writer(Vec<u8>);

impl Writer {
    fn tag(&mut self, t: u8) {
        self.0.push(t);
    }

    fn len(&mut self, n: usize) {
        self.0.extend_from_slice(&(n as u64).to_be_bytes());
    }

    fn u32(&mut self, n: u32) {
        self.0.extend_from_slice(&n.to_be_bytes());
    }

    fn bool(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }

    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn strs(&mut self, items: &[String]) {
        self.len(items.len());
        for s in items {
            self.str(s);
        }
    }

    fn pairs(&mut self, pairs: &[(String, String)]) {
        self.len(pairs.len());
        for (k, v) in pairs {
            self.str(k);
            self.str(v);
        }
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            None => self.tag(0),
            Some(s) => {
                self.tag(1);
                self.str(s);
            }
        }
    }

    fn opt_u32(&mut self, n: Option<u32>) {
        match n {
            None => self.tag(0),
            Some(n) => {
                self.tag(1);
                self.u32(n);
            }
        }
    }

    fn opt_u64(&mut self, n: Option<u64>) {
        match n {
            None => self.tag(0),
            Some(n) => {
                self.tag(1);
                self.0.extend_from_slice(&n.to_be_bytes());
            }
        }
    }

    fn opt_bool(&mut self, b: Option<bool>) {
        self.tag(match b {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        });
    }

    fn opt_duration(&mut self, d: Option<Duration>) {
        self.opt_u64(d.map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)));
    }

    /// A stage is written without its position (see the module documentation).
    fn source(&mut self, source: Option<&Source>) {
        match source {
            None => self.tag(0),
            Some(Source::Stage(_)) => self.tag(1),
            Some(Source::Image(name)) => {
                self.tag(2);
                self.str(name);
            }
            Some(Source::Context(name)) => {
                self.tag(3);
                self.str(name);
            }
        }
    }

    // Each struct is taken apart field by field, so that a field added to the plan does not
    // compile until it is written here too.

    fn inline_files(&mut self, files: &[InlineFile]) {
        self.len(files.len());
        for InlineFile {
            name,
            content,
            mode,
        } in files
        {
            self.str(name);
            self.str(content);
            self.u32(*mode);
        }
    }

    fn run(&mut self, run: &Run) {
        let Run {
            argv,
            shell_form,
            build_env,
            working_dir,
            user,
            mounts,
            network,
            security,
            extra_hosts,
            heredocs,
        } = run;
        self.strs(argv);
        self.bool(*shell_form);
        self.pairs(build_env);
        self.str(working_dir);
        self.str(user);
        self.len(mounts.len());
        for m in mounts {
            self.mount(m);
        }
        self.tag(match network {
            Network::Default => 0,
            Network::None => 1,
            Network::Host => 2,
        });
        self.tag(match security {
            Security::Sandbox => 0,
            Security::Insecure => 1,
        });
        self.pairs(extra_hosts);
        self.inline_files(heredocs);
    }

    fn mount(&mut self, m: &Mount) {
        let Mount {
            kind,
            target,
            source,
            from,
            read_only,
            id,
            sharing,
            mode,
            uid,
            gid,
            required,
            size,
            env,
        } = m;
        self.tag(match kind {
            MountType::Bind => 0,
            MountType::Cache => 1,
            MountType::Secret => 2,
            MountType::Ssh => 3,
            MountType::Tmpfs => 4,
        });
        self.str(target);
        self.opt_str(source.as_deref());
        self.source(from.as_ref());
        self.bool(*read_only);
        self.opt_str(id.as_deref());
        self.tag(match sharing {
            Sharing::Shared => 0,
            Sharing::Private => 1,
            Sharing::Locked => 2,
        });
        self.opt_u32(*mode);
        self.opt_u32(*uid);
        self.opt_u32(*gid);
        self.bool(*required);
        self.opt_u64(*size);
        self.opt_str(env.as_deref());
    }

    fn copy(&mut self, c: &Copy) {
        self.copy_fields(c);
        self.str(&c.user);
    }

    /// A COPY's fields but `user`, in [`Writer::copy`]'s order.
    fn copy_fields(&mut self, c: &Copy) {
        let Copy {
            sources,
            dest,
            from,
            chown,
            chmod,
            link,
            parents,
            exclude,
            heredocs,
            checksum,
            keep_git_dir,
            unpack,
            // Written by `copy` only (see `link_layer_key_bytes`).
            user: _,
        } = c;
        self.strs(sources);
        self.str(dest);
        self.source(from.as_ref());
        self.opt_str(chown.as_deref());
        self.opt_str(chmod.as_deref());
        self.bool(*link);
        self.bool(*parents);
        self.strs(exclude);
        self.inline_files(heredocs);
        self.opt_str(checksum.as_deref());
        self.opt_bool(*keep_git_dir);
        self.opt_bool(*unpack);
    }

    fn healthcheck(&mut self, h: &Healthcheck) {
        let Healthcheck {
            test,
            interval,
            timeout,
            start_period,
            start_interval,
            retries,
        } = h;
        self.strs(test);
        self.opt_duration(*interval);
        self.opt_duration(*timeout);
        self.opt_duration(*start_period);
        self.opt_duration(*start_interval);
        self.opt_u32(*retries);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::path::Path;

    use super::*;
    use crate::{parse, plan, PlanOptions};

    fn plan_of(text: &str, target_index: Option<usize>) -> Option<crate::BuildPlan> {
        let df = parse(text, "Dockerfile").ok()?;
        let opts = PlanOptions {
            target_index,
            ..Default::default()
        };
        plan(&df, &opts, &HashMap::new()).ok()
    }

    fn hex(i: &Instruction) -> String {
        ossb_protocol::Digest::of(&instruction_key_bytes(i)).hex()
    }

    /// Every step of every stage has the same key bytes in the whole plan and in the plan
    /// pruned for any stage as the target (as the cluster's stage tasks plan), over the
    /// corpus's multi-stage Dockerfiles.
    #[test]
    fn a_step_has_the_same_key_in_every_pruned_plan() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let mut files = Vec::new();
        let mut todo = vec![root];
        while let Some(dir) = todo.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("Dockerfile"))
                {
                    files.push(p);
                }
            }
        }
        let (mut checked_plans, mut stage_refs) = (0, 0);
        for file in files {
            let Ok(text) = std::fs::read_to_string(&file) else {
                continue;
            };
            let Some(full) = plan_of(&text, None) else {
                continue;
            };
            let Ok(df) = parse(&text, "Dockerfile") else {
                continue;
            };
            let stages = df
                .instructions
                .iter()
                .filter(|n| n.keyword.eq_ignore_ascii_case("from"))
                .count();
            for target in 0..stages {
                let Some(pruned) = plan_of(&text, Some(target)) else {
                    continue;
                };
                checked_plans += 1;
                for stage in &pruned.stages {
                    let Some(same) = full.stages.iter().find(|s| s.index == stage.index) else {
                        continue;
                    };
                    for (a, b) in stage.steps.iter().zip(&same.steps) {
                        if let Instruction::Copy(c) = &a.instruction {
                            stage_refs += usize::from(matches!(c.from, Some(Source::Stage(_))));
                        }
                        assert_eq!(
                            instruction_key_bytes(&a.instruction),
                            instruction_key_bytes(&b.instruction),
                            "{}: stage {} step {:?} differs with target {target}",
                            file.display(),
                            stage.index,
                            a.created_by
                        );
                    }
                }
            }
        }
        // The property was tested on plans whose positions moved.
        assert!(checked_plans > 100, "{checked_plans} pruned plans");
        assert!(
            stage_refs > 10,
            "{stage_refs} COPY --from=stage in pruned plans"
        );
    }

    fn run_of(text: &str) -> Instruction {
        let plan = plan_of(&format!("FROM scratch AS s\nFROM scratch\n{text}\n"), None).unwrap();
        plan.stages
            .last()
            .unwrap()
            .steps
            .last()
            .unwrap()
            .instruction
            .clone()
    }

    /// A key changes when anything the step is made of changes, and only then.
    #[test]
    fn the_key_bytes_follow_every_field() {
        let variants = [
            "RUN make",
            "RUN make install",
            "RUN [\"make\"]",
            "RUN --network=none make",
            "RUN --mount=type=cache,target=/c make",
            "RUN --mount=type=cache,target=/c,sharing=locked make",
            "RUN --mount=type=bind,from=s,target=/s make",
            "RUN --mount=type=bind,from=alpine,target=/s make",
            "RUN --mount=type=secret,id=a make",
            "RUN --mount=type=secret,id=a,required make",
            "RUN --mount=type=tmpfs,target=/t,size=1m make",
            "COPY a b",
            "COPY a c",
            "COPY --from=s a b",
            "COPY --from=alpine a b",
            "COPY --chmod=755 a b",
            "COPY --chown=1 a b",
            "COPY --link a b",
            "COPY --parents a b",
            "COPY --exclude=x a b",
            "ADD a b",
            "ADD --checksum=sha256:0000000000000000000000000000000000000000000000000000000000000000 https://x/a b",
            "ENV A=1",
            "ENV A=2",
            "WORKDIR /a",
            "USER a",
            "LABEL a=1",
            "EXPOSE 80",
            "CMD a",
            "ENTRYPOINT a",
            "VOLUME /a",
            "STOPSIGNAL 9",
            "HEALTHCHECK CMD a",
            "HEALTHCHECK --interval=5s CMD a",
            "SHELL [\"/bin/bash\", \"-c\"]",
            "ARG A",
            "ARG A=1",
        ];
        let mut seen = HashMap::new();
        for v in variants {
            let bytes = instruction_key_bytes(&run_of(v));
            if let Some(other) = seen.insert(bytes, v) {
                panic!("{v:?} and {other:?} have the same key bytes");
            }
            assert_eq!(
                instruction_key_bytes(&run_of(v)),
                instruction_key_bytes(&run_of(v)),
                "{v}"
            );
        }
        // The position of a stage is not part of a key.
        let at = |text: &str| {
            let plan = plan_of(text, None).unwrap();
            instruction_key_bytes(&plan.stages.last().unwrap().steps[0].instruction)
        };
        assert_eq!(
            at("FROM scratch AS s\nFROM scratch\nCOPY --from=s a b\n"),
            at("FROM scratch AS u\nFROM scratch AS s\nFROM scratch\nCOPY --from=s a b\n"),
        );
    }

    /// A linked COPY/ADD's layer bytes: only for `--link` without `--chmod`, apart from every
    /// step's bytes, the same under another USER, and following every other field.
    #[test]
    fn linked_layer_bytes_leave_out_only_the_user() {
        let link = |text: &str| link_layer_key_bytes(&run_of(text));
        assert!(link("COPY a b").is_none());
        assert!(
            link("COPY --link --chmod=755 a b").is_none(),
            "BuildKit copies onto the stage"
        );
        assert!(link("RUN make").is_none());
        let bytes = link("COPY --link a /b").unwrap();
        assert_ne!(bytes, instruction_key_bytes(&run_of("COPY --link a /b")));
        assert_eq!(Some(&bytes), link("USER 1000\nCOPY --link a /b").as_ref());
        let variants = [
            "COPY --link a /b",
            "COPY --link a /c",
            "WORKDIR /v\nCOPY --link a c",
            "WORKDIR /w\nCOPY --link a c",
            "COPY --link x /b",
            "COPY --link --chown=1 a /b",
            "COPY --link --chown=1:2 a /b",
            "COPY --link --from=s a /b",
            "COPY --link --from=alpine a /b",
            "COPY --link --parents a /b",
            "COPY --link --exclude=x a /b",
            "COPY --link <<EOF /b\nhi\nEOF",
            "ADD --link a /b",
            "ADD --link --unpack=false a /b",
        ];
        let mut seen = HashMap::new();
        for v in variants {
            let bytes = link(v).unwrap_or_else(|| panic!("{v} is linked"));
            if let Some(other) = seen.insert(bytes, v) {
                panic!("{v:?} and {other:?} have the same layer bytes");
            }
        }
    }

    /// The layer bytes of a linked step, computed once (see `golden_keys`).
    #[test]
    fn golden_link_layer_keys() {
        let golden = [
            (
                "COPY --link app /app",
                "ce1da4cc1b083a69a7b8fb3581cf0f538fe0cbe9504669d3ad80094ad6a02d95",
            ),
            (
                "COPY --link --chown=1:2 --from=s a /b",
                "5fba16ed654559621b8930153ae1d6a6472ed0494318bd930a717c2b9ff220a7",
            ),
        ];
        let got: Vec<(&str, String)> = golden
            .iter()
            .map(|(t, _)| {
                let bytes = link_layer_key_bytes(&run_of(t)).unwrap();
                (*t, ossb_protocol::Digest::of(&bytes).hex())
            })
            .collect();
        let want: Vec<(&str, String)> = golden.iter().map(|(t, k)| (*t, k.to_string())).collect();
        assert_eq!(got, want);
    }

    /// The keys of a few steps, computed once: a change of the encoding (which would miss every
    /// cache there is) fails here until [`KEY_VERSION`] and these are updated on purpose.
    #[test]
    fn golden_keys() {
        let golden = [
            (
                "RUN make",
                "e6cd567a5937afb893e050f8b96ec9c93fb9c14b7c45893c0db3e16ac7003208",
            ),
            (
                "COPY --from=s --chmod=644 a /b",
                "68ebbe92e096ba9b82efb451adce1021bd01aac5ba5554336d0ee307b07da8d7",
            ),
            (
                "ENV A=1 B=2",
                "32626060b98f6ac0a30907642d48b5d966d6a20337893b6d218af3676f75f098",
            ),
            (
                "HEALTHCHECK --interval=5s --retries=3 CMD a",
                "6524376701bf2b9059590aa277bc0d41d20c09c95823351ee7550455610adb46",
            ),
        ];
        let got: Vec<(&str, String)> = golden.iter().map(|(t, _)| (*t, hex(&run_of(t)))).collect();
        let want: Vec<(&str, String)> = golden.iter().map(|(t, k)| (*t, k.to_string())).collect();
        assert_eq!(got, want);
    }
}
