//! The `llumlet.Llumlet` gRPC service, with the status codes and message strings of the Llumnix
//! wire contract (reference §3). Every handler runs under the server timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use llumlet_proto::cms::InstanceStatus;
use llumlet_proto::llumlet::llumlet_server::Llumlet;
use llumlet_proto::llumlet::{
    AbortMigrateInRequest, AbortRequests, AbortResponse, MigrateInRequest, MigrateInResponse,
    MigrateRequest, MigrateResponse, PushInstanceStatusResponse,
};
use tokio::sync::Notify;
use tonic::{Code, Request, Response, Status};

use crate::config::Config;
use crate::engine::{with_retries, Engine};
use crate::metrics::Metrics;
use crate::migration::rpc::{MigrateError, MigrationParams, Migrator, SlotLedger};
use crate::pyrepr::list_repr;
use crate::status::PushedStatus;

/// Pre-stop migrations are sent this many times, as upstream (`PRESTOP_MIGRATION_SEND_TIMES`).
pub const PRESTOP_SENDS: usize = 2;

/// What the handlers share with the rest of the llumlet.
pub struct Shared {
    /// Configuration.
    pub config: Arc<Config>,
    /// Where `PushInstanceStatus` puts statuses.
    pub pushed: Arc<PushedStatus>,
    /// Migration slots.
    pub ledger: Arc<SlotLedger>,
    /// The migration data plane.
    pub migrator: Arc<dyn Migrator>,
    /// The engine.
    pub engine: Arc<dyn Engine>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Woken when an engine call exhausted its retries: the status loop reports unschedulable.
    pub engine_failed: Arc<Notify>,
}

/// The service implementation.
pub struct LlumletService {
    shared: Arc<Shared>,
}

const MIGRATE: usize = 0;
const ABORT: usize = 1;
const MIGRATE_IN: usize = 2;
const ABORT_MIGRATE_IN: usize = 3;
const PUSH_STATUS: usize = 4;

/// Python's `str(float)` for the seconds of a timeout (`5.0`, `0.5`).
fn secs(d: Duration) -> String {
    format!("{:?}", d.as_secs_f64())
}

