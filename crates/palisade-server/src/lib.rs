//! The palisade server: a node hosting many Raft groups behind one gRPC
//! server with five services.
//!
//! - `Kv` ([`kv`]): validates each request ([`validate`]), finds the data
//!   group that owns its key(s) (the shard map), and runs it on this node if
//!   it leads that group, or forwards it one hop to the leader. Reads are
//!   linearizable: ReadIndex on the leader before reading the state.
//! - `Admin` ([`admin`]): cluster status, learners, compaction.
//! - `Lease` and `Lock` ([`lock`]): leases timed by group leaders, locks
//!   with fencing tokens.
//! - `Peer` ([`peer`]): Raft messages between nodes, routed by group id.
//!
//! Errors are one enum ([`error::ServerError`]) mapped once to gRPC statuses
//! with typed details (leader hints, unknown outcomes).

pub mod admin;
pub mod config;
pub mod error;
pub mod kv;
pub mod lock;
pub mod node;
pub mod peer;
pub mod read;
pub mod validate;

pub use config::{Limits, NodeConfig, RaftTimings, parse_peers};
pub use error::{ServerError, error_detail};
pub use node::Node;
