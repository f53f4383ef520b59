//! The bake language over parsed HCL/JSON files: variables (defaults, types, environment
//! overrides, validations), top-level attributes, user functions, `target` and `group`
//! blocks with `matrix`/`name` expansion, and `target.NAME.ATTR` references. Everything is
//! evaluated lazily, on first use, with cycles reported instead of followed.

use std::collections::{BTreeMap, HashMap};

use hcl::edit::expr::Expression;

use crate::error::{Error, Location, Result};
use crate::eval::{Eval, Host, MAX_DEPTH};
use crate::stdlib::{self, Clock};
use crate::syntax::{Attr, Block, Body};
use crate::target::{Target, ATTRIBUTES};
use crate::types::{type_of, Type};
use crate::value::Value;

/// A matrix expands one block into at most this many targets.
pub(crate) const MAX_MATRIX: usize = 1024;

/// What evaluation reads from outside the files.
pub(crate) struct Inputs<'a> {
    pub env: &'a dyn Fn(&str) -> Option<String>,
    pub builtins: &'a BTreeMap<String, String>,
    pub clock: &'a Clock,
}

/// A group as the files define it.
#[derive(Debug, Clone)]
pub(crate) struct GroupDef {
    pub name: String,
    pub description: Option<String>,
    pub targets: Vec<String>,
}

/// The definitions of all files, evaluated: targets (one per name, repeated blocks merged in
/// order) and groups, each with where it was first defined.
#[derive(Debug, Default)]
pub(crate) struct Config {
    pub targets: Vec<(Target, Location)>,
    pub groups: Vec<(GroupDef, Location)>,
}

impl Config {
    /// Adds a target, merging it into an earlier one of the same name.
    pub fn add_target(&mut self, t: Target, at: Location) {
        match self.targets.iter_mut().find(|(x, _)| x.name == t.name) {
            Some((x, _)) => x.merge(&t),
            None => self.targets.push((t, at)),
        }
    }
}

enum Slot {
    Busy,
    Done(Value),
}

struct Instance<'a> {
    block: &'a Block,
    name: String,
    matrix: Vec<(String, Value)>,
}

struct Lang<'a> {
    inputs: &'a Inputs<'a>,
    vars: HashMap<&'a str, &'a Block>,
    attrs: HashMap<&'a str, &'a Attr>,
    funcs: HashMap<&'a str, &'a Block>,
    globals: HashMap<String, Slot>,
    instances: Vec<Instance<'a>>,
    groups: Vec<&'a Block>,
    attr_slots: HashMap<(usize, String), Slot>,
    /// The located error behind an evaluation failure, kept so the innermost place wins.
    failure: Option<Error>,
}

const BLOCK_KINDS: &[&str] = &["target", "group", "variable", "function"];

