//! The engine's end of the interface: create the control segment, publish statuses.

use std::path::Path;

use crate::command::{pop, push, Command, DecodeError, QueueError};
use crate::segment::{segment_name, segment_path, ControlSegment, SegmentError};
use crate::status_ring::{StatusRecord, StatusWriter};

/// What an engine holds to talk to its llumlet. Dropping it removes the segment.
pub struct EngineEndpoint {
    segment: ControlSegment,
    writer: StatusWriter,
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
        Ok(EngineEndpoint { segment, writer })
    }

    /// Publishes a status (and a heartbeat). Allocates nothing, takes no lock.
    pub fn publish(&mut self, record: &StatusRecord) {
        self.writer.publish(self.segment.status(), record);
        self.segment.beat();
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
