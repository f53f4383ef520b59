//! Which checks run and whether a failing one fails the build: the `# check=` parser
//! directive, the `BUILDKIT_DOCKERFILE_CHECK` build argument that replaces it, and the
//! `# check=` comments right before an instruction that add to it for that instruction.
//!
//! The value syntax is BuildKit's (`linter.ParseLintOptions`): up to three `;`-separated
//! `key=value` parts, `skip=all|RULE,...`, `experimental=all|RULE,...`, `error=BOOL`.

use super::rules::Rule;
use crate::Dockerfile;

/// The build argument that, when given, replaces the `# check=` directive.
pub const CHECK_BUILD_ARG: &str = "BUILDKIT_DOCKERFILE_CHECK";

/// How the checks are configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckConfig {
    /// `skip=all`: no rule runs (experimental ones asked for by name still do).
    pub skip_all: bool,
    /// Rules not to run.
    pub skip: Vec<String>,
    /// `experimental=all`.
    pub experimental_all: bool,
    /// Experimental rules to run.
    pub experimental: Vec<String>,
    /// `error=true`: a rule that reports fails the build.
    pub error: bool,
}

impl CheckConfig {
    /// Parses a `check` value such as `skip=JSONArgsRecommended,StageNameCasing;error=true`,
    /// with BuildKit's messages for what it refuses.
    pub fn parse(value: &str) -> Result<CheckConfig, String> {
        let value = value.trim();
        let mut config = CheckConfig::default();
        if value.is_empty() {
            return Ok(config);
        }
        for part in value.splitn(3, ';') {
            let Some((key, v)) = part.split_once('=') else {
                return Err(format!("invalid check option {}", crate::go_quote(part)));
            };
            match key.trim() {
                "skip" => {
                    let v = v.trim();
                    if v == "all" {
                        config.skip_all = true;
                    } else {
                        config.skip = v.split(',').map(|r| r.trim().to_string()).collect();
                    }
                }
                "experimental" => {
                    let v = v.trim();
                    if v == "all" {
                        config.experimental_all = true;
                    } else {
                        config.experimental = v.split(',').map(|r| r.trim().to_string()).collect();
                    }
                }
                "error" => {
                    config.error = go_parse_bool(v.trim()).ok_or_else(|| {
                        format!(
                            "failed to parse check option {}: strconv.ParseBool: parsing {}: invalid syntax",
                            crate::go_quote(part),
                            crate::go_quote(v.trim())
                        )
                    })?;
                }
                other => return Err(format!("invalid check option {}", crate::go_quote(other))),
            }
        }
        Ok(config)
    }

    /// The configuration a build uses: `BUILDKIT_DOCKERFILE_CHECK` when the build passes it
    /// (it replaces the directive), else the file's `# check=` directive.
    pub fn for_build(
        df: &Dockerfile,
        build_args: &std::collections::BTreeMap<String, String>,
    ) -> Result<CheckConfig, String> {
        if let Some(v) = build_args.get(CHECK_BUILD_ARG) {
            return CheckConfig::parse(v)
                .map_err(|e| format!("failed to parse {CHECK_BUILD_ARG}: {e}"));
        }
        match directive(&df.source_lines) {
            Some(v) => {
                CheckConfig::parse(&v).map_err(|e| format!("failed to parse check options: {e}"))
            }
            None => Ok(CheckConfig::default()),
        }
    }

    /// Whether `rule` runs under this configuration.
    pub fn runs(&self, rule: &Rule) -> bool {
        if rule.experimental {
            self.experimental_all || self.experimental.iter().any(|r| r == rule.name)
        } else {
            !(self.skip_all || self.skip.iter().any(|r| r == rule.name))
        }
    }

    /// This configuration with what the first `check=` comment among `comments` adds (skips
    /// and experimental rules; `error` is the file's alone). A comment BuildKit cannot parse
    /// adds nothing.
    pub fn with_comments(&self, comments: &[String]) -> CheckConfig {
        let mut merged = self.clone();
        for comment in comments {
            let Some((name, value)) = directive_parts(comment) else {
                continue;
            };
            if name != "check" {
                continue;
            }
            let value = value.split(' ').next().unwrap_or_default();
            if let Ok(extra) = CheckConfig::parse(value) {
                merged.skip_all |= extra.skip_all;
                merged.skip.extend(extra.skip);
                merged.experimental_all |= extra.experimental_all;
                merged.experimental.extend(extra.experimental);
            }
            break;
        }
        merged
    }
}

