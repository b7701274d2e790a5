//! The connect hook's programs (no I/O): the eBPF instructions that the cgroup `connect4` and `connect6`
//! hooks run at every `connect()` of a process in the cgroup, made from the redirects. A TCP connect to a
//! service's upstream address and port has its destination rewritten to the service's listen address
//! before the kernel sends anything, so the client's packets go to staybound's listener as if it had dialled
//! it: no NAT, no conntrack, nothing per packet. [`super::bpf`] loads and attaches them.
//!
//! What a program leaves alone: another network namespace (its cookie differs from staybound's), every
//! socket that is not TCP, and staybound's own upstream and probe sockets (the mark [`MARK`], which
//! staybound can always set here: attaching the hook needs `CAP_NET_ADMIN` too).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::Redirect;
use crate::sockopt::MARK;

/// Which hook a program is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

/// One eBPF instruction as the kernel reads it (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct Insn {
    pub code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high one (the bitfield order on little-endian hosts).
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcode parts (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const STX: u8 = 0x03;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU: u8 = 0x04;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const DW: u8 = 0x18;
const MEM: u8 = 0x60;
const IMM: u8 = 0x00;
const K: u8 = 0x00;
const X: u8 = 0x08;
const MOV: u8 = 0xb0;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JNE: u8 = 0x50;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;

// Helpers (enum bpf_func_id).
const GET_NETNS_COOKIE: i32 = 122;

// `struct bpf_sock_addr` offsets.
const USER_IP4: i16 = 4;
const USER_IP6: i16 = 8;
const USER_PORT: i16 = 24;
const TYPE: i16 = 32;
const SK: i16 = 64;
// `struct bpf_sock` offset.
const SK_MARK: i16 = 16;
const SOCK_STREAM: i32 = 1;

// Registers: r1 the context on entry and the first argument, r0 a result, r6-r9 kept across calls.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;

/// Where a jump goes, before offsets are known.
#[derive(Clone, Copy)]
enum To {
    /// The end: allow the connect as it now stands.
    Allow,
    /// The instruction at this index.
    At(usize),
}

/// A program being written: instructions and the jumps still to resolve.
struct Asm {
    insns: Vec<Insn>,
    jumps: Vec<(usize, To)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn { code, regs: dst | (src << 4), off, imm });
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: To) {
        self.jumps.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }

    fn load_u32(&mut self, dst: u8, base: u8, off: i16) {
        self.op(LDX | MEM | W, dst, base, off, 0);
    }

    /// Stores a 32-bit constant through r2 (a store of an immediate into the context is refused).
    fn store_u32(&mut self, base: u8, off: i16, value: u32) {
        self.op(ALU | MOV | K, R2, 0, 0, value as i32);
        self.op(STX | MEM | W, base, R2, off, 0);
    }

    fn finish(mut self) -> Vec<Insn> {
        let allow = self.insns.len();
        self.op(ALU64 | MOV | K, R0, 0, 0, 1);
        self.op(JMP | EXIT, 0, 0, 0, 0);
        for (at, to) in self.jumps {
            let target = match to {
                To::Allow => allow,
                To::At(i) => i,
            };
            self.insns[at].off = i16::try_from(target as isize - at as isize - 1).unwrap_or(i16::MAX);
        }
        self.insns
    }
}

/// A 32-bit word as it lies in memory, read as the host reads a `__u32` (addresses and ports are in
/// network order in `struct bpf_sock_addr`).
fn word(bytes: [u8; 4]) -> u32 {
    u32::from_ne_bytes(bytes)
}

fn port_word(port: u16) -> u32 {
    let [hi, lo] = port.to_be_bytes();
    word([hi, lo, 0, 0])
}

/// Where a redirect sends a connection: a wildcard listen address takes connections on loopback.
fn destination(to: SocketAddr) -> SocketAddr {
    match to.ip() {
        IpAddr::V4(a) if a.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), to.port()),
        IpAddr::V6(a) if a.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), to.port()),
        _ => to,
    }
}

