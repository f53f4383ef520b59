//! A cache never fills its disk: builds collect it, as BuildKit's daemon does, when less than a
//! fifth of its filesystem is free.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::build::busybox;
use crate::support::*;

/// A tmpfs of `size` mounted at a new directory, unmounted on drop.
struct SmallDisk {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (the test skips) when this process may not mount, outside CI only.
    fn mount(size: &str) -> Option<SmallDisk> {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("disk");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("running mount");
        if !out.status.success() {
            let msg = format!(
                "mounting a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return None;
        }
        Some(SmallDisk {
            dir,
            _parent: parent,
        })
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// 8 MiB that do not compress, different for each `seed`.
fn noise(path: &Path, seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = Vec::with_capacity(8 << 20);
    while bytes.len() < 8 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// Twelve builds of a new 8 MiB layer each with the cache on a 64 MiB filesystem: without
/// collection the seventh would find the disk full. Every build succeeds, the ones that find
/// less than a fifth free say what they removed, and the newest image stays whole (built
/// again, it is fully cached).
#[test]
fn builds_on_a_small_disk_collect_the_cache_instead_of_filling_it() {
    let Some(env) = TestEnv::get() else { return };
    let Some(disk) = SmallDisk::mount("64m") else {
        return;
    };
    let cache = disk.dir.join("cache");
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nCOPY blob /blob\n", busybox(&env)),
        &[],
    );
    let reg = env.registry();
    let ctx_arg = ctx.to_str().unwrap();
    let args = [
        "build",
        "--progress",
        "plain",
        "--insecure-registry",
        &reg,
        ctx_arg,
    ];
    let mut collected = 0;
    for seed in 0..12 {
        noise(&ctx.join("blob"), seed);
        let run = ossb(&env, &cache, &args).success(&format!("build {seed} on a 64 MiB disk"));
        assert!(run.stderr.contains("1 steps run"), "{}", run.stderr);
        if run.stderr.contains("least recently used blobs") {
            collected += 1;
        }
    }
    assert!(collected >= 3, "no build collected the cache");
    let again = ossb(&env, &cache, &args).success("the last build again");
    assert!(again.stderr.contains("0 steps run"), "{}", again.stderr);
}

/// A cluster of one worker, `name` with `slots`, whose work directory is on a 256 MiB
/// filesystem (kept mounted while the first value lives).
fn worker_on_a_small_disk(
    env: &TestEnv,
    name: &str,
    slots: &str,
) -> Option<(SmallDisk, crate::cluster::Cluster)> {
    let disk = SmallDisk::mount("256m")?;
    let work = disk.dir.join("worker");
    let cluster = crate::cluster::Cluster::start_with(
        env,
        &[(
            name,
            &["--slots", slots, "--work-dir", work.to_str().unwrap()],
        )],
    );
    Some((disk, cluster))
}

/// Submits the build of `ctx` to the cluster of [`worker_on_a_small_disk`]; fails the test,
/// with the cluster's logs, when it does not succeed.
fn submit_to_the_small_disk(cluster: &crate::cluster::Cluster, ctx: &Path, what: &str) {
    let reg = cluster.registry.clone();
    let out = cluster
        .submit(
            &cluster.tls,
            &["--insecure-registry", &reg, ctx.to_str().unwrap()],
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what} on a worker with a 256 MiB disk: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.logs()
    );
}

/// The same through the cluster: a worker whose work directory is on a 256 MiB filesystem
/// takes twenty builds of a new 8 MiB layer each (the context file and the layer stay in its
/// store: 16 MiB a build, and a task lays out its context besides; the disk is full by the
/// fifteenth without collection). It collects its cache after tasks with the engine's collection, sparing
/// what the task used: every build succeeds (a collection that took the task's own manifest
/// failed the task as it read it to push), and the worker's log says it collected.
#[test]
fn a_worker_on_a_small_disk_collects_its_cache_after_tasks() {
    let Some(env) = TestEnv::get() else { return };
    let Some((_disk, cluster)) = worker_on_a_small_disk(&env, "small-disk", "1") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nCOPY blob /blob\n", cluster.busybox(&env)),
        &[],
    );
    for seed in 0..20 {
        noise(&ctx.join("blob"), 100 + seed);
        submit_to_the_small_disk(&cluster, &ctx, &format!("build {seed}"));
    }
    let log = std::fs::read_to_string(cluster.dir.join("small-disk.log")).unwrap();
    let collected = log.matches("least recently used blobs").count();
    assert!(
        collected >= 2,
        "the worker never collected its cache\n{}",
        cluster.logs()
    );
}

/// A busy worker collects too: while one slot of a two-slot worker runs a long step, the
/// cache's exclusive lease is never free when the other slot's tasks end. A worker short of
/// disk starts no new task until its running ones end, and then collects: eighteen builds of a
/// new 8 MiB layer each on a 256 MiB disk, all while a 12 s step runs, all succeed (without
/// waiting, the fifteenth finds the disk full), and the worker's log says it waited and
/// collected.
#[test]
fn a_worker_that_is_never_idle_still_collects_its_cache() {
    let Some(env) = TestEnv::get() else { return };
    let Some((_disk, cluster)) = worker_on_a_small_disk(&env, "busy", "2") else {
        return;
    };
    let submit = |ctx: &Path, what: &str| submit_to_the_small_disk(&cluster, ctx, what);
    let (long_dir, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let long = context(
        long_dir.path(),
        &format!("FROM {}\nRUN sleep 12\n", cluster.busybox(&env)),
        &[],
    );
    let ctx = context(
        dir.path(),
        &format!("FROM {}\nCOPY blob /blob\n", cluster.busybox(&env)),
        &[],
    );
    std::thread::scope(|s| {
        s.spawn(|| submit(&long, "the long build"));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        for build in 0..18 {
            noise(&ctx.join("blob"), 1000 + build);
            submit(&ctx, &format!("build {build}"));
        }
    });
    let log = std::fs::read_to_string(cluster.dir.join("busy.log")).unwrap();
    assert!(
        log.contains("starting no task until the running ones end")
            && log.contains("least recently used blobs"),
        "the busy worker never collected its cache\n{}",
        cluster.logs()
    );
    // The coordinator was told, so that it sent the worker nothing meanwhile.
    let coordinator = std::fs::read_to_string(cluster.dir.join("coordinator.log")).unwrap();
    assert!(
        coordinator.contains("worker draining to collect its cache")
            && coordinator.contains("worker done collecting its cache"),
        "{}",
        cluster.logs()
    );
}
