//! The one error type of the crate: what went wrong, and where (file, line, attribute).

use std::fmt;

/// A place in a bake file: the file's name as given and a 1-based line (0 when unknown).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    /// The file's name as it was handed to [`crate::load`].
    pub file: String,
    /// 1-based line; 0 when the error has no single line (a whole-file problem).
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}", self.file, self.line)
        }
    }
}

/// Everything that can fail while reading or resolving a bake definition.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not valid HCL, JSON or YAML.
    #[error("{at}: syntax error: {message}")]
    Syntax { at: Location, message: String },
    /// An expression or attribute could not be evaluated (unknown variable, wrong type, a
    /// function called with the wrong arity, a failed validation...).
    #[error("{at}: {attr}: {message}")]
    Eval {
        at: Location,
        /// The attribute (or block) being evaluated, e.g. `target "app".tags`.
        attr: String,
        message: String,
    },
    /// A target or group that was asked for (or inherited, or linked) does not exist.
    #[error("{at}failed to find target {name}")]
    UnknownTarget { at: LocationPrefix, name: String },
    /// `inherits` or `target:` contexts loop back on themselves.
    #[error("{at}{message}")]
    Cycle { at: LocationPrefix, message: String },
    /// A `--set` override is malformed or names an unknown key.
    #[error("invalid override {0}")]
    Override(String),
    /// A limit that keeps hostile input small was hit (nesting, matrix size...).
    #[error("{at}: {message}")]
    Limit { at: Location, message: String },
}

/// A location shown as `file:line: ` before a message, or nothing when there is none
/// (a target named on the command line has no place in a file).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocationPrefix(pub Option<Location>);

impl fmt::Display for LocationPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(at) => write!(f, "{at}: "),
            None => Ok(()),
        }
    }
}

impl Error {
    /// Where the error is, if it has a place in a file.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Error::Syntax { at, .. } | Error::Eval { at, .. } | Error::Limit { at, .. } => Some(at),
            Error::UnknownTarget { at, .. } | Error::Cycle { at, .. } => at.0.as_ref(),
            Error::Override(_) => None,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
