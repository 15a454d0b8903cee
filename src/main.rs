//! The `seg` command: parses arguments and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use seg::audit::{Settings, Sink};
use seg::config::{Config, WhenFull, EXIT_CONFIG};
use seg::demo::{Demo, DemoOptions};
use seg::App;

#[derive(Parser)]
#[command(
    name = "seg",
    version,
    about = "Secure Email Gateway for Exchange ActiveSync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve devices with the given configuration.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Runtime worker threads (default: one per core). With 1, everything runs on one
        /// thread (a current-thread runtime).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Validate a configuration, list every problem, exit 64 if there is one.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate and map one device certificate exactly as the listener would.
    Map {
        #[arg(long)]
        config: PathBuf,
        /// The device certificate (PEM; the first certificate is the leaf).
        #[arg(long)]
        cert: PathBuf,
        /// Intermediate certificates the device would send (PEM).
        #[arg(long)]
        chain: Option<PathBuf>,
        /// Explain the decision for a person instead of printing JSON.
        #[arg(long)]
        explain: bool,
    },
    /// Block a device, an account or a certificate on every replica of the fleet ([fleet]).
    Block {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        target: BlockTarget,
        /// Why, for the audit records and `seg blocks`.
        #[arg(long, default_value = "blocked by an operator")]
        reason: String,
    },
    /// Lift a block written by `seg block`.
    Unblock {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        target: BlockTarget,
    },
    /// List the fleet's blocks.
    Blocks {
        #[arg(long)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// What a running seg knows about an account's devices (or one device, or the last
    /// refusals), in the shape of Get-MobileDeviceStatistics; asks the admin listener.
    Devices(DevicesArgs),
    /// Run a self-contained demo: throwaway CA, demo directory, echo upstream, seg.
    Demo {
        /// Where to write the demo's certificates and configuration (default: a new temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
    },
}

/// `seg devices`.
#[derive(clap::Args)]
struct DevicesArgs {
    #[arg(long)]
    config: PathBuf,
    /// The account (sAMAccountName).
    account: Option<String>,
    /// One DeviceId instead of an account.
    #[arg(long)]
    device: Option<String>,
    /// The devices refused last.
    #[arg(long)]
    refused: bool,
    /// The running listener's decision for this certificate (PEM), made now, as
    /// `seg map --explain` gives it.
    #[arg(long, value_name = "PEM")]
    certificate: Option<PathBuf>,
    /// Intermediate CA certificates (PEM) sent with --certificate.
    #[arg(long, value_name = "PEM", requires = "certificate")]
    chain: Option<PathBuf>,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The admin listener(s) to ask (default: `admin.address` of the configuration);
    /// repeat it to ask every replica of a fleet.
    #[arg(long)]
    admin: Vec<SocketAddr>,
}

