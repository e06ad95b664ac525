//! The files agent and its tools: list, read and search the text files under one root
//! directory chosen at start. Every path the model gives is relative to the root;
//! absolute paths and `..` components are refused, and every open goes through a
//! capability handle on the root (`cap-std`), so no symlink, even one swapped in
//! while a tool runs, leads outside it. Walks never follow symlinks, and a regular
//! file with other hard links (`nlink > 1`, which may be names outside the root) is
//! refused.
//!
//! Example task: "Which file mentions Lisbon?" with `--root ./docs`.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use cap_std::fs::Dir;
use troupe::agent::{example_exchange, tool_fn, AgentConfig, Tool};

/// Largest file `read_file` reads, in bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Most characters of a file shown to the model (the rest is cut, and says so).
pub const MAX_SHOWN_CHARS: usize = 3000;
/// Most entries a listing or a search returns.
pub const MAX_RESULTS: usize = 50;
/// Longest path or query a tool takes, in characters (also the schemas' `maxLength`).
pub const MAX_ARG_CHARS: usize = 200;
/// Most matching lines a search ranks (it shows the best [`MAX_RESULTS`]).
const MAX_HITS: usize = 2000;
/// Most entries (files and folders) a walk visits.
const MAX_WALK: usize = 5000;

/// A directory the tools may not leave.
#[derive(Clone, Debug)]
pub struct Root {
    dir: PathBuf,
    /// The capability every open goes through.
    cap: Arc<Dir>,
}

/// Why an open through the root failed, in the model's words.
fn open_error(rel: &str, e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        format!("no such file or directory: `{rel}`")
    } else if e.to_string().contains("outside") || e.kind() == std::io::ErrorKind::PermissionDenied
    {
        format!("path `{rel}` refused: it leads outside the root")
    } else {
        format!("`{rel}`: {e}")
    }
}

