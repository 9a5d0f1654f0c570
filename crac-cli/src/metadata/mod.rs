//! The metadata file that `crac checkpoint` writes beside CRIU's images in each image folder.
//!
//! # Format
//!
//! `crac-meta.json` is one JSON object; [`Metadata`] lists its fields. `format` is the version
//! of the layout ([`FORMAT`]). Readers ignore fields they do not know, so a newer crac may add
//! fields without a new version; every field listed in [`Metadata`] is required. A change that
//! an older reader would misread gets a new `format`, and [`read`] refuses formats it does not
//! know instead of guessing.
//!
//! `files` lists every CRIU image file with its size when the dump finished, and its SHA-256;
//! `executable_sha256` is the SHA-256 of the dumped process's executable. [`validate`] checks
//! the sizes before a restore or an export, because CRIU's own errors for a truncated or
//! missing image file name an internal structure, not the file, and come after it has started
//! building the process tree. [`verify`] checks the contents: CRIU itself compares only the
//! size of the executable, so a same-size rebuilt binary, or a damaged page file, would be
//! restored without a word.
//!
//! # Interrupted checkpoints
//!
//! Before CRIU runs, `crac checkpoint` writes what it already knows into the image folder as
//! [`PENDING_FILE`]. CRIU writes `stats-dump` only once a dump has succeeded (after it stopped
//! or resumed the tree, `criu/cr-dump.c`, `cr_dump_finish`), so a folder that holds both is a
//! complete image whose crac was killed before it wrote the metadata: [`complete_pending`]
//! finishes it, and the store files it under its name ([`crate::store::Store::recover`]).
//!
//! # Anatomy
//!
//! The schema (the [`Metadata`] types, [`read`], [`write()`], [`seal`], the pending file) is in
//! `schema.rs`; integrity (hashing the image's files and the files outside it, [`verify`], the
//! found-intact note, [`KnownHashes`]) in `integrity.rs`; the files the tree wrote to
//! ([`WrittenFile`], recorded at the checkpoint, checked before a restore) in `written.rs`;
//! validation ([`validate`], [`Problem`],
//! [`ValidateError`]) in `validation.rs`. SHA-256 itself is [`crate::hashing`].

mod integrity;
mod schema;
mod validation;
mod written;

pub use integrity::{
    hash_files, hash_with_identity, list_image_files, note_intact, verify, verify_allowing, Check,
    Identity, KnownHashes, KNOWN_HASHES_FILE, VERIFIED_FILE,
};
pub use schema::{
    complete_pending, is_complete_dump, read, seal, this_machine, write, write_pending,
    DumpOptions, FileEntry, HookTiming, MappedFile, Metadata, MetadataError, Timings, DIGEST_FIELD,
    DUMP_DONE_FILE, FORMAT, METADATA_FILE, PENDING_FILE,
};
pub(crate) use validation::is_plain_name;
pub use validation::{validate, Problem, ValidateError};
pub use written::{check as check_written, Stat, WrittenFile, HASH_LIMIT};
