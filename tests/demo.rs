//! The README's main command: the demo session, checked.

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
