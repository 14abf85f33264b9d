//! The engine's end of the interface: create the control segment, publish statuses.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::command::{pop, push, Command, DecodeError, QueueError};
use crate::kv::{KvError, KvRegion};
use crate::request_table::{RequestInfo, RequestState, TableError, TableWriter};
use crate::segment::{segment_name, segment_path, ControlSegment, SegmentError};
use crate::status_ring::{StatusRecord, StatusWriter};

/// What an engine holds to talk to its llumlet. Dropping it (and its command reader, if one
/// was taken) removes the segment.
pub struct EngineEndpoint {
    segment: Arc<ControlSegment>,
    writer: StatusWriter,
    table: TableWriter,
    reader_taken: bool,
}

impl EngineEndpoint {
    /// Creates the control segment of `instance_id` under `/dev/shm`.
    pub fn create(instance_id: &str) -> Result<EngineEndpoint, SegmentError> {
        EngineEndpoint::create_at(&segment_path(&segment_name(instance_id)))
    }

    /// Creates the control segment at `path`.
    pub fn create_at(path: &Path) -> Result<EngineEndpoint, SegmentError> {
        let segment = ControlSegment::create(path)?;
        let writer = StatusWriter::new(segment.status());
        Ok(EngineEndpoint {
            segment: Arc::new(segment),
            writer,
            table: TableWriter::default(),
            reader_taken: false,
        })
    }

    /// Publishes a status (and a heartbeat). Allocates nothing, takes no lock.
    pub fn publish(&mut self, record: &StatusRecord) {
        self.writer.publish(self.segment.status(), record);
        self.segment.beat();
    }

    /// Adds a live request with its block table; returns its slot.
    pub fn add_request(
        &mut self,
        info: &RequestInfo<'_>,
        blocks: &[u32],
    ) -> Result<u32, TableError> {
        self.table.add(self.segment.requests(), info, blocks)
    }

    /// Records a request's progress and the blocks it gained since the last call.
    pub fn request_progress(
        &mut self,
        slot: u32,
        state: RequestState,
        output_tokens: u32,
        new_blocks: &[u32],
    ) -> Result<(), TableError> {
        self.table.progress(
            self.segment.requests(),
            slot,
            state,
            output_tokens,
            new_blocks,
        )
    }

    /// Replaces a request's block table.
    pub fn set_request_blocks(&mut self, slot: u32, blocks: &[u32]) -> Result<(), TableError> {
        self.table.set_blocks(self.segment.requests(), slot, blocks)
    }

    /// Removes a finished or aborted request.
    pub fn remove_request(&mut self, slot: u32) -> Result<(), TableError> {
        self.table.remove(self.segment.requests(), slot)
    }

    /// Registers where part of the KV cache lives.
    pub fn register_kv_region(&self, region: &KvRegion) -> Result<usize, KvError> {
        self.segment.kv().register(region)
    }

    /// Takes the next command from the llumlet, if any. An empty poll is two loads. Once a
    /// [`CommandReader`] was taken, commands are its alone: this is `PollError::ReaderTaken`.
    pub fn poll_command(&self) -> Result<Option<Command>, PollError> {
        if self.reader_taken {
            return Err(PollError::ReaderTaken);
        }
        poll(&self.segment)
    }

    /// The command queue's reader, for a thread of its own (an engine whose step loop cannot
    /// poll between steps, or that wants to wait for commands without holding its interpreter):
    /// it polls or waits while this endpoint publishes and keeps the table on another thread.
    /// The queue has one consumer, so there is one reader per endpoint: `None` the second time.
    pub fn command_reader(&mut self) -> Option<CommandReader> {
        if self.reader_taken {
            return None;
        }
        self.reader_taken = true;
        Some(CommandReader {
            segment: Arc::clone(&self.segment),
        })
    }

    /// Sends a reply or event to the llumlet; a full queue is returned, nothing is dropped.
    pub fn send(&self, cmd: &Command) -> Result<(), QueueError> {
        push(self.segment.to_llumlet(), &cmd.encode())
    }

    /// The segment.
    pub fn segment(&self) -> &ControlSegment {
        &self.segment
    }
}

fn poll(segment: &ControlSegment) -> Result<Option<Command>, PollError> {
    match pop(segment.to_engine())? {
        None => Ok(None),
        Some(words) => Ok(Some(Command::decode(&words)?)),
    }
}

/// The consumer of an engine's command queue, apart from its [`EngineEndpoint`] (which may be
/// on another thread); it keeps the segment mapped while it lives.
pub struct CommandReader {
    segment: Arc<ControlSegment>,
}

/// The longest pause between two polls while waiting.
const WAIT_MAX_PAUSE: Duration = Duration::from_millis(1);

impl CommandReader {
    /// Takes the next command, if any (two loads when there is none).
    pub fn poll(&self) -> Result<Option<Command>, PollError> {
        poll(&self.segment)
    }

    /// Waits up to `timeout` for the next command, polling with pauses that grow from 20 µs
    /// to 1 ms (so a command waits at most about a millisecond once the queue has been quiet).
    pub fn wait(&self, timeout: Duration) -> Result<Option<Command>, PollError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            if let Some(c) = self.poll()? {
                return Ok(Some(c));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(WAIT_MAX_PAUSE);
        }
    }
}

/// A poll that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    /// The queue is inconsistent.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The message is not a command.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The endpoint's command reader takes the commands.
    #[error("the engine's commands go to its command reader")]
    ReaderTaken,
}
