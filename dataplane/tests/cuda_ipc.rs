//! The CUDA IPC transport. Without a GPU (CI, most machines) the feature still loads nothing it
//! cannot find: `probe` and `Device::open` return "CUDA unavailable" instead of panicking. With
//! a GPU, a child process allocates and exports the KV regions the way an engine does, and this
//! process opens them and copies random runs device to device: the destination's reserved
//! blocks get the source's bytes, nothing else changes, and runs outside the reservation are
//! refused before anything is copied. GPU-only checks print why they skipped.
#![cfg(feature = "cuda")]

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};

use llumlet_dataplane::cuda::{probe, CudaError, Device, DeviceRegion};
use llumlet_dataplane::runs::{coalesce, BlockRun};
use llumlet_dataplane::sim::SplitMix64;
use llumlet_dataplane::transport::Reserved;

const LAYERS: u64 = 2;
const BLOCKS: u64 = 64;
const BLOCK: u64 = 64 << 10;
const CHILD: &str = "LLUMLET_CUDA_IPC_CHILD";

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
            let open = Device::open(0).err().expect("no device without CUDA");
            assert!(matches!(open, CudaError::Unavailable(_)), "{open}");
        }
    }
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

#[test]
fn gpu_runs_copy_between_processes_over_cuda_ipc() {
    if let Err(e) = probe() {
        eprintln!("skipped (no GPU): {e}");
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
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
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut handles = Vec::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        if let Some(rest) = line.trim().strip_prefix("HANDLES ") {
            handles = rest
                .split(' ')
                .map(|h| {
                    (0..64)
                        .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                        .collect::<Vec<u8>>()
                })
                .collect();
            break;
        }
        line.clear();
    }
    assert_eq!(handles.len(), 2, "the child exported its regions");
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
        .copy_runs(&s, &d, &Reserved::new(&d_blocks), &bad)
        .unwrap_err();
    assert!(err.to_string().contains("outside the reservation"), "{err}");
    let bytes = dev
        .copy_runs(&s, &d, &Reserved::new(&d_blocks), &runs)
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
