//! Bake files' syntax: HCL (parsed by hcl-rs's hcl-edit, which keeps byte spans) and
//! HCL's JSON form, both read into one small tree of blocks and attributes whose
//! expressions stay unevaluated until resolution.

use std::sync::Arc;

use hcl::edit::expr::Expression;
use hcl::edit::parser;
use hcl::edit::structure::{self, BlockLabel, Structure};
use hcl::edit::Span;

use crate::error::{Error, Location, Result};

/// Brackets may nest this deep in a file: the parser recurses per level, and a hostile file
/// must not overflow the stack.
const MAX_NESTING: usize = 128;

/// An expression with the place it came from.
#[derive(Debug, Clone)]
pub(crate) struct Attr {
    pub name: String,
    pub expr: Expression,
    pub at: Location,
}

/// A block (`target "app" { ... }`) with its attributes and nested blocks.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub kind: String,
    pub labels: Vec<String>,
    pub body: Body,
    pub at: Location,
}

/// The top level of a file, or a block's contents.
#[derive(Debug, Clone, Default)]
pub(crate) struct Body {
    pub attrs: Vec<Attr>,
    pub blocks: Vec<Block>,
}

impl Body {
    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.iter().rev().find(|a| a.name == name)
    }
}

/// Byte offsets to 1-based lines.
struct Lines {
    starts: Vec<usize>,
}

impl Lines {
    fn new(text: &str) -> Lines {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Lines { starts }
    }
    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset)
    }
}

fn check_nesting(name: &str, text: &str) -> Result<()> {
    let (mut depth, mut max, mut line) = (0usize, 0usize, 1usize);
    for c in text.chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                if depth > max {
                    max = depth;
                }
                if max > MAX_NESTING {
                    return Err(Error::Limit {
                        at: Location {
                            file: name.into(),
                            line,
                        },
                        message: format!("brackets nest deeper than {MAX_NESTING} levels"),
                    });
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '\n' => line += 1,
            _ => {}
        }
    }
    Ok(())
}

/// Parses a file in HCL's native syntax.
pub(crate) fn parse_hcl(name: &str, text: &str) -> Result<Body> {
    check_nesting(name, text)?;
    let body = parser::parse_body(text).map_err(|e| Error::Syntax {
        at: Location {
            file: name.into(),
            line: e.location().line(),
        },
        message: e.message().to_string(),
    })?;
    let lines = Lines::new(text);
    let file: Arc<str> = name.into();
    Ok(convert_body(&file, &lines, body))
}

fn location(file: &Arc<str>, lines: &Lines, span: Option<std::ops::Range<usize>>) -> Location {
    Location {
        file: file.to_string(),
        line: span.map(|s| lines.line(s.start)).unwrap_or(0),
    }
}

fn convert_body(file: &Arc<str>, lines: &Lines, body: structure::Body) -> Body {
    let mut out = Body::default();
    for s in body.into_iter() {
        match s {
            Structure::Attribute(a) => {
                let at = location(file, lines, a.span());
                out.attrs.push(Attr {
                    name: a.key.as_str().to_string(),
                    expr: a.value,
                    at,
                });
            }
            Structure::Block(b) => {
                let at = location(file, lines, b.span());
                let labels = b
                    .labels
                    .iter()
                    .map(|l| match l {
                        BlockLabel::Ident(i) => i.as_str().to_string(),
                        BlockLabel::String(s) => s.value().to_string(),
                    })
                    .collect();
                let kind = b.ident.as_str().to_string();
                out.blocks.push(Block {
                    kind,
                    labels,
                    body: convert_body(file, lines, b.body),
                    at,
                });
            }
        }
    }
    out
}

