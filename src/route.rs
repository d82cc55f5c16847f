//! `route(txid) -> shard`: the one routing function, and its classic-BPF twin.
//!
//! Every copy of a TxID must meet on one shard, whether the kernel steered the
//! packet there (a `SO_ATTACH_REUSEPORT_CBPF` program) or user space handed it
//! over. So the function is built only from what classic BPF can compute:
//! 32-bit big-endian words of the TxID, xor, multiply, shift, and a final
//! modulo. [`bpf_program`] emits the same function as BPF instructions; the
//! tests run that program in a small interpreter and compare.
//!
//! The hash: `h = SEED`; for each 4-byte word `w` (a short last word is padded
//! with zero bytes on the right): `h = (h ^ w) * MUL_WORD; h ^= h >> 15`.
//! Then the murmur3 finaliser (`fmix32`) and `h % shards`.

/// Longest TxID we route; bounds the BPF program (7 instructions per word).
pub const TXID_LEN_MAX: usize = 64;

const SEED: u32 = 0x7478_6761; // "txga"
const MUL_WORD: u32 = 0x9E37_79B1;
const FMIX_MUL_1: u32 = 0x85EB_CA6B;
const FMIX_MUL_2: u32 = 0xC2B2_AE35;

/// The 32-bit hash of a TxID that [`route`] reduces modulo the shard count.
#[inline]
pub fn route_hash(txid: &[u8]) -> u32 {
    let mut h = SEED;
    let mut chunks = txid.chunks_exact(4);
    for c in &mut chunks {
        h = mix_word(h, u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 4];
        w[..rest.len()].copy_from_slice(rest);
        h = mix_word(h, u32::from_be_bytes(w));
    }
    fmix32(h)
}

/// The shard (0..shards) that owns `txid`. `shards` must be at least 1.
#[inline]
pub fn route(txid: &[u8], shards: u32) -> u32 {
    debug_assert!(shards >= 1, "route needs at least one shard");
    route_hash(txid) % shards
}

#[inline]
fn mix_word(h: u32, w: u32) -> u32 {
    let h = (h ^ w).wrapping_mul(MUL_WORD);
    h ^ (h >> 15)
}

#[inline]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(FMIX_MUL_1);
    h ^= h >> 13;
    h = h.wrapping_mul(FMIX_MUL_2);
    h ^ (h >> 16)
}

/// One classic-BPF instruction, laid out like the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Classic-BPF opcodes used by [`bpf_program`] (values from `linux/filter.h`).
pub mod op {
    pub const LD_IMM: u16 = 0x00; // BPF_LD | BPF_W | BPF_IMM
    pub const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    pub const LD_H_ABS: u16 = 0x28; // BPF_LD | BPF_H | BPF_ABS
    pub const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    pub const LD_W_LEN: u16 = 0x80; // BPF_LD | BPF_W | BPF_LEN
    pub const LDX_MEM: u16 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
    pub const ST: u16 = 0x02; // BPF_ST
    pub const ALU_XOR_K: u16 = 0xa4; // BPF_ALU | BPF_XOR | BPF_K
    pub const ALU_XOR_X: u16 = 0xac; // BPF_ALU | BPF_XOR | BPF_X
    pub const ALU_OR_X: u16 = 0x4c; // BPF_ALU | BPF_OR | BPF_X
    pub const ALU_MUL_K: u16 = 0x24; // BPF_ALU | BPF_MUL | BPF_K
    pub const ALU_RSH_K: u16 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
    pub const ALU_LSH_K: u16 = 0x64; // BPF_ALU | BPF_LSH | BPF_K
    pub const ALU_MOD_K: u16 = 0x94; // BPF_ALU | BPF_MOD | BPF_K
    pub const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    pub const TAX: u16 = 0x07; // BPF_MISC | BPF_TAX
    pub const RET_A: u16 = 0x16; // BPF_RET | BPF_A
    pub const RET_K: u16 = 0x06; // BPF_RET | BPF_K
}

/// Why a BPF program could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error("TxID length {0} is out of range: 1..={TXID_LEN_MAX} bytes")]
    TxIdLen(usize),
    #[error("shard count {0} is out of range: at least 1")]
    Shards(u32),
    #[error("TxID offset {offset} + length {len} does not fit in a datagram")]
    Offset { offset: usize, len: usize },
}

