//! This llumlet's UCX side (feature `ucx`): one context, worker and registry, used by the
//! destination to describe its registered regions in `Reserved` and by the source to build
//! a [`UcxTransport`] from that answer. Without the feature the type is uninhabited: nothing
//! can create one, and every migration uses `shm` or `tcp`.

#[cfg(feature = "ucx")]
mod imp {
    use std::sync::Arc;
    use std::time::Duration;

    use llumlet_dataplane::kv::KvRegion;
    use llumlet_dataplane::transport::{ReservedBlocks, Transport};
    use llumlet_dataplane::ucx::{self, Context, Node, Registry, RemoteRegion, UcxTransport};
    use llumlet_proto::migration::{Reserved, UcxRegion};

    /// One per llumlet.
    pub struct UcxSide {
        node: Node,
        registry: Registry,
        rdma: bool,
    }

    impl UcxSide {
        /// Creates the context (UCX's `UCX_*` environment applies) and starts the worker.
        pub fn start() -> Result<Arc<UcxSide>, String> {
            let ctx = Context::new().map_err(|e| e.to_string())?;
            let node = Node::start(&ctx).map_err(|e| e.to_string())?;
            Ok(Arc::new(UcxSide {
                node,
                registry: Registry::new(ctx),
                rdma: super::host_has_rdma(),
            }))
        }

        /// Whether this host has an RDMA device, for UCX's verbs transports: without one UCX
        /// emulates its puts over TCP, and `auto` leaves it out (see [`super::host_has_rdma`]).
        pub fn rdma(&self) -> bool {
            self.rdma
        }

        /// "UCX 1.13.1, UCX_TLS=all" for the start-up log.
        pub fn describe(&self) -> String {
            format!(
                "UCX {}, UCX_TLS={}",
                ucx::version(),
                self.node.context().transports()
            )
        }

        /// The destination: this worker's address and its regions, registered (once each).
        pub fn offer(&self, regions: &[KvRegion]) -> Result<(Vec<u8>, Vec<UcxRegion>), String> {
            let mut out = Vec::with_capacity(regions.len());
            for r in regions {
                let g = self.registry.get(r).map_err(|e| e.to_string())?;
                out.push(UcxRegion {
                    address: g.address(),
                    num_blocks: r.num_blocks,
                    block_size_bytes: r.block_size_bytes,
                    rkey: g.rkey().to_vec(),
                });
            }
            Ok((self.node.address().to_vec(), out))
        }

        /// The source: a transport putting this engine's `regions` into the destination's
        /// regions described in `r`.
        pub fn transport(
            &self,
            r: &Reserved,
            regions: &[KvRegion],
            reserved: ReservedBlocks,
            timeout: Duration,
        ) -> Result<Box<dyn Transport>, String> {
            if r.ucx_regions.len() != regions.len() {
                return Err(format!(
                    "the destination offered {} UCX regions for {} source regions",
                    r.ucx_regions.len(),
                    regions.len()
                ));
            }
            let src = regions
                .iter()
                .map(|g| self.registry.get(g).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            let remote: Vec<RemoteRegion> = r
                .ucx_regions
                .iter()
                .map(|u| RemoteRegion {
                    address: u.address,
                    num_blocks: u.num_blocks,
                    block_size_bytes: u.block_size_bytes,
                    rkey: u.rkey.clone(),
                })
                .collect();
            let conn = self
                .node
                .connect(&r.ucx_worker, &remote)
                .map_err(|e| e.to_string())?;
            if !conn.detects_peer_failure() {
                tracing::debug!("UCX path without peer-failure detection (shared memory): completion bounded by the step timeout");
            }
            Ok(Box::new(UcxTransport::new(conn, src, reserved, timeout)))
        }
    }
}

#[cfg(feature = "ucx")]
pub use imp::UcxSide;

/// Without the `ucx` feature: no value exists.
#[cfg(not(feature = "ucx"))]
pub enum UcxSide {}

#[cfg(not(feature = "ucx"))]
impl UcxSide {
    /// Always fails: built without UCX.
    pub fn start() -> Result<std::sync::Arc<UcxSide>, String> {
        Err("this llumlet was built without the `ucx` feature".into())
    }

    /// Unreachable.
    pub fn describe(&self) -> String {
        match *self {}
    }

    /// Unreachable.
    pub fn rdma(&self) -> bool {
        match *self {}
    }

    /// Unreachable.
    pub fn offer(
        &self,
        _regions: &[llumlet_dataplane::kv::KvRegion],
    ) -> Result<(Vec<u8>, Vec<llumlet_proto::migration::UcxRegion>), String> {
        match *self {}
    }

    /// Unreachable.
    pub fn transport(
        &self,
        _r: &llumlet_proto::migration::Reserved,
        _regions: &[llumlet_dataplane::kv::KvRegion],
        _reserved: llumlet_dataplane::transport::ReservedBlocks,
        _timeout: std::time::Duration,
    ) -> Result<Box<dyn llumlet_dataplane::transport::Transport>, String> {
        match *self {}
    }
}

/// Whether this host has an RDMA device (an entry in /sys/class/infiniband: InfiniBand or
/// RoCE). Without one UCX moves puts over its TCP transport by software emulation: about a
/// third of the `tcp` transport's throughput on the same link (docs/BENCHMARKS.md), and UCX
/// 1.13 aborts the process when such a put arrives for an endpoint that timed out during a
/// network partition (docs/RELIABILITY.md). So `auto` asks for UCX only where there is RDMA.
pub fn host_has_rdma() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}
