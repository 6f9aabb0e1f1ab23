//! The disk-space alarm: a node stops taking writes that grow its data
//! while its filesystem has less free space than a reserve, instead of
//! running into `ENOSPC` (which would stop its Raft groups mid-append).
//!
//! The reserve is what the node may still use while the alarm is on: the
//! writes already in flight, deletes and compaction (which shrink the data
//! later but append to the log now), and the Raft traffic that keeps the
//! groups alive. Below half the reserve (the *floor*) a follower stops
//! storing entries that add data at all: it lags until space is freed. The
//! alarm clears by itself once space is freed (with a margin, so it does
//! not flap at the edge).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Default reserve: enough for a few write-ahead log segments and sled's
/// own growth while the alarm stops new data.
pub const DEFAULT_RESERVE_BYTES: u64 = 256 * 1024 * 1024;

/// Free space of the node's data filesystem, and the alarm it drives.
/// Cloning shares it.
#[derive(Clone, Debug)]
pub struct DiskGuard {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    reserve: AtomicU64,
    free: AtomicU64,
    full: AtomicBool,
}

/// What a [`DiskGuard::check`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmChange {
    Raised,
    Cleared,
    Unchanged,
}

impl DiskGuard {
    /// A guard of the filesystem holding `path`, with no reserve (never
    /// full) until [`Self::set_reserve`].
    pub fn new(path: &Path) -> Self {
        Self {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                reserve: AtomicU64::new(0),
                free: AtomicU64::new(u64::MAX),
                full: AtomicBool::new(false),
            }),
        }
    }

    pub fn set_reserve(&self, bytes: u64) {
        self.inner.reserve.store(bytes, Ordering::Relaxed);
    }

    pub fn reserve(&self) -> u64 {
        self.inner.reserve.load(Ordering::Relaxed)
    }

    /// Whether the alarm is on: writes that grow the data are refused.
    pub fn is_full(&self) -> bool {
        self.inner.full.load(Ordering::Relaxed)
    }

    /// Whether free space is below the floor (half the reserve): entries
    /// that add data are no longer stored at all.
    pub fn below_floor(&self) -> bool {
        self.is_full() && self.free_bytes() < self.reserve() / 2
    }

    /// Free bytes at the last check (available to this process).
    pub fn free_bytes(&self) -> u64 {
        self.inner.free.load(Ordering::Relaxed)
    }

    /// Measures the free space and updates the alarm: on below the
    /// reserve, off again at 1.25 × the reserve.
    pub fn check(&self) -> std::io::Result<AlarmChange> {
        let free = free_bytes(&self.inner.path)?;
        Ok(self.update(free))
    }

    /// Updates the alarm from a measurement of `free` bytes.
    pub fn update(&self, free: u64) -> AlarmChange {
        self.inner.free.store(free, Ordering::Relaxed);
        let reserve = self.reserve();
        let was = self.is_full();
        let now = if was {
            free < reserve.saturating_add(reserve / 4)
        } else {
            free < reserve
        };
        self.inner.full.store(now, Ordering::Relaxed);
        match (was, now) {
            (false, true) => AlarmChange::Raised,
            (true, false) => AlarmChange::Cleared,
            _ => AlarmChange::Unchanged,
        }
    }
}

/// Bytes available to an unprivileged writer on the filesystem of `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid C string and `st` is written by statvfs on
    // success (checked) before it is read.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alarm_rises_below_the_reserve_and_clears_with_a_margin() {
        let dir = tempfile::tempdir().unwrap();
        let guard = DiskGuard::new(dir.path());
        assert!(
            guard.check().unwrap() == AlarmChange::Unchanged,
            "no reserve: never full"
        );
        assert!(guard.free_bytes() > 0 && guard.free_bytes() < u64::MAX);
        guard.set_reserve(1000);
        assert_eq!(guard.update(999), AlarmChange::Raised);
        assert!(guard.is_full() && !guard.below_floor());
        assert_eq!(guard.update(499), AlarmChange::Unchanged);
        assert!(guard.below_floor());
        assert_eq!(
            guard.update(1100),
            AlarmChange::Unchanged,
            "within the margin"
        );
        assert!(guard.is_full());
        assert_eq!(guard.update(1250), AlarmChange::Cleared);
        assert!(!guard.is_full());
        assert_eq!(guard.update(1000), AlarmChange::Unchanged);
    }
}
