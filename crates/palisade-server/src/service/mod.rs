//! The gRPC services: thin adapters that validate a request, name the group
//! it belongs to, and hand it to the router (`Node::dispatch`) with what to do
//! on the replica that serves it.

pub mod admin;
pub mod kv;
pub mod lock;
pub mod peer;
