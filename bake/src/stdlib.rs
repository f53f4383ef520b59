//! The functions bake files can call: buildx's stdlib (go-cty's and its own), written
//! against [`Value`]. Names and behaviour follow buildx's `bake/hclparser/stdlib.go`;
//! the few left out are listed in [`UNSUPPORTED`].

use std::collections::BTreeMap;

use base64::Engine as _;
use sha2::Digest as _;

use crate::value::{format_number, Value};

/// buildx functions this crate does not implement; calling one is an error naming it.
pub const UNSUPPORTED: &[&str] = &[
    "bcrypt",
    "rsadecrypt",
    "cidrhost",
    "cidrnetmask",
    "cidrsubnet",
    "cidrsubnets",
    "can",
    "try",
    "convert",
    "csvdecode",
    "bytesslice",
    "byteslen",
    "setproduct",
    "timeadd",
];

/// What the functions may read from outside: the clock (`timestamp`) and the home directory.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Unix seconds `timestamp()` returns.
    pub now: i64,
    /// `homedir()`'s answer.
    pub home: String,
}

type R = Result<Value, String>;

fn arity(args: &[Value], n: usize) -> Result<(), String> {
    if args.len() != n {
        return Err(format!("expects {n} argument(s), got {}", args.len()));
    }
    Ok(())
}

fn s(v: &Value) -> Result<String, String> {
    v.to_str()
        .ok_or_else(|| format!("a string is required, not {}", v.type_name()))
}
fn n(v: &Value) -> Result<f64, String> {
    v.to_number()
        .ok_or_else(|| format!("a number is required, not {}", v.type_name()))
}
fn b(v: &Value) -> Result<bool, String> {
    v.to_bool()
        .ok_or_else(|| format!("a bool is required, not {}", v.type_name()))
}
fn list(v: &Value) -> Result<Vec<Value>, String> {
    match v {
        Value::List(l) => Ok(l.clone()),
        other => Err(format!("a list is required, not {}", other.type_name())),
    }
}
fn obj(v: &Value) -> Result<BTreeMap<String, Value>, String> {
    match v {
        Value::Object(o) => Ok(o.clone()),
        other => Err(format!("a map is required, not {}", other.type_name())),
    }
}
fn strs(v: &Value) -> Result<Vec<String>, String> {
    list(v)?.iter().map(s).collect()
}

