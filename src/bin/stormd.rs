//! `stormd`: the stormdht daemon. The configuration's `role` makes it the manager or a peer;
//! `stormd demo` runs a whole cluster on loopback in one process.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use stormdht::client::{Client, ClientError, verify};
use stormdht::cluster::LocalCluster;
use stormdht::config::{Config, Role};
use stormdht::driver::{run_manager, run_peer};
use stormdht::record::{self, RecordKey};
use stormdht::report;
use stormdht::telemetry;
use stormdht::wire::{ClientRequest, ReplyBody, RequestError};
use tokio::sync::{oneshot, watch};

#[derive(Parser)]
#[command(
    name = "stormd",
    version,
    about = "The stormdht daemon: a manager or a peer of the storm-event ring"
)]
struct Cli {
    /// TOML configuration file (overridden by STORM_* environment variables).
    #[arg(long, short, env = "STORM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run as the configured role (the default).
    Run,
    /// Start a manager and peers on loopback, then setup, distribute, query, leave, status,
    /// verify and teardown, in one process.
    Demo {
        #[arg(long, default_value_t = 5)]
        peers: usize,
        /// The CSV to distribute (default: the `data` key).
        #[arg(long)]
        file: Option<String>,
    },
    /// Print the effective configuration (defaults < file < environment) as TOML.
    Config,
    /// Exit 0 if the daemon of this configuration answers a ping on its port within
    /// `--timeout-ms` (for container health checks and probes), 1 otherwise.
    Health {
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stormd: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Config) = cli.command {
        return match toml::to_string_pretty(&cfg) {
            Ok(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("stormd: {e}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stormd: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Some(Command::Health { timeout_ms }) => {
                health(&cfg, Duration::from_millis(timeout_ms)).await
            }
            Some(Command::Demo { peers, file }) => demo(cfg, peers, file).await,
            _ => daemon(cfg).await,
        }
    });
    // A trace flush that gave up may have left a blocking thread behind: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::from(code)
}

/// Pings the daemon of `cfg` on this host's loopback at its listen port, signed with the
/// cluster key if there is one; 0 when it answers in time.
async fn health(cfg: &Config, limit: Duration) -> u8 {
    match health_check(cfg, limit).await {
        Ok(took) => {
            println!("stormd {} healthy: answered in {took:?}", cfg.role);
            0
        }
        Err(e) => {
            eprintln!("stormd health: {e}");
            1
        }
    }
}

async fn health_check(cfg: &Config, limit: Duration) -> Result<Duration, String> {
    use stormdht::auth::{open_if_keyed, seal_if_keyed};
    use stormdht::wire::{Body, Envelope};
    let port = cfg
        .listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| format!("cannot read a port in listen = {:?}", cfg.listen))?;
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let keyring = cfg.drive_options().map_err(|e| e.to_string())?.keyring;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    let nonce = rand::random::<u64>();
    let ping = Envelope::new(rand::random(), 0, None, Body::Ping { nonce })
        .encode()
        .map_err(|e| e.to_string())?;
    let ping = seal_if_keyed(keyring.as_ref(), &ping).into_owned();
    let start = Instant::now();
    let mut buf = vec![0u8; 65_536];
    while start.elapsed() < limit {
        socket
            .send_to(&ping, target)
            .await
            .map_err(|e| format!("cannot send to {target}: {e}"))?;
        // A lost ping is sent again; the daemon answers each one.
        let wait = Duration::from_millis(200).min(limit.saturating_sub(start.elapsed()));
        let Ok(Ok((n, from))) = tokio::time::timeout(wait, socket.recv_from(&mut buf)).await else {
            continue;
        };
        let answered = from == target
            && open_if_keyed(keyring.as_ref(), &buf[..n])
                .ok()
                .and_then(|bytes| Envelope::decode(bytes).ok())
                .is_some_and(|env| env.body == Body::Pong { nonce });
        if answered {
            return Ok(start.elapsed());
        }
    }
    Err(format!(
        "no answer from {target} (the {} of this configuration) within {limit:?}: is stormd running, and is its cluster key the same?",
        cfg.role
    ))
}

