//! The checks' results as buildx prints them: `--call=check` (text and `format=json`), the
//! summary at the end of a build, `--call=outline` and `--call=targets`.

use super::json::J;
use super::{Outline, Report, Target, Warning};
use crate::Error;

/// A build's closing summary of its warnings, as buildx prints it (the hint names ossb's
/// way to see every detail: `--check`).
pub fn summary(warnings: &[Warning]) -> String {
    let mut out = match warnings.len() {
        0 => return String::new(),
        1 => "1 warning found".to_string(),
        n => format!("{n} warnings found"),
    };
    out.push_str(" (use --check to expand):\n");
    for w in warnings {
        out.push_str(&format!(" - {}\n", w.short()));
    }
    out
}

/// What `--call=check` prints on stdout: the count, then each warning (sorted by line) with
/// its rule, link, message and the lines around it; "no warnings found" when there is none.
/// An error ([`Report::error`]) is printed apart, with [`error_text`].
pub fn lint_text(file: &str, source: &str, report: &Report) -> String {
    let mut out = String::new();
    let n = report.warnings.len();
    match n {
        0 if report.error.is_none() => return "Check complete, no warnings found.\n".into(),
        0 => return out,
        1 => out.push_str("Check complete, 1 warning has been found!\n"),
        n => out.push_str(&format!("Check complete, {n} warnings have been found!\n")),
    }
    let mut sorted: Vec<&Warning> = report.warnings.iter().collect();
    sorted.sort_by_key(|w| w.start_line);
    for w in sorted {
        out.push_str(&format!("\nWARNING: {}", w.rule.name));
        if !w.rule.url.is_empty() {
            out.push_str(&format!(" - {}", w.rule.url));
        }
        out.push_str(&format!("\n{}\n", w.message));
        snippet(&mut out, file, source, w.start_line, w.end_line);
    }
    if report.error.is_some() {
        out.push('\n');
    }
    out
}

/// An error of `--call=check` as buildx prints it: the message, then the lines around it.
pub fn error_text(file: &str, source: &str, message: &str, line: usize) -> String {
    let mut out = format!("{message}\n");
    snippet(&mut out, file, source, line, line);
    out
}

/// BuildKit's source excerpt (`errdefs.Source.Print`): `file:line`, then the lines around the
/// range, those in it marked `>>>`.
fn snippet(out: &mut String, file: &str, source: &str, first: usize, last: usize) {
    let lines: Vec<&str> = source.split('\n').collect();
    if first < 1 || first > lines.len() {
        return;
    }
    let (mut start, mut end) = (first, last.max(first).min(lines.len()));
    let pad = if end == start { 4 } else { 2 };
    let mut p = 0;
    while p < pad {
        if start > 1 {
            start -= 1;
            p += 1;
        }
        if end != lines.len() {
            end += 1;
            p += 1;
        }
        p += 1;
    }
    out.push_str(&format!("{file}:{first}\n--------------------\n"));
    for (i, line) in lines.iter().enumerate().take(end).skip(start - 1) {
        let n = i + 1;
        let mark = if n >= first && n <= last.max(first) {
            ">>>"
        } else {
            "   "
        };
        out.push_str(&format!(" {n:>3} | {mark} {line}\n"));
    }
    out.push_str("--------------------\n");
}

fn location(start: usize, end: usize) -> J {
    J::Obj(vec![(
        "ranges",
        J::Arr(vec![J::Obj(vec![
            ("start", J::Obj(vec![("line", J::Num(start as i64))])),
            ("end", J::Obj(vec![("line", J::Num(end as i64))])),
        ])]),
    )])
}

/// `--call=check,format=json`: BuildKit's lint result (`warnings`, in the order found;
/// `sources`; `buildError` when the checks stopped at an error).
pub fn lint_json(file: &str, source: &str, report: &Report) -> String {
    let warnings = if report.warnings.is_empty() {
        J::Null
    } else {
        J::Arr(
            report
                .warnings
                .iter()
                .map(|w| {
                    let mut fields = vec![
                        ("ruleName", J::s(w.rule.name)),
                        ("description", J::s(w.rule.description)),
                    ];
                    if !w.rule.url.is_empty() {
                        fields.push(("url", J::s(w.rule.url)));
                    }
                    fields.push(("detail", J::s(&w.message)));
                    fields.push(("location", location(w.start_line, w.end_line)));
                    J::Obj(fields)
                })
                .collect(),
        )
    };
    let mut fields = vec![
        ("warnings", warnings),
        (
            "sources",
            J::Arr(vec![J::Obj(vec![
                ("filename", J::s(file)),
                ("data", J::bytes(source.as_bytes())),
                ("language", J::s("Dockerfile")),
            ])]),
        ),
    ];
    if let Some(e) = &report.error {
        fields.push(("buildError", build_error(e)));
    }
    J::Obj(fields).pretty()
}

fn build_error(e: &Error) -> J {
    let mut message = e.message.clone();
    if let Some(h) = &e.hint {
        message.push_str(&format!(" ({h})"));
    }
    let location = if e.line > 0 {
        location(e.line, e.line)
    } else {
        J::Obj(vec![])
    };
    J::Obj(vec![("message", J::s(message)), ("location", location)])
}

