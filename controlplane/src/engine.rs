//! The engine as the gRPC handlers see it: abort, migrate-in, abort-migrate-in.
//! [`QueueEngine`] implements [`Engine`] over the shared-memory command queue; until an engine
//! is attached the llumlet answers with a clear error instead of pretending.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use llumlet_dataplane::command::Command;
use llumlet_dataplane::request_table::{read_request, RequestState, MAX_REQUESTS};

use crate::migration::link::{CallError, Calls, EngineLink};

/// An engine call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No engine interface is attached to this llumlet.
    #[error("no engine is attached to this llumlet")]
    NotAttached,
    /// The call is not supported by this engine interface (answered at once, no retries).
    #[error("{0}")]
    Unsupported(String),
    /// The engine answered with an error.
    #[error("{0}")]
    Failed(String),
    /// The engine did not answer within the per-attempt timeout.
    #[error("the engine did not answer within {0:?}")]
    Timeout(Duration),
    /// Every attempt failed; the instance has been reported unschedulable.
    #[error("Llumlet failed to finish sending {0} request(s).")]
    Exhausted(&'static str),
}

/// What the gRPC service asks of the engine.
#[tonic::async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Aborts these requests (including requests that migrated in).
    async fn abort(&self, request_ids: &[String]) -> Result<(), EngineError>;
    /// Hands a serialized migrated request to the engine; `Ok(false)`: the engine refused it.
    async fn migrate_in(&self, payload: &[u8], format: &str) -> Result<bool, EngineError>;
    /// Drops requests that were migrating in.
    async fn abort_migrate_in(&self, request_ids: &[String]) -> Result<(), EngineError>;
}

/// No engine attached: every call fails with [`EngineError::NotAttached`].
pub struct NoEngine;

#[tonic::async_trait]
impl Engine for NoEngine {
    async fn abort(&self, _: &[String]) -> Result<(), EngineError> {
        Err(EngineError::NotAttached)
    }
    async fn migrate_in(&self, _: &[u8], _: &str) -> Result<bool, EngineError> {
        Err(EngineError::NotAttached)
    }
    async fn abort_migrate_in(&self, _: &[String]) -> Result<(), EngineError> {
        Err(EngineError::NotAttached)
    }
}

/// The engine behind the shared-memory command queue: `Abort` and `AbortMigrateIn` find the
/// requests in the engine's request table and send it an abort per request, waiting for each
/// answer. Ids the table does not hold are ignored, as an engine ignores aborts of requests it
/// does not have.
pub struct QueueEngine {
    link: Arc<EngineLink>,
}

/// How long one abort waits for the engine's answer (the gRPC handler's own timeout bounds the
/// whole call).
const ABORT_WAIT: Duration = Duration::from_secs(2);

impl QueueEngine {
    /// The engine behind `link`.
    pub fn new(link: Arc<EngineLink>) -> QueueEngine {
        QueueEngine { link }
    }

    async fn abort_where(
        &self,
        ids: &[String],
        keep: fn(Option<RequestState>) -> bool,
    ) -> Result<(), EngineError> {
        let link = Arc::clone(&self.link);
        let ids: HashSet<String> = ids.iter().cloned().collect();
        tokio::task::spawn_blocking(move || {
            let seg = link.segment().ok_or(EngineError::NotAttached)?;
            let mut blocks = Vec::new();
            let slots: Vec<u32> = (0..MAX_REQUESTS as u32)
                .filter(|&slot| {
                    matches!(read_request(seg.requests(), slot, &mut blocks), Ok(Some(r))
                        if keep(r.state()) && r.id.as_str().is_some_and(|id| ids.contains(id)))
                })
                .collect();
            for slot in slots {
                let id = link.next_id();
                let mut calls = Calls::new(Arc::clone(&link), id, ABORT_WAIT);
                // A "not ok" answer: the request left the engine meanwhile (finished or moved).
                match calls.call(Command::Abort { id, slot }) {
                    Ok(_) => {}
                    Err(CallError::NoEngine) => return Err(EngineError::NotAttached),
                    Err(CallError::Timeout) => return Err(EngineError::Timeout(ABORT_WAIT)),
                    Err(e) => return Err(EngineError::Failed(e.to_string())),
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| EngineError::Failed(format!("abort task failed: {e}")))?
    }
}

#[tonic::async_trait]
impl Engine for QueueEngine {
    async fn abort(&self, request_ids: &[String]) -> Result<(), EngineError> {
        self.abort_where(request_ids, |s| {
            !matches!(s, Some(RequestState::Free) | None)
        })
        .await
    }

    async fn migrate_in(&self, _: &[u8], format: &str) -> Result<bool, EngineError> {
        Err(EngineError::Unsupported(format!(
            "MigrateIn with a serialized request (format {format:?}) is not supported by the shared-memory engine interface; requests migrate in through the transfer endpoint (docs/migration.md)"
        )))
    }

    async fn abort_migrate_in(&self, request_ids: &[String]) -> Result<(), EngineError> {
        self.abort_where(request_ids, |s| s == Some(RequestState::MigratingIn))
            .await
    }
}

/// Attempts of an engine call before it counts as failed (upstream `MAX_ENGINE_CLIENT_RETRIES`).
pub const ENGINE_ATTEMPTS: u32 = 3;

/// Runs an engine call up to [`ENGINE_ATTEMPTS`] times, each within `timeout`, `interval` apart.
/// `NotAttached` is returned at once. When every attempt fails, `on_exhausted` runs (the caller
/// reports the instance unschedulable, as upstream) and the result is `Exhausted(what)`.
pub async fn with_retries<T, F, Fut>(
    what: &'static str,
    timeout: Duration,
    interval: Duration,
    on_exhausted: impl FnOnce(),
    mut call: F,
) -> Result<T, EngineError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EngineError>>,
{
    for attempt in 1..=ENGINE_ATTEMPTS {
        let err = match tokio::time::timeout(timeout, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e @ (EngineError::NotAttached | EngineError::Unsupported(_)))) => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => EngineError::Timeout(timeout),
        };
        tracing::warn!(call = what, attempt, error = %err, "engine call failed");
        if attempt < ENGINE_ATTEMPTS {
            tokio::time::sleep(interval).await;
        }
    }
    on_exhausted();
    Err(EngineError::Exhausted(what))
}