impl Root {
    /// Opens `dir` (it must exist and be a directory).
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        let dir = dir
            .canonicalize()
            .map_err(|e| anyhow::anyhow!("root {}: {e}", dir.display()))?;
        anyhow::ensure!(dir.is_dir(), "root {} is not a directory", dir.display());
        let cap = Dir::open_ambient_dir(&dir, cap_std::ambient_authority())
            .map_err(|e| anyhow::anyhow!("root {}: {e}", dir.display()))?;
        Ok(Self {
            dir,
            cap: Arc::new(cap),
        })
    }

    /// The root itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks a path the model gave and returns it relative to the root (empty for
    /// the root), or says why it is refused.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, String> {
        if rel.chars().count() > MAX_ARG_CHARS {
            return Err(format!("path too long (limit {MAX_ARG_CHARS} characters)"));
        }
        let p = Path::new(rel.trim());
        let mut clean = PathBuf::new();
        for c in p.components() {
            match c {
                Component::Normal(s) => clean.push(s),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(format!("path `{rel}` refused: `..` is not allowed"))
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!(
                        "path `{rel}` refused: absolute paths are not allowed; give a path relative to the root"
                    ))
                }
            }
        }
        Ok(clean)
    }

    /// The directory `clean` (relative, checked) through the capability.
    fn open_dir(&self, clean: &Path, rel: &str) -> Result<Dir, String> {
        if clean.as_os_str().is_empty() {
            return self.cap.try_clone().map_err(|e| open_error(rel, &e));
        }
        match self.cap.metadata(clean) {
            Ok(m) if !m.is_dir() => return Err(format!("`{rel}` is not a directory")),
            Ok(_) => {}
            Err(e) => return Err(open_error(rel, &e)),
        }
        self.cap.open_dir(clean).map_err(|e| open_error(rel, &e))
    }

    /// Opens the regular file `clean` (relative, checked) through the capability,
    /// refusing one with other hard links; returns it with its size.
    fn open_file(&self, clean: &Path, rel: &str) -> Result<(std::fs::File, u64), String> {
        let f = self.cap.open(clean).map_err(|e| open_error(rel, &e))?;
        let f = f.into_std();
        let meta = f.metadata().map_err(|e| format!("`{rel}`: {e}"))?;
        if !meta.is_file() {
            return Err(format!("`{rel}` is not a file"));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if meta.nlink() > 1 {
                return Err(format!(
                    "`{rel}` refused: it has {} hard links, which may be names outside the root",
                    meta.nlink()
                ));
            }
        }
        Ok((f, meta.len()))
    }

    /// The regular files under `clean` (relative to the root), as root-relative
    /// paths, depth first in name order, never following symlinks.
    fn walk(&self, clean: &Path, rel: &str) -> Result<Vec<PathBuf>, String> {
        let mut out = Vec::new();
        let mut stack = vec![(clean.to_path_buf(), self.open_dir(clean, rel)?)];
        let mut visited = 0;
        'walk: while let Some((prefix, d)) = stack.pop() {
            let Ok(rd) = d.entries() else {
                continue;
            };
            let mut entries: Vec<_> = rd.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries.into_iter().rev() {
                // Folders count too, so a tree of empty folders is still bounded.
                visited += 1;
                if visited > MAX_WALK {
                    break 'walk;
                }
                // The entry's own type: a symlink is neither a dir nor a file here.
                let Ok(t) = e.file_type() else {
                    continue;
                };
                let path = prefix.join(e.file_name());
                if t.is_dir() {
                    if let Ok(sub) = e.open_dir() {
                        stack.push((path, sub));
                    }
                } else if t.is_file() {
                    out.push(path);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The root-relative names of all the files under the root (at most 5,000), in
    /// name order.
    pub fn file_names(&self) -> Vec<String> {
        self.walk(Path::new(""), ".")
            .unwrap_or_default()
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    /// Lists the files under `rel` (recursively), one root-relative name per line.
    pub fn list(&self, rel: &str) -> Result<String, String> {
        let rel = if rel.trim().is_empty() { "." } else { rel };
        let clean = self.resolve(rel)?;
        let files = self.walk(&clean, rel)?;
        if files.is_empty() {
            return Ok("(no files)".into());
        }
        let mut s: Vec<String> = files
            .iter()
            .take(MAX_RESULTS)
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        if files.len() > MAX_RESULTS {
            s.push(format!("... and {} more", files.len() - MAX_RESULTS));
        }
        Ok(s.join("\n"))
    }

    /// Reads a text file, cut to [`MAX_SHOWN_CHARS`].
    pub fn read(&self, rel: &str) -> Result<String, String> {
        let clean = self.resolve(rel)?;
        if clean.as_os_str().is_empty() {
            return Err(format!("`{rel}` is not a file"));
        }
        if let Ok(m) = self.cap.metadata(&clean) {
            if m.is_dir() {
                return Err(format!("`{rel}` is not a file"));
            }
        }
        let (f, len) = self.open_file(&clean, rel)?;
        if len > MAX_FILE_BYTES {
            return Err(format!(
                "`{rel}` is too large: {len} bytes (limit {MAX_FILE_BYTES})"
            ));
        }
        // At most the limit plus one byte, even if the file grew since the check.
        let mut bytes = Vec::new();
        f.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("`{rel}`: {e}"))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(format!(
                "`{rel}` is too large (limit {MAX_FILE_BYTES} bytes)"
            ));
        }
        let text = String::from_utf8(bytes).map_err(|_| format!("`{rel}` is not a text file"))?;
        Ok(match text.char_indices().nth(MAX_SHOWN_CHARS) {
            Some((cut, _)) => format!(
                "{}\n[... cut at {MAX_SHOWN_CHARS} of {} characters]",
                &text[..cut],
                text.chars().count()
            ),
            None => text,
        })
    }

    /// Lines of the text files under the root that contain the words of `query`
    /// (ignoring case and words under three letters), as `file:line: text`, the lines
    /// with the most of those words first.
    pub fn search(&self, query: &str) -> Result<String, String> {
        let q = query.trim().to_lowercase();
        if q.is_empty() {
            return Err("empty search query".into());
        }
        if q.len() > MAX_ARG_CHARS {
            return Err(format!(
                "search query too long: {} bytes (limit {MAX_ARG_CHARS})",
                q.len()
            ));
        }
        let mut words: Vec<&str> = q
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| w.chars().count() >= 3)
            .collect();
        words.sort_unstable();
        words.dedup();
        if words.is_empty() {
            words.push(q.as_str());
        }
        let mut hits = Vec::new();
        'files: for p in self.walk(Path::new(""), ".")? {
            let name = p.to_string_lossy().into_owned();
            let Ok((f, _)) = self.open_file(&p, &name) else {
                continue;
            };
            let mut bytes = Vec::new();
            let read = f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes);
            if read.is_err() || bytes.len() as u64 > MAX_FILE_BYTES {
                continue;
            }
            let Ok(text) = String::from_utf8(bytes) else {
                continue;
            };
            for (i, line) in text.lines().enumerate() {
                let lower = line.to_lowercase();
                let score = words.iter().filter(|w| lower.contains(**w)).count();
                if score > 0 {
                    let line: String = line.trim().chars().take(200).collect();
                    hits.push((score, format!("{name}:{}: {line}", i + 1)));
                    if hits.len() >= MAX_HITS {
                        break 'files;
                    }
                }
            }
        }
        if hits.is_empty() {
            return Ok(format!("no line contains `{query}`"));
        }
        hits.sort_by_key(|h| std::cmp::Reverse(h.0));
        let shown: Vec<String> = hits.into_iter().take(MAX_RESULTS).map(|h| h.1).collect();
        Ok(shown.join("\n"))
    }
}

