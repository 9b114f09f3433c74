use iommu_core::client::Client;
use iommu_core::types::*;

#[test]
fn smoke() {
    let dir = std::env::temp_dir().join(format!("ioasid-smoke-{}", std::process::id()));
    let path = dir.join("core.sock");
    let srv = iommu_core::server::spawn(&path, Limits::default()).unwrap();
    let mut s = Client::session(&path).unwrap();
    let mem = iommu_core::memfd::create("m", 4 << 20).unwrap();
    let m = s.register_memory(&mem).unwrap();
    let ioas = s.ioas_alloc().unwrap();
    let iova = s.map(MapArgs { ioas, mem: m.id, offset: 0, length: 4 << 20, iova: None, perm: Perm::RW }).unwrap();
    println!("{m:?} iova {iova:#x}");
    let t = s.translate(ioas, iova + 0x1234).unwrap();
    println!("{t:?}");
    let st = Client::observer(&path).unwrap().status().unwrap();
    println!("{}", serde_json::to_string_pretty(&st).unwrap());
    assert_eq!(s.unmap(ioas, 0, u64::MAX).unwrap(), 4 << 20);
    drop(srv);
}
