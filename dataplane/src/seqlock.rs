//! The seqlock copy, shared by every single-writer structure in shared memory.
//!
//! A racing plain read is undefined behaviour in Rust, so both sides go through atomics: the
//! writer stores words with `Relaxed` between an odd and an even sequence, the reader loads them
//! with `Relaxed` between two sequence loads and keeps the copy only if the sequence was even and
//! unchanged. On x86-64 these atomics compile to plain moves.

use crate::sync::{fence, AtomicU64, Ordering};

/// Opens a write under `seq`: readers that start now, or are copying, will retry. Returns the
/// value [`end_write`] needs. Only one writer may use a given `seq`.
pub fn begin_write(seq: &AtomicU64) -> u64 {
    let s = seq.load(Ordering::Relaxed);
    let odd = (s | 1).wrapping_add(if s & 1 == 1 { 2 } else { 0 });
    seq.store(odd, Ordering::Relaxed);
    // Pairs with the Acquire fence in `read_words`: a reader that sees any word stored after
    // this also sees the odd sequence when it re-checks.
    fence(Ordering::Release);
    odd
}

/// Closes the write opened by [`begin_write`].
pub fn end_write(seq: &AtomicU64, odd: u64) {
    // Pairs with the Acquire load of `seq` in `read_words`: a reader that sees this even value
    // sees every word stored since `begin_write`.
    seq.store(odd.wrapping_add(1), Ordering::Release);
}

/// Writes `src` into `dst` under `seq`. Only one writer may use a given `seq`. (The ring and the
/// table write their words between [`begin_write`] and [`end_write`] themselves; this whole-copy
/// form is the loom model's writer.)
#[cfg(all(test, loom))]
pub fn write_words(seq: &AtomicU64, dst: &[AtomicU64], src: &[u64]) {
    let odd = begin_write(seq);
    for (d, s) in dst.iter().zip(src) {
        d.store(*s, Ordering::Relaxed);
    }
    end_write(seq, odd);
}

/// Starts a read under `seq`: `None` while a write is in progress, else the value to give
/// [`read_valid`] after copying with `Relaxed` loads.
pub fn begin_read(seq: &AtomicU64) -> Option<u64> {
    // Pairs with the Release store in `end_write`.
    let s = seq.load(Ordering::Acquire);
    (s & 1 == 0).then_some(s)
}

/// Whether the words copied since [`begin_read`] returned `s1` are whole.
pub fn read_valid(seq: &AtomicU64, s1: u64) -> bool {
    // Pairs with the Release fence in `begin_write`: if any word came from a write that began
    // after `s1`, the load below sees that write's odd sequence.
    fence(Ordering::Acquire);
    seq.load(Ordering::Relaxed) == s1
}

/// Copies `src` into `dst` if no write overlapped the copy; returns whether it did.
pub fn read_words(seq: &AtomicU64, src: &[AtomicU64], dst: &mut [u64]) -> bool {
    let Some(s1) = begin_read(seq) else {
        return false;
    };
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.load(Ordering::Relaxed);
    }
    read_valid(seq, s1)
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;

    /// Every interleaving (under the C11 model loom explores) of a writer that writes two
    /// records and a reader: whatever the reader keeps is a whole record.
    #[test]
    fn loom_reader_never_keeps_a_torn_record() {
        loom::model(|| {
            let seq = Arc::new(AtomicU64::new(0));
            let data = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
            let (s2, d2) = (seq.clone(), data.clone());
            let writer = loom::thread::spawn(move || {
                write_words(&s2, &d2[..], &[1, 1]);
                write_words(&s2, &d2[..], &[2, 2]);
            });
            let mut out = [0u64; 2];
            if read_words(&seq, &data[..], &mut out) {
                assert_eq!(out[0], out[1], "torn record {out:?}");
            }
            writer.join().unwrap();
            assert!(read_words(&seq, &data[..], &mut out));
            assert_eq!(out, [2, 2]);
        });
    }
}
