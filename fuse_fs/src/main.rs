//! `ioasid-fs`: mounts the live state of an iommu-core as a read-only file
//! system, in the foreground.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// Mounts the live state of a running iommu-core (sessions, IOASes,
/// mappings, memory objects, devices, attachments, pPASIDs, vPASID maps,
/// faults) on MOUNTPOINT, read-only, for `ls` and `cat`; docs/fs-abi.md
/// describes every path. Runs in the foreground; SIGTERM or SIGINT
/// unmounts and exits (status 0).
///
/// The core must answer when ioasid-fs starts. If it goes away later,
/// ioasid-fs stays mounted and connects again by itself (backoff from
/// 0.1 s up to 2 s between attempts): meanwhile the root holds only the
/// file `core_unavailable` (why, in one sentence) and every other path
/// fails at once with ENOTCONN ("Transport endpoint is not connected");
/// once a core answers on the socket again, the tree is that core's.
///
/// A dead FUSE mount on MOUNTPOINT (left by an ioasid-fs killed with
/// SIGKILL: every access gives ENOTCONN) is detached (lazy unmount) and
/// replaced, with a warning in the log. A FUSE file system there that
/// answers (another ioasid-fs), one that does not answer within 5 s (its
/// server stopped), and any other file system mounted there are left alone:
/// ioasid-fs then exits with status 1 and a sentence saying which.
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
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    let ready = fuse_fs::mountpoint::prepare(&a.mountpoint)
        .with_context(|| format!("cannot mount on {}", a.mountpoint.display()))?;
    if ready.detached > 0 {
        tracing::info!("{} is free again; mounting afresh", ready.path.display());
    }
    let mount = fuse_fs::fs::mount(&core, &ready.path)?;
    drop(ready.lock);
    tracing::info!("mounted the state of {} on {}", core.display(), ready.path.display());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if mount.finished() {
            tracing::warn!("the mount was removed from outside");
            break;
        }
    }
    mount.umount_and_join()?;
    tracing::info!("unmounted {}", ready.path.display());
    Ok(())
}
