//! Command queues: two single-producer single-consumer rings of fixed-size messages in the
//! control segment, llumlet → engine and engine → llumlet.
//!
//! ```text
//!  QueueMem
//!  +------------------------+  consumer's line: head = messages taken so far
//!  | head: AtomicU64        |
//!  +------------------------+  producer's line: tail = messages put so far
//!  | tail: AtomicU64        |
//!  +------------------------+
//!  | slots[QUEUE_CAPACITY]  |  message n lives in slot n % QUEUE_CAPACITY, 8 words each
//!  +------------------------+
//! ```
//!
//! A full queue is an error the sender sees ([`QueueError::Full`]); nothing is dropped. The
//! indices come from another process, so a consumer that finds them inconsistent gets
//! [`QueueError::Corrupt`] instead of reading out of bounds. An empty poll is two loads.

use crate::sync::{AtomicU64, Ordering};

/// Messages a queue holds.
#[cfg(not(loom))]
pub const QUEUE_CAPACITY: usize = 64;
/// Messages a queue holds (small under loom, so models stay small and wrap around).
#[cfg(loom)]
pub const QUEUE_CAPACITY: usize = 2;
/// Words of one message.
pub const MESSAGE_WORDS: usize = 8;

/// One queue's memory (all atomics: valid for any bytes).
#[repr(C, align(64))]
pub struct QueueMem {
    head: AtomicU64,
    _pad0: [u64; 7],
    tail: AtomicU64,
    _pad1: [u64; 7],
    slots: [[AtomicU64; MESSAGE_WORDS]; QUEUE_CAPACITY],
}

impl QueueMem {
    /// An empty queue on the heap.
    pub fn new_boxed() -> Box<QueueMem> {
        Box::new(QueueMem {
            head: AtomicU64::new(0),
            _pad0: [0; 7],
            tail: AtomicU64::new(0),
            _pad1: [0; 7],
            slots: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
        })
    }
}

/// Queue errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The queue holds [`QUEUE_CAPACITY`] messages the consumer has not taken; retry later.
    #[error("command queue is full ({QUEUE_CAPACITY} messages waiting)")]
    Full,
    /// The indices are inconsistent (memory overwritten by someone else).
    #[error("command queue indices are inconsistent (head {head}, tail {tail})")]
    Corrupt {
        /// Consumer index.
        head: u64,
        /// Producer index.
        tail: u64,
    },
}

/// Puts `msg` at the tail. Only one producer per queue.
pub fn push(q: &QueueMem, msg: &[u64; MESSAGE_WORDS]) -> Result<(), QueueError> {
    let tail = q.tail.load(Ordering::Relaxed);
    // Pairs with the Release store of `head` in `pop`: the slot we overwrite was fully read.
    let head = q.head.load(Ordering::Acquire);
    let used = tail.wrapping_sub(head);
    if used > QUEUE_CAPACITY as u64 {
        return Err(QueueError::Corrupt { head, tail });
    }
    if used == QUEUE_CAPACITY as u64 {
        return Err(QueueError::Full);
    }
    let slot = &q.slots[(tail % QUEUE_CAPACITY as u64) as usize];
    for (d, s) in slot.iter().zip(msg) {
        d.store(*s, Ordering::Relaxed);
    }
    // Pairs with the Acquire load of `tail` in `pop`: the consumer sees the words above.
    q.tail.store(tail.wrapping_add(1), Ordering::Release);
    Ok(())
}

/// Takes the message at the head, if any. Only one consumer per queue.
pub fn pop(q: &QueueMem) -> Result<Option<[u64; MESSAGE_WORDS]>, QueueError> {
    let head = q.head.load(Ordering::Relaxed);
    // Pairs with the Release store of `tail` in `push`.
    let tail = q.tail.load(Ordering::Acquire);
    if head == tail {
        return Ok(None);
    }
    if tail.wrapping_sub(head) > QUEUE_CAPACITY as u64 {
        return Err(QueueError::Corrupt { head, tail });
    }
    let slot = &q.slots[(head % QUEUE_CAPACITY as u64) as usize];
    let mut out = [0u64; MESSAGE_WORDS];
    for (d, s) in out.iter_mut().zip(slot) {
        *d = s.load(Ordering::Relaxed);
    }
    // Pairs with the Acquire load of `head` in `push`: the producer reuses the slot only after
    // our loads above.
    q.head.store(head.wrapping_add(1), Ordering::Release);
    Ok(Some(out))
}

