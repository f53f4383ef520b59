//! `/metrics` and `/healthz` of the coordinator: its counters in Prometheus text.

use super::*;

pub(super) async fn serve_metrics(
    addr: SocketAddr,
    state: Arc<State>,
) -> Result<SocketAddr, ClusterError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(local_err("binding the metrics address"))?;
    let bound = listener
        .local_addr()
        .map_err(local_err("binding the metrics address"))?;
    let routes = ossb_net::http::metrics_and_health(move || prometheus(&state.lock()));
    tokio::spawn(ossb_net::http::serve(listener, routes));
    Ok(bound)
}

/// The coordinator's counters in Prometheus text form.
pub(super) fn prometheus(inner: &Inner) -> String {
    let c = &inner.counters;
    let mut m = ossb_net::http::PrometheusText::default();
    m.single(
        "ossb_builds_queued",
        "gauge",
        "Builds waiting for their context or a worker.",
        c.queued,
    );
    m.single(
        "ossb_builds_running",
        "gauge",
        "Builds whose tasks run.",
        c.running,
    );
    m.family(
        "ossb_builds_finished_total",
        "counter",
        "Builds finished, by status.",
    )
    .sample(&[("status", "succeeded")], c.succeeded)
    .sample(&[("status", "failed")], c.failed);
    m.family(
        "ossb_steps_total",
        "counter",
        "Steps of finished tasks, by the worker that ran them and whether its local step cache had them.",
    );
    for (worker, (run, cached)) in &c.steps {
        m.sample(&[("worker", worker), ("result", "run")], *run)
            .sample(&[("worker", worker), ("result", "cached")], *cached);
    }
    m.family(
        "ossb_steps_by_platform_total",
        "counter",
        "Steps of finished tasks, by the platform built, whether the worker ran it natively or emulated, and whether its step cache had them.",
    );
    for ((platform, mode), (run, cached)) in &c.steps_by_mode {
        let platform = platform.to_string();
        for (result, n) in [("run", run), ("cached", cached)] {
            m.sample(
                &[("platform", &platform), ("mode", mode), ("result", result)],
                *n,
            );
        }
    }
    let mut workers: BTreeMap<(String, &str), u64> = BTreeMap::new();
    for w in inner.workers.values() {
        *workers
            .entry((w.info.platform.to_string(), "native"))
            .or_default() += 1;
        for p in &w.info.emulates {
            *workers.entry((p.to_string(), "emulated")).or_default() += 1;
        }
    }
    m.family(
        "ossb_workers",
        "gauge",
        "Registered workers, by platform they build and how.",
    );
    for ((platform, how), n) in &workers {
        m.sample(&[("platform", platform), ("mode", how)], *n);
    }
    m.single(
        "ossb_tasks_queued",
        "gauge",
        "Tasks (one stage of one platform of a build) waiting for their stages' inputs or a worker.",
        inner.queue.len() as u64,
    );
    m.single(
        "ossb_tasks_rescheduled_total",
        "counter",
        "Tasks scheduled again because their worker was lost.",
        c.tasks_rescheduled,
    );
    m.single(
        "ossb_workers_lost_total",
        "counter",
        "Workers that stopped heartbeating.",
        c.workers_lost,
    );
    m.single(
        "ossb_tasks_cancelled_total",
        "counter",
        "Tasks cancelled because another task of their build failed.",
        c.tasks_cancelled,
    );
    m.single(
        "ossb_tasks_unschedulable_total",
        "counter",
        "Tasks failed because no worker builds their platform, natively or emulated.",
        c.tasks_unschedulable,
    );
    m.single(
        "ossb_tasks_waited_identical_total",
        "counter",
        "Tasks that waited for an identical task (same cache keys) to finish instead of running beside it.",
        c.tasks_waited_identical,
    );
    m.family(
        "ossb_cluster_steps_total",
        "counter",
        "Step claims of the cluster's step cache (after a worker's local miss), by answer: the record of a step another task built, the right to build it, and claims that first waited for another task building the same step.",
    )
    .sample(&[("answer", "record")], c.steps_from_cluster)
    .sample(&[("answer", "build")], c.steps_claimed)
    .sample(&[("answer", "waited")], c.steps_waited);
    m.single(
        "ossb_cluster_step_records",
        "gauge",
        "Step records the coordinator holds.",
        inner.steps.len() as u64,
    );
    let sources = |i: &InputStats| {
        [
            ("local", i.local_blobs, None),
            ("peer", i.peer_blobs, Some(i.peer_bytes)),
            ("registry", i.registry_blobs, Some(i.registry_bytes)),
        ]
    };
    m.family(
        "ossb_input_blobs_total",
        "counter",
        "Base image blobs (configs, layers) of finished tasks, by worker and where they came from: its own store (a local hit), the peer cache (a peer hit) or a registry (a miss, then published to the peer cache).",
    );
    for (worker, i) in &c.inputs {
        for (source, n, _) in sources(i) {
            m.sample(&[("worker", worker), ("source", source)], n);
        }
    }
    m.family(
        "ossb_input_bytes_total",
        "counter",
        "Bytes of base image blobs fetched by the workers, from the peer cache and from registries.",
    );
    for (worker, i) in &c.inputs {
        for (source, _, bytes) in sources(i) {
            if let Some(b) = bytes {
                m.sample(&[("worker", worker), ("source", source)], b);
            }
        }
    }
    m.family(
        "ossb_context_bytes_total",
        "counter",
        "Context file bytes received from clients and served to workers.",
    )
    .sample(&[("direction", "received")], c.context_bytes_received)
    .sample(&[("direction", "served")], c.context_bytes_served);
    for (name, help, latencies) in [
        (
            "ossb_task_dispatch_microseconds",
            "Time from a task being ready (its stages built, or its worker lost) to its dispatch to a worker, over the last 10,000 tasks; it includes waiting for a free slot.",
            &inner.dispatch_latency,
        ),
        (
            "ossb_schedule_pass_microseconds",
            "Time one scheduling pass holds the coordinator's state, over the last 10,000 passes.",
            &inner.pass_latency,
        ),
    ] {
        m.family(name, "summary", help);
        let quantiles = latencies.quantiles(&[0.5, 0.9, 0.99]);
        for (q, value) in ["0.5", "0.9", "0.99"].into_iter().zip(quantiles) {
            m.sample(&[("quantile", q)], value);
        }
        m.single(&format!("{name}_count"), "counter", "Observations.", latencies.count);
    }
    m.finish()
}

