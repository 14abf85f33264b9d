//! The request table: one slot per live request, written in place by the engine under a seqlock
//! per slot, read by the llumlet to choose migration candidates.
//!
//! ```text
//!  RequestTableMem: slots[MAX_REQUESTS]
//!  +---------------------------------------------+
//!  | seq (own 64-byte line)                      |  odd while the engine writes the slot
//!  | header words: RequestRecord (96 bytes)      |  id, state, arrival, token and block counts
//!  | block words: [u32; MAX_BLOCKS_PER_REQUEST]  |  the block table, two entries per word
//!  +---------------------------------------------+
//! ```
//!
//! A decoding step that fills a block appends one entry and bumps the counts: a few stores, not
//! a rewrite of the whole table. A reader copies the header, then only `num_blocks` entries.

use crate::sync::{AtomicU64, Ordering};

use bytemuck::{Pod, Zeroable};

use crate::seqlock::{begin_read, begin_write, end_write, read_valid};
use crate::status_ring::{RequestId, RequestIdTooLong};

/// Live requests the table holds.
pub const MAX_REQUESTS: usize = 256;
/// Blocks one request may hold (128k tokens at 16 tokens per block: a 64k-token prompt and its
/// decoding fit with room to spare).
pub const MAX_BLOCKS_PER_REQUEST: usize = 8192;
const BLOCK_WORDS: usize = MAX_BLOCKS_PER_REQUEST / 2;

/// A request's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum RequestState {
    /// The slot is free.
    Free = 0,
    /// Queued, not computed yet.
    Waiting = 1,
    /// Prefilling.
    Prefill = 2,
    /// Decoding.
    Running = 3,
    /// Suspended for migration.
    Suspended = 4,
    /// Blocks reserved for a request migrating in; not running here yet.
    MigratingIn = 5,
}

impl RequestState {
    fn from_u32(v: u32) -> Option<RequestState> {
        Some(match v {
            0 => RequestState::Free,
            1 => RequestState::Waiting,
            2 => RequestState::Prefill,
            3 => RequestState::Running,
            4 => RequestState::Suspended,
            5 => RequestState::MigratingIn,
            _ => return None,
        })
    }
}

/// The fixed part of a slot.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct RequestRecord {
    /// The request id.
    pub id: RequestId,
    state: u32,
    _pad: u32,
    /// Arrival order (engine-assigned, increasing).
    pub arrival: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens so far.
    pub output_tokens: u32,
    /// Entries of the block table in use.
    pub num_blocks: u32,
    _pad2: u32,
}

const HEADER_WORDS: usize = std::mem::size_of::<RequestRecord>() / 8;
const _: () = assert!(std::mem::size_of::<RequestRecord>().is_multiple_of(8));

impl RequestRecord {
    /// The state; `None` for a value this build does not know (garbage from another process).
    pub fn state(&self) -> Option<RequestState> {
        RequestState::from_u32(self.state)
    }
}

/// One slot.
#[repr(C, align(64))]
pub struct RequestSlot {
    seq: AtomicU64,
    _pad: [u64; 7],
    header: [AtomicU64; HEADER_WORDS],
    blocks: [AtomicU64; BLOCK_WORDS],
}

/// The table's memory (atomics only: valid for any bytes).
#[repr(C, align(64))]
pub struct RequestTableMem {
    slots: [RequestSlot; MAX_REQUESTS],
}

/// Request table errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// All [`MAX_REQUESTS`] slots are in use.
    #[error("request table is full ({MAX_REQUESTS} live requests)")]
    Full,
    /// A slot index beyond the table.
    #[error("request slot {0} does not exist (the table has {MAX_REQUESTS})")]
    BadSlot(u32),
    /// More blocks than a slot holds.
    #[error("request needs {0} blocks; a slot holds at most {MAX_BLOCKS_PER_REQUEST}")]
    TooManyBlocks(usize),
    /// The id does not fit.
    #[error(transparent)]
    Id(#[from] RequestIdTooLong),
    /// The engine kept the slot busy through every retry.
    #[error("request slot {0} stayed busy")]
    Busy(u32),
}

