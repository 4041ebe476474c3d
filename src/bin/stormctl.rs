//! `stormctl`: the command-line client. It talks only to the manager's UDP port.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use stormdht::auth::Keyring;
use stormdht::client::{BlockingClient, Client, verify_with};
use stormdht::config::TelemetryConfig;
use stormdht::record::{self, RecordKey};
use stormdht::report;
use stormdht::telemetry::{self, TARGET};
use stormdht::wire::{ClientRequest, ReplyBody, Routing};

#[derive(Parser)]
#[command(
    name = "stormctl",
    version,
    about = "Control and query a stormdht cluster"
)]
struct Cli {
    /// The manager's UDP address.
    #[arg(
        long,
        global = true,
        env = "STORMCTL_MANAGER",
        default_value = "127.0.0.1:5000"
    )]
    manager: String,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for a reply once the manager has acknowledged a request.
    #[arg(long, global = true, default_value_t = 30.0)]
    timeout: f64,
    /// Jaeger UI base URL, to print a link to each query's trace.
    #[arg(long, global = true, env = "STORM_JAEGER_UI")]
    jaeger_ui: Option<String>,
    /// The cluster's keyring file (one key per line, the first used to send); the keys
    /// themselves may instead be given in STORMCTL_KEY (separated by commas).
    #[arg(long, global = true, env = "STORMCTL_KEY_FILE")]
    key_file: Option<std::path::PathBuf>,
    /// OTLP/gRPC endpoint for stormctl's own spans (else OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, global = true, env = "STORM_TELEMETRY__OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Where a query enters the ring: `next` (the next member round the ring, so the path
    /// shows the walk or the fingers; the default of query) or `owner` (the key's owner by
    /// the ring view stormctl fetched: mostly no hop; the default of verify).
    #[arg(long, global = true, value_enum)]
    entry: Option<EntryArg>,
    /// Send queries (query, verify) through the manager instead of straight to the ring's
    /// peers: two more datagrams per query, as in the original design.
    #[arg(long, global = true)]
    through_manager: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Form the ring from the registered peers.
    Setup,
    /// Load a CSV on the manager and store every record on its owner.
    Distribute {
        /// The file as the manager sees it (default: the manager's `data` key).
        #[arg(long)]
        file: Option<String>,
    },
    /// Find an event by id (or a fallback key such as x00ff12ab34cd56ef).
    Query {
        event_id: String,
        /// Enter the ring at this peer (name or id).
        #[arg(long)]
        via: Option<String>,
        /// Also draw the walk as a waterfall: each hop's peer, address and time (no Jaeger
        /// needed; with --json the same data is under "timeline").
        #[arg(long)]
        trace: bool,
        /// How the query travels: walk (next by next) or fingers (Chord); default: the
        /// manager's `routing`.
        #[arg(long, value_enum)]
        routing: Option<RoutingArg>,
    },
    /// Make a peer leave the ring; its records are handed over first.
    Leave { name: String },
    /// Show the ring: each peer's id, name, address, state, records and share.
    Status {
        /// Refresh every --interval seconds until interrupted, like `watch` (with --json: one
        /// JSON line per refresh).
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// End every peer; the manager stays, ready for new peers.
    Teardown,
    /// Anti-entropy, like `nodetool repair`: compare what the holders of every range hold and
    /// have those of ranges that differ copy their rows to each other (`status` shows when
    /// the copies are done).
    Repair,
    /// Query every key of a local CSV file and compare the answers with the file.
    Verify {
        #[arg(long)]
        file: PathBuf,
        /// Queries in flight at once. Those to one peer leave together, up to 64 keys a
        /// datagram (a multi-get), so a wide window is what makes a verify fast.
        #[arg(long, default_value_t = 256)]
        window: usize,
    },
    /// Make a large CSV from a real one, for scale tests (no manager needed): the source's rows
    /// repeated, each pass with its event ids shifted by 10^8, until --records rows.
    Generate {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        records: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a shell completion script: `stormctl completions bash > ~/.local/share/bash-completion/completions/stormctl`.
    Completions { shell: clap_complete::Shell },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum EntryArg {
    Next,
    Owner,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RoutingArg {
    Walk,
    Fingers,
}

impl From<RoutingArg> for Routing {
    fn from(r: RoutingArg) -> Routing {
        match r {
            RoutingArg::Walk => Routing::Walk,
            RoutingArg::Fingers => Routing::Fingers,
        }
    }
}

/// Exit statuses: 0 success (found), 1 not found / verification failed, 2 error.
const EXIT_NOT_FOUND: u8 = 1;
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stormctl: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let code = runtime.block_on(run(cli));
    // A trace flush that gave up may have left a blocking thread behind: do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    code
}

async fn run(cli: Cli) -> ExitCode {
    let tcfg = TelemetryConfig {
        otlp_endpoint: cli.otlp_endpoint.clone().unwrap_or_default(),
        service_name: String::new(),
        jaeger_ui: String::new(),
        log: "warn".into(),
    };
    let instance = format!("stormctl-{}", std::process::id());
    let telemetry = match telemetry::init(&tcfg, "stormctl", &instance, telemetry::Spans::Always) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("stormctl: telemetry disabled: {e}");
            None
        }
    };
    let code = command(&cli).await;
    if let Some(t) = telemetry {
        t.shutdown().await;
    }
    code
}

