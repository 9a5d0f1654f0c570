//! SHA-256, the one hash crac uses: of image files and the files a service maps
//! ([`crate::metadata`]'s integrity checks), of archive entries ([`crate::archive`]), of
//! environment values and of the metadata itself (its seal). Always written as lowercase hex.

use std::fs;
use std::io::{self, Read, Write};

use sha2::{Digest, Sha256};

/// The SHA-256 (lowercase hex) of `value`: how [`Metadata::env_sha256`] records a value, and
/// how the metadata's seal is made.
///
/// [`Metadata::env_sha256`]: crate::metadata::Metadata::env_sha256
pub fn value_sha256(value: &str) -> String {
    hex(Sha256::digest(value.as_bytes()))
}

/// The SHA-256 (lowercase hex) of what `file` holds, read from where its offset is.
///
/// # Errors
///
/// A read error.
pub fn sha256_of(mut file: fs::File) -> io::Result<String> {
    digest(&mut file, &mut io::sink()).map(|(_, digest)| digest)
}

/// Copies `from` to `to` and returns the size and SHA-256 (lowercase hex) of what was copied.
pub(crate) fn digest(mut from: impl Read, to: &mut impl Write) -> io::Result<(u64, String)> {
    copy_hashed(&mut from, to).map_err(|(CopyError::Read(err) | CopyError::Write(err))| err)
}

fn hex(bytes: impl AsRef<[u8]>) -> String {
    bytes.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads, counts and hashes; remembers a read error so it is not mistaken for a write error
/// of the archive.
pub(crate) struct CheckedReader<R> {
    inner: R,
    hasher: Sha256,
    /// The bytes read so far.
    pub(crate) count: u64,
    /// The first read error, as it was (the reader's caller got a copy).
    pub(crate) read_error: Option<io::Error>,
}

impl<R: Read> CheckedReader<R> {
    /// The SHA-256 (lowercase hex) of what was read.
    pub(crate) fn sha256(self) -> String {
        hex(self.hasher.finalize())
    }

    pub(crate) fn new(inner: R) -> Self {
        CheckedReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            read_error: None,
        }
    }
}

impl<R: Read> Read for CheckedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.count += n as u64;
                Ok(n)
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => Err(err),
            Err(err) => {
                let copy = io::Error::new(err.kind(), err.to_string());
                self.read_error = Some(err);
                Err(copy)
            }
        }
    }
}

/// Where [`copy_hashed`] failed.
pub(crate) enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `from` to `to` and returns the size and SHA-256 (lowercase hex) of what was copied,
/// telling read errors (the archive's, on import) from write errors (the store's).
pub(crate) fn copy_hashed(
    from: &mut impl Read,
    to: &mut impl Write,
) -> Result<(u64, String), CopyError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 1 << 16];
    let mut count = 0;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(CopyError::Read(err)),
        };
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n]).map_err(CopyError::Write)?;
        count += n as u64;
    }
    Ok((count, hex(hasher.finalize())))
}