/// The classic-BPF program computing [`route`] over the TxID at `offset` in a
/// UDP payload. Packets too short to hold the TxID go to shard `short_shard`,
/// which counts and drops them; a return value outside the group would let the
/// kernel pick a socket at random.
pub fn bpf_program(
    offset: usize,
    txid_len: usize,
    shards: u32,
    short_shard: u32,
) -> Result<Vec<SockFilter>, RouteError> {
    if txid_len == 0 || txid_len > TXID_LEN_MAX {
        return Err(RouteError::TxIdLen(txid_len));
    }
    if shards == 0 || short_shard >= shards {
        return Err(RouteError::Shards(shards));
    }
    let end = offset.saturating_add(txid_len);
    if end > 65_507 {
        return Err(RouteError::Offset {
            offset,
            len: txid_len,
        });
    }
    let ins = |code, k| SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let mut p = vec![
        ins(op::LD_W_LEN, 0),
        // Long enough: fall through; else jump to the last instruction.
        SockFilter {
            code: op::JGE_K,
            jt: 0,
            jf: 0, // patched below
            k: end as u32,
        },
        ins(op::LD_IMM, SEED),
    ];
    let mut at = offset as u32;
    let words = txid_len / 4;
    for _ in 0..words {
        p.push(ins(op::TAX, 0));
        p.push(ins(op::LD_W_ABS, at));
        p.extend(mix_round());
        at += 4;
    }
    match txid_len % 4 {
        0 => {}
        tail => {
            // Save h, build the zero-padded word in A, then A = word ^ h.
            p.push(ins(op::ST, 0));
            match tail {
                1 => {
                    p.push(ins(op::LD_B_ABS, at));
                    p.push(ins(op::ALU_LSH_K, 24));
                }
                2 => {
                    p.push(ins(op::LD_H_ABS, at));
                    p.push(ins(op::ALU_LSH_K, 16));
                }
                _ => {
                    p.push(ins(op::LD_B_ABS, at + 2));
                    p.push(ins(op::ALU_LSH_K, 8));
                    p.push(ins(op::ST, 1));
                    p.push(ins(op::LD_H_ABS, at));
                    p.push(ins(op::ALU_LSH_K, 16));
                    p.push(ins(op::LDX_MEM, 1));
                    p.push(ins(op::ALU_OR_X, 0));
                }
            }
            p.push(ins(op::LDX_MEM, 0));
            p.extend(mix_round());
        }
    }
    // fmix32
    for (shift, mul) in [(16, Some(FMIX_MUL_1)), (13, Some(FMIX_MUL_2)), (16, None)] {
        p.push(ins(op::TAX, 0));
        p.push(ins(op::ALU_RSH_K, shift));
        p.push(ins(op::ALU_XOR_X, 0));
        if let Some(m) = mul {
            p.push(ins(op::ALU_MUL_K, m));
        }
    }
    p.push(ins(op::ALU_MOD_K, shards));
    p.push(ins(op::RET_A, 0));
    p.push(ins(op::RET_K, short_shard));
    let jf = p.len() - 1 - 2; // from the instruction after JGE to the last one
    p[1].jf = u8::try_from(jf).map_err(|_| RouteError::TxIdLen(txid_len))?;
    Ok(p)
}

