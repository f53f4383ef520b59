//! What the coordinator keeps across a restart, in one redb database in its state dir
//! (`coordinator.redb`): a record of every build, the submission of every build accepted and not
//! finished (so a restarted coordinator runs it again), the cluster's step records (so a
//! resubmission after a restart still runs nothing) and the latest content of each cache
//! mount.
//!
//! redb rather than files of our own: a build record, its submission and a batch of step
//! records change together in one transaction, and a `kill -9` halfway leaves the last
//! committed state, never a torn file.

use std::path::Path;

use ossb_protocol::cluster::{BuildSpec, BuiltImage, CacheMountVersion};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

/// Build records by build id (JSON of [`Record`]).
const BUILDS: TableDefinition<&str, &[u8]> = TableDefinition::new("builds");
/// The submissions of accepted, unfinished builds by build id (postcard of [`BuildSpec`]).
const SUBMISSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("submissions");
/// Step records by step key (postcard of [`StepRecord`]).
const STEPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("steps");
/// Step keys by the order they were recorded in, oldest first (for eviction).
const STEP_ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("step_order");
/// The cache mounts' latest content, by platform and id (`PLATFORM ID`; postcard of
/// [`CacheMountVersion`]).
const CACHE_MOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("cache_mounts");

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
    /// The image, once built: what a client that lost its connection is told.
    #[serde(default)]
    pub image: Option<BuiltImage>,
    /// Why it failed.
    pub error: Option<String>,
    /// The exit code the client should give.
    pub exit_code: Option<i32>,
    /// The bake it is a target of: a restarted coordinator runs a bake's unfinished targets
    /// again as one graph, so that they still share stages and read each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<BakeTarget>,
}

/// A build's place in a bake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BakeTarget {
    /// The bake, named by its first target's build id.
    pub bake: String,
    /// The target's name in the bake.
    pub target: String,
}

/// A step some task built: its cache record (JSON, as the workers' engines write it) and the
/// build whose task built it (a `--no-cache` build reuses only its own steps).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The engine's cache record.
    pub record: String,
    /// The build that made it.
    pub build: String,
}

/// Unfinished builds after a restart: those to run again with their submission, and the ids
/// of those marked failed.
pub type Unfinished = (Vec<(Record, BuildSpec)>, Vec<String>);

/// An error of the state database, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("the coordinator's state database ({what}): {message}")]
pub struct RecordsError {
    what: &'static str,
    message: String,
}

fn failed<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> RecordsError {
    move |e| RecordsError {
        what,
        message: e.to_string(),
    }
}

/// The coordinator's state database.
pub struct Records {
    db: Database,
}

impl Records {
    /// Opens (creates) `state_dir/coordinator.redb`.
    pub fn open(state_dir: &Path) -> Result<Records, RecordsError> {
        std::fs::create_dir_all(state_dir).map_err(failed("creating the state dir"))?;
        let db = Database::create(state_dir.join("coordinator.redb"))
            .map_err(failed("opening coordinator.redb"))?;
        // Tables exist from the start, so reads never meet a missing table.
        let txn = db.begin_write().map_err(failed("creating the tables"))?;
        for table in [BUILDS, SUBMISSIONS, CACHE_MOUNTS] {
            txn.open_table(table)
                .map_err(failed("creating the tables"))?;
        }
        txn.open_table(STEPS)
            .map_err(failed("creating the tables"))?;
        txn.open_table(STEP_ORDER)
            .map_err(failed("creating the tables"))?;
        txn.commit().map_err(failed("creating the tables"))?;
        Ok(Records { db })
    }

    /// Writes a record; with `submission`, also the build's submission (kept until a record
    /// of the build says it finished). A submission that carries secrets is not kept: secret
    /// values never reach a file (freed database pages would hold them after the build), so
    /// such a build does not survive a restart.
    pub fn save(
        &self,
        record: &Record,
        submission: Option<&BuildSpec>,
    ) -> Result<(), RecordsError> {
        self.save_all(&[(record, submission)])
    }

    /// [`Records::save`] of several builds in one transaction: a bake's targets are all
    /// accepted or none, so a restart never finds part of a bake.
    pub fn save_all(&self, builds: &[(&Record, Option<&BuildSpec>)]) -> Result<(), RecordsError> {
        let txn = self.db.begin_write().map_err(failed("saving a build"))?;
        {
            let mut records = txn.open_table(BUILDS).map_err(failed("saving a build"))?;
            let mut submissions = txn
                .open_table(SUBMISSIONS)
                .map_err(failed("saving a build"))?;
            for (record, submission) in builds {
                let json = serde_json::to_vec(record).map_err(failed("encoding a build record"))?;
                let spec = submission
                    .filter(|s| s.secrets.is_empty())
                    .map(postcard::to_allocvec)
                    .transpose()
                    .map_err(failed("encoding a submission"))?;
                records
                    .insert(record.id.as_str(), json.as_slice())
                    .map_err(failed("saving a build"))?;
                if let Some(spec) = &spec {
                    submissions
                        .insert(record.id.as_str(), spec.as_slice())
                        .map_err(failed("saving a build"))?;
                }
                if matches!(record.status, Status::Succeeded | Status::Failed) {
                    submissions
                        .remove(record.id.as_str())
                        .map_err(failed("saving a build"))?;
                }
            }
        }
        txn.commit().map_err(failed("saving a build"))
    }

