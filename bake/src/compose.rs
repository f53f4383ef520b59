//! Compose files as bake reads them: every service with a `build:` section is a target
//! (named after the service, dots made underscores), all in the `default` group, with the
//! `x-bake` extension adding what compose cannot say. `${VAR}` interpolation as compose.

use std::collections::BTreeMap;

use saphyr::{LoadableYamlNode, ScalarOwned, YamlOwned};

use crate::entries::{self, CacheEntry, ExportEntry, Secret, Ssh};
use crate::error::{Error, Location, Result};
use crate::lang::{Config, GroupDef};
use crate::target::{normalize_secret, normalize_ssh, Target};
use crate::value::{format_number, Value};

/// YAML nests at most this deep (anchors and hostile input included).
const MAX_YAML_DEPTH: usize = 64;

/// Reads a YAML document into a value, resolving `<<` merge keys.
fn yaml_value(y: &YamlOwned, depth: usize) -> std::result::Result<Value, String> {
    if depth > MAX_YAML_DEPTH {
        return Err(format!("YAML nests deeper than {MAX_YAML_DEPTH} levels"));
    }
    Ok(match y {
        YamlOwned::Value(s) => match s {
            ScalarOwned::Null => Value::Null,
            ScalarOwned::Boolean(b) => Value::Bool(*b),
            ScalarOwned::Integer(i) => Value::Number(*i as f64),
            ScalarOwned::FloatingPoint(f) => Value::Number(f.into_inner()),
            ScalarOwned::String(s) => Value::String(s.clone()),
        },
        YamlOwned::Representation(s, _, _) => Value::String(s.clone()),
        YamlOwned::Sequence(items) => Value::List(
            items
                .iter()
                .map(|i| yaml_value(i, depth + 1))
                .collect::<std::result::Result<_, _>>()?,
        ),
        YamlOwned::Mapping(m) => {
            let mut out = BTreeMap::new();
            let mut merged = BTreeMap::new();
            for (k, v) in m {
                let key = match yaml_value(k, depth + 1)? {
                    Value::String(s) => s,
                    other => other.to_str().unwrap_or_default(),
                };
                let value = yaml_value(v, depth + 1)?;
                if key == "<<" {
                    let sources = match value {
                        Value::List(l) => l,
                        other => vec![other],
                    };
                    for s in sources {
                        if let Value::Object(o) = s {
                            for (k, v) in o {
                                merged.entry(k).or_insert(v);
                            }
                        }
                    }
                } else {
                    out.insert(key, value);
                }
            }
            for (k, v) in merged {
                out.entry(k).or_insert(v);
            }
            Value::Object(out)
        }
        YamlOwned::Tagged(_, inner) => yaml_value(inner, depth + 1)?,
        YamlOwned::Alias(_) => return Err("YAML aliases are not supported here".into()),
        YamlOwned::BadValue => Value::Null,
    })
}

