//! What a checkpoint or a restore is doing, for a progress display.

/// What a checkpoint or a restore is doing, for a progress display (see [`Progress`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// The before_checkpoint hooks run (CRIU's pre-dump).
    Hooks,
    /// CRIU freezes the tree and writes the image.
    Dump,
    /// crac hashes the image files and the executable.
    Hash,
    /// crac writes the metadata and files the image in the store.
    Commit,
    /// A restore checks the image's files and the executable.
    Verify,
    /// CRIU restores the tree, and the after_restore hooks run.
    Restore,
}

/// Told what an operation is doing: the phase, and the bytes of image written so far (during
/// [`Phase::Dump`]; 0 otherwise). Called from a thread of the checkpoint's too, about ten times a
/// second while CRIU dumps; with no `Progress` given, nothing polls.
pub type Progress<'a> = &'a (dyn Fn(Phase, u64) + Sync);