/// Parses a file in HCL's JSON form: the top object's keys are attributes, except the block
/// types bake knows (`variable`, `function`, `target`, `group`), whose objects hold one
/// object (or a list of them) per label. Every JSON string is a template, as in HCL.
pub(crate) fn parse_json(name: &str, text: &str) -> Result<Body> {
    check_nesting(name, text)?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Syntax {
        at: Location {
            file: name.into(),
            line: e.line(),
        },
        message: e.to_string(),
    })?;
    let serde_json::Value::Object(top) = value else {
        return Err(Error::Syntax {
            at: Location {
                file: name.into(),
                line: 1,
            },
            message: "a JSON bake file must be an object".into(),
        });
    };
    let lines: Vec<&str> = text.lines().collect();
    let line_of = |key: &str| -> usize {
        let quoted = format!("\"{key}\"");
        lines
            .iter()
            .position(|l| l.contains(&quoted))
            .map(|i| i + 1)
            .unwrap_or(0)
    };
    let at = |key: &str| Location {
        file: name.into(),
        line: line_of(key),
    };
    let mut body = Body::default();
    for (key, v) in top {
        match key.as_str() {
            "variable" | "function" | "target" | "group" => {
                let serde_json::Value::Object(entries) = v else {
                    return Err(Error::Syntax {
                        at: at(&key),
                        message: format!("{key} must be an object of labelled blocks"),
                    });
                };
                for (label, inner) in entries {
                    let items = match inner {
                        serde_json::Value::Array(items) => items,
                        other => vec![other],
                    };
                    for item in items {
                        let block_at = at(&label);
                        let serde_json::Value::Object(fields) = item else {
                            return Err(Error::Syntax {
                                at: block_at,
                                message: format!("{key} \"{label}\" must be an object"),
                            });
                        };
                        let mut inner_body = Body::default();
                        for (k, v) in fields {
                            if key == "variable" && k == "validation" {
                                inner_body
                                    .blocks
                                    .extend(json_validation(name, &at(&k), &v)?);
                                continue;
                            }
                            let expr = json_expr(name, &at(&k), &v)?;
                            inner_body.attrs.push(Attr {
                                name: k.clone(),
                                expr,
                                at: at(&k),
                            });
                        }
                        body.blocks.push(Block {
                            kind: key.clone(),
                            labels: vec![label.clone()],
                            body: inner_body,
                            at: block_at,
                        });
                    }
                }
            }
            _ => {
                let expr = json_expr(name, &at(&key), &v)?;
                body.attrs.push(Attr {
                    name: key.clone(),
                    expr,
                    at: at(&key),
                });
            }
        }
    }
    Ok(body)
}

fn json_validation(name: &str, at: &Location, v: &serde_json::Value) -> Result<Vec<Block>> {
    let items = match v {
        serde_json::Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let mut out = Vec::new();
    for item in items {
        let serde_json::Value::Object(fields) = item else {
            continue;
        };
        let mut body = Body::default();
        for (k, v) in fields {
            body.attrs.push(Attr {
                name: k,
                expr: json_expr(name, at, &v)?,
                at: at.clone(),
            });
        }
        out.push(Block {
            kind: "validation".into(),
            labels: vec![],
            body,
            at: at.clone(),
        });
    }
    Ok(out)
}

/// A JSON value as an HCL expression: written out as HCL text and parsed, so that strings
/// become templates exactly as HCL's JSON form says.
fn json_expr(name: &str, at: &Location, v: &serde_json::Value) -> Result<Expression> {
    let mut text = String::new();
    write_hcl(&mut text, v);
    parser::parse_expr(&text).map_err(|e| Error::Syntax {
        at: at.clone(),
        message: format!("in {name}: {}", e.message()),
    })
}

fn write_hcl(out: &mut String, v: &serde_json::Value) {
    match v {
        serde_json::Value::Null => out.push_str("null"),
        serde_json::Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        serde_json::Value::Number(n) => out.push_str(&n.to_string()),
        serde_json::Value::String(s) => write_quoted(out, s),
        serde_json::Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_hcl(out, item);
            }
            out.push(']');
        }
        serde_json::Value::Object(o) => {
            out.push('{');
            for (i, (k, item)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                // Keys are literal in JSON: escape template openers.
                write_quoted(out, &k.replace("${", "$${").replace("%{", "%%{"));
                out.push_str(" = ");
                write_hcl(out, item);
            }
            out.push('}');
        }
    }
}

fn write_quoted(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
