//! The Python client of the user's guide (stubs generated from `proto/` by grpcio-tools) against
//! the `llumlet` binary, and the CMS bytes decoded by the Python `cms_pb2`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use llumlet_proto::cms::InstanceStatus;
use llumlet_tests::*;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/guide_client.py")
}

fn python(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .expect("python3 must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guide_client_calls_migrate_and_python_decodes_the_cms() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut env = base_env(&redis, "engine_01", port);
    env.insert("LLUMNIX_USED_METRICS".into(), "all".into());
    let _p = LlumletProcess::spawn(&env);
    redis.wait_for(
        "llumnix:instance_metadata:engine_01",
        Duration::from_secs(10),
        |b| b.map(|_| ()),
    );

    // Before any status there is no free slot: the upstream NotEnoughSlots outcome.
    let out =
        tokio::task::spawn_blocking(move || python(&["migrate", "127.0.0.1", &port.to_string()]))
            .await
            .unwrap();
    assert_eq!(
        out.trim(),
        "RPC Failed: StatusCode.RESOURCE_EXHAUSTED - No enough migrate out slots for requests"
    );

    let mut client = grpc_client(port, Duration::from_secs(5)).await;
    let pushed = InstanceStatus {
        update_id: 9,
        num_total_gpu_tokens: 4096,
        num_running_requests: 2,
        waiting_requests: vec!["req-1".into()],
        ..Default::default()
    };
    client.push_instance_status(pushed).await.unwrap();
    let bytes = redis.wait_for(
        "llumnix:instance_status:engine_01",
        Duration::from_secs(5),
        |b| b.map(<[u8]>::to_vec),
    );

    // With a slot free, the call reaches the migrator; with no engine attached it cannot
    // migrate and says so rather than pretending.
    let out =
        tokio::task::spawn_blocking(move || python(&["migrate", "127.0.0.1", &port.to_string()]))
            .await
            .unwrap();
    assert!(
        out.trim().starts_with("RPC Failed: StatusCode.INTERNAL - Migration failed due to an unexpected server error: no engine attached to this llumlet"),
        "{out}"
    );

    let dir = TempDir::new("py");
    let status_file = dir.0.join("status.bin");
    std::fs::write(&status_file, &bytes).unwrap();
    let json = python(&["decode-status", status_file.to_str().unwrap()]);
    for field in [
        "\"instance_id\": \"engine_01\"",
        "\"schedulable\": true",
        "\"update_id\": 9",
        "\"num_total_gpu_tokens\": 4096",
        "\"waiting_requests\": [\"req-1\"]",
        "\"num_available_migrate_out_slots\": 1",
    ] {
        assert!(json.contains(field), "{field} missing in {json}");
    }
    let meta = redis.get("llumnix:instance_metadata:engine_01").unwrap();
    let meta_file = dir.0.join("meta.bin");
    std::fs::write(&meta_file, &meta).unwrap();
    let json = python(&["decode-metadata", meta_file.to_str().unwrap()]);
    assert!(json.contains("\"instance_id\": \"engine_01\""), "{json}");
    assert!(
        json.contains(&format!("\"llumlet_port\": {port}")),
        "{json}"
    );
    assert!(json.contains("\"instance_type\": \"neutral\""), "{json}");
}
