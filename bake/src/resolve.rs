//! From a definition to the targets asked for: group expansion, `inherits` (in order, with
//! cycles reported), `--set` overrides, defaults (`context` ".", `dockerfile` "Dockerfile"),
//! the synthesized `default` group, and `target:NAME` contexts pulled in as linked targets.

use std::collections::BTreeMap;

use crate::error::{Error, Location, LocationPrefix, Result};
use crate::lang::{self, Config, Inputs};
use crate::overrides::{self, Override};
use crate::stdlib::Clock;
use crate::target::Target;
use crate::{compose, Definition, FileKind, Group, Resolved};

/// Everything resolution reads besides the files.
pub struct Request<'a> {
    /// Targets or groups asked for (glob patterns allowed); empty means `default`.
    pub targets: &'a [String],
    /// `--set` overrides, in order.
    pub overrides: &'a [String],
    /// The environment (and `--var`s, which the caller lays over it).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// Built-in variables (`BAKE_CMD_CONTEXT`, `BAKE_LOCAL_PLATFORM`).
    pub builtins: BTreeMap<String, String>,
    /// The clock and home directory the functions see.
    pub clock: Clock,
}

pub(crate) fn config(def: &Definition, req: &Request<'_>) -> Result<Config> {
    let mut config = Config::default();
    let compose_files: Vec<(String, String)> = def
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Compose)
        .map(|f| (f.name.clone(), f.text.clone()))
        .collect();
    if !compose_files.is_empty() {
        compose::load(&compose_files, req.env, &mut config)?;
    }
    let bodies: Vec<_> = def.files.iter().filter_map(|f| f.body.clone()).collect();
    if !bodies.is_empty() {
        let inputs = Inputs {
            env: req.env,
            builtins: &req.builtins,
            clock: &req.clock,
        };
        lang::evaluate(&bodies, &inputs, &mut config)?;
    }
    for (g, _) in &mut config.groups {
        let mut seen = std::collections::BTreeSet::new();
        g.targets.retain(|t| seen.insert(t.clone()));
    }
    Ok(config)
}

struct Resolver<'c> {
    config: &'c Config,
    overrides: BTreeMap<String, BTreeMap<String, Override>>,
    done: BTreeMap<String, Target>,
}

impl Resolver<'_> {
    fn find(&self, name: &str) -> Option<&(Target, Location)> {
        self.config.targets.iter().find(|(t, _)| t.name == name)
    }

    /// A target with its parents merged in order, then its own attributes, then overrides.
    fn target(
        &mut self,
        name: &str,
        stack: &mut Vec<String>,
        from: Option<&Location>,
    ) -> Result<Target> {
        if let Some(t) = self.done.get(name) {
            return Ok(t.clone());
        }
        let Some((own, at)) = self.find(name).cloned() else {
            return Err(Error::UnknownTarget {
                at: LocationPrefix(from.cloned()),
                name: name.into(),
            });
        };
        if stack.iter().any(|s| s == name) {
            let mut chain = stack.clone();
            chain.push(name.to_string());
            return Err(Error::Cycle {
                at: LocationPrefix(Some(at)),
                message: format!("inherits cycle: {}", chain.join(" -> ")),
            });
        }
        if stack.len() > 64 {
            return Err(Error::Limit {
                at,
                message: "inherits nest deeper than 64 levels".into(),
            });
        }
        stack.push(name.to_string());
        let mut merged = Target::default();
        for parent in &own.inherits {
            let p = self.target(parent, stack, Some(&at))?;
            merged.merge(&p);
        }
        stack.pop();
        let mut t = Target::default();
        t.merge(&merged);
        t.merge(&own);
        t.name = name.to_string();
        if let Some(o) = self.overrides.get(name) {
            overrides::apply(&mut t, o)?;
        }
        t.normalize();
        self.done.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn finish(&mut self, name: &str) -> Result<Target> {
        let mut t = self.target(name, &mut Vec::new(), None)?;
        t.inherits.clear();
        if t.context.is_none() {
            t.context = Some(".".into());
        }
        if t.dockerfile.as_deref().is_none_or(str::is_empty) {
            t.dockerfile = Some("Dockerfile".into());
        }
        Ok(t)
    }

    /// buildx's group expansion: targets and the groups passed through, depth first.
    fn group(
        &self,
        name: &str,
        visited: &mut BTreeMap<String, (Vec<String>, Vec<String>)>,
    ) -> (Vec<String>, Vec<String>) {
        if let Some(v) = visited.get(name) {
            return v.clone();
        }
        let Some((g, _)) = self.config.groups.iter().find(|(g, _)| g.name == name) else {
            return (vec![name.to_string()], vec![]);
        };
        visited.insert(name.to_string(), (vec![], vec![]));
        let (mut targets, mut groups) = (Vec::new(), vec![name.to_string()]);
        for t in &g.targets {
            let (tt, tg) = self.group(t, visited);
            if tt.is_empty() {
                targets.push(t.clone());
            } else {
                targets.extend(tt);
            }
            groups.extend(tg);
        }
        visited.insert(name.to_string(), (targets.clone(), groups.clone()));
        (targets, groups)
    }

    /// `target:NAME` contexts: the named target is built too (cache-only when not asked
    /// for), and a loop of such links is an error.
    fn links(
        &mut self,
        name: &str,
        targets: &mut BTreeMap<String, Target>,
        visited: &mut Vec<String>,
    ) -> Result<()> {
        visited.push(name.to_string());
        let contexts: Vec<String> = targets
            .get(name)
            .and_then(|t| t.contexts.as_ref())
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default();
        let at = self.find(name).map(|(_, a)| a.clone());
        for v in contexts {
            let Some(linked) = v.strip_prefix("target:") else {
                continue;
            };
            if linked == name {
                return Err(Error::Cycle {
                    at: LocationPrefix(at),
                    message: format!("target {linked} cannot link to itself"),
                });
            }
            if visited.iter().any(|x| x == linked) {
                return Err(Error::Cycle {
                    at: LocationPrefix(at),
                    message: format!(
                        "infinite loop from {name} to {linked} (through target: contexts)"
                    ),
                });
            }
            if !targets.contains_key(linked) {
                let mut t = match self.finish(linked) {
                    Err(Error::UnknownTarget { name, .. }) => {
                        return Err(Error::UnknownTarget {
                            at: LocationPrefix(at),
                            name,
                        })
                    }
                    other => other?,
                };
                t.output = Some(vec![crate::entries::ExportEntry {
                    kind: "cacheonly".into(),
                    dest: String::new(),
                    attrs: BTreeMap::new(),
                }]);
                targets.insert(linked.to_string(), t);
            }
            if visited.len() > 64 {
                return Err(Error::Limit {
                    at: at.clone().unwrap_or_default(),
                    message: "target: contexts nest deeper than 64".into(),
                });
            }
            self.links(linked, targets, visited)?;
            visited.pop();
            let (lp, lent) = {
                let l = &targets[linked];
                (
                    l.platforms.clone().unwrap_or_default(),
                    l.entitlements.clone().unwrap_or_default(),
                )
            };
            let t = targets.get_mut(name).expect("linking target is present");
            for e in lent {
                let ents = t.entitlements.get_or_insert_with(Vec::new);
                if !ents.contains(&e) {
                    ents.push(e);
                }
            }
            let tp = t.platforms.clone().unwrap_or_default();
            if tp.len() > 1 && lp.len() > 1 && !tp.iter().all(|p| lp.contains(p)) {
                return Err(Error::Eval {
                    at: at.clone().unwrap_or_default(),
                    attr: format!("target \"{name}\".contexts"),
                    message: format!("target {linked} can't be used by {name} because its platforms {lp:?} are not a subset of {tp:?}"),
                });
            }
        }
        Ok(())
    }
}