/// What the engine tells about a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// Id.
    pub id: &'a str,
    /// State.
    pub state: RequestState,
    /// Arrival order.
    pub arrival: u64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens so far.
    pub output_tokens: u32,
}

fn store_blocks(slot: &RequestSlot, from: usize, blocks: &[u32]) {
    // Entries are packed two per word; a write starting at an odd index rewrites the word it
    // shares with the previous entry, which keeps its value.
    for (i, &b) in (from..).zip(blocks) {
        let w = &slot.blocks[i / 2];
        let old = w.load(Ordering::Relaxed);
        let new = if i.is_multiple_of(2) {
            (old & !0xffff_ffff) | u64::from(b)
        } else {
            (old & 0xffff_ffff) | (u64::from(b) << 32)
        };
        w.store(new, Ordering::Relaxed);
    }
}

/// The engine's side of the table: it allocates slots and keeps its own copy of each slot's
/// block count, so updates never read shared memory.
pub struct TableWriter {
    used: [bool; MAX_REQUESTS],
    num_blocks: [u32; MAX_REQUESTS],
}

impl Default for TableWriter {
    fn default() -> Self {
        TableWriter {
            used: [false; MAX_REQUESTS],
            num_blocks: [0; MAX_REQUESTS],
        }
    }
}

impl TableWriter {
    fn slot<'m>(&self, mem: &'m RequestTableMem, slot: u32) -> Result<&'m RequestSlot, TableError> {
        mem.slots
            .get(slot as usize)
            .ok_or(TableError::BadSlot(slot))
    }

    fn write_header(slot: &RequestSlot, rec: &RequestRecord) {
        let words: [u64; HEADER_WORDS] = bytemuck::cast(*rec);
        for (d, s) in slot.header.iter().zip(words) {
            d.store(s, Ordering::Relaxed);
        }
    }

    /// Puts a new request in a free slot; returns the slot.
    pub fn add(
        &mut self,
        mem: &RequestTableMem,
        info: &RequestInfo<'_>,
        blocks: &[u32],
    ) -> Result<u32, TableError> {
        if blocks.len() > MAX_BLOCKS_PER_REQUEST {
            return Err(TableError::TooManyBlocks(blocks.len()));
        }
        let id = RequestId::new(info.id)?;
        let idx = self.used.iter().position(|u| !u).ok_or(TableError::Full)?;
        let slot = &mem.slots[idx];
        let rec = RequestRecord {
            id,
            state: info.state as u32,
            _pad: 0,
            arrival: info.arrival,
            prompt_tokens: info.prompt_tokens,
            output_tokens: info.output_tokens,
            num_blocks: blocks.len() as u32,
            _pad2: 0,
        };
        let odd = begin_write(&slot.seq);
        store_blocks(slot, 0, blocks);
        Self::write_header(slot, &rec);
        end_write(&slot.seq, odd);
        self.used[idx] = true;
        self.num_blocks[idx] = blocks.len() as u32;
        Ok(idx as u32)
    }

    /// Updates a request's progress: state, output tokens, and blocks appended since the last
    /// update. A few stores.
    pub fn progress(
        &mut self,
        mem: &RequestTableMem,
        slot_idx: u32,
        state: RequestState,
        output_tokens: u32,
        new_blocks: &[u32],
    ) -> Result<(), TableError> {
        let slot = self.slot(mem, slot_idx)?;
        let have = self.num_blocks[slot_idx as usize] as usize;
        let total = have + new_blocks.len();
        if total > MAX_BLOCKS_PER_REQUEST {
            return Err(TableError::TooManyBlocks(total));
        }
        // The header's words: [id 8 words][state|pad][arrival][prompt|output][num_blocks|pad].
        let odd = begin_write(&slot.seq);
        store_blocks(slot, have, new_blocks);
        slot.header[8].store(u64::from(state as u32), Ordering::Relaxed);
        let prompt = slot.header[10].load(Ordering::Relaxed) & 0xffff_ffff;
        slot.header[10].store(prompt | (u64::from(output_tokens) << 32), Ordering::Relaxed);
        slot.header[11].store(total as u64, Ordering::Relaxed);
        end_write(&slot.seq, odd);
        self.num_blocks[slot_idx as usize] = total as u32;
        Ok(())
    }

    /// Replaces a request's whole block table (after preemption, or when migrated in).
    pub fn set_blocks(
        &mut self,
        mem: &RequestTableMem,
        slot_idx: u32,
        blocks: &[u32],
    ) -> Result<(), TableError> {
        let slot = self.slot(mem, slot_idx)?;
        if blocks.len() > MAX_BLOCKS_PER_REQUEST {
            return Err(TableError::TooManyBlocks(blocks.len()));
        }
        let odd = begin_write(&slot.seq);
        store_blocks(slot, 0, blocks);
        slot.header[11].store(blocks.len() as u64, Ordering::Relaxed);
        end_write(&slot.seq, odd);
        self.num_blocks[slot_idx as usize] = blocks.len() as u32;
        Ok(())
    }

    /// Frees a slot.
    pub fn remove(&mut self, mem: &RequestTableMem, slot_idx: u32) -> Result<(), TableError> {
        let slot = self.slot(mem, slot_idx)?;
        let odd = begin_write(&slot.seq);
        Self::write_header(slot, &RequestRecord::zeroed());
        end_write(&slot.seq, odd);
        self.used[slot_idx as usize] = false;
        self.num_blocks[slot_idx as usize] = 0;
        Ok(())
    }
}

