//! openraft's storage conformance suite against palisade's sled log store and
//! state machine.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use palisade_group::{NodeId, StateMachine, TypeConfig};
use palisade_storage::{LogStore, NodeStore};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, StateMachine, tempfile::TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore<TypeConfig>, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = NodeStore::open(dir.path(), 16 * 1024 * 1024).expect("open store");
        let log = store.log_store::<TypeConfig>(3).expect("log store");
        let sm = StateMachine::new(
            3,
            store.state_tree(3).expect("state tree"),
            store.snapshot_store(3).expect("snapshot store"),
            store.flusher().clone(),
        )
        .expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(SledBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