fn fail(json: bool, msg: impl std::fmt::Display) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({ "error": msg.to_string() }));
    } else {
        eprintln!("stormctl: {msg}");
    }
    ExitCode::from(EXIT_ERROR)
}

/// The keyring from `--key-file` / `STORMCTL_KEY_FILE`, else `STORMCTL_KEY`, else none.
fn keyring(cli: &Cli) -> Result<Option<Keyring>, String> {
    let text = match &cli.key_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display()))?,
        None => match std::env::var("STORMCTL_KEY") {
            Ok(k) if !k.trim().is_empty() => k,
            _ => return Ok(None),
        },
    };
    Keyring::parse(&text)
        .map(Some)
        .map_err(|e| format!("the cluster key: {e}"))
}

async fn command(cli: &Cli) -> ExitCode {
    if let Command::Generate { from, records, out } = &cli.command {
        return generate(cli.json, from, *records, out);
    }
    if let Command::Completions { shell } = &cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "stormctl",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    let timeout = Duration::from_secs_f64(cli.timeout.clamp(0.1, 86_400.0));
    let keyring = match keyring(cli) {
        Ok(k) => k,
        Err(e) => return fail(cli.json, e),
    };
    let mut client = match Client::connect(&cli.manager, timeout).await {
        Ok(c) => c.with_keyring(keyring),
        Err(e) => return fail(cli.json, e),
    };
    client.set_direct(!cli.through_manager);
    let verifying = matches!(cli.command, Command::Verify { .. });
    client.set_owner_entry(
        cli.entry.unwrap_or(if verifying {
            EntryArg::Owner
        } else {
            EntryArg::Next
        }) == EntryArg::Owner,
    );
    match &cli.command {
        Command::Query {
            event_id,
            via,
            trace: waterfall,
            routing,
        } => {
            let key: RecordKey = match event_id.parse() {
                Ok(k) => k,
                Err(e) => return fail(cli.json, format!("'{event_id}' is not an event id: {e}")),
            };
            let routing = routing.map(Routing::from);
            query(cli, &mut client, key, via.clone(), routing, *waterfall).await
        }
        Command::Verify { file, window } => {
            let path = file.clone();
            let loaded = tokio::task::spawn_blocking(move || record::load_path(&path)).await;
            let dataset = match loaded {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => return fail(cli.json, e),
                Err(e) => return fail(cli.json, e),
            };
            let bar = progress_bar(cli.json, dataset.rows.len() as u64, "verify");
            let report = verify_with(
                &mut client,
                &file.display().to_string(),
                &dataset,
                *window,
                |done, total| {
                    if let Some(bar) = &bar {
                        bar.set_length(total as u64);
                        bar.set_position(done as u64);
                    }
                },
            )
            .await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            if cli.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                println!("{}", report::verify_text(&report));
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_FOUND)
            }
        }
        Command::Setup => request(cli, &mut client, ClientRequest::Setup).await,
        Command::Distribute { file } => {
            let req = ClientRequest::Distribute { path: file.clone() };
            // The manager reports how many rows are stored every 100 ms: a bar from the first.
            let bar = progress_bar(cli.json, 0, "distribute");
            let code = request_with_progress(cli, &mut client, req, bar.as_ref()).await;
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            code
        }
        Command::Leave { name } => {
            let req = ClientRequest::Leave { name: name.clone() };
            request(cli, &mut client, req).await
        }
        Command::Status { watch: false, .. } => {
            request(cli, &mut client, ClientRequest::Status).await
        }
        Command::Status {
            watch: true,
            interval,
        } => watch_status(cli, &mut client, *interval).await,
        Command::Teardown => request(cli, &mut client, ClientRequest::Teardown).await,
        Command::Repair => request(cli, &mut client, ClientRequest::Repair).await,
        // Handled above, without a manager.
        Command::Completions { .. } | Command::Generate { .. } => ExitCode::SUCCESS,
    }
}

