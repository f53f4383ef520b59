//! Build records in the coordinator's state dir: `builds/<id>.json`, one per build, rewritten
//! atomically at every change of status. At start-up every build a previous run left queued or
//! running is marked failed ("lost"), so a client that asks about it is told instead of waiting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a build is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Waiting for its context or for workers.
    Queued,
    /// Tasks are running.
    Running,
    /// It produced its image.
    Succeeded,
    /// It failed (or was lost in a restart).
    Failed,
}

/// One build's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The build id.
    pub id: String,
    /// Where it is.
    pub status: Status,
    /// The platforms built.
    pub platforms: Vec<String>,
    /// The tags.
    pub tags: Vec<String>,
    /// Seconds since the epoch at submission.
    pub submitted: i64,
    /// The image digest, once built.
    pub digest: Option<String>,
    /// The image's descriptor (OCI JSON), once built.
    #[serde(default)]
    pub descriptor: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// The exit code the client should give.
    pub exit_code: Option<i32>,
}

/// The records of one state dir.
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// Opens (creates) `state_dir/builds`.
    pub fn open(state_dir: &Path) -> std::io::Result<Records> {
        let dir = state_dir.join("builds");
        std::fs::create_dir_all(&dir)?;
        Ok(Records { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a record (atomically).
    pub fn save(&self, record: &Record) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        ossb_image::export::write_file_atomically(&self.path(&record.id), &bytes)
            .map_err(std::io::Error::other)
    }

    /// Reads a record; `None` when there is none (or it is unreadable).
    pub fn load(&self, id: &str) -> Option<Record> {
        if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return None;
        }
        let bytes = std::fs::read(self.path(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Marks every queued or running build failed: they were lost with the process that ran
    /// them. Returns their ids.
    pub fn fail_unfinished(&self) -> std::io::Result<Vec<String>> {
        let mut lost = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|_| path.extension().is_some_and(|e| e == "json"))
            else {
                continue;
            };
            let Some(mut record) = self.load(id) else {
                continue;
            };
            if matches!(record.status, Status::Queued | Status::Running) {
                record.status = Status::Failed;
                record.error = Some(
                    "the build was lost: the coordinator restarted while it ran; submit it again"
                        .into(),
                );
                record.exit_code = Some(1);
                self.save(&record)?;
                lost.push(record.id);
            }
        }
        lost.sort();
        Ok(lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_builds_are_failed_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        let mut r = Record {
            id: "b-1".into(),
            status: Status::Running,
            platforms: vec!["linux/amd64".into()],
            tags: Vec::new(),
            submitted: 0,
            digest: None,
            descriptor: None,
            error: None,
            exit_code: None,
        };
        records.save(&r).unwrap();
        r.id = "b-2".into();
        r.status = Status::Succeeded;
        records.save(&r).unwrap();
        let again = Records::open(dir.path()).unwrap();
        assert_eq!(again.fail_unfinished().unwrap(), ["b-1"]);
        let lost = again.load("b-1").unwrap();
        assert_eq!(lost.status, Status::Failed);
        assert!(lost.error.unwrap().contains("lost"));
        assert_eq!(again.load("b-2").unwrap().status, Status::Succeeded);
        assert!(again.load("../b-1").is_none());
    }
}