/// A command or reply on the queues. Migration commands carry a migration id and the request's
/// slot in the request table; their meaning is defined by the live-migration protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// llumlet → engine: publish a status now (PULL mode, or the engine has been quiet).
    StatusRequest {
        /// Echoed in the reply.
        seq: u64,
    },
    /// engine → llumlet: the status for `seq` is in the ring as record `publish_seq`.
    StatusPublished {
        /// The request answered.
        seq: u64,
        /// The record published.
        publish_seq: u64,
    },
    /// llumlet → engine: abort these requests (by request-table slot).
    Abort {
        /// Correlation id.
        id: u64,
        /// Request-table slot.
        slot: u32,
    },
    /// Source: start migrating a request out.
    MigrateOutBegin {
        /// Migration id.
        migration: u64,
        /// Request-table slot.
        slot: u32,
    },
    /// Source: suspend the request for the last stage.
    MigrateOutSuspend {
        /// Migration id.
        migration: u64,
        /// Request-table slot.
        slot: u32,
    },
    /// Source: the destination committed; free the request.
    MigrateOutCommit {
        /// Migration id.
        migration: u64,
        /// Request-table slot.
        slot: u32,
    },
    /// Source: the migration failed; resume the request.
    MigrateOutAbort {
        /// Migration id.
        migration: u64,
        /// Request-table slot.
        slot: u32,
    },
    /// Destination: reserve blocks for a request arriving.
    ReserveBlocks {
        /// Migration id.
        migration: u64,
        /// Blocks needed.
        blocks: u32,
    },
    /// Destination: the request's state arrived; resume it.
    MigrateInCommit {
        /// Migration id.
        migration: u64,
    },
    /// Destination: drop the reservation.
    MigrateInAbort {
        /// Migration id.
        migration: u64,
    },
    /// engine → llumlet: the command `id` was done (`ok`) or refused, with a detail value.
    Reply {
        /// The command's correlation or migration id.
        id: u64,
        /// Whether it succeeded.
        ok: bool,
        /// Command-specific detail (e.g. the first reserved block).
        value: u64,
    },
}

