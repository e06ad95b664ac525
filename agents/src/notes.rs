//! The notes agent: a key-value memory the model writes and reads with tools,
//! persisted to a JSON file (one object, keys sorted) that is rewritten atomically on
//! every change (a synced temporary file, then a rename), so it survives restarts and
//! a crash never leaves half a file. Every change is a read-modify-write under an
//! advisory lock on a `<file>.lock` beside it, re-reading the file under the lock, so
//! two processes sharing a notes file never lose each other's writes.
//!
//! Example tasks: "Remember that the wifi password is hunter2.", then in a later run
//! "What is the wifi password?"

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use troupe::agent::{example_exchange, tool_fn, AgentConfig, Tool};

/// Longest key, in characters.
pub const MAX_KEY_CHARS: usize = 64;
/// Longest value, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;
/// Most notes kept.
pub const MAX_NOTES: usize = 1000;

/// Notes kept in a JSON file.
#[derive(Clone, Debug)]
pub struct NoteStore {
    path: PathBuf,
    notes: Arc<Mutex<BTreeMap<String, String>>>,
}

impl NoteStore {
    /// Opens the store at `path` (created on the first write); a file that is not a
    /// JSON object of strings is an error that names it.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let notes = load(path).map_err(|e| anyhow::anyhow!(e))?;
        Ok(Self {
            path: path.to_path_buf(),
            notes: Arc::new(Mutex::new(notes)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the advisory lock between processes (exclusive to write, shared to
    /// read) and re-reads the file under it; the lock holds until the returned file
    /// is dropped.
    fn sync(
        &self,
        exclusive: bool,
    ) -> Result<
        (
            std::fs::File,
            std::sync::MutexGuard<'_, BTreeMap<String, String>>,
        ),
        String,
    > {
        let fail = |e: &dyn std::fmt::Display| format!("cannot lock notes: {e}");
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let lock_path = self.path.with_file_name(name);
        if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| fail(&e))?;
        if exclusive {
            lock.lock().map_err(|e| fail(&e))?;
        } else {
            lock.lock_shared().map_err(|e| fail(&e))?;
        }
        let mut notes = self.lock();
        *notes = load(&self.path)?;
        Ok((lock, notes))
    }

    fn key(key: &str) -> Result<String, String> {
        let k = key.trim().to_lowercase();
        if k.is_empty() {
            return Err("empty key".into());
        }
        if k.chars().count() > MAX_KEY_CHARS {
            return Err(format!("key too long (limit {MAX_KEY_CHARS} characters)"));
        }
        Ok(k)
    }

    /// Writes the whole store: a temporary file in the same folder, then a rename.
    fn persist(&self, notes: &BTreeMap<String, String>) -> Result<(), String> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let fail = |e: &dyn std::fmt::Display| format!("cannot save notes: {e}");
        std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| fail(&e))?;
        let text = serde_json::to_string_pretty(notes).map_err(|e| fail(&e))?;
        tmp.write_all(text.as_bytes()).map_err(|e| fail(&e))?;
        // On disk before the rename, so a crash leaves the old file or the new one.
        tmp.as_file().sync_all().map_err(|e| fail(&e))?;
        tmp.persist(&self.path).map_err(|e| fail(&e.error))?;
        Ok(())
    }

    /// Stores `value` under `key` (keys ignore case). A key that already holds another
    /// value is changed only with `replace`; otherwise the error shows the value kept,
    /// so a model that meant to look a note up still sees it and nothing is lost.
    pub fn write(&self, key: &str, value: &str, replace: bool) -> Result<String, String> {
        let k = Self::key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "value too long: {} bytes (limit {MAX_VALUE_BYTES})",
                value.len()
            ));
        }
        let (_held, mut notes) = self.sync(true)?;
        match notes.get(&k) {
            Some(old) if old == value => return Ok(format!("`{k}` already holds that")),
            Some(old) if !replace => {
                return Err(format!(
                    "`{k}` already holds {old:?}; not changed (set replace to change it)"
                ))
            }
            _ => {}
        }
        if !notes.contains_key(&k) && notes.len() >= MAX_NOTES {
            return Err(format!("the notebook is full ({MAX_NOTES} notes)"));
        }
        let old = notes.insert(k.clone(), value.to_string());
        if let Err(e) = self.persist(&notes) {
            match old {
                Some(v) => notes.insert(k, v),
                None => notes.remove(&k),
            };
            return Err(e);
        }
        Ok(format!("saved `{k}`"))
    }

    /// The value under `key`.
    pub fn read(&self, key: &str) -> Result<String, String> {
        let k = Self::key(key)?;
        let (_held, notes) = self.sync(false)?;
        notes.get(&k).cloned().ok_or_else(|| {
            let keys: Vec<&str> = notes.keys().map(String::as_str).collect();
            format!("no note `{k}` (notes: {})", keys.join(", "))
        })
    }

    /// All keys, one per line.
    pub fn list(&self) -> String {
        let notes = match self.sync(false) {
            Ok((_held, notes)) => notes.clone(),
            Err(e) => return e,
        };
        if notes.is_empty() {
            "(no notes)".into()
        } else {
            notes.keys().cloned().collect::<Vec<_>>().join("\n")
        }
    }
}

/// The notes in the file at `path` (none when it does not exist yet).
fn load(path: &Path) -> Result<BTreeMap<String, String>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            format!(
                "notes file {} is not a JSON object of strings: {e}",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("notes file {}: {e}", path.display())),
    }
}

/// Arguments of `remember`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct WriteArgs {
    /// A short name for the note.
    #[schemars(length(max = 64))]
    pub key: String,
    /// What to remember.
    #[schemars(length(max = 4096))]
    pub value: String,
    /// Whether to change a note that already exists.
    #[serde(default)]
    pub replace: bool,
}

