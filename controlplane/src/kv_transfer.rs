//! `--kv-transfer-config`: the JSON the engine got, given to the llumlet as
//! `LLUMLET_KV_TRANSFER_CONFIG` (WIRE.md, user's guide "KV-transfer-config"). It decides the
//! instance type (from `kv_role`), whether migration is on (HybridConnector backend
//! `kvt+migration`), the transfer port published as `kvt_port`, and the naming directory where
//! instances publish how to reach their transfer endpoint.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::InstanceType;

/// The connector named by `kv_connector`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connector {
    /// `HybridConnector` (blade-kvt).
    Hybrid {
        /// `backend`: `kvt`, or `kvt+migration` (only this one enables migration).
        backend: String,
        /// The directory of `naming_url` (`file:<dir>`).
        naming_dir: PathBuf,
        /// `kvt_inst_id`.
        kvt_inst_id: String,
        /// `rpc_port`: the transfer endpoint's port, published as `kvt_port`.
        rpc_port: u16,
    },
    /// `MooncakeConnector`: the transfer endpoint is the llumlet's own gRPC port.
    Mooncake,
}

/// A parsed kv-transfer-config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvTransferConfig {
    /// The connector.
    pub connector: Connector,
    /// `kv_role` as given.
    pub kv_role: String,
}

impl KvTransferConfig {
    /// Parses the JSON; the error says what is wrong, in one line.
    pub fn parse(json: &str) -> Result<KvTransferConfig, String> {
        let v: Value = serde_json::from_str(json).map_err(|e| format!("is not valid JSON: {e}"))?;
        let obj = v.as_object().ok_or("must be a JSON object")?;
        let text = |o: &serde_json::Map<String, Value>, k: &str| -> Result<String, String> {
            match o.get(k) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(_) => Err(format!("field {k} must be a non-empty string")),
                None => Err(format!("field {k} is required")),
            }
        };
        let kv_role = text(obj, "kv_role")?;
        let connector = match text(obj, "kv_connector")?.as_str() {
            "HybridConnector" => {
                let extra = obj
                    .get("kv_connector_extra_config")
                    .and_then(Value::as_object)
                    .ok_or("HybridConnector needs the object kv_connector_extra_config")?;
                let backend = text(extra, "backend")?;
                if backend != "kvt" && backend != "kvt+migration" {
                    return Err(format!("backend {backend:?} must be kvt or kvt+migration"));
                }
                let naming_url = text(extra, "naming_url")?;
                let dir = naming_url
                    .strip_prefix("file:")
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| format!("naming_url {naming_url:?} must be file:<dir>"))?;
                let rpc_port = match extra.get("rpc_port") {
                    Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
                    Some(Value::Number(n)) => n.as_u64(),
                    _ => None,
                }
                .filter(|p| (1..=65535).contains(p))
                .ok_or("rpc_port must be a port number (1-65535), as a string or a number")?;
                Connector::Hybrid {
                    backend,
                    naming_dir: PathBuf::from(dir),
                    kvt_inst_id: text(extra, "kvt_inst_id")?,
                    rpc_port: rpc_port as u16,
                }
            }
            "MooncakeConnector" => Connector::Mooncake,
            other => {
                return Err(format!(
                    "kv_connector {other:?} must be HybridConnector or MooncakeConnector"
                ))
            }
        };
        Ok(KvTransferConfig { connector, kv_role })
    }

    /// The instance type `kv_role` implies (reference §1.2): producer → prefill, consumer →
    /// decode, both → neutral; the role names of the user's guide are accepted too.
    pub fn instance_type(&self) -> InstanceType {
        match self.kv_role.as_str() {
            "kv_producer" | "prefill" => InstanceType::Prefill,
            "kv_consumer" | "decode" => InstanceType::Decode,
            _ => InstanceType::Neutral,
        }
    }

    /// Whether the connector can migrate (HybridConnector only with `kvt+migration`).
    pub fn migration_capable(&self) -> bool {
        match &self.connector {
            Connector::Hybrid { backend, .. } => backend == "kvt+migration",
            Connector::Mooncake => true,
        }
    }
}

impl KvTransferConfig {
    /// The naming directory (`naming_url` `file:<dir>` of HybridConnector).
    pub fn naming_dir(&self) -> Option<&Path> {
        match &self.connector {
            Connector::Hybrid { naming_dir, .. } => Some(naming_dir),
            Connector::Mooncake => None,
        }
    }
}

/// The naming directory's entry of one instance: how to reach its llumlet's transfer endpoint.
/// `<dir>/llumlet-<instance id, escaped>.json` holding `{"instance_id", "ip", "kvt_port"}`;
/// the connector's own files in that directory are left alone.
pub mod naming {
    use std::path::{Path, PathBuf};

    /// Where instance `id`'s entry lives in `dir`.
    pub fn path(dir: &Path, id: &str) -> PathBuf {
        let mut name = String::from("llumlet-");
        for b in id.bytes() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        name.push_str(".json");
        dir.join(name)
    }

