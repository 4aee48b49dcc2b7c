//! Configuration: Synapse's own files (read, never written) and the edge's
//! optional file. Both are parsed into plain data; `topology` turns them into
//! workers and pools.

mod edge;
mod error;
mod synapse;

pub use edge::{
    ByteSize, EdgeConfig, Limits, ListenerConfig, LogFormat, Timeouts, TlsConfig, UpstreamPool,
};
pub(crate) use error::Problems;
pub use error::{ConfigError, ConfigErrors};
pub use synapse::{Endpoint, Listener, MAIN, Stream, SynapseConfig, WorkerFile};
