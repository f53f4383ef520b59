//! The expression evaluator: HCL expressions, templates, `for` expressions and splats over
//! [`Value`]s. Names it does not bind itself (globals, block references, functions) are asked
//! of a [`Host`], which the bake language (`lang.rs`) implements lazily.

use std::collections::BTreeMap;

use hcl::edit::expr::{BinaryOperator, Expression, ObjectKey, TraversalOperator, UnaryOperator};
use hcl::edit::template::{Directive, Element, Template};

use crate::value::{format_number, Value};

/// Evaluation nests at most this deep (expressions, function calls, references), so a
/// hostile or recursive file ends in an error, not a stack overflow.
pub(crate) const MAX_DEPTH: usize = 96;

/// What the evaluator asks of the language around it.
pub(crate) trait Host {
    /// A global name: a variable, a top-level attribute.
    fn global(&mut self, name: &str, depth: usize) -> Result<Value, String>;
    /// Whether `name` is a block type that expressions may reference (`target`).
    fn is_block_kind(&self, name: &str) -> bool;
    /// `kind.name` (attr None) or `kind.name.attr`.
    fn block_ref(
        &mut self,
        kind: &str,
        name: &str,
        attr: Option<&str>,
        depth: usize,
    ) -> Result<Value, String>;
    /// A function call; None when no function has that name.
    fn call(&mut self, name: &str, args: Vec<Value>, depth: usize)
        -> Option<Result<Value, String>>;
}

/// One evaluation: the host and the names bound locally (matrix values, function
/// parameters, `for` variables), innermost last.
pub(crate) struct Eval<'h> {
    pub host: &'h mut dyn Host,
    pub locals: Vec<(String, Value)>,
    pub depth: usize,
}

type R = Result<Value, String>;

