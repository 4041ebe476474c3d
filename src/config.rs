//! Layered configuration: built-in defaults < a TOML file < `STORM_*` environment variables
//! (nested keys joined with `__`, e.g. `STORM_RETRY__ATTEMPTS=5`).
//!
//! A wrong value stops the daemon at start with a message that names the key and where the
//! value came from: the file (with its path) or the environment variable.

use crate::auth::Keyring;
use crate::driver::DriveOptions;
use crate::link::RetryPolicy;
use crate::manager::{Detection, ManagerConfig};
use crate::wire::{Placement, Routing};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Manager,
    Peer,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Peer => "peer",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First retransmission after this many milliseconds; doubled each time.
    pub initial_ms: u64,
    pub max_ms: u64,
    /// Attempts in all before giving up (registration retries forever).
    pub attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint, e.g. `http://jaeger:4317`. Empty: `OTEL_EXPORTER_OTLP_ENDPOINT`, or
    /// no export at all.
    pub otlp_endpoint: String,
    /// Empty: `OTEL_SERVICE_NAME`, or `stormd-<role>`.
    pub service_name: String,
    /// The Jaeger UI, for printing trace links (e.g. `http://localhost:16686`).
    pub jaeger_ui: String,
    /// Log filter (`RUST_LOG` syntax); `RUST_LOG` itself wins when set.
    pub log: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub role: Role,
    /// A peer's name, unique in the cluster. Empty: the host name.
    pub name: String,
    /// UDP `host:port` to bind; port 0 picks a free port.
    pub listen: String,
    /// The manager's UDP `host:port` (peers).
    pub manager: String,
    /// The CSV that `distribute` loads when the client names none (manager).
    pub data: String,
    pub placement: Placement,
    /// How queries travel the ring: `walk` (next by next) or `fingers` (Chord, O(log n) hops).
    pub routing: Routing,
    /// Tokens per peer on the hash ring (virtual nodes, 1..=256; manager).
    pub vnodes: u32,
    /// Place tokens where the rows are (manager): the first distribute onto a fresh ring
    /// counts the file's keys first and cuts the ring into equal numbers of rows, and joins
    /// and leaves weigh shares by the rows distributed. Off: by key space alone.
    pub balance_by_data: bool,
    /// Largest datagram sent, in bytes (batches are cut to fit).
    pub max_datagram: usize,
    /// Store batches in flight per peer.
    pub window: usize,
    /// Socket receive and send buffer sizes requested from the kernel.
    pub socket_buffer: usize,
    pub query_timeout_ms: u64,
    pub probe_timeout_ms: u64,
    /// How often the manager runs a repair on its own (compares the holders of every range,
    /// has diverged ones copied: `stormctl repair`); 0: only when asked.
    pub repair_interval_ms: u64,
    /// Copies of every record (manager): its owner and the next `replication - 1` peers.
    pub replication: u32,
    pub failure: FailureConfig,
    pub retry: RetryConfig,
    /// The cluster keyring, inline: keys separated by commas, the first used to send. Empty:
    /// no key (datagrams are not authenticated).
    pub cluster_key: String,
    /// The cluster keyring in a file: one key per line, the first used to send; `#` comments.
    pub cluster_key_file: String,
    pub telemetry: TelemetryConfig,
    pub chaos: ChaosConfig,
}

/// Failure detection: peers heartbeat to the manager; a peer silent for `suspect_ms` is
/// suspected and probed directly and through `indirect` other peers; one still unheard after
/// `dead_ms` is declared dead and the ring is rebuilt without it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureConfig {
    pub heartbeat_ms: u64,
    pub suspect_ms: u64,
    pub dead_ms: u64,
    pub indirect: usize,
    /// A restarted manager waits at most this long for the peers of the ring it learns to
    /// register again; those still missing then are treated as dead.
    pub rejoin_grace_ms: u64,
}

