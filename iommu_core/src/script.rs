//! The `ioasidctl` command language and the status report.
//!
//! A script drives one session, one command per line (`#` starts a
//! comment). Objects created by a command are bound to the name given to
//! it and referred to by that name later (or by numeric id); a name keeps
//! its id after the object is destroyed. pPASIDs and devices have names of
//! their own kind: a pPASID's name is not an object id, and the reverse.
//! Numbers take `0x` hex and `K`/`M`/`G` suffixes (powers of 1024).
//!
//! | command | effect |
//! |---------|--------|
//! | `mem NAME SIZE` | create a memfd of SIZE bytes and register it |
//! | `file NAME PATH [ro]` | register an existing file (guest RAM on /dev/shm or hugetlbfs, a disk image), opened read-write (read-only with `ro`) |
//! | `ioas NAME` | allocate a paging IOAS |
//! | `nested NAME PARENT S1ROOT` | allocate a nested IOAS |
//! | `map IOAS MEM OFFSET LENGTH [iova=X] [perm=r\|w\|rw]` | map (automatic IOVA unless `iova=`) |
//! | `map-many IOAS MEM OFFSET LENGTH COUNT [iova=X] [stride=S] [mem-stride=S] [perm=..]` | COUNT maps of LENGTH bytes in batched requests, all or nothing: the i-th of MEM at OFFSET + i × mem-stride (default LENGTH), at IOVA X + i × stride (default LENGTH) or automatic |
//! | `unmap-many IOAS IOVA LENGTH COUNT [stride=S]` | unmap COUNT ranges of LENGTH bytes at IOVA + i × stride (default LENGTH), in batched requests, each all or nothing |
//! | `unmap IOAS IOVA LENGTH` | unmap whole mappings in the range |
//! | `unmap-all IOAS` | unmap everything |
//! | `copy DST SRC SRC_IOVA LENGTH [iova=X] [perm=..]` | copy mappings to another IOAS |
//! | `destroy NAME` | destroy an object |
//! | `ranges IOAS` | print usable IOVA ranges |
//! | `allow IOAS START-LAST...` | set the allowed ranges (none = all) |
//! | `reserve IOAS START LAST` | add a reserved range |
//! | `invalidate NESTED all` / `invalidate NESTED IOVA LENGTH` | stage-1 invalidate |
//! | `pasid NAME` / `pasid-free NAME` | allocate / free a global pPASID |
//! | `dirty IOAS on\|off` | dirty tracking |
//! | `dirty-read IOAS IOVA LENGTH [page=SIZE] [no-clear]` | print the dirty pages |
//! | `translate IOAS IOVA` | walk the page table for one IOVA |
//! | `faults [MAX]` | take fault records |
//! | `page-faults IOAS on\|off` | page-fault handling (page requests) of an IOAS |
//! | `respond COOKIE success\|invalid` | answer a page request |
//! | `page-table IOAS` | dump the IOAS's page-table entries |
//! | `channel NAME` / `channel-close NAME` | open a device channel of the session (for `bind ... channel=NAME`) / close it |
//! | `status` | print this session's objects |
//! | `bind DEV SOCKET [channel=NAME]` | bind the device served at control socket SOCKET to this session through a new device channel (or one opened by `channel`) |
//! | `attach DEV rid\|VPASID IOAS` / `replace DEV rid\|VPASID IOAS` | attach (or move) the device's RID or a vPASID to an IOAS or nested IOAS |
//! | `detach DEV rid\|VPASID` | detach the RID or a vPASID |
//! | `vpasids DEV` | print the device server's vPASID map |
//! | `unbind DEV` | drop the binding |
//! | `expect ERRNO[\|ERRNO...] COMMAND...` | run COMMAND, which must fail with one of the ERRNOs |

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::client::{self, Client};
use crate::ctl::{self, Control};
use crate::errno::Errno;
use crate::types::*;

/// The code of an errno name a script may expect: the core's vocabulary
/// and the device server's extra ones (`ENODEV`, `ENOSYS`, `EIO`, `EFAULT`).
pub fn errno_code(name: &str) -> Option<i32> {
    if let Some(e) = Errno::from_name(name) {
        return Some(e.code());
    }
    match name {
        "ENODEV" => Some(libc::ENODEV),
        "ENOSYS" => Some(libc::ENOSYS),
        "EIO" => Some(libc::EIO),
        "EFAULT" => Some(libc::EFAULT),
        _ => None,
    }
}

fn errno_names(codes: &[i32]) -> String {
    codes.iter().map(|&c| ctl::errno_name(c)).collect::<Vec<_>>().join("|")
}

/// Errors of parsing or running a script.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A line could not be parsed.
    #[error("line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The core or a device server refused a command, or a connection
    /// failed.
    #[error("line {line}: {command}: {message}")]
    Command {
        /// 1-based line number.
        line: usize,
        /// The command text.
        command: String,
        /// The failure.
        message: String,
        /// Its errno, for a refusal.
        errno: Option<i32>,
    },
    /// An `expect` line did not fail as expected.
    #[error("line {line}: {command}: expected {}, got {got}", errno_names(expected))]
    Expectation {
        /// 1-based line number.
        line: usize,
        /// The command text.
        command: String,
        /// The errnos expected (any one of them).
        expected: Vec<i32>,
        /// What happened instead.
        got: String,
    },
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number.
    pub line: usize,
    /// The errnos an `expect` prefix accepts (`expect EOVERFLOW|EINVAL`).
    pub expect: Option<Vec<i32>>,
    /// The words of the command.
    pub words: Vec<String>,
}