    /// Publishes (replaces atomically) instance `id`'s entry.
    pub fn publish(dir: &Path, id: &str, ip: &str, port: u16) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let p = path(dir, id);
        let body = serde_json::json!({"instance_id": id, "ip": ip, "kvt_port": port}).to_string();
        // Readable by the other instances' llumlets, which may run as other users.
        llumlet_dataplane::mailbox::write_atomic(&p, body.as_bytes(), 0o644)
    }

    /// Removes instance `id`'s entry.
    pub fn withdraw(dir: &Path, id: &str) {
        let _ = std::fs::remove_file(path(dir, id));
    }

    /// Instance `id`'s transfer endpoint, if it published a well-formed entry.
    pub fn lookup(dir: &Path, id: &str) -> Option<(String, u16)> {
        let text = std::fs::read_to_string(path(dir, id)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        if v.get("instance_id")?.as_str()? != id {
            return None;
        }
        let ip = v.get("ip")?.as_str()?.to_string();
        let port = u16::try_from(v.get("kvt_port")?.as_u64()?).ok()?;
        Some((ip, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naming_entries_round_trip_and_bad_ones_are_ignored() {
        let dir = std::env::temp_dir().join(format!("llumlet-naming-{}", std::process::id()));
        let id = "inst/1 with space";
        naming::publish(&dir, id, "10.0.0.7", 29876).unwrap();
        assert_eq!(
            naming::path(&dir, id).file_name().unwrap(),
            "llumlet-inst%2F1%20with%20space.json"
        );
        assert_eq!(naming::lookup(&dir, id), Some(("10.0.0.7".into(), 29876)));
        assert_eq!(naming::lookup(&dir, "other"), None);
        std::fs::write(naming::path(&dir, "bad"), "{not json").unwrap();
        assert_eq!(naming::lookup(&dir, "bad"), None);
        std::fs::write(
            naming::path(&dir, "port"),
            r#"{"instance_id":"port","ip":"x","kvt_port":70000}"#,
        )
        .unwrap();
        assert_eq!(naming::lookup(&dir, "port"), None);
        naming::withdraw(&dir, id);
        assert_eq!(naming::lookup(&dir, id), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn hybrid(backend: &str, role: &str) -> String {
        format!(
            r#"{{"kv_connector": "HybridConnector", "kv_role": "{role}", "kv_connector_extra_config":
               {{"backend": "{backend}", "naming_url": "file:/tmp/naming", "kvt_inst_id": "tag-1", "rpc_port": "29876"}}}}"#
        )
    }

    #[test]
    fn hybrid_and_mooncake() {
        let c = KvTransferConfig::parse(&hybrid("kvt+migration", "kv_consumer")).unwrap();
        assert_eq!(
            c.connector,
            Connector::Hybrid {
                backend: "kvt+migration".into(),
                naming_dir: "/tmp/naming".into(),
                kvt_inst_id: "tag-1".into(),
                rpc_port: 29876
            }
        );
        assert_eq!(c.instance_type(), InstanceType::Decode);
        assert!(c.migration_capable());
        let p = KvTransferConfig::parse(&hybrid("kvt", "kv_producer")).unwrap();
        assert_eq!(p.instance_type(), InstanceType::Prefill);
        assert!(
            !p.migration_capable(),
            "prefill with backend kvt does PD only"
        );
        let m = KvTransferConfig::parse(
            r#"{"kv_connector": "MooncakeConnector", "kv_role": "kv_both", "kv_connector_module_path": "mooncake.mooncake_connector_v1"}"#,
        )
        .unwrap();
        assert_eq!(
            (m.connector, m.kv_role.as_str()),
            (Connector::Mooncake, "kv_both")
        );
    }

    #[test]
    fn malformed_configs_say_what_is_wrong() {
        let cases = [
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"kv_role": "kv_both"}"#, "kv_connector is required"),
            (
                r#"{"kv_connector": "P2pConnector", "kv_role": "kv_both"}"#,
                "must be HybridConnector or MooncakeConnector",
            ),
            (
                r#"{"kv_connector": "HybridConnector", "kv_role": "kv_both"}"#,
                "kv_connector_extra_config",
            ),
        ];
        for (json, want) in cases {
            let e = KvTransferConfig::parse(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
            assert!(!e.contains('\n'));
        }
        let bad_backend = hybrid("rdma", "kv_both");
        assert!(KvTransferConfig::parse(&bad_backend)
            .unwrap_err()
            .contains("kvt or kvt+migration"));
        let bad_url = hybrid("kvt", "kv_both").replace("file:/tmp/naming", "etcd://x");
        assert!(KvTransferConfig::parse(&bad_url)
            .unwrap_err()
            .contains("file:<dir>"));
        let bad_port = hybrid("kvt", "kv_both").replace("\"29876\"", "\"99999\"");
        assert!(KvTransferConfig::parse(&bad_port)
            .unwrap_err()
            .contains("rpc_port"));
        let num_port = hybrid("kvt", "kv_both").replace("\"29876\"", "29876");
        assert!(KvTransferConfig::parse(&num_port).is_ok());
    }
}