/// A message that is not a valid command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Unknown kind.
    #[error("unknown command kind {0}")]
    UnknownKind(u64),
    /// A field out of its range.
    #[error("command kind {kind}: field {field} out of range ({value})")]
    OutOfRange {
        /// The kind.
        kind: u64,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

const K_STATUS_REQUEST: u64 = 1;
const K_STATUS_PUBLISHED: u64 = 2;
const K_ABORT: u64 = 3;
const K_MIGRATE_OUT_BEGIN: u64 = 10;
const K_MIGRATE_OUT_SUSPEND: u64 = 11;
const K_MIGRATE_OUT_COMMIT: u64 = 12;
const K_MIGRATE_OUT_ABORT: u64 = 13;
const K_RESERVE_BLOCKS: u64 = 20;
const K_MIGRATE_IN_COMMIT: u64 = 21;
const K_MIGRATE_IN_ABORT: u64 = 22;
const K_REPLY: u64 = 30;

impl Command {
    /// The message words: kind, then the fields in order.
    pub fn encode(&self) -> [u64; MESSAGE_WORDS] {
        let mut w = [0u64; MESSAGE_WORDS];
        let (kind, a, b, c) = match *self {
            Command::StatusRequest { seq } => (K_STATUS_REQUEST, seq, 0, 0),
            Command::StatusPublished { seq, publish_seq } => {
                (K_STATUS_PUBLISHED, seq, publish_seq, 0)
            }
            Command::Abort { id, slot } => (K_ABORT, id, u64::from(slot), 0),
            Command::MigrateOutBegin { migration, slot } => {
                (K_MIGRATE_OUT_BEGIN, migration, u64::from(slot), 0)
            }
            Command::MigrateOutSuspend { migration, slot } => {
                (K_MIGRATE_OUT_SUSPEND, migration, u64::from(slot), 0)
            }
            Command::MigrateOutCommit { migration, slot } => {
                (K_MIGRATE_OUT_COMMIT, migration, u64::from(slot), 0)
            }
            Command::MigrateOutAbort { migration, slot } => {
                (K_MIGRATE_OUT_ABORT, migration, u64::from(slot), 0)
            }
            Command::ReserveBlocks { migration, blocks } => {
                (K_RESERVE_BLOCKS, migration, u64::from(blocks), 0)
            }
            Command::MigrateInCommit { migration } => (K_MIGRATE_IN_COMMIT, migration, 0, 0),
            Command::MigrateInAbort { migration } => (K_MIGRATE_IN_ABORT, migration, 0, 0),
            Command::Reply { id, ok, value } => (K_REPLY, id, u64::from(ok), value),
        };
        w[0] = kind;
        w[1] = a;
        w[2] = b;
        w[3] = c;
        w
    }

    /// Decodes message words from the other process.
    pub fn decode(w: &[u64; MESSAGE_WORDS]) -> Result<Command, DecodeError> {
        let kind = w[0];
        let u32_field = |field: &'static str, v: u64| {
            u32::try_from(v).map_err(|_| DecodeError::OutOfRange {
                kind,
                field,
                value: v,
            })
        };
        Ok(match kind {
            K_STATUS_REQUEST => Command::StatusRequest { seq: w[1] },
            K_STATUS_PUBLISHED => Command::StatusPublished {
                seq: w[1],
                publish_seq: w[2],
            },
            K_ABORT => Command::Abort {
                id: w[1],
                slot: u32_field("slot", w[2])?,
            },
            K_MIGRATE_OUT_BEGIN => Command::MigrateOutBegin {
                migration: w[1],
                slot: u32_field("slot", w[2])?,
            },
            K_MIGRATE_OUT_SUSPEND => Command::MigrateOutSuspend {
                migration: w[1],
                slot: u32_field("slot", w[2])?,
            },
            K_MIGRATE_OUT_COMMIT => Command::MigrateOutCommit {
                migration: w[1],
                slot: u32_field("slot", w[2])?,
            },
            K_MIGRATE_OUT_ABORT => Command::MigrateOutAbort {
                migration: w[1],
                slot: u32_field("slot", w[2])?,
            },
            K_RESERVE_BLOCKS => Command::ReserveBlocks {
                migration: w[1],
                blocks: u32_field("blocks", w[2])?,
            },
            K_MIGRATE_IN_COMMIT => Command::MigrateInCommit { migration: w[1] },
            K_MIGRATE_IN_ABORT => Command::MigrateInAbort { migration: w[1] },
            K_REPLY => match w[2] {
                0 | 1 => Command::Reply {
                    id: w[1],
                    ok: w[2] == 1,
                    value: w[3],
                },
                v => {
                    return Err(DecodeError::OutOfRange {
                        kind,
                        field: "ok",
                        value: v,
                    })
                }
            },
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_full_and_empty() {
        let q = QueueMem::new_boxed();
        assert_eq!(pop(&q), Ok(None));
        for i in 0..QUEUE_CAPACITY as u64 {
            push(&q, &Command::StatusRequest { seq: i }.encode()).unwrap();
        }
        assert_eq!(
            push(&q, &Command::StatusRequest { seq: 99 }.encode()),
            Err(QueueError::Full)
        );
        for i in 0..QUEUE_CAPACITY as u64 {
            let m = pop(&q).unwrap().unwrap();
            assert_eq!(Command::decode(&m), Ok(Command::StatusRequest { seq: i }));
        }
        assert_eq!(pop(&q), Ok(None));
        push(&q, &Command::MigrateInAbort { migration: 5 }.encode()).unwrap();
        assert_eq!(
            Command::decode(&pop(&q).unwrap().unwrap()),
            Ok(Command::MigrateInAbort { migration: 5 })
        );
    }

    #[test]
    fn corrupt_indices_are_an_error() {
        let q = QueueMem::new_boxed();
        q.tail.store(1000, Ordering::Relaxed);
        assert!(matches!(pop(&q), Err(QueueError::Corrupt { .. })));
        assert!(matches!(
            push(&q, &[0; MESSAGE_WORDS]),
            Err(QueueError::Corrupt { .. })
        ));
    }

    #[test]
    fn every_command_round_trips_and_garbage_is_typed() {
        let all = [
            Command::StatusRequest { seq: 1 },
            Command::StatusPublished {
                seq: 1,
                publish_seq: 9,
            },
            Command::Abort { id: 3, slot: 4 },
            Command::MigrateOutBegin {
                migration: 7,
                slot: 1,
            },
            Command::MigrateOutSuspend {
                migration: 7,
                slot: 1,
            },
            Command::MigrateOutCommit {
                migration: 7,
                slot: 1,
            },
            Command::MigrateOutAbort {
                migration: 7,
                slot: 1,
            },
            Command::ReserveBlocks {
                migration: 8,
                blocks: 100,
            },
            Command::MigrateInCommit { migration: 8 },
            Command::MigrateInAbort { migration: 8 },
            Command::Reply {
                id: 8,
                ok: true,
                value: 42,
            },
        ];
        for c in all {
            assert_eq!(Command::decode(&c.encode()), Ok(c));
        }
        assert_eq!(
            Command::decode(&[77, 0, 0, 0, 0, 0, 0, 0]),
            Err(DecodeError::UnknownKind(77))
        );
        assert!(matches!(
            Command::decode(&[K_ABORT, 0, u64::MAX, 0, 0, 0, 0, 0]),
            Err(DecodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            Command::decode(&[K_REPLY, 0, 2, 0, 0, 0, 0, 0]),
            Err(DecodeError::OutOfRange { .. })
        ));
        // Any words decode to a command or a typed error, never a panic.
        let mut rng = crate::rng::SplitMix64(1);
        for _ in 0..if cfg!(miri) { 200 } else { 100_000 } {
            let mut w = [0u64; MESSAGE_WORDS];
            for x in &mut w {
                *x = rng.next_u64();
            }
            w[0] %= 40;
            let _ = Command::decode(&w);
        }
    }

    #[test]
    fn spsc_stress_keeps_order_across_threads() {
        let q = QueueMem::new_boxed();
        let n: u64 = if cfg!(miri) { 300 } else { 200_000 };
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut i = 0;
                while i < n {
                    let msg = [i, !i, i ^ 0x55, 0, 0, 0, 0, i];
                    match push(&q, &msg) {
                        Ok(()) => i += 1,
                        Err(QueueError::Full) => std::hint::spin_loop(),
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            s.spawn(|| {
                let mut expect = 0;
                while expect < n {
                    if let Some(m) = pop(&q).unwrap() {
                        assert_eq!(m, [expect, !expect, expect ^ 0x55, 0, 0, 0, 0, expect]);
                        expect += 1;
                    }
                }
            });
        });
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    use super::*;

    /// Producer and consumer on two threads: every message arrives whole, once, in order.
    #[test]
    fn loom_spsc_delivers_whole_messages_in_order() {
        loom::model(|| {
            let q = loom::sync::Arc::new(QueueMem::new_boxed());
            let q2 = q.clone();
            // Three messages through a queue of two: the producer waits for room when full.
            let producer = loom::thread::spawn(move || {
                let mut i = 1u64;
                while i <= 3 {
                    match push(&q2, &[i; MESSAGE_WORDS]) {
                        Ok(()) => i += 1,
                        Err(QueueError::Full) => loom::thread::yield_now(),
                        Err(e) => panic!("{e}"),
                    }
                }
            });
            let mut next = 1;
            for _ in 0..3 {
                if let Some(m) = pop(&q).unwrap() {
                    assert!(m.iter().all(|w| *w == next), "message {next} torn: {m:?}");
                    next += 1;
                }
                loom::thread::yield_now();
            }
            producer.join().unwrap();
            while let Some(m) = pop(&q).unwrap() {
                assert!(m.iter().all(|w| *w == next));
                next += 1;
            }
            assert_eq!(next, 4);
        });
    }
}
