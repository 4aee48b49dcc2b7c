//! TLS with rustls: certificate chains and keys from PEM files, chosen by
//! SNI, and replaced without a restart when the files change (or on SIGHUP).
//! A new file that does not load is refused and the old certificate stays.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;

/// One certificate as configured.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    /// PEM file with the certificate chain (leaf first, e.g. fullchain.pem).
    pub cert: PathBuf,
    /// PEM file with its private key.
    pub key: PathBuf,
    /// Server names (SNI) it serves; `*.example.org` matches one label.
    /// The first certificate also serves clients that send no known name.
    #[serde(default)]
    pub names: Vec<String>,
}

/// Why certificates did not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct TlsError {
    pub file: PathBuf,
    pub problem: String,
}

fn err(file: &Path, problem: impl Into<String>) -> TlsError {
    TlsError {
        file: file.to_path_buf(),
        problem: problem.into(),
    }
}

/// The certificates of one load.
struct Loaded {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    /// Modification stamps of the files, to notice changes.
    stamps: Vec<(PathBuf, Option<SystemTime>, u64)>,
}

fn stamp(path: &Path) -> (PathBuf, Option<SystemTime>, u64) {
    let meta = std::fs::metadata(path).ok();
    (
        path.to_path_buf(),
        meta.as_ref().and_then(|m| m.modified().ok()),
        meta.map_or(0, |m| m.len()),
    )
}

fn load_one(spec: &CertSpec) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&spec.cert)
        .map_err(|e| err(&spec.cert, format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(&spec.cert, format!("invalid PEM: {e}")))?;
    if chain.is_empty() {
        return Err(err(&spec.cert, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&spec.key)
        .map_err(|e| err(&spec.key, format!("cannot read a private key: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| {
            err(
                &spec.cert,
                format!("certificate and key do not fit together: {e}"),
            )
        })
}

fn load_all(specs: &[CertSpec]) -> Result<Loaded, TlsError> {
    let mut by_name = HashMap::new();
    let mut default = None;
    let mut stamps = Vec::new();
    for spec in specs {
        stamps.push(stamp(&spec.cert));
        stamps.push(stamp(&spec.key));
        let ck = load_one(spec)?;
        for n in &spec.names {
            by_name.insert(n.to_ascii_lowercase(), ck.clone());
        }
        default.get_or_insert(ck);
    }
    let default =
        default.ok_or_else(|| err(Path::new("edge.yaml"), "`tls.certificates` is empty"))?;
    Ok(Loaded {
        by_name,
        default,
        stamps,
    })
}

/// The certificates in use, swapped whole when they are reloaded.
pub struct CertStore {
    specs: Vec<CertSpec>,
    current: ArcSwap<Loaded>,
    /// File stamps at the last load attempt, good or bad: a broken file is
    /// reported once, not at every poll.
    attempted: std::sync::Mutex<Vec<(PathBuf, Option<SystemTime>, u64)>>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("specs", &self.specs)
            .finish()
    }
}

impl CertStore {
    pub fn load(specs: Vec<CertSpec>) -> Result<CertStore, TlsError> {
        let loaded = load_all(&specs)?;
        Ok(CertStore {
            attempted: std::sync::Mutex::new(loaded.stamps.clone()),
            specs,
            current: ArcSwap::from_pointee(loaded),
        })
    }

    fn stamps(&self) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
        self.specs
            .iter()
            .flat_map(|s| [stamp(&s.cert), stamp(&s.key)])
            .collect()
    }

    /// Re-reads every certificate; installs them only if all load.
    pub fn reload(&self) -> Result<(), TlsError> {
        if let Ok(mut a) = self.attempted.lock() {
            *a = self.stamps();
        }
        let loaded = load_all(&self.specs)?;
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    /// Whether any file changed since the last load attempt.
    pub fn changed_on_disk(&self) -> bool {
        let now = self.stamps();
        self.attempted.lock().map(|a| *a != now).unwrap_or(true)
    }

    /// The certificate for a server name.
    fn for_name(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let loaded = self.current.load();
        if let Some(name) = name {
            let name = name.to_ascii_lowercase();
            if let Some(ck) = loaded.by_name.get(&name) {
                return ck.clone();
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(ck) = loaded.by_name.get(&format!("*.{parent}"))
            {
                return ck.clone();
            }
        }
        loaded.default.clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.for_name(hello.server_name()))
    }
}

/// A rustls server configuration: TLS 1.3 and 1.2 with rustls's modern
/// default cipher suites, ALPN h2 then http/1.1, certificates by SNI.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(Path::new("tls"), e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reloads when files change on disk; runs until dropped.
pub async fn watch(store: Arc<CertStore>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if store.changed_on_disk() {
            reload_logged(&store);
        }
    }
}

/// Reloads and logs the outcome once.
pub fn reload_logged(store: &CertStore) {
    match store.reload() {
        Ok(()) => tracing::info!("TLS certificates reloaded"),
        Err(e) => {
            tracing::error!("TLS certificates not reloaded, the previous ones stay in use: {e}")
        }
    }
}
