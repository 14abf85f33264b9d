//! The status ring: one writer (the engine), any number of readers (the llumlet, tools), fixed
//! size plain-old-data records, a seqlock per slot.
//!
//! ```text
//!  StatusRingMem
//!  +-----------------------------+  64-byte line: head = number of records published so far
//!  | head: AtomicU64             |
//!  +-----------------------------+
//!  | slot 0: seq (own line)      |  seq odd while the writer is inside the slot
//!  |         words[STATUS_WORDS] |  the record, as little-endian u64 words
//!  | slot 1 ...                  |  record n goes to slot n % STATUS_SLOTS
//!  +-----------------------------+
//! ```
//!
//! Publishing writes the next slot (never the one a reader of the newest record is most likely
//! copying), then advances `head`. Reading the newest record copies the slot `head - 1` through
//! atomic loads and re-checks its sequence: a torn copy is never returned.

use crate::sync::{fence, AtomicU64, Ordering};

use bytemuck::{Pod, Zeroable};

use crate::seqlock::{begin_write, end_write, read_words};

/// Request ids carried per list in a record; more are cut off (see [`StatusRecord`]).
pub const MAX_REQUEST_IDS: usize = 8;
/// Bytes of one request id, including its length byte.
pub const REQUEST_ID_BYTES: usize = 64;
/// Slots in the ring.
pub const STATUS_SLOTS: usize = 4;

/// A request id of at most `REQUEST_ID_BYTES - 1` bytes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct RequestId {
    len: u8,
    bytes: [u8; REQUEST_ID_BYTES - 1],
}

/// A request id that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request id of {0} bytes is longer than {max} bytes", max = REQUEST_ID_BYTES - 1)]
pub struct RequestIdTooLong(pub usize);

