//! Generated protobuf and gRPC types for palisade (`proto/palisade/v1`).
//!
//! Only the server edge and the client library touch these types; the core
//! crates convert them to domain types once, at the boundary.

#![allow(clippy::all, missing_docs)]

/// `palisade.v1`: the public Kv and Admin APIs and the peer protocol.
pub mod v1 {
    tonic::include_proto!("palisade.v1");
}
