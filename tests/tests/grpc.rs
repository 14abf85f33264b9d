//! The `llumlet.Llumlet` contract over real gRPC and a real Redis, with the engine and the
//! migrator replaced by recording fakes (reference §3, §6.1, acceptance 1-4).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llumlet::agent::Agent;
use llumlet::config::Config;
use llumlet::engine::{Engine, EngineError};
use llumlet::migration::rpc::{MigrateError, MigrationParams, MigrationType, Migrator};
use llumlet_proto::cms::InstanceStatus;
use llumlet_proto::llumlet::llumlet_client::LlumletClient;
use llumlet_proto::llumlet::migrate_request::MigrationValue;
use llumlet_proto::llumlet::{
    AbortMigrateInRequest, AbortRequests, MigrateInRequest, MigrateRequest,
};
use llumlet_tests::*;
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

#[derive(Default)]
struct FakeMigrator {
    calls: Mutex<Vec<(String, i32, MigrationParams)>>,
    moved: Mutex<usize>,
    delay: Mutex<Duration>,
}

#[tonic::async_trait]
impl Migrator for FakeMigrator {
    async fn migrate_out(
        &self,
        ip: &str,
        port: i32,
        p: &MigrationParams,
    ) -> Result<usize, MigrateError> {
        self.calls
            .lock()
            .unwrap()
            .push((ip.to_string(), port, p.clone()));
        let delay = *self.delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        Ok(*self.moved.lock().unwrap())
    }
}

#[derive(Default)]
struct FakeEngine {
    aborted: Mutex<Vec<Vec<String>>>,
    attempts: Mutex<u32>,
    fail: Mutex<bool>,
    accept_migrate_in: Mutex<bool>,
}

#[tonic::async_trait]
impl Engine for FakeEngine {
    async fn abort(&self, ids: &[String]) -> Result<(), EngineError> {
        *self.attempts.lock().unwrap() += 1;
        if *self.fail.lock().unwrap() {
            return Err(EngineError::Failed("engine exploded".into()));
        }
        self.aborted.lock().unwrap().push(ids.to_vec());
        Ok(())
    }
    async fn migrate_in(&self, payload: &[u8], _format: &str) -> Result<bool, EngineError> {
        assert_eq!(payload, b"req-bytes");
        Ok(*self.accept_migrate_in.lock().unwrap())
    }
    async fn abort_migrate_in(&self, ids: &[String]) -> Result<(), EngineError> {
        self.aborted.lock().unwrap().push(ids.to_vec());
        Ok(())
    }
}

struct Setup {
    redis: RedisServer,
    agent: Option<Agent>,
    client: LlumletClient<Channel>,
    migrator: Arc<FakeMigrator>,
    engine: Arc<FakeEngine>,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let redis = RedisServer::start();
    let mut env = base_env(&redis, "src", 0);
    env.insert("LLUMNIX_RPC_PORT".into(), "-1".into());
    env.insert("LLUMNIX_MAX_REQ_MIG_OUT".into(), "2".into());
    env.insert("LLUMLET_ENGINE_RETRY_INTERVAL".into(), "0.05".into());
    for (k, v) in extra {
        env.insert(k.to_string(), v.to_string());
    }
    let env: HashMap<String, String> = env;
    let config = Config::from_lookup(&move |k: &str| env.get(k).cloned()).unwrap();
    let migrator = Arc::new(FakeMigrator {
        moved: Mutex::new(1),
        ..Default::default()
    });
    let engine = Arc::new(FakeEngine::default());
    let agent = Agent::start(config, engine.clone(), migrator.clone(), None)
        .await
        .unwrap();
    let client = grpc_client(agent.rpc_addr().port(), Duration::from_secs(5)).await;
    Setup {
        redis,
        agent: Some(agent),
        client,
        migrator,
        engine,
    }
}

fn migrate(t: &str, v: Option<MigrationValue>) -> MigrateRequest {
    MigrateRequest {
        src_engine_id: "a".into(),
        dst_engine_id: "b".into(),
        dst_engine_ip: "192.168.1.200".into(),
        dst_engine_port: 9999,
        migration_type: t.into(),
        migration_req_policy: "SR".into(),
        migration_value: v,
        trigger_policy: "NEUTRAL_LOAD".into(),
    }
}

