//! The edge's own optional configuration file (`--config edge.yaml`).
//!
//! Unlike Synapse's files, this one is ours: unknown keys are errors, so a
//! typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::ConfigError;

/// The edge configuration as written by the operator.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Name-pattern pools: pool name to worker-name patterns (`*` wildcard).
    /// Replaces the built-in patterns of a pool of the same name, or adds a
    /// pool that a custom route table may name.
    #[serde(default)]
    pub pools: BTreeMap<String, Vec<String>>,
    /// A route table to use instead of the built-in `routes/synapse.yaml`.
    #[serde(default)]
    pub routes: Option<PathBuf>,
    /// Plain-HTTP listen addresses (`host:port`); `--listen` replaces them.
    #[serde(default)]
    pub listen: Vec<String>,
    /// An optional Unix socket to listen on as well.
    #[serde(default)]
    pub listen_unix: Option<PathBuf>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub upstream: UpstreamPool,
    #[serde(default)]
    pub health: crate::health::HealthSettings,
    /// Listeners with their roles (TLS, traffic served, redirect...).
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub well_known: crate::front::WellKnown,
    #[serde(default)]
    pub admin: crate::front::AdminGuard,
    /// Serving threads (each with its own event loop and SO_REUSEPORT
    /// sockets, as Nginx workers); default: the number of CPUs.
    #[serde(default)]
    pub threads: Option<usize>,
    /// One log line per request (target `synapse_edge::access`).
    #[serde(default = "yes")]
    pub access_log: bool,
    /// `text` (default) or `json` log lines; read at start-up.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Where `/metrics` and the status page are served (off the public
    /// listeners); `--metrics` replaces it.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Peers whose X-Forwarded-For is believed (load balancers in front).
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Where this config came from (for error messages).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        // The defaults of an empty file.
        serde_yaml_ng::from_str("{}")
            .unwrap_or_else(|_| unreachable!("an empty edge config is valid"))
    }
}

impl EdgeConfig {
    pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                path,
                "",
                format!("cannot read file: {e}"),
                "check the --config path",
            )
        })?;
        let mut cfg: EdgeConfig = if text.trim().is_empty() || text.trim() == "{}" {
            EdgeConfig::default()
        } else {
            serde_yaml_ng::from_str(&text).map_err(|e| {
                ConfigError::new(
                    path,
                    "",
                    format!("{e}"),
                    "see the README's edge.yaml reference for the keys and their format",
                )
            })?
        };
        // A relative route table path is relative to the edge config file.
        if let Some(routes) = &cfg.routes
            && routes.is_relative()
            && let Some(dir) = path.parent()
        {
            cfg.routes = Some(dir.join(routes));
        }
        cfg.source = Some(path.to_path_buf());
        cfg.validate(path)?;
        Ok(cfg)
    }
}

impl EdgeConfig {
    /// Checks what serde cannot: addresses, and listener combinations.
    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            if l.listen.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::new(
                    path,
                    format!("{key}.listen"),
                    format!("`{}` is not an address", l.listen),
                    "write host:port, e.g. 0.0.0.0:443 or [::]:8448",
                ));
            }
            if l.tls && self.tls.as_ref().is_none_or(|t| t.certificates.is_empty()) {
                return Err(ConfigError::new(
                    path,
                    format!("{key}.tls"),
                    "a TLS listener needs certificates",
                    "add `tls: {certificates: [{cert: fullchain.pem, key: privkey.pem}]}`",
                ));
            }
            if l.tls && l.redirect_https {
                return Err(ConfigError::new(
                    path,
                    format!("{key}.redirect_https"),
                    "a TLS listener cannot redirect to HTTPS",
                    "use redirect_https on the plain-HTTP listener (port 80)",
                ));
            }
            if l.hsts.is_some() && !l.tls {
                return Err(ConfigError::new(
                    path,
                    format!("{key}.hsts"),
                    "HSTS on a plain-HTTP listener is ignored by browsers",
                    "set hsts on the TLS listener",
                ));
            }
        }
        for a in &self.listen {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::new(
                    path,
                    "listen",
                    format!("`{a}` is not an address"),
                    "write host:port, e.g. 0.0.0.0:8008 or [::]:8008",
                ));
            }
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// One listener (`listeners:` in edge.yaml).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port`, e.g. `0.0.0.0:443` or `[::]:8448`.
    pub listen: String,
    /// Serve TLS with the certificates of `tls:`.
    #[serde(default)]
    pub tls: bool,
    /// What it serves: client, federation, media (default all). Other
    /// paths get 404 M_UNRECOGNIZED.
    #[serde(default = "all_traffic")]
    pub serve: Vec<crate::front::Traffic>,
    /// A `Strict-Transport-Security` value to send, e.g. `max-age=63072000`.
    #[serde(default)]
    pub hsts: Option<String>,
    /// Answer every request with a 301 to the same URL over HTTPS.
    #[serde(default)]
    pub redirect_https: bool,
    /// Serve `/.well-known/acme-challenge/` from this folder (certbot webroot).
    #[serde(default)]
    pub acme_challenge_dir: Option<PathBuf>,
    /// Connections begin with a PROXY protocol v1/v2 header (from a trusted
    /// load balancer).
    #[serde(default)]
    pub proxy_protocol: bool,
}

