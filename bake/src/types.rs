//! Variable type constraints (`type = list(string)`) and the conversions buildx applies:
//! of defaults to the declared type, and of environment overrides (plain, CSV or `_JSON`).

use std::collections::BTreeMap;

use hcl::edit::expr::Expression;

use crate::value::{parse_number, Value};
use ossb_protocol::parse_bool;

/// A cty type constraint as a bake file can write it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Type {
    Any,
    String,
    Number,
    Bool,
    List(Box<Type>),
    Set(Box<Type>),
    Map(Box<Type>),
    Tuple(Vec<Type>),
    Object(BTreeMap<String, Type>),
}

impl Type {
    /// Reads a type expression; None for `null` (no constraint).
    pub fn parse(e: &Expression) -> Result<Option<Type>, String> {
        Ok(Some(match e {
            Expression::Null(_) => return Ok(None),
            Expression::Variable(v) => match v.as_str() {
                "string" => Type::String,
                "number" => Type::Number,
                "bool" => Type::Bool,
                "any" => Type::Any,
                other => return Err(format!("unknown type {other:?}")),
            },
            Expression::FuncCall(f) => {
                let args: Vec<&Expression> = f.args.iter().collect();
                let one = || -> Result<Type, String> {
                    match args.as_slice() {
                        [a] => Ok(Type::parse(a)?.unwrap_or(Type::Any)),
                        _ => Err("a collection type takes one element type".into()),
                    }
                };
                match f.name.name.as_str() {
                    "list" => Type::List(Box::new(one()?)),
                    "set" => Type::Set(Box::new(one()?)),
                    "map" => Type::Map(Box::new(one()?)),
                    "tuple" => match args.as_slice() {
                        [Expression::Array(items)] => Type::Tuple(
                            items
                                .iter()
                                .map(|i| Ok(Type::parse(i)?.unwrap_or(Type::Any)))
                                .collect::<Result<_, String>>()?,
                        ),
                        _ => return Err("tuple takes a list of types".into()),
                    },
                    "object" => match args.as_slice() {
                        [Expression::Object(o)] => {
                            let mut fields = BTreeMap::new();
                            for (k, v) in o.iter() {
                                let key = match k {
                                    hcl::edit::expr::ObjectKey::Ident(i) => i.as_str().to_string(),
                                    hcl::edit::expr::ObjectKey::Expression(Expression::String(
                                        s,
                                    )) => s.value().clone(),
                                    _ => return Err("object type keys must be names".into()),
                                };
                                fields.insert(key, Type::parse(v.expr())?.unwrap_or(Type::Any));
                            }
                            Type::Object(fields)
                        }
                        _ => return Err("object takes an object of types".into()),
                    },
                    other => return Err(format!("unknown type constructor {other:?}")),
                }
            }
            _ => return Err("invalid type specification".into()),
        }))
    }

    /// cty's friendly name, for errors.
    pub fn name(&self) -> String {
        match self {
            Type::Any => "any".into(),
            Type::String => "string".into(),
            Type::Number => "number".into(),
            Type::Bool => "bool".into(),
            Type::List(t) => format!("list of {}", t.name()),
            Type::Set(t) => format!("set of {}", t.name()),
            Type::Map(t) => format!("map of {}", t.name()),
            Type::Tuple(_) => "tuple".into(),
            Type::Object(_) => "object".into(),
        }
    }

    fn is_primitive(&self) -> bool {
        matches!(self, Type::String | Type::Number | Type::Bool)
    }

