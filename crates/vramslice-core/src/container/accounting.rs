//! Layout of the per-container accounting file shared by the guard (writer), the device plugin
//! and the sidecar (readers), and a safe parser for it.
//!
//! The file is `ACCOUNTING_FILE_NAME` inside `VRAMSLICE_ACCOUNTING_DIR` (under per-GPU limits one
//! file per GPU, [`gpu_accounting_file_name`]). It is an array of
//! little-endian 64-bit words so that the guard can update every counter with one atomic
//! instruction on a shared memory mapping; this module only describes the words and validates
//! a byte image of them, it never touches a file.
//!
//! ```text
//! header (16 words = 128 bytes)
//!   w0  magic  b"VRSLACCT"          w8..w13 GPU UUID, 48 bytes, NUL padded
//!   w1  version (1)                  w14 checksum of the fixed fields (w0..w5, w8..w13)
//!   w2  header bytes (128)           w15 flags (reserved, 0)
//!   w3  slot count
//!   w4  slot bytes (64)
//!   w5  limit in bytes written by the creator
//!   w6  used bytes of the whole container (the reservation counter)
//!   w7  generation: bumped on every slot claim
//! slots (slot count × 8 words = 64 bytes, one cache line each)
//!   s0 pid (0 = free; `SLOT_REAPING_BIT` set while a reaper empties the slot)
//!   s1 process start time (clock ticks since boot, /proc/<pid>/stat field 22; 0 = not yet known)
//!   s2 generation at claim
//!   s3 bytes this process holds       s4 peak bytes of this process
//!   s5 update counter: low 32 bits = updates in flight that lower s3 or free the slot,
//!      high 32 bits = such updates completed (wrapping); lets a validator take a consistent view
//!   s6..s7 reserved (0)
//! ```
//!
//! The container total (w6) is the authority for admission: a process reserves by a
//! compare-and-swap on it, then adds the same amount to its own slot. Slots say who holds what
//! and let a dead process's share be returned.

use thiserror::Error;

/// File name of the accounting file inside the accounting directory.
pub const ACCOUNTING_FILE_NAME: &str = "vramslice-accounting.v1";
/// File name of one GPU's accounting file under per-GPU limits (`limits=` in the limit file, or
/// `VRAMSLICE_VRAM_LIMITS`): `vramslice-accounting.v1.<uuid>` inside the accounting directory,
/// one file of this layout per GPU, its header recording that GPU's UUID and limit. `uuid` is a
/// UUID of `vramslice_core::container::limit::GpuLimits`, which is always a safe file-name part.
/// Under one limit for the container the file is [`ACCOUNTING_FILE_NAME`] itself.
pub fn gpu_accounting_file_name(gpu_uuid: &str) -> String {
    format!("{ACCOUNTING_FILE_NAME}.{gpu_uuid}")
}

/// First eight bytes of the file.
pub const MAGIC: [u8; 8] = *b"VRSLACCT";
/// Layout version this module describes.
pub const VERSION: u64 = 1;
/// Words in the header.
pub const HEADER_WORDS: usize = 16;
/// Bytes in the header.
pub const HEADER_BYTES: usize = HEADER_WORDS * 8;
/// Words in one per-process slot.
pub const SLOT_WORDS: usize = 8;
/// Bytes in one per-process slot (one cache line, so processes do not share lines).
pub const SLOT_BYTES: usize = SLOT_WORDS * 8;
/// Slots a file made by the guard has: the most processes one container accounts separately.
pub const DEFAULT_SLOT_COUNT: usize = 256;
/// Largest slot count the parser accepts (a bound against absurd headers).
pub const MAX_SLOT_COUNT: usize = 65_536;
/// Bytes reserved for the GPU UUID (NUL padded, UTF-8).
pub const UUID_BYTES: usize = 48;
/// Set in a slot's pid word while a reaper returns the dead owner's bytes.
pub const SLOT_REAPING_BIT: u64 = 1 << 63;