/// Calls a stdlib function; None when `name` is not one.
pub(crate) fn call(name: &str, a: Vec<Value>, clock: &Clock) -> Option<R> {
    Some(match name {
        "absolute" | "signum" | "ceil" | "floor" | "negate" | "int" => num1(name, &a),
        "add" | "subtract" | "multiply" | "divide" | "modulo" | "pow" | "log" => num2(name, &a),
        "greaterthan" | "greaterthanorequalto" | "lessthan" | "lessthanorequalto" => cmp2(name, &a),
        "max" | "min" => minmax(name, &a),
        "and" | "or" => arity(&a, 2).and_then(|_| {
            let (x, y) = (b(&a[0])?, b(&a[1])?);
            Ok(Value::Bool(if name == "and" { x && y } else { x || y }))
        }),
        "not" => arity(&a, 1).and_then(|_| Ok(Value::Bool(!b(&a[0])?))),
        "equal" => arity(&a, 2).map(|_| Value::Bool(a[0] == a[1])),
        "notequal" => arity(&a, 2).map(|_| Value::Bool(a[0] != a[1])),
        "parseint" => parseint(&a),
        "range" => range(&a),
        "lower" | "upper" | "title" | "trimspace" | "chomp" | "strlen" | "reverse" | "sanitize"
        | "basename" | "dirname" | "base64encode" | "base64decode" | "urlencode" | "md5"
        | "sha1" | "sha256" | "sha512" | "uuidv4" => str1(name, &a),
        "trimprefix" | "trimsuffix" | "trim" | "split" | "join" | "indent" | "regex"
        | "regexall" | "uuidv5" => str2(name, &a),
        "replace" => arity(&a, 3).and_then(|_| replace(&s(&a[0])?, &s(&a[1])?, &s(&a[2])?)),
        "regex_replace" => arity(&a, 3).and_then(|_| {
            let re = regex::Regex::new(&s(&a[1])?).map_err(|e| e.to_string())?;
            let repl = go_replacement(&s(&a[2])?);
            Ok(Value::String(
                re.replace_all(&s(&a[0])?, repl.as_str()).into_owned(),
            ))
        }),
        "substr" => substr(&a),
        "format" => {
            if a.is_empty() {
                Err("expects at least 1 argument".into())
            } else {
                s(&a[0]).and_then(|f| format(&f, &a[1..]).map(Value::String))
            }
        }
        "formatlist" => formatlist(&a),
        "coalesce" => a
            .iter()
            .find(|v| !v.is_null() && !matches!(v, Value::String(s) if s.is_empty()))
            .cloned()
            .ok_or_else(|| "no non-null, non-empty-string arguments".to_string()),
        "coalescelist" => a
            .iter()
            .find(|v| matches!(v, Value::List(l) if !l.is_empty()))
            .cloned()
            .ok_or_else(|| "no non-null arguments".to_string()),
        "compact" => arity(&a, 1).and_then(|_| {
            Ok(Value::List(
                list(&a[0])?
                    .into_iter()
                    .filter(|v| !v.is_null() && !matches!(v, Value::String(s) if s.is_empty()))
                    .collect(),
            ))
        }),
        "concat" => a
            .iter()
            .map(list)
            .collect::<Result<Vec<_>, _>>()
            .map(|ls| Value::List(ls.into_iter().flatten().collect())),
        "contains" | "sethaselement" => {
            arity(&a, 2).and_then(|_| Ok(Value::Bool(list(&a[0])?.contains(&a[1]))))
        }
        "distinct" => arity(&a, 1).and_then(|_| {
            let mut out: Vec<Value> = Vec::new();
            for v in list(&a[0])? {
                if !out.contains(&v) {
                    out.push(v);
                }
            }
            Ok(Value::List(out))
        }),
        "flatten" => arity(&a, 1).and_then(|_| {
            let mut out = Vec::new();
            flatten(&a[0], &mut out, 0)?;
            Ok(Value::List(out))
        }),
        "element" => arity(&a, 2).and_then(|_| {
            let l = list(&a[0])?;
            let i = n(&a[1])?;
            if l.is_empty() {
                return Err("cannot use element function with an empty list".into());
            }
            if i < 0.0 {
                return Err("cannot use element function with a negative index".into());
            }
            Ok(l[(i as usize) % l.len()].clone())
        }),
        // go-cty's `index` reads an element (a list position or a map key); `indexof` finds.
        "index" => arity(&a, 2).and_then(|_| match &a[0] {
            Value::List(l) => {
                let i = n(&a[1])?;
                if i < 0.0 || i.fract() != 0.0 || i as usize >= l.len() {
                    return Err("invalid index".into());
                }
                Ok(l[i as usize].clone())
            }
            Value::Object(o) => {
                let k = s(&a[1])?;
                o.get(&k)
                    .cloned()
                    .ok_or_else(|| format!("the given key {k:?} does not exist"))
            }
            other => Err(format!("cannot index a {}", other.type_name())),
        }),
        "indexof" => arity(&a, 2).and_then(|_| {
            let l = list(&a[0])?;
            if l.is_empty() {
                return Err("cannot search an empty list".into());
            }
            l.iter()
                .position(|v| v == &a[1])
                .map(|i| Value::Number(i as f64))
                .ok_or_else(|| "item not found".into())
        }),
        "hasindex" => arity(&a, 2).map(|_| {
            Value::Bool(match (&a[0], &a[1]) {
                (Value::List(l), k) => k
                    .to_number()
                    .is_some_and(|i| i >= 0.0 && (i as usize) < l.len()),
                (Value::Object(o), k) => k.to_str().is_some_and(|k| o.contains_key(&k)),
                _ => false,
            })
        }),
        "keys" => arity(&a, 1).and_then(|_| {
            Ok(Value::List(
                obj(&a[0])?.into_keys().map(Value::String).collect(),
            ))
        }),
        "values" => arity(&a, 1).and_then(|_| Ok(Value::List(obj(&a[0])?.into_values().collect()))),
        "length" => arity(&a, 1).and_then(|_| match &a[0] {
            Value::List(l) => Ok(Value::Number(l.len() as f64)),
            Value::Object(o) => Ok(Value::Number(o.len() as f64)),
            Value::String(st) => Ok(Value::Number(st.chars().count() as f64)),
            other => Err(format!("cannot take the length of {}", other.type_name())),
        }),
        "lookup" => {
            if a.len() != 2 && a.len() != 3 {
                Err(format!("expects 2 or 3 arguments, got {}", a.len()))
            } else {
                obj(&a[0]).and_then(|o| {
                    let k = s(&a[1])?;
                    match o.get(&k) {
                        Some(v) => Ok(v.clone()),
                        None if a.len() == 3 => Ok(a[2].clone()),
                        None => Err(format!("the given map has no key {k:?}")),
                    }
                })
            }
        }
        "merge" => {
            let mut out = BTreeMap::new();
            for v in &a {
                if v.is_null() {
                    continue;
                }
                match obj(v) {
                    Ok(o) => out.extend(o),
                    Err(e) => return Some(Err(e)),
                }
            }
            Ok(Value::Object(out))
        }
        "reverselist" => arity(&a, 1).and_then(|_| {
            let mut l = list(&a[0])?;
            l.reverse();
            Ok(Value::List(l))
        }),
        "slice" => arity(&a, 3).and_then(|_| {
            let l = list(&a[0])?;
            let (from, to) = (n(&a[1])?, n(&a[2])?);
            if from < 0.0 || to < from || to as usize > l.len() {
                return Err("invalid slice indices".into());
            }
            Ok(Value::List(l[from as usize..to as usize].to_vec()))
        }),
        "sort" => arity(&a, 1).and_then(|_| {
            let mut l = strs(&a[0])?;
            l.sort();
            Ok(Value::List(l.into_iter().map(Value::String).collect()))
        }),
        "chunklist" => arity(&a, 2).and_then(|_| {
            let l = list(&a[0])?;
            let size = n(&a[1])?;
            if size < 0.0 {
                return Err("the size argument must be positive".into());
            }
            if size == 0.0 {
                return Ok(Value::List(vec![Value::List(l)]));
            }
            Ok(Value::List(
                l.chunks(size as usize)
                    .map(|c| Value::List(c.to_vec()))
                    .collect(),
            ))
        }),
        "zipmap" => arity(&a, 2).and_then(|_| {
            let (k, v) = (strs(&a[0])?, list(&a[1])?);
            if k.len() != v.len() {
                return Err("number of keys and values must match".into());
            }
            Ok(Value::Object(k.into_iter().zip(v).collect()))
        }),
        "setunion" | "setintersection" | "setsubtract" | "setsymmetricdifference" => sets(name, &a),
        "jsonencode" => arity(&a, 1).map(|_| Value::String(a[0].to_json().to_string())),
        "jsondecode" => arity(&a, 1).and_then(|_| {
            let v: serde_json::Value =
                serde_json::from_str(&s(&a[0])?).map_err(|e| e.to_string())?;
            Ok(Value::from_json(&v))
        }),
        "timestamp" => arity(&a, 0).and_then(|_| rfc3339(clock.now).map(Value::String)),
        "formatdate" => {
            arity(&a, 2).and_then(|_| formatdate(&s(&a[0])?, &s(&a[1])?).map(Value::String))
        }
        "formattimestamp" => arity(&a, 2).and_then(|_| {
            let f = s(&a[0])?;
            let ts = match &a[1] {
                Value::Number(secs) => rfc3339(*secs as i64)?,
                other => s(other)?,
            };
            if f == "X" {
                return parse_rfc3339(&ts).map(|t| Value::String(t.unix_timestamp().to_string()));
            }
            formatdate(&f, &ts).map(Value::String)
        }),
        "unixtimestampparse" => arity(&a, 1).and_then(|_| {
            let t = time::OffsetDateTime::from_unix_timestamp(n(&a[0])? as i64)
                .map_err(|e| e.to_string())?;
            let mut o = BTreeMap::new();
            o.insert("year".to_string(), Value::Number(t.year() as f64));
            o.insert(
                "month".to_string(),
                Value::Number(u8::from(t.month()) as f64),
            );
            o.insert("day".to_string(), Value::Number(t.day() as f64));
            o.insert("hour".to_string(), Value::Number(t.hour() as f64));
            o.insert("minute".to_string(), Value::Number(t.minute() as f64));
            o.insert("second".to_string(), Value::Number(t.second() as f64));
            o.insert(
                "rfc3339".to_string(),
                Value::String(rfc3339(t.unix_timestamp())?),
            );
            Ok(Value::Object(o))
        }),
        "homedir" => arity(&a, 0).map(|_| Value::String(clock.home.clone())),
        "semvercmp" => {
            arity(&a, 2).and_then(|_| semvercmp(&s(&a[0])?, &s(&a[1])?).map(Value::Bool))
        }
        other if UNSUPPORTED.contains(&other) => {
            Err("this buildx function is not supported by ossb".into())
        }
        _ => return None,
    })
}

