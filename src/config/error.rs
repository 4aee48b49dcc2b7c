//! Configuration errors that name the file, the key and the fix.
//!
//! Loading collects every problem it finds before failing (as linkerd2-proxy
//! does with its environment), so an operator fixes a config in one pass.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one file, at one key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file the problem is in (or the command-line flag, for missing files).
    pub file: PathBuf,
    /// A dotted path to the key, e.g. `stream_writers.typing`.
    pub key: String,
    /// What is wrong.
    pub problem: String,
    /// What the operator should do about it.
    pub fix: String,
}

impl ConfigError {
    pub fn new(
        file: impl AsRef<Path>,
        key: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.as_ref().to_path_buf(),
            key: key.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = if self.key.is_empty() {
            String::new()
        } else {
            format!(" `{}`", self.key)
        };
        write!(f, "{}:{}: {}", self.file.display(), key, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "\n    fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "the configuration is not usable ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// Collects errors while a loader keeps going.
#[derive(Debug, Default)]
pub(crate) struct Problems(pub Vec<ConfigError>);

impl Problems {
    pub fn push(&mut self, e: ConfigError) {
        self.0.push(e);
    }

    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigErrors(self.0))
        }
    }
}
