//! Helpers of the container tests (compose and swarm): commands with a time limit whose
//! whole process group is killed on overrun, their output, bounded waits, the engine check.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub struct Output {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    pub program: String,
}

impl Output {
    pub fn succeeded(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success())
    }

    pub fn describe(&self) -> String {
        let how = match (self.timed_out, self.status) {
            (true, _) => "timed out and was killed".to_string(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "could not be started".to_string(),
        };
        format!(
            "{} {how}\n--- stdout\n{}\n--- stderr\n{}",
            self.program,
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

pub fn tail(s: &str) -> &str {
    let start = s.len().saturating_sub(4000);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(out.succeeded(), "{what} failed: {}", out.describe());
}

/// Runs a command to completion with a time limit, killing its whole process group if it
/// overruns (so a build script's cargo goes too).
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let program = format!("{:?}", cmd.get_program());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Output {
                status: None,
                stdout: String::new(),
                stderr: e.to_string(),
                timed_out: false,
                program,
            };
        }
    };
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = pipe(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let stderr = pipe(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() >= timeout => {
                timed_out = true;
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        timed_out,
        program,
    }
}

pub fn require_engine() {
    let out = run(
        Command::new("docker").args(["info", "--format", "{{.ServerVersion}}"]),
        Duration::from_secs(60),
    );
    if !out.succeeded() || out.stdout.trim().is_empty() {
        panic!(
            "no Docker engine answers (`docker info`: {}); start one, or set STORM_SKIP_DOCKER=1 to skip the container tests",
            out.describe()
        );
    }
}

/// Polls `probe` every 250 ms until it gives a value; panics with its last complaint after
/// `timeout`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    loop {
        match probe() {
            Ok(v) => return v,
            Err(e) if started.elapsed() >= timeout => {
                panic!("gave up waiting {timeout:?} for {what}; last: {e}")
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}
