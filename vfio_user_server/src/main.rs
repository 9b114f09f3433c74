//! `vfio-user-server`: serves one emulated PCI device on a vfio-user socket.

use std::os::fd::RawFd;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use vfio_user_server::devices;
use vfio_user_server::dma::PasidPolicy;
use vfio_user_server::server::{inherited_fd, Listen, Options, Server};

fn device_help() -> String {
    let mut s = String::from("Devices:\n");
    for (name, what) in devices::DEVICES {
        s.push_str(&format!("  {name:<14} {what}\n"));
    }
    s
}

/// Serves one emulated PCI device to a vfio-user client (QEMU's
/// vfio-user-pci, or any other). Every DMA of the device is translated by
/// an I/O address space of iommu-core: the client's DMA_MAPs go to a compat
/// IOAS of the server's own session, or a session binds the device through
/// the ioasid extension. Runs in the foreground; SIGTERM or SIGINT stops it
/// and removes its socket. Set RUST_LOG (e.g. RUST_LOG=debug) for more log.
#[derive(Parser, Debug)]
#[command(name = "vfio-user-server", version, after_help = device_help())]
struct Args {
    /// The device to serve (see the list below).
    device: String,
    /// Listen on a Unix socket at PATH.
    #[arg(long, value_name = "PATH", required_unless_present = "fd", conflicts_with = "fd")]
    socket_path: Option<PathBuf>,
    /// Use an inherited Unix socket: a listening one, or one connected client.
    #[arg(long, value_name = "N")]
    fd: Option<RawFd>,
    /// The iommu-core socket [default: $XDG_RUNTIME_DIR/ioasid/core.sock, else /run/ioasid/core.sock].
    #[arg(long, value_name = "PATH")]
    core: Option<PathBuf>,
    /// PCI address reported to the core for this device.
    #[arg(long, default_value = "0000:00:04.0")]
    pci_address: String,
    /// How pPASIDs are chosen for vPASIDs: `global` (the core's allocator)
    /// or `per-rid` (pPASID = vPASID in the device's own PASID space).
    #[arg(long, default_value = "global", value_parser = ["global", "per-rid"])]
    pasid_alloc: String,
    /// Also let processes of this user id connect (for a VMM running as
    /// another user; repeatable). Without it only this server's user and
    /// root may connect. With it the socket file is made 0666 and the
    /// peer credentials are the gate.
    #[arg(long, value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Leave the MSI-X capability out: the device offers MSI (a vector per
    /// queue) and INTx only. For a QEMU without the upstream fix
    /// "vfio-user: Do not delete the subregion" (October 2025), such as
    /// Debian's 11.1.3, where device_del of a vfio-user-pci device with
    /// MSI-X aborts QEMU (a memory_region_del_subregion assertion); see
    /// docs/vfio-user.md.
    #[arg(long)]
    no_msix: bool,
    /// How long device DMA to client memory (guest RAM without an fd,
    /// reached with DMA_READ/DMA_WRITE) waits for the client's reply before
    /// the access fails (the descriptor faults).
    #[arg(long, value_name = "MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    dma_timeout_ms: u64,
    /// nvme: the file or block device holding the namespace.
    #[arg(long, value_name = "FILE")]
    backing: Option<PathBuf>,
    /// nvme: namespace size in bytes (a shorter regular file is extended);
    /// default: the file's size. Rounded down to 512-byte blocks.
    #[arg(long, value_name = "BYTES")]
    size: Option<u64>,
    /// nvme: refuse writes (the namespace is write protected).
    #[arg(long)]
    read_only: bool,
    /// nvme: do not offer the doorbell page for mmap, so that every
    /// doorbell write traps and wakes its queue at once (the queues then
    /// need not poll a mapped page; shadow doorbells save the traps).
    #[arg(long)]
    trap_doorbells: bool,
    /// Also listen on a control socket at PATH, where an orchestrator (one
    /// at a time, same users as the vfio-user socket) binds the device to
    /// its session and attaches the RID and vPASIDs with the ioasid
    /// extension's commands, whether or not a vfio-user client is connected.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfio-user-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    raise_file_limit();
    let Some(device) = devices::make_with(
        &args.device,
        devices::Options {
            msix: !args.no_msix,
            backing: args.backing.clone(),
            size: args.size,
            read_only: args.read_only,
            trap_doorbells: args.trap_doorbells,
        },
    ) else {
        bail!("there is no device called {:?}; run with --help for the list", args.device);
    };
    let device = device.with_context(|| format!("cannot create the {} device", args.device))?;
    let listen = match (args.socket_path, args.fd) {
        (Some(p), _) => Listen::Path(p),
        (None, Some(fd)) => {
            if fd < 3 || nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_err() {
                bail!("--fd {fd} is not an open file descriptor of this process");
            }
            // SAFETY: the fd was inherited for us to use and is checked to
            // be open; nothing else in this process owns it.
            Listen::Fd(unsafe { inherited_fd(fd) })
        }
        (None, None) => bail!("give --socket-path PATH or --fd N"),
    };
    let core = args.core.unwrap_or_else(iommu_core::server::default_socket_path);
    let pasid_policy = if args.pasid_alloc == "per-rid" { PasidPolicy::PerRid } else { PasidPolicy::Global };
    let opts = Options {
        listen,
        core,
        pci_address: args.pci_address,
        pasid_policy,
        allow_uids: args.allow_uid,
        dma_timeout: std::time::Duration::from_millis(args.dma_timeout_ms),
        control: args.control_socket,
    };
    let mut server = Server::new(device, opts)?;
    server.handle_signals()?;
    tracing::info!("serving {}", args.device);
    server.run()?;
    Ok(())
}

/// The DMA table keeps each file a client maps open (to map it again in a
/// new core after a core restart): allow as many open files as the hard
/// limit lets us.
fn raise_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!("cannot read the open-file limit: {e}"),
    }
}
