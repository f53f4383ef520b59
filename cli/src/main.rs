//! The `ossb` command: argument parsing, progress display, exit codes. No build logic lives
//! here; it calls the coordinator.

mod args;
mod display;

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use ossb_coordinator::BuildError;
use ossb_worker::{sandbox, userns};

use crate::args::{BuildArgs, Cli, Command, DebugCommand};

fn main() -> ExitCode {
    // The sandbox child must stay single-threaded: dispatch to it before anything else runs.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if raw.get(1).is_some_and(|a| a == sandbox::SUBCOMMAND) {
        let Some(spec) = raw.get(2) else {
            return ExitCode::from(2);
        };
        return exit(sandbox::child_main(std::path::Path::new(spec)));
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Build(build) => {
            // Enter the user namespace while this process still has a single thread.
            if userns::IdMapping::current().is_none() {
                return match userns::reexec_in_user_namespace() {
                    Ok(code) => exit(code),
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                };
            }
            run_build(*build)
        }
        Command::Debug {
            command: DebugCommand::Parse { file },
        } => debug_parse(&file),
    }
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OSSB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

fn run_build(args: BuildArgs) -> ExitCode {
    init_logging();
    // One CryptoProvider for every TLS user in the process (reqwest now, quinn later).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let request = match args.into_request() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (request, extras) = request;
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
    let result = runtime.block_on(ossb_coordinator::build(&request, display.as_ref()));
    match result {
        Ok(result) => {
            if let Err(e) = extras.write_files(&request, &result) {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
            display.summary(&result);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            exit(e.exit_code())
        }
    }
}

fn error_text(e: &BuildError) -> String {
    e.to_string()
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