/// The address pairs one family's hook rewrites: IPv4 redirects for `connect4`; for `connect6` the IPv6 ones
/// and, v4-mapped, the IPv4 ones (a dual-stack socket dialling an IPv4 address).
fn rewrites(family: Family, redirects: &[Redirect]) -> Vec<(SocketAddr, SocketAddr)> {
    let mapped = |a: SocketAddr| match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(v4.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    redirects
        .iter()
        .filter_map(|r| {
            let to = destination(r.to);
            match (family, r.upstream.is_ipv4(), to.is_ipv4()) {
                (Family::V4, true, true) => Some((r.upstream, to)),
                (Family::V6, false, false) => Some((r.upstream, to)),
                (Family::V6, true, true) => Some((mapped(r.upstream), mapped(to))),
                _ => None,
            }
        })
        .collect()
}

/// The program for one family's hook. `netns` is the cookie of staybound's network namespace.
pub(crate) fn program(family: Family, redirects: &[Redirect], netns: u64) -> Vec<Insn> {
    let mut a = Asm { insns: Vec::new(), jumps: Vec::new() };
    a.op(ALU64 | MOV | X, R6, R1, 0, 0);
    // Only TCP.
    a.load_u32(R2, R6, TYPE);
    a.jump(JMP32 | JNE | K, R2, 0, SOCK_STREAM, To::Allow);
    // Only staybound's network namespace: its listeners are not in any other.
    a.op(ALU64 | MOV | X, R1, R6, 0, 0);
    a.op(JMP | CALL, 0, 0, 0, GET_NETNS_COOKIE);
    a.op(LD | DW | IMM, R2, 0, 0, netns as u32 as i32);
    a.op(0, 0, 0, 0, (netns >> 32) as u32 as i32);
    a.jump(JMP | JNE | X, R0, R2, 0, To::Allow);
    // Not staybound's own sockets.
    a.op(LDX | MEM | DW, R2, R6, SK, 0);
    a.load_u32(R3, R2, SK_MARK);
    a.jump(JMP32 | JEQ | K, R3, 0, MARK as i32, To::Allow);
    a.load_u32(R7, R6, USER_PORT);
    if family == Family::V4 {
        a.load_u32(R8, R6, USER_IP4);
    }
    for (from, to) in rewrites(family, redirects) {
        // The compares of this redirect jump past its block when one fails: to the next block's first
        // instruction, whose index is known once this block is written.
        let first_jump = a.jumps.len();
        match (from.ip(), to.ip()) {
            (IpAddr::V4(f), IpAddr::V4(t)) => {
                a.jump(JMP32 | JNE | K, R8, 0, word(f.octets()) as i32, To::Allow);
                a.jump(JMP32 | JNE | K, R7, 0, port_word(from.port()) as i32, To::Allow);
                a.store_u32(R6, USER_IP4, word(t.octets()));
            }
            (IpAddr::V6(f), IpAddr::V6(t)) => {
                for (i, chunk) in f.octets().chunks_exact(4).enumerate() {
                    let bytes = [chunk[0], chunk[1], chunk[2], chunk[3]];
                    a.load_u32(R2, R6, USER_IP6 + 4 * i as i16);
                    a.jump(JMP32 | JNE | K, R2, 0, word(bytes) as i32, To::Allow);
                }
                a.jump(JMP32 | JNE | K, R7, 0, port_word(from.port()) as i32, To::Allow);
                for (i, chunk) in t.octets().chunks_exact(4).enumerate() {
                    a.store_u32(R6, USER_IP6 + 4 * i as i16, word([chunk[0], chunk[1], chunk[2], chunk[3]]));
                }
            }
            _ => continue,
        }
        a.store_u32(R6, USER_PORT, port_word(to.port()));
        a.jump(JMP | JA, 0, 0, 0, To::Allow);
        let next = a.insns.len();
        let last_jump = a.jumps.len() - 1;
        for j in &mut a.jumps[first_jump..last_jump] {
            j.1 = To::At(next);
        }
    }
    a.finish()
}

#[cfg(test)]
mod tests {
    //! The programs run here on a small interpreter of the instructions they use, over every case a
    //! connect can be; the real kernel's verifier and hooks are exercised in `tests/it/connect_hook.rs`.
    use super::*;

    /// The fields of `struct bpf_sock_addr` a program reads or writes, and what its helpers return.
    #[derive(Clone, Debug, PartialEq)]
    struct Ctx {
        ctx: [u8; 72],
        mark: u32,
        netns: u64,
    }

    fn ctx(dest: SocketAddr, sock_type: u32, mark: u32, netns: u64) -> Ctx {
        let mut c = [0u8; 72];
        match dest.ip() {
            IpAddr::V4(a) => c[4..8].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => c[8..24].copy_from_slice(&a.octets()),
        }
        c[24..26].copy_from_slice(&dest.port().to_be_bytes());
        c[32..36].copy_from_slice(&sock_type.to_ne_bytes());
        Ctx { ctx: c, mark, netns }
    }

    fn dest(c: &Ctx, family: Family) -> SocketAddr {
        let port = u16::from_be_bytes([c.ctx[24], c.ctx[25]]);
        match family {
            Family::V4 => SocketAddr::new(Ipv4Addr::from(<[u8; 4]>::try_from(&c.ctx[4..8]).unwrap()).into(), port),
            Family::V6 => SocketAddr::new(Ipv6Addr::from(<[u8; 16]>::try_from(&c.ctx[8..24]).unwrap()).into(), port),
        }
    }

    /// Runs `prog` over `c` with the semantics of the opcodes above; returns r0. Pointers are tagged: the
    /// context is 1 << 40, the socket 2 << 40.
    fn run(prog: &[Insn], c: &mut Ctx) -> u64 {
        const CTX: u64 = 1 << 40;
        const SOCK: u64 = 2 << 40;
        let mut r = [0u64; 11];
        r[1] = CTX;
        let mut pc = 0usize;
        for _ in 0..10_000 {
            let i = prog[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            let jump = |cond: bool, pc: &mut usize| {
                if cond {
                    *pc = (*pc as isize + i.off as isize) as usize;
                }
            };
            match i.code {
                c_ if c_ == ALU64 | MOV | X => r[dst] = r[src],
                c_ if c_ == ALU64 | MOV | K => r[dst] = i.imm as i64 as u64,
                c_ if c_ == ALU | MOV | K => r[dst] = u64::from(i.imm as u32),
                c_ if c_ == LD | DW | IMM => {
                    r[dst] = u64::from(i.imm as u32) | (u64::from(prog[pc].imm as u32) << 32);
                    pc += 1;
                }
                c_ if c_ == LDX | MEM | W => {
                    let at = r[src].wrapping_add(i.off as i64 as u64);
                    r[dst] = if at & SOCK != 0 {
                        assert_eq!(at - SOCK, SK_MARK as u64, "only the mark is read of the socket");
                        u64::from(c.mark)
                    } else {
                        let o = (at - CTX) as usize;
                        u64::from(u32::from_ne_bytes(c.ctx[o..o + 4].try_into().unwrap()))
                    };
                }
                c_ if c_ == LDX | MEM | DW => {
                    assert_eq!(r[src] + i.off as u64 - CTX, SK as u64, "only the socket pointer is read as 64 bits");
                    r[dst] = SOCK;
                }
                c_ if c_ == STX | MEM | W => {
                    let o = (r[dst] - CTX) as usize + i.off as usize;
                    c.ctx[o..o + 4].copy_from_slice(&(r[src] as u32).to_ne_bytes());
                }
                c_ if c_ == JMP | CALL => {
                    r[0] = match i.imm {
                        GET_NETNS_COOKIE => {
                            assert_eq!(r[1], CTX);
                            c.netns
                        }
                        other => panic!("helper {other}"),
                    };
                    r[1..6].fill(0xdead);
                }
                c_ if c_ == JMP | JA => jump(true, &mut pc),
                c_ if c_ == JMP | JNE | X => jump(r[dst] != r[src], &mut pc),
                c_ if c_ == JMP32 | JNE | K => jump(r[dst] as u32 != i.imm as u32, &mut pc),
                c_ if c_ == JMP32 | JEQ | K => jump(r[dst] as u32 == i.imm as u32, &mut pc),
                c_ if c_ == JMP | EXIT => return r[0],
                other => panic!("opcode {other:#x} at {}", pc - 1),
            }
        }
        panic!("the program did not end");
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn redirects() -> Vec<Redirect> {
        let r = |service: &str, upstream: &str, to: &str| Redirect {
            service: service.into(),
            upstream: sa(upstream),
            to: sa(to),
        };
        vec![
            r("redis", "198.18.0.100:6379", "127.0.0.1:16379"),
            r("pg", "198.19.255.254:5432", "0.0.0.0:15432"),
            r("v6", "[2001:db8::1]:6379", "[::1]:16380"),
            r("v6any", "[2001:db8::2]:443", "[::]:10443"),
        ]
    }

    const NETNS: u64 = 0x1234_5678_9abc_def0;

    /// Every destination below, through each family's program, for every kind of socket and caller.
    #[test]
    fn each_upstream_goes_to_its_listener_and_nothing_else_is_touched() {
        let rs = redirects();
        let expected: &[(Family, &str, Option<&str>)] = &[
            (Family::V4, "198.18.0.100:6379", Some("127.0.0.1:16379")),
            (Family::V4, "198.19.255.254:5432", Some("127.0.0.1:15432")),
            (Family::V4, "198.18.0.100:6380", None),
            (Family::V4, "198.18.0.101:6379", None),
            (Family::V4, "198.19.255.254:6379", None),
            (Family::V4, "127.0.0.1:16379", None),
            (Family::V4, "0.0.0.0:0", None),
            (Family::V6, "[2001:db8::1]:6379", Some("[::1]:16380")),
            (Family::V6, "[2001:db8::2]:443", Some("[::1]:10443")),
            (Family::V6, "[::ffff:198.18.0.100]:6379", Some("[::ffff:127.0.0.1]:16379")),
            (Family::V6, "[::ffff:198.19.255.254]:5432", Some("[::ffff:127.0.0.1]:15432")),
            (Family::V6, "[2001:db8::1]:6380", None),
            (Family::V6, "[2001:db8::3]:6379", None),
            (Family::V6, "[2001:db9::1]:6379", None),
            (Family::V6, "[::ffff:198.18.0.101]:6379", None),
            (Family::V6, "[::1]:16380", None),
        ];
        for family in [Family::V4, Family::V6] {
            let prog = program(family, &rs, NETNS);
            for (_, d, to) in expected.iter().filter(|e| e.0 == family) {
                for (sock_type, mark, netns, moved) in [
                    (1, 0, NETNS, true),
                    (2, 0, NETNS, false),
                    (5, 0, NETNS, false),
                    (1, MARK, NETNS, false),
                    (1, MARK + 1, NETNS, true),
                    (1, 0, NETNS + 1, false),
                    (1, 0, NETNS ^ (1 << 40), false),
                ] {
                    let mut c = ctx(sa(d), sock_type, mark, netns);
                    assert_eq!(run(&prog, &mut c), 1, "a connect is never refused");
                    let want = match to {
                        Some(to) if moved => sa(to),
                        _ => sa(d),
                    };
                    assert_eq!(dest(&c, family), want, "{d} type {sock_type} mark {mark:#x} netns {netns:#x}");
                }
            }
        }
    }

    #[test]
    fn with_no_redirect_nothing_is_rewritten_and_jumps_stay_inside() {
        for family in [Family::V4, Family::V6] {
            for n in 0..=6 {
                let rs: Vec<Redirect> = redirects().into_iter().cycle().take(n).collect();
                let prog = program(family, &rs, NETNS);
                for (at, i) in prog.iter().enumerate() {
                    if matches!(i.code & 0x07, JMP | JMP32) && i.code & 0xf0 != CALL && i.code & 0xf0 != EXIT {
                        let target = at as isize + 1 + i.off as isize;
                        assert!(target > at as isize && (target as usize) < prog.len(), "jump at {at}");
                    }
                }
                let mut c = ctx(sa("[2001:db8::9]:1"), 1, 0, NETNS);
                if family == Family::V4 {
                    c = ctx(sa("192.0.2.1:1"), 1, 0, NETNS);
                }
                let before = c.clone();
                assert_eq!(run(&prog, &mut c), 1);
                assert_eq!(c, before);
            }
        }
    }
}
