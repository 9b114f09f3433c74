//! The README's main command: the demo session, checked.

// Tests, benchmarks and examples may panic on what they set up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use iommu_core::types::Limits;
use iommu_core::Errno;

#[test]
fn demo_runs_and_leaves_nothing_behind() {
    let dir = std::env::temp_dir().join(format!("ioasid-demo-test-{}", std::process::id()));
    let socket = dir.join("core.sock");
    let core = iommu_core::server::spawn(&socket, Limits::default()).unwrap();
    let mut out = Vec::new();
    let s = ioasid_stack::run_demo(&socket, 50, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(s.refused, vec![Errno::EEXIST, Errno::ENOENT, Errno::EBUSY], "{text}");
    assert_eq!(s.ram_page_size, 2 << 20, "256 MiB of RAM at an aligned IOVA uses 2 MiB leaves: {text}");
    assert_ne!(s.ram_iova, 0);
    assert_eq!(s.ppasids, vec![1, 2]);
    assert!(s.map_unmap_per_sec > 0.0);
    assert_eq!((s.sessions_after, s.tables_after), (0, 0), "{text}");
    assert!(text.contains("usable ranges 0x0-0xfedfffff 0xfef00000-0xffffffffffff"), "{text}");
    core.stop().unwrap();
    assert!(!socket.exists());
    let _ = std::fs::remove_dir(dir);
}

/// The DMA-engine demo (the README's main command runs it with the
/// defaults): copies in two address spaces through two vPASIDs, checked.
#[test]
fn engine_demo_copies_in_two_address_spaces() {
    use vfio_user_server::devices::dma_engine::{status, DmaEngine};
    use vfio_user_server::server::{self, Options};
    let dir = std::env::temp_dir().join(format!("ioasid-engine-demo-test-{}", std::process::id()));
    let core_sock = dir.join("core.sock");
    let dev_sock = dir.join("dma-engine.sock");
    let core = iommu_core::server::spawn(&core_sock, Limits::default()).unwrap();
    let opts = Options::new(&dev_sock, &core_sock);
    let srv = server::spawn(Box::new(DmaEngine::new().unwrap()), opts).unwrap();
    let mut out = Vec::new();
    let demo = ioasid_stack::run_engine_demo(&core_sock, &dev_sock, 16, 8192, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let s = &demo.summary;
    assert_eq!((s.copies, s.bytes), (32, 32 * 8192), "{text}");
    assert_ne!(s.ppasids.0, s.ppasids.1);
    assert_eq!(s.unattached_status, status::NO_PASID, "{text}");
    assert!(s.bytes_per_sec > 0.0 && s.descriptors_per_sec > 0.0);
    assert!(text.contains("vPASID 0x5 -> pPASID") && text.contains("vPASID 0x9 -> pPASID"), "{text}");
    assert!(text.contains("none crossed address spaces"), "{text}");
    drop(demo);
    srv.stop().unwrap();
    core.stop().unwrap();
    assert!(!core_sock.exists() && !dev_sock.exists());
    let _ = std::fs::remove_dir(dir);
}
