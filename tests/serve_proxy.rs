//! Two `troupe serve` replicas behind nginx (`hash $http_x_session_id consistent`,
//! the configuration the README documents): sessions stick to the replica holding
//! their cache, and survive one replica dying (tests/python/proxy.py holds the checks).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use common::serve::{run_python, ServeProcess};

fn nginx() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        let why = "this test needs nginx: run `bash .ci/setup-nginx`";
        assert!(std::env::var_os("CI").is_none(), "{why} (CI is set)");
        eprintln!("skipped: {why}");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The README's configuration, with loopback ports and a private prefix.
fn config(dir: &Path, port: u16, replicas: &[&str]) -> String {
    let servers: String = replicas
        .iter()
        .map(|u| {
            format!(
                "    server {} max_fails=1 fail_timeout=30s;\n",
                u.trim_start_matches("http://")
            )
        })
        .collect();
    let d = dir.display();
    format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 upstream troupe {{\n    hash $http_x_session_id consistent;\n{servers}  }}\n\
         \x20 server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://troupe;\n\
         \x20     proxy_http_version 1.1;\n      proxy_buffering off;\n      proxy_read_timeout 300s;\n\
         \x20     proxy_next_upstream error timeout http_502 non_idempotent;\n    }}\n  }}\n}}\n"
    )
}

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers before it exits (SIGKILL would leave
        // them running).
        let stopped = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[test]
fn sessions_stick_to_their_replica_and_move_when_it_dies() {
    let Some(py) = common::python() else { return };
    let Some(nginx) = nginx() else { return };
    let model = common::tiny_model_path();
    let a = ServeProcess::start(&model, &[]);
    let b = ServeProcess::start(&model, &[]);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, config(dir.path(), port, &[&a.url, &b.url])).unwrap();
    let proxy = Nginx(
        Command::new(nginx)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir.path())
            .spawn()
            .expect("start nginx"),
    );
    let url = format!("http://127.0.0.1:{port}");
    // nginx is up once it answers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = a.pid().to_string();
    run_python(
        &py,
        "proxy.py",
        &[
            ("PROXY_URL", &url),
            ("REPLICA_URLS", &format!("{},{}", a.url, b.url)),
            ("VICTIM_PID", &pid),
            ("VICTIM_URL", &a.url),
            ("TROUPE_MODEL_ID", &a.model_id),
        ],
    );
    drop(proxy);
}