impl LlumletService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        LlumletService { shared }
    }

    fn finish<T>(&self, method: usize, r: Result<T, Status>) -> Result<Response<T>, Status> {
        let code = r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.shared.metrics.rpc(method, code);
        if let Err(s) = &r {
            tracing::info!(method = crate::metrics::METHODS[method], code = ?s.code(), details = s.message(), "rpc failed");
        }
        r.map(Response::new)
    }

    /// Runs `f` under the server timeout; `on_timeout` gives the DEADLINE_EXCEEDED details.
    async fn timed<T>(
        &self,
        f: impl Future<Output = Result<T, Status>>,
        on_timeout: impl FnOnce(&str) -> String,
    ) -> Result<T, Status> {
        let limit = self.shared.config.rpc_timeout;
        match tokio::time::timeout(limit, f).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(on_timeout(&secs(limit)))),
        }
    }

    fn on_engine_exhausted(&self, what: &'static str) -> impl FnOnce() + '_ {
        move || {
            tracing::warn!(
                call = what,
                "engine call failed on every attempt; reporting the instance unschedulable"
            );
            self.shared.engine_failed.notify_one();
        }
    }

    async fn migrate_inner(&self, r: MigrateRequest) -> Result<MigrateResponse, Status> {
        let params = MigrationParams::from_request(&r).map_err(Status::invalid_argument)?;
        let reservation = self
            .shared
            .ledger
            .reserve_out(&params)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        // The caller's strings are clipped: a log line never carries unbounded input.
        let clip = |s| crate::pyrepr::clip(s, 64);
        tracing::info!(
            src = %clip(&r.src_engine_id), dst = %clip(&r.dst_engine_id),
            dst_addr = %format!("{}:{}", clip(&r.dst_engine_ip), r.dst_engine_port),
            migration_type = params.migration_type.as_str(), policy = %clip(&params.req_policy),
            trigger = %clip(&params.trigger_policy),
            num_reqs = params.num_reqs, num_tokens = params.num_tokens, ratio = params.kv_cache_usage_ratio,
            "migrate"
        );
        // The migration runs in its own task with the slots it holds: if the RPC times out, the
        // migration still finishes (or aborts) cleanly and only then gives its slots back.
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(async move {
            let _slots = reservation;
            if !shared.config.migration.enabled {
                // Upstream: with migration off, only pre-stop reaches the engine, which has no
                // migration frontend and selects nothing.
                return Ok(0);
            }
            let sends = if params.is_prestop() {
                PRESTOP_SENDS
            } else {
                1
            };
            let mut moved = 0;
            let mut last_err = None;
            let mut any_ok = false;
            for _ in 0..sends {
                match shared
                    .migrator
                    .migrate_out(&r.dst_engine_ip, r.dst_engine_port, &params)
                    .await
                {
                    Ok(n) => {
                        any_ok = true;
                        moved += n;
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            match (any_ok, last_err) {
                (false, Some(e)) => Err(e),
                _ => Ok(moved),
            }
        });
        let moved = match task.await {
            Ok(r) => r,
            Err(join) => Err(MigrateError::Failed(
                crate::migration::reason::Reason::Internal(format!(
                    "migration task failed: {join}"
                )),
            )),
        }
        .map_err(|e| {
            Status::internal(format!(
                "Migration failed due to an unexpected server error: {e}"
            ))
        })?;
        Ok(if moved > 0 {
            MigrateResponse {
                success: true,
                message: format!(
                    "Migrate requests from {} to {}.",
                    r.src_engine_id, r.dst_engine_id
                ),
            }
        } else {
            MigrateResponse {
                success: false,
                message: "Migration failed due to enginecore can not find expected requests."
                    .into(),
            }
        })
    }
}

#[tonic::async_trait]
impl Llumlet for LlumletService {
    async fn migrate(
        &self,
        request: Request<MigrateRequest>,
    ) -> Result<Response<MigrateResponse>, Status> {
        let r = self
            .timed(self.migrate_inner(request.into_inner()), |s| {
                format!("Migration failed to complete within the server's timeout of {s} seconds.")
            })
            .await;
        self.finish(MIGRATE, r)
    }

    async fn abort(
        &self,
        request: Request<AbortRequests>,
    ) -> Result<Response<AbortResponse>, Status> {
        let ids = request.into_inner().request_ids;
        let cfg = &self.shared.config;
        let list = list_repr(&ids);
        let call = async {
            with_retries(
                "Abort",
                cfg.engine_abort_timeout,
                cfg.engine_retry_interval,
                self.on_engine_exhausted("Abort"),
                || self.shared.engine.abort(&ids),
            )
            .await
            .map(|()| AbortResponse {
                success: true,
                message: format!("Requests {list} aborted."),
            })
            .map_err(|e| {
                Status::internal(format!(
                    "Failed to abort due to an unexpected server error: {e}"
                ))
            })
        };
        let r = self
            .timed(call, |s| {
                format!(
                    "Failed to abort requests {list} within the server's timeout of {s} seconds."
                )
            })
            .await;
        self.finish(ABORT, r)
    }

    async fn migrate_in(
        &self,
        request: Request<MigrateInRequest>,
    ) -> Result<Response<MigrateInResponse>, Status> {
        let req = request.into_inner();
        let cfg = &self.shared.config;
        let call = async {
            let accepted = with_retries(
                "MigrateIn",
                cfg.engine_migrate_in_timeout,
                cfg.engine_retry_interval,
                self.on_engine_exhausted("MigrateIn"),
                || {
                    self.shared
                        .engine
                        .migrate_in(&req.serialized_migrate_req, &req.serialization_format)
                },
            )
            .await
            .map_err(|e| {
                Status::internal(format!(
                    "MigrateIn failed due to an unexpected server error: {e}"
                ))
            })?;
            Ok(MigrateInResponse {
                success: accepted,
                message: if accepted {
                    "MigrateIn request processed successfully.".into()
                } else {
                    "MigrateIn request rejected by the engine.".into()
                },
            })
        };
        let r = self
            .timed(call, |s| {
                format!("Failed to process MigrateIn within the server's timeout of {s} seconds.")
            })
            .await;
        self.finish(MIGRATE_IN, r)
    }

    async fn abort_migrate_in(
        &self,
        request: Request<AbortMigrateInRequest>,
    ) -> Result<Response<AbortResponse>, Status> {
        let ids = request.into_inner().request_ids;
        let cfg = &self.shared.config;
        let list = list_repr(&ids);
        let call = async {
            with_retries(
                "AbortMigrateIn",
                cfg.engine_abort_timeout,
                cfg.engine_retry_interval,
                self.on_engine_exhausted("AbortMigrateIn"),
                || self.shared.engine.abort_migrate_in(&ids),
            )
            .await
            .map(|()| AbortResponse {
                success: true,
                message: format!(
                    "AbortMigrateIn request processed successfully. requests ids: {list}"
                ),
            })
            .map_err(|e| {
                Status::internal(format!(
                    "AbortMigrateIn failed due to an unexpected server error: {e}"
                ))
            })
        };
        let r = self
            .timed(call, |s| {
                format!(
                    "Failed to process AbortMigrateIn within the server's timeout of {s} seconds."
                )
            })
            .await;
        self.finish(ABORT_MIGRATE_IN, r)
    }

    async fn push_instance_status(
        &self,
        request: Request<InstanceStatus>,
    ) -> Result<Response<PushInstanceStatusResponse>, Status> {
        let status = request.into_inner();
        // An impossible status is refused; the last good one stays what the CMS shows.
        if let Err(why) = crate::status::check_pushed(&status) {
            return self.finish(
                PUSH_STATUS,
                Err(Status::invalid_argument(format!(
                    "Push instance status failed due to invalid argument: {why}"
                ))),
            );
        }
        self.shared.pushed.push(status);
        let r = Ok(PushInstanceStatusResponse {
            success: true,
            message: "Push instance status successfully.".into(),
        });
        self.finish(PUSH_STATUS, r)
    }
}
