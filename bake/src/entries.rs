//! The structured list attributes (cache-from/-to, output, secret, ssh, attest): parsed
//! from buildx's CSV spellings or from objects, deduplicated and printed as buildx does.

use std::collections::BTreeMap;

use crate::types::csv_fields;
use crate::value::Value;
use ossb_protocol::parse_bool;

/// A `cache-from`/`cache-to` entry: `type=registry,ref=...`, or a bare reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub kind: String,
    pub attrs: BTreeMap<String, String>,
}

/// An `output` entry: `type=local,dest=out`, or a bare directory (`-` for a tar on stdout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub kind: String,
    pub dest: String,
    pub attrs: BTreeMap<String, String>,
}

/// A `secret` entry: `id=...,src=...` or `id=...,env=...`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Secret {
    pub id: String,
    pub src: String,
    pub env: String,
}

/// An `ssh` entry: `default` or `id=path[,path]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ssh {
    pub id: String,
    pub paths: Vec<String>,
}

/// An `attest` entry: `type=sbom,...`, `type=provenance,mode=max`, `disabled=true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    pub kind: String,
    pub disabled: bool,
    pub attrs: BTreeMap<String, String>,
}

fn kv(field: &str) -> Result<(String, String), String> {
    field
        .split_once('=')
        .map(|(k, v)| (k.trim().to_lowercase(), v.to_string()))
        .ok_or_else(|| format!("invalid value {field}"))
}

impl CacheEntry {
    /// Parses one CSV entry; a value without `=` is a list of registry references.
    pub fn parse_all(text: &str) -> Result<Vec<CacheEntry>, String> {
        if text.is_empty() {
            return Ok(vec![]);
        }
        if !text.contains('=') {
            return Ok(csv_fields(text, ',')
                .into_iter()
                .map(|r| CacheEntry {
                    kind: "registry".into(),
                    attrs: [("ref".to_string(), r)].into(),
                })
                .collect());
        }
        let mut e = CacheEntry {
            kind: String::new(),
            attrs: BTreeMap::new(),
        };
        for f in csv_fields(text, ',') {
            let (k, v) = kv(&f)?;
            if k == "type" {
                e.kind = v;
            } else {
                e.attrs.insert(k, v);
            }
        }
        if e.kind.is_empty() {
            return Err(format!("type required for {text:?}"));
        }
        Ok(vec![e])
    }

    /// buildx's CSV spelling (a registry entry with only `ref` is the bare reference).
    pub fn to_csv(&self) -> String {
        if self.kind == "registry" && self.attrs.len() == 1 {
            if let Some(r) = self.attrs.get("ref") {
                return r.clone();
            }
        }
        csv(Some(("type", &self.kind)), None, &self.attrs)
    }

    fn json(&self) -> serde_json::Value {
        let mut m: BTreeMap<String, String> = self.attrs.clone();
        m.insert("type".into(), self.kind.clone());
        serde_json::to_value(m).unwrap_or_default()
    }
}

impl ExportEntry {
    pub fn parse(text: &str) -> Result<ExportEntry, String> {
        let fields = csv_fields(text, ',');
        let mut e = ExportEntry {
            kind: String::new(),
            dest: String::new(),
            attrs: BTreeMap::new(),
        };
        if fields.len() == 1 && fields[0] == text && !text.starts_with("type=") {
            e.kind = if text == "-" {
                "tar".into()
            } else {
                "local".into()
            };
            e.dest = text.to_string();
            return Ok(e);
        }
        for f in fields {
            let (k, v) = kv(&f)?;
            match k.as_str() {
                "type" => e.kind = v,
                "dest" => e.dest = v,
                _ => {
                    e.attrs.insert(k, v);
                }
            }
        }
        if e.kind.is_empty() {
            return Err("type is required for output".into());
        }
        Ok(e)
    }

    pub fn to_csv(&self) -> String {
        let dest = (!self.dest.is_empty()).then_some(("dest", self.dest.as_str()));
        csv(Some(("type", &self.kind)), dest, &self.attrs)
    }

    fn json(&self) -> serde_json::Value {
        let mut m = self.attrs.clone();
        m.insert("type".into(), self.kind.clone());
        if !self.dest.is_empty() {
            m.insert("dest".into(), self.dest.clone());
        }
        serde_json::to_value(m).unwrap_or_default()
    }
}

impl Secret {
    pub fn parse(text: &str) -> Result<Secret, String> {
        let mut s = Secret::default();
        let mut kind = String::new();
        for f in csv_fields(text, ',') {
            let (k, v) = f
                .split_once('=')
                .map(|(k, v)| (k.to_lowercase(), v.to_string()))
                .ok_or_else(|| format!("invalid field '{f}' must be a key=value pair"))?;
            match k.as_str() {
                "type" if v == "file" || v == "env" => kind = v,
                "type" => return Err(format!("unsupported secret type {v:?}")),
                "id" => s.id = v,
                "source" | "src" => s.src = v,
                "env" => s.env = v,
                _ => return Err(format!("unexpected key '{k}' in '{f}'")),
            }
        }
        if kind == "env" && s.env.is_empty() {
            s.env = std::mem::take(&mut s.src);
        }
        Ok(s)
    }