fn generate(json: bool, from: &std::path::Path, records: u64, out: &std::path::Path) -> ExitCode {
    let started = Instant::now();
    let source = match std::fs::File::open(from) {
        Ok(f) => f,
        Err(e) => return fail(json, format!("cannot read {}: {e}", from.display())),
    };
    let sink = match std::fs::File::create(out) {
        Ok(f) => f,
        Err(e) => return fail(json, format!("cannot create {}: {e}", out.display())),
    };
    match record::generate(source, sink, records) {
        Ok(n) => {
            let secs = started.elapsed().as_secs_f64();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "out": out.display().to_string(), "records": n, "seconds": secs })
                );
            } else {
                println!("wrote {n} records to {} in {secs:.1} s", out.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(json, format!("generating {}: {e}", out.display())),
    }
}

/// A progress bar on stderr, only for a person at a terminal (never with --json or when
/// stderr is redirected).
fn progress_bar(json: bool, len: u64, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if json || !std::io::stderr().is_terminal() {
        return None;
    }
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:40}] {human_pos}/{human_len} rows, {per_sec}, eta {eta}",
    )
    .ok()?
    .progress_chars("=> ");
    let bar = indicatif::ProgressBar::new(len).with_style(style);
    bar.set_prefix(what.to_string());
    Some(bar)
}

