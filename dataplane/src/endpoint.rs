//! The engine's end of the interface: create the control segment, publish statuses.

use std::path::Path;

use crate::command::{pop, push, Command, DecodeError, QueueError};
use crate::kv::{KvError, KvRegion};
use crate::request_table::{RequestInfo, RequestState, TableError, TableWriter};
use crate::segment::{segment_name, segment_path, ControlSegment, SegmentError};
use crate::status_ring::{StatusRecord, StatusWriter};

/// What an engine holds to talk to its llumlet. Dropping it removes the segment.
pub struct EngineEndpoint {
    segment: ControlSegment,
    writer: StatusWriter,
    table: TableWriter,
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
            segment,
            writer,
            table: TableWriter::default(),
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

    /// Takes the next command from the llumlet, if any. An empty poll is two loads.
    pub fn poll_command(&self) -> Result<Option<Command>, PollError> {
        match pop(self.segment.to_engine())? {
            None => Ok(None),
            Some(words) => Ok(Some(Command::decode(&words)?)),
        }
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

/// A poll that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    /// The queue is inconsistent.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The message is not a command.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}