/// SIGTERM or SIGINT flips the returned flag.
fn signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

/// True for `127.x.x.x`, `[::1]` and `localhost`: addresses only this host can reach.
fn listens_on_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn daemon(cfg: Config) -> u8 {
    let instance = match cfg.role {
        Role::Manager => format!("manager@{}", cfg.listen),
        Role::Peer => cfg.peer_name(),
    };
    let telemetry = match telemetry::init(
        &cfg.telemetry,
        &format!("stormd-{}", cfg.role),
        &instance,
        telemetry::Spans::WhenExported,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("stormd: {e}");
            return 2;
        }
    };
    if cfg.cluster_key.is_empty()
        && cfg.cluster_key_file.is_empty()
        && !listens_on_loopback(&cfg.listen)
    {
        tracing::warn!(
            listen = %cfg.listen,
            "no cluster key: anyone who can send a datagram to this address can tear the cluster down or join it; set cluster_key_file (or STORM_CLUSTER_KEY)"
        );
    }
    let shutdown = signals();
    let (ready_tx, ready_rx) = oneshot::channel();
    let role = cfg.role;
    tokio::spawn(async move {
        if let Ok(addr) = ready_rx.await {
            // A stable line on stdout for scripts and tests; logs go to stderr.
            println!("stormd {role} listening on {addr}");
        }
    });
    let code = match cfg.role {
        Role::Manager => match run_manager(&cfg, shutdown, Some(ready_tx)).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("{e}");
                2
            }
        },
        Role::Peer => match run_peer(&cfg, shutdown, Some(ready_tx)).await {
            Ok(exit) => u8::try_from(exit.code).unwrap_or(1),
            Err(e) => {
                tracing::error!("{e}");
                2
            }
        },
    };
    telemetry.shutdown().await;
    code
}

async fn demo(mut cfg: Config, peers: usize, file: Option<String>) -> u8 {
    // The demo narrates on stdout; the six nodes' info logs would drown it.
    if cfg.telemetry.log == Config::default().telemetry.log {
        cfg.telemetry.log = "warn".into();
    }
    let telemetry = match telemetry::init(
        &cfg.telemetry,
        "stormd-demo",
        "demo",
        telemetry::Spans::Always,
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("stormd: {e}");
            return 2;
        }
    };
    let code = match run_demo(&cfg, peers.max(2), file).await {
        Ok(()) => {
            println!("\ndemo finished: every step succeeded");
            0
        }
        Err(e) => {
            eprintln!("\ndemo failed: {e}");
            1
        }
    };
    telemetry.shutdown().await;
    code
}

async fn call(client: &mut Client, req: ClientRequest) -> Result<ReplyBody, String> {
    let kind = req.kind();
    client
        .call(req, None)
        .await
        .map_err(|e| format!("{kind}: {e}"))
}

