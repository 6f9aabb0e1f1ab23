//! The storage error type.

use thiserror::Error;

/// Errors from the storage layer. All but `Compacted`, `FutureRevision`
/// (a read asked for a revision this replica cannot serve) and `NotOwned`
/// (a key of a slot this group does not serve) are
/// environmental (disk, corruption): a node that hits one must stop serving
/// the affected group rather than diverge from its replicas.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("revision {requested} is compacted; the oldest readable revision is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
    #[error("revision {requested} is in the future; this replica has applied {current}")]
    FutureRevision { requested: u64, current: u64 },
    /// The group does not serve this key's slot (it moved away, or is being
    /// moved in and not committed yet).
    #[error("this group does not serve slot {slot}{}", moved_to.map(|g| format!(" (it moved to group {g})")).unwrap_or_default())]
    NotOwned { slot: u16, moved_to: Option<u64> },
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("encoding a record: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decoding a record: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("corrupt storage: {what}")]
    Corrupt { what: String },
    #[error("flush failed: {0}")]
    Flush(String),
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    Ok(bincode::serde::encode_to_vec(
        value,
        bincode::config::standard(),
    )?)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, bincode::config::standard())?;
    if used != bytes.len() {
        return Err(StoreError::Corrupt {
            what: format!("record has {} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}
