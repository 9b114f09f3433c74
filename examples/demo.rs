//! The stack's main job on defaults: start iommu-core and a dma-engine
//! vfio-user server, play the VMM (two address spaces, two vPASIDs, a
//! batch of copies), print what happened, and keep everything running
//! until Ctrl-C so it can be looked at (`ioasidctl --socket ... status`).
//! Without a terminal on stdin (a script, CI) it stops at once unless
//! given `--wait`.
//!
//! `cargo run --release --example demo [-- --dir DIR] [--copies N] [--size BYTES] [--exit|--wait]`

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use iommu_core::types::Limits;
use vfio_user_server::server::{self, Options};

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let mut args = std::env::args().skip(1);
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let (mut dir, mut copies, mut size, mut exit) = (None, 512u32, 64u32 << 10, !interactive);
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> anyhow::Result<u32> {
            let v = args.next().ok_or_else(|| anyhow::anyhow!("{what} needs a value"))?;
            Ok(v.parse()?)
        };
        match a.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--copies" => copies = num("--copies")?,
            "--size" => size = num("--size")?,
            "--exit" => exit = true,
            "--wait" => exit = false,
            "-h" | "--help" => {
                println!(
                    "usage: demo [--dir DIR] [--copies N] [--size BYTES] [--exit|--wait]\n\
                     Starts iommu-core (DIR/core.sock) and a dma-engine vfio-user server (DIR/dma-engine.sock),\n\
                     runs N copies of BYTES per vPASID (default 512 of 64 KiB), prints what happened and waits\n\
                     for Ctrl-C (--exit: stop at once; without a terminal it stops unless --wait). DIR: a new temp dir."
                );
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; try --help"),
        }
    }
    anyhow::ensure!(copies > 0 && (1..=16 << 20).contains(&size), "--copies must be > 0 and --size 1..=16 MiB");
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join(format!("ioasid-demo-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let core_sock = dir.join("core.sock");
    let dev_sock = dir.join("dma-engine.sock");
    let core = iommu_core::server::spawn(&core_sock, Limits::default())?;
    println!("iommu-core listening on {}", core_sock.display());
    let opts = Options::new(&dev_sock, &core_sock);
    let engine = vfio_user_server::devices::dma_engine::DmaEngine::new()?;
    let srv = server::spawn(Box::new(engine), opts)?;
    println!("vfio-user-server dma-engine listening on {}", dev_sock.display());
    let demo = ioasid_stack::run_engine_demo(&core_sock, &dev_sock, copies, size, &mut std::io::stdout())?;
    if !exit {
        println!(
            "\nEverything keeps running. Look at it with\n  cargo run --release --bin ioasidctl -- --socket {} status\nCtrl-C stops the demo.",
            core_sock.display()
        );
        let stop = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
        signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    drop(demo);
    srv.stop()?;
    core.stop()?;
    let _ = std::fs::remove_dir(&dir);
    println!("stopped; nothing left behind");
    Ok(())
}
