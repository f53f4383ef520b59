//! `ossb-submit`: `ossb build` on a build cluster. The same build options (the same
//! [`BuildArgs`]), plus where the coordinator is and the certificates to reach it with; the
//! same progress display and exit codes. No build logic here: it calls
//! `ossb_coordinator::cluster::submit`.

#[allow(dead_code)]
#[path = "../args.rs"]
mod args;
#[allow(dead_code)]
#[path = "../cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../display.rs"]
mod display;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ossb_coordinator::cluster::submit::{submit, SubmitConfig};

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

fn main() -> ExitCode {
    let args = SubmitArgs::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("OSSB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    // The one CryptoProvider of the process (quinn's TLS and the peer cache use it).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let (request, extras) = match args.build.into_request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let config = SubmitConfig {
        coordinator: args.coordinator,
        tls_dir: args.tls_dir,
    };
    let display = display::for_mode(extras.progress);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let started = std::time::Instant::now();
    match runtime.block_on(submit(&request, &config, display.as_ref())) {
        Ok(result) => {
            if let Err(e) = extras.write_files(&request, &result) {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
            display.summary(&result, started.elapsed());
            ExitCode::SUCCESS
        }
        Err(e) => {
            drop(display);
            eprintln!("error: {e}");
            ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
        }
    }
}