fn all_traffic() -> Vec<crate::front::Traffic> {
    crate::front::Traffic::ALL.to_vec()
}

/// Certificates for the TLS listeners.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub certificates: Vec<crate::tls::CertSpec>,
    /// How often the files are checked for changes.
    #[serde(default = "ten_seconds", with = "humantime_serde")]
    pub watch_interval: Duration,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

/// Request limits.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body, e.g. `50M` (K, M, G are powers of 1024, as in
    /// Synapse). Default: Synapse's `max_upload_size`, else 50M.
    #[serde(default)]
    pub max_body_size: Option<ByteSize>,
    /// Largest request head (request line and headers). Default 64K.
    #[serde(default)]
    pub max_header_size: Option<ByteSize>,
    /// Most headers in one request. Default 100.
    #[serde(default)]
    pub max_headers: Option<usize>,
}

/// Timeouts; durations like `5s`, `2m`, `500ms`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Connecting to a worker.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// Waiting for a worker's response on ordinary routes (counted from the
    /// last request body progress).
    #[serde(with = "humantime_serde")]
    pub upstream: Duration,
    /// Waiting for a response on long-poll routes (`/sync`, `/events`):
    /// well above the 30 s a client typically asks the server to hold.
    #[serde(with = "humantime_serde")]
    pub long_poll: Duration,
    /// Closing a client connection with no request in flight.
    #[serde(with = "humantime_serde")]
    pub client_idle: Duration,
    /// Receiving a request's headers (slow clients).
    #[serde(with = "humantime_serde")]
    pub header_read: Duration,
    /// On shutdown, how long in-flight requests may take to finish.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(3),
            upstream: Duration::from_secs(60),
            long_poll: Duration::from_secs(300),
            client_idle: Duration::from_secs(75),
            header_read: Duration::from_secs(20),
            drain: Duration::from_secs(30),
        }
    }
}

/// Keep-alive connection pools to workers.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamPool {
    /// Idle connections kept per worker.
    pub max_idle_per_worker: usize,
    /// How long an idle connection is kept.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for UpstreamPool {
    fn default() -> Self {
        UpstreamPool {
            max_idle_per_worker: 128,
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// A size written as Synapse writes them: `50M`, `512K`, `1G` or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Option<ByteSize> {
        let t = text.trim();
        let (digits, mult) = match t.chars().last()? {
            'K' | 'k' => (&t[..t.len() - 1], 1u64 << 10),
            'M' | 'm' => (&t[..t.len() - 1], 1 << 20),
            'G' | 'g' => (&t[..t.len() - 1], 1 << 30),
            _ => (t, 1),
        };
        digits
            .trim()
            .parse::<u64>()
            .ok()?
            .checked_mul(mult)
            .map(ByteSize)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!("`{s}` is not a size; write e.g. 50M, 512K or 1G"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_synapse() {
        assert_eq!(ByteSize::parse("50M"), Some(ByteSize(50 << 20)));
        assert_eq!(ByteSize::parse("512K"), Some(ByteSize(512 << 10)));
        assert_eq!(ByteSize::parse("1G"), Some(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("1234"), Some(ByteSize(1234)));
        assert_eq!(ByteSize::parse("lots"), None);
    }

    #[test]
    fn a_full_edge_config_reads() {
        let cfg: EdgeConfig = serde_yaml_ng::from_str(
            "listen: [\"127.0.0.1:8008\"]\nlimits: {max_body_size: 100M}\ntimeouts: {connect: 2s, long_poll: 10m}\n",
        )
        .unwrap();
        assert_eq!(cfg.limits.max_body_size, Some(ByteSize(100 << 20)));
        assert_eq!(cfg.timeouts.connect, Duration::from_secs(2));
        assert_eq!(cfg.timeouts.long_poll, Duration::from_secs(600));
        assert_eq!(cfg.timeouts.upstream, Duration::from_secs(60));
    }
}