/// Parses a number: decimal, `0x` hex, optional `K`, `M`, `G` suffix.
pub fn parse_number(s: &str) -> Option<u64> {
    let (body, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else {
        body.parse::<u64>().ok()?
    };
    v.checked_mul(mult)
}

/// Splits a script into commands.
pub fn parse(text: &str) -> Result<Vec<Line>, Error> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        out.extend(parse_line(raw, i + 1)?);
    }
    Ok(out)
}

/// Parses line number `line` of a script: `None` for a blank line or a
/// comment.
pub fn parse_line(raw: &str, line: usize) -> Result<Option<Line>, Error> {
    let code = raw.split('#').next().unwrap_or("");
    let mut words: Vec<String> = code.split_whitespace().map(str::to_string).collect();
    if words.is_empty() {
        return Ok(None);
    }
    let mut expect = None;
    if words[0] == "expect" {
        let names = words.get(1).ok_or_else(|| Error::Parse { line, message: "expect needs an errno".into() })?;
        let mut codes = Vec::new();
        for name in names.split('|') {
            codes.push(
                errno_code(name).ok_or_else(|| Error::Parse { line, message: format!("unknown errno {name:?}") })?,
            );
        }
        expect = Some(codes);
        words.drain(..2);
        if words.is_empty() {
            return Err(Error::Parse { line, message: "expect needs a command".into() });
        }
    }
    Ok(Some(Line { line, expect, words }))
}

