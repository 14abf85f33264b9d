//! GPU KV caches (feature `cuda`): whether this llumlet can move them, and the `cuda` transport
//! built from the two engines' IPC handles. Without the feature, or without a GPU and driver,
//! [`available`] says why, and a source whose engine has only GPU regions refuses to start a
//! migration, naming that reason.

use llumlet_dataplane::kv::KvRegion;
use llumlet_dataplane::transport::{ReservedBlocks, Transport};
use llumlet_proto::migration::Region;

/// A GPU region's handle on the wire: the 64 IPC handle bytes in hex.
pub fn handle_text(r: &KvRegion) -> String {
    r.handle.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 64 handle bytes from their hex text.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn handle_bytes(s: &str) -> Result<Vec<u8>, String> {
    if s.len() != 128 || !s.is_ascii() {
        return Err(format!("bad CUDA IPC handle {s:?}"));
    }
    (0..64)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

/// "CUDA driver 12.4, 1 GPU", or why GPU KV caches cannot move.
#[cfg(feature = "cuda")]
pub fn available() -> Result<String, String> {
    llumlet_dataplane::cuda::probe()
        .map(|g| {
            format!(
                "CUDA driver {}.{}, {} GPU(s){}",
                g.driver_version / 1000,
                g.driver_version % 1000 / 10,
                g.devices,
                if g.test_double {
                    " (the test double libcuda: host memory, not a GPU)"
                } else {
                    ""
                }
            )
        })
        .map_err(|e| e.to_string())
}

/// Checks a `--kv host|gpu` option (the demo's and the migration bench's engines): `gpu` needs
/// CUDA here, and says why not.
pub fn check_kv(kv: &str) -> Result<(), String> {
    match kv {
        "host" => Ok(()),
        "gpu" => available()
            .map(|_| ())
            .map_err(|why| format!("--kv gpu: {why}")),
        other => Err(format!("--kv {other:?}: must be host or gpu")),
    }
}

/// Without the feature.
#[cfg(not(feature = "cuda"))]
pub fn available() -> Result<String, String> {
    Err("this llumlet was built without the `cuda` feature".into())
}

/// The source: a transport from this engine's GPU `regions` to the destination's (`dst`, from
/// its `Reserved`), both opened here on GPU 0 (peer access enabled lazily for others).
#[cfg(feature = "cuda")]
pub fn transport(
    regions: &[KvRegion],
    dst: &[Region],
    reserved: ReservedBlocks,
) -> Result<Box<dyn Transport>, String> {
    use llumlet_dataplane::cuda::{CudaTransport, Device, OpenedRegions};
    // The context outlives this migration's Device, so the next migration does not set it up
    // again.
    llumlet_dataplane::cuda::keep_primary_context(0).map_err(|e| e.to_string())?;
    let dev = Device::open(0).map_err(|e| e.to_string())?;
    let src: Vec<_> = regions
        .iter()
        .map(|r| (r.handle.clone(), r.offset, r.num_blocks, r.block_size_bytes))
        .collect();
    let dst = dst
        .iter()
        .map(|r| {
            Ok((
                handle_bytes(&r.handle)?,
                r.offset,
                r.num_blocks,
                r.block_size_bytes,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let s = OpenedRegions::open(&dev, &src).map_err(|e| e.to_string())?;
    let d = OpenedRegions::open(&dev, &dst).map_err(|e| e.to_string())?;
    Ok(Box::new(CudaTransport::new(dev, s, d, reserved)))
}

/// Without the feature.
#[cfg(not(feature = "cuda"))]
pub fn transport(
    _regions: &[KvRegion],
    _dst: &[Region],
    _reserved: ReservedBlocks,
) -> Result<Box<dyn Transport>, String> {
    Err(available().unwrap_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_as_hex_and_bad_ones_are_errors() {
        let r = KvRegion {
            memory: llumlet_dataplane::kv::MemoryKind::CudaIpc,
            layout: llumlet_dataplane::kv::LayoutKind::KvTogether,
            layer: 0,
            offset: 0,
            num_blocks: 1,
            block_size_bytes: 1,
            token_size_bytes: 1,
            handle: (0..64).collect(),
        };
        assert_eq!(handle_bytes(&handle_text(&r)).unwrap(), r.handle);
        assert!(handle_bytes("zz").is_err());
        assert!(handle_bytes(&"g".repeat(128)).is_err());
    }
}
