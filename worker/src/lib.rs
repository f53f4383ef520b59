//! Executes build steps on a rootfs: unpacks base layers, runs RUN in a sandbox entered from a
//! single-threaded child process, copies files for COPY, and turns each step's filesystem change
//! into a layer: read from an overlayfs upper directory for RUN ([`overlay`]), recorded as written
//! for COPY and WORKDIR ([`fs`]), or found by comparing metadata snapshots where overlayfs is not
//! available ([`snapshot`]).

pub mod base;
pub mod checksum;
pub mod emulation;
pub mod fs;
pub mod mounts;
pub mod overlay;
pub mod rootless;
pub mod sandbox;
pub mod shared_cache;
pub mod snapshot;
pub mod ssh;
pub mod step_output;
pub mod userns;
