//! Software bills of materials for image root filesystems.
//!
//! [`scan`] walks an unpacked image and finds what is installed in it: dpkg and distroless
//! status files, Alpine's apk database, the rpmdb (SQLite), Python distributions, npm packages,
//! the modules compiled into Go binaries and the crates in Rust binaries built with
//! cargo-auditable. [`spdx_json`] writes what it found as an SPDX 2.3 JSON document, the SBOM
//! that BuildKit attaches to an image.
//!
//! A scan never reads outside the root (every open goes through directory descriptors,
//! symlinks resolved inside the root or not followed) and reads bounded amounts: metadata files
//! up to 64 MiB, only the needed sections of binaries up to 512 MiB. A file it cannot make
//! sense of becomes a [`Warning`], never an error or a panic.
//!
//! What we wrote ourselves and why: the SPDX document structs (the model crates are
//! unmaintained or generated at build time; see `document.rs`), the purl encoder (a few lines
//! whose bytes we want fixed), and every scanner (no crate reads these formats). Crates used:
//! `object` (ELF section headers only, read through its cache), `spdx` (license expressions,
//! pinned: it decides which licenses are kept), `rusqlite` with bundled SQLite (the rpmdb; a
//! C library compiled once, about a minute on two cores).
//!
//! ```no_run
//! # fn main() -> Result<(), ossb_sbom::ScanError> {
//! use std::time::{Duration, UNIX_EPOCH};
//! let packages = ossb_sbom::scan(std::path::Path::new("/tmp/rootfs"))?;
//! let doc = ossb_sbom::DocumentInfo {
//!     name: "registry.example/app:1".into(),
//!     created: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
//!     version: Some("1".into()),
//!     supplier: None,
//! };
//! std::fs::write("sbom.spdx.json", ossb_sbom::spdx_json(&doc, &packages)).ok();
//! # Ok(()) }
//! ```

mod apk;
mod auditable;
mod document;
mod dpkg;
mod elf;
mod gobuild;
mod npm;
mod osrelease;
mod package;
mod purl;
mod python;
mod rootfs;
mod rpm;
mod rpmheader;
mod stanza;

use std::path::{Path, PathBuf};

pub use document::{spdx_json, DocumentInfo, IMAGE_SPDX_ID};
pub use package::{Kind, Package, Supplier, Warning};

use osrelease::OsRelease;
use package::Findings;
use rootfs::{FileEntry, Root};

/// Why a scan could not run at all. Problems with single files are [`Warning`]s instead.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The root is missing or not a readable directory.
    #[error("cannot open image root {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a scan found, and what it had to skip.
#[derive(Debug, Default, Clone)]
pub struct Scan {
    /// The packages, sorted and without duplicates.
    pub packages: Vec<Package>,
    /// Files skipped or read in part, sorted.
    pub warnings: Vec<Warning>,
}

/// Scans the root filesystem at `root`; warnings go to the log (see [`scan_with_warnings`]).
pub fn scan(root: &Path) -> Result<Vec<Package>, ScanError> {
    let result = scan_with_warnings(root)?;
    for warning in &result.warnings {
        tracing::warn!(root = %root.display(), "sbom scan: {warning}");
    }
    Ok(result.packages)
}

/// Scans the root filesystem at `root`, returning the warnings with the packages.
pub fn scan_with_warnings(root: &Path) -> Result<Scan, ScanError> {
    let dir = Root::open(root).map_err(|source| ScanError::Root {
        path: root.to_path_buf(),
        source,
    })?;
    let mut findings = Findings::default();
    let os = OsRelease::read(&dir, &mut findings);
    dpkg::scan_status(&dir, &os, &mut findings);
    apk::scan_installed(&dir, &os, &mut findings);
    rpm::scan_rpmdb(&dir, &os, &mut findings);
    dir.walk(&mut findings, &mut |entry, findings| {
        visit(entry, &os, findings)
    });
    Ok(finish(findings))
}

/// Changes when a scan of the same files finds something else (a scanner added or fixed):
/// scans kept by a caller (by image digest) are good only for the same version.
pub const SCANNER_VERSION: u32 = 1;

/// Whether a scan reads the regular file at `rel` (relative to the root, `/`-separated) with
/// permission bits `mode` and `size` bytes. A caller that unpacks an image only to scan it
/// writes these (with every directory and symlink) and skips the rest: a scan finds the same.
pub fn reads(rel: &str, mode: u32, size: u64) -> bool {
    rel == dpkg::STATUS
        || dpkg::is_status_d_file(rel)
        || rel == apk::INSTALLED
        || rel == "etc/os-release"
        || rel == "usr/lib/os-release"
        || rpm::DIRS
            .iter()
            .any(|d| rel.strip_prefix(d).is_some_and(|r| r.starts_with('/')))
        || python::is_metadata(rel)
        || npm::is_manifest(rel)
        || elf::wants(mode, size)
}

/// Hands a file met on the walk to the scanner that wants it.
fn visit(entry: &FileEntry, os: &OsRelease, findings: &mut Findings) {
    let rel = entry.rel;
    if dpkg::is_status_d_file(rel) {
        if let Some(bytes) = read_metadata(entry, findings) {
            dpkg::scan_text(rel, &bytes, os, false, findings);
        }
    } else if python::is_metadata(rel) {
        if let Some(bytes) = read_metadata(entry, findings) {
            python::scan_metadata(rel, &bytes, findings);
        }
    } else if npm::is_manifest(rel) {
        if let Some(bytes) = read_metadata(entry, findings) {
            npm::scan_manifest(rel, &bytes, findings);
        }
    } else if elf::is_candidate(entry) {
        elf::scan(entry, findings);
    }
}

/// Package metadata files are small; one larger than this is skipped, not read.
const METADATA_LIMIT: u64 = 64 << 20;

fn read_metadata(entry: &FileEntry, findings: &mut Findings) -> Option<Vec<u8>> {
    let read = entry
        .open()
        .map_err(rootfs::ReadError::from)
        .and_then(|file| rootfs::read_capped(file, METADATA_LIMIT));
    match read {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            findings.warn(entry.rel, e.to_string());
            None
        }
    }
}

/// Sorts, and merges packages found twice (the same module in two binaries) into one with
/// both locations.
fn finish(mut findings: Findings) -> Scan {
    findings
        .packages
        .sort_by(|a, b| identity(a).cmp(&identity(b)));
    let mut packages: Vec<Package> = Vec::with_capacity(findings.packages.len());
    for package in findings.packages {
        match packages.last_mut() {
            Some(last) if identity(last) == identity(&package) => {
                last.found_at.extend(package.found_at);
            }
            _ => packages.push(package),
        }
    }
    for package in &mut packages {
        package.found_at.sort();
        package.found_at.dedup();
    }
    findings.warnings.sort();
    findings.warnings.dedup();
    Scan {
        packages,
        warnings: findings.warnings,
    }
}

/// Everything but the locations.
fn identity(p: &Package) -> impl Ord + '_ {
    (
        p.kind,
        &p.name,
        &p.version,
        &p.purl,
        &p.license,
        &p.supplier,
        &p.source,
    )
}

#[cfg(test)]
mod tests;