/// Arguments of `list_files`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct ListArgs {
    /// A directory relative to the root (`.` for the root).
    #[schemars(length(max = 200))]
    pub path: String,
}

/// Arguments of `read_file`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct ReadArgs {
    /// A file relative to the root.
    #[schemars(length(max = 200))]
    pub path: String,
}

/// Arguments of `search_files`.
#[derive(serde::Deserialize, schemars::JsonSchema, Debug)]
pub struct SearchArgs {
    /// Words to look for (case-insensitive).
    #[schemars(length(max = 200))]
    pub query: String,
}

/// Runs file work on tokio's blocking pool, off the runtime's worker threads.
async fn blocking(
    f: impl FnOnce() -> Result<String, String> + Send + 'static,
) -> Result<String, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("file tool failed: {e}"))?
}

/// A tool running `op` on the root, on tokio's blocking pool.
fn file_tool<A>(
    root: &Root,
    name: &str,
    description: &str,
    op: fn(&Root, A) -> Result<String, String>,
) -> Arc<dyn Tool>
where
    A: schemars::JsonSchema + serde::de::DeserializeOwned + Send + 'static,
{
    let root = root.clone();
    tool_fn(name, description, move |args: A| {
        let root = root.clone();
        blocking(move || op(&root, args))
    })
}

/// The three file tools on `root`.
pub fn tools(root: &Root) -> Vec<Arc<dyn Tool>> {
    vec![
        file_tool(
            root,
            "search_files",
            "Finds the lines of all files that contain the words of a query, best first; answers file:line: text.",
            |r, x: SearchArgs| r.search(&x.query),
        ),
        file_tool(
            root,
            "read_file",
            "Reads a text file (path relative to the root).",
            |r, x: ReadArgs| r.read(&x.path),
        ),
        file_tool(
            root,
            "list_files",
            "Lists the files under a directory (relative to the root).",
            |r, x: ListArgs| r.list(&x.path),
        ),
    ]
}