/// Maps `entries` into `ioas` in batches of at most
/// [`BATCH_ENTRIES`](crate::model::BATCH_ENTRIES), all or nothing: when a
/// batch is refused, the batches mapped before it are unmapped again.
pub fn map_many(client: &mut Client, ioas: u32, entries: &[MapEntry]) -> client::Result<Vec<u64>> {
    let mut iovas: Vec<u64> = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(crate::model::BATCH_ENTRIES) {
        match client.map_batch(ioas, chunk) {
            Ok(v) => iovas.extend(v),
            Err(e) => {
                let done: Vec<UnmapEntry> =
                    iovas.iter().zip(entries).map(|(&iova, m)| UnmapEntry { iova, length: m.length }).collect();
                for undo in done.chunks(crate::model::BATCH_ENTRIES) {
                    // Best effort: the connection may be what failed.
                    if client.unmap_batch(ioas, undo).is_err() {
                        break;
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(iovas)
}

/// Runs parsed scripts against one session.
pub struct Runner<'a> {
    client: &'a mut Client,
    /// Object names (memory objects, IOASes), kept after a destroy.
    names: HashMap<String, u32>,
    /// pPASID names.
    pasids: HashMap<String, u32>,
    /// Devices bound through control sockets, by name.
    devices: std::collections::BTreeMap<String, BoundDevice>,
    /// Device channels opened by `channel`, by name: (id, fd).
    channels: HashMap<String, (u64, std::os::fd::OwnedFd)>,
    mems: Vec<std::fs::File>,
}

/// A device bound through its server's control socket; the binding lasts
/// while the connection does.
struct BoundDevice {
    control: Control,
    socket: String,
    bound: ctl::Bound,
}

/// What failed: the message and, for a refusal, its errno.
struct Refusal {
    message: String,
    errno: Option<i32>,
}

impl From<client::Error> for Refusal {
    fn from(e: client::Error) -> Refusal {
        Refusal { errno: e.errno().map(Errno::code), message: e.to_string() }
    }
}

impl From<ctl::Error> for Refusal {
    fn from(e: ctl::Error) -> Refusal {
        Refusal { errno: e.errno(), message: e.to_string() }
    }
}

fn need<'w>(words: &'w [String], n: usize, usage: &str) -> Result<&'w [String], String> {
    if words.len() < n {
        return Err(format!("usage: {usage}"));
    }
    Ok(words)
}

fn num(s: &str) -> Result<u64, String> {
    parse_number(s).ok_or_else(|| format!("{s:?} is not a number"))
}

fn perm_of(s: &str) -> Result<Perm, String> {
    match s {
        "r" => Ok(Perm::R),
        "w" => Ok(Perm::W),
        "rw" => Ok(Perm::RW),
        _ => Err(format!("permission {s:?} is not r, w or rw")),
    }
}

/// Options `key=value` after the positional words.
fn options(words: &[String]) -> Result<HashMap<String, String>, String> {
    let mut m = HashMap::new();
    for w in words {
        match w.split_once('=') {
            Some((k, v)) => {
                m.insert(k.to_string(), v.to_string());
            }
            None => {
                m.insert(w.clone(), String::new());
            }
        }
    }
    Ok(m)
}

enum Outcome {
    Print(String),
    Refused(Refusal),
}

/// The RID (`rid`) or a vPASID.
fn target(s: &str) -> Result<Option<u32>, String> {
    if s == "rid" {
        return Ok(None);
    }
    let v = num(s).map_err(|_| format!("{s:?} is neither rid nor a vPASID"))?;
    u32::try_from(v).map(Some).map_err(|_| format!("vPASID {s} is not 32 bits"))
}

fn render_fault(f: &FaultRecord) -> String {
    let mut s = format!("dev {} pPASID {:#x} IOVA {:#x} {} {:?}", f.dev_id, f.pasid, f.iova, f.access, f.reason);
    if f.cookie != 0 {
        let _ = write!(s, " page request cookie {} group {}{}", f.cookie, f.group, if f.last { " last" } else { "" });
    }
    s
}

fn target_name(t: Option<u32>) -> String {
    t.map_or("RID".to_string(), |v| format!("vPASID {v:#x}"))
}

fn render_map(m: &ctl::PasidMap) -> String {
    let mut parts = vec![match m.rid {
        Some(r) => format!("RID -> IOAS {r}"),
        None => "RID on the device server's compat IOAS".to_string(),
    }];
    for e in &m.entries {
        parts.push(format!("vPASID {:#x} -> pPASID {:#x} -> IOAS {}", e.vpasid, e.ppasid, e.pt_id));
    }
    parts.join("; ")
}

impl<'a> Runner<'a> {
    /// A runner over an open session.
    pub fn new(client: &'a mut Client) -> Runner<'a> {
        Runner {
            client,
            names: HashMap::new(),
            pasids: HashMap::new(),
            devices: std::collections::BTreeMap::new(),
            channels: HashMap::new(),
            mems: Vec::new(),
        }
    }

    /// An object id: a name bound earlier (destroyed or not) or a number.
    fn id(&self, s: &str) -> Result<u32, String> {
        if let Some(id) = self.names.get(s) {
            return Ok(*id);
        }
        if self.pasids.contains_key(s) {
            return Err(format!("{s:?} names a pPASID, not an object"));
        }
        if self.devices.contains_key(s) {
            return Err(format!("{s:?} names a device, not an object"));
        }
        let v = num(s).map_err(|_| format!("{s:?} is neither a name bound earlier nor an id"))?;
        u32::try_from(v).map_err(|_| format!("{s} is not a 32-bit id"))
    }

    /// A pPASID: a name bound by `pasid` or a number.
    fn pasid(&self, s: &str) -> Result<u32, String> {
        if let Some(p) = self.pasids.get(s) {
            return Ok(*p);
        }
        if self.names.contains_key(s) {
            return Err(format!("{s:?} names an object, not a pPASID"));
        }
        let v = num(s).map_err(|_| format!("{s:?} is neither a pPASID name nor a number"))?;
        u32::try_from(v).map_err(|_| format!("{s} is not a 32-bit pPASID"))
    }

    fn device(&mut self, s: &str) -> Result<&mut BoundDevice, String> {
        self.devices.get_mut(s).ok_or_else(|| format!("no device called {s:?} was bound"))
    }

    /// Binds a name, in one kind only.
    fn name(&mut self, name: &str, id: u32) {
        self.pasids.remove(name);
        self.names.insert(name.to_string(), id);
    }

    /// Runs one line, writing its result to `out` or its error to `err`
    /// (after flushing `out`); returns the error, if any.
    pub fn run_line(&mut self, l: &Line, out: &mut dyn std::io::Write, err: &mut dyn std::io::Write) -> Option<Error> {
        let mut errors = self.run_to(std::slice::from_ref(l), false, out, err);
        errors.pop()
    }

    /// Runs every line, writing one result line per command to `out`.
    /// Stops at the first failure unless `keep_going`; returns the errors.
    pub fn run(&mut self, lines: &[Line], keep_going: bool, out: &mut dyn std::io::Write) -> Vec<Error> {
        self.run_to(lines, keep_going, out, &mut std::io::sink())
    }

    /// As [`Runner::run`], also writing each error to `err` as it happens
    /// (after flushing `out`), so results and errors come in script order.
    pub fn run_to(
        &mut self,
        lines: &[Line],
        keep_going: bool,
        out: &mut dyn std::io::Write,
        err: &mut dyn std::io::Write,
    ) -> Vec<Error> {
        let mut errors = Vec::new();
        for l in lines {
            let command = l.words.join(" ");
            let res = match self.exec(&l.words) {
                Err(message) => Err(Error::Parse { line: l.line, message: format!("{command}: {message}") }),
                Ok(Outcome::Print(text)) => match &l.expect {
                    None => Ok(text),
                    Some(e) => Err(Error::Expectation {
                        line: l.line,
                        command: command.clone(),
                        expected: e.clone(),
                        got: "success".into(),
                    }),
                },
                Ok(Outcome::Refused(r)) => match (&l.expect, r.errno) {
                    (Some(want), Some(got)) if want.contains(&got) => Ok(format!("failed as expected: {}", r.message)),
                    (Some(want), _) => Err(Error::Expectation {
                        line: l.line,
                        command: command.clone(),
                        expected: want.clone(),
                        got: r.message,
                    }),
                    (None, errno) => {
                        Err(Error::Command { line: l.line, command: command.clone(), message: r.message, errno })
                    }
                },
            };
            match res {
                Ok(text) => {
                    let _ = writeln!(out, "line {}: {command}: {text}", l.line);
                }
                Err(e) => {
                    let _ = out.flush();
                    let _ = writeln!(err, "ioasidctl: {e}");
                    let _ = err.flush();
                    errors.push(e);
                    if !keep_going {
                        break;
                    }
                }
            }
        }
        let _ = out.flush();
        errors
    }

    /// What the session holds: named objects, pPASIDs and bound devices
    /// with their vPASID maps (asked of each device server now).
    pub fn holdings(&mut self) -> String {
        let mut o = String::new();
        let mut names: Vec<(&String, &u32)> = self.names.iter().collect();
        names.sort_by_key(|(n, id)| (**id, (*n).clone()));
        let objects: Vec<String> = names.iter().map(|(n, id)| format!("{n}={id}")).collect();
        let _ = writeln!(o, "objects: {}", if objects.is_empty() { "none".into() } else { objects.join(" ") });
        let mut pasids: Vec<(&String, &u32)> = self.pasids.iter().collect();
        pasids.sort_by_key(|(n, p)| (**p, (*n).clone()));
        if !pasids.is_empty() {
            let list: Vec<String> = pasids.iter().map(|(n, p)| format!("{n}={p:#x}")).collect();
            let _ = writeln!(o, "pPASIDs: {}", list.join(" "));
        }
        for (name, d) in self.devices.iter_mut() {
            let map = match d.control.list() {
                Ok(m) => render_map(&m),
                Err(e) => format!("vPASID map unavailable: {e}"),
            };
            let _ = writeln!(o, "device {name} (device {} at {}): {map}", d.bound.dev_id, d.socket);
        }
        o
    }

    fn exec(&mut self, w: &[String]) -> Result<Outcome, String> {
        let c = &mut *self.client;
        macro_rules! call {
            ($e:expr, |$v:ident| $fmt:expr) => {
                match $e {
                    Ok($v) => Ok(Outcome::Print($fmt)),
                    Err(err) => Ok(Outcome::Refused(Refusal::from(err))),
                }
            };
        }
        match w[0].as_str() {
            "mem" => {
                let w = need(w, 3, "mem NAME SIZE")?;
                let size = num(&w[2])?;
                let file = crate::memfd::create(&w[1], size).map_err(|e| e.to_string())?;
                let r = c.register_memory(&file);
                if let Ok(m) = &r {
                    self.name(&w[1], m.id);
                    self.mems.push(file);
                }
                call!(r, |m| format!(
                    "memory object {} ({:#x} bytes, seals {}, system address {:#x})",
                    m.id, m.size, m.seals, m.system_address
                ))
            }
            "file" => {
                let w = need(w, 3, "file NAME PATH [ro]")?;
                let ro = match w.get(3).map(String::as_str) {
                    None => false,
                    Some("ro") => true,
                    Some(x) => return Err(format!("{x:?} is not ro")),
                };
                let file = match std::fs::OpenOptions::new().read(true).write(!ro).open(&w[2]) {
                    Ok(f) => f,
                    Err(e) => {
                        let message = format!("cannot open {}: {e}", w[2]);
                        return Ok(Outcome::Refused(Refusal { message, errno: e.raw_os_error() }));
                    }
                };
                let r = c.register_memory(&file);
                if let Ok(m) = &r {
                    self.name(&w[1], m.id);
                    self.mems.push(file);
                }
                call!(r, |m| format!(
                    "memory object {} ({:#x} bytes of {}, {}, seals {}, system address {:#x})",
                    m.id,
                    m.size,
                    w[2],
                    if ro { "read-only" } else { "read-write" },
                    m.seals,
                    m.system_address
                ))
            }
            "ioas" => {
                let w = need(w, 2, "ioas NAME")?;
                let r = c.ioas_alloc();
                if let Ok(id) = r {
                    self.name(&w[1], id);
                }
                call!(r, |id| format!("IOAS {id}"))
            }
            "nested" => {
                let w = need(w, 4, "nested NAME PARENT S1ROOT")?;
                let (parent, root) = (self.id(&w[2])?, num(&w[3])?);
                let r = self.client.nested_alloc(parent, root);
                if let Ok(id) = r {
                    self.name(&w[1], id);
                }
                call!(r, |id| format!("nested IOAS {id} on {parent}, stage-1 root {root:#x}"))
            }
            "map" => {
                let w = need(w, 5, "map IOAS MEM OFFSET LENGTH [iova=X] [perm=rw]")?;
                let o = options(&w[5..])?;
                let args = MapArgs {
                    ioas: self.id(&w[1])?,
                    mem: self.id(&w[2])?,
                    offset: num(&w[3])?,
                    length: num(&w[4])?,
                    iova: o.get("iova").map(|v| num(v)).transpose()?,
                    perm: o.get("perm").map_or(Ok(Perm::RW), |p| perm_of(p))?,
                };
                call!(self.client.map(args), |iova| format!("mapped at IOVA {iova:#x}"))
            }
            "map-many" => {
                let usage = "map-many IOAS MEM OFFSET LENGTH COUNT [iova=X] [stride=S] [mem-stride=S] [perm=rw]";
                let w = need(w, 6, usage)?;
                let o = options(&w[6..])?;
                let (ioas, mem, offset, length, count) =
                    (self.id(&w[1])?, self.id(&w[2])?, num(&w[3])?, num(&w[4])?, num(&w[5])?);
                let iova = o.get("iova").map(|v| num(v)).transpose()?;
                let stride = o.get("stride").map_or(Ok(length), |v| num(v))?;
                let mem_stride = o.get("mem-stride").map_or(Ok(length), |v| num(v))?;
                let perm = o.get("perm").map_or(Ok(Perm::RW), |p| perm_of(p))?;
                let step = |base: u64, i: u64, by: u64| {
                    i.checked_mul(by).and_then(|d| base.checked_add(d)).ok_or("an address overflows 64 bits")
                };
                let mut entries = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 20));
                for i in 0..count {
                    let iova = iova.map(|v| step(v, i, stride)).transpose()?;
                    entries.push(MapEntry { mem, offset: step(offset, i, mem_stride)?, length, iova, perm });
                }
                call!(map_many(self.client, ioas, &entries), |iovas| match (iovas.first(), iovas.last()) {
                    (Some(a), Some(b)) => format!("mapped {} ranges, IOVA {a:#x} to {b:#x}", iovas.len()),
                    _ => "mapped 0 ranges".to_string(),
                })
            }
            "unmap-many" => {
                let w = need(w, 5, "unmap-many IOAS IOVA LENGTH COUNT [stride=S]")?;
                let o = options(&w[5..])?;
                let (ioas, iova, length, count) = (self.id(&w[1])?, num(&w[2])?, num(&w[3])?, num(&w[4])?);
                let stride = o.get("stride").map_or(Ok(length), |v| num(v))?;
                let mut ranges = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 20));
                for i in 0..count {
                    let at = i.checked_mul(stride).and_then(|d| iova.checked_add(d)).ok_or("an IOVA overflows")?;
                    ranges.push(UnmapEntry { iova: at, length });
                }
                let mut total = 0u64;
                let mut res = Ok(());
                for chunk in ranges.chunks(crate::model::BATCH_ENTRIES) {
                    match self.client.unmap_batch(ioas, chunk) {
                        Ok(b) => total += b,
                        Err(e) => {
                            res = Err(e);
                            break;
                        }
                    }
                }
                call!(res, |_v| format!("unmapped {total:#x} bytes"))
            }
            "unmap" => {
                let w = need(w, 4, "unmap IOAS IOVA LENGTH")?;
                let (ioas, iova, len) = (self.id(&w[1])?, num(&w[2])?, num(&w[3])?);
                call!(self.client.unmap(ioas, iova, len), |b| format!("unmapped {b:#x} bytes"))
            }
            "unmap-all" => {
                let w = need(w, 2, "unmap-all IOAS")?;
                let ioas = self.id(&w[1])?;
                call!(self.client.unmap(ioas, 0, u64::MAX), |b| format!("unmapped {b:#x} bytes"))
            }
            "copy" => {
                let w = need(w, 5, "copy DST SRC SRC_IOVA LENGTH [iova=X] [perm=rw]")?;
                let o = options(&w[5..])?;
                let args = CopyArgs {
                    dst: self.id(&w[1])?,
                    src: self.id(&w[2])?,
                    src_iova: num(&w[3])?,
                    length: num(&w[4])?,
                    dst_iova: o.get("iova").map(|v| num(v)).transpose()?,
                    perm: o.get("perm").map_or(Ok(Perm::RW), |p| perm_of(p))?,
                };
                call!(self.client.copy(args), |iova| format!("copied to IOVA {iova:#x}"))
            }
            "destroy" => {
                let w = need(w, 2, "destroy NAME")?;
                let id = self.id(&w[1])?;
                // The name keeps its id: `expect ENOENT destroy NAME` works.
                call!(self.client.destroy(id), |_v| format!("destroyed {id}"))
            }
            "ranges" => {
                let w = need(w, 2, "ranges IOAS")?;
                let ioas = self.id(&w[1])?;
                call!(self.client.iova_ranges(ioas), |r| {
                    let list: Vec<String> = r.ranges.iter().map(|x| format!("{:#x}-{:#x}", x.start, x.last)).collect();
                    format!("alignment {:#x}, ranges {}", r.alignment, list.join(" "))
                })
            }
            "allow" => {
                let w = need(w, 2, "allow IOAS [START-LAST]...")?;
                let ioas = self.id(&w[1])?;
                let mut ranges = Vec::new();
                for r in &w[2..] {
                    let (a, b) = r.split_once('-').ok_or_else(|| format!("{r:?} is not START-LAST"))?;
                    ranges.push(IovaRange { start: num(a)?, last: num(b)? });
                }
                let n = ranges.len();
                call!(self.client.allow_iovas(ioas, ranges), |_v| format!("{n} allowed ranges"))
            }
            "reserve" => {
                let w = need(w, 4, "reserve IOAS START LAST")?;
                let (ioas, s, l) = (self.id(&w[1])?, num(&w[2])?, num(&w[3])?);
                call!(self.client.add_reserved(ioas, s, l), |_v| format!("reserved {s:#x}-{l:#x}"))
            }
            "invalidate" => {
                let w = need(w, 3, "invalidate NESTED all | invalidate NESTED IOVA LENGTH")?;
                let n = self.id(&w[1])?;
                let scope = if w[2] == "all" {
                    InvalidateScope::All
                } else {
                    let w = need(w, 4, "invalidate NESTED IOVA LENGTH")?;
                    InvalidateScope::Range { iova: num(&w[2])?, length: num(&w[3])? }
                };
                call!(self.client.invalidate(n, scope), |_v| "invalidated".to_string())
            }
            "pasid" => {
                let w = need(w, 2, "pasid NAME")?;
                let r = self.client.ppasid_alloc();
                if let Ok(p) = r {
                    self.names.remove(&w[1]);
                    self.pasids.insert(w[1].clone(), p);
                }
                call!(r, |p| format!("pPASID {p:#x}"))
            }
            "pasid-free" => {
                let w = need(w, 2, "pasid-free NAME")?;
                let p = self.pasid(&w[1])?;
                call!(self.client.ppasid_free(p), |_v| format!("freed pPASID {p:#x}"))
            }
            "dirty" => {
                let w = need(w, 3, "dirty IOAS on|off")?;
                let ioas = self.id(&w[1])?;
                let on = match w[2].as_str() {
                    "on" => true,
                    "off" => false,
                    x => return Err(format!("{x:?} is not on or off")),
                };
                call!(self.client.set_dirty_tracking(ioas, on), |_v| format!("dirty tracking {}", w[2]))
            }
            "dirty-read" => {
                let w = need(w, 4, "dirty-read IOAS IOVA LENGTH [page=SIZE] [no-clear]")?;
                let o = options(&w[4..])?;
                let (ioas, iova, len) = (self.id(&w[1])?, num(&w[2])?, num(&w[3])?);
                let page = o.get("page").map_or(Ok(4096), |v| num(v))?;
                call!(self.client.dirty_bitmap(ioas, iova, len, page, o.contains_key("no-clear")), |bm| {
                    let mut pages = Vec::new();
                    for (i, word) in bm.iter().enumerate() {
                        for b in 0..64 {
                            if word & (1 << b) != 0 {
                                pages.push(format!("{:#x}", iova + (i as u64 * 64 + b) * page));
                            }
                        }
                    }
                    format!("{} dirty pages: {}", pages.len(), pages.join(" "))
                })
            }
            "translate" => {
                let w = need(w, 3, "translate IOAS IOVA")?;
                let (ioas, iova) = (self.id(&w[1])?, num(&w[2])?);
                call!(self.client.translate(ioas, iova), |t| format!(
                    "system address {:#x} (memory object {} offset {:#x}), {}, {} page",
                    t.system_address,
                    t.mem,
                    t.offset,
                    t.perm,
                    human(t.page_size)
                ))
            }
            "faults" => {
                let max = match w.get(1) {
                    Some(v) => u32::try_from(num(v)?).map_err(|_| "MAX is too large".to_string())?,
                    None => 64,
                };
                call!(self.client.read_faults(max), |f| {
                    let list: Vec<String> = f.iter().map(render_fault).collect();
                    format!("{} fault records{}{}", f.len(), if f.is_empty() { "" } else { ": " }, list.join("; "))
                })
            }
            "page-faults" => {
                let w = need(w, 3, "page-faults IOAS on|off")?;
                let ioas = self.id(&w[1])?;
                let on = match w[2].as_str() {
                    "on" => true,
                    "off" => false,
                    x => return Err(format!("{x:?} is not on or off")),
                };
                call!(self.client.set_page_faults(ioas, on), |_v| format!("page faults {}", w[2]))
            }
            "respond" => {
                let w = need(w, 3, "respond COOKIE success|invalid")?;
                let cookie = num(&w[1])?;
                let code = match w[2].as_str() {
                    "success" => page_response::SUCCESS,
                    "invalid" => page_response::INVALID,
                    x => u32::try_from(num(x)?).map_err(|_| format!("{x} is not a response code"))?,
                };
                call!(self.client.respond_fault(cookie, code), |f| format!("answered {}", render_fault(&f)))
            }
            "page-table" => {
                let w = need(w, 2, "page-table IOAS")?;
                let ioas = self.id(&w[1])?;
                let session = self.client.session_id();
                call!(self.client.page_table(session, ioas), |l| format!("{} lines\n{}", l.len(), l.join("\n")))
            }
            "channel" => {
                let w = need(w, 2, "channel NAME")?;
                if self.channels.contains_key(&w[1]) {
                    return Err(format!("channel {:?} is open already", w[1]));
                }
                match self.client.open_device_channel() {
                    Ok((id, fd)) => {
                        self.channels.insert(w[1].clone(), (id, fd));
                        Ok(Outcome::Print(format!("device channel {id}")))
                    }
                    Err(e) => Ok(Outcome::Refused(e.into())),
                }
            }
            "channel-close" => {
                let w = need(w, 2, "channel-close NAME")?;
                let (id, _fd) = self.channels.remove(&w[1]).ok_or_else(|| format!("no channel called {:?}", w[1]))?;
                Ok(Outcome::Print(format!("closed device channel {id}")))
            }
            "status" => call!(self.client.status(), |s| format!("\n{}", render_status(&s))),
            "bind" => {
                let w = need(w, 3, "bind DEV SOCKET [channel=NAME]")?;
                if self.devices.contains_key(&w[1]) {
                    return Err(format!("{:?} is bound already; unbind it first", w[1]));
                }
                let o = options(&w[3..])?;
                let chan = match o.get("channel") {
                    // The channel's fd goes to the device server; ours
                    // closes once it has it.
                    Some(n) => self.channels.remove(n).ok_or_else(|| format!("no channel called {n:?}"))?.1,
                    None => match self.client.open_device_channel() {
                        Ok((_, fd)) => fd,
                        Err(e) => return Ok(Outcome::Refused(e.into())),
                    },
                };
                let mut control = match Control::connect(std::path::Path::new(&w[2])) {
                    Ok(c) => c,
                    Err(e) => return Ok(Outcome::Refused(e.into())),
                };
                match control.bind(std::os::fd::AsFd::as_fd(&chan)) {
                    Ok(bound) => {
                        let text = format!(
                            "device {} of session {} (PASID width {}) through {}",
                            bound.dev_id, bound.session, bound.pasid_width, w[2]
                        );
                        self.devices.insert(w[1].clone(), BoundDevice { control, socket: w[2].clone(), bound });
                        Ok(Outcome::Print(text))
                    }
                    Err(e) => Ok(Outcome::Refused(e.into())),
                }
            }
            "attach" | "replace" => {
                let replace = w[0] == "replace";
                let w = need(w, 4, "attach|replace DEV rid|VPASID IOAS")?;
                let (t, ioas) = (target(&w[2])?, self.id(&w[3])?);
                let d = self.device(&w[1])?;
                call!(d.control.attach(t, ioas, replace), |p| match t {
                    None => format!("RID -> IOAS {ioas}"),
                    Some(v) => format!("vPASID {v:#x} -> pPASID {p:#x} -> IOAS {ioas}"),
                })
            }
            "detach" => {
                let w = need(w, 3, "detach DEV rid|VPASID")?;
                let t = target(&w[2])?;
                let d = self.device(&w[1])?;
                call!(d.control.detach(t), |_v| format!("{} detached", target_name(t)))
            }
            "vpasids" => {
                let w = need(w, 2, "vpasids DEV")?;
                let d = self.device(&w[1])?;
                call!(d.control.list(), |m| render_map(&m))
            }
            "unbind" => {
                let w = need(w, 2, "unbind DEV")?;
                let d = self.device(&w[1])?;
                let r = d.control.unbind();
                if r.is_ok() {
                    self.devices.remove(&w[1]);
                }
                call!(r, |_v| "unbound".to_string())
            }
            other => Err(format!("unknown command {other:?}")),
        }
    }
}

