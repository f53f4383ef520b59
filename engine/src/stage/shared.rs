//! What every platform's build shares: the request, progress, store, caches and the
//! vertices' bookkeeping (estimates, transfers, starts and ends).

use super::*;

/// What every platform's build shares.
pub(crate) struct Shared<'a> {
    pub req: &'a BuildRequest,
    pub progress: &'a dyn Progress,
    pub store: BlobStore,
    pub cache: LocalCache,
    pub registry: Registry,
    pub work: PathBuf,
    /// Unpacked trees kept between builds; this build's finished stages go back to it.
    pub rootfs_pool: crate::rootfs_pool::RootfsPool,
    pub created: String,
    pub ignore: Option<Dockerignore>,
    pub next_id: std::sync::atomic::AtomicUsize,
    pub stats: std::sync::Mutex<Stats>,
    /// The base images pulled (full references), as sources of cross-repository mounts.
    pub base_images: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Durations of steps in earlier builds, updated by this one.
    pub durations: std::sync::Mutex<cache::Durations>,
    /// Progress toward the estimate: (fs steps planned, finished, ms remaining, steps without
    /// a recorded duration still to run).
    pub eta: std::sync::Mutex<Eta>,
    /// Steps to store in the `--cache-to` repository at the end of the build (`mode=max`).
    pub cache_exports: std::sync::Mutex<Vec<(CacheKey, CacheRecord, Platform)>>,
    /// The inline caches of `--cache-from` images, loaded on first use, by image and platform.
    pub inline_caches: tokio::sync::Mutex<
        HashMap<(String, Platform), std::sync::Arc<crate::remote_cache::Inline>>,
    >,
    /// Content hashes of context files from earlier builds (COPY sources, bind mounts).
    pub checksums: ChecksumCache,
    /// Step keys this build ran (their records are fresh even under `--no-cache`).
    pub built: std::sync::Mutex<std::collections::HashSet<CacheKey>>,
    /// The cluster's step records, for a worker's task: the chain's last level.
    pub cluster: Option<&'a dyn cache::CacheLevel>,
    /// What each platform read and did, for its attestations.
    pub facts: crate::attestations::Facts,
    /// Whether this build told its client how the rootless sandbox adapted to the container.
    pub said_adaptation: std::sync::atomic::AtomicBool,
}

/// The running estimate of a build's remaining time.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Eta {
    steps: usize,
    finished: usize,
    remaining_ms: u64,
    unknown: usize,
}

/// Steps run and cached in a build.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Steps that changed files and were executed.
    pub run: usize,
    /// Steps that changed files and came from the cache.
    pub cached: usize,
}

impl Shared<'_> {
    /// Adds planned steps (their history texts) to the estimate.
    pub(super) fn plan_estimate<'s>(&self, steps: impl Iterator<Item = &'s str>) {
        let durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        let mut eta = self.eta.lock().unwrap_or_else(|e| e.into_inner());
        for step in steps {
            eta.steps += 1;
            match durations.get(step) {
                Some(ms) => eta.remaining_ms += ms,
                None => eta.unknown += 1,
            }
        }
        drop(durations);
        self.send_estimate(&eta);
    }

    /// Marks a planned step finished: `ran` is how long it took, `None` when cached.
    pub(super) fn step_finished(&self, step: &str, ran: Option<u64>) {
        let expected = {
            let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
            let expected = durations.get(step);
            if let Some(ms) = ran {
                durations.set(step, ms);
            }
            expected
        };
        let mut eta = self.eta.lock().unwrap_or_else(|e| e.into_inner());
        eta.finished += 1;
        match expected {
            Some(ms) => eta.remaining_ms = eta.remaining_ms.saturating_sub(ms),
            None => eta.unknown = eta.unknown.saturating_sub(1),
        }
        self.send_estimate(&eta);
    }

    pub(super) fn send_estimate(&self, eta: &Eta) {
        self.progress.event(Event::Estimate {
            steps: eta.steps,
            finished: eta.finished,
            remaining: (eta.unknown == 0)
                .then(|| std::time::Duration::from_millis(eta.remaining_ms)),
        });
    }

    /// Runs `work` (a pull or push of vertex `id`), reporting the blob bytes it moves every
    /// half second and when it ends.
    pub(crate) async fn with_transfer<T>(
        &self,
        id: usize,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let transfer = std::sync::Arc::new(ossb_image::registry::Transfer::default());
        let work = ossb_image::registry::counting(transfer.clone(), work);
        tokio::pin!(work);
        let report = || {
            if transfer.received() + transfer.sent() > 0 {
                self.progress.event(Event::Transfer {
                    id,
                    received: transfer.received(),
                    sent: transfer.sent(),
                });
            }
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        tick.tick().await; // the first tick is at once
        loop {
            tokio::select! {
                out = &mut work => {
                    report();
                    return out;
                }
                _ = tick.tick() => report(),
            }
        }
    }

    pub(crate) fn start(&self, name: String) -> (usize, Instant) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.progress.event(Event::Started { id, name });
        (id, Instant::now())
    }

    /// Brings the blobs of `layers` missing from the store through the cluster's level: the
    /// layers of stages other tasks built come only when a step reads them (a COPY of one file
    /// out of a toolchain stage brings one small layer, not the toolchain). Without a cluster,
    /// a missing blob is left to the reader's own error.
    pub(crate) async fn bring(&self, layers: &[Descriptor]) -> Result<(), StepError> {
        let Some(cluster) = self.cluster else {
            return Ok(());
        };
        for layer in layers.iter().filter(|l| !self.store.contains(&l.digest)) {
            cluster
                .blob(&layer.digest, &self.store)
                .await
                .map_err(|reason| StepError::Bring {
                    digest: layer.digest,
                    reason,
                })?;
        }
        Ok(())
    }

    /// Tells a cluster's client, once per build, how the rootless sandbox adapted to the
    /// worker's container (`ossb build` logged it already, on the same terminal).
    pub(super) fn say_adaptation(&self) {
        use std::sync::atomic::Ordering;
        let Some(warning) = ossb_worker::rootless::adaptation() else {
            return;
        };
        if self.cluster.is_some() && !self.said_adaptation.swap(true, Ordering::Relaxed) {
            self.progress
                .event(Event::Info(format!("warning: {warning}")));
        }
    }

    pub(crate) fn finish<T, E: std::fmt::Display>(
        &self,
        id: usize,
        started: Instant,
        result: Result<T, E>,
    ) -> Result<T, E> {
        let elapsed = started.elapsed();
        match &result {
            Ok(_) => self.progress.event(Event::Done { id, elapsed }),
            Err(e) => self.progress.event(Event::Failed {
                id,
                elapsed,
                message: e.to_string(),
            }),
        }
        result
    }
}