impl Eval<'_> {
    fn local(&self, name: &str) -> Option<&Value> {
        self.locals
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Evaluates an expression.
    pub fn expr(&mut self, e: &Expression) -> R {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            self.depth -= 1;
            return Err(format!("expression nests deeper than {MAX_DEPTH} levels"));
        }
        let r = self.expr_inner(e);
        self.depth -= 1;
        r
    }

    fn expr_inner(&mut self, e: &Expression) -> R {
        Ok(match e {
            Expression::Null(_) => Value::Null,
            Expression::Bool(b) => Value::Bool(*b.value()),
            Expression::Number(n) => Value::Number(n.value().as_f64().unwrap_or(0.0)),
            Expression::String(s) => Value::String(s.value().clone()),
            Expression::Array(a) => {
                let mut out = Vec::new();
                for item in a.iter() {
                    out.push(self.expr(item)?);
                }
                Value::List(out)
            }
            Expression::Object(o) => {
                let mut out = BTreeMap::new();
                for (k, v) in o.iter() {
                    let key = match k {
                        ObjectKey::Ident(i) => i.as_str().to_string(),
                        ObjectKey::Expression(Expression::Variable(v)) => v.as_str().to_string(),
                        ObjectKey::Expression(e) => {
                            let kv = self.expr(e)?;
                            kv.to_str().ok_or_else(|| {
                                format!("object key must be a string, not {}", kv.type_name())
                            })?
                        }
                    };
                    out.insert(key, self.expr(v.expr())?);
                }
                Value::Object(out)
            }
            Expression::StringTemplate(t) => {
                let elements: Vec<Element> = t.iter().cloned().collect();
                // A template that is one interpolation and nothing else yields the value
                // itself, not its string form (HCL's rule: "${list}" is a list).
                if let [Element::Interpolation(i)] = elements.as_slice() {
                    return self.expr(&i.expr);
                }
                Value::String(self.elements(&elements)?)
            }
            Expression::HeredocTemplate(h) => Value::String(self.template(&h.template)?),
            Expression::Parenthesis(p) => self.expr(p.inner())?,
            Expression::Variable(v) => self.variable(v.as_str())?,
            Expression::Conditional(c) => {
                let cond = self.expr(&c.cond_expr)?;
                match cond.to_bool() {
                    Some(true) => self.expr(&c.true_expr)?,
                    Some(false) => self.expr(&c.false_expr)?,
                    None => {
                        return Err(format!(
                            "condition must be a bool, not {}",
                            cond.type_name()
                        ))
                    }
                }
            }
            Expression::FuncCall(f) => {
                let name = f.name.name.as_str();
                let mut args = Vec::new();
                for a in f.args.iter() {
                    args.push(self.expr(a)?);
                }
                if f.args.expand_final() {
                    match args.pop() {
                        Some(Value::List(rest)) => args.extend(rest),
                        _ => {
                            return Err(format!(
                                "{name}: the final argument must be a list to expand"
                            ))
                        }
                    }
                }
                match self.host.call(name, args, self.depth) {
                    Some(r) => r.map_err(|e| format!("{name}(): {e}"))?,
                    None => return Err(format!("there is no function named \"{name}\"")),
                }
            }
            Expression::Traversal(t) => self.traversal(&t.expr, &t.operators)?,
            Expression::UnaryOp(u) => {
                let v = self.expr(&u.expr)?;
                match u.operator.value() {
                    UnaryOperator::Neg => Value::Number(
                        -v.to_number()
                            .ok_or_else(|| format!("cannot negate {}", v.type_name()))?,
                    ),
                    UnaryOperator::Not => Value::Bool(
                        !v.to_bool()
                            .ok_or_else(|| format!("cannot apply ! to {}", v.type_name()))?,
                    ),
                }
            }
            Expression::BinaryOp(b) => {
                self.binary(&b.lhs_expr, *b.operator.value(), &b.rhs_expr)?
            }
            Expression::ForExpr(f) => self.for_expr(f)?,
        })
    }

    fn variable(&mut self, name: &str) -> R {
        if let Some(v) = self.local(name) {
            return Ok(v.clone());
        }
        if self.host.is_block_kind(name) {
            return Err(format!("cannot access {name} as a variable"));
        }
        self.host.global(name, self.depth)
    }

    fn traversal(
        &mut self,
        base: &Expression,
        ops: &[hcl::edit::Decorated<TraversalOperator>],
    ) -> R {
        let mut rest: &[hcl::edit::Decorated<TraversalOperator>] = ops;
        let mut value = match base {
            Expression::Variable(v)
                if self.local(v.as_str()).is_none() && self.host.is_block_kind(v.as_str()) =>
            {
                let kind = v.as_str().to_string();
                let name = match rest.first().map(|o| o.value()) {
                    Some(TraversalOperator::GetAttr(n)) => n.as_str().to_string(),
                    Some(TraversalOperator::Index(e)) => {
                        let k = self.expr(e)?;
                        k.to_str().ok_or("block name must be a string")?
                    }
                    _ => return Err(format!("cannot traverse {kind} without attribute")),
                };
                let attr = match rest.get(1).map(|o| o.value()) {
                    Some(TraversalOperator::GetAttr(a)) => Some(a.as_str().to_string()),
                    _ => None,
                };
                let skip = if attr.is_some() { 2 } else { 1 };
                rest = &rest[skip..];
                self.host
                    .block_ref(&kind, &name, attr.as_deref(), self.depth)?
            }
            _ => self.expr(base)?,
        };
        let mut i = 0;
        while i < rest.len() {
            match rest[i].value() {
                TraversalOperator::AttrSplat(_) | TraversalOperator::FullSplat(_) => {
                    let items = match value {
                        Value::List(items) => items,
                        Value::Null => vec![],
                        other => vec![other],
                    };
                    let tail = &rest[i + 1..];
                    let mut out = Vec::new();
                    for item in items {
                        out.push(self.apply_ops(item, tail)?);
                    }
                    return Ok(Value::List(out));
                }
                _ => {
                    value = self.apply_ops(value, &rest[i..i + 1])?;
                }
            }
            i += 1;
        }
        Ok(value)
    }

    fn apply_ops(
        &mut self,
        mut value: Value,
        ops: &[hcl::edit::Decorated<TraversalOperator>],
    ) -> R {
        for op in ops {
            value = match op.value() {
                TraversalOperator::GetAttr(name) => get_attr(&value, name.as_str())?,
                TraversalOperator::Index(e) => {
                    let k = self.expr(e)?;
                    index(&value, &k)?
                }
                TraversalOperator::LegacyIndex(n) => {
                    index(&value, &Value::Number(*n.value() as f64))?
                }
                TraversalOperator::AttrSplat(_) | TraversalOperator::FullSplat(_) => value,
            };
        }
        Ok(value)
    }

    fn binary(&mut self, l: &Expression, op: BinaryOperator, r: &Expression) -> R {
        use BinaryOperator as B;
        let lv = self.expr(l)?;
        // && and || evaluate both sides in HCL too; no short circuit needed for correctness.
        let rv = self.expr(r)?;
        let num = |v: &Value| {
            v.to_number()
                .ok_or_else(|| format!("a number is required, not {}", v.type_name()))
        };
        let boolean = |v: &Value| {
            v.to_bool()
                .ok_or_else(|| format!("a bool is required, not {}", v.type_name()))
        };
        Ok(match op {
            B::Eq => Value::Bool(lv.hcl_eq(&rv)),
            B::NotEq => Value::Bool(!lv.hcl_eq(&rv)),
            B::Less => Value::Bool(num(&lv)? < num(&rv)?),
            B::LessEq => Value::Bool(num(&lv)? <= num(&rv)?),
            B::Greater => Value::Bool(num(&lv)? > num(&rv)?),
            B::GreaterEq => Value::Bool(num(&lv)? >= num(&rv)?),
            B::Plus => Value::Number(num(&lv)? + num(&rv)?),
            B::Minus => Value::Number(num(&lv)? - num(&rv)?),
            B::Mul => Value::Number(num(&lv)? * num(&rv)?),
            B::Div => {
                let d = num(&rv)?;
                if d == 0.0 {
                    return Err("division by zero".into());
                }
                Value::Number(num(&lv)? / d)
            }
            B::Mod => {
                let d = num(&rv)?;
                if d == 0.0 {
                    return Err("modulo by zero".into());
                }
                Value::Number(num(&lv)? % d)
            }
            B::And => Value::Bool(boolean(&lv)? && boolean(&rv)?),
            B::Or => Value::Bool(boolean(&lv)? || boolean(&rv)?),
        })
    }

    fn for_expr(&mut self, f: &hcl::edit::expr::ForExpr) -> R {
        let coll = self.expr(&f.intro.collection_expr)?;
        let pairs: Vec<(Value, Value)> = match coll {
            Value::List(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (Value::Number(i as f64), v))
                .collect(),
            Value::Object(o) => o.into_iter().map(|(k, v)| (Value::String(k), v)).collect(),
            other => return Err(format!("cannot iterate over {}", other.type_name())),
        };
        let key_var = f.intro.key_var.as_ref().map(|k| k.as_str().to_string());
        let value_var = f.intro.value_var.as_str().to_string();
        let mut list = Vec::new();
        let mut object: BTreeMap<String, Value> = BTreeMap::new();
        let mut groups: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (k, v) in pairs {
            let mark = self.locals.len();
            if let Some(kv) = &key_var {
                self.locals.push((kv.clone(), k));
            }
            self.locals.push((value_var.clone(), v));
            let r = (|| -> Result<(), String> {
                if let Some(cond) = &f.cond {
                    let c = self.expr(&cond.expr)?;
                    if !c.to_bool().ok_or("for condition must be a bool")? {
                        return Ok(());
                    }
                }
                let value = self.expr(&f.value_expr)?;
                match &f.key_expr {
                    None => list.push(value),
                    Some(ke) => {
                        let key = self.expr(ke)?.to_str().ok_or("for key must be a string")?;
                        if f.grouping {
                            groups.entry(key).or_default().push(value);
                        } else if object.insert(key.clone(), value).is_some() {
                            return Err(format!("duplicate key {key:?} in for expression"));
                        }
                    }
                }
                Ok(())
            })();
            self.locals.truncate(mark);
            r?;
        }
        Ok(match &f.key_expr {
            None => Value::List(list),
            Some(_) if f.grouping => Value::Object(
                groups
                    .into_iter()
                    .map(|(k, v)| (k, Value::List(v)))
                    .collect(),
            ),
            Some(_) => Value::Object(object),
        })
    }

    /// Evaluates a template to its string.
    pub fn template(&mut self, t: &Template) -> Result<String, String> {
        self.elements(&t.iter().cloned().collect::<Vec<_>>())
    }

    fn elements(&mut self, elements: &[Element]) -> Result<String, String> {
        // Strip markers (`~`) trim whitespace of the neighbouring literals.
        let strips: Vec<(bool, bool)> = elements
            .iter()
            .map(|e| match e {
                Element::Interpolation(i) => (i.strip.strip_start(), i.strip.strip_end()),
                Element::Directive(d) => match d.as_ref() {
                    Directive::If(i) => (
                        i.if_expr.strip.strip_start(),
                        i.endif_expr.strip.strip_end(),
                    ),
                    Directive::For(f) => (
                        f.for_expr.strip.strip_start(),
                        f.endfor_expr.strip.strip_end(),
                    ),
                },
                Element::Literal(_) => (false, false),
            })
            .collect();
        let mut out = String::new();
        for (i, e) in elements.iter().enumerate() {
            match e {
                Element::Literal(s) => {
                    let mut s: &str = s.value();
                    if i > 0 && strips[i - 1].1 {
                        s = s.trim_start();
                    }
                    if i + 1 < elements.len() && strips[i + 1].0 {
                        s = s.trim_end();
                    }
                    out.push_str(s);
                }
                Element::Interpolation(interp) => {
                    let v = self.expr(&interp.expr)?;
                    out.push_str(&interpolated(&v)?);
                }
                Element::Directive(d) => match d.as_ref() {
                    Directive::If(ifd) => {
                        let c = self.expr(&ifd.if_expr.cond_expr)?;
                        let c = c.to_bool().ok_or("if condition must be a bool")?;
                        if c {
                            out.push_str(&self.template(&ifd.if_expr.template)?);
                        } else if let Some(e) = &ifd.else_expr {
                            out.push_str(&self.template(&e.template)?);
                        }
                    }
                    Directive::For(fd) => {
                        let coll = self.expr(&fd.for_expr.collection_expr)?;
                        let pairs: Vec<(Value, Value)> = match coll {
                            Value::List(items) => items
                                .into_iter()
                                .enumerate()
                                .map(|(i, v)| (Value::Number(i as f64), v))
                                .collect(),
                            Value::Object(o) => {
                                o.into_iter().map(|(k, v)| (Value::String(k), v)).collect()
                            }
                            other => {
                                return Err(format!("cannot iterate over {}", other.type_name()))
                            }
                        };
                        for (k, v) in pairs {
                            let mark = self.locals.len();
                            if let Some(kv) = &fd.for_expr.key_var {
                                self.locals.push((kv.as_str().to_string(), k));
                            }
                            self.locals
                                .push((fd.for_expr.value_var.as_str().to_string(), v));
                            let r = self.template(&fd.for_expr.template);
                            self.locals.truncate(mark);
                            out.push_str(&r?);
                        }
                    }
                },
            }
        }
        Ok(out)
    }
}

