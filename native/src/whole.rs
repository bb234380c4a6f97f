//! The whole-blob hash of one job, computed in one pass while its parts arrive.
//!
//! A blob is hashed strictly in file order. The "frontier" is how far that hash has read. A worker
//! whose chunk lands exactly at the frontier feeds it straight from memory; bytes that landed past
//! it (parts finished out of order, or kept on disk from an earlier run) are read back from the page
//! cache (mapped, not copied) when the frontier reaches them. Parts are scheduled in file order, so the frontier follows
//! the transfer closely and nothing is read twice from the network or hashed twice.
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use ring::digest::{Context, SHA1_FOR_LEGACY_USE_ONLY, SHA256};

use crate::readback::hash_range;
use crate::spec::{to_hex, PartSpec};

/// Which digest names the blob: huggingface_hub's LFS sha256, or git's blob sha1.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Algorithm {
    Sha256,
    GitSha1,
}

impl Algorithm {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "git-sha1" => Some(Algorithm::GitSha1),
            _ => None,
        }
    }

    fn start(self, size: u64) -> Context {
        match self {
            Algorithm::Sha256 => Context::new(&SHA256),
            Algorithm::GitSha1 => {
                let mut ctx = Context::new(&SHA1_FOR_LEGACY_USE_ONLY);
                ctx.update(format!("blob {size}\0").as_bytes());
                ctx
            }
        }
    }
}

/// The digest a whole blob must have.
pub struct WholeSpec {
    pub algorithm: Algorithm,
    pub expected: Vec<u8>,
}

/// The verdict on one blob: its digest, and whether it is the expected one.
pub struct Verdict {
    pub job_index: usize,
    pub ok: bool,
    pub actual: String,
}

struct Cursor {
    pos: u64,
    context: Option<Context>, // None once finished
}

/// One job's hash frontier and the bytes each of its parts has made ready for it.
pub struct Frontier {
    size: u64,
    expected: Vec<u8>,
    cursor: Mutex<Cursor>,
    /// Per part (in job order, sorted by offset): contiguous bytes from its start that are on disk
    /// and final. A part checked against its own digest publishes only once that check passed, so
    /// the whole hash never reads bytes that may yet be replaced.
    ready: Vec<AtomicU64>,
    offsets: Vec<(u64, u64)>,
    parts_left: AtomicUsize,
}

impl Frontier {
    pub fn new(spec: &WholeSpec, size: u64, parts: &[PartSpec]) -> Self {
        Frontier {
            size,
            expected: spec.expected.clone(),
            cursor: Mutex::new(Cursor {
                pos: 0,
                context: Some(spec.algorithm.start(size)),
            }),
            ready: parts.iter().map(|_| AtomicU64::new(0)).collect(),
            offsets: parts.iter().map(|p| (p.offset, p.length)).collect(),
            parts_left: AtomicUsize::new(parts.len()),
        }
    }

    /// Part `position` now has `ready` bytes final on disk; `chunk`, if given, holds the bytes
    /// just written at `at`, to feed the hash without reading them back. Never waits for the lock:
    /// whoever holds it will be followed by the finishing pass. True when bytes past the frontier
    /// are ready to be read back ([`Frontier::catch_up`], best run off the async threads).
    pub fn advance(&self, position: usize, ready: u64, at: u64, chunk: Option<&[u8]>) -> bool {
        self.ready[position].store(ready, Ordering::Release);
        let Some(mut guard) = self.try_lock() else {
            return false;
        };
        let cursor = &mut *guard;
        if let (Some(data), Some(context)) = (chunk, cursor.context.as_mut()) {
            if cursor.pos == at {
                context.update(data);
                cursor.pos += data.len() as u64;
            }
        }
        cursor.context.is_some() && self.ready_until(cursor.pos) > cursor.pos
    }

    /// Reads back and hashes what is ready past the frontier, unless another worker is at it.
    pub fn catch_up(&self, path: &Path) {
        if let Some(mut cursor) = self.try_lock() {
            // A failed read-back is not an error here: the finishing pass reads again and decides.
            let _ = self.read_back(&mut cursor, path);
        }
    }

    /// Counts a finished part; true for the caller that finished the job's last one.
    pub fn part_finished(&self) -> bool {
        self.parts_left.fetch_sub(1, Ordering::AcqRel) == 1
    }

    pub fn has_parts(&self) -> bool {
        !self.offsets.is_empty()
    }