/// Go's `strconv.ParseBool`.
fn go_parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The value of the file's `# check=` directive as BuildKit reads it (`parser.ParseDirective`):
/// a `#!` first line is skipped, directives are the leading `# key=value` lines, and the value
/// ends at its first space.
pub fn directive(lines: &[String]) -> Option<String> {
    let mut lines = lines.iter();
    let mut first = lines.next();
    if first.is_some_and(|l| l.starts_with("#!")) {
        first = lines.next();
    }
    for line in first.into_iter().chain(lines) {
        let rest = line.strip_prefix('#')?;
        let (name, value) = directive_parts(rest.trim_start())?;
        if !matches!(name.as_str(), "syntax" | "escape" | "check") {
            return None;
        }
        if name == "check" {
            return Some(value.split(' ').next().unwrap_or_default().to_string());
        }
    }
    None
}

/// `^([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$` with the name lower-cased.
fn directive_parts(s: &str) -> Option<(String, String)> {
    let is_s = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c');
    let s = s.trim_start_matches(char::is_whitespace);
    if !s.chars().next()?.is_ascii_alphabetic() {
        return None;
    }
    let end = s
        .find(|c: char| !c.is_ascii_alphanumeric())
        .unwrap_or(s.len());
    let rest = s[end..].trim_start_matches(is_s).strip_prefix('=')?;
    let value = rest.trim_matches(is_s);
    (!value.is_empty()).then(|| (s[..end].to_lowercase(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::super::rules;
    use super::*;

    #[test]
    fn parses_buildkit_check_values() {
        let c = CheckConfig::parse("skip=JSONArgsRecommended, StageNameCasing;error=true").unwrap();
        assert_eq!(c.skip, ["JSONArgsRecommended", "StageNameCasing"]);
        assert!(c.error && !c.skip_all);
        assert!(!c.runs(&rules::JSON_ARGS_RECOMMENDED));
        assert!(c.runs(&rules::FROM_AS_CASING));
        let all = CheckConfig::parse("skip=all").unwrap();
        assert!(!all.runs(&rules::FROM_AS_CASING));
        // Experimental rules run only when asked for, even with skip=all.
        assert!(!CheckConfig::default().runs(&rules::INVALID_DEFINITION_DESCRIPTION));
        let exp = CheckConfig::parse("skip=all;experimental=InvalidDefinitionDescription").unwrap();
        assert!(exp.runs(&rules::INVALID_DEFINITION_DESCRIPTION));
        assert!(CheckConfig::parse("error=1").unwrap().error);
        assert_eq!(CheckConfig::parse("").unwrap(), CheckConfig::default());
    }

    #[test]
    fn refuses_what_buildkit_refuses() {
        assert_eq!(
            CheckConfig::parse("skip").unwrap_err(),
            "invalid check option \"skip\""
        );
        assert_eq!(
            CheckConfig::parse("fail=true").unwrap_err(),
            "invalid check option \"fail\""
        );
        assert_eq!(
            CheckConfig::parse("error=yes").unwrap_err(),
            "failed to parse check option \"error=yes\": strconv.ParseBool: parsing \"yes\": invalid syntax"
        );
    }

    fn lines(s: &str) -> Vec<String> {
        s.lines().map(str::to_string).collect()
    }

    #[test]
    fn reads_the_directive_as_buildkit() {
        assert_eq!(
            directive(&lines(
                "# syntax=docker/dockerfile:1\n# check=skip=all\nFROM a"
            )),
            Some("skip=all".into())
        );
        assert_eq!(
            directive(&lines(
                "#!/usr/bin/env buildctl\n#check = error=true\nFROM a"
            )),
            Some("error=true".into())
        );
        // Only up to the first space; only before anything else.
        assert_eq!(
            directive(&lines("# check=skip=A, B\nFROM a")),
            Some("skip=A,".into())
        );
        assert_eq!(directive(&lines("# hello\n# check=skip=all\nFROM a")), None);
        assert_eq!(directive(&lines("FROM a\n# check=skip=all")), None);
    }

    #[test]
    fn the_build_arg_replaces_the_directive() {
        let df = crate::parse("# check=error=true\nFROM a\n", "Dockerfile").unwrap();
        let mut args = std::collections::BTreeMap::new();
        assert!(CheckConfig::for_build(&df, &args).unwrap().error);
        args.insert(CHECK_BUILD_ARG.to_string(), "skip=all".to_string());
        let c = CheckConfig::for_build(&df, &args).unwrap();
        assert!(c.skip_all && !c.error);
        args.insert(CHECK_BUILD_ARG.to_string(), "bogus".to_string());
        assert_eq!(
            CheckConfig::for_build(&df, &args).unwrap_err(),
            "failed to parse BUILDKIT_DOCKERFILE_CHECK: invalid check option \"bogus\""
        );
    }

    #[test]
    fn comments_add_skips_for_one_instruction() {
        let base = CheckConfig::parse("error=true").unwrap();
        let merged = base.with_comments(&["check=skip=UndefinedVar".to_string()]);
        assert!(merged.error && !merged.runs(&rules::UNDEFINED_VAR));
        let unchanged = base.with_comments(&["a comment".to_string()]);
        assert_eq!(unchanged, base);
    }
}