/// Attempts before a read gives up with [`TableError::Busy`].
const READ_ATTEMPTS: usize = 1000;

/// Reads slot `idx`: `Ok(None)` if free; otherwise its record, with its block table in `blocks`
/// (cleared first; no allocation once `blocks` has grown to the longest table).
pub fn read_request(
    mem: &RequestTableMem,
    idx: u32,
    blocks: &mut Vec<u32>,
) -> Result<Option<RequestRecord>, TableError> {
    let slot = mem
        .slots
        .get(idx as usize)
        .ok_or(TableError::BadSlot(idx))?;
    for _ in 0..READ_ATTEMPTS {
        let Some(s1) = begin_read(&slot.seq) else {
            std::hint::spin_loop();
            continue;
        };
        let mut words = [0u64; HEADER_WORDS];
        for (d, s) in words.iter_mut().zip(&slot.header) {
            *d = s.load(Ordering::Relaxed);
        }
        let rec: RequestRecord = bytemuck::cast(words);
        let n = (rec.num_blocks as usize).min(MAX_BLOCKS_PER_REQUEST);
        blocks.clear();
        for i in 0..n {
            let w = slot.blocks[i / 2].load(Ordering::Relaxed);
            blocks.push(if i % 2 == 0 {
                w as u32
            } else {
                (w >> 32) as u32
            });
        }
        if read_valid(&slot.seq, s1) {
            return Ok((rec.state != RequestState::Free as u32).then_some(rec));
        }
    }
    Err(TableError::Busy(idx))
}

impl RequestTableMem {
    /// An empty table on the heap (4.2 MiB, allocated zeroed in one call).
    pub fn new_boxed() -> Box<RequestTableMem> {
        // SAFETY: `RequestTableMem` consists of `AtomicU64`s and `u64` padding only, for which
        // all-zero bytes are a valid value (an atomic holding 0).
        #[cfg(not(loom))]
        unsafe {
            Box::<RequestTableMem>::new_zeroed().assume_init()
        }
        #[cfg(loom)]
        unreachable!("loom models do not use the request table")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> RequestInfo<'_> {
        RequestInfo {
            id,
            state: RequestState::Running,
            arrival: 1,
            prompt_tokens: 10,
            output_tokens: 0,
        }
    }

