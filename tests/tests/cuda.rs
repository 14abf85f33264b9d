//! The CUDA IPC transport. Without a GPU (CI, most machines) the feature still loads nothing it
//! cannot find: `probe` and `Device::open` return "CUDA unavailable" instead of panicking. With
//! a GPU, a child process allocates and exports the KV regions the way an engine does, and this
//! process opens them and copies random runs device to device: the destination's reserved
//! blocks get the source's bytes, nothing else changes, and runs outside the reservation are
//! refused before anything is copied. GPU-only checks print why they skipped.
//!
//! Every check also runs under the test double of the driver (tests/fake-cuda): this binary
//! runs itself again with `LD_LIBRARY_PATH` pointing at it, so the code paths behind a GPU run
//! in CI across real processes (on host memory; no figure from there is a GPU figure).

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};

use llumlet_dataplane::cuda::{probe, CudaError, Device, DeviceRegion, GpuKvCache};
use llumlet_dataplane::rng::SplitMix64;
use llumlet_dataplane::runs::{coalesce, BlockRun};
use llumlet_dataplane::transport::ReservedBlocks;

const LAYERS: u64 = 2;
const BLOCKS: u64 = 64;
const BLOCK: u64 = 64 << 10;
const CHILD: &str = "LLUMLET_CUDA_IPC_CHILD";
/// Set in a rerun of this binary under the test double: its checks must find the double.
const UNDER_FAKE: &str = "LLUMLET_CUDA_UNDER_FAKE";

