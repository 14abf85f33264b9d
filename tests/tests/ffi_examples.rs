//! The C example (compiled here with the system C compiler) and the Python binding (ctypes) act
//! as engines over the C ABI; a `llumlet` process and a real `redis-server` see their statuses.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use llumlet_proto::cms::InstanceStatus;
use llumlet_tests::*;
use prost::Message;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `target/<profile>`, where cargo put `libllumlet_ffi.so`.
fn lib_dir() -> PathBuf {
    let dir = llumlet_bin().parent().unwrap().to_path_buf();
    assert!(
        dir.join("libllumlet_ffi.so").exists(),
        "libllumlet_ffi.so not in {}: run `cargo build --workspace` first",
        dir.display()
    );
    dir
}

fn status(b: Option<&[u8]>) -> Option<InstanceStatus> {
    b.map(|b| InstanceStatus::decode(b).unwrap())
}

fn llumlet_for(redis: &RedisServer, id: &str, shm: &str, mode: &str) -> LlumletProcess {
    let mut env = base_env(redis, id, free_port());
    env.insert("LLUMLET_ENGINE_SHM".into(), shm.into());
    env.insert("LLUMNIX_UPDATE_INSTANCE_STATUS_MODE".into(), mode.into());
    LlumletProcess::spawn(&env)
}

#[test]
fn c_example_engine_reaches_the_cms() {
    let dir = TempDir::new("cex");
    let exe = dir.0.join("engine");
    let lib = lib_dir();
    let out = Command::new("cc")
        .args([
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-D_POSIX_C_SOURCE=199309L",
            "-I",
        ])
        .arg(repo().join("ffi/include"))
        .arg(repo().join("ffi/examples/engine.c"))
        .arg("-L")
        .arg(&lib)
        .arg("-lllumlet_ffi")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("a C compiler (cc) must be installed");
    assert!(
        out.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let redis = RedisServer::start();
    let shm = format!("llumlet-ctl-test-c-{}", std::process::id());
    // PULL mode: every status the llumlet writes was asked for over the command queue and
    // answered by the C engine (it also publishes each step).
    let _llumlet = llumlet_for(&redis, "c-engine", &shm, "pull");
    let engine = Command::new(&exe)
        .args([shm.as_str(), "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let s = redis.wait_for(
        "llumnix:instance_status:c-engine",
        Duration::from_secs(10),
        |b| status(b).filter(|s| s.update_id > 5),
    );
    assert_eq!(
        (
            s.num_running_requests,
            s.num_waiting_requests,
            s.num_total_gpu_tokens
        ),
        (1, 2, 4096)
    );
    assert_eq!(s.waiting_requests, ["c-req-1", "c-req-2"]);
    assert!(s.schedulable);
    let out = engine.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "engine failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("expected error: engine is NULL"),
        "{stdout}"
    );
    assert!(
        !std::path::Path::new("/dev/shm").join(&shm).exists(),
        "destroy removed the segment"
    );
}

#[test]
fn python_binding_publishes_a_status_that_reaches_the_cms() {
    let lib = lib_dir();
    let redis = RedisServer::start();
    let shm = format!("llumlet-ctl-test-py-{}", std::process::id());
    let _llumlet = llumlet_for(&redis, "py-engine", &shm, "push");
    let py = Command::new("python3")
        .arg(repo().join("ffi/python/publish_example.py"))
        .args([shm.as_str(), "3"])
        .env("PYTHONPATH", repo().join("ffi/python"))
        .env("LLUMLET_FFI_LIB", lib.join("libllumlet_ffi.so"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let s = redis.wait_for(
        "llumnix:instance_status:py-engine",
        Duration::from_secs(10),
        |b| status(b).filter(|s| s.update_id > 3),
    );
    assert_eq!(
        (
            s.num_running_requests,
            s.num_total_gpu_tokens,
            s.num_used_gpu_tokens
        ),
        (7, 8192, 512)
    );
    assert_eq!(s.waiting_requests, ["py-req-1"]);
    let out = py.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("expected error: request id of 64 bytes is longer than 63 bytes"),
        "{stdout}"
    );
}
