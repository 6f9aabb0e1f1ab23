//! The node's write-ahead log: the Raft log entries of every group in one
//! sequence of preallocated segment files, made durable by one `fdatasync`.
//!
//! # Why not sled
//!
//! sled 0.34 turns every atomic batch into two synchronous buffer writes on
//! its I/O threads, wakes all of them on each one, and its `flush()` hops
//! through the same pool. Profiles put that at more than a third of a
//! replicated write's CPU and most of its single-client latency. A log is
//! append-only, read back mostly right after it was written, and dropped from
//! the front: a file does exactly that with one `pwrite` and one `fdatasync`.
//!
//! # Layout
//!
//! `wal/{seq:016x}.wal`, each a magic header followed by records:
//!
//! | bytes | field                                        |
//! |-------|----------------------------------------------|
//! | 4     | payload length (LE); 0 marks the end         |
//! | 4     | CRC-32 of the payload (LE)                   |
//! | 1     | kind: 1 = entry, 2 = truncate                |
//! | 8     | group (LE)                                   |
//! | 8     | log index (LE)                               |
//! | rest  | the encoded entry (kind 1 only)              |
//!
//! A truncate record removes the group's entries at and after its index.
//! Segments are filled with zeros when created (and synced), so an
//! `fdatasync` never has to persist a file-size change, and a record can end
//! the scan only by a zero length or a bad checksum.
//!
//! # Crash model
//!
//! Appends become durable at the next [`Wal::sync`]. A segment is synced
//! before the log moves to the next one, so only the last segment can end in
//! a torn record: the last write before a crash, never synced, so never
//! acknowledged. Replay stops at the first bad record and zeroes the rest of
//! the segment, so no stale record beyond it can come back later.
//!
//! A bad record is told apart from a torn tail by what follows it: a torn
//! write is the end of what was written, so any record after it that still
//! verifies proves the bad one was written whole and damaged later — it is
//! **corruption**, and the entries cut with it may have been acknowledged.
//! The log then reports a [`Damage`] before it zeroes anything, so the
//! caller can record (durably) that this node's replicas may have lost
//! entries they promised to keep: such a replica must not vote until a
//! leader has given them back (see `palisade-group`). One limit remains: a
//! damaged record that is the very last one written looks exactly like a
//! torn write.
//!
//! A bad record in an earlier segment is corruption too; opening fails with
//! an error that names the file and offset, rather than silently dropping
//! entries a replica promised to keep.
//!
//! Segments are deleted from the front once no live entry is left in them
//! ([`Wal::release`]). A segment held only by a few live entries (a group
//! that rarely writes, so rarely snapshots and purges) has them copied to
//! the end of the log first, so one quiet group cannot pin every segment
//! after it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::StoreError;

const MAGIC: &[u8; 8] = b"PALWAL01";
const HEADER: usize = 8;
const RECORD_HEADER: usize = 8;
const PAYLOAD_HEADER: usize = 17;
const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;

/// Default segment size: large enough that the zero-fill of a new segment is
/// rare, small enough that it is quick.
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// Where one entry's encoded bytes lie.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
}

struct Inner {
    segments: BTreeMap<u64, Segment>,
    /// Sequence number of the segment being appended to.
    current: u64,
    /// Next write offset in the current segment.
    offset: u64,
    /// Length of the current segment's file (kept here so an append needs
    /// no `fstat`).
    len: u64,
    /// Per group: entry index → location.
    index: BTreeMap<u64, BTreeMap<u64, Loc>>,
}

/// A bad record found when the log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment file.
    pub path: PathBuf,
    /// Offset of the bad record in it.
    pub offset: u64,
    /// Where the next record that still verifies starts, if one does: then
    /// this is corruption, not a torn write.
    pub verified_after: Option<u64>,
}

impl Damage {
    /// Whether the bad record was damaged after it was written whole (so it
    /// may have been acknowledged), rather than torn by a crash.
    pub fn is_corruption(&self) -> bool {
        self.verified_after.is_some()
    }
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bad record at offset {} of {}",
            self.offset,
            self.path.display()
        )?;
        match self.verified_after {
            Some(at) => write!(f, " (a valid record follows at offset {at}: corruption)"),
            None => write!(f, " (nothing valid after it: a torn write)"),
        }
    }
}