fn num1(name: &str, a: &[Value]) -> R {
    arity(a, 1)?;
    let x = n(&a[0])?;
    Ok(Value::Number(match name {
        "absolute" => x.abs(),
        "signum" => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        "ceil" => x.ceil(),
        "floor" => x.floor(),
        "negate" => -x,
        _ => x.trunc(),
    }))
}

fn num2(name: &str, a: &[Value]) -> R {
    arity(a, 2)?;
    let (x, y) = (n(&a[0])?, n(&a[1])?);
    Ok(Value::Number(match name {
        "add" => x + y,
        "subtract" => x - y,
        "multiply" => x * y,
        "divide" | "modulo" if y == 0.0 => return Err("can't divide by zero".into()),
        "divide" => x / y,
        "modulo" => x % y,
        "pow" => x.powf(y),
        _ => x.ln() / y.ln(),
    }))
}

fn cmp2(name: &str, a: &[Value]) -> R {
    arity(a, 2)?;
    let (x, y) = (n(&a[0])?, n(&a[1])?);
    Ok(Value::Bool(match name {
        "greaterthan" => x > y,
        "greaterthanorequalto" => x >= y,
        "lessthan" => x < y,
        _ => x <= y,
    }))
}

fn minmax(name: &str, a: &[Value]) -> R {
    if a.is_empty() {
        return Err("must have at least one argument".into());
    }
    let mut best = n(&a[0])?;
    for v in &a[1..] {
        let x = n(v)?;
        if (name == "max" && x > best) || (name == "min" && x < best) {
            best = x;
        }
    }
    Ok(Value::Number(best))
}

