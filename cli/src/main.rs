//! The `ossb` command: argument parsing, progress display, exit codes. No build logic lives
//! here; it calls the coordinator.

mod args;
mod attest;
mod bake;
mod check;
mod cluster;
mod display;

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use ossb_worker::{sandbox, userns};

use crate::args::{default_cache_dir, BuildArgs, CacheCommand, Cli, Command, DebugCommand};

fn main() -> ExitCode {
    // The sandbox child must stay single-threaded: dispatch to it before anything else runs.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == sandbox::SUBCOMMAND) {
        return exit(sandbox::child_main());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Build(build) => {
            // Enter the user namespace while this process still has a single thread.
            match enter_isolation(build.isolation.into()) {
                Ok(notice) => run_build(*build, notice),
                Err(code) => code,
            }
        }
        Command::Bake(bake) => match enter_isolation(bake.isolation.into()) {
            Ok(notice) => {
                let mode = bake.progress;
                display::init_build_logging(mode);
                if let Some(notice) = notice {
                    display::notice(mode, &notice);
                }
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                bake::run(
                    *bake,
                    bake::Runner::Each(Box::new(|request, progress| {
                        Box::pin(ossb_engine::build(request, progress))
                    })),
                )
            }
            Err(code) => code,
        },
        Command::Debug {
            command: DebugCommand::Parse { file },
        } => debug_parse(&file),
        Command::Cache { command } => cache_command(command),
        Command::Certs { command } => cluster::certs(command),
        Command::CacheNode(args) => cluster::cache_node(args),
        Command::Coordinator(args) => cluster::coordinator(args),
        Command::Worker(args) => {
            // As for build: the user namespace is entered while the process has one thread.
            match enter_isolation(args.isolation.into()) {
                Ok(notice) => cluster::worker(*args, notice),
                Err(code) => code,
            }
        }
    }
}

/// Sets the process up for the isolation asked for with `--isolation`: rootless re-executes
/// the build in a user namespace (the `Err` is then the exit code of that build); chroot stays
/// in this process as root; auto is rootless when the kernel allows a user namespace, else
/// chroot when running as root, else an error saying what is missing. `Ok` carries the
/// isolation the steps run in (what `auto` chose), for the command to log once its logging is
/// set up (JSON for a worker).
fn enter_isolation(isolation: sandbox::Isolation) -> Result<Option<String>, ExitCode> {
    use sandbox::Isolation;
    if let Some(mapping) = userns::IdMapping::current() {
        // The re-executed build, inside its namespace.
        let auto = if isolation == Isolation::Auto {
            "auto; "
        } else {
            ""
        };
        return Ok(Some(format!(
            "isolation: rootless ({auto}user namespace with {})",
            mapping.describe()
        )));
    }
    let root = userns::running_as_root();
    if isolation == Isolation::Chroot {
        if !root {
            eprintln!("error: --isolation chroot needs root in the container (it chroots into each step's rootfs and switches to the step's user): run as uid 0, or use --isolation rootless");
            return Err(ExitCode::from(1));
        }
        return Ok(Some("isolation: chroot (as root; each step in its own mount and pid namespaces where the container allows them, else in a plain chroot)".into()));
    }
    match userns::reexec_in_user_namespace() {
        Ok(code) => Err(exit(code)),
        Err(userns::UsernsError::Refused { errno, .. }) if isolation == Isolation::Auto && root => {
            Ok(Some(format!(
                "isolation: chroot (auto; user namespaces are refused here: {errno}). RUN steps run as the container's root in a chroot, in their own mount and pid namespaces only if the container has CAP_SYS_ADMIN; use --isolation rootless where user namespaces work"
            )))
        }
        Err(userns::UsernsError::Refused { errno, .. }) if isolation == Isolation::Auto => {
            eprintln!("error: cannot isolate RUN steps: unprivileged user namespaces are disabled ({errno}) and ossb is not root, so chroot isolation is not possible either\n  hint: sysctl kernel.unprivileged_userns_clone=1 (or kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu), or run with --isolation chroot as root in the container, or set hostUsers: false in the pod spec (with a seccomp/AppArmor profile that allows unshare)");
            Err(ExitCode::from(1))
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(1))
        }
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn run_build(args: BuildArgs, isolation: Option<String>) -> ExitCode {
    let mode = args.progress_mode();
    display::init_build_logging(mode);
    if let Some(notice) = isolation {
        display::notice(mode, &notice);
    }
    // One CryptoProvider for every TLS user in the process (reqwest now, quinn later).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let call = match args.call.call() {
        Ok(c) => c,
        Err(e) => return display::fail(mode, &e, 2),
    };
    let (request, extras) = match args.into_request() {
        Ok(r) => r,
        Err(e) => return display::fail(mode, &e, 2),
    };
    if let Some(call) = call {
        return check::run_call(&call, &request);
    }
    for warning in &extras.warnings {
        display::notice(mode, &format!("warning: {warning}"));
    }
    display::run_to_exit(&request, &extras, |request, display| {
        Box::pin(check::build_checked(
            request,
            display,
            mode,
            ossb_engine::build(request, display),
        ))
    })
}

