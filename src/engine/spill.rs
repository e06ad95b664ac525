//! The spill thread: writes evicted caches to the spill folder and reads them back,
//! off the engine thread, in the format of [`cache_file`](super::cache_file) (each
//! cache in its own element type). Jobs run in the order they were sent, so a read or
//! a removal of a file always follows its write.
//!
//! A cache being written stays in a shared [`Slot`] until the write ends: a request
//! that resumes it meanwhile takes it back from there (no read), and the writer,
//! finding the slot empty, removes the file it wrote. Every outcome goes back to the
//! engine thread as a command; the engine owns the accounting and the files' list.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::cache_file::{self, Header, ModelId, Stored, FORMAT_VERSION};
use super::lease::LeaseId;
use super::scheduler::SeqId;
use super::worker::Command;
use crate::kv::KvCache;

/// A cache on its way to disk; empty once the write ended or the engine took it back.
pub(crate) type Slot = Arc<Mutex<Option<KvCache>>>;

/// Locks a slot (a panic elsewhere cannot poison a cache in it).
pub(crate) fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, Option<KvCache>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the spill thread does.
pub(crate) enum Job {
    /// Write the cache in `slot` to `path`.
    Write {
        lease: LeaseId,
        path: PathBuf,
        slot: Slot,
    },
    /// Read the cache at `path` back for request `id`, then remove the file.
    Read { id: SeqId, path: PathBuf },
}

/// How a write ended.
#[derive(Debug)]
pub(crate) enum Written {
    /// The file holds the cache, of this many bytes.
    Done(u64),
    /// The cache was taken back before the write ended; no file is left.
    TakenBack,
    /// The write failed (the reason); no file is left, the cache was dropped.
    Failed(String),
}

/// The engine's side of the spill thread.
pub(crate) struct Spiller {
    jobs: Option<Sender<Job>>,
    handle: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
}

impl Spiller {
    /// Starts the spill thread for `dir`, replying to the engine on `engine`.
    /// (Each write first passes `gate`, when the tests give one.)
    pub(crate) fn start(
        dir: &Path,
        model: ModelId,
        engine: Sender<Command>,
        gate: Option<super::StepGate>,
    ) -> Option<Self> {
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), "cannot create the spill folder ({e}); writes will fail and evicted caches be recomputed");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("troupe-spill".into())
            .spawn(move || serve(rx, &model, &engine, gate));
        match handle {
            Ok(h) => Some(Self {
                jobs: Some(tx),
                handle: Some(h),
                dir: dir.to_path_buf(),
            }),
            Err(e) => {
                tracing::warn!(
                    "cannot start the spill thread ({e}); evicted caches will be recomputed"
                );
                None
            }
        }
    }

    /// Where the cache of `lease` is spilled (unique in the process, and across
    /// processes sharing the folder).
    pub(crate) fn path(&self, lease: LeaseId) -> PathBuf {
        self.dir.join(format!(
            "troupe-spill-{}-{}.safetensors",
            std::process::id(),
            lease.raw()
        ))
    }

    /// Hands a job to the thread; gives it back when the thread is gone.
    pub(crate) fn send(&self, job: Job) -> std::result::Result<(), Job> {
        match &self.jobs {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

impl Drop for Spiller {
    /// Lets the thread finish its jobs (a write whose slot was emptied removes its
    /// file), then joins it.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(
    rx: Receiver<Job>,
    model: &ModelId,
    engine: &Sender<Command>,
    gate: Option<super::StepGate>,
) {
    for job in rx {
        let reply = match job {
            Job::Write { lease, path, slot } => {
                if let Some(g) = &gate {
                    while !g.try_pass() {
                        g.wait_open(std::time::Duration::from_millis(1));
                    }
                }
                let start = Instant::now();
                let outcome = write(&path, &slot, model);
                tracing::debug!(
                    lease = lease.raw(),
                    ms = start.elapsed().as_secs_f64() * 1e3,
                    ?outcome,
                    "spill write"
                );
                Command::Spilled {
                    lease,
                    path,
                    outcome,
                }
            }
            Job::Read { id, path } => {
                let start = Instant::now();
                let cache = read(&path, model);
                tracing::debug!(
                    request = id,
                    ms = start.elapsed().as_secs_f64() * 1e3,
                    ok = cache.is_ok(),
                    "spill read"
                );
                Command::Restored { id, cache }
            }
        };
        // An engine that ended wants no reply.
        let _ = engine.send(reply);
    }
}

fn write(path: &Path, slot: &Slot, model: &ModelId) -> Written {
    let bytes = {
        let held = lock(slot);
        let Some(cache) = held.as_ref() else {
            return Written::TakenBack;
        };
        let header = Header {
            format: FORMAT_VERSION,
            model: model.clone(),
            cache_len: cache.len(),
            kv_dtype: Some(cache.dtype()),
            agent: None::<()>,
        };
        cache_file::encode(&header, Some(cache), Stored::Native)
    };
    let written = bytes.and_then(|b| {
        write_file(path, &b)
            .map(|()| b.len() as u64)
            .map_err(|e| e.to_string())
    });
    // The cache leaves memory now (or was taken back meanwhile).
    let taken = lock(slot).take();
    match (written, taken) {
        (Ok(n), Some(_)) => Written::Done(n),
        (Ok(_), None) => {
            let _ = std::fs::remove_file(path);
            Written::TakenBack
        }
        (Err(e), _) => Written::Failed(e),
    }
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place (a
/// file under `path` is always whole); not synced: a spill file need not survive a
/// crash of the process that wrote it.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".troupe-spill-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

fn read(path: &Path, model: &ModelId) -> std::result::Result<KvCache, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let _ = std::fs::remove_file(path);
    let (_, cache) = cache_file::decode::<Option<()>>(&data?, model)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    cache.ok_or_else(|| format!("{}: holds no cache", path.display()))
}
