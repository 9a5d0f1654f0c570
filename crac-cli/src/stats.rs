//! CRIU's own figures: the `stats-dump` and `stats-restore` files it writes into the images
//! folder (criu/images/stats.proto), read without a protobuf library.
//!
//! The file is two 32-bit magics, a 32-bit length, then one `stats_entry` message whose field
//! 1 is a `dump_stats_entry` and field 2 a `restore_stats_entry`. Only varint fields occur in
//! them, and times are in microseconds.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What CRIU measured while dumping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DumpStats {
    /// Freezing the tree, in milliseconds.
    pub freezing_ms: f64,
    /// How long the tree stayed frozen, in milliseconds.
    pub frozen_ms: f64,
    /// Collecting memory pages, in milliseconds.
    pub memdump_ms: f64,
    /// Writing memory pages, in milliseconds.
    pub memwrite_ms: f64,
    /// Pages written.
    pub pages_written: u64,
}

/// What CRIU measured while restoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RestoreStats {
    /// Forking the tree, in milliseconds.
    pub forking_ms: f64,
    /// The whole restore, in milliseconds.
    pub restore_ms: f64,
    /// Pages restored.
    pub pages_restored: u64,
}

/// Reads `stats-dump` in `dir`, if CRIU wrote one.
pub fn dump(dir: &Path) -> Option<DumpStats> {
    let fields = fields(&message(&fs::read(dir.join("stats-dump")).ok()?, 1)?)?;
    let get = |n| fields.iter().find(|(k, _)| *k == n).map_or(0, |(_, v)| *v);
    Some(DumpStats {
        freezing_ms: get(1) as f64 / 1e3,
        frozen_ms: get(2) as f64 / 1e3,
        memdump_ms: get(3) as f64 / 1e3,
        memwrite_ms: get(4) as f64 / 1e3,
        pages_written: get(7),
    })
}

/// Reads `stats-restore` in `dir`, if CRIU wrote one.
pub fn restore(dir: &Path) -> Option<RestoreStats> {
    let fields = fields(&message(&fs::read(dir.join("stats-restore")).ok()?, 2)?)?;
    let get = |n| fields.iter().find(|(k, _)| *k == n).map_or(0, |(_, v)| *v);
    Some(RestoreStats {
        forking_ms: get(3) as f64 / 1e3,
        restore_ms: get(4) as f64 / 1e3,
        pages_restored: get(5),
    })
}

/// The bytes of field `field` (length-delimited) of the file's one `stats_entry`.
fn message(file: &[u8], field: u64) -> Option<Vec<u8>> {
    let len = u32::from_le_bytes(file.get(8..12)?.try_into().ok()?) as usize;
    let mut entry = file.get(12..12 + len)?;
    while !entry.is_empty() {
        let key = varint(&mut entry)?;
        match key & 7 {
            0 => {
                varint(&mut entry)?;
            }
            2 => {
                let n = varint(&mut entry)? as usize;
                let bytes = entry.get(..n)?;
                if key >> 3 == field {
                    return Some(bytes.to_vec());
                }
                entry = &entry[n..];
            }
            _ => return None,
        }
    }
    None
}

/// The (field number, value) pairs of a message made only of varints.
fn fields(mut message: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    while !message.is_empty() {
        let key = varint(&mut message)?;
        if key & 7 != 0 {
            return None;
        }
        out.push((key >> 3, varint(&mut message)?));
    }
    Some(out)
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stats-dump file CRIU 4.1 wrote here.
    const STATS_DUMP: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x23, 0x00, 0x00, 0x00, 0x0a, 0x21, 0x08,
        0xa3, 0x05, 0x10, 0x80, 0xc3, 0x01, 0x18, 0xc8, 0x06, 0x20, 0xaa, 0x02, 0x28, 0x54, 0x30,
        0x00, 0x38, 0x38, 0x40, 0x00, 0x48, 0x00, 0x50, 0x08, 0x58, 0x08, 0x60, 0x00, 0x68, 0x00,
        0x70, 0x00,
    ];

    #[test]
    fn reads_a_real_stats_dump() {
        let dir = std::env::temp_dir().join(format!("crac-stats-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("stats-dump"), STATS_DUMP).unwrap();
        let stats = dump(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            stats,
            DumpStats {
                freezing_ms: 0.675,
                frozen_ms: 24.96,
                memdump_ms: 0.84,
                memwrite_ms: 0.298,
                pages_written: 56,
            }
        );
    }

    #[test]
    fn a_damaged_file_gives_nothing() {
        assert!(message(&STATS_DUMP[..20], 1).is_none());
        assert!(fields(&[0x08]).is_none());
    }
}
