//! A build target's typed attributes, how a block's values decode into them, and buildx's
//! rules for merging two definitions (inherits, repeated blocks, compose + HCL).

use std::collections::BTreeMap;

use crate::entries::{self, Attest, CacheEntry, ExportEntry, Secret, Ssh};
use crate::value::Value;

/// One target, as buildx keeps it. `None` means "not set here", which matters for merging:
/// a set list replaces (tags, platforms, output, cache-to) or extends (annotations, attest,
/// secret, ssh, cache-from, entitlements) what was inherited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    pub name: String,
    pub description: Option<String>,
    pub inherits: Vec<String>,
    pub annotations: Option<Vec<String>>,
    pub attest: Option<Vec<Attest>>,
    pub context: Option<String>,
    pub contexts: Option<BTreeMap<String, String>>,
    pub dockerfile: Option<String>,
    pub dockerfile_inline: Option<String>,
    /// Build args; a `None` value (an arg given as null) is skipped by merging.
    pub args: BTreeMap<String, Option<String>>,
    pub labels: BTreeMap<String, Option<String>>,
    pub tags: Option<Vec<String>>,
    pub cache_from: Option<Vec<CacheEntry>>,
    pub cache_to: Option<Vec<CacheEntry>>,
    pub target: Option<String>,
    pub secret: Option<Vec<Secret>>,
    pub ssh: Option<Vec<Ssh>>,
    pub platforms: Option<Vec<String>>,
    pub output: Option<Vec<ExportEntry>>,
    pub pull: Option<bool>,
    pub no_cache: Option<bool>,
    pub network: Option<String>,
    pub no_cache_filter: Option<Vec<String>>,
    pub shm_size: Option<String>,
    pub ulimits: Option<Vec<String>>,
    pub call: Option<String>,
    pub entitlements: Option<Vec<String>>,
    pub extra_hosts: BTreeMap<String, Option<String>>,
}

/// The attributes a target block may set (besides `matrix` and `name`).
pub(crate) const ATTRIBUTES: &[&str] = &[
    "description",
    "inherits",
    "annotations",
    "attest",
    "context",
    "contexts",
    "dockerfile",
    "dockerfile-inline",
    "args",
    "labels",
    "tags",
    "cache-from",
    "cache-to",
    "target",
    "secret",
    "ssh",
    "platforms",
    "output",
    "pull",
    "no-cache",
    "network",
    "no-cache-filter",
    "shm-size",
    "ulimits",
    "call",
    "entitlements",
    "extra-hosts",
];

fn string(v: &Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        other => other
            .to_str()
            .map(Some)
            .ok_or_else(|| format!("a string is required, not {}", other.type_name())),
    }
}

fn strings(v: &Value) -> Result<Option<Vec<String>>, String> {
    match v {
        Value::Null => Ok(None),
        Value::List(items) => Ok(Some(
            items
                .iter()
                .filter(|i| !i.is_null())
                .map(|i| {
                    i.to_str().ok_or_else(|| {
                        format!("a list of strings is required, found {}", i.type_name())
                    })
                })
                .collect::<Result<_, _>>()?,
        )),
        other => Err(format!(
            "a list of strings is required, not {}",
            other.type_name()
        )),
    }
}

fn string_map(v: &Value) -> Result<BTreeMap<String, Option<String>>, String> {
    match v {
        Value::Null => Ok(BTreeMap::new()),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Value::Null => None,
                    other => Some(other.to_str().ok_or_else(|| {
                        format!("{k}: a string is required, not {}", other.type_name())
                    })?),
                };
                Ok((k.clone(), s))
            })
            .collect(),
        other => Err(format!(
            "a map of strings is required, not {}",
            other.type_name()
        )),
    }
}

fn boolean(v: &Value) -> Result<Option<bool>, String> {
    match v {
        Value::Null => Ok(None),
        other => other
            .to_bool()
            .map(Some)
            .ok_or_else(|| format!("a bool is required, not {}", other.type_name())),
    }
}

fn opt<T>(
    v: &Value,
    f: impl Fn(&Value) -> Result<Vec<T>, String>,
) -> Result<Option<Vec<T>>, String> {
    if v.is_null() {
        Ok(None)
    } else {
        f(v).map(Some)
    }
}

impl Target {
    /// Sets one attribute from its evaluated value (as gohcl decodes a block).
    pub(crate) fn set(&mut self, attr: &str, v: &Value) -> Result<(), String> {
        match attr {
            "description" => self.description = string(v)?,
            "inherits" => self.inherits = strings(v)?.unwrap_or_default(),
            "annotations" => self.annotations = strings(v)?,
            "attest" => self.attest = opt(v, entries::decode_attests)?,
            "context" => self.context = string(v)?,
            "contexts" => {
                self.contexts = match v {
                    Value::Null => None,
                    _ => Some(
                        string_map(v)?
                            .into_iter()
                            .map(|(k, v)| (k, v.unwrap_or_default()))
                            .collect(),
                    ),
                }
            }
            "dockerfile" => self.dockerfile = string(v)?,
            "dockerfile-inline" => self.dockerfile_inline = string(v)?,
            "args" => self.args = string_map(v)?,
            "labels" => self.labels = string_map(v)?,
            "tags" => self.tags = strings(v)?,
            "cache-from" => self.cache_from = opt(v, entries::decode_cache)?,
            "cache-to" => self.cache_to = opt(v, entries::decode_cache)?,
            "target" => self.target = string(v)?,
            "secret" => self.secret = opt(v, entries::decode_secrets)?,
            "ssh" => self.ssh = opt(v, entries::decode_ssh)?,
            "platforms" => self.platforms = strings(v)?,
            "output" => self.output = opt(v, entries::decode_exports)?,
            "pull" => self.pull = boolean(v)?,
            "no-cache" => self.no_cache = boolean(v)?,
            "network" => self.network = string(v)?,
            "no-cache-filter" => self.no_cache_filter = strings(v)?,
            "shm-size" => self.shm_size = string(v)?,
            "ulimits" => self.ulimits = strings(v)?,
            "call" => self.call = string(v)?,
            "entitlements" => self.entitlements = strings(v)?,
            "extra-hosts" => self.extra_hosts = string_map(v)?,
            other => {
                return Err(format!(
                    "an argument named \"{other}\" is not expected here"
                ))
            }
        }
        Ok(())
    }

