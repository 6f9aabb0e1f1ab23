//! The palisade server: a node hosting many Raft groups behind one gRPC
//! server with five services.
//!
//! The node's parts, along the path of a request:
//! - [`service`]: the Kv, Admin, Lease, Lock and Peer services — thin
//!   adapters that validate ([`validate`]) and route;
//! - [`router`]: which group a request belongs to (by the cluster map, or a
//!   route hint), and whether it runs here or one hop away at the group's
//!   leader; one forward path, one rule for failures in transit;
//! - [`read`]: the consistency level of a read on one replica;
//! - [`registry`]: the replicas this node hosts right now;
//! - [`reconcile`]: opens and closes replicas as the cluster map changes;
//! - [`coordinator`]: on the meta leader, keeps the cluster in the shape the
//!   map asks for (joins, drains, re-replication, balance, slot moves);
//! - [`manage`]: the management calls the coordinator sends to nodes;
//! - [`lease`]: lease deadlines, measured by group leaders;
//! - [`tasks`]: the background tasks that `Node::shutdown` stops.
//!
//! Errors are one enum ([`error::ServerError`]) mapped once to gRPC statuses
//! with typed details (leader hints, wrong group, unknown outcomes…).

pub mod config;
pub mod coordinator;
pub mod error;
pub mod lease;
pub mod manage;
pub mod node;
pub mod read;
pub mod reconcile;
pub mod registry;
pub mod router;
pub mod service;
pub mod tasks;
pub mod validate;

pub use config::{CoordinatorTimings, Limits, NodeConfig, RaftTimings, parse_peers};
pub use error::{ServerError, error_detail};
pub use node::Node;
pub use service::admin::map_to_proto;
