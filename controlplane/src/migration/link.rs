//! The llumlet's link to its engine's command queues, shared by the status source and the
//! migrations: one producer lock for the llumlet → engine queue, and a consumer that hands
//! each reply to whoever waits for its id (replies for one id arrive in command order).

use crate::sync::lock;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llumlet_dataplane::command::{pop, push, Command, QueueError};
use llumlet_dataplane::segment::ControlSegment;

/// Why an engine call did not get its reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No engine attached.
    #[error("no engine attached")]
    NoEngine,
    /// The engine process is gone.
    #[error("the engine process is gone")]
    EngineGone,
    /// No reply in time (the command may still be carried out: the queue runs in order).
    #[error("the engine did not answer in time")]
    Timeout,
    /// The command could not be queued.
    #[error("cannot queue the command: {0}")]
    Queue(QueueError),
}

#[derive(Default)]
struct Rx {
    replies: HashMap<u64, VecDeque<(bool, u64)>>,
    status_answered: u64,
}

/// See the module documentation.
pub struct EngineLink {
    path: PathBuf,
    segment: Mutex<Option<Arc<ControlSegment>>>,
    tx: Mutex<()>,
    rx: Mutex<Rx>,
    next_id: AtomicU64,
}

impl EngineLink {
    /// A link to the engine whose control segment is at `path` (attached later).
    pub fn new(path: PathBuf) -> Arc<EngineLink> {
        // Ids of different llumlet runs should not meet in one engine: start from the clock.
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        Arc::new(EngineLink {
            path,
            segment: Mutex::new(None),
            tx: Mutex::new(()),
            rx: Mutex::new(Rx::default()),
            next_id: AtomicU64::new(start),
        })
    }

    /// The segment's path (mailboxes live beside it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets (or clears) the attached segment.
    pub fn set_segment(&self, seg: Option<Arc<ControlSegment>>) {
        *lock(&self.segment) = seg;
        let mut rx = lock(&self.rx);
        rx.replies.clear();
    }

    /// The attached segment.
    pub fn segment(&self) -> Option<Arc<ControlSegment>> {
        lock(&self.segment).clone()
    }

    /// A fresh id for engine commands.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Queues a command to the engine.
    pub fn send(&self, seg: &ControlSegment, cmd: &Command) -> Result<(), QueueError> {
        let _tx = lock(&self.tx);
        push(seg.to_engine(), &cmd.encode())
    }

    /// Takes every message the engine sent and files it.
    pub fn drain(&self, seg: &ControlSegment) {
        let mut rx = lock(&self.rx);
        loop {
            match pop(seg.to_llumlet()) {
                Ok(None) => break,
                Ok(Some(words)) => match Command::decode(&words) {
                    Ok(Command::StatusPublished { seq, .. }) => {
                        rx.status_answered = rx.status_answered.max(seq)
                    }
                    Ok(Command::Reply { id, ok, value }) => {
                        rx.replies.entry(id).or_default().push_back((ok, value))
                    }
                    Ok(other) => tracing::debug!(command = ?other, "unexpected engine message"),
                    Err(e) => tracing::warn!(error = %e, "bad message from the engine"),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "the engine's reply queue is inconsistent");
                    break;
                }
            }
        }
    }

    /// The newest status request the engine answered.
    pub fn status_answered(&self) -> u64 {
        lock(&self.rx).status_answered
    }

    /// Waits for the next reply to `id` (replies to one id come in command order).
    pub fn wait(&self, id: u64, timeout: Duration) -> Result<(bool, u64), CallError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(20);
        loop {
            let seg = self.segment().ok_or(CallError::NoEngine)?;
            self.drain(&seg);
            if let Some(r) = lock(&self.rx)
                .replies
                .get_mut(&id)
                .and_then(VecDeque::pop_front)
            {
                return Ok(r);
            }
            if !seg.writer_alive() {
                return Err(CallError::EngineGone);
            }
            if Instant::now() >= deadline {
                return Err(CallError::Timeout);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    /// Forgets the replies to `id` nobody will wait for.
    pub fn forget(&self, id: u64) {
        lock(&self.rx).replies.remove(&id);
    }
}

/// The commands of one migration to the engine, all with one id: a reply to a command that
/// timed out arrives before the reply to the next one and is skipped.
pub struct Calls {
    link: Arc<EngineLink>,
    /// The id.
    pub id: u64,
    stale: usize,
    timeout: Duration,
}

impl Calls {
    /// Calls with id `id`, each waiting at most `timeout`.
    pub fn new(link: Arc<EngineLink>, id: u64, timeout: Duration) -> Calls {
        Calls {
            link,
            id,
            stale: 0,
            timeout,
        }
    }

    /// Sends `cmd` and waits for its reply.
    pub fn call(&mut self, cmd: Command) -> Result<(bool, u64), CallError> {
        let seg = self.link.segment().ok_or(CallError::NoEngine)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.link.send(&seg, &cmd) {
                Ok(()) => break,
                Err(QueueError::Full) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Err(e) => return Err(CallError::Queue(e)),
            }
        }
        self.finish()
    }

    /// Waits (again) for the reply to the last command sent.
    pub fn finish(&mut self) -> Result<(bool, u64), CallError> {
        loop {
            match self.link.wait(self.id, self.timeout) {
                Ok(r) if self.stale == 0 => return Ok(r),
                Ok(_) => self.stale -= 1,
                Err(CallError::Timeout) => {
                    self.stale += 1;
                    return Err(CallError::Timeout);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// After a timeout: the next `finish` waits for that command's reply again.
    pub fn unstale_last(&mut self) {
        self.stale = self.stale.saturating_sub(1);
    }
}

impl Drop for Calls {
    fn drop(&mut self) {
        if self.stale == 0 {
            self.link.forget(self.id);
        }
    }
}
