//! Installing a verified file atomically: its bytes go to a `.part` file beside the
//! destination through a hashing writer, and the file is renamed onto the
//! destination only once its digest (and size) are checked, so a failed or corrupt
//! download leaves nothing behind.

use std::io::{self, Write};
use std::path::Path;

use sha2::Sha256;

use super::with_path;
use crate::Result;

/// A temporary `.NAME.*.part` file in `dest`'s directory (created if missing), to be
/// renamed onto `dest` once its bytes are verified; dropped, it is deleted.
pub(crate) fn part_file_beside(dest: &Path) -> Result<tempfile::NamedTempFile> {
    let dir = match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| with_path(e, "cannot create directory", dir))?;
    let file_name = dest
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy());
    let prefix = format!(".{file_name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".part");
    // tempfile creates files readable by their owner only; a model file is ordinary
    // data (the umask still applies).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    builder
        .tempfile_in(dir)
        .map_err(|e| with_path(e, "cannot create a temporary file in", dir))
}

/// A writer that hashes what passes through it.
pub(crate) struct HashingWriter<W> {
    /// Where the bytes go.
    pub(crate) inner: W,
    /// The digest of every byte written so far.
    pub(crate) hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
