//! The nvme controller's parsers of guest bytes: a 64-byte submission
//! queue entry decoded and checked as an NVM command against a namespace
//! of fuzzed size, a Dataset Management range list, and the command's PRP
//! entries walked through a model of guest memory filled with fuzzer
//! bytes (list pages, chains, cycles, offsets). Checked: a decoded command
//! re-encodes to itself; a command accepted by `decode` lies inside the
//! namespace and within MDTS; accepted ranges lie inside the namespace; a
//! walk that succeeds describes exactly the transfer, starting at PRP1,
//! with no range wrapping and every range after the first starting on a
//! page; and the walk reads a bounded number of list bytes.
#![no_main]

use std::cell::Cell;

use ioasid_fuzz::Input;
use iommu_core::types::FaultReason;
use libfuzzer_sys::fuzz_target;
use vfio_user_server::devices::nvme::abi::{Command, LBA_SHIFT, MAX_TRANSFER};
use vfio_user_server::devices::nvme::io::{decode, dsm_ranges, IoOp};
use vfio_user_server::devices::nvme::prp::walk;
use vfio_user_server::dma::{self, DmaSpace};

/// Guest memory of the model: `mem` at IOVA `base`; everything else
/// faults. Counts the bytes read.
struct Mem {
    base: u64,
    mem: Vec<u8>,
    read: Cell<usize>,
}

impl DmaSpace for Mem {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), dma::Error> {
        self.read.set(self.read.get() + buf.len());
        let off = iova.checked_sub(self.base).and_then(|o| usize::try_from(o).ok());
        match off.and_then(|o| self.mem.get(o..o.checked_add(buf.len())?)) {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(dma::Error::Fault { iova, reason: FaultReason::NotPresent }),
        }
    }
    fn write(&self, iova: u64, _: &[u8]) -> Result<(), dma::Error> {
        Err(dma::Error::Fault { iova, reason: FaultReason::NotPresent })
    }
    fn check_write(&self, iova: u64, _: usize) -> Result<(), dma::Error> {
        Err(dma::Error::Fault { iova, reason: FaultReason::NotPresent })
    }
    fn report_fault(&self, _: u64, _: bool, _: FaultReason) {}
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let mut sqe = [0u8; 64];
    sqe.copy_from_slice(&{
        let b = input.bytes(64);
        let mut v = b.to_vec();
        v.resize(64, 0);
        v
    });
    let cmd = Command::parse(&sqe);
    assert_eq!(Command::parse(&cmd.to_bytes()), cmd, "a decoded entry re-encodes to itself");

    // NVM command checks.
    let blocks = match input.u8() % 4 {
        0 => u64::from(input.u8()),
        1 => u64::from(input.u32()),
        2 => input.u64(),
        _ => u64::MAX,
    };
    let read_only = input.u8() & 1 != 0;
    match decode(&cmd, blocks, read_only) {
        Ok(IoOp::Read { slba, nlb }) | Ok(IoOp::Write { slba, nlb, .. }) => {
            assert!(slba.checked_add(nlb).is_some_and(|e| e <= blocks));
            assert!((nlb << LBA_SHIFT) as usize <= MAX_TRANSFER && nlb >= 1);
        }
        Ok(IoOp::WriteZeroes { slba, nlb, .. }) => {
            assert!(slba.checked_add(nlb).is_some_and(|e| e <= blocks) && nlb >= 1);
            assert!(!read_only);
        }
        Ok(IoOp::Deallocate { ranges }) => assert!((1..=256).contains(&ranges) && !read_only),
        Ok(IoOp::Flush) | Ok(IoOp::Hint) | Err(_) => {}
    }

    // A Dataset Management range list.
    let n = usize::from(input.u8()) * 16;
    let list = input.bytes(n);
    let mut ranges = Vec::new();
    if dsm_ranges(list, blocks, &mut ranges).is_ok() {
        assert_eq!(ranges.len(), list.len() / 16);
        for (s, n) in &ranges {
            assert!(s.checked_add(*n).is_some_and(|e| e <= blocks));
        }
    }

    // The PRPs through guest memory made of the rest of the input, placed
    // where the command's pointers may land in it.
    let page = 4096u64 << (input.u8() % 5);
    let len = (input.u32() as usize) % (MAX_TRANSFER * 4 + 1);
    let base = match input.u8() % 3 {
        0 => cmd.prp2 & !0xfff,
        1 => cmd.prp2.wrapping_sub(u64::from(input.u16())) & !7,
        _ => input.u64(),
    };
    let mem = Mem { base, mem: input.rest().to_vec(), read: Cell::new(0) };
    let mut out = Vec::new();
    if walk(&mem, cmd.prp1, cmd.prp2, len, page, &mut out).is_ok() {
        assert_eq!(out.iter().map(|r| r.1).sum::<usize>(), len);
        if let Some(first) = out.first() {
            assert_eq!(first.0, cmd.prp1);
        }
        for (k, &(iova, n)) in out.iter().enumerate() {
            assert!(n > 0 && iova.checked_add(n as u64 - 1).is_some());
            if k > 0 {
                assert_eq!(iova % page, 0, "a range after the first starts on a page");
            }
        }
    }
    // Every list page holds at most page / 8 entries, and each entry is
    // read once: the data entries plus one chain pointer per list page.
    let pages = len as u64 / page + 2;
    assert!(mem.read.get() as u64 <= pages * 8 + pages * 8, "the walk read {} list bytes", mem.read.get());
});
