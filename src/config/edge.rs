//! The edge's own optional configuration file (`--config edge.yaml`).
//!
//! Unlike Synapse's files, this one is ours: unknown keys are errors, so a
//! typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::ConfigError;

/// The edge configuration as written by the operator.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
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
    /// Where this config came from (for error messages).
    #[serde(skip)]
    pub source: Option<PathBuf>,
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
        let mut cfg: EdgeConfig = if text.trim().is_empty() {
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
        Ok(cfg)
    }
}