fn parseint(a: &[Value]) -> R {
    arity(a, 2)?;
    let (text, base) = (s(&a[0])?, n(&a[1])?);
    if !(2.0..=62.0).contains(&base) {
        return Err("base must be a whole number between 2 and 62 inclusive".into());
    }
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text.strip_prefix('+').unwrap_or(&text)),
    };
    let v = i64::from_str_radix(digits, base as u32)
        .map_err(|_| format!("cannot parse {text:?} as a base {} integer", base as u32))?;
    Ok(Value::Number(if neg { -(v as f64) } else { v as f64 }))
}

fn range(a: &[Value]) -> R {
    let nums: Vec<f64> = a.iter().map(n).collect::<Result<_, _>>()?;
    let (start, end, step) = match nums.as_slice() {
        [e] => (0.0, *e, 1.0),
        [s, e] => (*s, *e, if e >= s { 1.0 } else { -1.0 }),
        [s, e, st] => (*s, *e, *st),
        _ => return Err("expects 1 to 3 arguments".into()),
    };
    if step == 0.0 {
        return Err("step must not be zero".into());
    }
    let mut out = Vec::new();
    let mut x = start;
    while (step > 0.0 && x < end) || (step < 0.0 && x > end) {
        out.push(Value::Number(x));
        if out.len() > 1024 {
            return Err("more than 1024 values".into());
        }
        x += step;
    }
    Ok(Value::List(out))
}

fn str1(name: &str, a: &[Value]) -> R {
    if name == "uuidv4" {
        arity(a, 0)?;
        return Ok(Value::String(uuid::Uuid::new_v4().to_string()));
    }
    arity(a, 1)?;
    let x = s(&a[0])?;
    Ok(match name {
        "lower" => Value::String(x.to_lowercase()),
        "upper" => Value::String(x.to_uppercase()),
        "title" => Value::String(title(&x)),
        "trimspace" => Value::String(x.trim().to_string()),
        "chomp" => Value::String(x.trim_end_matches(['\n', '\r']).to_string()),
        "strlen" => Value::Number(x.chars().count() as f64),
        "reverse" => Value::String(x.chars().rev().collect()),
        "sanitize" => Value::String(
            x.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
        ),
        "basename" => Value::String(basename(&x)),
        "dirname" => Value::String(dirname(&x)),
        "base64encode" => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(x.as_bytes()))
        }
        "base64decode" => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(x.as_bytes())
                .map_err(|e| format!("failed to decode base64 data: {e}"))?;
            Value::String(
                String::from_utf8(bytes)
                    .map_err(|_| "the result of decoding is not valid UTF-8")?,
            )
        }
        "urlencode" => Value::String(urlencode(&x)),
        "md5" => Value::String(hex(&md5::Md5::digest(x.as_bytes()))),
        "sha1" => Value::String(hex(&sha1::Sha1::digest(x.as_bytes()))),
        "sha256" => Value::String(hex(&sha2::Sha256::digest(x.as_bytes()))),
        _ => Value::String(hex(&sha2::Sha512::digest(x.as_bytes()))),
    })
}

