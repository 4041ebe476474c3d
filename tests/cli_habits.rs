//! What people expect of a command-line tool: --version, shell completions, a progress bar on a
//! terminal only, and `status --watch`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

#[test]
fn both_binaries_print_their_version() {
    for bin in [STORMD, STORMCTL] {
        let out = Command::new(bin).arg("--version").output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{bin}: {text}");
        assert!(
            text.trim().ends_with(env!("CARGO_PKG_VERSION")),
            "{bin}: {text}"
        );
    }
}

#[test]
fn completions_name_every_subcommand_and_refuse_unknown_shells() {
    let out = Command::new(STORMCTL)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(script.contains("complete -F _stormctl"), "{script}");
    for sub in [
        "setup",
        "distribute",
        "query",
        "leave",
        "status",
        "teardown",
        "verify",
        "completions",
    ] {
        assert!(script.contains(sub), "{sub} missing");
    }
    for shell in ["zsh", "fish"] {
        let out = Command::new(STORMCTL)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let out = Command::new(STORMCTL)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
}

fn has_script() -> bool {
    let found = Command::new("script").arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIPPED: the terminal half (util-linux `script` is not installed)");
    }
    found
}

/// Runs stormctl under a pseudo-terminal (util-linux `script`); returns what the terminal got.
fn on_a_terminal(manager: &str, args: &str) -> String {
    let inner = format!("{STORMCTL} --manager {manager} {args}");
    let tty = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .env("COLUMNS", "120")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&tty.stdout).to_string();
    assert!(tty.status.success(), "{args}: {text}");
    text
}

/// `distribute` and `verify` draw a progress bar only on a terminal: on a pipe stderr stays
/// empty, and under a pseudo-terminal the bar shows rows and a rate (distribute's from the
/// manager's progress reports).
#[test]
fn distribute_and_verify_draw_a_progress_bar_on_a_terminal_only() {
    let cluster = Cluster::start(3);
    let file = shared_data("details-1996.csv");
    let path = file.to_str().unwrap();
    cluster.ctl_json(&["setup"]);
    let manager = cluster.manager.addr.to_string();
    if has_script() {
        let text = on_a_terminal(&manager, &format!("distribute --file {path}"));
        assert!(
            text.contains("distribute [") && text.contains("rows") && text.contains("/s"),
            "no progress bar on a terminal:\n{text}"
        );
        assert!(text.contains("read 48534, stored 48534"), "{text}");
    } else {
        cluster.ctl_json(&["distribute", "--file", path]);
    }
    let piped = ctl_at(&manager, &["verify", "--file", path]);
    assert!(piped.status.success());
    assert!(
        piped.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    let again = ctl_at(&manager, &["distribute", "--file", path]);
    assert!(again.status.success());
    assert!(
        again.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    if has_script() {
        let text = on_a_terminal(&manager, &format!("verify --file {path}"));
        assert!(
            text.contains("verify [") && text.contains("rows") && text.contains("/s"),
            "no progress bar on a terminal:\n{text}"
        );
        assert!(text.contains("48,534"), "{text}");
    }
}

/// `status --watch --json` prints a status line per refresh until stopped.
#[test]
fn status_watch_refreshes_until_stopped() {
    let cluster = Cluster::start(2);
    let mut child = Command::new(STORMCTL)
        .args(["--manager", &cluster.manager.addr.to_string()])
        .args(["--json", "status", "--watch", "--interval", "0.3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut refreshes = Vec::new();
    while refreshes.len() < 3 && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            refreshes.push(line);
        }
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let stopped = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(50));
        child.try_wait().ok().flatten()
    });
    if stopped.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(refreshes.len(), 3, "{refreshes:?}");
    for line in &refreshes {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["peers"].as_array().map(Vec::len), Some(2), "{v}");
    }
    assert_eq!(
        stopped.and_then(|s| s.code()),
        Some(0),
        "Ctrl-C ends the watch"
    );
}
