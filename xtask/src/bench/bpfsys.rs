//! Raw bpf(2) for `lb-microbench`'s kernel figures: maps, small programs assembled from
//! instructions, XDP links, and `BPF_PROG_RUN` with flags (live frames, batch size), which aya
//! 0.14's `TestRunOptions` does not carry.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_MAP_DELETE_ELEM: i64 = 3;
const BPF_MAP_GET_NEXT_KEY: i64 = 4;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_MAP_GET_FD_BY_ID: i64 = 14;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_LINK_CREATE: i64 = 28;

pub const MAP_ARRAY: u32 = 2;
pub const MAP_PROG_ARRAY: u32 = 3;
const PROG_XDP: u32 = 6;
pub const ATTACH_XDP: u32 = 37;
/// `BPF_F_TEST_XDP_LIVE_FRAMES`.
pub const F_LIVE_FRAMES: u32 = 1 << 1;

pub const XDP_ABORTED: i32 = 0;
pub const XDP_DROP: i32 = 1;

/// `union bpf_attr`, as bytes (every command here fits in 128).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Attr {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Attr {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: i64, attr: &mut Attr) -> Result<i64, std::io::Error> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed; pointers in it are live for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_of(r: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(r as RawFd) }
}

/// A new map.
pub fn map_create(kind: u32, key: u32, value: u32, entries: u32, name: &str) -> Result<OwnedFd, String> {
    let mut a = Attr::new();
    a.u32(0, kind).u32(4, key).u32(8, value).u32(12, entries);
    let n = name.len().min(15);
    a.0[28..28 + n].copy_from_slice(&name.as_bytes()[..n]);
    bpf(BPF_MAP_CREATE, &mut a)
        .map(fd_of)
        .map_err(|e| format!("creating map {name}: {e}"))
}

fn elem(cmd: i64, map: BorrowedFd<'_>, key: *const u8, value: *const u8, flags: u64) -> std::io::Result<i64> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, key as u64)
        .u64(16, value as u64)
        .u64(24, flags);
    bpf(cmd, &mut a)
}

/// `map[key] = value` (sizes as the map was made).
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> Result<(), String> {
    elem(BPF_MAP_UPDATE_ELEM, map, key.as_ptr(), value.as_ptr(), 0)
        .map(drop)
        .map_err(|e| format!("map update: {e}"))
}

/// `map[key]` into `value`; `false` when absent.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> Result<bool, String> {
    match elem(BPF_MAP_LOOKUP_ELEM, map, key.as_ptr(), value.as_mut_ptr(), 0) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(format!("map lookup: {e}")),
    }
}

/// Every key of a hash map (`key_size` bytes each).
pub fn map_keys(map: BorrowedFd<'_>, key_size: usize) -> Result<Vec<Vec<u8>>, String> {
    let mut keys = Vec::new();
    let mut next = vec![0u8; key_size];
    let mut prev: Option<Vec<u8>> = None;
    loop {
        let key_ptr = prev.as_ref().map_or(std::ptr::null(), Vec::as_ptr);
        match elem(BPF_MAP_GET_NEXT_KEY, map, key_ptr, next.as_mut_ptr(), 0) {
            Ok(_) => {
                keys.push(next.clone());
                prev = Some(next.clone());
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(format!("map next key: {e}")),
        }
    }
}

/// Removes every entry of a hash map; returns how many there were.
pub fn map_clear(map: BorrowedFd<'_>, key_size: usize) -> Result<usize, String> {
    let keys = map_keys(map, key_size)?;
    for k in &keys {
        let _ = elem(BPF_MAP_DELETE_ELEM, map, k.as_ptr(), std::ptr::null(), 0);
    }
    Ok(keys.len())
}

/// The maps a loaded program uses, by name.
pub fn program_maps(prog: BorrowedFd<'_>) -> Result<Vec<(String, OwnedFd)>, String> {
    // struct bpf_prog_info: nr_map_ids at 52, map_ids at 56 (u64 pointer).
    let mut ids = vec![0u32; 64];
    let mut info = [0u8; 256];
    info[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    info[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(4, info.len() as u32)
        .u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map_err(|e| format!("program info: {e}"))?;
    let n = (u32::from_ne_bytes(info[52..56].try_into().expect("4 bytes")) as usize).min(ids.len());
    let mut out = Vec::new();
    for &id in &ids[..n] {
        let mut a = Attr::new();
        a.u32(0, id);
        let fd = fd_of(bpf(BPF_MAP_GET_FD_BY_ID, &mut a).map_err(|e| format!("map {id}: {e}"))?);
        // struct bpf_map_info: name at 24 (16 bytes).
        let mut minfo = [0u8; 128];
        let mut a = Attr::new();
        a.u32(0, fd.as_raw_fd() as u32)
            .u32(4, minfo.len() as u32)
            .u64(8, minfo.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map_err(|e| format!("map {id} info: {e}"))?;
        let name = &minfo[24..40];
        let end = name.iter().position(|&b| b == 0).unwrap_or(16);
        out.push((String::from_utf8_lossy(&name[..end]).into_owned(), fd));
    }
    Ok(out)
}

/// Loads an XDP program from instructions; the verifier's log is in the error.
pub fn prog_load_xdp(insns: &[Insn], name: &str, expected_attach: u32) -> Result<OwnedFd, String> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    let mut a = Attr::new();
    a.u32(0, PROG_XDP)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, expected_attach);
    let n = name.len().min(15);
    a.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    bpf(BPF_PROG_LOAD, &mut a).map(fd_of).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        let tail: String = text.lines().rev().take(8).collect::<Vec<_>>().join(" | ");
        format!("loading {name}: {e}: {tail}")
    })
}