async fn push_and_wait(s: &mut Setup, update_id: i32) {
    let status = InstanceStatus {
        update_id,
        num_total_gpu_tokens: 100,
        ..Default::default()
    };
    s.client.push_instance_status(status).await.unwrap();
    s.redis
        .wait_for("llumnix:instance_status:src", Duration::from_secs(5), |b| {
            b.map(|b| InstanceStatus::decode(b).unwrap())
                .filter(|st| st.update_id == update_id)
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_validation_and_outcomes() {
    let mut s = setup(&[]).await;

    // Validation errors: exact details, migrator never called.
    let e = s
        .client
        .migrate(migrate("INVALID_TYPE", Some(MigrationValue::NumReqs(1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "Migration failed due to invalid argument: 'INVALID_TYPE' is not a valid MigrationType."
    );
    let e = s.client.migrate(migrate("", None)).await.unwrap_err();
    assert_eq!(
        e.message(),
        "Migration failed due to invalid argument: '' is not a valid MigrationType."
    );
    let e = s
        .client
        .migrate(migrate("NUM_REQ", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(
        e.message(),
        "Migration failed due to invalid argument: Empty num_reqs. If migration_type is NUM_REQ, num_reqs is necessary."
    );
    let e = s
        .client
        .migrate(migrate("TOKEN", Some(MigrationValue::NumReqs(3))))
        .await
        .unwrap_err();
    assert_eq!(
        e.message(),
        "Migration failed due to invalid argument: Empty num_tokens. If migration_type is TOKEN, num_tokens is necessary."
    );
    let e = s.client.migrate(migrate("RATIO", None)).await.unwrap_err();
    assert_eq!(
        e.message(),
        "Migration failed due to invalid argument: Empty kv_cache_usage_ratio. If migration_type is RATIO, kv_cache_usage_ratio is necessary."
    );

    // No status yet: no slots, as upstream.
    let e = s
        .client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(e.message(), "No enough migrate out slots for requests");
    assert!(s.migrator.calls.lock().unwrap().is_empty());

    push_and_wait(&mut s, 1).await;

    let r = s
        .client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    assert_eq!(r.message, "Migrate requests from a to b.");
    {
        let calls = s.migrator.calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        let (ip, port, p) = &calls[0];
        assert_eq!((ip.as_str(), *port), ("192.168.1.200", 9999));
        assert_eq!(p.migration_type, MigrationType::NumReq);
        assert_eq!(
            (p.req_policy.as_str(), p.trigger_policy.as_str(), p.num_reqs),
            ("SR", "NEUTRAL_LOAD", 1)
        );
    }

    // More than the free slots (2).
    let e = s
        .client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(5))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    // TOKEN carries num_reqs = 1; nothing selected → OK with success=false.
    *s.migrator.moved.lock().unwrap() = 0;
    let r = s
        .client
        .migrate(migrate("TOKEN", Some(MigrationValue::NumTokens(1024))))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.success);
    assert_eq!(
        r.message,
        "Migration failed due to enginecore can not find expected requests."
    );
    let last = s.migrator.calls.lock().unwrap().last().unwrap().2.clone();
    assert_eq!((last.num_reqs, last.num_tokens), (1, 1024));

    // Explicit 0 is accepted.
    s.client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(0))))
        .await
        .unwrap();
    assert_eq!(
        s.migrator.calls.lock().unwrap().last().unwrap().2.num_reqs,
        0
    );

    // Pre-stop is sent twice.
    let before = s.migrator.calls.lock().unwrap().len();
    s.client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(-1))))
        .await
        .unwrap();
    assert_eq!(s.migrator.calls.lock().unwrap().len(), before + 2);

    let m = s.agent.as_ref().unwrap().shared().metrics.clone();
    assert_eq!(m.rpc_count(0, Code::InvalidArgument), 5);
    assert_eq!(m.rpc_count(0, Code::ResourceExhausted), 2);
    s.agent.take().unwrap().shutdown().await;
    assert_eq!(s.redis.dbsize(), 0, "shutdown removed both keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrates_cannot_share_a_slot() {
    let mut s = setup(&[("LLUMNIX_MAX_REQ_MIG_OUT", "1")]).await;
    push_and_wait(&mut s, 1).await;
    // Long enough that the second call arrives while the first still holds the slot, even on
    // a loaded machine.
    *s.migrator.delay.lock().unwrap() = Duration::from_millis(1500);
    let (mut c1, mut c2) = (s.client.clone(), s.client.clone());
    let a = tokio::spawn(async move {
        c1.migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
            .await
    });
    let b = tokio::spawn(async move {
        c2.migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
            .await
    });
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let codes: Vec<Code> = [&a, &b]
        .iter()
        .map(|r| r.as_ref().map_or_else(|e| e.code(), |_| Code::Ok))
        .collect();
    assert!(
        codes.contains(&Code::Ok) && codes.contains(&Code::ResourceExhausted),
        "{codes:?}"
    );
    assert_eq!(s.migrator.calls.lock().unwrap().len(), 1);
    // While one runs, the published status shows the slot taken.
    *s.migrator.delay.lock().unwrap() = Duration::from_secs(2);
    let mut c3 = s.client.clone();
    let running = tokio::spawn(async move {
        c3.migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
            .await
    });
    s.redis
        .wait_for("llumnix:instance_status:src", Duration::from_secs(3), |b| {
            b.map(|b| InstanceStatus::decode(b).unwrap()).filter(|st| {
                st.num_migrate_out_reqs == 1 && st.num_available_migrate_out_slots == 0
            })
        });
    assert!(running.await.unwrap().is_ok());
    s.redis
        .wait_for("llumnix:instance_status:src", Duration::from_secs(3), |b| {
            b.map(|b| InstanceStatus::decode(b).unwrap())
                .filter(|st| st.num_available_migrate_out_slots == 1)
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_timeout_is_deadline_exceeded() {
    let mut s = setup(&[("LLUMLET_RPC_TIMEOUT", "0.3")]).await;
    push_and_wait(&mut s, 1).await;
    *s.migrator.delay.lock().unwrap() = Duration::from_secs(1);
    let e = s
        .client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(e.message().contains("timeout"), "{}", e.message());
    assert_eq!(
        e.message(),
        "Migration failed to complete within the server's timeout of 0.3 seconds."
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_disabled_is_upstreams_behaviour() {
    let mut s = setup(&[("LLUMNIX_ENABLE_MIGRATION", "0")]).await;
    push_and_wait(&mut s, 1).await;
    let e = s
        .client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let r = s
        .client
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(-1))))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.success,
        "pre-stop passes the check but nothing can migrate"
    );
    assert!(s.migrator.calls.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_migrate_in_and_abort_migrate_in() {
    let mut s = setup(&[]).await;
    let r = s
        .client
        .abort(AbortRequests {
            request_ids: vec!["r1".into(), "r2".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    assert_eq!(r.message, "Requests ['r1', 'r2'] aborted.");
    assert_eq!(
        s.engine.aborted.lock().unwrap()[0],
        vec!["r1".to_string(), "r2".to_string()]
    );

    *s.engine.accept_migrate_in.lock().unwrap() = true;
    let req = MigrateInRequest {
        serialized_migrate_req: b"req-bytes".to_vec(),
        serialization_format: "pickle".into(),
    };
    let r = s.client.migrate_in(req.clone()).await.unwrap().into_inner();
    assert!(r.success, "we answer success=true when it worked");
    assert_eq!(r.message, "MigrateIn request processed successfully.");
    *s.engine.accept_migrate_in.lock().unwrap() = false;
    assert!(!s.client.migrate_in(req).await.unwrap().into_inner().success);

    let r = s
        .client
        .abort_migrate_in(AbortMigrateInRequest {
            request_ids: vec!["x".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.success);
    assert_eq!(
        r.message,
        "AbortMigrateIn request processed successfully. requests ids: ['x']"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_failing_every_attempt_is_internal_and_unschedulable() {
    let mut s = setup(&[]).await;
    push_and_wait(&mut s, 3).await;
    *s.engine.fail.lock().unwrap() = true;
    let e = s
        .client
        .abort(AbortRequests {
            request_ids: vec!["r1".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert_eq!(
        e.message(),
        "Failed to abort due to an unexpected server error: Llumlet failed to finish sending Abort request(s)."
    );
    assert_eq!(*s.engine.attempts.lock().unwrap(), 3);
    let st = s
        .redis
        .wait_for("llumnix:instance_status:src", Duration::from_secs(3), |b| {
            b.map(|b| InstanceStatus::decode(b).unwrap())
                .filter(|st| !st.schedulable)
        });
    assert_eq!(st.update_id, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_engine_abort_says_so() {
    let redis = RedisServer::start();
    let env = base_env(&redis, "noeng", free_port());
    let config = Config::from_lookup(&move |k: &str| env.get(k).cloned()).unwrap();
    let agent = Agent::start(
        config,
        Arc::new(llumlet::engine::NoEngine),
        Arc::new(llumlet::migration::rpc::NoMigrator),
        None,
    )
    .await
    .unwrap();
    let mut c = grpc_client(agent.rpc_addr().port(), Duration::from_secs(5)).await;
    let e = c
        .abort(AbortRequests {
            request_ids: vec!["r".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(
        e.message().contains("no engine is attached"),
        "{}",
        e.message()
    );
    // Migration is honest about the missing data plane too.
    c.push_instance_status(InstanceStatus {
        num_total_gpu_tokens: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    redis.wait_for(
        "llumnix:instance_status:noeng",
        Duration::from_secs(5),
        |b| b.map(|_| ()),
    );
    let e = c
        .migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert!(e.message().starts_with(
        "Migration failed due to an unexpected server error: live migration is not available"
    ));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_rpcs_finish_then_deregisters() {
    let mut s = setup(&[]).await;
    push_and_wait(&mut s, 1).await;
    *s.migrator.delay.lock().unwrap() = Duration::from_millis(500);
    let mut c = s.client.clone();
    let call = tokio::spawn(async move {
        c.migrate(migrate("NUM_REQ", Some(MigrationValue::NumReqs(1))))
            .await
    });
    // Wait until the migration is running, then shut down under it.
    while s.migrator.calls.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.agent.take().unwrap().shutdown().await;
    let r = call
        .await
        .unwrap()
        .expect("the in-flight Migrate completes")
        .into_inner();
    assert!(r.success);
    assert_eq!(s.redis.dbsize(), 0, "both keys removed after the drain");
    // And no new calls are accepted.
    let mut c = s.client.clone();
    assert!(c.abort(AbortRequests::default()).await.is_err());
}

/// `PushInstanceStatus` refuses what no engine could report (negative counts, NaN or infinite
/// numbers, id lists beyond the documented bound) with INVALID_ARGUMENT, and the CMS keeps the
/// last good status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_pushed_statuses_are_refused_and_the_last_good_one_stays() {
    let mut s = setup(&[]).await;
    push_and_wait(&mut s, 7).await;
    let bad = [
        InstanceStatus {
            update_id: 8,
            num_running_requests: -3,
            ..Default::default()
        },
        InstanceStatus {
            update_id: 8,
            step_duration: f64::NAN,
            ..Default::default()
        },
        InstanceStatus {
            update_id: 8,
            kv_cache_usage_ratio_migrate_in: f64::INFINITY,
            ..Default::default()
        },
        InstanceStatus {
            update_id: 8,
            // The issue's 389 KB list.
            waiting_requests: (0..20_000).map(|i| format!("req-{i:012}")).collect(),
            ..Default::default()
        },
    ];
    for st in bad {
        let e = s.client.push_instance_status(st).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().len() < 200, "{}", e.message());
    }
    // Several push intervals later the CMS still shows the good status.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = s
        .redis
        .get("llumnix:instance_status:src")
        .map(|b| InstanceStatus::decode(&b[..]).unwrap())
        .unwrap();
    assert_eq!((st.update_id, st.num_running_requests), (7, 0));
    assert!(st.step_duration.is_finite());
}
