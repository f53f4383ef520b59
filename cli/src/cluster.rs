//! The build cluster's subcommands: `ossb certs init`, `ossb cache-node`, `ossb coordinator`
//! and `ossb worker`. Their arguments and the calls into `ossb-net`, `ossb-cache-node` and
//! `ossb_cluster`; no logic of their own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Write a new cluster CA and the node, worker and client certificates into DIR: ca.crt,
    /// ca.key, node.crt/.key (coordinator, cache nodes), worker.crt/.key (workers: only they
    /// may take tasks), client.crt/.key (ossb-submit) (keys mode 0600; existing files are never
    /// overwritten). Mount ca.crt and each role's pair as --tls-dir; keep ca.key out.
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
    ossb_engine::cache::parse_size(s)
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

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// The UDP address to serve QUIC on, e.g. 0.0.0.0:7100.
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Build records and the context files received.
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dir: PathBuf,
    /// The certificates (`ossb certs init`): ca.crt, node.crt, node.key.
    #[arg(long = "tls-dir", value_name = "DIR")]
    tls_dir: PathBuf,
    /// Serve /metrics (Prometheus) and /healthz over HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
}

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// The coordinator, HOST:PORT (the name its certificate carries).
    #[arg(long, value_name = "ADDR")]
    coordinator: String,
    /// The platform this worker runs natively, e.g. linux/amd64 (default: this machine's).
    #[arg(long, value_name = "PLATFORM")]
    platform: Option<ossb_protocol::Platform>,
    /// Platforms this worker also builds through QEMU (binfmt_misc), comma-separated; used only
    /// when the cluster has no native worker for them.
    #[arg(long, value_name = "PLATFORM,...", value_delimiter = ',')]
    emulate: Vec<ossb_protocol::Platform>,
    /// Its step cache and the tasks' contexts.
    #[arg(long = "work-dir", value_name = "DIR")]
    work_dir: PathBuf,
    /// The certificates (`ossb certs init`): ca.crt, worker.crt, worker.key.
    #[arg(long = "tls-dir", value_name = "DIR")]
    tls_dir: PathBuf,
    /// Every cache node (host:port,...), the same list the nodes get as --peers.
    #[arg(long = "cache-peers", value_name = "ADDR,...", value_delimiter = ',')]
    cache_peers: Vec<String>,
    /// Tasks run at once (default: the number of CPUs).
    #[arg(long, value_name = "N")]
    slots: Option<u32>,
    /// The name it goes by in logs and metrics (default: HOSTNAME-PID).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// How RUN steps are isolated.
    #[arg(long, value_enum, default_value = "auto")]
    pub isolation: crate::args::Isolation,
    /// Serve /metrics (Prometheus) and /healthz over HTTP on this address.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Load tests of the coordinator: speak the protocol but run no step; every task
    /// "takes" this many milliseconds and succeeds with a made-up image.
    #[arg(long = "simulate-task-ms", value_name = "MS", hide = true)]
    simulate_task_ms: Option<u64>,
}

/// JSON log lines to stdout and the one CryptoProvider: what every cluster node starts with.
fn node_setup() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OSSB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .try_init();
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn run_node<F: std::future::Future<Output = Result<(), E>>, E: std::fmt::Display>(
    what: &str,
    node: F,
) -> ExitCode {
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
    match runtime.block_on(node) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{what} failed");
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ossb coordinator`: JSON log lines to stdout, serves until SIGTERM/SIGINT.
pub fn coordinator(args: CoordinatorArgs) -> ExitCode {
    node_setup();
    let config = ossb_cluster::server::CoordinatorConfig {
        listen: args.listen,
        state_dir: args.state_dir,
        tls_dir: args.tls_dir,
        metrics: args.metrics,
    };
    run_node("coordinator", ossb_cluster::server::serve(config))
}

/// `ossb worker` (already inside its user namespace, entered by `main`): JSON log lines to
/// stdout, serves until SIGTERM/SIGINT.
pub fn worker(args: WorkerArgs, isolation: Option<String>) -> ExitCode {
    node_setup();
    if let Some(notice) = isolation {
        tracing::info!("{notice}");
    }
    let sandbox_exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find the ossb binary: {e}");
            return ExitCode::from(1);
        }
    };
    let slots = args.slots.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1)
    });
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let config = ossb_cluster::worker::WorkerConfig {
        coordinator: args.coordinator,
        name,
        platform: args.platform.unwrap_or_else(ossb_protocol::Platform::host),
        emulates: args.emulate,
        slots: slots.max(1),
        work_dir: args.work_dir,
        tls_dir: args.tls_dir,
        cache_peers: args.cache_peers,
        isolation: args.isolation.into(),
        sandbox_exe,
        metrics: args.metrics,
        simulate: args.simulate_task_ms.map(std::time::Duration::from_millis),
    };
    run_node("worker", ossb_cluster::worker::serve(config))
}