/// Word indexes of the header fields.
pub mod header {
    /// Magic bytes.
    pub const MAGIC: usize = 0;
    /// Layout version.
    pub const VERSION: usize = 1;
    /// Header size in bytes.
    pub const HEADER_BYTES: usize = 2;
    /// Number of slots.
    pub const SLOT_COUNT: usize = 3;
    /// Size of one slot in bytes.
    pub const SLOT_BYTES: usize = 4;
    /// Limit in bytes recorded by the creator.
    pub const LIMIT: usize = 5;
    /// Bytes reserved by the whole container.
    pub const USED: usize = 6;
    /// Claim generation counter.
    pub const GENERATION: usize = 7;
    /// First word of the GPU UUID.
    pub const UUID: usize = 8;
    /// Checksum of the fixed fields.
    pub const CHECKSUM: usize = 14;
    /// Reserved flags.
    pub const FLAGS: usize = 15;
}

/// Word offsets inside a slot.
pub mod slot {
    /// Owner pid (0 = free).
    pub const PID: usize = 0;
    /// Owner's start time in clock ticks since boot.
    pub const START_TIME: usize = 1;
    /// Generation at claim.
    pub const GENERATION: usize = 2;
    /// Bytes held.
    pub const BYTES: usize = 3;
    /// Peak bytes held.
    pub const PEAK: usize = 4;
    /// Update counter (low 32 bits: lowering updates in flight; high 32 bits: completed ones).
    pub const OPS: usize = 5;
    /// [`slot_lock_mark`](super::slot_lock_mark)`(pid)` when the owner holds a read lock (`fcntl`) on byte `<slot index>` of the slot lock
    /// file ([`SLOT_LOCK_SUFFIX`](super::SLOT_LOCK_SUFFIX)): while that lock is held the owner is alive, whatever its
    /// PID namespace (containers sharing a DRA claim share its accounting directory, not their
    /// PIDs); the kernel drops it when the process ends. A lock not held is judged by pid and
    /// start time (an owner that closed a descriptor of the lock file lost its locks alive), as
    /// is 0 (files of earlier versions, or no lock file) and a mark that names another pid.
    pub const LOCKED: usize = 6;
}

/// The [`slot::LOCKED`] mark of a slot whose owner `pid` holds its lock: the pid with a tag, so
/// a mark left by an earlier owner never vouches for another.
pub const fn slot_lock_mark(pid: u64) -> u64 {
    (1 << 62) | pid
}

/// The slot lock file beside an accounting file: `<accounting file><SLOT_LOCK_SUFFIX>`, one
/// byte per slot (see [`slot::LOCKED`]). Only the guard opens it: a process that closes any
/// descriptor of a file loses its `fcntl` locks on it.
pub const SLOT_LOCK_SUFFIX: &str = ".slots";

/// Word index of `field` (one of [`slot`]'s constants) of slot `index`.
pub const fn slot_word(index: usize, field: usize) -> usize {
    HEADER_WORDS + index * SLOT_WORDS + field
}

/// Total file size in bytes for `slot_count` slots.
pub const fn file_len(slot_count: usize) -> usize {
    HEADER_BYTES + slot_count * SLOT_BYTES
}

/// Why a byte image is not a valid accounting file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AccountingError {
    /// Fewer bytes than a header.
    #[error("accounting file is truncated: {len} bytes, a header alone needs {HEADER_BYTES}")]
    TooShort {
        /// Bytes present.
        len: usize,
    },
    /// Wrong magic bytes.
    #[error("accounting file has wrong magic bytes {found:?}, expected \"VRSLACCT\"")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// A version this reader does not know.
    #[error(
        "accounting file version {found} is not supported (this reader knows version {VERSION})"
    )]
    UnsupportedVersion {
        /// The version found.
        found: u64,
    },
    /// Header or slot sizes differ from this layout, or the slot count is absurd.
    #[error("accounting file geometry is invalid: {0}")]
    BadGeometry(String),
    /// The file is shorter than its header says.
    #[error("accounting file is truncated: {len} bytes, its header describes {expected}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header describes.
        expected: usize,
    },
    /// The fixed header fields were changed after creation.
    #[error("accounting file header checksum mismatch: stored {stored:#x}, computed {computed:#x}")]
    ChecksumMismatch {
        /// Stored checksum.
        stored: u64,
        /// Checksum of the fields as found.
        computed: u64,
    },
}