    /// Reads a record; `None` when there is none (or it is unreadable).
    pub fn load(&self, id: &str) -> Option<Record> {
        let txn = self.db.begin_read().ok()?;
        let builds = txn.open_table(BUILDS).ok()?;
        let bytes = builds.get(id).ok()??;
        serde_json::from_slice(bytes.value()).ok()
    }

    /// The builds a previous run left queued or running: those it had accepted come back
    /// with their submission, to run again; the others (still receiving their context) are
    /// marked failed, since their client must send them again. Returns (resumed, lost).
    pub fn unfinished(&self) -> Result<Unfinished, RecordsError> {
        let mut resumed = Vec::new();
        let mut lost = Vec::new();
        {
            let txn = self.db.begin_read().map_err(failed("reading the builds"))?;
            let builds = txn
                .open_table(BUILDS)
                .map_err(failed("reading the builds"))?;
            let submissions = txn
                .open_table(SUBMISSIONS)
                .map_err(failed("reading the builds"))?;
            for entry in builds.iter().map_err(failed("reading the builds"))? {
                let (id, bytes) = entry.map_err(failed("reading the builds"))?;
                let Ok(record) = serde_json::from_slice::<Record>(bytes.value()) else {
                    continue;
                };
                if !matches!(record.status, Status::Queued | Status::Running) {
                    continue;
                }
                let spec = submissions
                    .get(id.value())
                    .map_err(failed("reading the builds"))?
                    .and_then(|s| postcard::from_bytes::<BuildSpec>(s.value()).ok());
                match spec {
                    Some(spec) => resumed.push((record, spec)),
                    None => lost.push(record),
                }
            }
        }
        let mut lost_ids = Vec::new();
        for mut record in lost {
            record.status = Status::Failed;
            record.error = Some(
                "the build was lost: the coordinator restarted before it had received the build's context, or the build carried secrets (never written to disk); submit it again"
                    .into(),
            );
            record.exit_code = Some(1);
            self.save(&record, None)?;
            lost_ids.push(record.id);
        }
        lost_ids.sort();
        Ok((resumed, lost_ids))
    }

    /// Every step record, oldest first.
    pub fn steps(&self) -> Result<Vec<([u8; 32], StepRecord)>, RecordsError> {
        let txn = self.db.begin_read().map_err(failed("reading the steps"))?;
        let order = txn
            .open_table(STEP_ORDER)
            .map_err(failed("reading the steps"))?;
        let steps = txn.open_table(STEPS).map_err(failed("reading the steps"))?;
        let mut out = Vec::new();
        for entry in order.iter().map_err(failed("reading the steps"))? {
            let (_, key) = entry.map_err(failed("reading the steps"))?;
            let Ok(key) = <[u8; 32]>::try_from(key.value()) else {
                continue;
            };
            let Some(bytes) = steps
                .get(key.as_slice())
                .map_err(failed("reading the steps"))?
            else {
                continue;
            };
            if let Ok(step) = postcard::from_bytes(bytes.value()) {
                out.push((key, step));
            }
        }
        Ok(out)
    }

    /// Adds step records (one transaction for the batch), then drops the oldest beyond `max`.
    pub fn add_steps(
        &self,
        batch: &[([u8; 32], StepRecord)],
        max: usize,
    ) -> Result<(), RecordsError> {
        let txn = self.db.begin_write().map_err(failed("saving steps"))?;
        {
            let mut steps = txn.open_table(STEPS).map_err(failed("saving steps"))?;
            let mut order = txn.open_table(STEP_ORDER).map_err(failed("saving steps"))?;
            let mut next = order
                .last()
                .map_err(failed("saving steps"))?
                .map_or(0, |(seq, _)| seq.value() + 1);
            for (key, step) in batch {
                let bytes = postcard::to_allocvec(step).map_err(failed("encoding a step"))?;
                let known = steps
                    .insert(key.as_slice(), bytes.as_slice())
                    .map_err(failed("saving steps"))?
                    .is_some();
                if !known {
                    order
                        .insert(next, key.as_slice())
                        .map_err(failed("saving steps"))?;
                    next += 1;
                }
            }
            let excess =
                (steps.len().map_err(failed("saving steps"))? as usize).saturating_sub(max);
            for _ in 0..excess {
                let Some((_, key)) = order.pop_first().map_err(failed("evicting steps"))? else {
                    break;
                };
                steps
                    .remove(key.value())
                    .map_err(failed("evicting steps"))?;
            }
        }
        txn.commit().map_err(failed("saving steps"))
    }
}