/// The files agent's configuration.
pub fn config() -> AgentConfig {
    AgentConfig {
        tools: vec!["search_files".into(), "read_file".into(), "list_files".into()],
        tool_choice: troupe::agent::ToolChoice::Required,
        max_tool_steps: 2,
        examples: [
            example_exchange(
                "What does recipes.txt say?",
                "read_file",
                serde_json::json!({"path": "recipes.txt"}),
                "Pancakes: flour, milk, eggs.",
                "recipes.txt has a pancake recipe: flour, milk and eggs.",
            ),
            example_exchange(
                "Which file talks about dogs?",
                "search_files",
                serde_json::json!({"query": "dogs"}),
                "pets/list.md:2: Dogs bark at night.",
                "The file pets/list.md talks about dogs.",
            ),
        ]
        .concat(),
        max_tokens: 160,
        ..AgentConfig::new(
            "files",
            "You answer questions about the files in a folder. First call a tool: search_files with the key words of the question to find where something is said, read_file to read a file, list_files only to see what files there are. Then answer briefly.",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> (tempfile::TempDir, tempfile::TempDir, Root) {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), "the secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("a.txt"), "alpha\nLaunch on Monday\n").unwrap();
        std::fs::write(
            root.path().join("sub/b.md"),
            "beta\nno launch here? yes launch\n",
        )
        .unwrap();
        let r = Root::new(root.path()).unwrap();
        (outside, root, r)
    }

    #[test]
    fn lists_reads_and_searches_inside_the_root() {
        let (_o, _d, r) = sandbox();
        assert_eq!(r.list(".").unwrap(), "a.txt\nsub/b.md");
        assert_eq!(r.list("sub").unwrap(), "sub/b.md");
        assert_eq!(r.read("a.txt").unwrap(), "alpha\nLaunch on Monday\n");
        assert_eq!(r.read("./sub/b.md").unwrap().lines().next(), Some("beta"));
        assert_eq!(
            r.search("LAUNCH").unwrap(),
            "a.txt:2: Launch on Monday\nsub/b.md:2: no launch here? yes launch"
        );
        assert!(r.search("zebra").unwrap().starts_with("no line"));
        // Words, best match first; short words do not count.
        assert_eq!(
            r.search("monday_launch to").unwrap(),
            "a.txt:2: Launch on Monday\nsub/b.md:2: no launch here? yes launch"
        );
        assert_eq!(
            r.search("beta or alpha").unwrap(),
            "a.txt:1: alpha\nsub/b.md:1: beta"
        );
        // The best match is not first in walk order: a later file's line (three words)
        // before an earlier file's (one word), and in one file a later line (two
        // words) before an earlier one; equal scores keep the walk order.
        assert_eq!(
            r.search("yes here launch").unwrap(),
            "sub/b.md:2: no launch here? yes launch\na.txt:2: Launch on Monday"
        );
        assert_eq!(
            r.search("alpha monday launch").unwrap(),
            "a.txt:2: Launch on Monday\na.txt:1: alpha\nsub/b.md:2: no launch here? yes launch"
        );
    }

    #[test]
    fn refuses_escapes_by_dotdot_absolute_path_and_symlink() {
        let (outside, root, r) = sandbox();
        let secret = outside.path().join("secret.txt");
        let e = r.read("../secret.txt").unwrap_err();
        assert!(e.contains("`..` is not allowed"), "{e}");
        assert!(r.read("sub/../../x").unwrap_err().contains(".."));
        let e = r.read(secret.to_str().unwrap()).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        assert!(r.list("/").unwrap_err().contains("absolute"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&secret, root.path().join("link.txt")).unwrap();
            std::os::unix::fs::symlink(outside.path(), root.path().join("out")).unwrap();
            let e = r.read("link.txt").unwrap_err();
            assert!(e.contains("outside the root"), "{e}");
            assert!(r.read("out/secret.txt").unwrap_err().contains("outside"));
            assert!(r.list("out").unwrap_err().contains("outside"));
            // Walks do not follow the links either.
            assert_eq!(r.list(".").unwrap(), "a.txt\nsub/b.md");
            assert!(r.search("secret").unwrap().starts_with("no line"));
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_hard_link_or_a_swapped_symlink_cannot_read_outside_the_root() {
        let (outside, root, r) = sandbox();
        let secret = outside.path().join("secret.txt");
        // A hard link to a file outside: same inode, two names.
        std::fs::hard_link(&secret, root.path().join("hard.txt")).unwrap();
        let e = r.read("hard.txt").unwrap_err();
        assert!(e.contains("hard links"), "{e}");
        assert!(r.search("secret").unwrap().starts_with("no line"));
        // A directory swapped for a symlink to outside after the root was opened,
        // and a file swapped the same way: the capability refuses both.
        std::fs::remove_dir_all(root.path().join("sub")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("sub")).unwrap();
        let e = r.read("sub/secret.txt").unwrap_err();
        assert!(e.contains("outside"), "{e}");
        assert!(r.list("sub").unwrap_err().contains("outside"));
        std::fs::remove_file(root.path().join("a.txt")).unwrap();
        std::os::unix::fs::symlink(&secret, root.path().join("a.txt")).unwrap();
        let e = r.read("a.txt").unwrap_err();
        assert!(e.contains("outside"), "{e}");
        // A symlink with a relative target climbing out.
        std::os::unix::fs::symlink("../../../../../../etc/passwd", root.path().join("p")).unwrap();
        assert!(r.read("p").is_err());
        assert!(r.search("root").unwrap().starts_with("no line"));
    }

    #[test]
    fn refuses_missing_large_binary_and_bad_queries() {
        let (_o, root, r) = sandbox();
        assert!(r.read("nope.txt").unwrap_err().contains("no such file"));
        assert!(r.read("sub").unwrap_err().contains("not a file"));
        assert!(r.list("a.txt").unwrap_err().contains("not a directory"));
        let big = vec![b'x'; MAX_FILE_BYTES as usize + 1];
        std::fs::write(root.path().join("big.txt"), big).unwrap();
        assert!(r.read("big.txt").unwrap_err().contains("too large"));
        std::fs::write(root.path().join("bin.dat"), [0xff, 0xfe, 0x00]).unwrap();
        assert!(r.read("bin.dat").unwrap_err().contains("not a text file"));
        let long = "y".repeat(MAX_SHOWN_CHARS + 10);
        std::fs::write(root.path().join("long.txt"), long).unwrap();
        assert!(r.read("long.txt").unwrap().contains("cut at 3000"));
        assert!(r.search("  ").unwrap_err().contains("empty"));
        assert!(r.search(&"q".repeat(300)).unwrap_err().contains("too long"));
        assert!(Root::new(&root.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn the_tools_run_through_the_tool_interface() {
        let (_o, _d, r) = sandbox();
        let t = tools(&r);
        let out = t[1]
            .call(serde_json::json!({"path": "a.txt"}))
            .await
            .unwrap();
        assert!(out.contains("Monday"));
        let e = t[1]
            .call(serde_json::json!({"path": "../x"}))
            .await
            .unwrap_err();
        assert!(e.contains(".."));
    }
}