/// Go's `tabwriter` with a space pad: every tab-ended cell padded to its column's widest
/// plus `padding`; the last cell of a line as it is.
fn table(rows: &[Vec<String>], padding: usize) -> String {
    let columns = rows
        .iter()
        .map(|r| r.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter(|r| c + 1 < r.len())
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
                + padding
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        for (c, cell) in row.iter().enumerate() {
            out.push_str(cell);
            if c + 1 < row.len() {
                out.push_str(&" ".repeat(widths[c] - cell.chars().count()));
            }
        }
        out.push('\n');
    }
    out
}

/// `--call=outline`: the target, its build arguments, secrets and SSH sockets.
pub fn outline_text(o: &Outline) -> String {
    let mut out = String::new();
    if !o.name.is_empty() || !o.description.is_empty() {
        let name = if o.name.is_empty() {
            "(default)"
        } else {
            &o.name
        };
        let mut rows = vec![vec!["TARGET:".to_string(), name.to_string()]];
        if !o.description.is_empty() {
            rows.push(vec!["DESCRIPTION:".into(), o.description.clone()]);
        }
        out.push_str(&table(&rows, 1));
        out.push('\n');
    }
    if !o.args.is_empty() {
        let mut rows = vec![vec![
            "BUILD ARG".into(),
            "VALUE".into(),
            "DESCRIPTION".into(),
        ]];
        for a in &o.args {
            rows.push(vec![a.name.clone(), a.value.clone(), a.description.clone()]);
        }
        out.push_str(&table(&rows, 3));
        out.push('\n');
    }
    for (title, mounts) in [("SECRET", &o.secrets), ("SSH", &o.ssh)] {
        if mounts.is_empty() {
            continue;
        }
        let mut rows = vec![vec![title.to_string(), "REQUIRED".into()]];
        for m in mounts {
            rows.push(vec![
                m.name.clone(),
                if m.required {
                    "true".into()
                } else {
                    String::new()
                },
            ]);
        }
        out.push_str(&table(&rows, 3));
        out.push('\n');
    }
    out
}

/// `--call=outline,format=json`.
pub fn outline_json(o: &Outline, source: &str) -> String {
    let mut fields = Vec::new();
    if !o.name.is_empty() {
        fields.push(("name", J::s(&o.name)));
    }
    if !o.description.is_empty() {
        fields.push(("description", J::s(&o.description)));
    }
    if !o.args.is_empty() {
        let args = o
            .args
            .iter()
            .map(|a| {
                let mut f = vec![("name", J::s(&a.name))];
                if !a.description.is_empty() {
                    f.push(("description", J::s(&a.description)));
                }
                if !a.value.is_empty() {
                    f.push(("value", J::s(&a.value)));
                }
                f.push(("location", location(a.start_line, a.end_line)));
                J::Obj(f)
            })
            .collect();
        fields.push(("args", J::Arr(args)));
    }
    for (key, mounts) in [("secrets", &o.secrets), ("ssh", &o.ssh)] {
        if mounts.is_empty() {
            continue;
        }
        let list = mounts
            .iter()
            .map(|m| {
                let mut f = vec![("name", J::s(&m.name))];
                if m.required {
                    f.push(("required", J::Bool(true)));
                }
                f.push(("location", location(m.start_line, m.end_line)));
                J::Obj(f)
            })
            .collect();
        fields.push((key, J::Arr(list)));
    }
    fields.push(("sources", J::Arr(vec![J::bytes(source.as_bytes())])));
    J::Obj(fields).pretty()
}

/// `--call=targets`: each stage and its description, the default marked.
pub fn targets_text(targets: &[Target]) -> String {
    let mut rows = vec![vec!["TARGET".to_string(), "DESCRIPTION".to_string()]];
    for t in targets {
        let name = match (t.name.is_empty(), t.default) {
            (true, true) => "(default)".to_string(),
            (false, true) => format!("{} (default)", t.name),
            _ => t.name.clone(),
        };
        rows.push(vec![name, t.description.clone()]);
    }
    table(&rows, 1)
}

/// `--call=targets,format=json`.
pub fn targets_json(targets: &[Target], source: &str) -> String {
    let list = targets
        .iter()
        .map(|t| {
            let mut f = Vec::new();
            if !t.name.is_empty() {
                f.push(("name", J::s(&t.name)));
            }
            if t.default {
                f.push(("default", J::Bool(true)));
            }
            for (k, v) in [
                ("description", &t.description),
                ("base", &t.base),
                ("platform", &t.platform),
            ] {
                if !v.is_empty() {
                    f.push((k, J::s(v)));
                }
            }
            f.push(("location", location(t.start_line, t.end_line)));
            J::Obj(f)
        })
        .collect();
    J::Obj(vec![
        ("targets", J::Arr(list)),
        ("sources", J::Arr(vec![J::bytes(source.as_bytes())])),
    ])
    .pretty()
}
