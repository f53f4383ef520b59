//! The build cluster's subcommands: `ossb certs init` and `ossb cache-node`. Their arguments
//! and the calls into `ossb-net` and `ossb-cache-node`; no logic of their own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Write a new cluster CA and the node and client certificates into DIR: ca.crt, ca.key,
    /// node.crt, node.key, client.crt, client.key (keys mode 0600; existing files are never
    /// overwritten). Mount DIR (without ca.key) as --tls-dir.
    Init {
        /// The directory to write (created if needed).
        dir: PathBuf,
        /// A DNS name (wildcards allowed) or IP address the nodes are reached by, besides
        /// localhost and 127.0.0.1 (repeatable).
        #[arg(long = "san", value_name = "NAME|IP")]
        san: Vec<String>,
    },
}

#[derive(Args, Debug)]
pub struct CacheNodeArgs {
    /// The UDP address to serve QUIC on, e.g. 0.0.0.0:7000.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Where blobs are stored.
    #[arg(long = "data-dir", value_name = "DIR")]
    data_dir: PathBuf,
    /// The certificates (`ossb certs init`): ca.crt, node.crt, node.key.
    #[arg(long = "tls-dir", value_name = "DIR")]
    tls_dir: PathBuf,
    /// Every cache node, this one included, as clients name them (host:port,...): blobs are
    /// placed by rendezvous hashing over this list, so give every node and worker the same.
    #[arg(long, value_name = "ADDR,...", value_delimiter = ',')]
    peers: Vec<String>,
    /// Evict least recently used blobs above this size (e.g. 50GB).
    #[arg(long = "max-size", value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,
    /// Serve /metrics (Prometheus) and /healthz over HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    ossb_coordinator::cache::parse_size(s)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 500MB, 10GB, 1TiB)"))
}

/// `ossb certs init`.
pub fn certs(command: CertsCommand) -> ExitCode {
    let CertsCommand::Init { dir, san } = command;
    match ossb_net::certs::init(&dir, &san) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ossb cache-node`: JSON log lines to stdout, serves until SIGTERM/SIGINT.
pub fn cache_node(args: CacheNodeArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OSSB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
    // The one CryptoProvider of the process; quinn's TLS uses it.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = ossb_cache_node::NodeConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        tls_dir: args.tls_dir,
        peers: args.peers,
        max_size: args.max_size,
        metrics: args.metrics,
    };
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
    match runtime.block_on(ossb_cache_node::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cache node failed");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
