//! `ioasidctl`: inspect a running core and drive a session from a script.

use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use iommu_core::client::Client;
use iommu_core::script::{self, Runner};
use iommu_core::server::default_socket_path;

/// Inspect a running iommu-core and drive sessions from scripts.
#[derive(Parser, Debug)]
#[command(name = "ioasidctl", version)]
struct Args {
    /// The core's socket [default: $XDG_RUNTIME_DIR/ioasid/core.sock, else /run/ioasid/core.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show sessions, IOASes with their mappings, memory objects, pPASIDs and faults.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a script (FILE, or - for stdin) as one session; the session and
    /// everything it made (device bindings included) end when the script
    /// does, or with --hold at SIGTERM/SIGINT. Commands: mem, file, ioas,
    /// nested, map, map-many, unmap, unmap-many, unmap-all, copy, destroy,
    /// ranges, allow, reserve, invalidate, pasid, pasid-free, dirty,
    /// dirty-read, translate, faults, status, bind, attach, replace, detach,
    /// vpasids, unbind, and `expect ERRNO[|ERRNO..] COMMAND` (see
    /// docs/ioasidctl.md).
    Run {
        /// Script file, or - for standard input (each line runs as soon as
        /// it is read, so an orchestrator can keep a pipe open and send
        /// commands while a guest runs).
        file: String,
        /// Run every line even after a failure.
        #[arg(long)]
        keep_going: bool,
        /// After the script succeeded, stay in the foreground holding the
        /// session (its objects, pPASIDs and device bindings) until SIGTERM
        /// or SIGINT, printing what it holds.
        #[arg(long)]
        hold: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ioasidctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let a = Args::parse();
    let socket = a.socket.unwrap_or_else(default_socket_path);
    let hint = || {
        format!(
            "cannot reach the core at {}; start one with `iommu-core --socket {}`",
            socket.display(),
            socket.display()
        )
    };
    match a.cmd {
        Cmd::Status { json } => {
            let mut c = Client::observer(&socket).with_context(hint)?;
            let s = c.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                // Driver state (vPASID maps) comes from each device server,
                // through the core; a server that does not answer is skipped.
                let mut drivers = std::collections::BTreeMap::new();
                for ses in &s.sessions {
                    for d in &ses.devices {
                        if let Ok(st) = c.driver_state(ses.id, d.id) {
                            drivers.insert((ses.id, d.id), st);
                        }
                    }
                }
                print!("{}", script::render_status_with(&s, &drivers));
            }
        }
        Cmd::Run { file, keep_going, hold } => {
            // A file is parsed whole first (an error in it runs nothing);
            // standard input runs line by line as it comes.
            let lines = if file == "-" {
                None
            } else {
                let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read the script {file}"))?;
                Some(script::parse(&text)?)
            };
            // Before anything is held: a signal from now on ends the hold.
            let mut signals = if hold {
                Some(
                    signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])
                        .context("cannot catch SIGTERM and SIGINT")?,
                )
            } else {
                None
            };
            let mut c = Client::session(&socket).with_context(hint)?;
            let session = c.session_id();
            // The session's socket, watched while holding (the runner
            // keeps the client).
            let watch = c.socket().try_clone_to_owned().context("cannot duplicate the session's socket")?;
            println!("session {session}");
            let mut runner = Runner::new(&mut c);
            let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
            let failed = match lines {
                Some(lines) => runner.run_to(&lines, keep_going, &mut out, &mut err).len(),
                None => {
                    let mut failed = 0;
                    for (i, text) in std::io::stdin().lock().lines().enumerate() {
                        let text = text.context("cannot read the script from stdin")?;
                        let e = match script::parse_line(&text, i + 1) {
                            Ok(None) => None,
                            Ok(Some(l)) => runner.run_line(&l, &mut out, &mut err),
                            Err(e) => {
                                out.flush()?;
                                writeln!(err, "ioasidctl: {e}")?;
                                Some(e)
                            }
                        };
                        if e.is_some() {
                            failed += 1;
                            if !keep_going {
                                break;
                            }
                        }
                    }
                    failed
                }
            };
            if failed > 0 {
                bail!("{failed} command(s) failed");
            }
            if let Some(signals) = signals.as_mut() {
                let mut out = std::io::stdout();
                writeln!(out, "holding session {session} until SIGTERM or SIGINT")?;
                write!(out, "{}", runner.holdings())?;
                out.flush()?;
                loop {
                    if let Some(sig) = signals.pending().next() {
                        writeln!(out, "signal {sig}: releasing session {session}")?;
                        break;
                    }
                    if core_hung_up(watch.as_fd()) {
                        bail!("the core closed session {session} (it stopped or went away): nothing is held any more");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Waits up to 250 ms for the core to hang up the session's socket; true
/// if it did.
fn core_hung_up(sock: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // No events asked: poll still reports a hang-up or an error.
    let mut p = [PollFd::new(sock, PollFlags::empty())];
    matches!(poll(&mut p, PollTimeout::from(250u16)), Ok(n) if n > 0)
        && p[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}