/// `A = (A ^ X) * MUL_WORD; A ^= A >> 15`, with X holding h and A the word.
fn mix_round() -> [SockFilter; 5] {
    let ins = |code, k| SockFilter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    [
        ins(op::ALU_XOR_X, 0),
        ins(op::ALU_MUL_K, MUL_WORD),
        ins(op::TAX, 0),
        ins(op::ALU_RSH_K, 15),
        ins(op::ALU_XOR_X, 0),
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions [`bpf_program`] emits,
    /// following the kernel's semantics (out-of-bounds loads return 0 = drop).
    pub(crate) fn run_bpf(prog: &[SockFilter], pkt: &[u8]) -> u32 {
        let (mut a, mut x) = (0u32, 0u32);
        let mut mem = [0u32; 16];
        let mut pc = 0usize;
        for _ in 0..4096 {
            let i = prog[pc];
            pc += 1;
            let load = |off: u32, n: usize| -> Option<u32> {
                let off = off as usize;
                let b = pkt.get(off..off + n)?;
                Some(b.iter().fold(0u32, |acc, &v| (acc << 8) | v as u32))
            };
            match i.code {
                op::LD_IMM => a = i.k,
                op::LD_W_LEN => a = pkt.len() as u32,
                op::LD_W_ABS => match load(i.k, 4) {
                    Some(v) => a = v,
                    None => return 0,
                },
                op::LD_H_ABS => match load(i.k, 2) {
                    Some(v) => a = v,
                    None => return 0,
                },
                op::LD_B_ABS => match load(i.k, 1) {
                    Some(v) => a = v,
                    None => return 0,
                },
                op::LDX_MEM => x = mem[i.k as usize],
                op::ST => mem[i.k as usize] = a,
                op::ALU_XOR_K => a ^= i.k,
                op::ALU_XOR_X => a ^= x,
                op::ALU_OR_X => a |= x,
                op::ALU_MUL_K => a = a.wrapping_mul(i.k),
                op::ALU_RSH_K => a >>= i.k,
                op::ALU_LSH_K => a <<= i.k,
                op::ALU_MOD_K => a %= i.k,
                op::TAX => x = a,
                op::JGE_K => {
                    pc += if a >= i.k { i.jt } else { i.jf } as usize;
                }
                op::RET_A => return a,
                op::RET_K => return i.k,
                c => panic!("opcode {c:#x} not handled"),
            }
        }
        panic!("program did not return");
    }

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed;
        move || {
            // splitmix64
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn route_is_deterministic_and_in_range() {
        let id = b"0123456789abcdef";
        for n in 1..=64 {
            let r = route(id, n);
            assert!(r < n);
            assert_eq!(r, route(id, n));
        }
    }

    #[test]
    fn bpf_program_computes_route_for_every_length_and_offset() {
        let mut next = rng(7);
        for len in 1..=TXID_LEN_MAX {
            for offset in [0usize, 1, 3, 8] {
                for shards in [1u32, 2, 3, 7, 16, 64] {
                    let prog = bpf_program(offset, len, shards, 0).unwrap();
                    assert!(prog.len() <= 4096);
                    for _ in 0..8 {
                        let mut pkt = vec![0u8; offset + len + (next() % 5) as usize];
                        pkt.iter_mut().for_each(|b| *b = next() as u8);
                        let txid = &pkt[offset..offset + len];
                        assert_eq!(
                            run_bpf(&prog, &pkt),
                            route(txid, shards),
                            "len {len} offset {offset} shards {shards}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bpf_program_sends_short_packets_to_the_short_shard() {
        let prog = bpf_program(4, 16, 8, 5).unwrap();
        for len in 0..20 {
            assert_eq!(run_bpf(&prog, &vec![0xAB; len]), 5, "len {len}");
        }
        assert!(run_bpf(&prog, &[0xAB; 20]) < 8);
    }

    #[test]
    fn bpf_program_rejects_bad_arguments() {
        assert_eq!(bpf_program(0, 0, 2, 0), Err(RouteError::TxIdLen(0)));
        assert_eq!(bpf_program(0, 65, 2, 0), Err(RouteError::TxIdLen(65)));
        assert_eq!(bpf_program(0, 16, 0, 0), Err(RouteError::Shards(0)));
        assert!(bpf_program(70_000, 16, 2, 0).is_err());
        assert!(bpf_program(usize::MAX, 16, 2, 0).is_err());
    }

    /// Max/min shard load over 1 M TxIDs stays within this ratio: with 64
    /// shards the mean is ~15.6 k per shard and a fair hash lands within a few
    /// standard deviations (~±3 %).
    const SPREAD_MAX_OVER_MIN: f64 = 1.08;

    fn spread(ids: impl Iterator<Item = [u8; 16]>, shards: u32) -> f64 {
        let mut load = vec![0u64; shards as usize];
        for id in ids {
            load[route(&id, shards) as usize] += 1;
        }
        let max = *load.iter().max().unwrap() as f64;
        let min = *load.iter().min().unwrap() as f64;
        max / min
    }

    #[test]
    fn route_spreads_random_txids_evenly_over_2_to_64_shards() {
        for shards in [2u32, 3, 4, 5, 8, 13, 16, 32, 48, 64] {
            let mut next = rng(shards as u64);
            let ids = (0..1_000_000).map(|_| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&next().to_be_bytes());
                id[8..].copy_from_slice(&next().to_be_bytes());
                id
            });
            let r = spread(ids, shards);
            assert!(r <= SPREAD_MAX_OVER_MIN, "{shards} shards: max/min {r:.4}");
        }
    }

    #[test]
    fn route_spreads_sequential_txids_evenly() {
        // Counters are what many feeds use as TxIDs: structure must not skew.
        for shards in [2u32, 16, 64] {
            let ids = (0u64..1_000_000).map(|i| {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&i.to_be_bytes());
                id
            });
            let r = spread(ids, shards);
            assert!(r <= SPREAD_MAX_OVER_MIN, "{shards} shards: max/min {r:.4}");
        }
    }
}
