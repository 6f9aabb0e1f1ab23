//! openraft's storage conformance suite against palisade's log store (the
//! node's write-ahead log) and state machine, and the move of logs written
//! by earlier versions out of sled.

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
            None,
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

#[test]
fn a_log_kept_in_sled_by_an_earlier_version_moves_into_the_write_ahead_log() {
    use openraft::entry::RaftEntry;
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    use openraft::{CommittedLeaderId, Entry, LogId};

    let dir = tempfile::tempdir().expect("tempdir");
    let entries: Vec<Entry<TypeConfig>> = (1..=5)
        .map(|i| Entry::new_blank(LogId::new(CommittedLeaderId::new(2, 1), i)))
        .collect();
    {
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let tree = db.open_tree("g3/log").expect("tree");
        for e in &entries {
            let bytes =
                bincode::serde::encode_to_vec(e, bincode::config::standard()).expect("encode");
            tree.insert(e.log_id.index.to_be_bytes(), bytes)
                .expect("insert");
        }
        db.flush().expect("flush");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = NodeStore::open(dir.path(), 16 * 1024 * 1024).expect("open store");
        let mut log = store.log_store::<TypeConfig>(3).expect("log store");
        let got = log.try_get_log_entries(0..100).await.expect("read");
        let ids: Vec<_> = got.iter().map(|e| e.log_id).collect();
        let want: Vec<_> = entries.iter().map(|e| e.log_id).collect();
        assert_eq!(ids, want);
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_log_id, Some(want[4]));
        store.flush().expect("flush");
    });
    // The entries now live in the write-ahead log alone, and stay there.
    let db = sled::Config::new().path(dir.path()).open().expect("sled");
    assert!(db.open_tree("g3/log").expect("tree").is_empty());
    drop(db);
    rt.block_on(async {
        let store = NodeStore::open(dir.path(), 16 * 1024 * 1024).expect("reopen store");
        let mut log = store.log_store::<TypeConfig>(3).expect("log store");
        assert_eq!(
            log.try_get_log_entries(0..100).await.expect("read").len(),
            5
        );
    });
}