    pub fn to_csv(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in [("id", &self.id), ("src", &self.src), ("env", &self.env)] {
            if !v.is_empty() {
                parts.push(csv_pair(k, v));
            }
        }
        parts.join(",")
    }

    fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (k, v) in [("id", &self.id), ("src", &self.src), ("env", &self.env)] {
            if !v.is_empty() {
                m.insert(k.into(), v.clone().into());
            }
        }
        serde_json::Value::Object(m)
    }
}

impl Ssh {
    pub fn parse(text: &str) -> Ssh {
        match text.split_once('=') {
            Some((id, paths)) => Ssh {
                id: id.into(),
                paths: paths.split(',').map(String::from).collect(),
            },
            None => Ssh {
                id: text.into(),
                paths: vec![],
            },
        }
    }

    pub fn to_csv(&self) -> String {
        if self.paths.is_empty() {
            self.id.clone()
        } else {
            csv_pair(&self.id, &self.paths.join(","))
        }
    }

    fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        if !self.id.is_empty() {
            m.insert("id".into(), self.id.clone().into());
        }
        if !self.paths.is_empty() {
            m.insert("paths".into(), self.paths.clone().into());
        }
        serde_json::Value::Object(m)
    }
}

impl Attest {
    pub fn parse(text: &str) -> Result<Attest, String> {
        let mut a = Attest {
            kind: String::new(),
            disabled: false,
            attrs: BTreeMap::new(),
        };
        for f in csv_fields(text, ',') {
            let (k, v) = f
                .split_once('=')
                .ok_or_else(|| format!("invalid value {f}"))?;
            match k.trim().to_lowercase().as_str() {
                "type" => a.kind = v.to_string(),
                "disabled" => {
                    a.disabled = parse_bool(v).ok_or_else(|| format!("invalid value {f}"))?
                }
                _ => {
                    a.attrs.insert(k.to_string(), v.to_string());
                }
            }
        }
        if a.kind.is_empty() {
            return Err("attestation type not specified".into());
        }
        Ok(a)
    }

    pub fn to_csv(&self) -> String {
        let mut s = csv_pair("type", &self.kind);
        if self.disabled {
            s.push_str(",disabled=true");
        }
        for (k, v) in &self.attrs {
            s.push(',');
            s.push_str(&csv_pair(k, v));
        }
        s
    }

    fn json(&self) -> serde_json::Value {
        let mut m: BTreeMap<String, serde_json::Value> = self
            .attrs
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        m.insert("type".into(), self.kind.clone().into());
        if self.disabled {
            m.insert("disabled".into(), true.into());
        }
        serde_json::to_value(m).unwrap_or_default()
    }
}

fn csv_pair(k: &str, v: &str) -> String {
    let pair = format!("{k}={v}");
    if pair.contains(',') || pair.contains('"') {
        format!("\"{}\"", pair.replace('"', "\"\""))
    } else {
        pair
    }
}

fn csv(
    first: Option<(&str, &str)>,
    second: Option<(&str, &str)>,
    attrs: &BTreeMap<String, String>,
) -> String {
    let mut parts = Vec::new();
    for (k, v) in first.into_iter().chain(second) {
        if !v.is_empty() {
            parts.push(csv_pair(k, v));
        }
    }
    parts.extend(attrs.iter().map(|(k, v)| csv_pair(k, v)));
    parts.join(",")
}

/// JSON of a list of entries, as `--print` shows them.
pub(crate) fn cache_json(l: &[CacheEntry]) -> serde_json::Value {
    l.iter().map(CacheEntry::json).collect()
}
pub(crate) fn export_json(l: &[ExportEntry]) -> serde_json::Value {
    l.iter().map(ExportEntry::json).collect()
}
pub(crate) fn secret_json(l: &[Secret]) -> serde_json::Value {
    l.iter().map(Secret::json).collect()
}
pub(crate) fn ssh_json(l: &[Ssh]) -> serde_json::Value {
    l.iter().map(Ssh::json).collect()
}
pub(crate) fn attest_json(l: &[Attest]) -> serde_json::Value {
    l.iter().map(Attest::json).collect()
}