/// One occupied slot as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSnapshot {
    /// Slot index.
    pub index: usize,
    /// Owner pid (in the container's PID namespace).
    pub pid: u32,
    /// Owner start time (clock ticks since boot); 0 when not yet written.
    pub start_time: u64,
    /// Generation at claim.
    pub generation: u64,
    /// Bytes held by the process.
    pub bytes: u64,
    /// Peak bytes held by the process.
    pub peak: u64,
    /// A reaper is returning this dead process's bytes right now.
    pub reaping: bool,
}

/// A validated accounting file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountingSnapshot {
    /// Layout version.
    pub version: u64,
    /// Limit in bytes the creator recorded.
    pub limit_bytes: u64,
    /// Bytes reserved by the whole container (the admission counter).
    pub used_bytes: u64,
    /// Claim generation counter.
    pub generation: u64,
    /// GPU UUID the creator recorded (empty when unknown).
    pub gpu_uuid: String,
    /// Number of slots in the file.
    pub slot_count: usize,
    /// Occupied slots, in index order.
    pub slots: Vec<SlotSnapshot>,
}

impl AccountingSnapshot {
    /// Sum of the bytes the occupied slots hold (saturating).
    pub fn slot_bytes_sum(&self) -> u64 {
        self.slots
            .iter()
            .fold(0u64, |acc, s| acc.saturating_add(s.bytes))
    }
}

fn word(bytes: &[u8], index: usize) -> u64 {
    let start = index * 8;
    let mut w = [0u8; 8];
    if let Some(src) = bytes.get(start..start + 8) {
        w.copy_from_slice(src);
    }
    u64::from_le_bytes(w)
}

