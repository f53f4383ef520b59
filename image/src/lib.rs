//! Everything between a blob and a registry: the OCI image model, the content-addressed
//! blob store, layer tar reading (safe application onto a rootfs) and writing, the registry
//! client with credentials, and the exporters (registry push, OCI layout).
//!
//! Nothing here runs build steps or parses Dockerfiles; the worker and coordinator call in.

pub mod export;
pub mod layer;
pub mod layout;
pub mod oci;
pub mod registry;
pub mod store;
mod writeback;

pub use oci_client::Reference;