fn str2(name: &str, a: &[Value]) -> R {
    arity(a, 2)?;
    if name == "join" {
        let sep = s(&a[0])?;
        return Ok(Value::String(strs(&a[1])?.join(&sep)));
    }
    if name == "indent" {
        let (spaces, text) = (n(&a[0])?, s(&a[1])?);
        let pad = " ".repeat(spaces.clamp(0.0, 1024.0) as usize);
        return Ok(Value::String(text.replace('\n', &format!("\n{pad}"))));
    }
    let (x, y) = (s(&a[0])?, s(&a[1])?);
    Ok(match name {
        "trimprefix" => Value::String(x.strip_prefix(y.as_str()).unwrap_or(&x).to_string()),
        "trimsuffix" => Value::String(x.strip_suffix(y.as_str()).unwrap_or(&x).to_string()),
        "trim" => Value::String(x.trim_matches(|c| y.contains(c)).to_string()),
        "split" => Value::List(if x.is_empty() {
            y.split("")
                .filter(|p| !p.is_empty())
                .map(|p| Value::String(p.into()))
                .collect()
        } else {
            y.split(x.as_str())
                .map(|p| Value::String(p.into()))
                .collect()
        }),
        "regex" => regex_match(&x, &y, false)?,
        "regexall" => regex_match(&x, &y, true)?,
        _ => {
            let ns = uuid::Uuid::parse_str(match x.as_str() {
                "dns" => "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
                "url" => "6ba7b811-9dad-11d1-80b4-00c04fd430c8",
                "oid" => "6ba7b812-9dad-11d1-80b4-00c04fd430c8",
                "x500" => "6ba7b814-9dad-11d1-80b4-00c04fd430c8",
                other => other,
            })
            .map_err(|e| e.to_string())?;
            Value::String(uuid::Uuid::new_v5(&ns, y.as_bytes()).to_string())
        }
    })
}

/// go-cty's `replace`: a `/.../` search string is a regular expression.
fn replace(x: &str, search: &str, with: &str) -> R {
    if search.len() > 1 && search.starts_with('/') && search.ends_with('/') {
        let re = regex::Regex::new(&search[1..search.len() - 1]).map_err(|e| e.to_string())?;
        return Ok(Value::String(
            re.replace_all(x, go_replacement(with).as_str())
                .into_owned(),
        ));
    }
    Ok(Value::String(x.replace(search, with)))
}

/// Go's `$1`/`${name}` replacement syntax maps onto the regex crate's, except that Go reads
/// `$1x` as the group named `1x`; the regex crate reads it the same way, so only `$$` needs
/// nothing. Kept as a function for the one place that might diverge.
fn go_replacement(with: &str) -> String {
    with.to_string()
}

fn regex_match(pattern: &str, text: &str, all: bool) -> R {
    let re = regex::Regex::new(pattern).map_err(|e| e.to_string())?;
    let names: Vec<Option<&str>> = re.capture_names().collect();
    let shape = |caps: regex::Captures| -> Value {
        if names.len() == 1 {
            return Value::String(caps.get(0).map(|m| m.as_str()).unwrap_or("").into());
        }
        if names[1..].iter().all(|n| n.is_some()) {
            return Value::Object(
                names[1..]
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        let v = caps
                            .get(i + 1)
                            .map(|m| Value::String(m.as_str().into()))
                            .unwrap_or(Value::Null);
                        (n.unwrap_or_default().to_string(), v)
                    })
                    .collect(),
            );
        }
        Value::List(
            (1..names.len())
                .map(|i| {
                    caps.get(i)
                        .map(|m| Value::String(m.as_str().into()))
                        .unwrap_or(Value::Null)
                })
                .collect(),
        )
    };
    if all {
        return Ok(Value::List(re.captures_iter(text).map(shape).collect()));
    }
    re.captures(text)
        .map(shape)
        .ok_or_else(|| "pattern did not match any part of the given string".into())
}

fn substr(a: &[Value]) -> R {
    arity(a, 3)?;
    let chars: Vec<char> = s(&a[0])?.chars().collect();
    let (mut off, len) = (n(&a[1])? as i64, n(&a[2])? as i64);
    let total = chars.len() as i64;
    if off < 0 {
        off += total;
    }
    let off = off.clamp(0, total);
    let end = if len < 0 {
        total
    } else {
        (off + len).min(total)
    };
    Ok(Value::String(
        chars[off as usize..end.max(off) as usize].iter().collect(),
    ))
}