    /// Lays `t2` over this target, as buildx's `Target.Merge`.
    pub fn merge(&mut self, t2: &Target) {
        fn over<T: Clone>(a: &mut Option<T>, b: &Option<T>) {
            if b.is_some() {
                a.clone_from(b);
            }
        }
        fn append<T: Clone>(a: &mut Option<Vec<T>>, b: &Option<Vec<T>>) {
            if let Some(b) = b {
                a.get_or_insert_with(Vec::new).extend(b.iter().cloned());
            }
        }
        fn map(a: &mut BTreeMap<String, Option<String>>, b: &BTreeMap<String, Option<String>>) {
            for (k, v) in b {
                if v.is_some() {
                    a.insert(k.clone(), v.clone());
                }
            }
        }
        over(&mut self.context, &t2.context);
        over(&mut self.dockerfile, &t2.dockerfile);
        over(&mut self.dockerfile_inline, &t2.dockerfile_inline);
        map(&mut self.args, &t2.args);
        if let Some(c) = &t2.contexts {
            self.contexts
                .get_or_insert_with(BTreeMap::new)
                .extend(c.clone());
        }
        map(&mut self.labels, &t2.labels);
        over(&mut self.tags, &t2.tags);
        over(&mut self.target, &t2.target);
        over(&mut self.call, &t2.call);
        append(&mut self.annotations, &t2.annotations);
        if t2.attest.is_some() {
            append(&mut self.attest, &t2.attest);
            self.attest = self.attest.take().map(normalize_attest);
        }
        if t2.secret.is_some() {
            append(&mut self.secret, &t2.secret);
            self.secret = self.secret.take().map(normalize_secret);
        }
        if t2.ssh.is_some() {
            append(&mut self.ssh, &t2.ssh);
            self.ssh = self.ssh.take().map(normalize_ssh);
        }
        over(&mut self.platforms, &t2.platforms);
        if t2.cache_from.is_some() {
            append(&mut self.cache_from, &t2.cache_from);
            self.cache_from = self.cache_from.take().map(entries::remove_dupes);
        }
        over(&mut self.cache_to, &t2.cache_to);
        over(&mut self.output, &t2.output);
        over(&mut self.pull, &t2.pull);
        over(&mut self.no_cache, &t2.no_cache);
        over(&mut self.network, &t2.network);
        append(&mut self.no_cache_filter, &t2.no_cache_filter);
        over(&mut self.shm_size, &t2.shm_size);
        append(&mut self.ulimits, &t2.ulimits);
        if t2.description.as_deref().is_some_and(|d| !d.is_empty()) {
            self.description.clone_from(&t2.description);
        }
        append(&mut self.entitlements, &t2.entitlements);
        map(&mut self.extra_hosts, &t2.extra_hosts);
        self.inherits.extend(t2.inherits.iter().cloned());
    }

    /// buildx's `normalize`: duplicates and empty strings out, `network = "host"` implies
    /// the `network.host` entitlement, empty contexts dropped.
    pub(crate) fn normalize(&mut self) {
        fn dedup(v: &mut Option<Vec<String>>) {
            if let Some(l) = v {
                let mut seen = std::collections::BTreeSet::new();
                l.retain(|s| !s.is_empty() && seen.insert(s.clone()));
            }
        }
        dedup(&mut self.annotations);
        self.attest = self
            .attest
            .take()
            .map(normalize_attest)
            .filter(|l| !l.is_empty());
        dedup(&mut self.tags);
        self.secret = self
            .secret
            .take()
            .map(normalize_secret)
            .filter(|l| !l.is_empty());
        self.ssh = self.ssh.take().map(normalize_ssh).filter(|l| !l.is_empty());
        dedup(&mut self.platforms);
        self.cache_from = self
            .cache_from
            .take()
            .map(entries::remove_dupes)
            .filter(|l| !l.is_empty());
        self.cache_to = self
            .cache_to
            .take()
            .map(entries::remove_dupes)
            .filter(|l| !l.is_empty());
        self.output = self
            .output
            .take()
            .map(entries::remove_dupes)
            .filter(|l| !l.is_empty());
        dedup(&mut self.no_cache_filter);
        dedup(&mut self.ulimits);
        if self.network.as_deref() == Some("host") {
            self.entitlements
                .get_or_insert_with(Vec::new)
                .push("network.host".into());
        }
        dedup(&mut self.entitlements);
        if let Some(c) = &mut self.contexts {
            c.retain(|_, v| !v.is_empty());
            if c.is_empty() {
                self.contexts = None;
            }
        }
    }
}

pub(crate) fn normalize_attest(l: Vec<Attest>) -> Vec<Attest> {
    entries::dedup_by_key(l, |a| a.kind.clone())
}
pub(crate) fn normalize_secret(l: Vec<Secret>) -> Vec<Secret> {
    entries::dedup_by_key(l, |s| s.id.clone())
}
pub(crate) fn normalize_ssh(l: Vec<Ssh>) -> Vec<Ssh> {
    entries::dedup_by_key(l, |s| s.id.clone())
}
