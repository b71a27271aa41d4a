//! The `castvault` binary: parses the command line, installs tracing, loads config, binds the
//! listeners and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use castvault::app::{self, Listeners};
use castvault::cli;
use castvault::config::{AckLevel, Config};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "castvault",
    version,
    about = "Resilient, Tailscale-compatible SSH session recorder"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recorder node (embedded default: local store under ./castvault-data, loopback).
    Serve(ServeArgs),
    /// Run the recording SSH gateway (`[gateway]` in the config): OpenSSH clients connect as
    /// `USER%TARGET`, sessions are proxied to the target and recorded on the recorders.
    Gateway(GatewayArgs),
    /// Inspect recordings in a store.
    Recordings {
        #[command(subcommand)]
        command: RecordingsCommand,
    },
    /// Write a recording out exactly as it was received (verified against its manifest).
    Export(ExportArgs),
    /// Import Tailscale recorder (tsrecorder) recordings and events from its directory or S3
    /// bucket. Idempotent and resumable: run it again to take what was skipped or failed.
    Import(ImportArgs),
    /// Play a recording in this terminal, reading only the chunks it reaches from the store.
    /// Keys: space pause, . step (paused), right/left next/previous chunk, q quit.
    Play(PlayArgs),
    /// Write the compliance bundles of every finalized recording a query matches into one
    /// archive, one recording at a time (each export audited).
    ExportQuery {
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        output: PathBuf,
    },
    /// Check a stored recording: every chunk, the hash chain, the seal and checkpoint
    /// signatures, the event stream, and that nothing was added. Exits 1 on any failure.
    Verify(VerifyArgs),
    /// Retention policies (`[[retention]]` in the config).
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Legal holds: held recordings are never deleted.
    Hold {
        #[command(subcommand)]
        command: HoldCommand,
    },
    /// Signing keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Access tokens for the web UI and API.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Args)]
struct ImportArgs {
    /// tsrecorder's directory (`--dst`), or `s3://BUCKET[/PREFIX]`.
    source: String,
    /// An object_store setting of an S3 source, KEY=VALUE (`endpoint`, `region`,
    /// `access_key_id`, ...); the `AWS_*` environment is used otherwise.
    #[arg(long = "source-option", value_parser = parse_key_value)]
    source_options: Vec<(String, String)>,
    /// Objects modified more recently are taken to be still being written, and skipped.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    min_age: std::time::Duration,
    /// Recordings imported at once (default: 4 per CPU, at most 16; at most 64).
    #[arg(long)]
    jobs: Option<usize>,
    /// Progress bar on stderr: auto (when a terminal), always, never.
    #[arg(long, default_value = "auto")]
    progress: Toggle,
    /// One JSON object per source object and a summary, instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum Toggle {
    Auto,
    Always,
    Never,
}