impl RequestId {
    /// Encodes `id`.
    pub fn new(id: &str) -> Result<RequestId, RequestIdTooLong> {
        let b = id.as_bytes();
        if b.len() > REQUEST_ID_BYTES - 1 {
            return Err(RequestIdTooLong(b.len()));
        }
        let mut r = RequestId::zeroed();
        r.len = b.len() as u8;
        r.bytes[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    /// The id, if its bytes are valid (a record from another process may hold anything).
    pub fn as_str(&self) -> Option<&str> {
        self.bytes
            .get(..usize::from(self.len))
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// The numeric fields of an engine status, as the engine produces them (the C ABI's
/// `llumlet_status` is this struct).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Pod, Zeroable)]
pub struct StatusCounters {
    /// The engine step this status was taken at.
    pub step_id: i32,
    /// Increases with every new status (the scheduler replaces its copy only when it grows).
    pub update_id: i32,
    /// Requests waiting to decode in the hybrid scheduler.
    pub hybrid_scheduler_waiting_to_decode_requests_num: i32,
    /// Requests waiting to decode in the scheduler.
    pub scheduler_waiting_to_decode_requests_num: i32,
    /// Requests waiting (not yet running).
    pub num_waiting_requests: i32,
    /// Running requests in their decode phase.
    pub scheduler_running_to_decode_requests_num: i32,
    /// Requests running.
    pub num_running_requests: i32,
    /// Requests whose KV cache is being loaded.
    pub num_loading_requests: i32,
    /// KV cache capacity, in tokens.
    pub num_total_gpu_tokens: i32,
    /// KV cache in use, in tokens.
    pub num_used_gpu_tokens: i32,
    /// Prompt tokens not yet computed of prefills waiting in the hybrid scheduler.
    pub num_uncomputed_tokens_hybrid_scheduler_waiting_prefills: i32,
    /// Tokens without KV blocks yet of decodes waiting in the hybrid scheduler.
    pub num_unallocated_tokens_hybrid_scheduler_waiting_decodes: i32,
    /// Tokens of requests waiting to decode in the hybrid scheduler.
    pub hybrid_scheduler_waiting_to_decode_tokens_num: i32,
    /// Prompt tokens not yet computed of waiting prefills.
    pub num_uncomputed_tokens_scheduler_waiting_prefills: i32,
    /// Tokens of requests waiting to decode.
    pub scheduler_waiting_to_decode_tokens_num: i32,
    /// Prompt tokens not yet computed of running prefills.
    pub num_uncomputed_tokens_scheduler_running_prefills: i32,
    /// Tokens without KV blocks yet of running prefills.
    pub num_unallocated_tokens_scheduler_running_prefills: i32,
    /// Tokens of running requests in their decode phase.
    pub scheduler_running_to_decode_tokens_num: i32,
    /// Tokens of requests whose KV cache is being loaded.
    pub num_tokens_loading_requests: i32,
    /// Prompt tokens not yet computed of every waiting prefill.
    pub num_uncomputed_tokens_all_waiting_prefills: i32,
    /// Requests migrating in (the engine's count; the llumlet adds its own).
    pub num_migrate_in_reqs: i32,
    /// Requests migrating out (the engine's count; the llumlet adds its own).
    pub num_migrate_out_reqs: i32,
    /// Tokens migrating in.
    pub num_migrate_in_tokens: i32,
    /// Tokens migrating out.
    pub num_migrate_out_tokens: i32,
    /// The profiling run this status belongs to (0: none).
    pub profiling_id: i32,
    /// Prefill tokens scheduled in this step.
    pub num_scheduled_prefill_tokens: i32,
    /// Share of the KV cache migrating in.
    pub kv_cache_usage_ratio_migrate_in: f64,
    /// Share of the KV cache migrating out.
    pub kv_cache_usage_ratio_migrate_out: f64,
    /// Duration of the step, in seconds.
    pub step_duration: f64,
}

/// One engine status: every numeric field of `cms.InstanceStatus`, plus the step id, the update
/// id and up to [`MAX_REQUEST_IDS`] ids of each request-id list.
///
/// Beyond [`MAX_REQUEST_IDS`] ids, the first ones are carried and `n_*_total` says how many there
/// were; the request counts (`num_waiting_requests`, ...) are always exact.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct StatusRecord {
    /// Set by the ring: 1 for the first record published, then 2, 3, ...
    pub publish_seq: u64,
    /// The engine's `CLOCK_MONOTONIC` time of the status, in ns.
    pub monotonic_ns: u64,
    /// Every numeric field of the engine's status.
    pub counters: StatusCounters,
    /// Ids carried in `waiting_ids` (at most [`MAX_REQUEST_IDS`]).
    pub n_waiting_ids: u32,
    /// Ids the engine had in its waiting list.
    pub n_waiting_ids_total: u32,
    /// Ids carried in `recent_waiting_ids`.
    pub n_recent_waiting_ids: u32,
    /// Ids the engine had in its recent-waiting list.
    pub n_recent_waiting_ids_total: u32,
    /// The first waiting requests' ids (`waiting_requests`).
    pub waiting_ids: [RequestId; MAX_REQUEST_IDS],
    /// The recently arrived waiting requests' ids (`recent_waiting_requests`).
    pub recent_waiting_ids: [RequestId; MAX_REQUEST_IDS],
}

/// Size of a record in 8-byte words.
pub const STATUS_WORDS: usize = std::mem::size_of::<StatusRecord>() / 8;
const _: () = assert!(std::mem::size_of::<StatusRecord>().is_multiple_of(8));
const _: () = assert!(std::mem::align_of::<StatusRecord>() == 8);

impl StatusRecord {
    /// Sets the waiting ids; ids beyond [`MAX_REQUEST_IDS`] are counted, not carried.
    pub fn set_waiting_ids<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), RequestIdTooLong> {
        let (n, total) = fill_ids(&mut self.waiting_ids, ids)?;
        self.n_waiting_ids = n;
        self.n_waiting_ids_total = total;
        Ok(())
    }

    /// Sets the recent waiting ids, as [`StatusRecord::set_waiting_ids`].
    pub fn set_recent_waiting_ids<'a>(
        &mut self,
        ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), RequestIdTooLong> {
        let (n, total) = fill_ids(&mut self.recent_waiting_ids, ids)?;
        self.n_recent_waiting_ids = n;
        self.n_recent_waiting_ids_total = total;
        Ok(())
    }

    /// The carried waiting ids (invalid UTF-8 ids are skipped).
    pub fn waiting_ids(&self) -> impl Iterator<Item = &str> {
        carried(&self.waiting_ids, self.n_waiting_ids)
    }

    /// The carried recent waiting ids.
    pub fn recent_waiting_ids(&self) -> impl Iterator<Item = &str> {
        carried(&self.recent_waiting_ids, self.n_recent_waiting_ids)
    }
}

fn fill_ids<'a>(
    slots: &mut [RequestId; MAX_REQUEST_IDS],
    ids: impl IntoIterator<Item = &'a str>,
) -> Result<(u32, u32), RequestIdTooLong> {
    let mut total = 0u32;
    for id in ids {
        if let Some(slot) = slots.get_mut(total as usize) {
            *slot = RequestId::new(id)?;
        }
        total = total.saturating_add(1);
    }
    Ok((total.min(MAX_REQUEST_IDS as u32), total))
}