impl Default for FailureConfig {
    fn default() -> Self {
        FailureConfig {
            heartbeat_ms: 250,
            suspect_ms: 1_000,
            dead_ms: 2_500,
            indirect: 3,
            rejoin_grace_ms: 2_000,
        }
    }
}

/// Fault injection for testing: this process drops or duplicates a fraction of the datagrams
/// it sends, as a lossy network would. Off (0) by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosConfig {
    /// Fraction of outgoing datagrams dropped (0 to 0.5).
    pub loss: f64,
    /// Fraction of outgoing datagrams sent twice (0 to 0.5).
    pub duplicate: f64,
    /// Seed of the chaos generator; unset: a random one, logged at start so a run replays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            role: Role::Manager,
            name: String::new(),
            listen: "127.0.0.1:5000".into(),
            manager: "127.0.0.1:5000".into(),
            data: "data/sample-details.csv".into(),
            placement: Placement::Consistent,
            routing: Routing::Walk,
            vnodes: 1,
            balance_by_data: true,
            max_datagram: 60_000,
            window: 8,
            socket_buffer: 4 << 20,
            query_timeout_ms: 5_000,
            probe_timeout_ms: 1_000,
            repair_interval_ms: 60_000,
            replication: 2,
            failure: FailureConfig::default(),
            retry: RetryConfig {
                initial_ms: 200,
                max_ms: 2_000,
                attempts: 8,
            },
            cluster_key: String::new(),
            cluster_key_file: String::new(),
            telemetry: TelemetryConfig {
                otlp_endpoint: String::new(),
                service_name: String::new(),
                jaeger_ui: String::new(),
                log: "info".into(),
            },
            chaos: ChaosConfig {
                loss: 0.0,
                duplicate: 0.0,
                seed: None,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid value for `{key}` (from {source_name}): {reason}")]
    Value {
        key: String,
        source_name: String,
        reason: String,
    },
}

/// Where a key's value came from, for error messages.
fn origin(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(md) if md.name.contains("environment") => {
            format!(
                "environment variable STORM_{}",
                key.replace('.', "__").to_uppercase()
            )
        }
        Some(md) => match &md.source {
            Some(src) => format!("{src}"),
            None => md.name.to_string(),
        },
        None => "the built-in default".into(),
    }
}

