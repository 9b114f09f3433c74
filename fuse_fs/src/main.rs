//! `ioasid-fs`: mounts the live state of an iommu-core as a read-only file
//! system, in the foreground.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// Mounts the live state of a running iommu-core (sessions, IOASes,
/// mappings, memory objects, devices, attachments, pPASIDs, vPASID maps,
/// faults) on MOUNTPOINT, read-only, for `ls` and `cat`; docs/fs-abi.md
/// describes every path. Runs in the foreground; SIGTERM or SIGINT
/// unmounts and exits, and so does the core going away.
#[derive(Parser, Debug)]
#[command(name = "ioasid-fs", version)]
struct Args {
    /// The core's socket [default: $XDG_RUNTIME_DIR/ioasid/core.sock, else /run/ioasid/core.sock].
    #[arg(long, value_name = "SOCK")]
    core: Option<PathBuf>,
    /// Where to mount.
    mountpoint: PathBuf,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasid-fs: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let core = a.core.unwrap_or_else(iommu_core::server::default_socket_path);
    let (session, probe) = fuse_fs::fs::mount(&core, &a.mountpoint)?;
    tracing::info!("mounted the state of {} on {}", core.display(), a.mountpoint.display());
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let mut ticks = 0u32;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        ticks += 1;
        if ticks.is_multiple_of(10) && !probe.alive() {
            tracing::warn!("the core at {} went away: unmounting", core.display());
            break;
        }
        if session.guard.is_finished() {
            tracing::warn!("the mount was removed from outside");
            break;
        }
    }
    session.umount_and_join()?;
    tracing::info!("unmounted {}", a.mountpoint.display());
    Ok(())
}