/// `status --watch`: the status again every `interval` seconds, like `watch stormctl status`,
/// until Ctrl-C. An unanswered refresh is shown and the watch goes on.
async fn watch_status(cli: &Cli, client: &mut Client, interval: f64) -> ExitCode {
    use std::io::IsTerminal;
    let every = Duration::from_secs_f64(interval.clamp(0.2, 3_600.0));
    let clear = !cli.json && std::io::stdout().is_terminal();
    loop {
        let reply = client.call(ClientRequest::Status, None).await;
        if clear {
            print!("\x1b[2J\x1b[H");
        }
        if !cli.json {
            println!(
                "Every {:.1}s: stormctl status ({}), Ctrl-C to stop\n",
                every.as_secs_f64(),
                cli.manager
            );
        }
        match &reply {
            Ok(r) => print_reply(cli.json, r),
            Err(e) if cli.json => println!("{}", serde_json::json!({ "error": e.to_string() })),
            Err(e) => println!("stormctl: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
        }
    }
}

/// A command with one request and one reply, printed as it comes.
async fn request(cli: &Cli, client: &mut Client, req: ClientRequest) -> ExitCode {
    request_with_progress(cli, client, req, None).await
}

/// As [`request`], moving `bar` as the manager reports progress.
async fn request_with_progress(
    cli: &Cli,
    client: &mut Client,
    req: ClientRequest,
    bar: Option<&indicatif::ProgressBar>,
) -> ExitCode {
    let kind = req.kind();
    let span =
        tracing::info_span!(target: TARGET, "stormctl", otel.name = format!("stormctl {kind}"));
    let trace = telemetry::context_of(&span);
    let reply = client
        .call_with_progress(req, trace, |done, total| {
            if let Some(bar) = bar {
                bar.set_length(total);
                bar.set_position(done);
            }
        })
        .await;
    match reply {
        Ok(reply) => {
            print_reply(cli.json, &reply);
            ExitCode::SUCCESS
        }
        Err(e) => fail(cli.json, e),
    }
}

fn print_reply(json: bool, reply: &ReplyBody) {
    let (text, value) = match reply {
        ReplyBody::Setup(s) => (
            format!("ring formed\n{}", report::status_text(s)),
            report::status_json(s),
        ),
        ReplyBody::Status(s) => (report::status_text(s), report::status_json(s)),
        ReplyBody::Distribute(d) => (
            report::distribute_text(d),
            serde_json::to_value(d).unwrap_or_default(),
        ),
        ReplyBody::Leave {
            id,
            name,
            handed_over,
        } => (
            format!("peer {id} ({name}) left the ring; its records are with their new owners"),
            serde_json::json!({ "id": id, "name": name, "handed_over": handed_over }),
        ),
        ReplyBody::Teardown { exited, .. } => {
            (report::teardown_text(exited), report::teardown_json(exited))
        }
        ReplyBody::Repair(r) => (
            report::repair_text(r),
            serde_json::to_value(r).unwrap_or_default(),
        ),
        ReplyBody::Query(q) => (
            report::query_text(q, 0.0),
            report::query_json(q, 0.0, None, None),
        ),
        ReplyBody::Ring { view, routing } => (
            format!(
                "ring epoch {}: {} members, routing {routing}",
                view.epoch,
                view.members.len()
            ),
            serde_json::json!({ "view": view, "routing": routing }),
        ),
    };
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

async fn query(
    cli: &Cli,
    client: &mut Client,
    key: RecordKey,
    via: Option<String>,
    routing: Option<Routing>,
    waterfall: bool,
) -> ExitCode {
    let span = tracing::info_span!(
        target: TARGET,
        "stormctl query",
        otel.kind = "client",
        event.id = %key,
        found = tracing::field::Empty,
        network.transport = "udp",
        network.peer.address = tracing::field::Empty,
        network.peer.port = tracing::field::Empty,
    );
    let trace_id = telemetry::trace_id_of(&span);
    let trace = telemetry::context_of(&span);
    // One query, on the blocking client: no runtime between it and its socket.
    let started = Instant::now();
    let mut blocking = match BlockingClient::like(client) {
        Ok(b) => b,
        Err(e) => return fail(cli.json, e),
    };
    let manager = blocking.manager();
    let asked = tokio::task::spawn_blocking(move || {
        blocking.call(ClientRequest::Query { key, via, routing }, trace)
    })
    .await;
    let result = match asked {
        Ok(result) => result,
        Err(e) => return fail(cli.json, format!("the query stopped: {e}")),
    };
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    let trace_url = match (&cli.jaeger_ui, &trace_id) {
        (Some(ui), Some(id)) => Some(format!("{}/trace/{id}", ui.trim_end_matches('/'))),
        _ => None,
    };
    match result {
        Ok(ReplyBody::Query(q)) => {
            span.record("found", q.found);
            // Where the query entered: the first hop, or the manager that relayed it.
            let entry = q.hops.first().and_then(|h| h.addr);
            let entry = entry.unwrap_or(manager);
            span.record("network.peer.address", entry.ip().to_string());
            span.record("network.peer.port", entry.port());
            if cli.json {
                println!(
                    "{}",
                    report::query_json(&q, elapsed_ms, trace_id.as_deref(), trace_url.as_deref())
                );
            } else {
                println!("{}", report::query_text(&q, elapsed_ms));
                if waterfall {
                    println!(
                        "{}",
                        report::waterfall_text(
                            &q,
                            if cli.through_manager {
                                "the manager"
                            } else {
                                "stormctl"
                            }
                        )
                    );
                }
                if let Some(id) = &trace_id {
                    println!("trace: {id}");
                }
                if let Some(url) = &trace_url {
                    println!("jaeger: {url}");
                }
            }
            drop(span);
            if q.found {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_FOUND)
            }
        }
        Ok(other) => fail(cli.json, format!("unexpected reply: {other:?}")),
        Err(e) => fail(cli.json, e),
    }
}
