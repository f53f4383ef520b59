//! Runs builds: turns a Dockerfile and a context into images and exports them.
//!
//! `ossb build` runs the coordinator in-process with one local worker and the local blob store;
//! the build cluster will add transport around the same engine. The coordinator never parses
//! Dockerfile text itself (that is `ossb-dockerfile`'s job) and never touches a registry or a
//! rootfs directly (that is `ossb-image`'s and `ossb-worker`'s).

mod add;
pub mod build;
pub mod cache;
pub mod cluster;
pub mod progress;
pub mod remote_cache;
mod run;
mod stage;

pub use build::{build, Annotations, BuildError, BuildRequest, BuildResult, Output};
pub use progress::{Event, Progress};
pub use stage::Stats;