fn carried(ids: &[RequestId; MAX_REQUEST_IDS], n: u32) -> impl Iterator<Item = &str> {
    ids.iter()
        .take((n as usize).min(MAX_REQUEST_IDS))
        .filter_map(RequestId::as_str)
}

/// One ring slot: its sequence on its own cache line, then the record words.
#[repr(C)]
pub struct RingSlot {
    seq: AtomicU64,
    _pad: [u64; 7],
    words: [AtomicU64; STATUS_WORDS],
}

/// The ring's memory. Every byte pattern is a valid value (it is all atomics), so it can be
/// viewed over shared memory written by another process.
#[repr(C, align(64))]
pub struct StatusRingMem {
    head: AtomicU64,
    _pad: [u64; 7],
    slots: [RingSlot; STATUS_SLOTS],
}

impl StatusRingMem {
    /// A zeroed ring on the heap (for tests and in-process use).
    pub fn new_boxed() -> Box<StatusRingMem> {
        Box::new(StatusRingMem {
            head: AtomicU64::new(0),
            _pad: [0; 7],
            slots: std::array::from_fn(|_| RingSlot {
                seq: AtomicU64::new(0),
                _pad: [0; 7],
                words: std::array::from_fn(|_| AtomicU64::new(0)),
            }),
        })
    }

    /// Records published so far.
    pub fn published(&self) -> u64 {
        // Pairs with the Release store in `publish`.
        self.head.load(Ordering::Acquire)
    }
}

/// The writing end's state. There must be exactly one writer per ring: the engine.
#[derive(Debug)]
pub struct StatusWriter {
    next: u64,
}

impl StatusWriter {
    /// The writer of `mem`, continuing after what is already published.
    ///
    /// Two writers of one ring break the single-writer rule: readers still never see a torn
    /// record, but records may be lost.
    pub fn new(mem: &StatusRingMem) -> Self {
        StatusWriter {
            next: mem.head.load(Ordering::Relaxed) + 1,
        }
    }

    /// Publishes `record` into `mem` (its `publish_seq` is set here). Allocates nothing, takes no
    /// lock.
    pub fn publish(&mut self, mem: &StatusRingMem, record: &StatusRecord) {
        let seq = self.next;
        self.next += 1;
        let slot = &mem.slots[(seq % STATUS_SLOTS as u64) as usize];
        // Stored straight from the record (no intermediate copy), its first word replaced by
        // the sequence.
        let words: &[u64; STATUS_WORDS] = bytemuck::cast_ref(record);
        let odd = begin_write(&slot.seq);
        slot.words[0].store(seq, Ordering::Relaxed);
        for (d, w) in slot.words[1..].iter().zip(&words[1..]) {
            d.store(*w, Ordering::Relaxed);
        }
        end_write(&slot.seq, odd);
        // Pairs with the Acquire load in `read_newest`/`published`: a reader that sees this head
        // sees the slot's final sequence.
        mem.head.store(seq, Ordering::Release);
    }
}

/// Why the newest record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The writer kept the slot busy through every retry (it may have died mid-write).
    #[error("the status ring slot stayed busy; the writer may have stopped mid-write")]
    Busy,
}

/// Attempts before a read gives up with [`ReadError::Busy`].
const READ_ATTEMPTS: usize = 1000;