/// Handle to the node's write-ahead log. Cloning shares it.
#[derive(Clone)]
pub struct Wal {
    dir: PathBuf,
    segment_bytes: u64,
    inner: Arc<Mutex<Inner>>,
}

impl Wal {
    /// Opens (or creates) the log in `dir`, replaying every segment.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, StoreError> {
        Self::open_reporting(dir, segment_bytes, |_| Ok(()))
    }

    /// Like [`Self::open`]; when the newest segment has a bad record,
    /// `on_damage` is called with it *before* the entries after it are
    /// zeroed, so the caller can durably record what may have been lost
    /// (if it fails, nothing is cut and opening fails).
    pub fn open_reporting(
        dir: &Path,
        segment_bytes: u64,
        mut on_damage: impl FnMut(&Damage) -> Result<(), StoreError>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let mut seqs = Vec::new();
        for item in std::fs::read_dir(dir).map_err(|e| io_error(dir, e))? {
            let item = item.map_err(|e| io_error(dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = name
                .strip_suffix(".wal")
                .and_then(|s| u64::from_str_radix(s, 16).ok())
            {
                seqs.push(seq);
            } else if name.ends_with(".tmp") {
                // A segment whose creation was interrupted.
                let _ = std::fs::remove_file(item.path());
            }
        }
        seqs.sort_unstable();
        let mut inner = Inner {
            segments: BTreeMap::new(),
            current: 0,
            offset: HEADER as u64,
            len: 0,
            index: BTreeMap::new(),
        };
        let last = seqs.last().copied();
        for seq in seqs {
            let path = segment_path(dir, seq);
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_error(&path, e))?;
            let end = replay_segment(&mut inner, seq, &path, &mut file)?;
            if let Some(bad) = end.bad_record {
                let damage = Damage {
                    path: path.clone(),
                    offset: bad,
                    verified_after: end.verified_after,
                };
                if Some(seq) != last {
                    return Err(StoreError::Corrupt {
                        what: format!(
                            "write-ahead log: {damage}, and it is not the newest segment, so \
                             entries this node acknowledged are missing. Do not delete this \
                             data directory and restart under the same node id (the node could \
                             then vote without entries it promised to keep): remove the node \
                             from the cluster (`palisade node remove ID`) and start a \
                             replacement with an empty data directory and `--join`"
                        ),
                    });
                }
                if damage.is_corruption() {
                    tracing::error!(%damage, "write-ahead log corruption; entries from it on are cut, and this node's replicas abstain from votes until their leaders have re-sent them");
                } else {
                    tracing::warn!(%damage, "write-ahead log ends in a torn write (a crash during a write); it is cut");
                }
                on_damage(&damage)?;
            }
            if Some(seq) == last {
                // Anything after the last good record was never acknowledged:
                // zero it so a later, shorter record cannot expose a stale one.
                zero_from(&file, end.offset).map_err(|e| io_error(&path, e))?;
                inner.current = seq;
                inner.offset = end.offset;
                inner.len = file_len(&file);
            }
            inner.segments.insert(
                seq,
                Segment {
                    file: Arc::new(file),
                    path,
                },
            );
        }
        let wal = Self {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(1024 * 1024),
            inner: Arc::new(Mutex::new(inner)),
        };
        if last.is_none() {
            let mut inner = wal.lock();
            wal.start_segment(&mut inner, 1)?;
        }
        Ok(wal)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates segment `seq`, zero-filled and synced, and makes it current.
    fn start_segment(&self, inner: &mut Inner, seq: u64) -> Result<(), StoreError> {
        let path = segment_path(&self.dir, seq);
        let tmp = path.with_extension("tmp");
        let file = create_segment(&tmp, self.segment_bytes).map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_error(&path, e))?;
        sync_dir(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        inner.segments.insert(
            seq,
            Segment {
                file: Arc::new(file),
                path,
            },
        );
        inner.current = seq;
        inner.offset = HEADER as u64;
        inner.len = self.segment_bytes.max(HEADER as u64);
        Ok(())
    }

    /// Writes `buf` at the end of the log, moving to a new segment first if
    /// it does not fit. Returns the segment and offset written.
    fn write(&self, inner: &mut Inner, buf: &[u8]) -> Result<(u64, u64), StoreError> {
        let len = buf.len() as u64;
        if inner.offset + len > self.segment_bytes && inner.offset > HEADER as u64 {
            // The old segment must be durable before anything lands in the
            // new one: only the last segment may have a torn tail.
            let old = &inner.segments[&inner.current];
            old.file.sync_data().map_err(|e| io_error(&old.path, e))?;
            let next = inner.current + 1;
            self.start_segment(inner, next)?;
        }
        let seg = &inner.segments[&inner.current];
        let end = inner.offset + len;
        if end > inner.len {
            // One record larger than a segment: let the file grow.
            seg.file.set_len(end).map_err(|e| io_error(&seg.path, e))?;
            inner.len = end;
        }
        seg.file
            .write_all_at(buf, inner.offset)
            .map_err(|e| io_error(&seg.path, e))?;
        let at = (inner.current, inner.offset);
        inner.offset = end;
        Ok(at)
    }

    /// Appends entries (index, encoded entry) of `group`, replacing any
    /// entries at those indexes. Durable after the next [`Self::sync`].
    pub fn append(&self, group: u64, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(
            entries
                .iter()
                .map(|(_, e)| RECORD_HEADER + PAYLOAD_HEADER + e.len())
                .sum(),
        );
        let mut offsets = Vec::with_capacity(entries.len());
        for (index, bytes) in entries {
            offsets.push(buf.len() as u64);
            push_record(&mut buf, KIND_ENTRY, group, *index, bytes);
        }
        let mut inner = self.lock();
        let (segment, base) = self.write(&mut inner, &buf)?;
        let index = inner.index.entry(group).or_default();
        for ((idx, bytes), off) in entries.iter().zip(offsets) {
            index.insert(
                *idx,
                Loc {
                    segment,
                    offset: base + off + (RECORD_HEADER + PAYLOAD_HEADER) as u64,
                    len: bytes.len() as u32,
                },
            );
        }
        Ok(())
    }

    /// Removes the entries of `group` at and after `from`. Durable after the
    /// next [`Self::sync`].
    pub fn truncate(&self, group: u64, from: u64) -> Result<(), StoreError> {
        let mut buf = Vec::with_capacity(RECORD_HEADER + PAYLOAD_HEADER);
        push_record(&mut buf, KIND_TRUNCATE, group, from, &[]);
        let mut inner = self.lock();
        self.write(&mut inner, &buf)?;
        if let Some(index) = inner.index.get_mut(&group) {
            index.split_off(&from);
        }
        Ok(())
    }

    /// Forgets the entries of `group` at or below `upto` and deletes the
    /// segments nothing needs any more. The caller has made the purge itself
    /// durable elsewhere first.
    pub fn release(&self, group: u64, upto: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(index) = inner.index.get_mut(&group) {
            *index = index.split_off(&(upto.saturating_add(1)));
        }
        // Only ever the oldest segment goes: a truncate record must not
        // disappear while entries it removed remain in an older segment.
        let mut dead = Vec::new();
        let mut moved = false;
        let oldest: Vec<u64> = inner.segments.keys().copied().collect();
        for seq in oldest {
            if seq == inner.current {
                break;
            }
            let live = live_entries(&inner, seq);
            let live_bytes: u64 = live.iter().map(|(_, _, loc)| u64::from(loc.len)).sum();
            if live_bytes > self.segment_bytes / 4 {
                break;
            }
            if !live.is_empty() {
                self.relocate(&mut inner, seq, &live)?;
                moved = true;
            }
            dead.push(seq);
        }
        if moved {
            // The copies must be durable before the originals go.
            let seg = &inner.segments[&inner.current];
            seg.file.sync_data().map_err(|e| io_error(&seg.path, e))?;
        }
        for seq in dead {
            if let Some(seg) = inner.segments.remove(&seq) {
                std::fs::remove_file(&seg.path).map_err(|e| io_error(&seg.path, e))?;
            }
        }
        Ok(())
    }

    /// Copies the `live` entries of segment `seq` to the end of the log. An
    /// entry still live was neither truncated nor rewritten since, so
    /// replaying the copy after everything written in between gives the
    /// same log.
    fn relocate(
        &self,
        inner: &mut Inner,
        seq: u64,
        live: &[(u64, u64, Loc)],
    ) -> Result<(), StoreError> {
        let seg = &inner.segments[&seq];
        let (file, path) = (seg.file.clone(), seg.path.clone());
        for (group, index, loc) in live {
            // Verified before it is copied: a fresh checksum over rotten
            // bytes would make them look sound for good.
            let bytes = read_verified(&file, &path, *group, *index, loc)?;
            let mut buf = Vec::with_capacity(RECORD_HEADER + PAYLOAD_HEADER + bytes.len());
            push_record(&mut buf, KIND_ENTRY, *group, *index, &bytes);
            let (segment, base) = self.write(inner, &buf)?;
            let entry = Loc {
                segment,
                offset: base + (RECORD_HEADER + PAYLOAD_HEADER) as u64,
                len: loc.len,
            };
            inner.index.entry(*group).or_default().insert(*index, entry);
        }
        tracing::debug!(
            segment = seq,
            entries = live.len(),
            "moved live log entries out of an old segment"
        );
        Ok(())
    }

    /// The encoded entries of `group` with indexes in `range`, in order.
    pub fn read(&self, group: u64, range: Range<u64>) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if range.start >= range.end {
            return Ok(Vec::new());
        }
        let wanted: Vec<(u64, Loc, Arc<File>, PathBuf)> = {
            let inner = self.lock();
            let Some(index) = inner.index.get(&group) else {
                return Ok(Vec::new());
            };
            index
                .range(range)
                .filter_map(|(i, loc)| {
                    let seg = inner.segments.get(&loc.segment)?;
                    Some((*i, *loc, seg.file.clone(), seg.path.clone()))
                })
                .collect()
        };
        // Read outside the lock: appends go on while replication reads. A
        // segment deleted meanwhile stays readable through its open file.
        let mut out = Vec::with_capacity(wanted.len());
        for (i, loc, file, path) in wanted {
            out.push((i, read_verified(&file, &path, group, i, &loc)?));
        }
        Ok(out)
    }

    /// The first and last entry index of `group`, if it has any.
    pub fn bounds(&self, group: u64) -> Option<(u64, u64)> {
        let inner = self.lock();
        let index = inner.index.get(&group)?;
        Some((*index.first_key_value()?.0, *index.last_key_value()?.0))
    }

    /// Makes every append and truncate issued so far durable.
    pub fn sync(&self) -> io::Result<()> {
        // Earlier segments were synced when the log left them; racing with a
        // move to a new segment is fine for the same reason.
        let file = {
            let inner = self.lock();
            inner.segments[&inner.current].file.clone()
        };
        file.sync_data()
    }

    /// Bytes the segment files occupy (preallocated space included).
    pub fn size_on_disk(&self) -> u64 {
        let inner = self.lock();
        inner.segments.values().map(|s| file_len(&s.file)).sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.lock().segments.len()
    }
}