/// Go's path.Match metacharacters: a name with one is a pattern.
fn is_pattern(s: &str) -> bool {
    s.contains(['*', '?', '[', ']'])
}

pub(crate) fn resolve(def: &Definition, req: &Request<'_>) -> Result<Resolved> {
    let config = config(def, req)?;
    let asked: Vec<String> = if req.targets.is_empty() {
        vec!["default".into()]
    } else {
        req.targets.iter().map(|t| t.replace('.', "_")).collect()
    };
    let mut names: Vec<String> = Vec::new();
    for a in &asked {
        if !is_pattern(a) {
            names.push(a.clone());
            continue;
        }
        let before = names.len();
        names.extend(
            config
                .groups
                .iter()
                .map(|(g, _)| &g.name)
                .filter(|n| overrides::glob(a, n))
                .cloned(),
        );
        names.extend(
            config
                .targets
                .iter()
                .map(|(t, _)| &t.name)
                .filter(|n| overrides::glob(a, n))
                .cloned(),
        );
        if names.len() == before {
            return Err(Error::UnknownTarget {
                at: LocationPrefix(None),
                name: format!("matching {a:?}"),
            });
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));

    let all: Vec<String> = config.targets.iter().map(|(t, _)| t.name.clone()).collect();
    let mut r = Resolver {
        config: &config,
        overrides: overrides::parse(req.overrides, &all, req.env)?,
        done: BTreeMap::new(),
    };
    let mut targets: BTreeMap<String, Target> = BTreeMap::new();
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for n in &names {
        let (ts, gs) = r.group(n, &mut BTreeMap::new());
        for t in ts {
            if let std::collections::btree_map::Entry::Vacant(slot) = targets.entry(t) {
                let resolved = r.finish(slot.key())?;
                slot.insert(resolved);
            }
        }
        for g in gs {
            if let Some((def, _)) = config.groups.iter().find(|(x, _)| x.name == g) {
                groups.insert(
                    g,
                    Group {
                        description: def.description.clone(),
                        targets: def.targets.clone(),
                    },
                );
            }
        }
    }
    for n in &names {
        if n == "default" && groups.contains_key("default") {
            continue;
        }
        groups
            .entry("default".into())
            .or_default()
            .targets
            .push(n.clone());
    }
    if let Some(g) = groups.get_mut("default") {
        let mut seen = std::collections::BTreeSet::new();
        g.targets.retain(|t| seen.insert(t.clone()));
        g.targets.sort();
    }
    let order: Vec<String> = targets.keys().cloned().collect();
    for name in order {
        r.links(&name, &mut targets, &mut Vec::new())?;
    }
    Ok(Resolved { groups, targets })
}
