//! `iommu-core`: the IOASID daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use iommu_core::server::{default_socket_path, Server};
use iommu_core::types::Limits;

/// The IOASID daemon: owns I/O address spaces, page tables, pPASIDs, faults
/// and dirty state, and serves sessions, device channels and observers on a
/// Unix socket (mode 0600). Stops cleanly on SIGTERM or SIGINT, removing its
/// socket. Logging goes to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to
/// change its level.
#[derive(Parser, Debug)]
#[command(name = "iommu-core", version)]
struct Args {
    /// Socket to listen on [default: $XDG_RUNTIME_DIR/ioasid/core.sock, else /run/ioasid/core.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Limit: sessions open at once.
    #[arg(long, default_value_t = Limits::default().max_sessions)]
    max_sessions: u32,
    /// Limit: objects (memory objects, IOASes, nested IOASes) per session.
    #[arg(long, default_value_t = Limits::default().max_objects_per_session)]
    max_objects_per_session: u32,
    /// Limit: mappings per IOAS.
    #[arg(long, default_value_t = Limits::default().max_mappings_per_ioas)]
    max_mappings_per_ioas: u32,
    /// Limit: allowed or reserved ranges per IOAS.
    #[arg(long, default_value_t = Limits::default().max_ranges_per_ioas)]
    max_ranges_per_ioas: u32,
    /// Limit: pPASIDs per session.
    #[arg(long, default_value_t = Limits::default().max_ppasids_per_session)]
    max_ppasids_per_session: u32,
    /// Limit: largest message a peer may send, in bytes.
    #[arg(long, default_value_t = Limits::default().max_message_bytes)]
    max_message_bytes: u32,
    /// Limit: fds per message (at most 253).
    #[arg(long, default_value_t = Limits::default().max_fds_per_message, value_parser = clap::value_parser!(u32).range(1..=253))]
    max_fds_per_message: u32,
    /// Limit: records in a session's fault queue.
    #[arg(long, default_value_t = Limits::default().fault_queue_depth)]
    fault_queue_depth: u32,
    /// Size of the shared page-table pool in bytes (memory is used only as
    /// tables are allocated).
    #[arg(long, default_value_t = Limits::default().table_pool_bytes)]
    table_pool_bytes: u64,
    /// Limit: device channels per session.
    #[arg(long, default_value_t = Limits::default().max_channels_per_session)]
    max_channels_per_session: u32,
    /// Limit: devices bound per session.
    #[arg(long, default_value_t = Limits::default().max_devices_per_session)]
    max_devices_per_session: u32,
    /// Milliseconds a device server has to answer an invalidation (drop its
    /// IOTLB entries and finish DMA in flight) before it is fenced.
    #[arg(long, default_value_t = Limits::default().invalidate_timeout_ms)]
    invalidate_timeout_ms: u32,
    /// Limit: page tables (4 KiB each, from the shared pool) per session.
    #[arg(long, default_value_t = Limits::default().max_tables_per_session)]
    max_tables_per_session: u32,
    /// Limit: bytes of memory objects one session may register.
    #[arg(long, default_value_t = Limits::default().max_memory_bytes_per_session)]
    max_memory_bytes_per_session: u64,
    /// Limit: connections open at once (further peers are turned away).
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: u32,
    /// Milliseconds a new peer has to say hello before it is turned away.
    #[arg(long, default_value_t = Limits::default().hello_timeout_ms)]
    hello_timeout_ms: u32,
    /// Milliseconds a peer has to finish a message it started sending, and
    /// to read a reply the core started writing to it, before it is dropped.
    #[arg(long, default_value_t = Limits::default().peer_stall_ms, value_parser = clap::value_parser!(u32).range(1..))]
    peer_stall_ms: u32,
    /// Bytes buffered for all peers together: unfinished messages (past
    /// each peer's first 16 KiB) and unread replies. Past it, peers are not
    /// read further and replies over 64 KiB are refused with EAGAIN.
    #[arg(long, default_value_t = Limits::default().max_peer_buffer_bytes)]
    max_peer_buffer_bytes: u64,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iommu-core: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let a = Args::parse();
    let limits = Limits {
        max_sessions: a.max_sessions,
        max_objects_per_session: a.max_objects_per_session,
        max_mappings_per_ioas: a.max_mappings_per_ioas,
        max_ranges_per_ioas: a.max_ranges_per_ioas,
        max_ppasids_per_session: a.max_ppasids_per_session,
        max_message_bytes: a.max_message_bytes,
        max_fds_per_message: a.max_fds_per_message,
        fault_queue_depth: a.fault_queue_depth,
        table_pool_bytes: a.table_pool_bytes,
        max_devices_per_session: a.max_devices_per_session,
        max_channels_per_session: a.max_channels_per_session,
        invalidate_timeout_ms: a.invalidate_timeout_ms,
        max_tables_per_session: a.max_tables_per_session,
        max_memory_bytes_per_session: a.max_memory_bytes_per_session,
        max_connections: a.max_connections,
        hello_timeout_ms: a.hello_timeout_ms,
        peer_stall_ms: a.peer_stall_ms,
        max_peer_buffer_bytes: a.max_peer_buffer_bytes,
    };
    // Peers of the same user must not reach our fds through /proc.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot make the process non-dumpable");
    }
    // Every connection and channel is an fd: use the whole hard limit.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let path = a.socket.unwrap_or_else(default_socket_path);
    let mut server =
        Server::bind(&path, limits).with_context(|| format!("cannot start the core on {}", path.display()))?;
    server.handle_signals()?;
    tracing::info!(socket = %path.display(), "iommu-core listening");
    server.run()?;
    tracing::info!("iommu-core stopped");
    Ok(())
}
