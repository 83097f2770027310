//! The real `herald` binary as a child process, for what only a process shows: signals, environment
//! variables, start-up refusals, the log on stderr.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Herald {
    /// Killed when dropped (`kill_on_drop`).
    _child: Child,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

/// A `herald` command with a fresh data directory; `configure` adds arguments and environment.
pub fn command(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .env_remove("HERALD_CONFIG")
        .env("HERALD_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

impl Herald {
    /// Starts `herald serve --listen 127.0.0.1:0 ARGS` with `envs` and waits for its address.
    pub async fn start(args: &[&str], envs: &[(&str, &str)]) -> Herald {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = Herald::start_in(dir.path(), args, envs).await;
        h._dir = Some(dir);
        h
    }

    /// Like [`Herald::start`] on the data directory `dir`, which outlives the process (to start another
    /// on what this one left).
    pub async fn start_in(dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> Herald {
        let mut cmd = command(dir);
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn herald");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return Some(url.trim().to_string());
                }
            }
            None
        })
        .await
        .expect("herald printed its address in time");
        let Some(url) = url else {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err).await;
            }
            panic!("herald exited before listening: {err}");
        };
        Herald {
            _child: child,
            url,
            _dir: None,
        }
    }
}

impl Herald {
    /// Sends a signal (`INT` is Ctrl-C, `TERM`, `KILL`) to the process.
    pub fn signal(&self, sig: &str) {
        let pid = self._child.id().expect("running");
        let ok = std::process::Command::new("kill")
            .args(["-s", sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -s {sig} {pid}");
    }

    /// Waits (bounded) for the process to exit.
    pub async fn exited(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(Duration::from_secs(30), self._child.wait())
            .await
            .expect("herald exited in time")
            .expect("wait")
    }

    /// The resident memory of the process, from /proc.
    pub fn rss(&self) -> usize {
        let pid = self._child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        let kb: usize = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS");
        kb * 1024
    }

    /// A gauge or counter from `/metrics` (the sum of its series).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// Runs `herald serve ARGS` expecting it to refuse to start; returns its exit status and stderr.
pub async fn refused(args: &[&str], envs: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = command(dir.path());
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("herald exited in time")
        .expect("run herald");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
