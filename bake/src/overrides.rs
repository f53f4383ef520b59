//! `--set pattern.key[.sub]=value` (and `+=` to append), matched against target names with
//! Go's path.Match rules and applied after the files are evaluated, as buildx does.

use std::collections::BTreeMap;

use crate::entries::{self, Attest, CacheEntry, ExportEntry, Secret, Ssh};
use crate::error::{Error, Result};
use crate::target::{normalize_attest, normalize_secret, normalize_ssh, Target};
use ossb_protocol::parse_bool;

/// One override for one target: the value(s) given, and whether they append.
#[derive(Debug, Clone, Default)]
pub(crate) struct Override {
    pub value: Option<String>,
    pub values: Vec<String>,
    pub append: bool,
}

const LIST_KEYS: &[&str] = &[
    "output",
    "cache-to",
    "cache-from",
    "tags",
    "platform",
    "secrets",
    "ssh",
    "attest",
    "entitlements",
    "network",
    "annotations",
];

/// Go's path.Match for target names (no `/` in names, so `*` matches anything).
pub(crate) fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    fn m(p: &[char], n: &[char], budget: &mut usize) -> bool {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| m(&p[1..], &n[i..], budget)),
            Some('?') => !n.is_empty() && m(&p[1..], &n[1..], budget),
            Some('[') => {
                let Some(end) = p.iter().position(|&c| c == ']') else {
                    return false;
                };
                let Some(&c) = n.first() else { return false };
                let class = &p[1..end];
                let (neg, class) = match class.first() {
                    Some('^') | Some('!') => (true, &class[1..]),
                    _ => (false, class),
                };
                let mut hit = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= class[i] <= c && c <= class[i + 2];
                        i += 3;
                    } else {
                        hit |= class[i] == c;
                        i += 1;
                    }
                }
                hit != neg && m(&p[end + 1..], &n[1..], budget)
            }
            Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && m(&p[2..], &n[1..], budget),
            Some(&c) => n.first() == Some(&c) && m(&p[1..], &n[1..], budget),
        }
    }
    let mut budget = 100_000;
    m(&p, &n, &mut budget)
}

/// Parses the overrides into per-target maps of key to override. `names` are the targets
/// the definition has; `env` answers a bare `--set t.args.X` (the value from the environment).
pub(crate) fn parse(
    overrides: &[String],
    names: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, BTreeMap<String, Override>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Override>> = BTreeMap::new();
    for o in overrides {
        let (lhs, value) = match o.split_once('=') {
            Some((l, v)) => (l, Some(v.to_string())),
            None => (o.as_str(), None),
        };
        let append = lhs.ends_with('+');
        let skey = lhs.trim_end_matches('+');
        let keys: Vec<&str> = skey.splitn(3, '.').collect();
        if keys.len() < 2 {
            return Err(Error::Override(format!("key {skey}, expected target.name")));
        }
        let pattern = keys[0];
        if value.is_none() && keys[1] != "args" && keys[1] != "no-cache" && keys[1] != "pull" {
            return Err(Error::Override(format!("{o}, expected target.name=value")));
        }
        let matched: Vec<String> = if names.iter().any(|n| n == pattern) {
            vec![pattern.to_string()]
        } else {
            names.iter().filter(|n| glob(pattern, n)).cloned().collect()
        };
        if matched.is_empty() {
            return Err(Error::Override(format!(
                "{o}: could not find any target matching '{pattern}'"
            )));
        }
        let okey = keys[1..].join(".");
        for name in matched {
            let entry = out
                .entry(name)
                .or_default()
                .entry(okey.clone())
                .or_default();
            match keys[1] {
                k if LIST_KEYS.contains(&k) => {
                    if let Some(v) = &value {
                        entry.append = append;
                        entry.values.push(v.clone());
                    }
                }
                "secret" => {
                    if keys.len() != 3 {
                        return Err(Error::Override(format!("key {lhs}, secret requires name")));
                    }
                    if append {
                        return Err(Error::Override(format!(
                            "key {lhs}, secret does not support append"
                        )));
                    }
                    entry.value = value.clone();
                }
                "args" | "contexts" | "labels" | "extra-hosts" => {
                    if keys.len() != 3 {
                        return Err(Error::Override(format!(
                            "key {lhs}, {} requires name",
                            keys[1]
                        )));
                    }
                    match &value {
                        Some(v) => entry.value = Some(v.clone()),
                        None if keys[1] == "args" => match env(keys[2]) {
                            Some(v) => entry.value = Some(v),
                            None => continue,
                        },
                        None => {}
                    }
                }
                _ => entry.value = value.clone().or(Some(String::new())),
            }
        }
    }
    Ok(out)
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Override(msg.into())
}

