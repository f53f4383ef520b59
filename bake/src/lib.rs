//! ossb-bake reads bake files (`docker-bake.hcl`, `docker-bake.json`, their `.override`
//! forms and compose files) and resolves them into build targets exactly as
//! `docker buildx bake` does, plus its `--print` JSON.
//!
//! ```no_run
//! let files = ossb_bake::discover(std::path::Path::new("."))?;
//! let def = ossb_bake::load(&files)?;
//! let env = |k: &str| std::env::var(k).ok();
//! let resolved = ossb_bake::resolve(&def, &[], &[], &env)?;
//! print!("{}", ossb_bake::print_json(&resolved));
//! # Ok::<(), ossb_bake::Error>(())
//! ```
//!
//! The HCL syntax is parsed by hcl-rs (its hcl-edit parser, which keeps positions); the
//! evaluation (variables, functions, references, matrices) is this crate's own, because
//! bake's language is lazy (`target.x.tags`, variables used before they are defined) and
//! user functions need closures, which hcl-rs's evaluator cannot express.

mod compose;
mod entries;
mod error;
mod eval;
mod lang;
mod overrides;
mod print;
mod resolve;
mod stdlib;
mod syntax;
mod target;
mod types;
mod value;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;

pub use entries::{Attest, CacheEntry, ExportEntry, Secret, Ssh};
pub use error::{Error, Location, LocationPrefix, Result};
pub use print::print_json;
pub use resolve::Request;
pub use stdlib::{Clock, UNSUPPORTED as UNSUPPORTED_FUNCTIONS};
pub use target::Target;
pub use value::Value;

/// A bake file's name (as shown in errors) and contents.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Hcl,
    Json,
    Compose,
}

#[derive(Debug, Clone)]
struct LoadedFile {
    name: String,
    text: String,
    kind: FileKind,
    body: Option<syntax::Body>,
}

/// Parsed bake files, in the order given; evaluated only by [`resolve`].
#[derive(Debug, Clone)]
pub struct Definition {
    files: Vec<LoadedFile>,
}

/// A group as printed: its targets (and description).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    pub description: Option<String>,
    pub targets: Vec<String>,
}

/// The targets to build and the groups they came through.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    pub groups: BTreeMap<String, Group>,
    pub targets: BTreeMap<String, Target>,
}

/// buildx's file names, in the order it reads them when no `-f` is given.
pub const DEFAULT_FILES: &[&str] = &[
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
    "docker-bake.json",
    "docker-bake.hcl",
    "docker-bake.override.json",
    "docker-bake.override.hcl",
];

/// The default bake files present in `dir`, in buildx's order.
pub fn discover(dir: &Path) -> Result<Vec<SourceFile>> {
    let mut out = Vec::new();
    for name in DEFAULT_FILES {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => out.push(SourceFile {
                name: name.to_string(),
                text,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Syntax {
                    at: Location {
                        file: name.to_string(),
                        line: 0,
                    },
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

fn kind_of(f: &SourceFile) -> FileKind {
    let lower = f.name.to_lowercase();
    if lower.ends_with(".yml") || lower.ends_with(".yaml") {
        FileKind::Compose
    } else if lower.ends_with(".json") {
        FileKind::Json
    } else if lower.ends_with(".hcl") {
        FileKind::Hcl
    } else if f.text.trim_start().starts_with('{') {
        // Like buildx: a file of unknown kind is tried as JSON/HCL unless it reads as compose.
        FileKind::Json
    } else if f.text.contains("services:") {
        FileKind::Compose
    } else {
        FileKind::Hcl
    }
}

/// Parses the files (syntax only; errors carry file and line).
pub fn load(files: &[SourceFile]) -> Result<Definition> {
    let mut out = Vec::new();
    for f in files {
        let kind = kind_of(f);
        let body = match kind {
            FileKind::Hcl => Some(syntax::parse_hcl(&f.name, &f.text)?),
            FileKind::Json => Some(syntax::parse_json(&f.name, &f.text)?),
            FileKind::Compose => {
                compose::parse(&f.name, &f.text)?;
                None
            }
        };
        out.push(LoadedFile {
            name: f.name.clone(),
            text: f.text.clone(),
            kind,
            body,
        });
    }
    Ok(Definition { files: out })
}

/// The built-in variables buildx defines for a local bake.
pub fn default_builtins() -> BTreeMap<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm/v7",
        other => other,
    };
    BTreeMap::from([
        ("BAKE_CMD_CONTEXT".to_string(), "cwd://".to_string()),
        ("BAKE_LOCAL_PLATFORM".to_string(), format!("linux/{arch}")),
    ])
}

/// Resolves `targets_or_groups` (empty: `default`) with `--set` overrides, reading variables
/// from `env`; the clock is the system's and the built-ins are [`default_builtins`].
pub fn resolve(
    def: &Definition,
    targets_or_groups: &[String],
    overrides: &[String],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Resolved> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let home = env("HOME").unwrap_or_default();
    resolve_with(
        def,
        &Request {
            targets: targets_or_groups,
            overrides,
            env,
            builtins: default_builtins(),
            clock: Clock { now, home },
        },
    )
}

/// [`resolve`] with every input explicit (tests pin the clock with it).
pub fn resolve_with(def: &Definition, req: &Request<'_>) -> Result<Resolved> {
    resolve::resolve(def, req)
}