/// Runs test `name` of this binary again under the test double, with `env`; its output.
fn rerun_under_fake(name: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(UNDER_FAKE, "1")
        .env_remove(CHILD);
    llumlet_tests::with_fake_cuda(&mut cmd);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1 passed"),
        "{name} under the test double:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether a GPU (or, in a rerun under the double, the double) is there; panics if a rerun
/// under the double did not get it.
fn gpu_or_skip() -> bool {
    match probe() {
        Ok(g) => {
            assert_eq!(
                g.test_double,
                std::env::var(UNDER_FAKE).is_ok(),
                "the double is loaded exactly in the reruns under it"
            );
            true
        }
        Err(e) => {
            assert!(
                std::env::var(UNDER_FAKE).is_err(),
                "the double did not load: {e}"
            );
            eprintln!("skipped (no GPU): {e}");
            false
        }
    }
}

fn pattern(buf: u8, layer: u64, block: u64) -> Vec<u8> {
    let mut rng = SplitMix64(u64::from(buf) << 40 | layer << 20 | block);
    (0..BLOCK / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect()
}

#[test]
fn without_a_gpu_cuda_is_reported_unavailable_and_nothing_panics() {
    match probe() {
        Ok(gpu) => {
            eprintln!("a GPU is present ({gpu:?}): the unavailable path is not exercised here")
        }
        Err(e) => {
            assert!(matches!(e, CudaError::Unavailable(_)), "{e}");
            assert!(e.to_string().starts_with("CUDA unavailable: "), "{e}");
            if let Ok(want) = std::env::var("LLUMLET_CUDA_EXPECT_UNAVAILABLE") {
                assert!(e.to_string().contains(&want), "{e}");
            }
            let open = Device::open(0).err().expect("no device without CUDA");
            assert!(matches!(open, CudaError::Unavailable(_)), "{open}");
            let cache = GpuKvCache::create(0, 1, 1, 64, 64).err().expect("no cache");
            assert!(matches!(cache, CudaError::Unavailable(_)), "{cache}");
        }
    }
}

/// A driver that loads but has no device is "unavailable" too, naming that.
#[test]
fn a_driver_without_devices_is_unavailable() {
    if std::env::var(UNDER_FAKE).is_ok() {
        return;
    }
    rerun_under_fake(
        "without_a_gpu_cuda_is_reported_unavailable_and_nothing_panics",
        &[
            ("LLUMLET_FAKE_CUDA_DEVICES", "0"),
            ("LLUMLET_CUDA_EXPECT_UNAVAILABLE", "no CUDA device"),
        ],
    );
}

#[test]
fn copies_under_the_test_double() {
    if std::env::var(UNDER_FAKE).is_ok() {
        return;
    }
    rerun_under_fake("gpu_runs_copy_between_processes_over_cuda_ipc", &[]);
    rerun_under_fake(
        "a_gpu_kv_cache_holds_token_spans_and_exports_one_handle",
        &[],
    );
    rerun_under_fake("an_exporter_gone_or_a_foreign_handle_is_an_error", &[]);
}

/// The engine's GPU KV cache: zeroed, token spans written and read back per layer and block,
/// spans outside a block refused, every layer's region naming the one allocation's handle.
#[test]
fn a_gpu_kv_cache_holds_token_spans_and_exports_one_handle() {
    if !gpu_or_skip() {
        return;
    }
    let (layers, blocks, bsb, tsb) = (3u32, 8u64, 4096u64, 256u64);
    let kv = GpuKvCache::create(0, layers, blocks, bsb, tsb).unwrap();
    let mut got = vec![1u8; bsb as usize];
    kv.read_tokens(2, 7, 0, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0), "a new cache is zeroed");
    let data: Vec<u8> = (0..3 * tsb).map(|i| (i % 251) as u8).collect();
    kv.write_tokens(1, 5, 13, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    kv.read_tokens(1, 5, 13, &mut back).unwrap();
    assert_eq!(back, data);
    for (layer, block, slot, n) in [(1, 5, 14, 3), (3, 0, 0, 1), (0, 8, 0, 1)] {
        let err = kv
            .write_tokens(layer, block, slot, &vec![0u8; (n * tsb) as usize])
            .unwrap_err();
        assert!(matches!(err, CudaError::Invalid(_)), "{err}");
    }
    assert!(
        kv.write_tokens(0, 0, 0, &[0u8; 10]).is_err(),
        "not whole slots"
    );
    let regions = kv.regions().unwrap();
    assert_eq!(regions.len(), layers as usize);
    for (l, r) in regions.iter().enumerate() {
        assert_eq!(r.memory, llumlet_dataplane::kv::MemoryKind::CudaIpc);
        assert_eq!(r.handle, regions[0].handle, "one allocation");
        assert_eq!(r.offset, l as u64 * blocks * bsb);
        assert_eq!(
            (r.num_blocks, r.block_size_bytes, r.token_size_bytes),
            (blocks, bsb, tsb)
        );
    }
}

/// Opening a handle whose exporter has exited, or bytes that are no handle, is an error
/// naming the call; nothing panics.
#[test]
fn an_exporter_gone_or_a_foreign_handle_is_an_error() {
    if !gpu_or_skip() {
        return;
    }
    let dev = Device::open(0).unwrap();
    let err = dev.open_ipc(&[7u8; 64], 4096).err().expect("not a handle");
    assert!(
        err.to_string().starts_with("cuIpcOpenMemHandle_v2: "),
        "{err}"
    );
    assert!(dev.open_ipc(&[0u8; 12], 4096).is_err(), "a short handle");
    let mut child = exporter();
    let handles = read_handles(&mut child);
    writeln!(child.stdin.take().unwrap()).unwrap();
    assert!(child.wait().unwrap().success());
    let err = dev
        .open_ipc(&handles[0], LAYERS * BLOCKS * BLOCK)
        .err()
        .expect("the exporter is gone");
    assert!(
        err.to_string().starts_with("cuIpcOpenMemHandle_v2: "),
        "{err}"
    );
}

/// The exporting process (an engine's role): two allocations (source and destination KV
/// caches), the source filled, handles printed; waits for a line on stdin, then exits.
#[test]
fn child_exports_kv_regions() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    let dev = Device::open(0).unwrap();
    let bytes = (LAYERS * BLOCKS * BLOCK) as usize;
    let src = dev.alloc(bytes).unwrap();
    let dst = dev.alloc(bytes).unwrap();
    for l in 0..LAYERS {
        for b in 0..BLOCKS {
            let off = ((l * BLOCKS + b) * BLOCK) as usize;
            src.write(off, &pattern(1, l, b)).unwrap();
            dst.write(off, &vec![0u8; BLOCK as usize]).unwrap();
        }
    }
    // Host-to-device copies may return before the bytes land: another process reads them.
    dev.synchronize().unwrap();
    let hex = |h: [u8; 64]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    println!(
        "HANDLES {} {}",
        hex(src.ipc_handle().unwrap()),
        hex(dst.ipc_handle().unwrap())
    );
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
}

/// The exporting child (see `child_exports_kv_regions`).
fn exporter() -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_exports_kv_regions",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The two handles the exporting child prints. The rest of its output is drained on a thread
/// (so it can write it and exit).
fn read_handles(child: &mut std::process::Child) -> Vec<Vec<u8>> {
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut handles = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        // The test harness prints "test child_exports_kv_regions ... " on the same line.
        if let Some(rest) = line.split_once("HANDLES ").map(|(_, h)| h.trim()) {
            handles = rest
                .split(' ')
                .map(|h| llumlet::migration::cuda_side::handle_bytes(h).unwrap())
                .collect();
            break;
        }
        line.clear();
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    assert_eq!(handles.len(), 2, "the child exported its regions");
    handles
}

#[test]
fn gpu_runs_copy_between_processes_over_cuda_ipc() {
    if !gpu_or_skip() {
        return;
    }
    let mut child = exporter();
    let handles = read_handles(&mut child);
    let mut dev = Device::open(0).unwrap();
    let len = LAYERS * BLOCKS * BLOCK;
    let src = dev.open_ipc(&handles[0], len).unwrap();
    let dst = dev.open_ipc(&handles[1], len).unwrap();
    let regions = |m: &llumlet_dataplane::cuda::IpcMapping| -> Vec<DeviceRegion> {
        (0..LAYERS)
            .map(|l| m.region(l * BLOCKS * BLOCK, BLOCKS, BLOCK).unwrap())
            .collect()
    };
    let (s, d) = (regions(&src), regions(&dst));
    // A request of 24 blocks at scattered source blocks into scattered reserved blocks.
    let mut rng = SplitMix64(7);
    let mut pool: Vec<u32> = (0..BLOCKS as u32).collect();
    let mut pick = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| pool.swap_remove((rng.next_u64() % pool.len() as u64) as usize))
            .collect()
    };
    let s_blocks = pick(24);
    let d_blocks: Vec<u32> = (0..24).map(|i| (i * 2) as u32).collect();
    let mut runs = Vec::new();
    coalesce(&s_blocks, &d_blocks, 0..24, &mut runs);
    // Outside the reservation: refused, nothing copied.
    let bad = [BlockRun {
        src: 0,
        dst: 63,
        len: 1,
    }];
    let err = dev
        .copy_runs(&s, &d, &ReservedBlocks::new(&d_blocks), &bad)
        .unwrap_err();
    assert!(err.to_string().contains("outside the reservation"), "{err}");
    let bytes = dev
        .copy_runs(&s, &d, &ReservedBlocks::new(&d_blocks), &runs)
        .unwrap();
    assert_eq!(bytes, 24 * BLOCK * LAYERS);
    let mut got = vec![0u8; BLOCK as usize];
    for l in 0..LAYERS {
        for b in 0..BLOCKS {
            dst.read(((l * BLOCKS + b) * BLOCK) as usize, &mut got)
                .unwrap();
            match d_blocks.iter().position(|&x| u64::from(x) == b) {
                Some(p) => assert!(
                    got == pattern(1, l, u64::from(s_blocks[p])),
                    "layer {l} block {b}: the source's bytes"
                ),
                None => assert!(got.iter().all(|&x| x == 0), "block {b} untouched"),
            }
        }
    }
    drop((src, dst));
    writeln!(child.stdin.take().unwrap()).unwrap();
    assert!(child.wait().unwrap().success());
}
