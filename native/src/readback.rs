//! Hashing bytes that are already on disk, straight from the page cache.
//!
//! A read-back (a part that landed past the whole-blob hash's frontier, or bytes kept from an earlier
//! run) used to `pread` into a buffer and hash the buffer: a copy of every such byte, which on a
//! legacy bucket was about a sixth of the client's CPU. Mapping the range and hashing the mapping
//! reads each byte once.
use std::fs::File;
use std::io;

use memmap2::MmapOptions;

/// Bytes mapped at a time: large enough that mapping costs little, small enough to keep the
/// mapped (resident) pages of a pull far below its memory budget.
const WINDOW: u64 = 8 << 20;

/// Feeds bytes `offset..offset + length` of `file` to `feed` (a running digest).
///
/// Fails (rather than faulting) when the file is shorter than the range: the caller's verdict then
/// says the blob was unreadable.
pub fn hash_range(
    file: &File,
    offset: u64,
    length: u64,
    mut feed: impl FnMut(&[u8]),
) -> io::Result<()> {
    if file.metadata()?.len() < offset + length {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut done = 0u64;
    while done < length {
        let len = (length - done).min(WINDOW);
        // SAFETY: the range is inside the file (checked above), and every byte of it is final: the
        // callers map only bytes that are written and will not be written again by this process,
        // and the pull's lock keeps other agents off the partial file. Only an outside process
        // truncating the file meanwhile could make an access fault.
        let map = unsafe {
            MmapOptions::new()
                .offset(offset + done)
                .len(len as usize)
                .populate()
                .map(file)?
        };
        feed(&map);
        done += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::digest::{digest, Context, SHA256};

    #[test]
    fn a_range_across_windows_hashes_like_the_bytes() {
        let dir = std::env::temp_dir().join(format!("readback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("blob");
        let data: Vec<u8> = (0..(WINDOW as usize * 2 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let file = File::open(&path).unwrap();
        // an unaligned start, more than two windows long
        let (start, end) = (4097usize, data.len() - 3);
        let mut context = Context::new(&SHA256);
        hash_range(&file, start as u64, (end - start) as u64, |b| {
            context.update(b)
        })
        .unwrap();
        let expected = digest(&SHA256, &data[start..end]);
        assert_eq!(context.finish().as_ref(), expected.as_ref());
        let past_the_end = hash_range(&file, 10, data.len() as u64, |_| ());
        assert_eq!(
            past_the_end.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
