//! Precise kernel figures for `lb-microbench`: XDP ns/packet from `BPF_PROG_RUN`'s own repeat loop,
//! Mpps on one CPU with live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`), and ns/packet as the conntrack
//! table grows to 10, 10k and 1M live flows.
//!
//! The program rewrites every frame it forwards, and the kernel hands the same bytes to the next
//! repetition (in place without live frames; in recycled pages with them). So the timed program is
//! a [`Chain`]: a small restore program (assembled in [`super::bpfsys`]) copies frame `i` of an
//! array map into the packet (`i` advancing per run), then tail-calls the measured program. Every
//! repetition thus sees a valid frame of its own; the chain's own cost (map lookups, copy, tail
//! call) is measured by chaining to a constant program and subtracted from the ns/packet figures.
//! Live-frame Mpps compare lb with a trivial `XDP_TX` program through the same chain.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use super::bpfsys::{self, Asm, Size};

/// Bytes per frame slot in the frames map.
const SLOT: usize = 128;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Restore-then-tail-call: the program under test sees frame `next` of `frames` on every run.
pub struct Chain {
    prog: OwnedFd,
    state: OwnedFd,
    frames: OwnedFd,
    progs: OwnedFd,
    len: usize,
    capacity: u32,
    expected_attach: u32,
}

/// The restore program: `frames[state.next]` (len bytes) over the packet, `state.next` advanced
/// modulo `state.count`, then `bpf_tail_call(ctx, progs, 0)`; `XDP_ABORTED` if anything fails.
fn restore_program(
    state: BorrowedFd<'_>,
    frames: BorrowedFd<'_>,
    progs: BorrowedFd<'_>,
    len: usize,
) -> Vec<bpfsys::Insn> {
    let mut a = Asm::default();
    a.mov(6, 1) // r6 = ctx
        .store_imm(Size::W, 10, -4, 0)
        .ld_map(1, state)
        .mov(2, 10)
        .add_imm(2, -4)
        .call(1) // map_lookup_elem
        .jeq_imm(0, 0, "out")
        .mov(7, 0)
        .load(Size::W, 8, 7, 0) // r8 = next
        .load(Size::W, 9, 7, 4) // r9 = count
        .mov(1, 8)
        .add_imm(1, 1)
        .jlt(1, 9, "keep")
        .mov_imm(1, 0)
        .label("keep")
        .store(Size::W, 7, 0, 1)
        .store(Size::W, 10, -4, 8)
        .ld_map(1, frames)
        .mov(2, 10)
        .add_imm(2, -4)
        .call(1)
        .jeq_imm(0, 0, "out")
        .mov(7, 0)
        .load(Size::W, 2, 6, 0) // data
        .load(Size::W, 3, 6, 4) // data_end
        .mov(4, 2)
        .add_imm(4, len as i32)
        .jgt(4, 3, "out");
    let mut off = 0usize;
    while off < len {
        let size = match len - off {
            8.. => (Size::Dw, 8),
            4..=7 => (Size::W, 4),
            2..=3 => (Size::H, 2),
            _ => (Size::B, 1),
        };
        a.load(size.0, 4, 7, off as i16).store(size.0, 2, off as i16, 4);
        off += size.1;
    }
    a.mov(1, 6)
        .ld_map(2, progs)
        .mov_imm(3, 0)
        .call(12) // tail_call
        .label("out")
        .mov_imm(0, bpfsys::XDP_ABORTED)
        .exit();
    a.finish()
}