/// Applies one target's overrides, as buildx's `AddOverrides`.
pub(crate) fn apply(t: &mut Target, overrides: &BTreeMap<String, Override>) -> Result<()> {
    let mut secret_overrides: Vec<(String, String)> = Vec::new();
    for (key, o) in overrides {
        let value = o.value.clone().unwrap_or_default();
        let (head, sub) = match key.split_once('.') {
            Some((h, s)) => (h, Some(s)),
            None => (key.as_str(), None),
        };
        let need_sub = || {
            sub.map(String::from).ok_or_else(|| {
                bad(format!(
                    "invalid format for {head}, expecting {head}.<name>=<value>"
                ))
            })
        };
        let list = |cur: &mut Option<Vec<String>>| {
            if o.append {
                cur.get_or_insert_with(Vec::new)
                    .extend(o.values.iter().cloned());
            } else {
                *cur = Some(o.values.clone());
            }
        };
        match head {
            "context" => t.context = Some(value),
            "dockerfile" => t.dockerfile = Some(value),
            "args" => {
                t.args.insert(need_sub()?, Some(value));
            }
            "contexts" => {
                t.contexts
                    .get_or_insert_with(BTreeMap::new)
                    .insert(need_sub()?, value);
            }
            "labels" => {
                t.labels.insert(need_sub()?, Some(value));
            }
            "extra-hosts" => {
                t.extra_hosts.insert(need_sub()?, Some(value));
            }
            "tags" => list(&mut t.tags),
            "platform" => list(&mut t.platforms),
            "no-cache-filter" => list(&mut t.no_cache_filter),
            "ulimits" => list(&mut t.ulimits),
            "annotations" => t
                .annotations
                .get_or_insert_with(Vec::new)
                .extend(o.values.iter().cloned()),
            "entitlements" => t
                .entitlements
                .get_or_insert_with(Vec::new)
                .extend(o.values.iter().cloned()),
            "cache-from" | "cache-to" => {
                let mut parsed = Vec::new();
                for v in &o.values {
                    parsed.extend(CacheEntry::parse_all(v).map_err(bad)?);
                }
                let slot = if head == "cache-from" {
                    &mut t.cache_from
                } else {
                    &mut t.cache_to
                };
                let mut all = if o.append {
                    slot.take().unwrap_or_default()
                } else {
                    vec![]
                };
                all.extend(parsed);
                *slot = (!all.is_empty()).then(|| entries::remove_dupes(all));
            }
            "target" => t.target = Some(value),
            "call" => t.call = Some(value),
            "secret" => secret_overrides.push((need_sub()?, value)),
            "secrets" => {
                let parsed: Vec<Secret> = o
                    .values
                    .iter()
                    .filter(|v| !v.is_empty())
                    .map(|v| Secret::parse(v))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(bad)?;
                let mut all = if o.append {
                    t.secret.take().unwrap_or_default()
                } else {
                    vec![]
                };
                all.extend(parsed);
                t.secret = Some(normalize_secret(all));
            }
            "ssh" => {
                let parsed: Vec<Ssh> = o
                    .values
                    .iter()
                    .filter(|v| !v.is_empty())
                    .map(|v| Ssh::parse(v))
                    .collect();
                let mut all = if o.append {
                    t.ssh.take().unwrap_or_default()
                } else {
                    vec![]
                };
                all.extend(parsed);
                t.ssh = Some(normalize_ssh(all));
            }
            "output" => {
                let parsed: Vec<ExportEntry> = o
                    .values
                    .iter()
                    .filter(|v| !v.is_empty())
                    .map(|v| ExportEntry::parse(v))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(bad)?;
                let mut all = if o.append {
                    t.output.take().unwrap_or_default()
                } else {
                    vec![]
                };
                all.extend(parsed);
                t.output = Some(entries::remove_dupes(all));
            }
            "attest" => {
                let parsed: Vec<Attest> = o
                    .values
                    .iter()
                    .filter(|v| !v.is_empty())
                    .map(|v| Attest::parse(v))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(bad)?;
                let mut all = t.attest.take().unwrap_or_default();
                all.extend(parsed);
                t.attest = Some(normalize_attest(all));
            }
            "no-cache" | "pull" => {
                let b = if o.value.as_deref().is_none_or(str::is_empty) && o.values.is_empty() {
                    Some(true)
                } else {
                    parse_bool(&value)
                };
                let b =
                    b.ok_or_else(|| bad(format!("invalid value {value} for boolean key {head}")))?;
                if head == "pull" {
                    t.pull = Some(b);
                } else {
                    t.no_cache = Some(b);
                }
            }
            "shm-size" => t.shm_size = Some(value),
            "network" => t.network = o.values.last().cloned().or(Some(value)),
            "push" => {
                let push = parse_bool(&value)
                    .ok_or_else(|| bad(format!("invalid value {value} for boolean key push")))?;
                t.output = Some(set_push(t.output.take().unwrap_or_default(), push));
            }
            "load" => {
                let load = parse_bool(&value)
                    .ok_or_else(|| bad(format!("invalid value {value} for boolean key load")))?;
                t.output = Some(set_load(t.output.take().unwrap_or_default(), load));
            }
            other => return Err(bad(format!("unknown key: {other}"))),
        }
    }
    for (id, value) in secret_overrides {
        let next = Secret::parse(&value).map_err(bad)?;
        let Some(s) = t
            .secret
            .as_mut()
            .and_then(|l| l.iter_mut().find(|s| s.id == id))
        else {
            return Err(bad(format!(
                "secret {id:?} must be declared before it can be overridden"
            )));
        };
        if !next.id.is_empty() && next.id != id {
            return Err(bad(format!(
                "secret override id {:?} does not match declared secret {id:?}",
                next.id
            )));
        }
        s.env = next.env;
        s.src = next.src;
    }
    Ok(())
}

fn set_push(mut outputs: Vec<ExportEntry>, push: bool) -> Vec<ExportEntry> {
    if !push {
        outputs.retain(|o| o.kind != "registry");
        for o in outputs.iter_mut().filter(|o| o.kind == "image") {
            o.attrs.insert("push".into(), "false".into());
        }
        return outputs;
    }
    let only_docker = outputs.iter().all(|o| o.kind == "docker");
    for o in outputs.iter_mut().filter(|o| o.kind == "image") {
        o.attrs.insert("push".into(), "true".into());
    }
    if only_docker {
        outputs.push(ExportEntry {
            kind: "image".into(),
            dest: String::new(),
            attrs: [("push".to_string(), "true".to_string())].into(),
        });
    }
    outputs
}

fn set_load(mut outputs: Vec<ExportEntry>, load: bool) -> Vec<ExportEntry> {
    if !load {
        return outputs;
    }
    for o in &outputs {
        match o.kind.as_str() {
            "docker" if o.dest.is_empty() => return outputs,
            "docker" | "image" | "registry" | "oci" => {}
            _ => return outputs,
        }
    }
    outputs.push(ExportEntry {
        kind: "docker".into(),
        dest: String::new(),
        attrs: BTreeMap::new(),
    });
    outputs
}