    /// Once every part is in: hash whatever the frontier has not reached, and judge the blob.
    pub fn finish(&self, job_index: usize, path: &Path) -> Verdict {
        let mut cursor = self.lock();
        let read = self.read_back(&mut cursor, path);
        let context = cursor.context.take();
        let complete = read.is_ok() && cursor.pos == self.size;
        let actual = context.map(|c| to_hex(c.finish().as_ref()));
        let actual = match (complete, actual) {
            (true, Some(hex)) => hex,
            (false, _) => format!("unreadable after {} of {} bytes", cursor.pos, self.size),
            (true, None) => "already judged".to_owned(),
        };
        Verdict {
            job_index,
            ok: complete && actual == to_hex(&self.expected),
            actual,
        }
    }

    /// Reads back and hashes every byte from the frontier up to the first one not yet ready.
    fn read_back(&self, cursor: &mut Cursor, path: &Path) -> std::io::Result<()> {
        let mut file: Option<File> = None;
        loop {
            let limit = self.ready_until(cursor.pos);
            let Some(context) = cursor.context.as_mut() else {
                return Ok(());
            };
            if limit <= cursor.pos {
                return Ok(());
            }
            if file.is_none() {
                file = Some(File::open(path)?);
            }
            let opened = file.as_ref().expect("opened above");
            hash_range(opened, cursor.pos, limit - cursor.pos, |bytes| {
                context.update(bytes)
            })?;
            cursor.pos = limit;
        }
    }

    /// The end of the ready run that starts at `pos`: inside a part, as far as that part is ready;
    /// between parts (bytes kept from an earlier run), up to the next part.
    fn ready_until(&self, pos: u64) -> u64 {
        let after = self.offsets.partition_point(|&(offset, _)| offset <= pos);
        if after > 0 {
            let (offset, length) = self.offsets[after - 1];
            if pos < offset + length {
                return offset + self.ready[after - 1].load(Ordering::Acquire);
            }
        }
        self.offsets
            .get(after)
            .map_or(self.size, |&(offset, _)| offset)
    }

    fn lock(&self) -> MutexGuard<'_, Cursor> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_lock(&self) -> Option<MutexGuard<'_, Cursor>> {
        match self.cursor.try_lock() {
            Ok(cursor) => Some(cursor),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(index: usize, offset: u64, length: u64) -> PartSpec {
        PartSpec {
            index,
            offset,
            length,
            digest: None,
            kept: 0,
            lead: 0,
            trail: 0,
        }
    }

    fn sha256_spec(data: &[u8]) -> WholeSpec {
        WholeSpec {
            algorithm: Algorithm::Sha256,
            expected: ring::digest::digest(&SHA256, data).as_ref().to_vec(),
        }
    }

    #[test]
    fn out_of_order_parts_and_kept_bytes_hash_in_file_order() {
        let dir = std::env::temp_dir().join(format!("whole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        let data: Vec<u8> = (0..100u8).collect();
        std::fs::write(&path, &data).unwrap();
        // bytes 0-19 were kept from an earlier run; parts cover 20-59 and 60-99
        let parts = [part(0, 20, 40), part(1, 60, 40)];
        let frontier = Frontier::new(&sha256_spec(&data), 100, &parts);
        // the later part first: the frontier cannot pass byte 20 yet, but bytes 0-19 are ready
        assert!(frontier.advance(1, 40, 60, None));
        frontier.catch_up(&path);
        assert!(!frontier.advance(0, 10, 20, Some(&data[20..30])));
        assert!(!frontier.part_finished());
        assert!(frontier.advance(0, 40, 30, None));
        assert!(frontier.part_finished());
        let verdict = frontier.finish(3, &path);
        assert!(verdict.ok, "{}", verdict.actual);
        assert_eq!(verdict.job_index, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn git_sha1_hashes_the_blob_header() {
        let dir = std::env::temp_dir().join(format!("whole-git-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        std::fs::write(&path, b"hello\n").unwrap();
        let spec = WholeSpec {
            algorithm: Algorithm::GitSha1,
            expected: crate::spec::parse_hex("ce013625030ba8dba906f756967f9e9ca394464a").unwrap(),
        };
        let frontier = Frontier::new(&spec, 6, &[]);
        assert!(frontier.finish(0, &path).ok);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_short_file_is_a_failed_verdict_not_a_panic() {
        let dir = std::env::temp_dir().join(format!("whole-short-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        std::fs::write(&path, b"abc").unwrap();
        let frontier = Frontier::new(&sha256_spec(b"abcdef"), 6, &[]);
        let verdict = frontier.finish(0, &path);
        assert!(!verdict.ok);
        assert!(
            verdict.actual.starts_with("unreadable"),
            "{}",
            verdict.actual
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