/// FNV-1a 64 over the fixed header words (magic..limit and the UUID), as stored in `w14`.
pub fn header_checksum(words: &[u64; HEADER_WORDS]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let fixed = words[header::MAGIC..=header::LIMIT]
        .iter()
        .chain(&words[header::UUID..header::CHECKSUM]);
    for w in fixed {
        for b in w.to_le_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The header words of a fresh file: counters zero, checksum set.
///
/// The UUID is cut to [`UUID_BYTES`] bytes.
pub fn initial_header(limit_bytes: u64, gpu_uuid: &str, slot_count: usize) -> [u64; HEADER_WORDS] {
    let mut words = [0u64; HEADER_WORDS];
    words[header::MAGIC] = u64::from_le_bytes(MAGIC);
    words[header::VERSION] = VERSION;
    words[header::HEADER_BYTES] = HEADER_BYTES as u64;
    words[header::SLOT_COUNT] = slot_count as u64;
    words[header::SLOT_BYTES] = SLOT_BYTES as u64;
    words[header::LIMIT] = limit_bytes;
    let mut uuid = [0u8; UUID_BYTES];
    let src = gpu_uuid.as_bytes();
    let n = src.len().min(UUID_BYTES);
    uuid[..n].copy_from_slice(&src[..n]);
    for (i, chunk) in uuid.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        words[header::UUID + i] = u64::from_le_bytes(w);
    }
    words[header::CHECKSUM] = header_checksum(&words);
    words
}

/// The complete byte image of a fresh file.
pub fn initial_image(limit_bytes: u64, gpu_uuid: &str, slot_count: usize) -> Vec<u8> {
    let mut out = vec![0u8; file_len(slot_count)];
    for (i, w) in initial_header(limit_bytes, gpu_uuid, slot_count)
        .iter()
        .enumerate()
    {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// Validates a byte image of the file and returns what it says. Never panics.
///
/// # Errors
/// Any [`AccountingError`]: truncated, wrong magic, unknown version, bad geometry, or a
/// changed fixed header.
pub fn parse(bytes: &[u8]) -> Result<AccountingSnapshot, AccountingError> {
    if bytes.len() < HEADER_BYTES {
        return Err(AccountingError::TooShort { len: bytes.len() });
    }
    let mut head = [0u64; HEADER_WORDS];
    for (i, w) in head.iter_mut().enumerate() {
        *w = word(bytes, i);
    }
    let magic = head[header::MAGIC].to_le_bytes();
    if magic != MAGIC {
        return Err(AccountingError::BadMagic { found: magic });
    }
    if head[header::VERSION] != VERSION {
        return Err(AccountingError::UnsupportedVersion {
            found: head[header::VERSION],
        });
    }
    if head[header::HEADER_BYTES] != HEADER_BYTES as u64 {
        return Err(AccountingError::BadGeometry(format!(
            "header size {} (expected {HEADER_BYTES})",
            head[header::HEADER_BYTES]
        )));
    }
    if head[header::SLOT_BYTES] != SLOT_BYTES as u64 {
        return Err(AccountingError::BadGeometry(format!(
            "slot size {} (expected {SLOT_BYTES})",
            head[header::SLOT_BYTES]
        )));
    }
    let slot_count = head[header::SLOT_COUNT];
    if slot_count == 0 || slot_count > MAX_SLOT_COUNT as u64 {
        return Err(AccountingError::BadGeometry(format!(
            "slot count {slot_count} (expected 1..={MAX_SLOT_COUNT})"
        )));
    }
    let slot_count = slot_count as usize;
    let expected = file_len(slot_count);
    if bytes.len() < expected {
        return Err(AccountingError::Truncated {
            len: bytes.len(),
            expected,
        });
    }
    let computed = header_checksum(&head);
    if computed != head[header::CHECKSUM] {
        return Err(AccountingError::ChecksumMismatch {
            stored: head[header::CHECKSUM],
            computed,
        });
    }
    let uuid_bytes: Vec<u8> = head[header::UUID..header::CHECKSUM]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take_while(|&b| b != 0)
        .collect();
    let slots = (0..slot_count)
        .filter_map(|index| {
            let pid_word = word(bytes, slot_word(index, slot::PID));
            if pid_word == 0 {
                return None;
            }
            Some(SlotSnapshot {
                index,
                pid: (pid_word & u64::from(u32::MAX)) as u32,
                start_time: word(bytes, slot_word(index, slot::START_TIME)),
                generation: word(bytes, slot_word(index, slot::GENERATION)),
                bytes: word(bytes, slot_word(index, slot::BYTES)),
                peak: word(bytes, slot_word(index, slot::PEAK)),
                reaping: pid_word & SLOT_REAPING_BIT != 0,
            })
        })
        .collect();
    Ok(AccountingSnapshot {
        version: head[header::VERSION],
        limit_bytes: head[header::LIMIT],
        used_bytes: head[header::USED],
        generation: head[header::GENERATION],
        gpu_uuid: String::from_utf8_lossy(&uuid_bytes).into_owned(),
        slot_count,
        slots,
    })
}

/// A process's start time (clock ticks since boot, as slots record it) from the text of
/// `/proc/<pid>/stat`, and whether it is a zombie. The command name may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<(u64, bool)> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?; // field 3
    let start = fields.nth(18)?.parse().ok()?; // field 22
    Some((start, state == "Z" || state == "X"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UUID: &str = "GPU-12345678-1234-1234-1234-123456789abc";

    #[test]
    fn proc_stat_start_time_and_zombie() {
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_proc_stat(line), Some((98765, false)));
        let z = line.replace(") S ", ") Z ");
        assert_eq!(parse_proc_stat(&z), Some((98765, true)));
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat("1 (x) S 1"), None);
    }

    fn put(image: &mut [u8], word: usize, value: u64) {
        image[word * 8..word * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }

    #[test]
    fn fresh_image_parses_with_no_slots() {
        let image = initial_image(2 << 30, UUID, DEFAULT_SLOT_COUNT);
        assert_eq!(image.len(), 128 + 256 * 64);
        let snap = parse(&image).unwrap();
        assert_eq!(snap.limit_bytes, 2 << 30);
        assert_eq!(snap.gpu_uuid, UUID);
        assert_eq!(snap.slot_count, 256);
        assert_eq!(snap.used_bytes, 0);
        assert!(snap.slots.is_empty());
    }

    #[test]
    fn occupied_slots_are_reported() {
        let mut image = initial_image(1000, "", 4);
        put(&mut image, header::USED, 300);
        put(&mut image, slot_word(2, slot::PID), 42);
        put(&mut image, slot_word(2, slot::START_TIME), 7);
        put(&mut image, slot_word(2, slot::BYTES), 300);
        put(&mut image, slot_word(3, slot::PID), 43 | SLOT_REAPING_BIT);
        let snap = parse(&image).unwrap();
        assert_eq!(snap.used_bytes, 300);
        assert_eq!(snap.gpu_uuid, "");
        assert_eq!(snap.slots.len(), 2);
        assert_eq!(snap.slots[0].index, 2);
        assert_eq!(snap.slots[0].pid, 42);
        assert_eq!(snap.slots[0].start_time, 7);
        assert!(!snap.slots[0].reaping);
        assert!(snap.slots[1].reaping);
        assert_eq!(snap.slots[1].pid, 43);
        assert_eq!(snap.slot_bytes_sum(), 300);
    }

    #[test]
    fn counters_do_not_affect_checksum() {
        let mut image = initial_image(1000, UUID, 4);
        put(&mut image, header::USED, 999);
        put(&mut image, header::GENERATION, 5);
        assert!(parse(&image).is_ok());
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let good = initial_image(1000, UUID, 4);
        assert_eq!(
            parse(&good[..10]),
            Err(AccountingError::TooShort { len: 10 })
        );
        assert!(matches!(
            parse(&good[..good.len() - 1]),
            Err(AccountingError::Truncated { .. })
        ));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(parse(&bad), Err(AccountingError::BadMagic { .. })));
        let mut bad = good.clone();
        put(&mut bad, header::VERSION, 2);
        assert_eq!(
            parse(&bad),
            Err(AccountingError::UnsupportedVersion { found: 2 })
        );
        let mut bad = good.clone();
        put(&mut bad, header::SLOT_BYTES, 32);
        assert!(matches!(parse(&bad), Err(AccountingError::BadGeometry(_))));
        let mut bad = good.clone();
        put(&mut bad, header::HEADER_BYTES, 64);
        assert!(matches!(parse(&bad), Err(AccountingError::BadGeometry(_))));
        let mut bad = good.clone();
        put(&mut bad, header::SLOT_COUNT, 0);
        assert!(matches!(parse(&bad), Err(AccountingError::BadGeometry(_))));
        let mut bad = good.clone();
        put(&mut bad, header::SLOT_COUNT, u64::MAX);
        assert!(matches!(parse(&bad), Err(AccountingError::BadGeometry(_))));
        let mut bad = good.clone();
        put(&mut bad, header::LIMIT, 5000);
        assert!(matches!(
            parse(&bad),
            Err(AccountingError::ChecksumMismatch { .. })
        ));
        let mut bad = good;
        bad[header::UUID * 8] ^= 1;
        assert!(matches!(
            parse(&bad),
            Err(AccountingError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn long_uuid_is_cut() {
        let long = "G".repeat(100);
        let snap = parse(&initial_image(1, &long, 1)).unwrap();
        assert_eq!(snap.gpu_uuid.len(), UUID_BYTES);
    }

    #[test]
    fn offsets_are_cache_line_aligned() {
        assert_eq!(slot_word(0, slot::PID) * 8, 128);
        assert_eq!(slot_word(1, slot::PID) * 8 % 64, 0);
        assert_eq!(file_len(256), 16_512);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn damaged_valid_file_never_panics(
            slots in 1usize..8,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
            cut in any::<usize>(),
        ) {
            let mut image = initial_image(1 << 30, UUID, slots);
            for (at, value) in flips {
                let at = at % image.len();
                image[at] = value;
            }
            let cut = cut % (image.len() + 1);
            if let Ok(snap) = parse(&image[..cut]) {
                prop_assert!(snap.slots.len() <= snap.slot_count);
            }
        }

        #[test]
        fn roundtrip_header(limit in any::<u64>(), uuid in "[A-Za-z0-9-]{0,48}", slots in 1usize..300) {
            let snap = parse(&initial_image(limit, &uuid, slots)).unwrap();
            prop_assert_eq!(snap.limit_bytes, limit);
            prop_assert_eq!(snap.gpu_uuid, uuid);
            prop_assert_eq!(snap.slot_count, slots);
        }
    }
}
