//! `--name[=value]` flags of instructions, checked against what each instruction accepts.

use crate::error::closest;

/// What kind of value a flag takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    /// `--link`, `--link=true`, `--link=false`.
    Bool,
    /// `--from=x`, at most once.
    Str,
    /// `--mount=...`, any number of times.
    Multi,
}

/// The flags an instruction accepts.
pub(crate) fn accepted(instruction: &str) -> &'static [(&'static str, Kind)] {
    use Kind::*;
    match instruction {
        "FROM" => &[("platform", Str)],
        "COPY" => &[
            ("chown", Str),
            ("from", Str),
            ("chmod", Str),
            ("link", Bool),
            ("exclude", Multi),
            ("parents", Bool),
        ],
        "ADD" => &[
            ("chown", Str),
            ("chmod", Str),
            ("link", Bool),
            ("keep-git-dir", Bool),
            ("checksum", Str),
            ("unpack", Bool),
            ("exclude", Multi),
        ],
        "RUN" => &[
            ("mount", Multi),
            ("network", Str),
            ("security", Str),
            ("device", Multi),
        ],
        "HEALTHCHECK" => &[
            ("interval", Str),
            ("timeout", Str),
            ("start-period", Str),
            ("start-interval", Str),
            ("retries", Str),
        ],
        _ => &[],
    }
}

/// Parsed flags of one instruction, in the order written.
#[derive(Debug, Clone, Default)]
pub(crate) struct Flags {
    values: Vec<(String, String)>,
}

/// A flag problem: the message and, for unknown flags, a hint.
pub(crate) struct FlagError {
    pub message: String,
    pub hint: Option<String>,
    pub flag: String,
}

impl Flags {
    /// Checks `raw` (`--name=value` words) against what `instruction` accepts.
    pub fn parse(instruction: &str, raw: &[String]) -> Result<Flags, FlagError> {
        let known = accepted(instruction);
        let mut values: Vec<(String, String)> = Vec::new();
        for word in raw {
            let fail = |message: String, hint: Option<String>| FlagError {
                message,
                hint,
                flag: word.clone(),
            };
            let Some(body) = word.strip_prefix("--") else {
                return Err(fail(
                    format!("Arguments to {instruction} must be in the form --name=value: {word}"),
                    None,
                ));
            };
            let (name, value) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let Some((_, kind)) = known.iter().find(|(n, _)| *n == name) else {
                let hint = closest(name, known.iter().map(|(n, _)| *n))
                    .map(|c| format!("did you mean --{c}?"));
                let hint = hint.or_else(|| {
                    if known.is_empty() {
                        Some(format!("{instruction} takes no flags"))
                    } else {
                        let names: Vec<String> =
                            known.iter().map(|(n, _)| format!("--{n}")).collect();
                        Some(format!("{instruction} accepts {}", names.join(", ")))
                    }
                });
                return Err(fail(
                    format!("unknown flag --{name} for {instruction}"),
                    hint,
                ));
            };
            let value = match (kind, value) {
                (Kind::Bool, None) => "true".to_string(),
                (Kind::Bool, Some(v)) => match v.to_lowercase().as_str() {
                    "true" | "" => "true".to_string(),
                    "false" => "false".to_string(),
                    _ => {
                        return Err(fail(
                            format!("expecting boolean value for flag {name}, not: {v}"),
                            Some(format!("write --{name} or --{name}=false")),
                        ))
                    }
                },
                (_, None) => {
                    return Err(fail(
                        format!("Missing a value on flag: {name}"),
                        Some(format!("write --{name}=VALUE")),
                    ))
                }
                (_, Some(v)) => v.to_string(),
            };
            if *kind != Kind::Multi && values.iter().any(|(n, _)| n == name) {
                return Err(fail(format!("Duplicate flag specified: {name}"), None));
            }
            values.push((name.to_string(), value));
        }
        Ok(Flags { values })
    }

    /// The value of a single-valued flag.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a boolean flag is on.
    pub fn bool(&self, name: &str) -> bool {
        self.get(name) == Some("true")
    }

    /// A boolean flag's value when it was given at all.
    pub fn opt_bool(&self, name: &str) -> Option<bool> {
        self.get(name).map(|v| v == "true")
    }

    /// Every value of a repeatable flag.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.values
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}