/// Arguments of `recall`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct ReadArgs {
    /// The note's name.
    #[schemars(length(max = 64))]
    pub key: String,
}

/// The notes tools on `store` (reading a missing key answers with the keys there are,
/// so no listing tool is needed).
pub fn tools(store: &NoteStore) -> Vec<Arc<dyn Tool>> {
    let (a, b) = (store.clone(), store.clone());
    vec![
        tool_fn(
            "recall",
            "Reads the value remembered under a key.",
            move |x: ReadArgs| {
                let s = b.clone();
                async move { s.read(&x.key) }
            },
        ),
        tool_fn(
            "remember",
            "Remembers a value under a key.",
            move |x: WriteArgs| {
                let s = a.clone();
                async move { s.write(&x.key, &x.value, x.replace) }
            },
        ),
    ]
}

/// The notes agent's configuration.
pub fn config() -> AgentConfig {
    AgentConfig {
        tools: vec!["recall".into(), "remember".into()],
        tool_choice: troupe::agent::ToolChoice::Required,
        max_tool_steps: 1,
        max_tokens: 128,
        examples: [
            example_exchange(
                "What is the wifi password?",
                "recall",
                serde_json::json!({"key": "wifi password"}),
                "hunter2",
                "The wifi password is hunter2.",
            ),
            example_exchange(
                "Remember that my bike lock code is 4412.",
                "remember",
                serde_json::json!({"key": "bike lock code", "value": "4412"}),
                "saved `bike lock code`",
                "Noted: your bike lock code is 4412.",
            ),
            example_exchange(
                "What is my bike lock code?",
                "recall",
                serde_json::json!({"key": "bike lock code"}),
                "4412",
                "Your bike lock code is 4412.",
            ),
        ]
        .concat(),
        ..AgentConfig::new(
            "notes",
            "You keep notes. When the user asks a question, call recall with the key. When the user tells you something to remember, call remember with a short key and the value. Then answer in one sentence.",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_persist_and_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/notes.json");
        let s = NoteStore::open(&path).unwrap();
        assert_eq!(s.list(), "(no notes)");
        assert_eq!(s.write("Wifi", "hunter2", false).unwrap(), "saved `wifi`");
        s.write("door", "1234", false).unwrap();
        let e = s.write("wifi", "hunter3", false).unwrap_err();
        assert_eq!(
            e,
            "`wifi` already holds \"hunter2\"; not changed (set replace to change it)"
        );
        assert!(s
            .write("wifi", "hunter2", false)
            .unwrap()
            .contains("already holds"));
        s.write("wifi", "hunter3", true).unwrap();
        let again = NoteStore::open(&path).unwrap();
        assert_eq!(again.read("WIFI").unwrap(), "hunter3");
        assert_eq!(again.list(), "door\nwifi");
        let on_disk: BTreeMap<String, String> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(on_disk.len(), 2);
        // No temporary file is left beside it (only the lock file).
        let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.contains(&"notes.json.lock".to_string()), "{names:?}");
    }

    #[test]
    fn refuses_bad_keys_oversized_values_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.json");
        let s = NoteStore::open(&path).unwrap();
        assert!(s.write(" ", "x", false).unwrap_err().contains("empty key"));
        assert!(s
            .write(&"k".repeat(65), "x", false)
            .unwrap_err()
            .contains("key too long"));
        let e = s
            .write("big", &"v".repeat(MAX_VALUE_BYTES + 1), false)
            .unwrap_err();
        assert!(e.contains("value too long"), "{e}");
        s.write("a", "1", false).unwrap();
        assert_eq!(s.read("zzz").unwrap_err(), "no note `zzz` (notes: a)");
        std::fs::write(&path, "[1, 2]").unwrap();
        let e = NoteStore::open(&path).unwrap_err().to_string();
        assert!(e.contains("not a JSON object of strings"), "{e}");
    }

    #[test]
    fn a_full_notebook_refuses_new_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.json");
        let full: BTreeMap<String, String> = (0..MAX_NOTES)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        std::fs::write(&path, serde_json::to_string(&full).unwrap()).unwrap();
        let s = NoteStore::open(&path).unwrap();
        assert!(s.write("new", "x", false).unwrap_err().contains("full"));
        assert!(
            s.write("k1", "x", true).is_ok(),
            "replacing is still allowed"
        );
    }

    #[test]
    fn two_writers_of_one_file_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shared.json");
        // Two stores opened apart are as two processes: each keeps its own copy.
        let stores = [
            NoteStore::open(&path).unwrap(),
            NoteStore::open(&path).unwrap(),
        ];
        std::thread::scope(|scope| {
            for (w, s) in stores.iter().enumerate() {
                scope.spawn(move || {
                    for i in 0..40 {
                        s.write(&format!("w{w}-{i}"), "v", false).unwrap();
                    }
                });
            }
        });
        let on_disk: BTreeMap<String, String> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(on_disk.len(), 80, "lost writes");
        // Each store sees the other's notes.
        assert_eq!(stores[0].read("w1-39").unwrap(), "v");
        assert_eq!(stores[1].read("w0-0").unwrap(), "v");
    }

    #[tokio::test]
    async fn the_tools_run_through_the_tool_interface() {
        let dir = tempfile::tempdir().unwrap();
        let s = NoteStore::open(&dir.path().join("n.json")).unwrap();
        let t = tools(&s);
        t[1].call(serde_json::json!({"key": "k", "value": "v"}))
            .await
            .unwrap();
        assert_eq!(
            t[0].call(serde_json::json!({"key": "k"})).await.unwrap(),
            "v"
        );
        assert!(t[0].call(serde_json::json!({})).await.is_err());
    }
}
