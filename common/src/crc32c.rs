//! Incremental update of SCTP's CRC32c (RFC 9260 appendix B) for the programs' port rewrites.
//!
//! A CRC is affine in the message: for two messages of the same length,
//! `crc(a) ^ crc(b) == raw(a ^ b)`, where `raw` is the CRC without its initial value and final
//! XOR. Rewriting two bytes of an SCTP packet (a port) therefore changes its checksum by
//! `raw(delta followed by n zero bytes)`, `n` being the bytes after the port; that is the raw CRC
//! of the two changed bytes, multiplied by `x^(8n)` modulo the polynomial. The multiplication
//! uses two tables of `x^(8n)` (low and high byte of `n`), so a rewrite costs a few table
//! look-ups and two 32-step multiplications: bounded, no loop over the packet. (zlib's
//! crc32_combine uses the same arithmetic.)
//!
//! The tables are `static`s so the programs index them in `.rodata` instead of copying them to
//! the stack.

/// CRC32c's polynomial, bit-reflected.
const POLY: u32 = 0x82f6_3b78;
/// `x^0` in the reflected representation.
const ONE: u32 = 0x8000_0000;

/// `a * b` modulo the polynomial (reflected representation), branch-free.
#[inline(always)]
pub const fn multmodp(a: u32, b: u32) -> u32 {
    let mut b = b;
    let mut p = 0u32;
    let mut i = 0;
    while i < 32 {
        let bit = (a >> (31 - i)) & 1;
        p ^= b & 0u32.wrapping_sub(bit);
        b = (b >> 1) ^ (POLY & 0u32.wrapping_sub(b & 1));
        i += 1;
    }
    p
}

const fn byte_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
}

/// `x^(8 * step * i) mod P` for `i` in `0..256`.
const fn power_table(step_bytes: u32) -> [u32; 256] {
    // x^(8 * step): x^8 multiplied step times... computed by squaring x^8 up (step is a power
    // of two here).
    let mut x8 = ONE >> 8; // x^8
    let mut s = step_bytes;
    while s > 1 {
        x8 = multmodp(x8, x8);
        s >>= 1;
    }
    let mut table = [0u32; 256];
    table[0] = ONE;
    let mut i = 1;
    while i < 256 {
        table[i] = multmodp(table[i - 1], x8);
        i += 1;
    }
    table
}

/// The byte-wise CRC32c table.
pub static TABLE: [u32; 256] = byte_table();
/// `x^(8 n)` for `n` in `0..256`.
pub static ZEROS_LO: [u32; 256] = power_table(1);
/// `x^(8 * 256 n)` for `n` in `0..256`.
pub static ZEROS_HI: [u32; 256] = power_table(256);

#[inline(always)]
fn table(t: &'static [u32; 256], i: u32) -> u32 {
    // LLVM folds the mask into the operands it knows are bytes (`(c ^ byte) & 0xff` becomes
    // `(c & 0xff) ^ byte`), and verifiers before 6.2 lose the bound of a XOR: hidden from LLVM,
    // the mask is applied to the register that indexes (5.10 and 6.1 refused it otherwise).
    #[cfg(target_arch = "bpf")]
    let i = core::hint::black_box(i);
    // SAFETY: the index is masked to the table's size.
    unsafe { *t.get_unchecked((i & 0xff) as usize) }
}

/// How the CRC32c of a packet changes when the two bytes at some position change by `delta`
/// (old XOR new, the bytes in packet order, `delta[0]` first) and `trailing` bytes follow them
/// (`trailing` < 65536). XOR the result into the stored checksum (read as a little-endian
/// `u32`, as SCTP stores it).
#[inline(always)]
pub fn delta2(delta: [u8; 2], trailing: u32) -> u32 {
    let c = table(&TABLE, delta[0] as u32);
    let c = table(&TABLE, (c ^ delta[1] as u32) & 0xff) ^ (c >> 8);
    let shift = multmodp(table(&ZEROS_HI, trailing >> 8), table(&ZEROS_LO, trailing));
    multmodp(shift, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in data {
            crc = TABLE[((crc ^ byte as u32) & 0xff) as usize] ^ (crc >> 8);
        }
        !crc
    }

    #[test]
    fn the_table_computes_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_two_byte_change_updates_the_crc_incrementally() {
        // Pseudo-random packets of many lengths, a change at many positions.
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) as u8
        };
        for len in [2usize, 3, 12, 32, 100, 255, 256, 257, 1500, 9000, 65_535] {
            let packet: [u8; 65_535] = core::array::from_fn(|_| next());
            let packet = &packet[..len];
            for at in [0, 1, len / 2, len - 2] {
                if at + 2 > len {
                    continue;
                }
                let mut changed = [0u8; 65_535];
                changed[..len].copy_from_slice(packet);
                let new = [next(), next()];
                changed[at..at + 2].copy_from_slice(&new);
                let delta = [packet[at] ^ new[0], packet[at + 1] ^ new[1]];
                let trailing = (len - at - 2) as u32;
                assert_eq!(
                    crc32c(&changed[..len]),
                    crc32c(packet) ^ delta2(delta, trailing),
                    "length {len}, change at {at}"
                );
            }
        }
    }
}