fn title(x: &str) -> String {
    let mut out = String::new();
    let mut start = true;
    for c in x.chars() {
        if start && c.is_alphabetic() {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        // Go's strings.Title: letters, digits and '_' continue a word; anything else ends it.
        start = !(c.is_alphanumeric() || c == '_');
    }
    out
}

fn basename(p: &str) -> String {
    if p.is_empty() {
        return ".".into();
    }
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        return "/".into();
    }
    t.rsplit('/').next().unwrap_or(t).to_string()
}

fn dirname(p: &str) -> String {
    let i = p.rfind('/');
    let dir = match i {
        Some(i) => &p[..i + 1],
        None => "",
    };
    ossb_protocol::clean_path(dir)
}

fn urlencode(x: &str) -> String {
    let mut out = String::new();
    for byte in x.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn flatten(v: &Value, out: &mut Vec<Value>, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Err("lists nest too deeply".into());
    }
    for item in list(v)? {
        match item {
            Value::List(_) => flatten(&item, out, depth + 1)?,
            other => out.push(other),
        }
    }
    Ok(())
}

fn sets(name: &str, a: &[Value]) -> R {
    let ls: Vec<Vec<Value>> = a.iter().map(list).collect::<Result<_, _>>()?;
    let mut out: Vec<Value> = Vec::new();
    let push = |out: &mut Vec<Value>, v: &Value| {
        if !out.contains(v) {
            out.push(v.clone())
        }
    };
    match name {
        "setunion" => ls.iter().flatten().for_each(|v| push(&mut out, v)),
        "setintersection" => {
            if let Some(first) = ls.first() {
                first
                    .iter()
                    .filter(|v| ls.iter().all(|l| l.contains(v)))
                    .for_each(|v| push(&mut out, v));
            }
        }
        "setsubtract" => {
            arity(a, 2)?;
            ls[0]
                .iter()
                .filter(|v| !ls[1].contains(v))
                .for_each(|v| push(&mut out, v));
        }
        _ => {
            let all: Vec<&Value> = ls.iter().flatten().collect();
            all.iter()
                .filter(|v| ls.iter().filter(|l| l.contains(v)).count() % 2 == 1)
                .for_each(|v| push(&mut out, v));
        }
    }
    // cty sets print sorted; strings and numbers are the elements bake files use.
    out.sort_by(|x, y| match (x, y) {
        (Value::Number(p), Value::Number(q)) => p.total_cmp(q),
        _ => x
            .to_str()
            .unwrap_or_default()
            .cmp(&y.to_str().unwrap_or_default()),
    });
    Ok(Value::List(out))
}