/// Attaches an XDP program to an interface (driver or generic, the kernel's choice); detached
/// when the returned link is closed.
pub fn xdp_link(prog: BorrowedFd<'_>, ifindex: u32) -> Result<OwnedFd, String> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, ATTACH_XDP);
    bpf(BPF_LINK_CREATE, &mut a)
        .map(fd_of)
        .map_err(|e| format!("attaching XDP to ifindex {ifindex}: {e}"))
}

/// One `BPF_PROG_RUN`: (the last run's return value, the kernel's average ns per run).
pub fn test_run(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    ingress_ifindex: u32,
    repeat: u32,
    flags: u32,
    batch_size: u32,
) -> Result<(u32, u32), String> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(8, frame.len() as u32)
        .u64(16, frame.as_ptr() as u64)
        .u32(32, repeat)
        .u32(40, ctx.len() as u32)
        .u64(48, ctx.as_ptr() as u64)
        .u32(64, flags)
        .u32(72, batch_size);
    bpf(BPF_PROG_TEST_RUN, &mut a).map_err(|e| format!("BPF_PROG_RUN: {e}"))?;
    Ok((a.get_u32(4), a.get_u32(36)))
}

// ---- Instructions -------------------------------------------------------------------------------

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// Load/store width.
#[derive(Clone, Copy)]
pub enum Size {
    B = 0x10,
    H = 0x08,
    W = 0x00,
    Dw = 0x18,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// A tiny assembler with forward jumps to named labels.
#[derive(Default)]
pub struct Asm {
    insns: Vec<Insn>,
    fixups: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    pub fn mov(&mut self, dst: u8, src: u8) -> &mut Asm {
        self.insns.push(insn(0xbf, dst, src, 0, 0));
        self
    }
    pub fn mov_imm(&mut self, dst: u8, imm: i32) -> &mut Asm {
        self.insns.push(insn(0xb7, dst, 0, 0, imm));
        self
    }
    pub fn add_imm(&mut self, dst: u8, imm: i32) -> &mut Asm {
        self.insns.push(insn(0x07, dst, 0, 0, imm));
        self
    }
    pub fn load(&mut self, size: Size, dst: u8, src: u8, off: i16) -> &mut Asm {
        self.insns.push(insn(0x61 | size as u8, dst, src, off, 0));
        self
    }
    pub fn store(&mut self, size: Size, dst: u8, off: i16, src: u8) -> &mut Asm {
        self.insns.push(insn(0x63 | size as u8, dst, src, off, 0));
        self
    }
    pub fn store_imm(&mut self, size: Size, dst: u8, off: i16, imm: i32) -> &mut Asm {
        self.insns.push(insn(0x62 | size as u8, dst, 0, off, imm));
        self
    }
    /// `lock *(u64 *)(dst + off) += src`.
    pub fn atomic_add64(&mut self, dst: u8, off: i16, src: u8) -> &mut Asm {
        self.insns.push(insn(0xdb, dst, src, off, 0));
        self
    }
    /// `dst = map` (ld_imm64 with a map fd).
    pub fn ld_map(&mut self, dst: u8, map: BorrowedFd<'_>) -> &mut Asm {
        self.insns.push(insn(0x18, dst, 1, 0, map.as_raw_fd()));
        self.insns.push(insn(0, 0, 0, 0, 0));
        self
    }
    pub fn call(&mut self, helper: i32) -> &mut Asm {
        self.insns.push(insn(0x85, 0, 0, 0, helper));
        self
    }
    pub fn exit(&mut self) -> &mut Asm {
        self.insns.push(insn(0x95, 0, 0, 0, 0));
        self
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: &'static str) -> &mut Asm {
        self.fixups.push((self.insns.len(), to));
        self.insns.push(insn(code, dst, src, 0, imm));
        self
    }
    /// `if dst == imm goto to`.
    pub fn jeq_imm(&mut self, dst: u8, imm: i32, to: &'static str) -> &mut Asm {
        self.jump(0x15, dst, 0, imm, to)
    }
    /// `if dst > src goto to` (unsigned).
    pub fn jgt(&mut self, dst: u8, src: u8, to: &'static str) -> &mut Asm {
        self.jump(0x2d, dst, src, 0, to)
    }
    /// `if dst < src goto to` (unsigned).
    pub fn jlt(&mut self, dst: u8, src: u8, to: &'static str) -> &mut Asm {
        self.jump(0xad, dst, src, 0, to)
    }
    pub fn label(&mut self, name: &'static str) -> &mut Asm {
        self.labels.push((name, self.insns.len()));
        self
    }
    pub fn finish(mut self) -> Vec<Insn> {
        for (at, to) in std::mem::take(&mut self.fixups) {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| *n == to)
                .unwrap_or_else(|| panic!("label {to} missing"))
                .1;
            self.insns[at].off = (target as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// `r0 = verdict; exit`.
pub fn constant_program(verdict: i32) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(0, verdict).exit();
    a.finish()
}
