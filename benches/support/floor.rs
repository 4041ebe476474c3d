//! The floors a scenario is compared with, measured in the same run right before it: the
//! project's CSV reader alone (no network), a bare UDP ping-pong between two processes, and
//! (to explain a hop's cost, not as a target) a bare loop through three.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use stormdht::record;

/// Set in the environment of the child process that the bench binary re-execs as its echo.
pub const ECHO_ENV: &str = "STORM_BENCH_ECHO";
/// Set, to an address, in the environment of a child that passes every datagram on to it.
pub const FORWARD_ENV: &str = "STORM_BENCH_FORWARD";
/// Untimed round trips when the echo starts.
const WARM_UP: usize = 100;
/// About the size of a query datagram.
const PAYLOAD: usize = 100;

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The echo side of the UDP floor (run in the child): bind, print the port, echo every
/// datagram to its sender (or, with `forward`, pass it on there) until stdin closes, then
/// return (and the process exits).
pub fn echo_server(forward: Option<std::net::SocketAddr>) {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("echo socket");
    println!("{}", sock.local_addr().expect("echo address").port());
    let _ = std::io::stdout().flush();
    sock.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let stdin_closed = Arc::new(AtomicBool::new(false));
    let flag = stdin_closed.clone();
    std::thread::spawn(move || {
        // EOF (or an error) when the parent closes the pipe or exits.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        flag.store(true, Ordering::Relaxed);
    });
    let mut buf = [0u8; 2048];
    while !stdin_closed.load(Ordering::Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], forward.unwrap_or(from));
        }
    }
}

/// The floor's echo: this binary again, in a child process, echoing ~100-byte datagrams. It
/// stays up so that round trips can be timed between blocks of queries, under the same load
/// as they are; the child ends when this is dropped.
pub struct Echo {
    child: std::process::Child,
    sock: UdpSocket,
    target: std::net::SocketAddr,
    /// CPU spent on the timed round trips since [`Echo::take_cpu`]: by this thread, by the echo.
    cpu: Cell<CpuTally>,
}

/// CPU time spent on some work, ns: on the caller's side and on the other side, and how many
/// times the work was done.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTally {
    pub here_ns: u64,
    pub there_ns: u64,
    pub times: u64,
}

impl CpuTally {
    pub fn add(&mut self, here_ns: u64, there_ns: u64, times: u64) {
        self.here_ns += here_ns;
        self.there_ns += there_ns;
        self.times += times;
    }

    /// µs per time on each side, (here, there); None before anything was counted.
    pub fn per_time_us(&self) -> Option<(f64, f64)> {
        let n = self.times as f64;
        (self.times > 0).then(|| {
            (
                self.here_ns as f64 / n / 1e3,
                self.there_ns as f64 / n / 1e3,
            )
        })
    }
}