/// go-cty's `format`: Go-like verbs %v %s %d %f %t %q %% with width, precision and flags.
pub(crate) fn format(f: &str, args: &[Value]) -> Result<String, String> {
    let chars: Vec<char> = f.chars().collect();
    let mut out = String::new();
    let mut next = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c != '%' {
            out.push(c);
            i += 1;
            continue;
        }
        i += 1;
        if i < chars.len() && chars[i] == '%' {
            out.push('%');
            i += 1;
            continue;
        }
        let mut flags = String::new();
        while i < chars.len() && "+- #0".contains(chars[i]) {
            flags.push(chars[i]);
            i += 1;
        }
        let mut width = String::new();
        while i < chars.len() && chars[i].is_ascii_digit() {
            width.push(chars[i]);
            i += 1;
        }
        let mut prec: Option<usize> = None;
        if i < chars.len() && chars[i] == '.' {
            i += 1;
            let mut p = String::new();
            while i < chars.len() && chars[i].is_ascii_digit() {
                p.push(chars[i]);
                i += 1;
            }
            prec = Some(p.parse().unwrap_or(0));
        }
        let Some(&verb) = chars.get(i) else {
            return Err("format string ends in the middle of a verb".into());
        };
        i += 1;
        let arg = args
            .get(next)
            .ok_or_else(|| format!("not enough arguments for format string verb %{verb}"))?;
        next += 1;
        let text = match verb {
            'v' => match arg {
                Value::String(s) => s.clone(),
                Value::List(_) | Value::Object(_) => arg.to_json().to_string(),
                Value::Null => "null".into(),
                other => other.to_str().unwrap_or_default(),
            },
            's' => s(arg)?,
            'q' => serde_json::Value::String(s(arg)?).to_string(),
            't' => b(arg)?.to_string(),
            'd' => {
                let x = n(arg)?;
                if x.fract() != 0.0 {
                    return Err(format!("%d requires an integer, got {}", format_number(x)));
                }
                let body = format!("{:.0}", x);
                if flags.contains('+') && x >= 0.0 {
                    format!("+{body}")
                } else {
                    body
                }
            }
            'f' => format!("{:.*}", prec.unwrap_or(6), n(arg)?),
            'x' => format!("{:x}", n(arg)? as i64),
            'X' => format!("{:X}", n(arg)? as i64),
            'o' => format!("{:o}", n(arg)? as i64),
            'b' => format!("{:b}", n(arg)? as i64),
            'e' => format!("{:.*e}", prec.unwrap_or(6), n(arg)?),
            other => return Err(format!("unsupported format verb %{other}")),
        };
        let text = match (verb, prec) {
            ('s' | 'v', Some(p)) => text.chars().take(p).collect(),
            _ => text,
        };
        let w: usize = width.parse().unwrap_or(0).min(1024);
        let len = text.chars().count();
        if len < w {
            let pad = w - len;
            if flags.contains('-') {
                out.push_str(&text);
                out.push_str(&" ".repeat(pad));
            } else if flags.contains('0') && "dfxXobe".contains(verb) {
                let (sign, digits) = match text.strip_prefix('-') {
                    Some(d) => ("-", d.to_string()),
                    None => ("", text.clone()),
                };
                out.push_str(sign);
                out.push_str(&"0".repeat(pad));
                out.push_str(&digits);
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(&text);
            }
        } else {
            out.push_str(&text);
        }
    }
    if next < args.len() {
        return Err(format!(
            "too many arguments; only {next} used by format string"
        ));
    }
    Ok(out)
}

fn formatlist(a: &[Value]) -> R {
    if a.is_empty() {
        return Err("expects at least 1 argument".into());
    }
    let f = s(&a[0])?;
    let mut len: Option<usize> = None;
    for v in &a[1..] {
        if let Value::List(l) = v {
            if len.is_some_and(|n| n != l.len()) {
                return Err("all list arguments must have the same length".into());
            }
            len = Some(l.len());
        }
    }
    let Some(len) = len else {
        return Ok(Value::List(vec![Value::String(format(&f, &a[1..])?)]));
    };
    let mut out = Vec::new();
    for i in 0..len {
        let row: Vec<Value> = a[1..]
            .iter()
            .map(|v| match v {
                Value::List(l) => l[i].clone(),
                other => other.clone(),
            })
            .collect();
        out.push(Value::String(format(&f, &row)?));
    }
    Ok(Value::List(out))
}

fn rfc3339(secs: i64) -> Result<String, String> {
    let t = time::OffsetDateTime::from_unix_timestamp(secs).map_err(|e| e.to_string())?;
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| e.to_string())
}

fn parse_rfc3339(ts: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("not a valid RFC3339 timestamp: {ts:?}"))
}

