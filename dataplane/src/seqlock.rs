//! The seqlock copy, shared by every single-writer structure in shared memory.
//!
//! A racing plain read is undefined behaviour in Rust, so both sides go through atomics: the
//! writer stores words with `Relaxed` between an odd and an even sequence, the reader loads them
//! with `Relaxed` between two sequence loads and keeps the copy only if the sequence was even and
//! unchanged. On x86-64 these atomics compile to plain moves.

use std::sync::atomic::{fence, AtomicU64, Ordering};

/// Writes `src` into `dst` under `seq`. Only one writer may use a given `seq`.
pub fn write_words(seq: &AtomicU64, dst: &[AtomicU64], src: &[u64]) {
    let s = seq.load(Ordering::Relaxed);
    // Odd: readers that start now, or are copying, will retry.
    let odd = (s | 1).wrapping_add(if s & 1 == 1 { 2 } else { 0 });
    seq.store(odd, Ordering::Relaxed);
    // Pairs with the Acquire fence in `read_words`: a reader that sees any word stored below
    // also sees the odd sequence when it re-checks.
    fence(Ordering::Release);
    for (d, s) in dst.iter().zip(src) {
        d.store(*s, Ordering::Relaxed);
    }
    // Pairs with the Acquire load of `seq` in `read_words`: a reader that sees this even value
    // sees every word stored above.
    seq.store(odd.wrapping_add(1), Ordering::Release);
}

/// Copies `src` into `dst` if no write overlapped the copy; returns whether it did.
pub fn read_words(seq: &AtomicU64, src: &[AtomicU64], dst: &mut [u64]) -> bool {
    // Pairs with the Release store at the end of `write_words`.
    let s1 = seq.load(Ordering::Acquire);
    if s1 & 1 == 1 {
        return false;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.load(Ordering::Relaxed);
    }
    // Pairs with the Release fence in `write_words`: if any word came from a write that began
    // after `s1`, the load below sees that write's odd sequence.
    fence(Ordering::Acquire);
    seq.load(Ordering::Relaxed) == s1
}