impl Config {
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        // STORM_CONFIG names the file itself (stormd's --config), it is not a key.
        figment.merge(Env::prefixed("STORM_").ignore(&["config"]).split("__"))
    }

    /// Loads and checks the configuration.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(path) = file
            && !path.is_file()
        {
            return Err(ConfigError::File {
                path: path.into(),
                reason: "no such file".into(),
            });
        }
        let figment = Self::figment(file);
        let config: Config = figment.extract().map_err(|e| {
            let key = e.path.join(".");
            if key.is_empty() {
                let reason = e.to_string();
                return match file {
                    Some(path) => ConfigError::File {
                        path: path.into(),
                        reason,
                    },
                    None => ConfigError::Value {
                        key: "?".into(),
                        source_name: "configuration".into(),
                        reason,
                    },
                };
            }
            let source_name = origin(&figment, &key);
            ConfigError::Value {
                key,
                source_name,
                reason: e.kind.to_string(),
            }
        })?;
        config.validate(&figment)?;
        Ok(config)
    }

    fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Value {
            key: key.into(),
            source_name: origin(figment, key),
            reason,
        };
        check_host_port(&self.listen).map_err(|r| bad("listen", r))?;
        if self.role == Role::Peer {
            check_host_port(&self.manager).map_err(|r| bad("manager", r))?;
            if self.name.chars().any(char::is_control) || self.name.len() > 64 {
                return Err(bad("name", "at most 64 printable characters".into()));
            }
        }
        // Room is left for the cluster key's header and tag, which seal every datagram: a
        // sealed datagram past the UDP limit could never be sent.
        let largest = crate::wire::MAX_UDP_PAYLOAD - crate::auth::OVERHEAD;
        if !(1024..=largest).contains(&self.max_datagram) {
            let reason = format!(
                "must be between 1024 and {largest} bytes (the UDP limit, less {} for the cluster key's tag)",
                crate::auth::OVERHEAD
            );
            return Err(bad("max_datagram", reason));
        }
        if !(1..=1024).contains(&self.window) {
            return Err(bad("window", "must be between 1 and 1024".into()));
        }
        if self.retry.attempts == 0 {
            return Err(bad("retry.attempts", "must be at least 1".into()));
        }
        if self.retry.initial_ms == 0 || self.retry.max_ms < self.retry.initial_ms {
            return Err(bad(
                "retry.initial_ms",
                "must be positive and at most retry.max_ms".into(),
            ));
        }
        if self.query_timeout_ms == 0 || self.probe_timeout_ms == 0 {
            return Err(bad("query_timeout_ms", "timeouts must be positive".into()));
        }
        if self.repair_interval_ms != 0 && self.repair_interval_ms < 1_000 {
            return Err(bad(
                "repair_interval_ms",
                "must be 0 (only when asked) or at least 1000: each repair asks every peer for a report".into(),
            ));
        }
        if !(1..=16).contains(&self.replication) {
            return Err(bad("replication", "must be between 1 and 16".into()));
        }
        if !(1..=256).contains(&self.vnodes) {
            return Err(bad("vnodes", "must be between 1 and 256".into()));
        }
        let f = &self.failure;
        if f.heartbeat_ms == 0 || f.suspect_ms < 2 * f.heartbeat_ms {
            return Err(bad(
                "failure.suspect_ms",
                format!(
                    "must be at least twice failure.heartbeat_ms ({}), and heartbeats must be positive",
                    f.heartbeat_ms
                ),
            ));
        }
        if f.dead_ms <= f.suspect_ms {
            return Err(bad(
                "failure.dead_ms",
                format!("must be longer than failure.suspect_ms ({})", f.suspect_ms),
            ));
        }
        if f.indirect > 16 {
            return Err(bad("failure.indirect", "must be at most 16".into()));
        }
        for (key, value) in [
            ("chaos.loss", self.chaos.loss),
            ("chaos.duplicate", self.chaos.duplicate),
        ] {
            if !(0.0..=0.5).contains(&value) {
                return Err(bad(
                    key,
                    format!("{value} is not a fraction between 0 and 0.5"),
                ));
            }
        }
        if !self.cluster_key.is_empty() && !self.cluster_key_file.is_empty() {
            return Err(bad(
                "cluster_key",
                "set cluster_key or cluster_key_file, not both".into(),
            ));
        }
        if let Err((key, reason)) = self.load_keyring() {
            return Err(bad(key, reason));
        }
        let endpoint = &self.telemetry.otlp_endpoint;
        if !endpoint.is_empty()
            && !endpoint.starts_with("http://")
            && !endpoint.starts_with("https://")
        {
            let reason = format!("'{endpoint}' must start with http:// (or https://)");
            return Err(bad("telemetry.otlp_endpoint", reason));
        }
        Ok(())
    }

    /// The cluster keyring, if one is configured; on error, the key at fault and why.
    fn load_keyring(&self) -> Result<Option<Keyring>, (&'static str, String)> {
        let (key, text) = if !self.cluster_key_file.is_empty() {
            let text = std::fs::read_to_string(&self.cluster_key_file).map_err(|e| {
                (
                    "cluster_key_file",
                    format!("cannot read {}: {e}", self.cluster_key_file),
                )
            })?;
            ("cluster_key_file", text)
        } else if !self.cluster_key.is_empty() {
            ("cluster_key", self.cluster_key.clone())
        } else {
            return Ok(None);
        };
        Keyring::parse(&text)
            .map(Some)
            .map_err(|e| (key, e.to_string()))
    }

    /// How the driver runs: chaos settings and the keyring (read again from its file).
    pub fn drive_options(&self) -> Result<DriveOptions, ConfigError> {
        let keyring = self
            .load_keyring()
            .map_err(|(key, reason)| ConfigError::Value {
                key: key.into(),
                source_name: "configuration".into(),
                reason,
            })?;
        Ok(DriveOptions {
            chaos: self.chaos.clone(),
            keyring,
        })
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(self.retry.initial_ms),
            max: Duration::from_millis(self.retry.max_ms),
            attempts: Some(self.retry.attempts),
        }
    }

    pub fn manager_config(&self) -> ManagerConfig {
        ManagerConfig {
            retry: self.retry_policy(),
            max_datagram: self.max_datagram,
            window: self.window,
            placement: self.placement,
            routing: self.routing,
            vnodes: self.vnodes,
            balance_by_data: self.balance_by_data,
            query_timeout: Duration::from_millis(self.query_timeout_ms),
            probe_timeout: Duration::from_millis(self.probe_timeout_ms),
            default_data: (!self.data.is_empty()).then(|| self.data.clone()),
            replication: self.replication,
            detection: self.detection(),
            clock_origin_us: unix_micros_now(),
            repair_interval: (self.repair_interval_ms > 0)
                .then(|| Duration::from_millis(self.repair_interval_ms)),
        }
    }

    pub fn detection(&self) -> Detection {
        let f = &self.failure;
        Detection {
            heartbeat: Duration::from_millis(f.heartbeat_ms),
            suspect_after: Duration::from_millis(f.suspect_ms),
            dead_after: Duration::from_millis(f.dead_ms),
            indirect: f.indirect,
            rejoin_grace: Duration::from_millis(f.rejoin_grace_ms),
        }
    }

    /// The peer's name: configured, or the host name.
    pub fn peer_name(&self) -> String {
        if !self.name.trim().is_empty() {
            return self.name.trim().to_string();
        }
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "peer".into())
    }
}