/// An object value's fields as strings (the object form of an entry).
fn fields(v: &Value) -> Result<BTreeMap<String, String>, String> {
    let Value::Object(o) = v else {
        return Err(format!(
            "an entry must be a string or an object, not {}",
            v.type_name()
        ));
    };
    o.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| {
            let s = match v {
                Value::List(items) => items
                    .iter()
                    .filter_map(Value::to_str)
                    .collect::<Vec<_>>()
                    .join(","),
                other => other
                    .to_str()
                    .ok_or_else(|| format!("{k} must be a string"))?,
            };
            Ok((k.clone(), s))
        })
        .collect()
}

/// A list attribute's elements; strings are parsed by `parse`, objects by `object`.
fn decode_list<T>(
    v: &Value,
    mut parse: impl FnMut(&str) -> Result<Vec<T>, String>,
    mut object: impl FnMut(BTreeMap<String, String>) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    let Value::List(items) = v else {
        return Err(format!("a list is required, not {}", v.type_name()));
    };
    let mut out = Vec::new();
    for item in items {
        match item {
            Value::Null => {}
            Value::Object(_) => out.push(object(fields(item)?)?),
            other => {
                let s = other
                    .to_str()
                    .ok_or("a list of strings or objects is required")?;
                out.extend(parse(&s)?);
            }
        }
    }
    Ok(out)
}

pub(crate) fn decode_cache(v: &Value) -> Result<Vec<CacheEntry>, String> {
    decode_list(v, CacheEntry::parse_all, |mut m| {
        let kind = m.remove("type").unwrap_or_default();
        if kind.is_empty() {
            return Err("type required for cache entry".into());
        }
        Ok(CacheEntry { kind, attrs: m })
    })
}

pub(crate) fn decode_exports(v: &Value) -> Result<Vec<ExportEntry>, String> {
    decode_list(
        v,
        |s| {
            if s.is_empty() {
                Ok(vec![])
            } else {
                ExportEntry::parse(s).map(|e| vec![e])
            }
        },
        |mut m| {
            let kind = m.remove("type").unwrap_or_default();
            let dest = m.remove("dest").unwrap_or_default();
            if kind.is_empty() {
                return Err("type is required for output".into());
            }
            Ok(ExportEntry {
                kind,
                dest,
                attrs: m,
            })
        },
    )
}

pub(crate) fn decode_secrets(v: &Value) -> Result<Vec<Secret>, String> {
    decode_list(
        v,
        |s| {
            if s.is_empty() {
                Ok(vec![])
            } else {
                Secret::parse(s).map(|e| vec![e])
            }
        },
        |m| {
            Ok(Secret {
                id: m.get("id").cloned().unwrap_or_default(),
                src: m
                    .get("src")
                    .or(m.get("source"))
                    .cloned()
                    .unwrap_or_default(),
                env: m.get("env").cloned().unwrap_or_default(),
            })
        },
    )
}

pub(crate) fn decode_ssh(v: &Value) -> Result<Vec<Ssh>, String> {
    decode_list(
        v,
        |s| {
            Ok(if s.is_empty() {
                vec![]
            } else {
                vec![Ssh::parse(s)]
            })
        },
        |m| {
            Ok(Ssh {
                id: m.get("id").cloned().unwrap_or_default(),
                paths: m
                    .get("paths")
                    .map(|p| p.split(',').map(String::from).collect())
                    .unwrap_or_default(),
            })
        },
    )
}

pub(crate) fn decode_attests(v: &Value) -> Result<Vec<Attest>, String> {
    decode_list(
        v,
        |s| {
            if s.is_empty() {
                Ok(vec![])
            } else {
                Attest::parse(s).map(|e| vec![e])
            }
        },
        |mut m| {
            let kind = m.remove("type").unwrap_or_default();
            if kind.is_empty() {
                return Err("attestation type not specified".into());
            }
            let disabled = match m.remove("disabled") {
                Some(d) => parse_bool(&d).ok_or("disabled must be a bool")?,
                None => false,
            };
            Ok(Attest {
                kind,
                disabled,
                attrs: m,
            })
        },
    )
}

/// buildx's removeDupes: walking backwards, a later equal entry is swapped with the last and
/// dropped, which is the order buildx prints.
pub(crate) fn remove_dupes<T: PartialEq>(mut s: Vec<T>) -> Vec<T> {
    if s.len() < 2 {
        return s;
    }
    let mut i = s.len() - 1;
    while i > 0 {
        i -= 1;
        let mut j = i + 1;
        while j < s.len() {
            if s[i] == s[j] {
                let last = s.len() - 1;
                s.swap(j, last);
                s.pop();
                break;
            }
            j += 1;
        }
    }
    s
}

/// Dedup by key, a later entry replacing an earlier one in place (secrets, ssh, attest).
pub(crate) fn dedup_by_key<T>(s: Vec<T>, key: impl Fn(&T) -> String) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for item in s {
        let k = key(&item);
        match seen.get(&k) {
            Some(&i) => out[i] = item,
            None => {
                seen.insert(k, out.len());
                out.push(item);
            }
        }
    }
    out
}
