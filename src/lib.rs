//! synapse-edge: the public edge for Synapse homeservers split into workers.
//!
//! A request's path through the crate: [`config`] (Synapse's own files and
//! the edge's) → [`topology`] (workers, their inbound sockets, pools) →
//! [`routes`] (the route table and sticky keys) → [`balancing`]
//! (rendezvous choice within a pool). [`state`] holds one consistent,
//! validated snapshot of all of it.

#![deny(unsafe_code)]

pub mod access_log;
pub mod balancing;
pub mod body;
pub mod cli;
pub mod config;
pub mod conn_timer;
pub mod demo;
pub mod front;
pub mod generate;
pub mod health;
pub mod http1;
pub mod listeners;
pub mod metrics;
pub mod process;
pub mod proxy;
pub mod request;
pub mod routes;
pub mod standin;
pub mod state;
pub mod status;
pub mod tls;
pub mod topology;
pub mod upstream;
