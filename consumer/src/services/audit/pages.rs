//! Entry pages in append-only segment files beside the store, not in sled.
//!
//! sled rewrites a tree node whole every few changes and splits it as it grows,
//! so each page stored in it was written about 2.5 times; here a page is written
//! once. The log addresses pages by one growing byte position: segment
//! `position / SEGMENT_BYTES`, at `position % SEGMENT_BYTES` in it (a page does
//! not cross into the next segment unless it alone is larger). sled keeps where
//! each page is ([`Place`], under the page's key) and where the next one goes
//! ([`END`]), both in the batch's atomic write, and the seal makes the pages
//! durable before that write. So the store never points at bytes that are not
//! on disk, and what a crash left past [`END`] is cut off at the next start (or
//! overwritten: a seal writes at the committed end).
//!
//! Pruning removes the places; a segment file goes once no kept page is in it.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use super::bytes::{read_u64, Writes};
use crate::runtime::{Store, StoreError};

/// Prefix of where entry pages are.
pub const ENTRIES: &[u8] = b"audit/entries/";

/// The key of the page whose first entry is at `first`.
pub fn page_key(first: u64) -> Vec<u8> {
    [ENTRIES, &first.to_be_bytes()[..]].concat()
}

/// The directory, in the store's, of the segment files.
pub const DIR: &str = "audit-pages";
/// Key of the position the next page is written at.
pub const END: &[u8] = b"audit/pages_end";
/// A segment file takes no more pages once this full.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Where a stored page is: its position and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// Position in the log of pages.
    pub at: u64,
    /// Bytes.
    pub len: u32,
}

impl Place {
    /// The place as stored under a page's key.
    pub fn encode(&self) -> Vec<u8> {
        [&self.at.to_be_bytes()[..], &self.len.to_be_bytes()].concat()
    }

    /// A stored place; `None` when the value is not one (an altered store).
    pub fn decode(value: &[u8]) -> Option<Self> {
        let (at, len) = value.split_first_chunk::<8>()?;
        Some(Self {
            at: u64::from_be_bytes(*at),
            len: u32::from_be_bytes(len.try_into().ok()?),
        })
    }

    fn segment(&self) -> u64 {
        self.at / SEGMENT_BYTES
    }

    fn offset(&self) -> u64 {
        self.at % SEGMENT_BYTES
    }
}

/// The segment files of a store.
#[derive(Debug, Clone)]
pub struct Pages {
    dir: PathBuf,
}

impl Pages {
    /// The pages of the store at `store`'s directory.
    pub fn of(store: &Store) -> Self {
        Self::in_dir(store.dir())
    }

