//! `--print`: the resolved definition as buildx prints it: `{"group": ..., "target": ...}`,
//! Go's `json.MarshalIndent` with two spaces, struct fields in buildx's order, map keys
//! sorted, HTML characters escaped as Go's encoder does, `${`/`%{` re-escaped where buildx
//! re-escapes them (args, labels, annotations, dockerfile-inline, extra-hosts).

use crate::entries;
use crate::{Resolved, Target};
use ossb_protocol::go_json_string;

enum J {
    Str(String),
    Bool(bool),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
    Raw(serde_json::Value),
}

fn esc(s: &str) -> String {
    s.replace("${", "$${").replace("%{", "%%{")
}

fn strs(v: &[String], escape: bool) -> J {
    J::Arr(
        v.iter()
            .map(|s| J::Str(if escape { esc(s) } else { s.clone() }))
            .collect(),
    )
}

fn target_json(t: &Target) -> J {
    let mut o: Vec<(String, J)> = Vec::new();
    let mut put = |k: &str, v: J| o.push((k.to_string(), v));
    let nonempty = |v: &Option<Vec<String>>| v.as_ref().filter(|l| !l.is_empty()).cloned();
    if let Some(d) = t.description.as_ref().filter(|d| !d.is_empty()) {
        put("description", J::Str(d.clone()));
    }
    if let Some(a) = nonempty(&t.annotations) {
        put("annotations", strs(&a, true));
    }
    if let Some(a) = t.attest.as_ref().filter(|l| !l.is_empty()) {
        put("attest", J::Raw(entries::attest_json(a)));
    }
    if let Some(c) = &t.context {
        put("context", J::Str(c.clone()));
    }
    if let Some(c) = t.contexts.as_ref().filter(|c| !c.is_empty()) {
        put(
            "contexts",
            J::Obj(
                c.iter()
                    .map(|(k, v)| (k.clone(), J::Str(v.clone())))
                    .collect(),
            ),
        );
    }
    if let Some(d) = &t.dockerfile {
        put("dockerfile", J::Str(d.clone()));
    }
    if let Some(d) = &t.dockerfile_inline {
        put("dockerfile-inline", J::Str(esc(d)));
    }
    let map = |m: &std::collections::BTreeMap<String, Option<String>>| {
        J::Obj(
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_ref()
                            .map(|s| J::Str(esc(s)))
                            .unwrap_or(J::Raw(serde_json::Value::Null)),
                    )
                })
                .collect(),
        )
    };
    if !t.args.is_empty() {
        put("args", map(&t.args));
    }
    if !t.labels.is_empty() {
        put("labels", map(&t.labels));
    }
    if let Some(v) = nonempty(&t.tags) {
        put("tags", strs(&v, false));
    }
    if let Some(c) = t.cache_from.as_ref().filter(|l| !l.is_empty()) {
        put("cache-from", J::Raw(entries::cache_json(c)));
    }
    if let Some(c) = t.cache_to.as_ref().filter(|l| !l.is_empty()) {
        put("cache-to", J::Raw(entries::cache_json(c)));
    }
    if let Some(v) = &t.target {
        put("target", J::Str(v.clone()));
    }
    if let Some(s) = t.secret.as_ref().filter(|l| !l.is_empty()) {
        put("secret", J::Raw(entries::secret_json(s)));
    }
    if let Some(s) = t.ssh.as_ref().filter(|l| !l.is_empty()) {
        put("ssh", J::Raw(entries::ssh_json(s)));
    }
    if let Some(v) = nonempty(&t.platforms) {
        put("platforms", strs(&v, false));
    }
    if let Some(out) = t.output.as_ref().filter(|l| !l.is_empty()) {
        put("output", J::Raw(entries::export_json(out)));
    }
    if let Some(b) = t.pull {
        put("pull", J::Bool(b));
    }
    if let Some(b) = t.no_cache {
        put("no-cache", J::Bool(b));
    }
    if let Some(n) = &t.network {
        put("network", J::Str(n.clone()));
    }
    if let Some(v) = nonempty(&t.no_cache_filter) {
        put("no-cache-filter", strs(&v, false));
    }
    if let Some(v) = &t.shm_size {
        put("shm-size", J::Str(v.clone()));
    }
    if let Some(v) = nonempty(&t.ulimits) {
        put("ulimits", strs(&v, false));
    }
    if let Some(v) = &t.call {
        put("call", J::Str(v.clone()));
    }
    if let Some(v) = nonempty(&t.entitlements) {
        put("entitlements", strs(&v, false));
    }
    if !t.extra_hosts.is_empty() {
        put("extra-hosts", map(&t.extra_hosts));
    }
    J::Obj(o)
}

/// The resolved definition as `docker buildx bake --print` prints it (with the final newline).
pub fn print_json(r: &Resolved) -> String {
    let mut top = Vec::new();
    if !r.groups.is_empty() {
        let groups = r
            .groups
            .iter()
            .map(|(name, g)| {
                let mut o = Vec::new();
                if let Some(d) = g.description.as_ref().filter(|d| !d.is_empty()) {
                    o.push(("description".to_string(), J::Str(d.clone())));
                }
                o.push(("targets".to_string(), strs(&g.targets, false)));
                (name.clone(), J::Obj(o))
            })
            .collect();
        top.push(("group".to_string(), J::Obj(groups)));
    }
    top.push((
        "target".to_string(),
        J::Obj(
            r.targets
                .iter()
                .map(|(n, t)| (n.clone(), target_json(t)))
                .collect(),
        ),
    ));
    let mut out = String::new();
    write(&mut out, &J::Obj(top), 0);
    out.push('\n');
    out
}

fn raw(v: &serde_json::Value) -> J {
    match v {
        serde_json::Value::String(s) => J::Str(s.clone()),
        serde_json::Value::Bool(b) => J::Bool(*b),
        serde_json::Value::Array(a) => J::Arr(a.iter().map(raw).collect()),
        // serde_json's map (no preserve_order) iterates sorted, as Go sorts map keys.
        serde_json::Value::Object(o) => {
            J::Obj(o.iter().map(|(k, v)| (k.clone(), raw(v))).collect())
        }
        other => J::Raw(other.clone()),
    }
}

fn write(out: &mut String, j: &J, indent: usize) {
    let pad = |n: usize| "  ".repeat(n);
    match j {
        J::Str(s) => go_json_string(out, s),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Raw(serde_json::Value::Array(_))
        | J::Raw(serde_json::Value::Object(_))
        | J::Raw(serde_json::Value::String(_)) => {
            if let J::Raw(v) = j {
                write(out, &raw(v), indent)
            }
        }
        J::Raw(v) => out.push_str(&v.to_string()),
        J::Arr(items) if items.is_empty() => out.push_str("[]"),
        J::Arr(items) => {
            out.push_str("[\n");
            for (i, item) in items.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                write(out, item, indent + 1);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        J::Obj(items) if items.is_empty() => out.push_str("{}"),
        J::Obj(items) => {
            out.push_str("{\n");
            for (i, (k, v)) in items.iter().enumerate() {
                out.push_str(&pad(indent + 1));
                go_json_string(out, k);
                out.push_str(": ");
                write(out, v, indent + 1);
                if i + 1 < items.len() {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
    }
}
