//! A build that ran no step keeps the provenance of the build that made its image.
//!
//! BuildKit stamps every build's provenance with its own times and a new invocation id, so
//! even a fully cached rebuild pushes a new attestation and a new index: the tag's digest
//! changes although nothing in the image did, and whatever watches the digest redeploys.
//! Here a build that ran nothing, and whose provenance says exactly what the last one's said
//! about the same image apart from those three fields, takes that build's times and id: the
//! attestation, the index and the push are the same bytes as before. Any step that runs, or
//! any other change the provenance records (an argument, a material, the Dockerfile), makes
//! a new provenance as before. With `SOURCE_DATE_EPOCH` the provenance has no times and a
//! derived id already, so nothing is kept.

use std::path::Path;

use ossb_attest::Provenance;
use ossb_protocol::Digest;
use serde::{Deserialize, Serialize};

use super::ProvenanceOptions;

/// Where the records are, under a cache or state directory.
pub(crate) const DIR: &str = "cache/provenance";

/// What a build's provenance said that changes from build to build.
#[derive(Serialize, Deserialize)]
struct Stamp {
    invocation_id: String,
    started: Option<i64>,
    finished: Option<i64>,
}

/// Gives `provenance` (of the image `image`) the stamp of the last build with the same
/// provenance when `ran_nothing`; otherwise records its own for the next build.
pub(crate) fn keep_stamp(
    dir: &Path,
    image: &Digest,
    options: &ProvenanceOptions,
    provenance: &mut Provenance,
    ran_nothing: bool,
) {
    if provenance.reproducible {
        return;
    }
    let mut unstamped = provenance.clone();
    unstamped.invocation_id.clear();
    unstamped.started = None;
    unstamped.finished = None;
    let Ok(statement) = ossb_attest::provenance_statement(options.version, &[], &unstamped) else {
        return;
    };
    let key = Digest::of(&[image.to_string().as_bytes(), b"\n", &statement.bytes].concat());
    let path = dir.join(DIR).join(format!("{}.json", key.hex()));
    if ran_nothing {
        let kept = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Stamp>(&b).ok());
        if let Some(stamp) = kept {
            provenance.invocation_id = stamp.invocation_id;
            provenance.started = stamp.started;
            provenance.finished = stamp.finished;
            // Its last use, for prune.
            crate::cache::mark_used(&path);
            return;
        }
    }
    let stamp = Stamp {
        invocation_id: provenance.invocation_id.clone(),
        started: provenance.started,
        finished: provenance.finished,
    };
    let written = serde_json::to_vec(&stamp)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            std::fs::create_dir_all(dir.join(DIR))?;
            ossb_image::export::write_file_atomically(&path, &bytes)
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
    if let Err(e) = written {
        tracing::debug!(
            "recording the provenance's stamp in {}: {e}",
            path.display()
        );
    }
    bound(&dir.join(DIR));
}

/// The most stamps kept.
const MAX_STAMPS: usize = 4096;

/// At most [`MAX_STAMPS`] records (a long-running coordinator keeps them in its state
/// directory, which nothing prunes): past it the least recently used quarter goes.
fn bound(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut stamps: Vec<(std::time::SystemTime, std::path::PathBuf)> = entries
        .flatten()
        .map(|e| {
            let used = e.metadata().and_then(|m| m.modified());
            (used.unwrap_or(std::time::UNIX_EPOCH), e.path())
        })
        .collect();
    if stamps.len() <= MAX_STAMPS {
        return;
    }
    stamps.sort();
    for (_, path) in &stamps[..stamps.len() - MAX_STAMPS * 3 / 4] {
        let _ = std::fs::remove_file(path);
    }
}