/// The last [`Latencies::KEPT`] durations of something, in microseconds, for quantiles.
#[derive(Default)]
pub(super) struct Latencies {
    ring: Vec<u64>,
    next: usize,
    count: u64,
}

impl Latencies {
    const KEPT: usize = 10_000;

    pub(super) fn record(&mut self, d: Duration) {
        let micros = d.as_micros().min(u64::MAX as u128) as u64;
        if self.ring.len() < Self::KEPT {
            self.ring.push(micros);
        } else {
            self.ring[self.next] = micros;
        }
        self.next = (self.next + 1) % Self::KEPT;
        self.count += 1;
    }

    /// The quantiles `qs` (each 0..=1) of the kept durations, from one sort; 0 when none.
    pub(super) fn quantiles(&self, qs: &[f64]) -> Vec<u64> {
        let mut sorted = self.ring.clone();
        sorted.sort_unstable();
        qs.iter()
            .map(|q| {
                let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1));
                sorted.get(i - 1).copied().unwrap_or(0)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_keep_the_last_ten_thousand_and_give_quantiles() {
        let mut l = Latencies::default();
        assert_eq!(l.quantiles(&[0.5, 0.99]), [0, 0]);
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        assert_eq!(l.quantiles(&[0.5, 0.99, 1.0]), [50_000, 99_000, 100_000]);
        // The oldest go: 10,000 fast ones push the slow ones out.
        for _ in 0..Latencies::KEPT {
            l.record(Duration::from_micros(1));
        }
        assert_eq!(l.quantiles(&[1.0]), [1]);
        assert_eq!(l.count, 100 + Latencies::KEPT as u64);
    }
}