/// What `seg block` and `seg unblock` name: exactly one of them.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct BlockTarget {
    /// An ActiveSync DeviceId (compared without case).
    #[arg(long)]
    device: Option<String>,
    /// An account's sAMAccountName (compared without case).
    #[arg(long)]
    account: Option<String>,
    /// A device certificate file (PEM or DER): that certificate only.
    #[arg(long)]
    certificate: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` and `demo` log to stdout with the audit records; the one-shot commands keep
    // stdout for their answer (JSON from `seg map`) and log to stderr.
    init_logging(matches!(
        cli.command,
        Command::Run { .. } | Command::Demo { .. }
    ));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = match &cli.command {
        // One thread: everything runs where the runtime is driven, with no hand-over
        // between threads and no parking of a second one. In the fleet benchmark's one-core
        // setup, interleaved runs gave about 5 % less CPU per keep-alive request than one
        // worker of the multi-threaded runtime (23.1 against 24.2 µs, four runs each).
        Command::Run {
            threads: Some(1), ..
        } => tokio::runtime::Builder::new_current_thread(),
        Command::Run {
            threads: Some(n), ..
        } => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads((*n).max(1));
            builder
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seg: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Run { config, .. } => run(config).await,
            Command::CheckConfig { config } => check_config(config),
            Command::Map {
                config,
                cert,
                chain,
                explain,
            } => map(config, cert, chain, explain).await,
            Command::Demo { dir, listen, admin } => demo(dir, listen, admin).await,
            Command::Block {
                config,
                target,
                reason,
            } => block(config, target, Some(reason)).await,
            Command::Unblock { config, target } => block(config, target, None).await,
            Command::Blocks { config, json } => list_blocks(config, json).await,
            Command::Devices(args) => devices(args).await,
        }
    });
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn init_logging(to_stdout: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SEG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false);
    if to_stdout {
        builder.init();
    } else {
        builder.with_writer(std::io::stderr).init();
    }
}

fn load(path: &std::path::Path) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        eprint!("{e}");
        EXIT_CONFIG
    })
}

fn build(config: Config) -> Result<App, i32> {
    App::build(config).map_err(|e| {
        eprintln!("seg: configuration cannot be used: {e}");
        EXIT_CONFIG
    })
}

async fn run(path: PathBuf) -> i32 {
    let config = match load(&path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // The audit log's stdout lines follow `SEG_LOG`, as they did when they were log events.
    let stdout = tracing::enabled!(target: "seg::audit", tracing::Level::INFO);
    if let Err(e) = seg::audit::install(Settings::from_config(&config.audit, stdout)) {
        eprintln!("seg: {e}");
        return EXIT_CONFIG;
    }
    let app = match build(config) {
        Ok(app) => app,
        Err(code) => return code,
    };
    if let Err(e) = app.self_test().await {
        eprintln!("seg: {e}");
        return EXIT_CONFIG;
    }
    for warning in app.warnings() {
        tracing::warn!(target: "seg::config", "{warning}");
    }
    let running = match app.start().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("seg: cannot listen: {e}");
            return 1;
        }
    };
    serve_until_stopped(&running, &path).await;
    let window = running.drain_window();
    running.drain(window).await;
    tracing::info!(target: "seg::listener", "stopped");
    flush_audit();
    0
}

/// Writes every queued audit line before the process ends.
fn flush_audit() {
    if let Some(log) = seg::audit::global() {
        log.flush();
    }
}

/// Reloads on SIGHUP and, when enabled, when a watched file changes; returns on Ctrl-C or
/// SIGTERM. A refused reload is logged and counted; the old configuration keeps serving.
async fn serve_until_stopped(running: &seg::Running, path: &std::path::Path) {
    let stop = wait_for_stop();
    tokio::pin!(stop);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut signature = seg::files_signature(&running.watched_files(path));
    loop {
        let (watch, interval) = running.watch_settings();
        let hup = async {
            #[cfg(unix)]
            if let Some(h) = hangup.as_mut() {
                h.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = hup => {
                if let Some(log) = seg::audit::global() {
                    log.reopen();
                }
                tracing::info!(target: "seg::config", "SIGHUP: reopening the audit file, reloading");
                let _ = running.reload_file(path);
            }
            _ = tokio::time::sleep(interval), if watch => {
                let now = seg::files_signature(&running.watched_files(path));
                if now != signature {
                    tracing::info!(target: "seg::config", "a watched file changed: reloading");
                    let _ = running.reload_file(path);
                }
            }
        }
        signature = seg::files_signature(&running.watched_files(path));
    }
}

fn check_config(path: PathBuf) -> i32 {
    match load(&path).and_then(|config| {
        let summary = config.summary();
        build(config).map(|app| (summary, app.warnings()))
    }) {
        Ok((summary, warnings)) => {
            print!("{}: configuration is valid\n{summary}", path.display());
            for warning in warnings {
                println!("warning: {warning}");
            }
            0
        }
        Err(code) => code,
    }
}

async fn map(config_path: PathBuf, cert: PathBuf, chain: Option<PathBuf>, explain: bool) -> i32 {
    let config = match load(&config_path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let app = match build(config) {
        Ok(app) => app,
        Err(code) => return code,
    };
    match app.map(&cert, chain.as_deref()).await {
        Ok(report) => {
            if explain {
                print!("{}", report.explain());
            } else {
                println!("{:#}", report.to_json());
            }
            report.outcome.exit_code()
        }
        Err(e) if e.key.starts_with("--") => {
            eprintln!("seg map: {e}");
            66
        }
        Err(e) => {
            eprintln!("seg map: configuration cannot be used: {e}");
            EXIT_CONFIG
        }
    }
}

/// `seg devices`: the admin listener's device API, as a table or JSON.
async fn devices(args: DevicesArgs) -> i32 {
    let config = match load(&args.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let encode = seg::activesync::percent_encode;
    let target = match (&args.account, &args.device, args.refused, &args.certificate) {
        (Some(account), None, false, None) => {
            format!("/api/devices?account={}", encode(account))
        }
        (None, Some(device), false, None) => format!("/api/devices?device={}", encode(device)),
        (None, None, true, None) => "/api/refusals".to_string(),
        (None, None, false, Some(_)) => "/api/decision".to_string(),
        _ => {
            eprintln!(
                "seg devices: give an account, or --device ID, or --refused, or --certificate FILE"
            );
            return EXIT_CONFIG;
        }
    };
    let admins = if !args.admin.is_empty() {
        args.admin
    } else if let Some(replicas) = fleet_replicas(&config).await {
        if config.admin.api_token_file.is_some() {
            replicas
        } else {
            // Without a token a replica answers only its own host: ask those on loopback.
            let (local, elsewhere): (Vec<_>, Vec<_>) =
                replicas.into_iter().partition(|a| a.ip().is_loopback());
            if !elsewhere.is_empty() {
                eprintln!(
                    "seg devices: without admin.api_token_file the replicas at {} answer only their own host; not asked",
                    elsewhere.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                );
            }
            if local.is_empty() {
                vec![local_admin(&config)]
            } else {
                local
            }
        }
    } else {
        vec![local_admin(&config)]
    };
    let token = config
        .admin
        .api_token_file
        .as_deref()
        .and_then(seg::admin::read_token);
    if let Some(certificate) = &args.certificate {
        let mut pem = match std::fs::read(certificate) {
            Ok(pem) => pem,
            Err(e) => {
                eprintln!("seg devices: --certificate {}: {e}", certificate.display());
                return EXIT_CONFIG;
            }
        };
        if let Some(chain) = &args.chain {
            match std::fs::read(chain) {
                Ok(more) => {
                    pem.push(b'\n');
                    pem.extend(more);
                }
                Err(e) => {
                    eprintln!("seg devices: --chain {}: {e}", chain.display());
                    return EXIT_CONFIG;
                }
            }
        }
        return decisions(&admins, &pem, token.as_deref(), args.json).await;
    }
    // Every replica that answers; one that does not is named, and only none answering fails.
    let mut devices: Vec<serde_json::Value> = Vec::new();
    let mut answered = 0;
    for address in &admins {
        let body = match admin_call(*address, &target, token.as_deref(), None).await {
            Ok(body) => body,
            Err(e) => {
                eprintln!("seg devices: {address}{target}: {e}");
                continue;
            }
        };
        match serde_json::from_str::<Vec<serde_json::Value>>(&body) {
            Ok(list) => {
                devices.extend(list);
                answered += 1;
            }
            Err(e) => {
                eprintln!("seg devices: {address}: the answer is not the device list: {e}");
            }
        }
    }
    if answered == 0 {
        return 69;
    }
    // Merged as each replica ordered its own: the last refused, or the last seen, first.
    let order = if args.refused {
        "last_refusal_at"
    } else {
        "last_seen"
    };
    devices.sort_by_key(|d| std::cmp::Reverse(d[order].as_i64().unwrap_or(0)));
    if args.refused {
        devices.truncate(50);
    }
    if args.json {
        println!("{}", serde_json::Value::Array(devices));
    } else {
        print_devices(&devices);
    }
    partial(answered, admins.len())
}

/// The exit status when `answered` of `asked` admin listeners answered: 0 for all, 75
/// (EX_TEMPFAIL) when some did not (each was named on stderr).
fn partial(answered: usize, asked: usize) -> i32 {
    if answered == asked {
        0
    } else {
        75
    }
}

/// The configuration's own admin listener, on loopback when it listens on every address.
fn local_admin(config: &Config) -> SocketAddr {
    let mut address = config.admin.address;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    address
}

/// With `[fleet]`, the admin listeners of the replicas that announced themselves in the
/// store; `None` without a fleet or when the store does not answer (then the configuration's
/// own `admin.address` is asked, said on stderr).
async fn fleet_replicas(config: &Config) -> Option<Vec<SocketAddr>> {
    let settings = config.fleet.as_ref()?;
    let fleet = match seg::fleet::Fleet::connect(settings, seg::metrics::FleetMetrics::new()) {
        Ok(fleet) => fleet,
        Err(e) => {
            eprintln!("seg devices: {e}; asking admin.address only");
            return None;
        }
    };
    match fleet.replicas().await {
        Some(replicas) if !replicas.is_empty() => {
            // Replicas on loopback announce the same address from every host: ask it once,
            // and say that the others cannot be told apart from here.
            let mut addresses: Vec<SocketAddr> = Vec::new();
            for (name, address) in replicas {
                if addresses.contains(&address) {
                    eprintln!(
                        "seg devices: replica {name} announces {address} like another; asked once"
                    );
                } else {
                    addresses.push(address);
                }
            }
            Some(addresses)
        }
        Some(_) => {
            eprintln!("seg devices: no replica has announced itself in the fleet store; asking admin.address only");
            None
        }
        None => {
            eprintln!("seg devices: the fleet store did not answer; asking admin.address only");
            None
        }
    }
}

/// The device list as a table in the shape of `Get-MobileDeviceStatistics`.
fn print_devices(devices: &[serde_json::Value]) {
    // What a device or a certificate chose is printed without its control characters, so it
    // cannot move the cursor or recolour the helpdesk's terminal.
    let text = |d: &serde_json::Value, k: &str| {
        d[k].as_str()
            .unwrap_or("")
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
    };
    let time = |d: &serde_json::Value, k: &str| match d[k].as_i64() {
        Some(t) if t > 0 => seg::clock::utc(t),
        _ => "-".into(),
    };
    let now = seg::clock::unix_now();
    let decision = |d: &serde_json::Value| match (text(d, "mapping"), d["decided_at"].as_i64()) {
        (mapping, Some(at)) if !mapping.is_empty() && at > 0 => {
            format!("{mapping}/{} {}s ago", text(d, "strength"), now - at)
        }
        _ => "-".into(),
    };
    let replicas = devices.iter().any(|d| !text(d, "replica").is_empty());
    println!(
        "{:<10} {:<18} {:<12} {:<19} {:<19} {:<6} {:<22} {:<19} {:<19} {:<28} {}USER AGENT",
        "ACCOUNT",
        "DEVICE ID",
        "TYPE",
        "LAST SUCCESS",
        "LAST SEEN",
        "STATUS",
        "LAST REFUSAL",
        "PING HELD SINCE",
        "CERT NOT AFTER",
        "DECISION",
        if replicas { "REPLICA    " } else { "" },
    );
    for d in devices {
        let account = match text(d, "account") {
            a if a.is_empty() => format!("({})", text(d, "cert_subject")),
            a => a,
        };
        println!(
            "{:<10} {:<18} {:<12} {:<19} {:<19} {:<6} {:<22} {:<19} {:<19} {:<28} {}{}",
            account,
            text(d, "device_id"),
            text(d, "device_type"),
            time(d, "last_success"),
            time(d, "last_seen"),
            d["last_status"].as_u64().unwrap_or(0),
            text(d, "last_refusal"),
            time(d, "ping_held_since"),
            time(d, "cert_not_after"),
            decision(d),
            if replicas {
                format!("{:<10} ", text(d, "replica"))
            } else {
                String::new()
            },
            text(d, "user_agent"),
        );
    }
}

/// `seg devices --certificate`: each listener's own decision for the certificate.
async fn decisions(admins: &[SocketAddr], pem: &[u8], token: Option<&str>, json: bool) -> i32 {
    let mut code = 0;
    let mut answered = 0;
    for address in admins {
        let body = match admin_call(*address, "/api/decision", token, Some(pem)).await {
            Ok(body) => body,
            Err(e) => {
                eprintln!("seg devices: {address}/api/decision: {e}");
                continue;
            }
        };
        let report: serde_json::Value = match serde_json::from_str(&body) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("seg devices: {address}: the answer is not a decision: {e}");
                continue;
            }
        };
        answered += 1;
        if json {
            println!("{report}");
        } else {
            if admins.len() > 1 {
                println!("== {address}");
            }
            print!("{}", report["explanation"].as_str().unwrap_or(""));
        }
        code = code.max(match report["decision"].as_str() {
            Some("admit") => 0,
            Some("deny") => 1,
            _ => 69,
        });
    }
    match answered {
        0 => 69,
        n if n < admins.len() => code.max(75),
        _ => code,
    }
}

/// One request to the admin listener: a GET, or a POST of `pem`; the body of a 200, else
/// an error naming the status.
async fn admin_call(
    address: SocketAddr,
    target: &str,
    token: Option<&str>,
    pem: Option<&[u8]>,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(address),
    )
    .await
    .map_err(|_| "no answer within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let (method, body_headers) = match pem {
        Some(pem) => (
            "POST",
            format!(
                "Content-Type: application/x-pem-file\r\nContent-Length: {}\r\n",
                pem.len()
            ),
        ),
        None => ("GET", String::new()),
    };
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {address}\r\n{authorization}{body_headers}Connection: close\r\n\r\n"
    )
    .into_bytes();
    request.extend_from_slice(pem.unwrap_or_default());
    stream
        .write_all(&request)
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    // A decision may wait for a directory search.
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
        .await
        .map_err(|_| "no answer within 30 s".to_string())?
        .map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status_line = head.lines().next().unwrap_or("");
    if !status_line.starts_with("HTTP/1.1 200") {
        return Err(format!("{status_line}: {}", body.trim()));
    }
    // hyper answers a known length with Content-Length: the body is what follows the head.
    Ok(body.to_string())
}

/// The fleet store of a configuration, for the block commands.
fn fleet_of(config_path: &std::path::Path) -> Result<seg::fleet::Fleet, i32> {
    let config = load(config_path)?;
    let Some(fleet) = &config.fleet else {
        eprintln!(
            "seg: {} has no [fleet] section: blocks are written to the fleet store",
            config_path.display()
        );
        return Err(EXIT_CONFIG);
    };
    seg::fleet::Fleet::connect(fleet, seg::metrics::FleetMetrics::new()).map_err(|e| {
        eprintln!("seg: {e}");
        EXIT_CONFIG
    })
}

/// `seg block` (with a reason) and `seg unblock` (without).
async fn block(config_path: PathBuf, target: BlockTarget, reason: Option<String>) -> i32 {
    use seg::fleet::blocks::{Block, BlockKind};
    let fleet = match fleet_of(&config_path) {
        Ok(fleet) => fleet,
        Err(code) => return code,
    };
    let (kind, value) = match target {
        BlockTarget {
            device: Some(device),
            ..
        } => (BlockKind::Device, device),
        BlockTarget {
            account: Some(account),
            ..
        } => (BlockKind::Account, account),
        BlockTarget {
            certificate: Some(path),
            ..
        } => match certificate_digest(&path) {
            Ok(hex) => (BlockKind::Certificate, hex),
            Err(e) => {
                eprintln!("seg: --certificate {}: {e}", path.display());
                return 66;
            }
        },
        _ => unreachable!("clap requires one target"),
    };
    if let Err(e) = kind.check(&value) {
        eprintln!("seg: {e}");
        return EXIT_CONFIG;
    }
    let block = reason.map(|reason| Block {
        reason,
        at: seg::fleet::unix_now(),
        by: format!(
            "{}@{}",
            std::env::var("SUDO_USER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "unknown".into()),
            fleet.replica()
        ),
    });
    match fleet.write_block(kind, &value, block.as_ref()).await {
        Ok(()) => {
            let verb = if block.is_some() {
                "blocked"
            } else {
                "unblocked"
            };
            println!(
                "{verb} {}: every replica applies it within fleet.block_poll_interval",
                kind.field(&value)
            );
            0
        }
        Err(e) => {
            eprintln!("seg: {e}");
            69
        }
    }
}

/// The SHA-256 of a certificate file's first certificate (PEM) or of the file (DER), in hex.
fn certificate_digest(path: &std::path::Path) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject as _;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let der = match rustls::pki_types::CertificateDer::from_pem_slice(&bytes) {
        Ok(der) => der.to_vec(),
        Err(_) if bytes.first() == Some(&0x30) => bytes,
        Err(e) => return Err(format!("neither PEM nor DER: {e}")),
    };
    Ok(seg::identity::CertFingerprint::of(&der).hex())
}

/// `seg blocks`: the list as the store holds it.
async fn list_blocks(config_path: PathBuf, json: bool) -> i32 {
    let fleet = match fleet_of(&config_path) {
        Ok(fleet) => fleet,
        Err(code) => return code,
    };
    match fleet.read_blocks().await {
        Ok(list) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&list.blocks).unwrap_or_default()
            );
            0
        }
        Ok(list) => {
            println!(
                "{:<44} {:<21} {:<24} REASON",
                "BLOCKED", "SINCE (UTC)", "BY"
            );
            for (field, block) in &list.blocks {
                println!(
                    "{field:<44} {:<21} {:<24} {}",
                    seg::clock::utc(block.at),
                    block.by,
                    block.reason
                );
            }
            0
        }
        Err(e) => {
            eprintln!("seg: {e}");
            69
        }
    }
}

async fn demo(dir: Option<PathBuf>, listen: SocketAddr, admin: SocketAddr) -> i32 {
    let _ = seg::audit::install(Settings {
        sinks: vec![Sink::Stdout],
        when_full: WhenFull::Drop,
        queue_bytes: 4 << 20,
        flush_interval: Duration::from_millis(10),
    });
    let demo = match Demo::start(DemoOptions { dir, listen, admin }).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("seg demo: {e}");
            return 1;
        }
    };
    println!("{}", demo.instructions());
    wait_for_stop().await;
    println!("stopping the demo");
    demo.running.stop().await;
    flush_audit();
    0
}

/// Ctrl-C or SIGTERM.
async fn wait_for_stop() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