async fn run_demo(cfg: &Config, peers: usize, file: Option<String>) -> Result<(), String> {
    let path = file.unwrap_or_else(|| cfg.data.clone());
    println!("== starting a manager and {peers} peers on loopback");
    let mut cluster = LocalCluster::start(cfg, peers, "peer")
        .await
        .map_err(|e| e.to_string())?;
    let mut client = Client::connect(&cluster.manager.to_string(), Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?;
    cluster
        .wait_registered(&mut client, peers, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    println!("manager at {}", cluster.manager);

    println!("\n== setup");
    if let ReplyBody::Setup(s) = call(&mut client, ClientRequest::Setup).await? {
        println!("{}", report::status_text(&s));
    }

    println!("\n== distribute {path}");
    let ReplyBody::Distribute(d) = call(
        &mut client,
        ClientRequest::Distribute {
            path: Some(path.clone()),
        },
    )
    .await?
    else {
        return Err("distribute: unexpected reply".into());
    };
    println!("{}", report::distribute_text(&d));

    let dataset = {
        let p = path.clone();
        tokio::task::spawn_blocking(move || record::load_path(std::path::Path::new(&p)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
    };
    println!("\n== queries (each walks the ring from its entry peer to the owner)");
    let mut keys: Vec<RecordKey> = dataset.rows.iter().map(|r| r.key).collect();
    keys.dedup();
    let picks = [
        0,
        keys.len() / 3,
        keys.len() / 2,
        keys.len().saturating_sub(1),
    ];
    for &i in &picks {
        let Some(key) = keys.get(i).copied() else {
            continue;
        };
        let started = Instant::now();
        if let ReplyBody::Query(q) = call(
            &mut client,
            ClientRequest::Query {
                key,
                via: None,
                routing: None,
            },
        )
        .await?
        {
            let ms = started.elapsed().as_secs_f64() * 1e3;
            let state = q
                .records
                .first()
                .and_then(|r| r.get("state"))
                .map(str::to_string);
            println!(
                "event {key}: {} ({}) path {} in {ms:.2} ms",
                if q.found { "found" } else { "NOT FOUND" },
                state.unwrap_or_default(),
                report::path_text(&q)
            );
            if !q.found {
                return Err(format!("event {key} was not found"));
            }
        }
    }
    let absent = RecordKey::Event(1);
    if let ReplyBody::Query(q) = call(
        &mut client,
        ClientRequest::Query {
            key: absent,
            via: None,
            routing: None,
        },
    )
    .await?
    {
        println!(
            "event {absent}: {} path {}",
            if q.found {
                "found"
            } else {
                "not found (as expected)"
            },
            report::path_text(&q)
        );
    }

    let leaver = cluster
        .peers
        .get(1)
        .map(|p| p.name.clone())
        .ok_or("no peer to leave")?;
    println!("\n== leave {leaver}");
    if let ReplyBody::Leave {
        id,
        name,
        handed_over,
    } = call(
        &mut client,
        ClientRequest::Leave {
            name: leaver.clone(),
        },
    )
    .await?
    {
        println!("peer {id} ({name}) left; {handed_over} rows copied to their new holders");
    }
    // The leaver's task ends on its own once it has handed over.
    if let Some(exit) = cluster.terminate(&leaver).await {
        println!("{leaver} exited with status {}", exit.code);
    }

    println!("\n== status");
    if let ReplyBody::Status(s) = call(&mut client, ClientRequest::Status).await? {
        println!("{}", report::status_text(&s));
    }

    println!("\n== verify: every record of {path} after the leave");
    let v = verify(&mut client, &path, &dataset, 32).await;
    println!("{}", report::verify_text(&v));
    if !v.ok() {
        return Err("some records were not found after the leave".into());
    }

    // The copies the leave planned may still be settling: a repair compares a settled ring.
    println!("\n== repair: the holders of every range compared");
    let mut tries = 0;
    let repaired = loop {
        match client.call(ClientRequest::Repair, None).await {
            Err(ClientError::Failed(RequestError::Unsettled)) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => break other.map_err(|e| format!("repair: {e}"))?,
        }
    };
    if let ReplyBody::Repair(r) = repaired {
        println!("{}", report::repair_text(&r));
        if r.diverged_ranges > 0 {
            return Err("a repair found ranges whose holders differ".into());
        }
    }

    println!("\n== teardown");
    if let ReplyBody::Teardown { exited, .. } = call(&mut client, ClientRequest::Teardown).await? {
        println!("{}", report::teardown_text(&exited));
    }
    let exits = cluster.finish().await;
    for (name, exit) in &exits {
        match exit {
            Some(e) => println!("{name} exited with status {}", e.code),
            None => println!("{name} did not exit cleanly"),
        }
    }
    if exits
        .iter()
        .any(|(_, e)| e.as_ref().map(|e| e.code) != Some(0))
    {
        return Err("a peer did not exit with status 0".into());
    }
    Ok(())
}
