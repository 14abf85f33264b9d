//! Tests across the rooms: both sides of the driver with an engine whose KV cache is only on the
//! GPU.

use std::sync::Arc;

use llumlet_dataplane::kv::{KvRegion, LayoutKind, MemoryKind};
use llumlet_dataplane::segment::ControlSegment;
use llumlet_proto::migration::{Begin, Region};

use super::auth::TransferKey;
use super::endpoint::{EndpointConfig, TransferServer};
use super::link::EngineLink;
use super::reason::Refusal;
use super::source::source_regions;
use super::wire::{host_identity, region_msg, regions_of};
use llumlet_dataplane::endpoint::EngineEndpoint;
use llumlet_dataplane::segment::Attach;

fn gpu_only_engine(tag: &str) -> (EngineEndpoint, std::path::PathBuf) {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/llumlet-ctl-unit-gpu-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    let e = EngineEndpoint::create_at(&path).unwrap();
    for layer in 0..2 {
        e.register_kv_region(&KvRegion {
            memory: MemoryKind::CudaIpc,
            layout: LayoutKind::KvTogether,
            layer,
            offset: u64::from(layer) * 4096 * 16,
            num_blocks: 16,
            block_size_bytes: 4096,
            token_size_bytes: 256,
            handle: vec![7; 64],
        })
        .unwrap();
    }
    (e, path)
}

/// An engine whose KV cache is only on the GPU: the source takes the `cuda` path where
/// CUDA works, and otherwise refuses before asking anything of anyone, saying why (on this
/// machine without a GPU: no driver, or built without the feature).
#[test]
fn a_gpu_only_kv_cache_takes_the_cuda_path_or_is_refused_with_the_reason() {
    let (e, path) = gpu_only_engine("src");
    match super::cuda_side::available() {
        Ok(_) => {
            let (regions, maps, on_gpu) = source_regions(e.segment()).unwrap();
            assert!(on_gpu && maps.is_empty() && regions.len() == 2);
            assert_eq!(region_msg(&regions[0]).handle, "07".repeat(64));
        }
        Err(why) => {
            let err = source_regions(e.segment()).err().unwrap();
            assert!(
                err.starts_with("the engine's KV cache is on the GPU and ") && err.contains(&why),
                "{err}"
            );
        }
    }
    drop(e);
    let _ = std::fs::remove_file(path);
}

/// A destination offers its GPU regions (handles in hex) only to a source on its host.
#[test]
fn a_destination_offers_gpu_regions_only_on_the_same_host() {
    let (e, path) = gpu_only_engine("dst");
    let Attach::Ready(seg) = ControlSegment::attach(&path).unwrap() else {
        panic!("attach")
    };
    let seg = Arc::new(seg);
    let link = EngineLink::new(path.clone());
    let (server, _) = TransferServer::start(
        link,
        "127.0.0.1:0".parse().unwrap(),
        EndpointConfig::with_key(TransferKey::from_bytes(b"0123456789abcdef")),
    )
    .unwrap();
    let regions: Vec<Region> = regions_of(&seg, MemoryKind::CudaIpc)
        .unwrap()
        .iter()
        .map(region_msg)
        .collect();
    let mut b = Begin {
        request_id: "r".into(),
        transport: "cuda".into(),
        host: host_identity(),
        regions,
        ..Default::default()
    };
    let (maps, offered) = server.verdict(&b, Some(&seg)).unwrap();
    assert!(maps.is_empty());
    assert_eq!(offered.len(), 2);
    b.host = "another-host".into();
    let err = server.verdict(&b, Some(&seg)).err().unwrap();
    assert_eq!(err, Refusal::GpuAcrossHosts);
    b.host = host_identity();
    b.regions.pop();
    assert!(
        server.verdict(&b, Some(&seg)).is_err(),
        "layouts must match"
    );
    drop(e);
    let _ = std::fs::remove_file(path);
}