/// CPU time of the calling thread, ns (CLOCK_THREAD_CPUTIME_ID).
pub fn thread_cpu_ns() -> u64 {
    // SAFETY: clock_gettime writes one timespec into the one we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of every thread of `pids` so far, ns: the first field of each task's
/// `/proc/<pid>/task/<tid>/schedstat` (the scheduler's own count, to the nanosecond; the
/// clock ticks of `/proc/<pid>/stat` are 10 ms, a few hundred queries' worth).
pub fn processes_cpu_ns(pids: &[u32]) -> u64 {
    pids.iter()
        .flat_map(|&pid| threads_of(pid).into_iter().map(move |tid| (pid, tid)))
        .filter_map(|(pid, tid)| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()?;
            s.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

impl Echo {
    pub fn start() -> Echo {
        let (child, port) = spawn_echo(None);
        let sock = UdpSocket::bind("127.0.0.1:0").expect("ping socket");
        sock.set_read_timeout(Some(Duration::from_millis(500))).ok();
        let echo = Echo {
            child,
            sock,
            target: ([127, 0, 0, 1], port).into(),
            cpu: Cell::new(CpuTally::default()),
        };
        echo.round_trips(WARM_UP);
        echo.take_cpu();
        echo
    }

    /// `n` round trips, one datagram at a time, in µs (a lost one is left out).
    pub fn round_trips(&self, n: usize) -> Vec<f64> {
        let echo_pid = [self.child.id()];
        let (here, there) = (thread_cpu_ns(), processes_cpu_ns(&echo_pid));
        let rtts = timed_loops(&self.sock, self.target, n);
        let mut cpu = self.cpu.get();
        cpu.add(
            thread_cpu_ns().saturating_sub(here),
            processes_cpu_ns(&echo_pid).saturating_sub(there),
            n as u64,
        );
        self.cpu.set(cpu);
        rtts
    }

    /// The CPU the round trips took since the last call (pinger, echo), and starts again.
    pub fn take_cpu(&self) -> CpuTally {
        self.cpu.take()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        end_child(&mut self.child);
    }
}

/// This binary again in a child process that echoes, or passes datagrams on to `forward`;
/// its port.
fn spawn_echo(forward: Option<std::net::SocketAddr>) -> (std::process::Child, u16) {
    let mut command = Command::new(std::env::current_exe().expect("this bench binary"));
    match forward {
        Some(to) => command.env(FORWARD_ENV, to.to_string()),
        None => command.env(ECHO_ENV, "1"),
    };
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the echo process");
    let mut port = String::new();
    BufReader::new(child.stdout.take().expect("echo stdout"))
        .read_line(&mut port)
        .expect("echo port");
    (child, port.trim().parse().expect("echo port"))
}

/// A bare loop through three processes: this one sends to a relay, which passes the datagram
/// on to a second child, which sends it back here. What a query's hop stands on (client,
/// entry peer, next peer), where the ping-pong of [`Echo`] has two processes.
pub struct Relay {
    children: Vec<std::process::Child>,
    sock: UdpSocket,
    relay: std::net::SocketAddr,
}

impl Relay {
    pub fn start() -> Relay {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("relay pinger socket");
        sock.set_read_timeout(Some(Duration::from_millis(500))).ok();
        let here = sock.local_addr().expect("pinger address");
        let (last, last_port) = spawn_echo(Some(here));
        let (first, first_port) = spawn_echo(Some(([127, 0, 0, 1], last_port).into()));
        let relay = Relay {
            children: vec![first, last],
            sock,
            relay: ([127, 0, 0, 1], first_port).into(),
        };
        relay.loops(WARM_UP);
        relay
    }

    /// `n` loops, one datagram at a time, in µs (a lost one is left out).
    pub fn loops(&self, n: usize) -> Vec<f64> {
        timed_loops(&self.sock, self.relay, n)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.children.iter_mut().for_each(end_child);
    }
}

/// `n` times: a datagram of [`PAYLOAD`] bytes sent from `sock` to `to`, and one received back;
/// each time in µs (a lost one is left out).
fn timed_loops(sock: &UdpSocket, to: std::net::SocketAddr, n: usize) -> Vec<f64> {
    let payload = [7u8; PAYLOAD];
    let mut buf = [0u8; 2048];
    (0..n)
        .filter_map(|_| {
            let t = Instant::now();
            (sock.send_to(&payload, to).is_ok() && sock.recv_from(&mut buf).is_ok())
                .then(|| t.elapsed().as_secs_f64() * 1e6)
        })
        .collect()
}

/// Ends a child of [`spawn_echo`]: it stops when its stdin closes.
fn end_child(child: &mut std::process::Child) {
    drop(child.stdin.take());
    let _ = child.wait();
}

/// Half the median of `rtts` (µs, any order).
pub fn one_way_of(mut rtts: Vec<f64>) -> f64 {
    rtts.sort_by(|a, b| a.total_cmp(b));
    percentile(&rtts, 0.5) / 2.0
}

/// Parse-only time of `path` with the project's own reader, best of 3, in ms.
pub fn parse_ms(path: &Path) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            let d = record::load_path(path).expect("parse");
            std::hint::black_box(d.rows.len());
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

/// The CPUs `tid` may run on (0: the calling thread), or None when the system does not say.
pub fn affinity(tid: i32) -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set, and the kernel writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        (libc::sched_getaffinity(tid, size, &mut set) == 0).then_some(set)
    }
}

/// Lets `tid` (0: the calling thread) run only on `set`; false when the system refuses.
pub fn set_affinity(tid: i32, set: &libc::cpu_set_t) -> bool {
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), set) == 0 }
}

/// The first CPU of `set`, alone.
pub fn first_cpu_of(set: &libc::cpu_set_t) -> Option<libc::cpu_set_t> {
    let cpu = (0..libc::CPU_SETSIZE as usize).find(|&c| {
        // SAFETY: c is below CPU_SETSIZE.
        unsafe { libc::CPU_ISSET(c, set) }
    })?;
    // SAFETY: as in `affinity`; cpu is below CPU_SETSIZE.
    unsafe {
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        Some(one)
    }
}

/// Every thread of process `pid` (its tasks in /proc).
pub fn threads_of(pid: u32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Pins this thread and every thread of `pids` to one CPU while it lives, and gives them all
/// `restore` back when dropped. On this machine (a 2-vCPU VM) a datagram that wakes a process
/// on the other, idle vCPU costs 25-30 µs more than one to a process on the same vCPU, and
/// where the scheduler puts two processes is a coin toss per run: a floor and a query
/// measured unpinned may each land on either side. Pinned, both are measured alike.
pub struct Pinned {
    tids: Vec<i32>,
    restore: libc::cpu_set_t,
}

impl Pinned {
    pub fn all(pids: &[u32]) -> Option<Pinned> {
        let restore = affinity(0)?;
        let one = first_cpu_of(&restore)?;
        let mut tids = vec![0];
        tids.extend(pids.iter().flat_map(|&p| threads_of(p)));
        let pinned = Pinned { tids, restore };
        pinned
            .tids
            .iter()
            .all(|&t| set_affinity(t, &one))
            .then_some(pinned)
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        for &t in &self.tids {
            set_affinity(t, &self.restore);
        }
    }
}