/// A value inside `${}`: primitives become strings, anything else is an error as in HCL.
fn interpolated(v: &Value) -> Result<String, String> {
    match v {
        Value::Null => Err("cannot include a null value in a string template".into()),
        Value::Number(n) => Ok(format_number(*n)),
        Value::List(_) | Value::Object(_) => Err(format!(
            "cannot include a {} in a string template",
            v.type_name()
        )),
        other => Ok(other.to_str().unwrap_or_default()),
    }
}

fn get_attr(v: &Value, name: &str) -> R {
    match v {
        Value::Object(o) => o
            .get(name)
            .cloned()
            .ok_or_else(|| format!("this object does not have an attribute named \"{name}\"")),
        other => Err(format!(
            "cannot access attribute \"{name}\" of a {}",
            other.type_name()
        )),
    }
}

fn index(v: &Value, k: &Value) -> R {
    match v {
        Value::List(items) => {
            let i = k.to_number().ok_or("list index must be a number")?;
            if i < 0.0 || i.fract() != 0.0 || i as usize >= items.len() {
                return Err(format!(
                    "index {} out of range for list of length {}",
                    format_number(i),
                    items.len()
                ));
            }
            Ok(items[i as usize].clone())
        }
        Value::Object(o) => {
            let key = k.to_str().ok_or("object key must be a string")?;
            o.get(&key)
                .cloned()
                .ok_or_else(|| format!("key {key:?} does not exist"))
        }
        other => Err(format!("cannot index a {}", other.type_name())),
    }
}