    /// Converts a value to this type as cty's `convert` does for the cases bake files meet.
    pub fn convert(&self, v: Value) -> Result<Value, String> {
        if v.is_null() {
            return Ok(v);
        }
        let mismatch = |v: &Value| format!("{} required, got {}", self.name(), v.type_name());
        Ok(match self {
            Type::Any => v,
            Type::String => Value::String(v.to_str().ok_or_else(|| mismatch(&v))?),
            Type::Number => Value::Number(match &v {
                Value::Number(n) => *n,
                Value::String(s) => {
                    parse_number(s).ok_or_else(|| format!("a number is required, got {s:?}"))?
                }
                _ => return Err(mismatch(&v)),
            }),
            Type::Bool => Value::Bool(v.to_bool().ok_or_else(|| mismatch(&v))?),
            Type::List(t) | Type::Set(t) => match v {
                Value::List(items) => {
                    let mut out: Vec<Value> = items
                        .into_iter()
                        .map(|i| t.convert(i))
                        .collect::<Result<_, _>>()?;
                    if matches!(self, Type::Set(_)) {
                        out.dedup();
                    }
                    Value::List(out)
                }
                other => return Err(mismatch(&other)),
            },
            Type::Tuple(ts) => match v {
                Value::List(items) if items.len() == ts.len() => Value::List(
                    items
                        .into_iter()
                        .zip(ts)
                        .map(|(i, t)| t.convert(i))
                        .collect::<Result<_, _>>()?,
                ),
                other => return Err(mismatch(&other)),
            },
            Type::Map(t) => match v {
                Value::Object(o) => Value::Object(
                    o.into_iter()
                        .map(|(k, i)| Ok((k, t.convert(i)?)))
                        .collect::<Result<_, String>>()?,
                ),
                other => return Err(mismatch(&other)),
            },
            Type::Object(fields) => match v {
                Value::Object(mut o) => {
                    let mut out = BTreeMap::new();
                    for (k, t) in fields {
                        let item = o.remove(k).unwrap_or(Value::Null);
                        out.insert(k.clone(), t.convert(item)?);
                    }
                    Value::Object(out)
                }
                other => return Err(mismatch(&other)),
            },
        })
    }

    /// An environment override's text as this type: JSON when asked, CSV for collections of
    /// primitives, the primitive itself otherwise.
    pub fn parse_override(&self, name: &str, text: &str, json: bool) -> Result<Value, String> {
        if json {
            let v: serde_json::Value = serde_json::from_str(text)
                .map_err(|e| format!("failed to convert variable {name} from JSON: {e}"))?;
            return self.convert(Value::from_json(&v));
        }
        match self {
            Type::List(t) | Type::Set(t) if t.is_primitive() => Ok(Value::List(
                csv_fields(text, ',')
                    .iter()
                    .map(|f| primitive(name, f, t))
                    .collect::<Result<_, _>>()?,
            )),
            Type::Tuple(ts) if ts.iter().all(Type::is_primitive) => {
                let fields = csv_fields(text, ',');
                if fields.len() != ts.len() {
                    return Err(format!(
                        "tuple expects {} elements but only {} provided",
                        ts.len(),
                        fields.len()
                    ));
                }
                Ok(Value::List(
                    fields
                        .iter()
                        .zip(ts)
                        .map(|(f, t)| primitive(name, f, t))
                        .collect::<Result<_, _>>()?,
                ))
            }
            Type::Map(t) if t.is_primitive() => {
                let mut out = BTreeMap::new();
                for f in csv_fields(text, ',') {
                    let kv = csv_fields(&f, ':');
                    if kv.len() != 2 {
                        return Err(format!(
                            "expected one k/v pair but got {} pieces from {f}",
                            kv.len()
                        ));
                    }
                    out.insert(kv[0].clone(), primitive(name, &kv[1], t)?);
                }
                Ok(Value::Object(out))
            }
            t if t.is_primitive() => primitive(name, text, t),
            Type::Any => Ok(Value::String(text.to_string())),
            other => Err(format!(
                "unsupported type {} for variable {name}",
                other.name()
            )),
        }
    }
}

/// One field of an override as a primitive type (Go's ParseBool and ParseFloat rules).
pub(crate) fn primitive(name: &str, text: &str, t: &Type) -> Result<Value, String> {
    match t {
        Type::Bool => parse_bool(text)
            .map(Value::Bool)
            .ok_or_else(|| format!("failed to parse {name} as bool: {text:?}")),
        Type::Number => parse_number(text)
            .map(Value::Number)
            .ok_or_else(|| format!("failed to parse {name} as number: {text:?}")),
        _ => Ok(Value::String(text.to_string())),
    }
}

/// The type of a value, for untyped variables whose override follows their default.
pub(crate) fn type_of(v: &Value) -> Option<Type> {
    match v {
        Value::String(_) => Some(Type::String),
        Value::Number(_) => Some(Type::Number),
        Value::Bool(_) => Some(Type::Bool),
        _ => None,
    }
}

/// One CSV record's fields, with double quotes as Go's csv reader takes them.
pub(crate) fn csv_fields(text: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    cur.push('"');
                    chars.next();
                } else {
                    quoted = false;
                }
            } else {
                cur.push(c);
            }
        } else if c == '"' && at_start {
            quoted = true;
            at_start = false;
        } else if c == sep {
            out.push(std::mem::take(&mut cur));
            at_start = true;
        } else {
            cur.push(c);
            at_start = false;
        }
    }
    out.push(cur);
    out
}