    #[test]
    fn add_progress_read_remove() {
        let mem = RequestTableMem::new_boxed();
        let mut w = TableWriter::default();
        let mut blocks = Vec::new();
        let s = w.add(&mem, &info("req-1"), &[7, 8, 9]).unwrap();
        let r = read_request(&mem, s, &mut blocks).unwrap().unwrap();
        assert_eq!(
            (r.id.as_str(), r.state(), r.prompt_tokens, r.num_blocks),
            (Some("req-1"), Some(RequestState::Running), 10, 3)
        );
        assert_eq!(blocks, [7, 8, 9]);
        w.progress(&mem, s, RequestState::Running, 5, &[10, 11])
            .unwrap();
        let r = read_request(&mem, s, &mut blocks).unwrap().unwrap();
        assert_eq!((r.output_tokens, r.prompt_tokens, r.num_blocks), (5, 10, 5));
        assert_eq!(blocks, [7, 8, 9, 10, 11]);
        w.set_blocks(&mem, s, &[1]).unwrap();
        read_request(&mem, s, &mut blocks).unwrap().unwrap();
        assert_eq!(blocks, [1]);
        w.remove(&mem, s).unwrap();
        assert!(read_request(&mem, s, &mut blocks).unwrap().is_none());
    }

    #[test]
    fn limits_are_typed_errors() {
        let mem = RequestTableMem::new_boxed();
        let mut w = TableWriter::default();
        for i in 0..MAX_REQUESTS {
            w.add(&mem, &info(&format!("r{i}")), &[]).unwrap();
        }
        assert_eq!(w.add(&mem, &info("one-more"), &[]), Err(TableError::Full));
        w.remove(&mem, 3).unwrap();
        assert_eq!(w.add(&mem, &info("again"), &[]), Ok(3));
        let long = "x".repeat(64);
        assert!(matches!(
            w.add(&mem, &info(&long), &[]),
            Err(TableError::Id(_))
        ));
        assert_eq!(
            w.progress(&mem, 999, RequestState::Running, 0, &[]),
            Err(TableError::BadSlot(999))
        );
        let too_many = vec![0u32; MAX_BLOCKS_PER_REQUEST];
        assert_eq!(
            w.progress(
                &mem,
                0,
                RequestState::Running,
                0,
                &too_many[..MAX_BLOCKS_PER_REQUEST]
            ),
            Ok(())
        );
        assert_eq!(
            w.progress(&mem, 0, RequestState::Running, 0, &[1]),
            Err(TableError::TooManyBlocks(MAX_BLOCKS_PER_REQUEST + 1))
        );
        assert!(read_request(&mem, MAX_REQUESTS as u32, &mut Vec::new()).is_err());
    }

    /// The engine appends blocks whose values are a function of (slot, index) and keeps
    /// output_tokens == num_blocks; readers on other threads check every snapshot.
    #[test]
    fn stress_readers_see_consistent_slots() {
        let mem = RequestTableMem::new_boxed();
        let rounds: u32 = if cfg!(miri) {
            2
        } else if cfg!(debug_assertions) {
            30
        } else {
            300
        };
        let per_round = if cfg!(miri) {
            8
        } else {
            MAX_BLOCKS_PER_REQUEST as u32 / 4
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut w = TableWriter::default();
                for round in 0..rounds {
                    let slot = w.add(&mem, &info(&format!("r{round}")), &[]).unwrap();
                    for i in 0..per_round {
                        let b = slot * 1_000_000 + round * 10_000 + i;
                        w.progress(&mem, slot, RequestState::Running, i + 1, &[b])
                            .unwrap();
                        // A real engine writes once per step; leave readers some room.
                        if cfg!(miri) {
                            std::thread::yield_now();
                        } else {
                            for _ in 0..200 {
                                std::hint::spin_loop();
                            }
                        }
                    }
                    w.remove(&mem, slot).unwrap();
                }
                done.store(true, Ordering::Release);
            });
            s.spawn(|| {
                let mut blocks = Vec::new();
                let mut seen = 0u64;
                while !done.load(Ordering::Acquire) {
                    // Busy: the writer kept the slot through every retry; try again.
                    if cfg!(miri) {
                        std::thread::yield_now();
                    }
                    if let Ok(Some(r)) = read_request(&mem, 0, &mut blocks) {
                        assert_eq!(r.output_tokens, r.num_blocks, "counts written together");
                        assert_eq!(blocks.len(), r.num_blocks as usize);
                        let round: u32 = r.id.as_str().unwrap()[1..].parse().unwrap();
                        for (i, b) in blocks.iter().enumerate() {
                            assert_eq!(*b, round * 10_000 + i as u32, "torn block table");
                        }
                        seen += 1;
                    }
                }
                assert!(seen > 0);
            });
        });
    }
}