fn debug_parse(file: &str) -> ExitCode {
    let text = if file == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            eprintln!("error: reading the Dockerfile from stdin: {e}");
            return ExitCode::from(2);
        }
        s
    } else {
        match std::fs::read(file) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => {
                eprintln!("error: cannot read {file}: {e}");
                return ExitCode::from(2);
            }
        }
    };
    match ossb_dockerfile::parse(&text, file) {
        Ok(df) => {
            print!("{}", ossb_dockerfile::dump(&df));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn cache_command(command: CacheCommand) -> ExitCode {
    use ossb_engine::cache;
    match command {
        CacheCommand::Info { cache_dir } => {
            let dir = cache_dir.unwrap_or_else(default_cache_dir);
            match cache::info(&dir) {
                Ok(info) => {
                    println!("cache directory: {}", dir.display());
                    println!(
                        "blobs:           {} ({:.1} MiB)",
                        info.blobs,
                        info.bytes as f64 / 1048576.0
                    );
                    println!("cached steps:    {}", info.records);
                    if info.leftover_bytes > 0 {
                        println!(
                            "leftovers:       {:.1} MiB of interrupted builds (ossb cache prune removes them)",
                            info.leftover_bytes as f64 / 1048576.0
                        );
                    }
                    if info.trees.0 > 0 {
                        println!(
                            "unpacked:        {} filesystems kept for the next builds ({:.1} MiB)",
                            info.trees.0,
                            info.trees.1 as f64 / 1048576.0
                        );
                    }
                    let (run, cached) = info
                        .recent
                        .iter()
                        .fold((0, 0), |(r, c), b| (r + b.run, c + b.cached));
                    if run + cached > 0 {
                        println!(
                            "hit rate:        {:.0}% of {} steps over the last {} builds",
                            100.0 * cached as f64 / (run + cached) as f64,
                            run + cached,
                            info.recent.len()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot read the cache in {}: {e}", dir.display());
                    ExitCode::from(1)
                }
            }
        }
        CacheCommand::Prune {
            all,
            keep_storage,
            filter,
            cache_dir,
        } => {
            let dir = cache_dir.unwrap_or_else(default_cache_dir);
            let mut opts = cache::PruneOptions {
                all,
                ..Default::default()
            };
            if let Some(size) = keep_storage {
                match cache::parse_size(&size) {
                    Some(n) => opts.keep_bytes = Some(n),
                    None => {
                        eprintln!("error: --keep-storage {size:?}: expected a size such as 10GB or 512MiB");
                        return ExitCode::from(2);
                    }
                }
            }
            for f in filter {
                match f.strip_prefix("until=").and_then(cache::parse_duration) {
                    Some(d) => opts.older_than = Some(d),
                    None => {
                        eprintln!("error: --filter {f:?}: expected until=DURATION, e.g. until=24h");
                        return ExitCode::from(2);
                    }
                }
            }
            match cache::prune(&dir, &opts) {
                Ok(r) => {
                    println!(
                        "removed {} cached steps, {} blobs, {} unpacked filesystems and {} leftovers of interrupted builds, {:.1} MiB freed",
                        r.records,
                        r.blobs,
                        r.trees,
                        r.leftovers,
                        r.bytes as f64 / 1048576.0
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: pruning the cache in {}: {e}", dir.display());
                    ExitCode::from(1)
                }
            }
        }
    }
}