/// go-cty's `formatdate` spec: letter sequences are fields, quoted text is literal.
fn formatdate(f: &str, ts: &str) -> Result<String, String> {
    let t = parse_rfc3339(ts)?;
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let chars: Vec<char> = f.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' {
            i += 1;
            if chars.get(i) == Some(&'\'') {
                out.push('\'');
                i += 1;
                continue;
            }
            while i < chars.len() {
                if chars[i] == '\'' {
                    if chars.get(i + 1) == Some(&'\'') {
                        out.push('\'');
                        i += 2;
                        continue;
                    }
                    break;
                }
                out.push(chars[i]);
                i += 1;
            }
            if i >= chars.len() {
                return Err("unterminated literal '".into());
            }
            i += 1;
            continue;
        }
        if !c.is_ascii_alphabetic() {
            out.push(c);
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j] == c {
            j += 1;
        }
        let seq: String = chars[i..j].iter().collect();
        i = j;
        let month = u8::from(t.month()) as usize;
        let off = t.offset().whole_minutes();
        let hour12 = match t.hour() % 12 {
            0 => 12,
            h => h,
        };
        out.push_str(&match seq.as_str() {
            "YYYY" => format!("{:04}", t.year()),
            "YY" => format!("{:02}", t.year() % 100),
            "MMMM" => MONTHS[month - 1].to_string(),
            "MMM" => MONTHS[month - 1][..3].to_string(),
            "MM" => format!("{month:02}"),
            "M" => month.to_string(),
            "DD" => format!("{:02}", t.day()),
            "D" => t.day().to_string(),
            "EEEE" => DAYS[t.weekday().number_days_from_monday() as usize].to_string(),
            "EEE" => DAYS[t.weekday().number_days_from_monday() as usize][..3].to_string(),
            "hh" => format!("{:02}", t.hour()),
            "h" => t.hour().to_string(),
            "HH" => format!("{hour12:02}"),
            "H" => hour12.to_string(),
            "AA" => (if t.hour() < 12 { "AM" } else { "PM" }).to_string(),
            "aa" => (if t.hour() < 12 { "am" } else { "pm" }).to_string(),
            "mm" => format!("{:02}", t.minute()),
            "m" => t.minute().to_string(),
            "ss" => format!("{:02}", t.second()),
            "s" => t.second().to_string(),
            "ZZZZZ" | "ZZZZ" | "ZZZ" | "Z" => {
                if off == 0 && (seq == "Z" || seq == "ZZZ") {
                    if seq == "Z" {
                        "Z".into()
                    } else {
                        "UTC".into()
                    }
                } else {
                    let sign = if off < 0 { '-' } else { '+' };
                    let (h, m) = (off.abs() / 60, off.abs() % 60);
                    if seq == "ZZZZZ" {
                        format!("{sign}{h:02}:{m:02}")
                    } else {
                        format!("{sign}{h:02}{m:02}")
                    }
                }
            }
            other => return Err(format!("invalid date format verb {other:?}")),
        });
    }
    Ok(out)
}

/// Masterminds/semver constraints as buildx's `semvercmp` uses them: comma-separated
/// comparisons (`>=1.2.0, <2`), `||` alternatives, `~` and `^` ranges.
fn semvercmp(version: &str, constraint: &str) -> Result<bool, String> {
    let v = parse_semver(version)?;
    for alt in constraint.split("||") {
        let mut ok = true;
        for part in alt
            .split(',')
            .flat_map(|p| p.split_whitespace())
            .filter(|p| !p.is_empty())
        {
            let (op, rest) = split_op(part);
            let c = parse_semver(rest.trim_start_matches('v'))?;
            let r = cmp_semver(&v, &c);
            use std::cmp::Ordering::*;
            ok &= match op {
                "=" | "" => r == Equal,
                "!=" => r != Equal,
                ">" => r == Greater,
                ">=" | "=>" => r != Less,
                "<" => r == Less,
                "<=" | "=<" => r != Greater,
                "~" => r != Less && v.0 == c.0 && v.1 == c.1,
                "^" => r != Less && v.0 == c.0 && (c.0 != 0 || v.1 == c.1),
                other => return Err(format!("unknown constraint operator {other:?}")),
            };
        }
        if ok {
            return Ok(true);
        }
    }
    Ok(false)
}

fn split_op(p: &str) -> (&str, &str) {
    let end = p
        .find(|c: char| c.is_ascii_digit() || c == 'v')
        .unwrap_or(p.len());
    (p[..end].trim(), &p[end..])
}

type Semver = (u64, u64, u64, String);

fn parse_semver(text: &str) -> Result<Semver, String> {
    let t = text.trim().trim_start_matches('v');
    let (core, pre) = match t.split_once('-') {
        Some((c, p)) => (c, p.split('+').next().unwrap_or("").to_string()),
        None => (t.split('+').next().unwrap_or(""), String::new()),
    };
    let mut nums = core.split('.').map(|p| p.parse::<u64>());
    let major = nums
        .next()
        .and_then(|r| r.ok())
        .ok_or_else(|| format!("invalid semantic version {text:?}"))?;
    let minor = nums
        .next()
        .map(|r| r.map_err(|_| format!("invalid semantic version {text:?}")))
        .transpose()?;
    let patch = nums
        .next()
        .map(|r| r.map_err(|_| format!("invalid semantic version {text:?}")))
        .transpose()?;
    if nums.next().is_some() {
        return Err(format!("invalid semantic version {text:?}"));
    }
    Ok((major, minor.unwrap_or(0), patch.unwrap_or(0), pre))
}

fn cmp_semver(a: &Semver, b: &Semver) -> std::cmp::Ordering {
    (a.0, a.1, a.2)
        .cmp(&(b.0, b.1, b.2))
        .then_with(|| match (a.3.is_empty(), b.3.is_empty()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => a.3.cmp(&b.3),
        })
}
