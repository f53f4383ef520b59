//! Runs builds: turns a Dockerfile and a context into images and exports them.
//!
//! `ossb build` runs it in-process; each task of the build cluster (`ossb-cluster`) runs through
//! it on a worker. It never parses Dockerfile text itself beyond handing it to
//! `ossb-dockerfile`, and never touches a registry or a rootfs directly (that is
//! `ossb-image`'s and `ossb-worker`'s).

mod add;
pub mod attestations;
pub mod build;
pub mod cache;
pub mod cache_gc;
pub mod cache_miss;
mod compressed_copies;
pub mod error;
pub mod named_context;
pub mod progress;
pub mod remote_cache;
mod rootfs_pool;
mod run;
mod stage;
mod step_cache;

pub use attestations::Attestations;
pub use build::{build, Annotations, BuildError, BuildRequest, BuildResult, ExportOptions, Output};
pub use error::{AddError, CacheSpecError, StepError};
pub use named_context::{parse_build_context, ContextError, ContextSource};
pub use progress::{Event, Progress};
pub use stage::Stats;