    /// The pages of the store in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self { dir: dir.join(DIR) }
    }

    fn segment_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:08}.pages"))
    }

    /// Writes `pages` (`(first index, stored page)`) from `end` on, each after
    /// the last, and makes them durable. Returns the writes that record their
    /// places and the new end.
    pub fn write(&self, end: u64, pages: &[(u64, Vec<u8>)]) -> Result<Writes, StoreError> {
        let (places, new_end) = placed(end, pages.iter().map(|(_, page)| page.len()));
        let mut run: Vec<(Place, &[u8])> = Vec::new();
        for (place, (_, page)) in places.iter().zip(pages) {
            if run
                .first()
                .is_some_and(|(first, _)| first.segment() != place.segment())
            {
                self.write_run(&run)?;
                run.clear();
            }
            run.push((*place, page));
        }
        if !run.is_empty() {
            self.write_run(&run)?;
        }
        let mut writes: Writes = (pages.iter().zip(&places))
            .map(|((first, _), place)| (page_key(*first), place.encode()))
            .collect();
        writes.push((END.to_vec(), new_end.to_be_bytes().to_vec()));
        Ok(writes)
    }

    /// Writes pages placed one after the other in one segment, durably.
    fn write_run(&self, run: &[(Place, &[u8])]) -> Result<(), StoreError> {
        let Some((first, _)) = run.first() else {
            return Ok(());
        };
        let mut bytes = Vec::with_capacity(run.iter().map(|(_, page)| page.len()).sum());
        for (_, page) in run {
            bytes.extend_from_slice(page);
        }
        let file = self.open_for_writing(first.segment())?;
        file.write_all_at(&bytes, first.offset()).map_err(io)?;
        file.sync_data().map_err(io)
    }

    fn open_for_writing(&self, segment: u64) -> Result<File, StoreError> {
        let path = self.segment_path(segment);
        let exists = path.exists();
        if !exists {
            std::fs::create_dir_all(&self.dir).map_err(io)?;
        }
        let file = (OpenOptions::new().create(true).write(true).truncate(false))
            .open(&path)
            .map_err(io)?;
        if !exists {
            // The new file's name must be as durable as the pages in it.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(file)
    }

    /// The stored page at `place` (compressed as written); empty when the bytes
    /// are not there (a segment file deleted or cut short: an altered store).
    pub fn read(&self, place: Place) -> Result<Vec<u8>, StoreError> {
        let file = match File::open(self.segment_path(place.segment())) {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut page = vec![0; place.len as usize];
        match file.read_exact_at(&mut page, place.offset()) {
            Ok(()) => Ok(page),
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(Vec::new()),
            Err(e) => Err(io(e)),
        }
    }

    /// Cuts off what a crash left past `end` (pages written, their places never
    /// committed).
    pub fn cut_after(&self, end: u64) -> Result<(), StoreError> {
        let last = end / SEGMENT_BYTES;
        for segment in self.segments()? {
            if segment > last {
                std::fs::remove_file(self.segment_path(segment)).map_err(io)?;
            }
        }
        let path = self.segment_path(last);
        if path.exists() {
            let file = OpenOptions::new().write(true).open(&path).map_err(io)?;
            file.set_len(end % SEGMENT_BYTES).map_err(io)?;
        }
        Ok(())
    }

    /// Deletes the segment files wholly before position `at` (no kept page is
    /// in them); returns how many went.
    pub fn remove_before(&self, at: u64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for segment in self.segments()? {
            if (segment + 1) * SEGMENT_BYTES <= at {
                std::fs::remove_file(self.segment_path(segment)).map_err(io)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The segment files there are, by number.
    fn segments(&self) -> Result<Vec<u64>, StoreError> {
        numbered_files(&self.dir, ".pages", |n| n.parse().ok())
    }

    /// Bytes the segment files take.
    pub fn bytes_on_disk(&self) -> Result<u64, StoreError> {
        let mut bytes = 0;
        for segment in self.segments()? {
            let meta = std::fs::metadata(self.segment_path(segment)).map_err(io)?;
            bytes += meta.len();
        }
        Ok(bytes)
    }
}

/// The places of pages of `lengths`, written from `end` on, and the end after
/// them: each right after the one before, unless it would run past its
/// segment's end (then at the next segment's start).
pub fn placed(end: u64, lengths: impl Iterator<Item = usize>) -> (Vec<Place>, u64) {
    let mut at = end;
    let places = lengths
        .map(|len| {
            let offset = at % SEGMENT_BYTES;
            if offset > 0 && offset + len as u64 > SEGMENT_BYTES {
                at += SEGMENT_BYTES - offset;
            }
            let place = Place {
                at,
                len: len as u32,
            };
            at += len as u64;
            place
        })
        .collect();
    (places, at)
}

/// The position the next page goes to, as committed.
pub fn committed_end(store: &Store) -> Result<u64, StoreError> {
    Ok(read_u64(store.get(END)?.as_deref()))
}

/// An I/O error as the store's.
pub(super) fn io(error: std::io::Error) -> StoreError {
    StoreError::from(sled::Error::Io(error))
}

/// The numbers of the files in `dir` named `<number><suffix>`, read by `parse`;
/// none if `dir` is not there yet.
pub(super) fn numbered_files(
    dir: &Path,
    suffix: &str,
    parse: fn(&str) -> Option<u64>,
) -> Result<Vec<u64>, StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    let mut numbers = Vec::new();
    for entry in entries {
        let name = entry.map_err(io)?.file_name();
        let number = (name.to_str())
            .and_then(|n| n.strip_suffix(suffix))
            .and_then(parse);
        numbers.extend(number);
    }
    Ok(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_each_other_and_start_a_new_segment_rather_than_cross_one() {
        let full = SEGMENT_BYTES as usize;
        let (places, end) = placed(10, [5, 7].into_iter());
        assert_eq!(places, [Place { at: 10, len: 5 }, Place { at: 15, len: 7 }]);
        assert_eq!(end, 22);

        let near_end = SEGMENT_BYTES - 4;
        let (places, end) = placed(near_end, [4, 3].into_iter());
        assert_eq!(places[0].at, near_end, "fits exactly");
        assert_eq!(places[1].at, SEGMENT_BYTES, "the next starts segment 1");
        assert_eq!((places[1].segment(), places[1].offset()), (1, 0));
        assert_eq!(end, SEGMENT_BYTES + 3);

        let (places, end) = placed(SEGMENT_BYTES + 1, [full + 9, 1].into_iter());
        assert_eq!(
            places[0].at,
            2 * SEGMENT_BYTES,
            "a huge page starts a segment"
        );
        assert_eq!(places[0].segment(), 2, "and fills that file alone");
        assert_eq!(
            places[1].at,
            3 * SEGMENT_BYTES + 9,
            "the next one goes after it"
        );
        assert_eq!((places[1].segment(), end), (3, 3 * SEGMENT_BYTES + 10));
    }

    #[test]
    fn a_place_reads_back_and_a_malformed_one_is_refused() {
        let place = Place {
            at: 1 << 40,
            len: 77,
        };
        assert_eq!(Place::decode(&place.encode()), Some(place));
        assert_eq!(Place::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn written_pages_read_back_and_a_crash_tail_is_cut() -> Result<(), StoreError> {
        let dir = std::env::temp_dir().join(format!("cw-pages-{}", std::process::id()));
        let pages = Pages::in_dir(&dir);
        let written = [(0, b"first".to_vec()), (5, b"second page".to_vec())];
        let writes = pages.write(0, &written)?;
        let place = |i: usize| Place::decode(&writes[i].1).expect("a place");
        assert_eq!(pages.read(place(1))?, b"second page");
        assert_eq!(
            writes
                .last()
                .map(|(k, v)| (k.as_slice(), read_u64(Some(v)))),
            Some((END, 16))
        );

        pages.write(16, &[(9, b"uncommitted".to_vec())])?;
        pages.cut_after(16)?;
        assert_eq!(pages.bytes_on_disk()?, 16);
        assert_eq!(pages.read(Place { at: 16, len: 11 })?, b"", "gone");
        assert_eq!(pages.read(place(0))?, b"first");
        assert_eq!(pages.remove_before(SEGMENT_BYTES)?, 1);
        assert_eq!(
            pages.read(place(0))?,
            b"",
            "a removed segment reads as missing"
        );
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