/// Compose's interpolation: `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
/// `${VAR:+alt}`, `${VAR+alt}`, `${VAR:?err}`, `${VAR?err}` and `$$` for a dollar.
pub(crate) fn interpolate(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match chars.get(i + 1) {
            Some('$') => {
                out.push('$');
                i += 2;
            }
            Some('{') => {
                let mut depth = 1;
                let mut j = i + 2;
                while j < chars.len() && depth > 0 {
                    match chars[j] {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    j += 1;
                }
                if depth != 0 {
                    return Err(format!("invalid interpolation format for {text:?}"));
                }
                let inner: String = chars[i + 2..j - 1].iter().collect();
                out.push_str(&substitute(&inner, env)?);
                i = j;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
                let mut j = i + 1;
                while j < chars.len() && (chars[j].is_ascii_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let name: String = chars[i + 1..j].iter().collect();
                out.push_str(&env(&name).unwrap_or_default());
                i = j;
            }
            _ => {
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

fn substitute(
    inner: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let end = inner
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(inner.len());
    let (name, rest) = inner.split_at(end);
    let value = env(name);
    let set_nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
    let (op, arg) = if let Some(a) = rest.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = rest.strip_prefix(":+") {
        (":+", a)
    } else if let Some(a) = rest.strip_prefix(":?") {
        (":?", a)
    } else if rest.is_empty() {
        ("", "")
    } else {
        (&rest[..1], &rest[1..])
    };
    let arg = || interpolate(arg, env);
    Ok(match op {
        "" => value.unwrap_or_default(),
        ":-" => {
            if set_nonempty {
                value.unwrap_or_default()
            } else {
                arg()?
            }
        }
        "-" => match value {
            Some(v) => v,
            None => arg()?,
        },
        ":+" => {
            if set_nonempty {
                arg()?
            } else {
                String::new()
            }
        }
        "+" => {
            if value.is_some() {
                arg()?
            } else {
                String::new()
            }
        }
        ":?" => {
            if set_nonempty {
                value.unwrap_or_default()
            } else {
                return Err(format!(
                    "required variable {name} is missing a value: {}",
                    arg()?
                ));
            }
        }
        "?" => match value {
            Some(v) => v,
            None => {
                return Err(format!(
                    "required variable {name} is missing a value: {}",
                    arg()?
                ))
            }
        },
        _ => return Err(format!("invalid interpolation format for ${{{inner}}}")),
    })
}

fn interpolate_all(
    v: Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<Value, String> {
    Ok(match v {
        Value::String(s) => Value::String(interpolate(&s, env)?),
        Value::List(l) => Value::List(
            l.into_iter()
                .map(|i| interpolate_all(i, env))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| Ok((k, interpolate_all(v, env)?)))
                .collect::<std::result::Result<_, String>>()?,
        ),
        other => other,
    })
}

/// Whether a YAML text looks like a compose file (a mapping with `services`).
pub(crate) fn parse(name: &str, text: &str) -> Result<Value> {
    let docs = YamlOwned::load_from_str(text).map_err(|e| Error::Syntax {
        at: Location {
            file: name.into(),
            line: e.marker().line(),
        },
        message: e.info().to_string(),
    })?;
    let doc = docs.first().ok_or_else(|| Error::Syntax {
        at: Location {
            file: name.into(),
            line: 0,
        },
        message: "empty compose file".into(),
    })?;
    yaml_value(doc, 0).map_err(|m| Error::Syntax {
        at: Location {
            file: name.into(),
            line: 0,
        },
        message: m,
    })
}

fn s(v: &Value) -> Option<String> {
    v.to_str()
}

/// A compose list of strings, or a single string split on whitespace (x-bake's rule).
fn string_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::List(l)) => l.iter().filter_map(s).collect(),
        Some(Value::String(one)) => one.split_whitespace().map(String::from).collect(),
        _ => vec![],
    }
}

/// A compose mapping, or a list of `KEY=VALUE` (a bare `KEY` has no value).
fn mapping(v: Option<&Value>) -> BTreeMap<String, Option<String>> {
    match v {
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    if v.is_null() {
                        None
                    } else {
                        s(v).or(Some(String::new()))
                    },
                )
            })
            .collect(),
        Some(Value::List(l)) => l
            .iter()
            .filter_map(s)
            .map(|item| match item.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (item, None),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn named_contexts(m: BTreeMap<String, Option<String>>) -> BTreeMap<String, String> {
    m.into_iter()
        .map(|(k, v)| {
            let v = v.unwrap_or_default();
            let v = match v.split_once(':') {
                Some(("service" | "target", t)) => format!("target:{}", t.replace('.', "_")),
                _ => v,
            };
            (k, v)
        })
        .collect()
}

fn canonical_attest(kind: &str, v: &str) -> String {
    match ossb_protocol::parse_bool(v) {
        Some(b) => format!("type={kind},disabled={}", !b),
        None => format!("type={kind},{v}"),
    }
}

/// Reads compose files (in order, later ones overriding services of earlier ones) into `config`.
pub(crate) fn load(
    files: &[(String, String)],
    env: &dyn Fn(&str) -> Option<String>,
    config: &mut Config,
) -> Result<()> {
    let mut services: BTreeMap<String, Value> = BTreeMap::new();
    let mut secrets: BTreeMap<String, Value> = BTreeMap::new();
    let mut first_file = String::new();
    for (name, text) in files {
        let at = Location {
            file: name.clone(),
            line: 0,
        };
        if first_file.is_empty() {
            first_file = name.clone();
        }
        let doc = parse(name, text)?;
        let doc = interpolate_all(doc, env).map_err(|m| Error::Eval {
            at: at.clone(),
            attr: "compose".into(),
            message: m,
        })?;
        let Value::Object(top) = doc else {
            return Err(Error::Syntax {
                at,
                message: "a compose file must be a mapping".into(),
            });
        };
        if let Some(Value::Object(svc)) = top.get("services") {
            for (k, v) in svc {
                merge_value(services.entry(k.clone()).or_insert(Value::Null), v.clone());
            }
        }
        if let Some(Value::Object(sec)) = top.get("secrets") {
            secrets.extend(sec.clone());
        }
    }
    let mut group = GroupDef {
        name: "default".into(),
        description: None,
        targets: vec![],
    };
    for (svc_name, svc) in &services {
        let Value::Object(svc) = svc else { continue };
        let Some(build) = svc.get("build") else {
            continue;
        };
        let name = svc_name.replace('.', "_");
        let at = Location {
            file: first_file.clone(),
            line: line_of(files, svc_name),
        };
        let t = service_target(&name, svc, build, &secrets, env).map_err(|m| Error::Eval {
            at: at.clone(),
            attr: format!("services.{svc_name}.build"),
            message: m,
        })?;
        group.targets.push(name);
        config.add_target(t, at);
    }
    config.groups.push((
        group,
        Location {
            file: first_file,
            line: 0,
        },
    ));
    Ok(())
}

/// Compose's file merging for the fields bake reads: mappings merge, other values replace.
fn merge_value(into: &mut Value, v: Value) {
    match (into, v) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge_value(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn line_of(files: &[(String, String)], service: &str) -> usize {
    let needle = format!("{service}:");
    files
        .first()
        .and_then(|(_, t)| t.lines().position(|l| l.trim_start().starts_with(&needle)))
        .map(|i| i + 1)
        .unwrap_or(0)
}

fn service_target(
    name: &str,
    svc: &BTreeMap<String, Value>,
    build: &Value,
    secrets: &BTreeMap<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<Target, String> {
    let b: BTreeMap<String, Value> = match build {
        Value::String(ctx) => [("context".to_string(), Value::String(ctx.clone()))].into(),
        Value::Object(o) => o.clone(),
        _ => BTreeMap::new(),
    };
    let get = |k: &str| b.get(k).filter(|v| !v.is_null());
    let nonempty = |k: &str| get(k).and_then(s).filter(|v| !v.is_empty());
    let mut t = Target {
        name: name.to_string(),
        ..Default::default()
    };
    t.context = nonempty("context");
    t.dockerfile = nonempty("dockerfile");
    t.dockerfile_inline = nonempty("dockerfile_inline");
    if let Some(c) = get("additional_contexts") {
        t.contexts = Some(named_contexts(mapping(Some(c))));
    }
    t.network = nonempty("network");
    t.target = nonempty("target");
    let tags = string_list(get("tags"));
    t.tags = (!tags.is_empty()).then_some(tags);
    let platforms = string_list(get("platforms"));
    t.platforms = (!platforms.is_empty()).then_some(platforms);
    t.labels = mapping(get("labels"));
    // A bare arg takes its value from the service's environment, then from the process's.
    let service_env = mapping(svc.get("environment"));
    t.args = mapping(get("args"))
        .into_iter()
        .filter_map(|(k, v)| {
            let v = v
                .or_else(|| service_env.get(&k).cloned().flatten())
                .or_else(|| env(&k));
            v.map(|v| (k, Some(v)))
        })
        .collect();
    let cache = |k: &str| -> std::result::Result<Option<Vec<CacheEntry>>, String> {
        let mut out = Vec::new();
        for e in string_list(get(k)) {
            out.extend(CacheEntry::parse_all(&e)?);
        }
        Ok((!out.is_empty()).then_some(out))
    };
    t.cache_from = cache("cache_from")?;
    t.cache_to = cache("cache_to")?;
    let mut ssh: Vec<Ssh> = match get("ssh") {
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| Ssh {
                id: k.clone(),
                paths: s(v).filter(|p| !p.is_empty()).into_iter().collect(),
            })
            .collect(),
        other => string_list(other).iter().map(|e| Ssh::parse(e)).collect(),
    };
    ssh.sort();
    t.ssh = (!ssh.is_empty()).then_some(ssh);
    let mut secs = Vec::new();
    if let Some(Value::List(l)) = get("secrets") {
        for item in l {
            let source = match item {
                Value::Object(o) => o.get("source").and_then(s).unwrap_or_default(),
                other => s(other).unwrap_or_default(),
            };
            let def = secrets.get(&source);
            if def.and_then(|d| match d {
                Value::Object(o) => o.get("external").and_then(Value::to_bool),
                _ => None,
            }) == Some(true)
            {
                return Err(format!("unsupported external secret {source}"));
            }
            let field = |k: &str| match def {
                Some(Value::Object(o)) => o.get(k).and_then(s).unwrap_or_default(),
                _ => String::new(),
            };
            secs.push(Secret {
                id: source.clone(),
                src: field("file"),
                env: field("environment"),
            });
        }
    }
    t.secret = (!secs.is_empty()).then_some(secs);
    let mut attests = Vec::new();
    for (key, kind) in [("sbom", "sbom"), ("provenance", "provenance")] {
        if let Some(v) = get(key).and_then(s).filter(|v| !v.is_empty()) {
            attests.push(entries::Attest::parse(&canonical_attest(kind, &v))?);
        }
    }
    t.attest = (!attests.is_empty()).then_some(attests);
    if get("no_cache").and_then(Value::to_bool) == Some(true) {
        t.no_cache = Some(true);
    }
    if get("pull").and_then(Value::to_bool) == Some(true) {
        t.pull = Some(true);
    }
    if let Some(v) = get("shm_size") {
        t.shm_size = match v {
            Value::Number(n) => Some(format_number(*n)),
            other => s(other),
        };
    }
    t.extra_hosts = mapping(get("extra_hosts"));
    if let Some(Value::Object(x)) = get("x-bake") {
        x_bake(&mut t, x)?;
    }
    if t.tags.as_ref().is_none_or(|v| v.is_empty()) {
        if let Some(image) = svc.get("image").and_then(s).filter(|i| !i.is_empty()) {
            t.tags = Some(vec![image]);
        }
    }
    Ok(t)
}

fn dedup_append(into: &mut Option<Vec<String>>, more: Vec<String>) {
    if more.is_empty() {
        return;
    }
    let l = into.get_or_insert_with(Vec::new);
    for m in more {
        if !l.contains(&m) {
            l.push(m);
        }
    }
}

/// The `x-bake` extension: bake attributes compose has no field for.
fn x_bake(t: &mut Target, x: &BTreeMap<String, Value>) -> std::result::Result<(), String> {
    dedup_append(&mut t.tags, string_list(x.get("tags")));
    for (key, slot) in [
        ("cache-from", &mut t.cache_from),
        ("cache-to", &mut t.cache_to),
    ] {
        let mut more = Vec::new();
        for e in string_list(x.get(key)) {
            more.extend(CacheEntry::parse_all(&e)?);
        }
        if !more.is_empty() {
            let mut all = slot.take().unwrap_or_default();
            all.extend(more);
            *slot = Some(entries::remove_dupes(all));
        }
    }
    let secrets: Vec<Secret> = string_list(x.get("secret"))
        .iter()
        .map(|e| Secret::parse(e))
        .collect::<std::result::Result<_, _>>()?;
    if !secrets.is_empty() {
        let mut all = t.secret.take().unwrap_or_default();
        all.extend(secrets);
        t.secret = Some(normalize_secret(all));
    }
    let ssh: Vec<Ssh> = string_list(x.get("ssh"))
        .iter()
        .map(|e| Ssh::parse(e))
        .collect();
    if !ssh.is_empty() {
        let mut all = t.ssh.take().unwrap_or_default();
        all.extend(ssh);
        let mut all = normalize_ssh(all);
        all.sort();
        t.ssh = Some(all);
    }
    dedup_append(&mut t.platforms, string_list(x.get("platforms")));
    let outputs: Vec<ExportEntry> = string_list(x.get("output"))
        .iter()
        .map(|e| ExportEntry::parse(e))
        .collect::<std::result::Result<_, _>>()?;
    if !outputs.is_empty() {
        let mut all = t.output.take().unwrap_or_default();
        all.extend(outputs);
        t.output = Some(entries::remove_dupes(all));
    }
    if let Some(p) = x.get("pull").and_then(Value::to_bool) {
        t.pull = Some(p);
    }
    if let Some(p) = x.get("no-cache").and_then(Value::to_bool) {
        t.no_cache = Some(p);
    }
    dedup_append(
        &mut t.no_cache_filter,
        string_list(x.get("no-cache-filter")),
    );
    if let Some(c) = x.get("contexts") {
        let more = named_contexts(mapping(Some(c)));
        let ctx = t.contexts.get_or_insert_with(BTreeMap::new);
        for (k, v) in more {
            ctx.entry(k).or_insert(v);
        }
    }
    Ok(())
}