#[derive(Args)]
struct PlayArgs {
    /// Recording id.
    id: String,
    /// Playback speed.
    #[arg(short, long, default_value_t = 1.0)]
    speed: f64,
    /// Longest pause kept, in seconds (longer idle stretches are cut to this).
    #[arg(short = 'i', long)]
    idle_time_limit: Option<f64>,
    /// Start at this chunk (0 is the first).
    #[arg(long, default_value_t = 0)]
    from_chunk: u32,
    #[command(flatten)]
    store: StoreArgs,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

#[derive(Args)]
struct VerifyArgs {
    /// Recording id (in the configured stores).
    #[arg(required_unless_present_any = ["bundle", "audit"])]
    id: Option<String>,
    /// An exported compliance bundle on disk instead.
    #[arg(long, conflicts_with_all = ["id", "audit"])]
    bundle: Option<PathBuf>,
    /// The audit log instead: every object's signed chain link, for the days from `--from`
    /// to `--to` (UTC, inclusive; both default to today).
    #[arg(long, conflicts_with = "id")]
    audit: bool,
    #[arg(long, requires = "audit", value_parser = parse_day)]
    from: Option<time::Date>,
    #[arg(long, requires = "audit", value_parser = parse_day)]
    to: Option<time::Date>,
    #[command(flatten)]
    store: StoreArgs,
}

/// Which recordings: every condition given must hold; repeated values are alternatives.
#[derive(Args)]
struct FilterArgs {
    /// Started at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    from: Option<time::OffsetDateTime>,
    /// Started before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    to: Option<time::OffsetDateTime>,
    #[arg(long)]
    ssh_user: Vec<String>,
    #[arg(long)]
    src_node_user: Vec<String>,
    #[arg(long)]
    src_node: Vec<String>,
    #[arg(long = "tag")]
    src_node_tags: Vec<String>,
}

impl FilterArgs {
    fn query(self) -> castvault::retention::HoldQuery {
        castvault::retention::HoldQuery {
            from: self.from,
            to: self.to,
            ssh_user: self.ssh_user,
            src_node_user: self.src_node_user,
            src_node: self.src_node,
            src_node_tags: self.src_node_tags,
        }
    }
}

#[derive(Subcommand)]
enum RetentionCommand {
    /// Delete the recordings whose retention has passed and that no hold holds; prints each
    /// (JSON lines). Every deletion is audited.
    Run {
        #[command(flatten)]
        store: StoreArgs,
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Evaluate at this time (RFC 3339) instead of now, to plan ahead.
        #[arg(long, value_parser = parse_time)]
        as_of: Option<time::OffsetDateTime>,
    },
}

#[derive(Subcommand)]
enum HoldCommand {
    /// Place a legal hold on recordings, by id and/or by query.
    Add {
        /// Hold id: 1 to 64 of a-z, 0-9, '-' and '_'.
        hold_id: String,
        #[arg(long)]
        reason: String,
        /// A recording to hold (repeatable).
        #[arg(long = "recording")]
        recordings: Vec<String>,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Release a hold.
    Release {
        hold_id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List holds (JSON lines).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

fn parse_day(text: &str) -> Result<time::Date, String> {
    time::Date::parse(
        text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .map_err(|_| format!("{text:?} is not a YYYY-MM-DD day"))
}

fn parse_time(text: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new signing key current (earlier keys stay valid for verification). Takes effect
    /// when the node next starts.
    Rotate {
        #[arg(long, default_value = "./castvault-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a new random token: prints it once, with the SHA-256 that goes in the config.
    New {
        /// Name shown in the audit log.
        #[arg(long, default_value = "automation")]
        name: String,
        /// A token for sending recordings (`[[admission.tokens]]`), not for the web UI.
        #[arg(long)]
        ingest: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    store: Option<String>,
    #[arg(long)]
    ingest_listen: Option<SocketAddr>,
    #[arg(long)]
    web_listen: Option<SocketAddr>,
    #[arg(long, value_enum)]
    ack: Option<AckLevel>,
}

#[derive(Args)]
struct GatewayArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `gateway.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
}

#[derive(Args)]
struct StoreArgs {
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, conflicts_with = "store")]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    store: Option<String>,
}

#[derive(Subcommand)]
enum RecordingsCommand {
    /// List recordings from the store's catalog.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// asciicast v2, byte for byte as received.
    Cast,
    /// What the screen showed, as plain text.
    Transcript,
    /// A JSON summary: who, when, where, how long, how big.
    Summary,
    /// A compliance bundle (tar): the .cast, transcript, summary, manifest, seal, checkpoints,
    /// public keys, chain of custody, SHA256SUMS and a README on verifying it.
    Bundle,
}

#[derive(Args)]
struct ExportArgs {
    id: String,
    #[command(flatten)]
    store: StoreArgs,
    #[arg(long, value_enum, default_value = "cast")]
    format: ExportFormat,
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Report every problem in a config file; exit 1 if there is any.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    castvault_storage::store::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("castvault: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Only a serving node uploads; it gets the background runtime (see `castvault::background`).
    let background = match cli.command {
        Command::Serve(_) => match castvault::background::runtime() {
            Ok(rt) => Some(rt),
            Err(e) => {
                eprintln!("castvault: cannot start the background runtime: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let handle = background.as_ref().map(|rt| rt.handle().clone());
    let code = match runtime.block_on(run(cli.command, handle)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("castvault: {e:#}");
            ExitCode::FAILURE
        }
    };
    if let Some(rt) = background {
        // The drain already waited for uploads; what is left resumes from the spool.
        rt.shutdown_timeout(BACKGROUND_SHUTDOWN);
    }
    code
}

async fn run(
    command: Command,
    background: Option<tokio::runtime::Handle>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => {
            let background = background.context("no background runtime")?;
            serve(args, &background).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Gateway(args) => gateway(args).await.map(|()| ExitCode::SUCCESS),
        Command::Recordings {
            command: RecordingsCommand::List { store, json },
        } => {
            let store = cli::open_store(store.config.as_deref(), store.data_dir, store.store)?;
            cli::list(store, json).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Export(args) => {
            let cfg = cli::load_config(
                args.store.config.as_deref(),
                args.store.data_dir,
                args.store.store,
            )?;
            match args.format {
                ExportFormat::Cast => {
                    cli::export_cast(&cfg, &args.id, args.output.as_deref()).await
                }
                ExportFormat::Bundle => {
                    cli::export_bundle(&cfg, &args.id, args.output.as_deref()).await
                }
                format => {
                    let what = match format {
                        ExportFormat::Transcript => cli::Derived::Transcript,
                        _ => cli::Derived::Summary,
                    };
                    cli::export_derived(&cfg, &args.id, what, args.output.as_deref()).await
                }
            }
            .map(|()| ExitCode::SUCCESS)
        }
        Command::Verify(args) if args.audit => {
            let stores = cli::open_store(
                args.store.config.as_deref(),
                args.store.data_dir,
                args.store.store,
            )?;
            let today = time::OffsetDateTime::now_utc().date();
            cli::verify_audit(
                &stores,
                args.from.unwrap_or(today),
                args.to.unwrap_or(today),
            )
            .await
        }
        Command::Verify(args) => match (args.bundle, args.id) {
            (Some(bundle), _) => Ok(cli::verify_bundle(&bundle)),
            (None, Some(id)) => {
                let stores = cli::open_store(
                    args.store.config.as_deref(),
                    args.store.data_dir,
                    args.store.store,
                )?;
                cli::verify(&stores, &id).await
            }
            (None, None) => anyhow::bail!("name a recording id or --bundle FILE"),
        },
        Command::ExportQuery {
            filter,
            store,
            output,
        } => {
            let cfg = cli::load_config(store.config.as_deref(), store.data_dir, store.store)?;
            cli::export_query(&cfg, &filter.query(), &output)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Retention {
            command:
                RetentionCommand::Run {
                    store,
                    dry_run,
                    as_of,
                },
        } => {
            let cfg = cli::load_config(store.config.as_deref(), store.data_dir, store.store)?;
            cli::retention_run(&cfg, dry_run, as_of)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Hold { command } => {
            let store = match &command {
                HoldCommand::Add { store, .. }
                | HoldCommand::Release { store, .. }
                | HoldCommand::List { store } => store,
            };
            let cfg = cli::load_config(
                store.config.as_deref(),
                store.data_dir.clone(),
                store.store.clone(),
            )?;
            let stores = cfg.open_stores().map_err(anyhow::Error::msg)?;
            match command {
                HoldCommand::Add {
                    hold_id,
                    reason,
                    recordings,
                    filter,
                    store: _,
                } => {
                    let actor = cli::actor(&cfg, &stores).await?;
                    let query = filter.query();
                    let has_query = query != castvault::retention::HoldQuery::default();
                    anyhow::ensure!(
                        has_query || !recordings.is_empty(),
                        "a hold needs --recording IDs or a query (--from, --to, --ssh-user, ...)"
                    );
                    let hold = castvault::retention::Hold {
                        hold_id,
                        reason,
                        created_by: actor.name.clone(),
                        created_at: time::OffsetDateTime::now_utc(),
                        recording_ids: recordings,
                        query: has_query.then_some(query),
                    };
                    castvault::retention::add_hold(&stores, &hold, &actor).await?;
                    println!("hold {} placed", hold.hold_id);
                }
                HoldCommand::Release { hold_id, store: _ } => {
                    let actor = cli::actor(&cfg, &stores).await?;
                    castvault::retention::release_hold(&stores, &hold_id, &actor).await?;
                    println!("hold {hold_id} released");
                }
                HoldCommand::List { store: _ } => {
                    for hold in castvault::retention::holds(&stores).await? {
                        println!("{}", serde_json::to_string(&hold)?);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Key {
            command: KeyCommand::Rotate { data_dir },
        } => {
            let key = castvault_storage::signing::NodeKey::rotate(&data_dir.join("keys"))?;
            println!(
                "new signing key {} is current; restart the node to use it",
                key.key_id()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Import(args) => {
            let cfg = cli::load_config(
                args.store.config.as_deref(),
                args.store.data_dir,
                args.store.store,
            )?;
            let jobs = args.jobs.unwrap_or_else(castvault::import::default_jobs);
            if jobs == 0 || jobs > castvault::import::MAX_JOBS {
                anyhow::bail!(
                    "--jobs must be between 1 and {}",
                    castvault::import::MAX_JOBS
                );
            }
            let options = castvault::import::Options {
                source: args.source,
                source_options: args.source_options.into_iter().collect(),
                min_age: args.min_age,
                jobs,
                progress: match args.progress {
                    Toggle::Auto => castvault::import::stderr_is_terminal(),
                    Toggle::Always => true,
                    Toggle::Never => false,
                },
                json: args.json,
            };
            let totals = castvault::import::run(&cfg, options).await?;
            Ok(if totals.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Play(args) => {
            let cfg = cli::load_config(
                args.store.config.as_deref(),
                args.store.data_dir,
                args.store.store,
            )?;
            let options = castvault::play::Options {
                speed: args.speed,
                idle_time_limit: args.idle_time_limit,
                from_chunk: args.from_chunk,
            };
            castvault::play::run(&cfg, &args.id, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::New { name, ingest },
        } => {
            let (token, digest) = castvault::auth::new_token();
            println!("token: {token}");
            println!("(shown once; keep it secret)\n");
            if ingest {
                println!("[[admission.tokens]]\nname = {name:?}\nsha256 = \"{digest}\"");
            } else {
                println!(
                    "[[access.tokens]]\nname = {name:?}\nsha256 = \"{digest}\"\nrole = \"viewer\"   # viewer, auditor or admin"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let problems = cli::check(config.as_deref());
            for problem in &problems {
                eprintln!("castvault: config: {problem}");
            }
            if problems.is_empty() {
                println!("config ok");
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

async fn serve(args: ServeArgs, background: &tokio::runtime::Handle) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(store) = args.store {
        config.store = Some(store);
    }
    if let Some(addr) = args.ingest_listen {
        config.ingest_listen = addr;
    }
    if let Some(addr) = args.web_listen {
        config.web_listen = addr;
    }
    if let Some(ack) = args.ack {
        config.ack = Some(ack);
    }
    raise_fd_limit();
    let ingest = tokio::net::TcpListener::bind(config.ingest_listen)
        .await
        .with_context(|| format!("binding ingest listener {}", config.ingest_listen))?;
    let web = tokio::net::TcpListener::bind(config.web_listen)
        .await
        .with_context(|| format!("binding web listener {}", config.web_listen))?;
    // One machine-readable line on stdout, so scripts and tests can find ports chosen by the OS.
    println!(
        "{}",
        serde_json::json!({ "ingest": ingest.local_addr()?.to_string(), "web": web.local_addr()?.to_string() })
    );
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        on_signal.cancel();
    });
    app::run(config, background, Listeners { ingest, web }, shutdown).await
}

async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let mut gateway = config
        .gateway
        .clone()
        .context("the config has no [gateway] section")?;
    if let Some(addr) = args.listen {
        gateway.listen = addr;
    }
    let problems = gateway.validate();
    anyhow::ensure!(
        problems.is_empty(),
        "invalid config: {}",
        problems.join("; ")
    );
    raise_fd_limit();
    let listener = tokio::net::TcpListener::bind(gateway.listen)
        .await
        .with_context(|| format!("binding gateway listener {}", gateway.listen))?;
    println!(
        "{}",
        serde_json::json!({ "gateway": listener.local_addr()?.to_string() })
    );
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        on_signal.cancel();
    });
    castvault::gateway::run(
        gateway,
        &config.data_dir,
        &config.node_id,
        listener,
        shutdown,
    )
    .await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// How long the background runtime gets to stop after the node has drained.
const BACKGROUND_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(2);

/// File descriptors wanted: each open recording holds a spool file and a socket, and a node is
/// sized for 10,000 recordings plus store connections and journal segments.
const WANTED_FILE_DESCRIPTORS: u64 = 65_536;

/// Lifts the descriptor limit toward [`WANTED_FILE_DESCRIPTORS`]: the soft limit to the hard one,
/// and the hard one too where the process may (root, or `LimitNOFILE=` in the unit).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= WANTED_FILE_DESCRIPTORS {
        return;
    }
    let wanted = WANTED_FILE_DESCRIPTORS.max(soft);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted.max(hard)).is_err() {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
