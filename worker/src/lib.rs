//! Executes build steps on a rootfs: unpacks base layers, runs RUN in a sandbox entered from a
//! single-threaded child process, copies files for COPY, and turns each step's filesystem change
//! into a layer through snapshots.

pub mod checksum;
pub mod emulation;
pub mod fs;
pub mod mounts;
pub mod sandbox;
pub mod snapshot;
pub mod userns;