/// The wall clock in µs since the Unix epoch (0 if the clock is before it).
pub fn unix_micros_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn check_host_port(value: &str) -> Result<(), String> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("'{value}' is not host:port"));
    };
    if host.is_empty() {
        return Err(format!("'{value}' has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("'{port}' in '{value}' is not a port number"))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return figment::Error
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_are_valid() {
        Jail::expect_with(|_| {
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c, Config::default());
            Ok(())
        });
    }

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "storm.toml",
                "role = \"peer\"\nname = \"p1\"\n[retry]\nattempts = 3\n",
            )?;
            jail.set_env("STORM_NAME", "from-env");
            jail.set_env("STORM_RETRY__MAX_MS", "5000");
            let c = Config::load(Some(Path::new("storm.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.role, Role::Peer);
            assert_eq!(c.name, "from-env");
            assert_eq!(c.retry.attempts, 3);
            assert_eq!(c.retry.max_ms, 5000);
            Ok(())
        });
    }

    #[test]
    fn storm_config_names_the_file_and_is_not_a_key() {
        Jail::expect_with(|jail| {
            jail.create_file("p.toml", "role = \"peer\"\n")?;
            jail.set_env("STORM_CONFIG", "p.toml");
            let c = Config::load(Some(Path::new("p.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.role, Role::Peer);
            Ok(())
        });
    }

    #[test]
    fn a_wrong_env_value_names_the_key_and_the_variable() {
        Jail::expect_with(|jail| {
            jail.set_env("STORM_ROLE", "mangaer");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("`role`"), "{e}");
            assert!(e.contains("STORM_ROLE"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn the_repair_interval_is_off_or_at_least_a_second() {
        Jail::expect_with(|jail| {
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                c.manager_config().repair_interval,
                Some(std::time::Duration::from_secs(60))
            );
            jail.set_env("STORM_REPAIR_INTERVAL_MS", "0");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.manager_config().repair_interval, None);
            jail.set_env("STORM_REPAIR_INTERVAL_MS", "250");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(
                e.contains("`repair_interval_ms`") && e.contains("at least 1000"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn the_cluster_key_comes_inline_or_from_a_file_and_bad_keys_name_their_key() {
        Jail::expect_with(|jail| {
            // No key: none.
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert!(
                c.drive_options()
                    .map_err(|e| e.to_string())?
                    .keyring
                    .is_none()
            );
            // A keyring file with a comment and two keys.
            jail.create_file(
                "keys",
                "# rotated 2026-11\nnew-key-0123456789ab\nold-key-0123456789ab\n",
            )?;
            jail.set_env("STORM_CLUSTER_KEY_FILE", "keys");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            let ring = c.drive_options().map_err(|e| e.to_string())?.keyring;
            assert_eq!(ring.map(|r| r.len()), Some(2));
            // Both at once is ambiguous.
            jail.set_env("STORM_CLUSTER_KEY", "inline-key-0123456789");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("`cluster_key`") && e.contains("not both"), "{e}");
            // A short key, and a missing file, are refused by name.
            jail.set_env("STORM_CLUSTER_KEY_FILE", "");
            jail.set_env("STORM_CLUSTER_KEY", "short");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(
                e.contains("`cluster_key`") && e.contains("at least 16"),
                "{e}"
            );
            jail.set_env("STORM_CLUSTER_KEY", "");
            jail.set_env("STORM_CLUSTER_KEY_FILE", "no-such-file");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(
                e.contains("`cluster_key_file`") && e.contains("no-such-file"),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn a_wrong_file_value_names_the_key_and_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "window = \"many\"\n")?;
            let e = Config::load(Some(Path::new("bad.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("`window`"), "{e}");
            assert!(e.contains("bad.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn semantic_checks_name_the_key_and_source() {
        Jail::expect_with(|jail| {
            jail.set_env("STORM_ROLE", "peer");
            jail.set_env("STORM_MANAGER", "nohostport");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(
                e.contains("`manager`") && e.contains("STORM_MANAGER"),
                "{e}"
            );
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "max_datagram = 10\n")?;
            let e = Config::load(Some(Path::new("c.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("`max_datagram`") && e.contains("c.toml"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            // The UDP limit itself leaves no room for a sealed datagram's tag.
            jail.set_env("STORM_MAX_DATAGRAM", "65507");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("`max_datagram`") && e.contains("tag"), "{e}");
            jail.set_env("STORM_MAX_DATAGRAM", "65000");
            assert!(Config::load(None).is_ok());
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("STORM_TELEMETRY__OTLP_ENDPOINT", "jaeger:4317");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("http://"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_missing_files_are_errors() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "rol = \"peer\"\n")?;
            let e = Config::load(Some(Path::new("c.toml")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("rol"), "{e}");
            Ok(())
        });
        let e = Config::load(Some(Path::new("/nonexistent/storm.toml")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/storm.toml"), "{e}");
    }

    /// The documented files in config/ are valid, and stormd.toml states the real defaults.
    #[test]
    fn shipped_config_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Jail::expect_with(|_| {
                    Config::load(Some(&path)).map_err(|e| e.to_string())?;
                    Ok(())
                });
                seen += 1;
            }
        }
        assert!(seen >= 3);
        Jail::expect_with(|_| {
            let documented =
                Config::load(Some(&dir.join("stormd.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(documented, Config::default());
            Ok(())
        });
    }

    #[test]
    fn peer_name_falls_back_to_the_host_name() {
        let c = Config {
            name: "  ".into(),
            ..Config::default()
        };
        assert!(!c.peer_name().is_empty());
        let c = Config {
            name: "p7".into(),
            ..Config::default()
        };
        assert_eq!(c.peer_name(), "p7");
    }
}
