//! Which transport a migration's KV blocks take: what the source asks for in `Begin`, and what
//! the destination answers in `Reserved`. Pure functions over the facts each side knows, so the
//! rule lives in one place and is tested over every combination.
//!
//! - A GPU KV cache moves device to device over CUDA IPC (`cuda`; the destination refuses a
//!   source from another host).
//! - `shm` where both ends share a host (same boot id); asked for by `auto` and `shm`.
//! - `ucx` where the source asks for it (`ucx`), or welcomes it (`auto`, a llumlet with UCX) and
//!   shared memory is out; taken only when the destination could offer it.
//! - `tcp` otherwise: every llumlet serves it, so it is also what an unknown name means.

use crate::config::TransportChoice;

/// A transport KV blocks move over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Both engines' host KV caches mapped into the source llumlet (one host).
    Shm,
    /// Data frames on the transfer connection.
    Tcp,
    /// UCX RMA (RDMA, or UCX's shared memory and TCP).
    Ucx,
    /// CUDA IPC handles, device to device (one host).
    Cuda,
}

impl Transport {
    /// Its name on the wire (`Begin.transport`, `Reserved.transport`), in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Shm => "shm",
            Transport::Tcp => "tcp",
            Transport::Ucx => "ucx",
            Transport::Cuda => "cuda",
        }
    }

    /// Parses the wire's name; `None` for a name this llumlet does not know.
    pub fn parse(name: &str) -> Option<Transport> {
        match name {
            "shm" => Some(Transport::Shm),
            "tcp" => Some(Transport::Tcp),
            "ucx" => Some(Transport::Ucx),
            "cuda" => Some(Transport::Cuda),
            _ => None,
        }
    }

    /// The wire's name as this llumlet acts on it: an unknown name is `tcp`, which every
    /// llumlet serves.
    pub fn from_wire(name: &str) -> Transport {
        Transport::parse(name).unwrap_or(Transport::Tcp)
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a source asks for in `Begin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// `Begin.transport`.
    pub transport: Transport,
    /// `Begin.ucx`: the source would take `ucx` where `shm` is out.
    pub ucx_welcome: bool,
}

/// The source's ask, from the configured choice, where its KV cache lives, and whether this
/// llumlet has UCX.
pub fn ask(choice: TransportChoice, kv_on_gpu: bool, have_ucx: bool) -> Ask {
    let transport = match choice {
        _ if kv_on_gpu => Transport::Cuda,
        TransportChoice::Tcp => Transport::Tcp,
        TransportChoice::Ucx if have_ucx => Transport::Ucx,
        TransportChoice::Ucx => Transport::Tcp,
        TransportChoice::Shm | TransportChoice::Auto => Transport::Shm,
    };
    Ask {
        transport,
        ucx_welcome: have_ucx && choice == TransportChoice::Auto && !kv_on_gpu,
    }
}

/// Whether the destination should try to offer UCX for this ask (`same_host`: the source's host
/// identity is this host's).
pub fn wants_ucx(ask: Ask, same_host: bool) -> bool {
    ask.transport == Transport::Ucx || (ask.ucx_welcome && !shm_fits(ask, same_host))
}

fn shm_fits(ask: Ask, same_host: bool) -> bool {
    ask.transport == Transport::Shm && same_host
}

/// The destination's answer (`Reserved.transport`): `ucx_offered` says whether it could offer
/// UCX (its worker and registered regions) after [`wants_ucx`].
pub fn negotiate(ask: Ask, same_host: bool, ucx_offered: bool) -> Transport {
    if ask.transport == Transport::Cuda {
        Transport::Cuda
    } else if shm_fits(ask, same_host) {
        Transport::Shm
    } else if ucx_offered {
        Transport::Ucx
    } else {
        Transport::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHOICES: [TransportChoice; 4] = [
        TransportChoice::Auto,
        TransportChoice::Shm,
        TransportChoice::Tcp,
        TransportChoice::Ucx,
    ];

    /// Both sides over every combination: the transport a migration ends up on.
    fn settle(
        choice: TransportChoice,
        gpu: bool,
        src_ucx: bool,
        dst_ucx: bool,
        same: bool,
    ) -> Transport {
        let a = ask(choice, gpu, src_ucx);
        let offered = dst_ucx && wants_ucx(a, same);
        negotiate(a, same, offered)
    }

    #[test]
    fn names_round_trip_and_an_unknown_name_is_tcp() {
        for t in [
            Transport::Shm,
            Transport::Tcp,
            Transport::Ucx,
            Transport::Cuda,
        ] {
            assert_eq!(Transport::parse(t.name()), Some(t));
            assert_eq!(t.to_string(), t.name());
        }
        assert_eq!(Transport::parse("rdma"), None);
        assert_eq!(Transport::from_wire("rdma"), Transport::Tcp);
        assert_eq!(Transport::from_wire(""), Transport::Tcp);
    }

    #[test]
    fn a_gpu_cache_always_moves_over_cuda() {
        for choice in CHOICES {
            for (su, du, same) in [
                (false, false, true),
                (true, true, true),
                (true, true, false),
            ] {
                assert_eq!(
                    settle(choice, true, su, du, same),
                    Transport::Cuda,
                    "{choice:?}"
                );
                assert!(!ask(choice, true, su).ucx_welcome);
            }
        }
    }

    #[test]
    fn host_caches_take_shm_on_one_host_ucx_where_both_have_it_and_tcp_otherwise() {
        use Transport as T;
        use TransportChoice::*;
        // (choice, source has UCX, destination has UCX, same host) -> transport
        let table = [
            (Auto, false, false, true, T::Shm),
            (Auto, true, true, true, T::Shm),
            (Auto, false, false, false, T::Tcp),
            (Auto, true, false, false, T::Tcp),
            (Auto, false, true, false, T::Tcp),
            (Auto, true, true, false, T::Ucx),
            (Shm, true, true, true, T::Shm),
            (Shm, true, true, false, T::Tcp),
            (Shm, false, false, false, T::Tcp),
            (Tcp, true, true, true, T::Tcp),
            (Tcp, true, true, false, T::Tcp),
            (Ucx, true, true, true, T::Ucx),
            (Ucx, true, true, false, T::Ucx),
            (Ucx, true, false, true, T::Tcp),
            (Ucx, false, true, true, T::Tcp),
            (Ucx, false, false, false, T::Tcp),
        ];
        for (choice, su, du, same, want) in table {
            assert_eq!(
                settle(choice, false, su, du, same),
                want,
                "{choice:?} src_ucx={su} dst_ucx={du} same_host={same}"
            );
        }
    }

    #[test]
    fn only_auto_with_ucx_welcomes_ucx() {
        for choice in CHOICES {
            for have in [false, true] {
                assert_eq!(
                    ask(choice, false, have).ucx_welcome,
                    have && choice == TransportChoice::Auto
                );
            }
        }
    }
}