impl Chain {
    /// A chain for frames of `len` bytes (≤ 128), up to `capacity` of them, ending in `target`.
    pub fn new(target: BorrowedFd<'_>, len: usize, capacity: u32) -> Result<Chain, String> {
        if !(14..=SLOT).contains(&len) {
            return Err(format!(
                "frames of {len} bytes do not fit the chain's {SLOT}-byte slots"
            ));
        }
        // The program array takes the first program's properties; lb is loaded with or without an
        // expected attach type depending on the loader, so try both.
        let mut last = String::new();
        for expected in [bpfsys::ATTACH_XDP, 0] {
            match Chain::build(target, len, capacity, expected) {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn build(
        target: BorrowedFd<'_>,
        len: usize,
        capacity: u32,
        expected_attach: u32,
    ) -> Result<Chain, String> {
        let state = bpfsys::map_create(bpfsys::MAP_ARRAY, 4, 8, 1, "kb_state")?;
        let frames = bpfsys::map_create(bpfsys::MAP_ARRAY, 4, SLOT as u32, capacity.max(1), "kb_frames")?;
        let progs = bpfsys::map_create(bpfsys::MAP_PROG_ARRAY, 4, 4, 1, "kb_progs")?;
        let insns = restore_program(state.as_fd(), frames.as_fd(), progs.as_fd(), len);
        let prog = bpfsys::prog_load_xdp(&insns, "kb_restore", expected_attach)?;
        let chain = Chain {
            prog,
            state,
            frames,
            progs,
            len,
            capacity,
            expected_attach,
        };
        chain.target(target)?;
        Ok(chain)
    }

    /// The program the chain tail-calls.
    pub fn target(&self, target: BorrowedFd<'_>) -> Result<(), String> {
        bpfsys::map_update(
            self.progs.as_fd(),
            &0u32.to_ne_bytes(),
            &(target.as_raw_fd() as u32).to_ne_bytes(),
        )
        .map_err(|e| format!("chaining the program under test: {e}"))
    }

    /// A constant program (`r0 = verdict`) loaded so that it fits this chain.
    pub fn constant(&self, verdict: i32, name: &str) -> Result<OwnedFd, String> {
        bpfsys::prog_load_xdp(&bpfsys::constant_program(verdict), name, self.expected_attach)
    }

    /// The frames each run starts from, in turn; the next run starts at the first.
    pub fn frames(&self, frames: &[Vec<u8>]) -> Result<(), String> {
        if frames.len() > self.capacity as usize {
            return Err(format!(
                "{} frames for a chain of {}",
                frames.len(),
                self.capacity
            ));
        }
        let mut slot = [0u8; SLOT];
        for (i, f) in frames.iter().enumerate() {
            if f.len() != self.len {
                return Err(format!("frame {i} has {} bytes, the chain {}", f.len(), self.len));
            }
            slot[..f.len()].copy_from_slice(f);
            bpfsys::map_update(self.frames.as_fd(), &(i as u32).to_ne_bytes(), &slot)?;
        }
        self.rewind(frames.len() as u32)
    }

    /// The next run starts again at frame 0 of `count`.
    pub fn rewind(&self, count: u32) -> Result<(), String> {
        let mut v = [0u8; 8];
        v[4..].copy_from_slice(&count.to_ne_bytes());
        bpfsys::map_update(self.state.as_fd(), &0u32.to_ne_bytes(), &v)
    }

    /// `repeat` runs as if arriving on `ifindex`: (last verdict, kernel ns per run). Live: the
    /// verdicts are carried out (redirects transmitted), in batches of 64.
    pub fn run(&self, ifindex: u32, repeat: u32, live: bool) -> Result<(u32, f64), String> {
        let input = vec![0u8; self.len];
        let (verdict, ns) = bpfsys::test_run(
            self.prog.as_fd(),
            &input,
            ifindex,
            repeat,
            if live { bpfsys::F_LIVE_FRAMES } else { 0 },
            if live { 64 } else { 0 },
        )?;
        Ok((verdict, f64::from(ns)))
    }
}

/// An `XDP_DROP` program that counts what it drops (one u64 in an array map): the far end of the
/// veth a live-frames run transmits into, so each transmitted frame is counted and freed at once.
pub struct Sink {
    count: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl Sink {
    pub fn attach(ifindex: u32) -> Result<Sink, String> {
        let count = bpfsys::map_create(bpfsys::MAP_ARRAY, 4, 8, 1, "kb_sink")?;
        let mut a = Asm::default();
        a.store_imm(Size::W, 10, -4, 0)
            .ld_map(1, count.as_fd())
            .mov(2, 10)
            .add_imm(2, -4)
            .call(1)
            .jeq_imm(0, 0, "out")
            .mov_imm(1, 1)
            .atomic_add64(0, 0, 1)
            .label("out")
            .mov_imm(0, bpfsys::XDP_DROP)
            .exit();
        let insns = a.finish();
        let prog = bpfsys::prog_load_xdp(&insns, "kb_sink", bpfsys::ATTACH_XDP)
            .or_else(|_| bpfsys::prog_load_xdp(&insns, "kb_sink", 0))?;
        let link = bpfsys::xdp_link(prog.as_fd(), ifindex)?;
        Ok(Sink {
            count,
            _prog: prog,
            _link: link,
        })
    }

    /// Frames dropped so far.
    pub fn count(&self) -> Result<u64, String> {
        let mut v = [0u8; 8];
        bpfsys::map_lookup(self.count.as_fd(), &0u32.to_ne_bytes(), &mut v)?;
        Ok(u64::from_ne_bytes(v))
    }
}

/// Pins the calling thread to its current CPU's highest sibling: `BPF_PROG_RUN` runs on the
/// caller's CPU, so a live-frames run (including the receiving veth's softirq) stays on one CPU.
pub fn pin_to_one_cpu() -> Result<usize, String> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let cpu = cpus - 1;
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).map_err(|e| e.to_string())?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .map_err(|e| format!("sched_setaffinity: {e}"))?;
    Ok(cpu)
}

/// Median, minimum and maximum.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        f64::midpoint(s[n / 2 - 1], s[n / 2])
    };
    (median, s[0], s[n - 1])
}
