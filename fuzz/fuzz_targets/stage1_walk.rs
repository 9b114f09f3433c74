//! The nested (two-stage) walk over hostile tables: the user's stage-1
//! tables are bytes from the fuzzer, placed in "user memory", and the
//! stage-2 pool is fuzzed too. The walk is checked against a plain
//! reference walk written here from the table format's rules, and may read
//! at most 4 stage-1 entries, each through at most 4 stage-2 entries.
#![no_main]

use std::cell::Cell;

use ioasid_fuzz::Input;
use iommu_core::pagetable::{
    walk_nested, Stage1, TableMemory, LEVELS, MAX_IOVA, PTE_ADDR_MASK, PTE_LEAF, PTE_PRESENT, PTE_READ,
    PTE_RESERVED_MASK, PTE_WRITE,
};
use libfuzzer_sys::fuzz_target;

const PAGE: u64 = 4096;
/// System address of the first page of user memory.
const USER_BASE: u64 = 1 << 30;

/// The stage-2 pool: a few pages of entries; offset 0 is never a table.
struct Pool {
    words: Vec<u64>,
    loads: Cell<u32>,
}

impl TableMemory for Pool {
    fn load(&self, table: u64, index: usize) -> Option<u64> {
        self.loads.set(self.loads.get() + 1);
        if table == 0 || !table.is_multiple_of(PAGE) || index >= 512 {
            return None;
        }
        self.words.get(usize::try_from(table / 8).ok()? + index).copied()
    }
}

/// User memory: stage-1 tables live here.
struct User {
    words: Vec<u64>,
}

impl User {
    fn read(&self, sys: u64) -> Option<u64> {
        if sys < USER_BASE || !sys.is_multiple_of(8) {
            return None;
        }
        self.words.get(usize::try_from((sys - USER_BASE) / 8).ok()?).copied()
    }
}

/// An entry: mostly well-formed ones pointing at pool pages, user pages
/// or small parent IOVAs, sometimes raw bits.
fn entry(input: &mut Input<'_>, pool_pages: u64, user_pages: u64) -> u64 {
    let kind = input.u8();
    if kind & 0x80 != 0 {
        return input.u64();
    }
    let page = u64::from(input.u8());
    let addr = match kind & 3 {
        0 => (page % pool_pages) * PAGE,
        1 => USER_BASE + (page % user_pages) * PAGE,
        2 => (page % 8) * PAGE,
        _ => (page << 21) | (u64::from(input.u8()) << 12),
    };
    let flags = [PTE_PRESENT, PTE_READ, PTE_WRITE, PTE_LEAF];
    let mut e = addr;
    for (i, f) in flags.iter().enumerate() {
        if kind & (0x04 << i) != 0 || i == 0 && kind & 0x40 == 0 {
            e |= f;
        }
    }
    e
}

fn level_shift(level: u32) -> u32 {
    12 + 9 * (level - 1)
}

/// The table format's rules, walked plainly: `Some((address, read, write))`.
fn reference(load: &dyn Fn(u64, usize) -> Option<u64>, root: u64, iova: u64) -> Option<(u64, bool, bool)> {
    if iova > MAX_IOVA {
        return None;
    }
    let mut table = root;
    let mut level = LEVELS;
    loop {
        let index = ((iova >> level_shift(level)) & 511) as usize;
        let e = load(table, index)?;
        if e & PTE_PRESENT == 0 || e & PTE_RESERVED_MASK != 0 {
            return None;
        }
        let addr = e & PTE_ADDR_MASK;
        if e & PTE_LEAF != 0 {
            let size = 1u64 << level_shift(level);
            if level == LEVELS || !addr.is_multiple_of(size) {
                return None;
            }
            return Some((addr + iova % size, e & PTE_READ != 0, e & PTE_WRITE != 0));
        }
        if level == 1 {
            return None;
        }
        table = addr;
        level -= 1;
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let pool_pages = u64::from(input.u8() % 8) + 2;
    let user_pages = u64::from(input.u8() % 8) + 1;
    let mut pool = Pool { words: vec![0; (pool_pages * 512) as usize], loads: Cell::new(0) };
    let mut user = User { words: vec![0; (user_pages * 512) as usize] };
    let s2_root = (u64::from(input.u8()) % (pool_pages - 1) + 1) * PAGE;
    let s1_root = match input.u8() {
        0 => input.u64(),
        k => u64::from(k % 8) * PAGE,
    };
    let iova = match input.u8() {
        0 => input.u64(),
        k => (u64::from(k) << 12) | (u64::from(input.u16()) << 21) | u64::from(input.u16() & 0xfff),
    };
    // Sparse writes into the pool and user memory.
    while input.len() >= 4 {
        let target = input.u8();
        let index = usize::from(input.u16());
        let e = entry(&mut input, pool_pages, user_pages);
        if target & 1 == 0 {
            let n = pool.words.len();
            pool.words[index % n] = e;
        } else {
            let n = user.words.len();
            user.words[index % n] = e;
        }
    }

    let s1 = Stage1 { s2: &pool, s2_root, read: |sys| user.read(sys) };
    let got = walk_nested(&s1, s1_root, iova);
    assert!(pool.loads.get() <= 4 * 4 + 4, "the walk read {} stage-2 entries", pool.loads.get());

    // The same walk by the reference rules.
    let s2_load = |t: u64, i: usize| pool.load(t, i);
    let s1_load = |t: u64, i: usize| -> Option<u64> {
        let at = t.checked_add(i as u64 * 8)?;
        if i >= 512 || at % 8 != 0 {
            return None;
        }
        let (sys, r, _) = reference(&s2_load, s2_root, at)?;
        if !r {
            return None;
        }
        user.read(sys)
    };
    let want = reference(&s1_load, s1_root, iova)
        .and_then(|(gpa, r1, w1)| reference(&s2_load, s2_root, gpa).map(|(sys, r2, w2)| (sys, r1 && r2, w1 && w2)));
    match (got, want) {
        (Ok(l), Some((sys, r, w))) => {
            assert_eq!(l.address, sys, "address");
            assert_eq!((l.perm.read, l.perm.write), (r, w), "rights");
            assert_eq!(l.s2.address, sys, "stage-2 leaf");
        }
        (Err(_), None) => {}
        (got, want) => panic!("the walk gave {got:?}, the rules {want:?}"),
    }
});
