//! `ossb-submit`: `ossb build` on a build cluster. The same build options (the same
//! [`BuildArgs`]), plus where the coordinator is and the certificates to reach it with; the
//! same progress display and exit codes. No build logic here: it calls
//! `ossb_cluster::submit`.

#[allow(dead_code)]
#[path = "../args.rs"]
mod args;

#[allow(dead_code)]
#[path = "../attest.rs"]
mod attest;
#[path = "../bake.rs"]
mod bake;
#[path = "../check.rs"]
mod check;
#[allow(dead_code)]
#[path = "../cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../display.rs"]
mod display;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ossb_cluster::submit::{submit, submit_bake, SubmitConfig};

use crate::args::BuildArgs;

/// Build an image on an ossb build cluster: the options of `ossb build`, run by the cluster's
/// workers.
#[derive(Parser, Debug)]
#[command(name = "ossb-submit", version, about)]
struct SubmitArgs {
    /// The coordinator, HOST:PORT (the name its certificate carries).
    #[arg(long, value_name = "ADDR")]
    coordinator: String,
    /// The cluster's certificates (`ossb certs init`): ca.crt, client.crt, client.key.
    #[arg(long = "tls-dir", value_name = "DIR")]
    tls_dir: PathBuf,
    #[command(flatten)]
    build: BuildArgs,
}

/// `ossb-submit bake ...`: `ossb bake` on the cluster; every target is submitted at once and
/// the coordinator plans them as one graph: a stage the targets share is one task.
#[derive(Parser, Debug)]
#[command(name = "ossb-submit bake")]
struct SubmitBakeArgs {
    /// The coordinator, HOST:PORT (the name its certificate carries).
    #[arg(long, value_name = "ADDR")]
    coordinator: String,
    /// The cluster's certificates (`ossb certs init`): ca.crt, client.crt, client.key.
    #[arg(long = "tls-dir", value_name = "DIR")]
    tls_dir: PathBuf,
    #[command(flatten)]
    bake: bake::BakeArgs,
}

fn main() -> ExitCode {
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == "bake") {
        let args = SubmitBakeArgs::parse_from(
            std::iter::once(raw[0].clone()).chain(raw[2..].iter().cloned()),
        );
        display::init_build_logging(args.bake.progress);
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let config = std::sync::Arc::new(SubmitConfig {
            coordinator: args.coordinator,
            tls_dir: args.tls_dir,
        });
        return bake::run(
            args.bake,
            bake::Runner::Together(Box::new(move |targets, progress| {
                let config = config.clone();
                Box::pin(async move { submit_bake(targets, &config, progress).await })
            })),
        );
    }
    let args = SubmitArgs::parse();
    let mode = args.build.progress_mode();
    display::init_build_logging(mode);
    // The one CryptoProvider of the process (quinn's TLS and the peer cache use it).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let call = match args.build.call.call() {
        Ok(c) => c,
        Err(e) => return display::fail(mode, &e, 2),
    };
    let (request, extras) = match args.build.into_request() {
        Ok(r) => r,
        Err(e) => return display::fail(mode, &e, 2),
    };
    // The checks, outline and targets need no cluster.
    if let Some(call) = call {
        return check::run_call(&call, &request);
    }
    let config = SubmitConfig {
        coordinator: args.coordinator,
        tls_dir: args.tls_dir,
    };
    display::run_to_exit(&request, &extras, move |request, display| {
        Box::pin(async move {
            let build = submit(request, &config, display);
            check::build_checked(request, display, mode, build).await
        })
    })
}