/// Formats a byte count for people: `4 KiB`, `2 MiB`, `1.5 GiB`, `12345 B`.
pub fn human(n: u64) -> String {
    const UNITS: [(u64, &str); 4] = [(1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (m, u) in UNITS {
        if n >= m {
            return if n.is_multiple_of(m) {
                format!("{} {u}", n / m)
            } else {
                format!("{:.1} {u}", n as f64 / m as f64)
            };
        }
    }
    format!("{n} B")
}

/// Renders a snapshot as a readable report.
pub fn render_status(s: &Snapshot) -> String {
    render_status_with(s, &std::collections::BTreeMap::new())
}

/// Like [`render_status`], with the driver state (server, vPASID map) of
/// the devices in `drivers`, keyed by `(session, device)`.
pub fn render_status_with(s: &Snapshot, drivers: &std::collections::BTreeMap<(u64, u32), DriverState>) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "core: {} sessions, {} pPASIDs in use, table pool {}/{} tables ({}), {} requests ({} errors), {} faults",
        s.sessions.len(),
        s.ppasids.len(),
        s.pool.tables_in_use,
        s.pool.capacity,
        human(s.pool.bytes),
        s.stats.requests,
        s.stats.errors,
        s.stats.faults
    );
    for ses in &s.sessions {
        let _ = writeln!(o, "\nsession {}  pid {}  uid {}  objects {}", ses.id, ses.pid, ses.uid, ses.objects);
        if !ses.memory.is_empty() {
            let _ = writeln!(
                o,
                "  {:<6} {:>10} {:<12} {:>18} {:>8}  BACKING",
                "MEMORY", "SIZE", "SEALS", "SYSTEM ADDRESS", "MAPPINGS"
            );
            for m in &ses.memory {
                let backing = match m.client_address {
                    None => "file".to_string(),
                    Some(a) => format!("client at {a:#x}"),
                };
                let _ = writeln!(
                    o,
                    "  {:<6} {:>10} {:<12} {:>#18x} {:>8}  {}",
                    m.id,
                    human(m.size),
                    m.seals,
                    m.system_address,
                    m.mappings,
                    backing
                );
            }
        }
        for i in &ses.ioas {
            match i.kind {
                IoasKind::Paging => {
                    let _ = writeln!(
                        o,
                        "  IOAS {}: paging, {} mappings ({}), {} tables, dirty tracking {}, {} nested",
                        i.id,
                        i.mappings.len(),
                        human(i.stats.mapped_bytes),
                        i.tables,
                        if i.dirty_tracking { "on" } else { "off" },
                        i.children
                    );
                    if !i.mappings.is_empty() {
                        let _ = writeln!(
                            o,
                            "    {:<37} {:>10} {:>6} {:>12} {:>4}",
                            "IOVA", "LENGTH", "MEM", "OFFSET", "PERM"
                        );
                    }
                    for m in &i.mappings {
                        let range = format!("{:#x}-{:#x}", m.iova, m.iova + m.length - 1);
                        let _ = writeln!(
                            o,
                            "    {:<37} {:>10} {:>6} {:>#12x} {:>4}",
                            range,
                            human(m.length),
                            m.mem,
                            m.offset,
                            m.perm
                        );
                    }
                    for r in &i.reserved {
                        let _ = writeln!(o, "    reserved {:#x}-{:#x}", r.start, r.last);
                    }
                    for r in &i.allowed {
                        let _ = writeln!(o, "    allowed {:#x}-{:#x}", r.start, r.last);
                    }
                }
                IoasKind::Nested { parent, s1_root } => {
                    let _ = writeln!(
                        o,
                        "  IOAS {}: nested on {parent}, stage-1 root {s1_root:#x}, {} invalidations",
                        i.id, i.stats.invalidations
                    );
                }
            }
        }
        for d in &ses.devices {
            let att: Vec<String> = d
                .attachments
                .iter()
                .map(
                    |a| if a.pasid == 0 { format!("RID->{}", a.pt_id) } else { format!("{:#x}->{}", a.pasid, a.pt_id) },
                )
                .collect();
            let _ = writeln!(
                o,
                "  device {} {} {}: channel {}, PASID width {}, PRI {}, dirty {}{}; attached {}",
                d.id,
                d.pci_address,
                d.name,
                d.channel,
                d.caps.pasid_width,
                if d.caps.pri { "yes" } else { "no" },
                if d.caps.dirty_tracking { "yes" } else { "no" },
                if d.fenced { ", FENCED" } else { "" },
                if att.is_empty() { "nothing".to_string() } else { att.join(" ") }
            );
            if let Some(st) = drivers.get(&(ses.id, d.id)) {
                let _ = writeln!(o, "    served by {}", st.server);
                for v in &st.vpasids {
                    let _ = writeln!(o, "    vPASID {:#x} -> pPASID {:#x} -> IOAS {}", v.vpasid, v.ppasid, v.pt_id);
                }
            }
        }
        if !ses.ppasids.is_empty() {
            let list: Vec<String> = ses.ppasids.iter().map(|p| format!("{p:#x}")).collect();
            let _ = writeln!(o, "  pPASIDs: {}", list.join(" "));
        }
        if ses.faults_queued > 0 || ses.faults_lost > 0 {
            let _ = writeln!(o, "  faults: {} queued, {} lost", ses.faults_queued, ses.faults_lost);
        }
    }
    if !s.faults.is_empty() {
        let _ = writeln!(o, "\nrecent faults:");
        for f in &s.faults {
            let r = &f.record;
            let _ = writeln!(
                o,
                "  #{} session {} dev {} pasid {:#x} iova {:#x} {} {:?}",
                f.seq, f.session, r.dev_id, r.pasid, r.iova, r.access, r.reason
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_lines() {
        assert_eq!(parse_number("4K"), Some(4096));
        assert_eq!(parse_number("0x10M"), Some(16 << 20));
        assert_eq!(parse_number("1G"), Some(1 << 30));
        assert_eq!(parse_number("12"), Some(12));
        assert_eq!(parse_number("0xffffffffffffffffK"), None);
        assert_eq!(parse_number("x"), None);
        let l = parse("# c\n\nmem ram 2M # ram\nexpect EBUSY destroy ram\n").unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].line, l[0].words.join(" ")), (3, "mem ram 2M".into()));
        assert_eq!((l[1].expect.clone(), l[1].words.len()), (Some(vec![libc::EBUSY]), 2));
        let l = parse("expect EOVERFLOW|EINVAL|ENODEV map a b 0 4K").unwrap();
        assert_eq!(l[0].expect, Some(vec![libc::EOVERFLOW, libc::EINVAL, libc::ENODEV]));
        assert!(matches!(parse("expect EWHAT x"), Err(Error::Parse { line: 1, .. })));
        assert!(matches!(parse("expect EINVAL|EWHAT x"), Err(Error::Parse { line: 1, .. })));
        assert!(matches!(parse("\nexpect EBUSY"), Err(Error::Parse { line: 2, .. })));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(3 << 19), "1.5 MiB");
        assert_eq!(human(12), "12 B");
    }
}
