//! Types shared by every ossb node: content digests and platforms.
//!
//! This crate holds plain data and its parsing, never I/O. Everything else in the
//! workspace names blobs with [`Digest`] and architectures with [`Platform`].

mod digest;
mod platform;

pub use digest::{Digest, DigestError, Sha256Writer};
pub use platform::{Platform, PlatformError};
