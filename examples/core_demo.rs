//! The core on its own: start iommu-core and run a demo session
//! against it that prints what it did.
//!
//! `cargo run --release --example core_demo [-- --socket PATH]`

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use iommu_core::types::Limits;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter("warn").init();
    let mut args = std::env::args().skip(1);
    let mut socket = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("usage: core_demo [--socket PATH]\nStarts iommu-core on PATH (default: a temporary directory) and runs a demo session.");
                return Ok(());
            }
            other => anyhow::bail!("unknown argument {other:?}; try --help"),
        }
    }
    let socket = socket
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ioasid-demo-{}", std::process::id())).join("core.sock"));
    let core = iommu_core::server::spawn(&socket, Limits::default())?;
    println!("iommu-core listening on {}", socket.display());
    let res = ioasid_stack::run_demo(&socket, 2000, &mut std::io::stdout());
    core.stop()?;
    if let Some(dir) = socket.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    res.map(|_| println!("core stopped; demo done"))
}
