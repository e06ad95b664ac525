//! A `troupe serve` process for the HTTP tests: started on 127.0.0.1:0, its address
//! read from its first line of stdout, killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running server.
pub struct ServeProcess {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The model id it serves.
    pub model_id: String,
}

impl ServeProcess {
    /// Starts `troupe serve` on `model` with `args` added.
    pub fn start(model: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(super::troupe_bin())
            .args([
                "serve",
                "--port",
                "0",
                "--model-id",
                "test-model",
                "--model",
            ])
            .arg(model)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start troupe serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the serve address");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("troupe serve printed no address: {line:?}"))
            .to_string();
        Self {
            child,
            url,
            model_id: "test-model".into(),
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the Python script `tests/python/NAME` with `env`; panics with its output
/// unless it exits 0; returns its stdout.
pub fn run_python(python: &Path, name: &str, env: &[(&str, &str)]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name);
    let out = Command::new(python)
        .arg(&script)
        .envs(env.iter().copied())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    println!("{stdout}");
    stdout
}