/// Reads the entry at `loc` (entry `index` of `group`) with its record
/// and checks the record's checksum: bytes that rotted on disk since the
/// log was replayed are an error naming the file, group and index, never
/// data handed to Raft.
fn read_verified(
    file: &File,
    path: &Path,
    group: u64,
    index: u64,
    loc: &Loc,
) -> Result<Vec<u8>, StoreError> {
    let header = (RECORD_HEADER + PAYLOAD_HEADER) as u64;
    let start = loc
        .offset
        .checked_sub(header)
        .ok_or_else(|| StoreError::Corrupt {
            what: format!(
                "write-ahead log {}: entry offset {} inside a header",
                path.display(),
                loc.offset
            ),
        })?;
    let mut record = vec![0u8; RECORD_HEADER + PAYLOAD_HEADER + loc.len as usize];
    file.read_exact_at(&mut record, start)
        .map_err(|e| io_error(path, e))?;
    let crc = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
    if crc32fast::hash(&record[RECORD_HEADER..]) != crc {
        return Err(StoreError::Corrupt {
            what: format!(
                "write-ahead log {}: checksum mismatch in the record of group {group} entry \
                 {index} at offset {start} (the disk changed it after it was written)",
                path.display()
            ),
        });
    }
    record.drain(..RECORD_HEADER + PAYLOAD_HEADER);
    Ok(record)
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

fn io_error(path: &Path, e: io::Error) -> StoreError {
    StoreError::Flush(format!("write-ahead log {}: {e}", path.display()))
}

fn file_len(file: &File) -> u64 {
    file.metadata().map(|m| m.len()).unwrap_or(0)
}

fn push_record(buf: &mut Vec<u8>, kind: u8, group: u64, index: u64, data: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER]);
    buf.push(kind);
    buf.extend_from_slice(&group.to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(data);
    let payload = &buf[start + RECORD_HEADER..];
    let len = payload.len() as u32;
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn create_segment(path: &Path, bytes: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all_at(MAGIC, 0)?;
    write_zeros(&file, HEADER as u64, bytes)?;
    file.sync_all()?;
    Ok(file)
}

/// Overwrites the file with zeros from `from` to its end, durably.
fn zero_from(file: &File, from: u64) -> io::Result<()> {
    let len = file.metadata()?.len();
    if from >= len {
        return Ok(());
    }
    write_zeros(file, from, len)?;
    file.sync_data()
}

/// Writes zeros over `from..to`.
///
/// One page per write: the page cache keeps the folio size it was filled
/// with, and Linux 6.x fills a large write with folios of up to 2 MiB. A
/// record that dirties a byte of such a folio makes the next sync write the
/// whole folio back (measured here: 2 MiB per sync instead of 4 KiB).
fn write_zeros(file: &File, from: u64, to: u64) -> io::Result<()> {
    let chunk = vec![0u8; 4096];
    let mut at = from;
    while at < to {
        let n = chunk.len().min((to - at) as usize);
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The (group, index, location) of every entry still live in segment `seq`.
fn live_entries(inner: &Inner, seq: u64) -> Vec<(u64, u64, Loc)> {
    let mut out = Vec::new();
    for (group, index) in &inner.index {
        for (i, loc) in index {
            if loc.segment == seq {
                out.push((*group, *i, *loc));
            }
        }
    }
    out
}

/// Where the replay of one segment stopped.
struct ReplayEnd {
    /// Offset after the last good record.
    offset: u64,
    /// Set when the scan stopped at a bad record rather than at the end.
    bad_record: Option<u64>,
    /// Offset of a record after the bad one that still verifies.
    verified_after: Option<u64>,
}

/// Largest payload a record can have that a scan for valid records past a
/// bad one will check (entries are far smaller).
const MAX_SCANNED_PAYLOAD: usize = 64 * 1024 * 1024;

/// Whether a record verifies at `at`. The cheap plausibility checks come
/// before the checksum so that a scan over arbitrary bytes stays fast: a
/// real record's group id fits in 32 bits and its index in 48.
fn verifies_at(data: &[u8], at: usize) -> bool {
    let Some(header) = data.get(at..at + RECORD_HEADER + PAYLOAD_HEADER) else {
        return false;
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let payload = &header[RECORD_HEADER..];
    let plausible = (PAYLOAD_HEADER..=MAX_SCANNED_PAYLOAD).contains(&len)
        && matches!(payload[0], KIND_ENTRY | KIND_TRUNCATE)
        && payload[5..9] == [0, 0, 0, 0]
        && payload[15..17] == [0, 0];
    plausible
        && data
            .get(at + RECORD_HEADER..at + RECORD_HEADER + len)
            .is_some_and(|p| crc32fast::hash(p) == crc)
}

/// The first offset after `from` where a record verifies, if any. Records
/// are not aligned, so every offset is tried; zeroed space (a segment's
/// unwritten end) is skipped cheaply by its zero length.
fn next_verified_record(data: &[u8], from: usize) -> Option<usize> {
    let end = data.len().saturating_sub(RECORD_HEADER);
    let mut at = from;
    while at < end {
        if data[at..at + 4] == [0, 0, 0, 0] {
            // A record's length has a non-zero byte among its first four:
            // skip a run of zeros (a segment's unwritten end) in one go.
            let nonzero = at + data[at..].iter().position(|b| *b != 0)?;
            at = nonzero.saturating_sub(3).max(at + 1);
            continue;
        }
        if verifies_at(data, at) {
            return Some(at);
        }
        at += 1;
    }
    None
}

fn replay_segment(
    inner: &mut Inner,
    seq: u64,
    path: &Path,
    file: &mut File,
) -> Result<ReplayEnd, StoreError> {
    let mut data = Vec::new();
    io::Read::read_to_end(file, &mut data).map_err(|e| io_error(path, e))?;
    if data.len() < HEADER || &data[..HEADER] != MAGIC {
        return Err(StoreError::Corrupt {
            what: format!(
                "{} is not a palisade write-ahead log segment",
                path.display()
            ),
        });
    }
    let mut end = ReplayEnd {
        offset: HEADER as u64,
        bad_record: None,
        verified_after: None,
    };
    let mut at = HEADER;
    while let Some(header) = data.get(at..at + RECORD_HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 {
            // The end of what was written — unless a record that verifies
            // follows: then a zeroed block (a lost or misdirected write)
            // hides records, which is corruption like any bad record.
            if let Some(after) = next_verified_record(&data, at + 1) {
                end.bad_record = Some(at as u64);
                end.verified_after = Some(after as u64);
            }
            break;
        }
        let body = at + RECORD_HEADER;
        let payload = match data.get(body..body + len) {
            Some(p) if len >= PAYLOAD_HEADER && crc32fast::hash(p) == crc => p,
            _ => {
                end.bad_record = Some(at as u64);
                end.verified_after = next_verified_record(&data, at + 1).map(|o| o as u64);
                break;
            }
        };
        let kind = payload[0];
        let group = u64::from_le_bytes(payload[1..9].try_into().unwrap_or_default());
        let index = u64::from_le_bytes(payload[9..17].try_into().unwrap_or_default());
        match kind {
            KIND_ENTRY => {
                inner.index.entry(group).or_default().insert(
                    index,
                    Loc {
                        segment: seq,
                        offset: (body + PAYLOAD_HEADER) as u64,
                        len: (len - PAYLOAD_HEADER) as u32,
                    },
                );
            }
            KIND_TRUNCATE => {
                if let Some(entries) = inner.index.get_mut(&group) {
                    entries.split_off(&index);
                }
            }
            other => {
                return Err(StoreError::Corrupt {
                    what: format!(
                        "{}: record of unknown kind {other} at offset {at}",
                        path.display()
                    ),
                });
            }
        }
        at = body + len;
        end.offset = at as u64;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(group: u64, range: Range<u64>) -> Vec<(u64, Vec<u8>)> {
        range
            .map(|i| (i, format!("g{group}-e{i}").into_bytes()))
            .collect()
    }

    #[test]
    fn entries_survive_reopen_and_truncate_and_release_apply() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, &entries(1, 1..6)).unwrap();
        wal.append(2, &entries(2, 1..3)).unwrap();
        wal.truncate(1, 4).unwrap();
        wal.append(1, &[(4, b"new4".to_vec())]).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.bounds(1), Some((1, 4)));
        drop(wal);

        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        let got = wal.read(1, 0..100).unwrap();
        let want = vec![
            (1, b"g1-e1".to_vec()),
            (2, b"g1-e2".to_vec()),
            (3, b"g1-e3".to_vec()),
            (4, b"new4".to_vec()),
        ];
        assert_eq!(got, want);
        assert_eq!(wal.read(2, 2..3).unwrap(), vec![(2, b"g2-e2".to_vec())]);
        wal.release(1, 2).unwrap();
        assert_eq!(wal.bounds(1), Some((3, 4)));
        assert_eq!(wal.bounds(3), None);
    }

    #[test]
    fn a_corrupt_record_is_reported_then_cut_and_zeroed_so_nothing_stale_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, &entries(1, 1..4)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        // Corrupt one byte inside the second record's payload.
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let second = (HEADER + RECORD_HEADER + PAYLOAD_HEADER + 5 + RECORD_HEADER + 3) as u64;
        file.write_all_at(&[0xee], second).unwrap();
        drop(file);

        let mut seen = Vec::new();
        let wal = Wal::open_reporting(dir.path(), DEFAULT_SEGMENT_BYTES, |d| {
            seen.push(d.clone());
            Ok(())
        })
        .unwrap();
        // The third record still verifies: the second was damaged after it
        // was written whole, so this is corruption, reported before the cut.
        assert_eq!(seen.len(), 1);
        assert!(seen[0].is_corruption(), "{}", seen[0]);
        assert_eq!(wal.read(1, 0..10).unwrap(), entries(1, 1..2));
        // A new record of the same size lands where the damaged one was; the
        // third (stale, intact) record must not reappear after it.
        wal.append(1, &[(2, b"x1-e2".to_vec())]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        assert_eq!(
            wal.read(1, 0..10).unwrap(),
            vec![(1, b"g1-e1".to_vec()), (2, b"x1-e2".to_vec())]
        );
    }

    #[test]
    fn a_torn_last_write_is_told_apart_from_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, &entries(1, 1..4)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        // Tear the last record: its second half never reached the disk.
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let record = RECORD_HEADER + PAYLOAD_HEADER + 5;
        let third = (HEADER + 2 * record) as u64;
        file.write_all_at(&[0u8; 10], third + 12).unwrap();
        drop(file);
        let mut seen = Vec::new();
        let wal = Wal::open_reporting(dir.path(), DEFAULT_SEGMENT_BYTES, |d| {
            seen.push(d.clone());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].offset, third);
        assert!(!seen[0].is_corruption(), "{}", seen[0]);
        assert_eq!(wal.read(1, 0..10).unwrap(), entries(1, 1..3));
        drop(wal);
        // Cut and zeroed: the next open finds nothing bad.
        let wal = Wal::open_reporting(dir.path(), DEFAULT_SEGMENT_BYTES, |d| {
            panic!("reported again: {d}")
        })
        .unwrap();
        assert_eq!(wal.bounds(1), Some((1, 2)));
    }

    #[test]
    fn a_failed_damage_report_cuts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, &entries(1, 1..4)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xee; 4], (HEADER + RECORD_HEADER + 2) as u64)
            .unwrap();
        drop(file);
        let failed = Wal::open_reporting(dir.path(), DEFAULT_SEGMENT_BYTES, |_| {
            Err(StoreError::Flush("disk went away".into()))
        });
        assert!(failed.is_err());
        // Still there to be found (and reported) by the next open.
        let mut seen = 0;
        Wal::open_reporting(dir.path(), DEFAULT_SEGMENT_BYTES, |d| {
            assert!(d.is_corruption(), "{d}");
            seen += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, 1);
    }

    #[test]
    fn bytes_that_rot_after_replay_are_an_error_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(7, &entries(7, 1..4)).unwrap();
        wal.sync().unwrap();
        assert_eq!(wal.read(7, 1..4).unwrap(), entries(7, 1..4));
        // Flip a byte of entry 2's payload under the running log.
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let record = RECORD_HEADER + PAYLOAD_HEADER + 5;
        file.write_all_at(
            b"X",
            (HEADER + record + RECORD_HEADER + PAYLOAD_HEADER + 1) as u64,
        )
        .unwrap();
        drop(file);
        assert_eq!(wal.read(7, 1..2).unwrap(), entries(7, 1..2));
        match wal.read(7, 1..4) {
            Err(StoreError::Corrupt { what }) => {
                assert!(
                    what.contains("group 7 entry 2") && what.contains(".wal"),
                    "{what}"
                )
            }
            other => panic!("rotten bytes were read: {other:?}"),
        }
    }

    #[test]
    fn a_zeroed_block_hiding_records_is_corruption_not_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), DEFAULT_SEGMENT_BYTES).unwrap();
        wal.append(1, &entries(1, 1..4)).unwrap();
        wal.sync().unwrap();
        drop(wal);
        // The second record's header is zeroed (a lost write); the third
        // still verifies.
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        let record = RECORD_HEADER + PAYLOAD_HEADER + 5;
        let second = (HEADER + record) as u64;
        file.write_all_at(&[0u8; RECORD_HEADER], second).unwrap();
        drop(file);
        let mut seen = Vec::new();
        let wal = Wal::open_reporting(dir.path(), DEFAULT_SEGMENT_BYTES, |d| {
            seen.push(d.clone());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 1, "reported");
        assert_eq!(seen[0].offset, second);
        assert!(seen[0].is_corruption(), "{}", seen[0]);
        assert_eq!(wal.read(1, 0..10).unwrap(), entries(1, 1..2));
        // A clean log's zeroed end is just its end.
        drop(wal);
        Wal::open_reporting(dir.path(), DEFAULT_SEGMENT_BYTES, |d| panic!("{d}")).unwrap();
    }

    #[test]
    fn the_scan_past_a_bad_record_ignores_arbitrary_bytes() {
        // Bytes that are no record at all (noise) never verify; a record
        // placed at an odd offset among them is found.
        let mut data = vec![0u8; 64 * 1024];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert_eq!(next_verified_record(&data, 0), None);
        let mut rec = Vec::new();
        push_record(&mut rec, KIND_ENTRY, 3, 77, b"hello");
        data[40_001..40_001 + rec.len()].copy_from_slice(&rec);
        assert_eq!(next_verified_record(&data, 0), Some(40_001));
    }

    #[test]
    fn segments_go_once_purged_and_a_quiet_group_does_not_pin_them() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1024 * 1024;
        let wal = Wal::open(dir.path(), seg).unwrap();
        let big = vec![7u8; 100 * 1024];
        for i in 1..=30u64 {
            wal.append(1, &[(i, big.clone())]).unwrap();
            if i <= 2 {
                // A quiet group: two small entries in the first segment,
                // never purged.
                wal.append(2, &[(i, format!("quiet{i}").into_bytes())])
                    .unwrap();
            }
        }
        wal.sync().unwrap();
        let segments = wal.segment_count();
        assert!(segments >= 3, "{segments} segments");
        // Group 1's unpurged entries fill the old segments: nothing goes.
        wal.release(2, 0).unwrap();
        assert_eq!(wal.segment_count(), segments);
        // Once group 1 is purged, the quiet group's entries move to the end
        // of the log and every old segment goes.
        wal.release(1, 29).unwrap();
        assert_eq!(wal.segment_count(), 1, "only the current segment stays");
        let quiet = vec![(1, b"quiet1".to_vec()), (2, b"quiet2".to_vec())];
        assert_eq!(wal.read(2, 0..10).unwrap(), quiet);
        drop(wal);
        let wal = Wal::open(dir.path(), seg).unwrap();
        assert_eq!(wal.read(2, 0..10).unwrap(), quiet, "the copies are durable");
        assert_eq!(wal.bounds(1).map(|b| b.1), Some(30));
        assert_eq!(wal.read(1, 30..31).unwrap()[0].1, big);
    }

    #[test]
    fn a_bad_record_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1024 * 1024;
        let wal = Wal::open(dir.path(), seg).unwrap();
        let big = vec![7u8; 300 * 1024];
        for i in 1..=8u64 {
            wal.append(1, &[(i, big.clone())]).unwrap();
        }
        wal.sync().unwrap();
        assert!(wal.segment_count() >= 2);
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0xee; 4], (HEADER + RECORD_HEADER + 40) as u64)
            .unwrap();
        drop(file);
        match Wal::open(dir.path(), seg) {
            Err(StoreError::Corrupt { what }) => assert!(what.contains("bad record"), "{what}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("opened a corrupt log"),
        }
    }
}