impl Records {
    /// Every cache mount's latest content, with its platform.
    pub fn cache_mounts(&self) -> Result<Vec<(String, CacheMountVersion)>, RecordsError> {
        let txn = self
            .db
            .begin_read()
            .map_err(failed("reading the cache mounts"))?;
        let table = txn
            .open_table(CACHE_MOUNTS)
            .map_err(failed("reading the cache mounts"))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(failed("reading the cache mounts"))? {
            let (key, bytes) = entry.map_err(failed("reading the cache mounts"))?;
            let platform = key
                .value()
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_string();
            if let Ok(version) = postcard::from_bytes(bytes.value()) {
                out.push((platform, version));
            }
        }
        Ok(out)
    }

    /// Records a cache mount's latest content on `platform`.
    pub fn set_cache_mount(
        &self,
        platform: &str,
        version: &CacheMountVersion,
    ) -> Result<(), RecordsError> {
        let bytes = postcard::to_allocvec(version).map_err(failed("encoding a cache mount"))?;
        let key = format!("{platform} {}", version.id);
        let txn = self
            .db
            .begin_write()
            .map_err(failed("saving a cache mount"))?;
        txn.open_table(CACHE_MOUNTS)
            .map_err(failed("saving a cache mount"))?
            .insert(key.as_str(), bytes.as_slice())
            .map_err(failed("saving a cache mount"))?;
        txn.commit().map_err(failed("saving a cache mount"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, status: Status) -> Record {
        Record {
            id: id.into(),
            status,
            platforms: vec!["linux/amd64".into()],
            tags: Vec::new(),
            submitted: 0,
            digest: None,
            image: None,
            error: None,
            exit_code: None,
            bake: None,
        }
    }

    /// After a restart, an accepted build comes back with its submission (and a bake's target
    /// with its bake); one that was still receiving its context is failed; finished ones stay
    /// as they were.
    #[test]
    fn accepted_builds_come_back_after_a_restart_and_the_others_are_failed() {
        let dir = tempfile::tempdir().unwrap();
        let spec = BuildSpec {
            dockerfile: "FROM busybox\n".into(),
            ..Default::default()
        };
        {
            let records = Records::open(dir.path()).unwrap();
            let target = BakeTarget {
                bake: "b-1".into(),
                target: "app".into(),
            };
            let b1 = Record {
                bake: Some(target),
                ..record("b-1", Status::Running)
            };
            records.save(&b1, Some(&spec)).unwrap();
            records.save(&record("b-2", Status::Queued), None).unwrap();
            records
                .save(&record("b-3", Status::Running), Some(&spec))
                .unwrap();
            records
                .save(&record("b-3", Status::Succeeded), None)
                .unwrap();
        }
        let again = Records::open(dir.path()).unwrap();
        let (resumed, lost) = again.unfinished().unwrap();
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].0.id, "b-1");
        assert_eq!(resumed[0].1, spec);
        // A bake's target comes back with its place in the bake, to run with the others.
        let bake = resumed[0].0.bake.as_ref().unwrap();
        assert_eq!((bake.bake.as_str(), bake.target.as_str()), ("b-1", "app"));
        assert_eq!(lost, ["b-2"]);
        let b2 = again.load("b-2").unwrap();
        assert_eq!(b2.status, Status::Failed);
        assert!(b2.error.unwrap().contains("lost"));
        assert_eq!(again.load("b-3").unwrap().status, Status::Succeeded);
        // Secrets never reach the database: such a build is not resumed.
        let secret = BuildSpec {
            secrets: vec![ossb_protocol::cluster::Secret {
                id: "token".into(),
                value: b"hunter2-secret".to_vec(),
            }],
            ..spec.clone()
        };
        again
            .save(&record("b-4", Status::Running), Some(&secret))
            .unwrap();
        let file = std::fs::read(dir.path().join("coordinator.redb")).unwrap();
        assert!(!file.windows(14).any(|w| w == b"hunter2-secret"));
        assert!(again.load("nope").is_none());
        let (resumed, lost) = again.unfinished().unwrap();
        assert_eq!(
            (resumed.len(), lost.as_slice()),
            (1, ["b-4".to_string()].as_slice())
        );
    }

    #[test]
    fn step_records_survive_a_reopen_and_the_oldest_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let step = |n: u8| {
            (
                [n; 32],
                StepRecord {
                    record: format!("{{\"n\":{n}}}"),
                    build: "b".into(),
                },
            )
        };
        {
            let records = Records::open(dir.path()).unwrap();
            records.add_steps(&[step(1), step(2)], 3).unwrap();
            // Recorded again: it keeps its place.
            records.add_steps(&[step(1), step(3), step(4)], 3).unwrap();
        }
        let again = Records::open(dir.path()).unwrap();
        let keys: Vec<u8> = again.steps().unwrap().iter().map(|(k, _)| k[0]).collect();
        assert_eq!(keys, [2, 3, 4]);
        assert_eq!(again.steps().unwrap()[0].1, step(2).1);
    }
}