/// Evaluates HCL/JSON bodies (in file order) into a config.
pub(crate) fn evaluate(bodies: &[Body], inputs: &Inputs<'_>, config: &mut Config) -> Result<()> {
    let mut lang = Lang {
        inputs,
        vars: HashMap::new(),
        attrs: HashMap::new(),
        funcs: HashMap::new(),
        globals: HashMap::new(),
        instances: Vec::new(),
        groups: Vec::new(),
        attr_slots: HashMap::new(),
        failure: None,
    };
    let mut blocks: Vec<&Block> = Vec::new();
    for body in bodies {
        for a in &body.attrs {
            if inputs.builtins.contains_key(&a.name) || BLOCK_KINDS.contains(&a.name.as_str()) {
                continue;
            }
            lang.attrs.insert(&a.name, a);
        }
        for b in &body.blocks {
            match b.kind.as_str() {
                "variable" | "function" => {
                    let Some(name) = b.labels.first().filter(|_| b.labels.len() == 1) else {
                        return Err(eval_err(&b.at, &b.kind, "a block needs exactly one label"));
                    };
                    if inputs.builtins.contains_key(name) {
                        continue;
                    }
                    if b.kind == "variable" {
                        lang.vars.insert(name, b);
                    } else {
                        lang.funcs.insert(name, b);
                    }
                }
                "target" | "group" => {
                    if b.labels.len() != 1 {
                        return Err(eval_err(
                            &b.at,
                            &b.kind,
                            &format!("invalid block label: {:?}", b.labels),
                        ));
                    }
                    blocks.push(b);
                }
                other => {
                    return Err(eval_err(
                        &b.at,
                        other,
                        "blocks of this type are not expected here",
                    ));
                }
            }
        }
    }

    // Variables first, as buildx does: an unused variable with a bad default still fails.
    let mut names: Vec<&str> = lang.vars.keys().copied().collect();
    names.sort();
    for name in names {
        let at = lang.vars[name].at.clone();
        lang.global_at(name, 0, &at, &format!("variable \"{name}\""))?;
    }
    let mut fnames: Vec<&str> = lang.funcs.keys().copied().collect();
    fnames.sort();
    for name in fnames {
        lang.check_function(name)?;
    }

    // Names of every block (matrix expansion) before any block is evaluated, so references
    // to `target.NAME` see expanded names.
    let mut renamed: Vec<(String, Vec<String>)> = Vec::new();
    for b in &blocks {
        if b.kind == "group" {
            for bad in ["matrix", "name"] {
                if let Some(a) = b.body.attr(bad) {
                    return Err(eval_err(
                        &a.at,
                        bad,
                        &format!("{bad} is not supported for groups"),
                    ));
                }
            }
            lang.groups.push(b);
            continue;
        }
        let names = lang.expand(b)?;
        if !(names.len() == 1 && names[0] == b.labels[0]) {
            match renamed.iter_mut().find(|(n, _)| n == &b.labels[0]) {
                Some((_, v)) => v.extend(names),
                None => renamed.push((b.labels[0].clone(), names)),
            }
        }
    }

    for b in &blocks {
        if b.kind == "group" {
            let g = lang.group(b)?;
            match config.groups.iter_mut().find(|(x, _)| x.name == g.name) {
                Some(slot) => *slot = (g, b.at.clone()),
                None => config.groups.push((g, b.at.clone())),
            }
            continue;
        }
        let ids: Vec<usize> = (0..lang.instances.len())
            .filter(|&i| std::ptr::eq(lang.instances[i].block, *b))
            .collect();
        for i in ids {
            let t = lang.target(i)?;
            config.add_target(t, b.at.clone());
        }
    }

    for (old, mut names) in renamed {
        let mut seen = std::collections::BTreeSet::new();
        names.retain(|n| seen.insert(n.clone()));
        let at = config
            .targets
            .iter()
            .find(|(t, _)| names.contains(&t.name))
            .map(|(_, a)| a.clone());
        config.groups.push((
            GroupDef {
                name: old,
                description: None,
                targets: names,
            },
            at.unwrap_or_default(),
        ));
    }

    // Top-level attributes are evaluated even when unused, as buildx does.
    let mut anames: Vec<&str> = lang.attrs.keys().copied().collect();
    anames.sort();
    for name in anames {
        let at = lang.attrs[name].at.clone();
        lang.global_at(name, 0, &at, name)?;
    }
    Ok(())
}

fn eval_err(at: &Location, attr: &str, message: &str) -> Error {
    Error::Eval {
        at: at.clone(),
        attr: attr.to_string(),
        message: message.to_string(),
    }
}

const FAILED: &str = "\u{0}failed";

