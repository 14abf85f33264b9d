//! Wire-compatible Llumnix protobuf messages and the `llumlet.Llumlet` gRPC service.
//!
//! `cms` holds the values written into the CMS (Redis); `llumlet` the gRPC service the Llumnix
//! scheduler calls. Both are generated at build time from `cms.proto` and `llumlet_server.proto`
//! in this directory, whose field names and numbers are fixed by the Llumnix wire contract.
#![forbid(unsafe_code)]

/// Package `cms`: `InstanceMetadata` and `InstanceStatus`.
pub mod cms {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("cms");
}

/// Package `llumlet`: the `Llumlet` service, its requests and responses.
pub mod llumlet {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("llumlet");
}

/// Package `llumlet.migration`: our own llumlet-to-llumlet live-migration messages.
pub mod migration {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("llumlet.migration");
}

/// Redis key prefix of an instance's metadata (`llumnix:instance_metadata:<instance_id>`).
pub const METADATA_KEY_PREFIX: &str = "llumnix:instance_metadata:";
/// Redis key prefix of an instance's status (`llumnix:instance_status:<instance_id>`).
pub const STATUS_KEY_PREFIX: &str = "llumnix:instance_status:";

/// The CMS key of an instance's metadata.
pub fn metadata_key(instance_id: &str) -> String {
    format!("{METADATA_KEY_PREFIX}{instance_id}")
}

/// The CMS key of an instance's status.
pub fn status_key(instance_id: &str) -> String {
    format!("{STATUS_KEY_PREFIX}{instance_id}")
}
