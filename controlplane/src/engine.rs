//! The engine as the gRPC handlers see it: abort, migrate-in, abort-migrate-in. The
//! shared-memory engine interface implements [`Engine`]; until an engine is attached the
//! llumlet answers with a clear error instead of pretending.

use std::future::Future;
use std::time::Duration;

/// An engine call that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No engine interface is attached to this llumlet.
    #[error("no engine is attached to this llumlet (the shared-memory engine interface is not available in this build)")]
    NotAttached,
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
            Ok(Err(EngineError::NotAttached)) => return Err(EngineError::NotAttached),
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