impl<'a> Lang<'a> {
    /// Evaluates `expr` at `at` (naming `what` in errors), with `locals` bound.
    fn eval_expr(
        &mut self,
        expr: &Expression,
        locals: Vec<(String, Value)>,
        depth: usize,
        at: &Location,
        what: &str,
    ) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(Error::Limit {
                at: at.clone(),
                message: format!("{what}: references nest deeper than {MAX_DEPTH}"),
            });
        }
        let r = Eval {
            host: self,
            locals,
            depth,
        }
        .expr(expr);
        r.map_err(|m| self.located(m, at, what))
    }

    fn located(&mut self, message: String, at: &Location, what: &str) -> Error {
        match self.failure.take() {
            Some(e) if message.contains(FAILED) => e,
            _ => eval_err(at, what, &message),
        }
    }

    /// A failure with a place: kept, and a marker handed up through the evaluator.
    fn fail(&mut self, e: Error) -> String {
        if self.failure.is_none() {
            self.failure = Some(e);
        }
        FAILED.to_string()
    }

    fn global_at(&mut self, name: &str, depth: usize, at: &Location, what: &str) -> Result<Value> {
        self.global(name, depth)
            .map_err(|m| self.located(m, at, what))
    }

    fn resolve_global(&mut self, name: &str, depth: usize) -> Result<Value> {
        if let Some(v) = self.inputs.builtins.get(name) {
            return Ok(Value::String(v.clone()));
        }
        if let Some(a) = self.attrs.get(name).copied() {
            return self.eval_expr(&a.expr, vec![], depth + 1, &a.at, name);
        }
        let Some(block) = self.vars.get(name).copied() else {
            return Err(Error::Eval {
                at: Location::default(),
                attr: name.into(),
                message: format!("unknown variable \"{name}\""),
            });
        };
        let what = format!("variable \"{name}\"");
        let body = &block.body;
        let ty = match body.attr("type") {
            Some(a) => Type::parse(&a.expr).map_err(|m| eval_err(&a.at, &what, &m))?,
            None => None,
        };
        let default = match body.attr("default") {
            Some(a) => {
                let v = self.eval_expr(&a.expr, vec![], depth + 1, &a.at, &what)?;
                Some(match &ty {
                    Some(t) => t.convert(v).map_err(|m| {
                        eval_err(
                            &a.at,
                            &what,
                            &format!(
                                "invalid type {} for variable {name} default value: {m}",
                                t.name()
                            ),
                        )
                    })?,
                    None => v,
                })
            }
            None => None,
        };
        let value = match self.env_override(name, ty.is_some()) {
            Some((text, json)) => {
                let conv = match (&ty, &default) {
                    (Some(t), _) => t.parse_override(name, &text, json),
                    (None, None) | (None, Some(Value::Null)) => Ok(Value::String(text)),
                    (None, Some(d)) => match type_of(d) {
                        Some(t) => t.parse_override(name, &text, false),
                        None => Err(format!(
                            "unsupported type {} for variable {name}",
                            d.type_name()
                        )),
                    },
                };
                conv.map_err(|m| eval_err(&block.at, &what, &m))?
            }
            None => match default {
                Some(v) => v,
                None if ty.is_some() => Value::Null,
                None => Value::String(String::new()),
            },
        };
        self.validate(name, block, &value, depth)?;
        Ok(value)
    }

    /// buildx's override lookup: `NAME`, or `NAME_JSON` when there is no plain one or the
    /// variable is typed (and `NAME_JSON` is not itself a variable).
    fn env_override(&self, name: &str, typed: bool) -> Option<(String, bool)> {
        let plain = (self.inputs.env)(name);
        if plain.is_none() || typed {
            let json_name = format!("{name}_JSON");
            if !self.vars.contains_key(json_name.as_str())
                && !self.inputs.builtins.contains_key(&json_name)
            {
                if let Some(j) = (self.inputs.env)(&json_name) {
                    return Some((j, true));
                }
            }
        }
        plain.map(|p| (p, false))
    }

    fn validate(&mut self, name: &str, block: &Block, value: &Value, depth: usize) -> Result<()> {
        for v in block.body.blocks.iter().filter(|b| b.kind == "validation") {
            let Some(cond) = v.body.attr("condition") else {
                continue;
            };
            let what = format!("variable \"{name}\" validation");
            // The variable's own value is bound while its rules run.
            let locals = vec![(name.to_string(), value.clone())];
            let ok = self.eval_expr(&cond.expr, locals.clone(), depth + 1, &cond.at, &what)?;
            match ok.to_bool() {
                Some(true) => {}
                Some(false) => {
                    let msg = match v.body.attr("error_message") {
                        Some(m) => self
                            .eval_expr(&m.expr, locals, depth + 1, &m.at, &what)?
                            .to_str()
                            .unwrap_or_else(|| {
                                "This check failed, but has an invalid error message.".into()
                            }),
                        None => "This check failed, but has an invalid error message.".into(),
                    };
                    return Err(eval_err(
                        &cond.at,
                        &what,
                        &format!("validation failed: {msg}"),
                    ));
                }
                None => {
                    return Err(eval_err(
                        &cond.at,
                        &what,
                        "condition must return true or false",
                    ))
                }
            }
        }
        Ok(())
    }

    fn func_params(&self, block: &Block) -> Result<(Vec<String>, Option<String>, &'a Attr)>
    where
        'a: 'a,
    {
        let name = &block.labels[0];
        let what = format!("function \"{name}\"");
        let ident = |e: &Expression| -> Option<String> {
            match e {
                Expression::Variable(v) => Some(v.as_str().to_string()),
                Expression::String(s) => Some(s.value().clone()),
                _ => None,
            }
        };
        let params = match block.body.attr("params") {
            None => {
                return Err(eval_err(
                    &block.at,
                    &what,
                    &format!("empty params not allowed for {name}"),
                ))
            }
            Some(a) => match &a.expr {
                Expression::Array(items) => items
                    .iter()
                    .map(|i| {
                        ident(i).ok_or_else(|| {
                            eval_err(&a.at, &what, "each parameter name must be an identifier")
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                _ => return Err(eval_err(&a.at, &what, "params must be a list of names")),
            },
        };
        let variadic = match block.body.attr("variadic_params") {
            None => None,
            Some(a) => Some(
                ident(&a.expr)
                    .ok_or_else(|| eval_err(&a.at, &what, "variadic_params must be a name"))?,
            ),
        };
        let Some(result) = self
            .funcs
            .get(name.as_str())
            .and_then(|b| b.body.attr("result"))
        else {
            return Err(eval_err(
                &block.at,
                &what,
                &format!("empty result not allowed for {name}"),
            ));
        };
        Ok((params, variadic, result))
    }

    fn check_function(&mut self, name: &str) -> Result<()> {
        let block = self.funcs[name];
        self.func_params(block).map(|_| ())
    }

    fn call_user(
        &mut self,
        name: &str,
        args: Vec<Value>,
        depth: usize,
    ) -> Option<std::result::Result<Value, String>> {
        let block = *self.funcs.get(name)?;
        let (params, variadic, result) = match self.func_params(block) {
            Ok(p) => p,
            Err(e) => return Some(Err(self.fail(e))),
        };
        let ok = if variadic.is_some() {
            args.len() >= params.len()
        } else {
            args.len() == params.len()
        };
        if !ok {
            return Some(Err(format!(
                "function \"{name}\" expects {}{} argument(s), got {}",
                if variadic.is_some() { "at least " } else { "" },
                params.len(),
                args.len()
            )));
        }
        let mut locals: Vec<(String, Value)> = Vec::new();
        let mut rest = args.into_iter();
        for p in &params {
            locals.push((p.clone(), rest.next().unwrap_or(Value::Null)));
        }
        if let Some(v) = variadic {
            locals.push((v, Value::List(rest.collect())));
        }
        let what = format!("function \"{name}\"");
        Some(
            self.eval_expr(&result.expr, locals, depth + 1, &result.at, &what)
                .map_err(|e| self.fail(e)),
        )
    }

    /// A target block's instances: one, or one per matrix combination, each with its name.
    fn expand(&mut self, b: &'a Block) -> Result<Vec<String>> {
        let label = b.labels[0].clone();
        let what = format!("target \"{label}\"");
        let mut combos: Vec<Vec<(String, Value)>> = vec![vec![]];
        if let Some(m) = b.body.attr("matrix") {
            let v = self.eval_expr(&m.expr, vec![], 0, &m.at, &format!("{what}.matrix"))?;
            let Value::Object(axes) = v else {
                return Err(eval_err(
                    &m.at,
                    &format!("{what}.matrix"),
                    "matrix must be a map",
                ));
            };
            for (key, values) in axes {
                let Value::List(values) = values else {
                    return Err(eval_err(
                        &m.at,
                        &format!("{what}.matrix"),
                        "matrix values must be a list",
                    ));
                };
                if values.is_empty() {
                    combos.clear();
                }
                if combos.len().saturating_mul(values.len()) > MAX_MATRIX {
                    return Err(Error::Limit {
                        at: m.at.clone(),
                        message: format!("{what}.matrix expands to more than {MAX_MATRIX} targets"),
                    });
                }
                let mut next = Vec::new();
                for v in &values {
                    for c in &combos {
                        let mut c2 = c.clone();
                        c2.push((key.clone(), v.clone()));
                        next.push(c2);
                    }
                }
                combos = next;
            }
        }
        let mut names = Vec::new();
        for combo in combos {
            let name = match b.body.attr("name") {
                Some(a) if b.body.attr("matrix").is_none() => {
                    return Err(eval_err(
                        &a.at,
                        &format!("{what}.name"),
                        "name requires matrix",
                    ));
                }
                Some(a) => {
                    let v =
                        self.eval_expr(&a.expr, combo.clone(), 0, &a.at, &format!("{what}.name"))?;
                    v.to_str().ok_or_else(|| {
                        eval_err(&a.at, &format!("{what}.name"), "name must be a string")
                    })?
                }
                None => label.clone(),
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(eval_err(
                    &b.at,
                    &what,
                    &format!("invalid name {name:?}: only \"[a-zA-Z0-9_-]+\" are allowed"),
                ));
            }
            if names.contains(&name) {
                return Err(eval_err(&b.at, &what, &format!("duplicate name {name:?}")));
            }
            names.push(name.clone());
            self.instances.push(Instance {
                block: b,
                name,
                matrix: combo,
            });
        }
        Ok(names)
    }

    fn instance_attr(&mut self, i: usize, attr: &str, depth: usize) -> Result<Value> {
        let key = (i, attr.to_string());
        match self.attr_slots.get(&key) {
            Some(Slot::Done(v)) => return Ok(v.clone()),
            Some(Slot::Busy) => {
                let inst = &self.instances[i];
                let at = inst
                    .block
                    .body
                    .attr(attr)
                    .map(|a| a.at.clone())
                    .unwrap_or_else(|| inst.block.at.clone());
                return Err(Error::Cycle {
                    at: crate::error::LocationPrefix(Some(at)),
                    message: format!(
                        "reference cycle not allowed for target.{}.{attr}",
                        inst.name
                    ),
                });
            }
            None => {}
        }
        let inst = &self.instances[i];
        let Some(a) = inst.block.body.attr(attr) else {
            return Ok(Value::Null);
        };
        let (locals, what) = (
            inst.matrix.clone(),
            format!("target \"{}\".{attr}", inst.name),
        );
        self.attr_slots.insert(key.clone(), Slot::Busy);
        let r = self.eval_expr(&a.expr, locals, depth + 1, &a.at, &what);
        match &r {
            Ok(v) => self.attr_slots.insert(key, Slot::Done(v.clone())),
            Err(_) => self.attr_slots.remove(&key),
        };
        r
    }

    fn target(&mut self, i: usize) -> Result<Target> {
        let block = self.instances[i].block;
        let mut t = Target {
            name: self.instances[i].name.clone(),
            ..Default::default()
        };
        if let Some(nested) = block.body.blocks.first() {
            return Err(eval_err(
                &nested.at,
                &nested.kind,
                "blocks are not expected in a target",
            ));
        }
        for a in &block.body.attrs {
            if a.name == "matrix" || a.name == "name" {
                continue;
            }
            let what = format!("target \"{}\".{}", t.name, a.name);
            if !ATTRIBUTES.contains(&a.name.as_str()) {
                return Err(eval_err(
                    &a.at,
                    &what,
                    &format!("an argument named \"{}\" is not expected here", a.name),
                ));
            }
            let v = self.instance_attr(i, &a.name, 0)?;
            t.set(&a.name, &v).map_err(|m| eval_err(&a.at, &what, &m))?;
        }
        Ok(t)
    }

    fn group(&mut self, b: &'a Block) -> Result<GroupDef> {
        let name = b.labels[0].clone();
        let mut g = GroupDef {
            name: name.clone(),
            description: None,
            targets: vec![],
        };
        for a in &b.body.attrs {
            let what = format!("group \"{name}\".{}", a.name);
            let v = self.eval_expr(&a.expr, vec![], 0, &a.at, &what)?;
            match a.name.as_str() {
                "targets" => {
                    let Value::List(items) = v else {
                        return Err(eval_err(&a.at, &what, "targets must be a list of strings"));
                    };
                    for item in items {
                        g.targets.push(item.to_str().ok_or_else(|| {
                            eval_err(&a.at, &what, "targets must be a list of strings")
                        })?);
                    }
                }
                "description" => g.description = v.to_str(),
                other => {
                    return Err(eval_err(
                        &a.at,
                        &what,
                        &format!("an argument named \"{other}\" is not expected here"),
                    ))
                }
            }
        }
        Ok(g)
    }
}

impl Host for Lang<'_> {
    fn global(&mut self, name: &str, depth: usize) -> std::result::Result<Value, String> {
        match self.globals.get(name) {
            Some(Slot::Done(v)) => return Ok(v.clone()),
            Some(Slot::Busy) => return Err(format!("variable cycle not allowed for {name}")),
            None => {}
        }
        if !self.inputs.builtins.contains_key(name)
            && !self.attrs.contains_key(name)
            && !self.vars.contains_key(name)
        {
            return Err(format!("unknown variable \"{name}\""));
        }
        self.globals.insert(name.to_string(), Slot::Busy);
        match self.resolve_global(name, depth) {
            Ok(v) => {
                self.globals.insert(name.to_string(), Slot::Done(v.clone()));
                Ok(v)
            }
            Err(e) => {
                self.globals.remove(name);
                Err(self.fail(e))
            }
        }
    }

    fn is_block_kind(&self, name: &str) -> bool {
        name == "target" || name == "group"
    }

    fn block_ref(
        &mut self,
        kind: &str,
        name: &str,
        attr: Option<&str>,
        depth: usize,
    ) -> std::result::Result<Value, String> {
        if kind == "group" {
            let Some(b) = self
                .groups
                .iter()
                .rev()
                .find(|b| b.labels[0] == name)
                .copied()
            else {
                return Err(format!("there is no group named \"{name}\""));
            };
            let g = self.group(b).map_err(|e| self.fail(e))?;
            let mut o = BTreeMap::new();
            o.insert(
                "targets".to_string(),
                Value::List(g.targets.into_iter().map(Value::String).collect()),
            );
            o.insert(
                "description".to_string(),
                g.description.map(Value::String).unwrap_or(Value::Null),
            );
            let v = Value::Object(o);
            return match attr {
                Some(a) => match &v {
                    Value::Object(o) => o
                        .get(a)
                        .cloned()
                        .ok_or_else(|| format!("group has no attribute {a:?}")),
                    _ => Ok(Value::Null),
                },
                None => Ok(v),
            };
        }
        let Some(i) = (0..self.instances.len())
            .rev()
            .find(|&i| self.instances[i].name == name)
        else {
            return Err(format!("there is no target named \"{name}\""));
        };
        match attr {
            Some(a) => {
                if !ATTRIBUTES.contains(&a) {
                    return Err(format!("target has no attribute \"{a}\""));
                }
                self.instance_attr(i, a, depth).map_err(|e| self.fail(e))
            }
            None => {
                let mut o = BTreeMap::new();
                for a in ATTRIBUTES {
                    let v = self.instance_attr(i, a, depth).map_err(|e| self.fail(e))?;
                    o.insert(a.to_string(), v);
                }
                Ok(Value::Object(o))
            }
        }
    }

    fn call(
        &mut self,
        name: &str,
        args: Vec<Value>,
        depth: usize,
    ) -> Option<std::result::Result<Value, String>> {
        if let Some(r) = stdlib::call(name, args.clone(), self.inputs.clock) {
            return Some(r);
        }
        self.call_user(name, args, depth)
    }
}

/// Evaluates one expression with no files around it (tests of the functions and operators).
#[cfg(test)]
pub(crate) fn eval_text(text: &str, clock: &Clock) -> std::result::Result<Value, String> {
    let expr = hcl::edit::parser::parse_expr(text).map_err(|e| e.message().to_string())?;
    let body = Body::default();
    let builtins = BTreeMap::new();
    let env = |_: &str| None;
    let inputs = Inputs {
        env: &env,
        builtins: &builtins,
        clock,
    };
    let _ = &body;
    let mut lang = Lang {
        inputs: &inputs,
        vars: HashMap::new(),
        attrs: HashMap::new(),
        funcs: HashMap::new(),
        globals: HashMap::new(),
        instances: Vec::new(),
        groups: Vec::new(),
        attr_slots: HashMap::new(),
        failure: None,
    };
    Eval {
        host: &mut lang,
        locals: vec![],
        depth: 0,
    }
    .expr(&expr)
}