/// Reads the newest record; `Ok(None)` when nothing was published yet. Never returns a torn
/// record: the copy is made through atomic loads and checked against the slot's sequence.
pub fn read_newest(mem: &StatusRingMem) -> Result<Option<StatusRecord>, ReadError> {
    for _ in 0..READ_ATTEMPTS {
        // Pairs with the Release store of `head` in `publish`.
        let head = mem.head.load(Ordering::Acquire);
        if head == 0 {
            return Ok(None);
        }
        let slot = &mem.slots[(head % STATUS_SLOTS as u64) as usize];
        let mut words = [0u64; STATUS_WORDS];
        if read_words(&slot.seq, &slot.words, &mut words) {
            // A writer that lapped us fills the slot with a newer, equally whole record.
            return Ok(Some(bytemuck::cast(words)));
        }
        std::hint::spin_loop();
    }
    fence(Ordering::Acquire);
    Err(ReadError::Busy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seed: i32) -> StatusRecord {
        let mut r = StatusRecord::zeroed();
        r.counters.update_id = seed;
        r.counters.num_running_requests = seed * 2;
        r.counters.step_duration = f64::from(seed) / 2.0;
        r
    }

    #[test]
    fn publish_then_read_newest() {
        let mem = StatusRingMem::new_boxed();
        assert!(read_newest(&mem).unwrap().is_none());
        let mut w = StatusWriter::new(&mem);
        for i in 1..=10 {
            w.publish(&mem, &record(i));
            let r = read_newest(&mem).unwrap().unwrap();
            assert_eq!(
                (
                    r.publish_seq,
                    r.counters.update_id,
                    r.counters.num_running_requests
                ),
                (i as u64, i, 2 * i)
            );
            assert_eq!(r.counters.step_duration, f64::from(i) / 2.0);
        }
        assert_eq!(mem.published(), 10);
        // A new writer (engine restarted in place) continues the sequence.
        let mut w2 = StatusWriter::new(&mem);
        w2.publish(&mem, &record(99));
        assert_eq!(read_newest(&mem).unwrap().unwrap().publish_seq, 11);
    }

    #[test]
    fn request_ids_are_bounded() {
        let mut r = StatusRecord::zeroed();
        let ids: Vec<String> = (0..20).map(|i| format!("chatcmpl-{i}")).collect();
        r.set_waiting_ids(ids.iter().map(String::as_str)).unwrap();
        assert_eq!((r.n_waiting_ids, r.n_waiting_ids_total), (8, 20));
        assert_eq!(
            r.waiting_ids().collect::<Vec<_>>(),
            ids[..8].iter().map(String::as_str).collect::<Vec<_>>()
        );
        let long = "x".repeat(64);
        assert_eq!(
            r.set_recent_waiting_ids([long.as_str()]),
            Err(RequestIdTooLong(64))
        );
        // Garbage from another process: lengths beyond the buffer read as nothing.
        let mut g = StatusRecord::zeroed();
        g.n_waiting_ids = u32::MAX;
        g.waiting_ids[0].len = 255;
        assert_eq!(g.waiting_ids().count(), MAX_REQUEST_IDS - 1);
    }

    #[test]
    fn stuck_writer_is_busy_not_torn() {
        let mem = StatusRingMem::new_boxed();
        StatusWriter::new(&mem).publish(&mem, &record(1));
        // Simulate a writer that died inside slot 1.
        mem.slots[1].seq.store(7, Ordering::Relaxed);
        assert!(matches!(read_newest(&mem), Err(ReadError::Busy)));
    }

    /// Writers fill every word of a record with a function of its sequence; readers on other
    /// threads check that every record they get is whole.
    #[test]
    fn stress_readers_never_see_a_torn_record() {
        let mem = StatusRingMem::new_boxed();
        let n: u64 = if cfg!(miri) {
            200
        } else if cfg!(debug_assertions) {
            200_000
        } else {
            2_000_000
        };
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut w = StatusWriter::new(&mem);
                for i in 1..=n {
                    let mut words = [0u64; STATUS_WORDS];
                    for (k, x) in words.iter_mut().enumerate() {
                        *x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k as u64;
                    }
                    w.publish(&mem, &bytemuck::cast(words));
                }
                done.store(true, Ordering::Release);
            });
            for _ in 0..2 {
                s.spawn(|| {
                    let mut reads = 0u64;
                    let mut last = 0;
                    while !done.load(Ordering::Acquire) {
                        if cfg!(miri) {
                            std::thread::yield_now();
                        }
                        let Ok(Some(r)) = read_newest(&mem) else {
                            continue;
                        };
                        let words: [u64; STATUS_WORDS] = bytemuck::cast(r);
                        let i = words[0];
                        assert!(i >= last, "records go forward");
                        last = i;
                        for (k, x) in words.iter().enumerate().skip(1) {
                            assert_eq!(
                                *x,
                                i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k as u64,
                                "torn record {i}"
                            );
                        }
                        reads += 1;
                    }
                    assert!(reads > 0);
                });
            }
        });
    }
}
