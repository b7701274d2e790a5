//! The staybound binary: parses the command line, sets up logging, and hands over to the library.
//! Exit codes: 0 ok, 64 bad usage, 78 bad config, 1 runtime failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use staybound::cli::{Cli, Command, DEFAULT_CONFIG, LogFormat, RunArgs, SetupArgs, StatusArgs};
use staybound::config::{Config, defaults};
use staybound::metrics::Telemetry;
use staybound::server::Instance;
use staybound::upgrade;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

// why: a new connection makes three cache-line-aligned allocations (tokio's task and two I/O
// registrations); glibc serves those through its slow aligned path, mimalloc from its size classes.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EX_USAGE: u8 = 64;
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage { ExitCode::from(EX_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    if let Err(e) = init_logging(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("staybound: {e}");
        return ExitCode::from(EX_USAGE);
    }
    match cli.command {
        None => run(cli.run),
        Some(Command::Run(args)) => run(args),
        Some(Command::Check(args)) => check(args),
        Some(Command::Status(args)) => status(args),
        Some(Command::Cleanup) => match staybound::intercept::remove() {
            Ok(()) => {
                println!("nftables table inet {} removed (or there was none)", staybound::intercept::TABLE);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("staybound cleanup: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Setup(args)) => setup(args),
        Some(Command::Completions { shell }) => {
            clap_complete::generate(shell, &mut staybound::cli::command(), "staybound", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Some(Command::Man) => match clap_mangen::Man::new(staybound::cli::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("staybound man: {e}");
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "demo")]
        Some(Command::Demo(args)) => match runtime() {
            Ok(rt) => match rt.block_on(staybound::demo::run(args.warmup)) {
                Ok(report) => {
                    print!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("staybound demo: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("staybound: cannot start the runtime: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

fn load(args: &RunArgs) -> Result<Config, ExitCode> {
    let path = args.path();
    Config::load(path).map_err(|e| {
        eprintln!("staybound: {e}");
        if args.config.is_none() {
            eprintln!(
                "staybound: that is the default config file; name another with --config FILE (an example: \
                 config/staybound.example.toml in the source)"
            );
        }
        ExitCode::from(EX_CONFIG)
    })
}

/// `staybound status`: the admin address from `--admin`, else from the config file (named, or the default
/// one when it exists), else the default admin address.
fn status(args: StatusArgs) -> ExitCode {
    let admin = match (args.admin, &args.config) {
        (Some(addr), _) => addr,
        (None, Some(path)) => match Config::load(path) {
            Ok(c) => c.admin.listen,
            Err(e) => {
                eprintln!("staybound status: {e}");
                return ExitCode::from(EX_CONFIG);
            }
        },
        (None, None) => match Config::load(Path::new(DEFAULT_CONFIG)) {
            Ok(c) => c.admin.listen,
            Err(_) => defaults::ADMIN_LISTEN,
        },
    };
    if admin.port() == 0 {
        eprintln!(
            "staybound status: the config file's admin.listen has port 0 (chosen at start); name it with --admin ADDR"
        );
        return ExitCode::from(EX_USAGE);
    }
    let body = match staybound::status::fetch(admin, "/status") {
        Ok(body) => body,
        Err(e) => {
            eprintln!("staybound status: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!("{body}");
        return ExitCode::SUCCESS;
    }
    match staybound::status::table(&body) {
        Ok(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("staybound status: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `staybound setup`: installs the interception rules of the config file and exits (an init container's job).
fn setup(args: SetupArgs) -> ExitCode {
    let run = RunArgs { config: args.config, binary: None };
    let config = match load(&run) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let redirects = staybound::intercept::redirects(&config);
    if redirects.is_empty() {
        eprintln!("staybound setup: {} has no service with intercept = true", config.path.display());
        return ExitCode::from(EX_CONFIG);
    }
    let exempt = staybound::intercept::Exempt { uid: args.exempt_uid };
    match staybound::intercept::install(&redirects, exempt) {
        Ok(()) => {
            for r in &redirects {
                println!("service {}: TCP to {} is redirected to {}", r.service, r.upstream, r.to);
            }
            match exempt.uid {
                Some(uid) => {
                    println!("exempt: sockets marked {:#x} and every socket of uid {uid}", staybound::sockopt::MARK)
                }
                None => println!("exempt: sockets marked {:#x}", staybound::sockopt::MARK),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("staybound setup: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(args: RunArgs) -> ExitCode {
    match load(&args) {
        Ok(config) => {
            let notes = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(staybound::check::neighbor_notes(&config)))
                .unwrap_or_default();
            let guard = staybound::check::guard_note(&config);
            print!("{}", staybound::check::report_full(&config, &notes, guard.as_deref()));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

#[cfg(feature = "demo")]
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    runtime_with(0)
}

/// The data-path runtime: `workers` threads (0: one per core); 1 is a single-threaded runtime.
fn runtime_with(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if workers == 1 {
        return tokio::runtime::Builder::new_current_thread().enable_all().build();
    }
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 1 {
        b.worker_threads(workers);
    }
    b.enable_all().thread_name("staybound-worker").build()
}

/// The binary an upgrade starts: `--binary`, else the path this process was started with.
fn upgrade_binary(args: &RunArgs) -> Option<PathBuf> {
    if let Some(b) = &args.binary {
        return Some(b.clone());
    }
    let argv0 = std::env::args_os().next()?;
    let cwd = std::env::current_dir().ok()?;
    let path = std::env::var_os("PATH");
    staybound::upgrade::started_from(&argv0, &cwd, path.as_deref(), |p| p.is_file())
}

/// How long an upgrade waits for the new process to take the sockets and accept.
const UPGRADE_WITHIN: Duration = Duration::from_secs(30);

/// Raises the open-file limit to the hard limit and says what it allows, in the log and in
/// `staybound_session_capacity`.
fn raise_nofile(config: &Config, telemetry: &Telemetry) {
    match staybound::limits::raise_nofile() {
        Ok(n) => {
            let capacity = n.session_capacity();
            telemetry.set_session_capacity(capacity);
            info!(before = n.before, after = n.after, session_capacity = capacity, "open-file limit");
            let max: Vec<usize> = config
                .services
                .iter()
                .filter(|s| s.protocol == staybound::config::Protocol::Tcp)
                .map(|s| s.max_connections)
                .collect();
            if let Some(why) = staybound::limits::shortfall(capacity, &max) {
                warn!("{why}");
            }
        }
        Err(e) => warn!(error = %e, "could not raise the open-file limit"),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let config = match load(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // why: resolved now, against the working directory and PATH this process started with; the file it names
    // is read again at each upgrade, so a package's new binary is the one started.
    let binary = upgrade_binary(&args);
    let command_line: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // An upgrade's new process: ask the old one for its sockets before binding anything.
    let (handover, inherited) = match std::env::var_os(upgrade::ENV) {
        Some(name) => match upgrade::take_over(&name, UPGRADE_WITHIN) {
            Ok((h, sockets)) => {
                info!(sockets = sockets.len(), "upgrade: the old process handed over its listening sockets");
                (Some(h), sockets)
            }
            Err(e) => {
                error!(error = %e, "upgrade: cannot take the old process's sockets");
                eprintln!("staybound: upgrade: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => (None, Vec::new()),
    };
    let rt = match runtime_with(config.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("staybound: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let (mut term, mut int, mut hup, mut usr2) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined2()),
        ) {
            (Ok(t), Ok(i), Ok(h), Ok(u)) => (t, i, h, u),
            _ => {
                error!("cannot install signal handlers");
                return ExitCode::FAILURE;
            }
        };
        let telemetry = Telemetry::new();
        raise_nofile(&config, &telemetry);
        let path = config.path.clone();
        let mut instance = match Instance::start_with(config, telemetry.clone(), inherited).await {
            Ok(i) => i,
            Err(e) => {
                // why: one line, in the log format the operator chose; stderr is where the log goes.
                error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        match handover {
            Some(h) => {
                if let Err(e) = h.ready() {
                    // The old process is gone: its sockets are ours alone, nothing is lost.
                    warn!(error = %e, "upgrade: could not tell the old process that this one accepts");
                }
                telemetry.upgrade(true);
                upgrade::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
            }
            None => upgrade::notify("READY=1"),
        }
        info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), pid = std::process::id(), "staybound running");
        let mut upgrading: Option<tokio::task::JoinHandle<Result<u32, upgrade::UpgradeError>>> = None;
        loop {
            tokio::select! {
                _ = term.recv() => {
                    let grace = instance.config().shutdown_grace;
                    info!("SIGTERM: stopping");
                    instance.shutdown(grace).await;
                    return ExitCode::SUCCESS;
                }
                _ = int.recv() => {
                    info!("SIGINT: stopping at once");
                    instance.abort().await;
                    return ExitCode::SUCCESS;
                }
                _ = hup.recv() => {
                    info!(config = %path.display(), "SIGHUP: reloading");
                    match Config::load(&path) {
                        Ok(new) => match instance.reload(new).await {
                            Ok(()) => {
                                telemetry.reload(true);
                                info!("config reloaded");
                            }
                            Err(e) => {
                                telemetry.reload(false);
                                warn!(error = %e, "reload not applied: the running config stays");
                            }
                        },
                        Err(e) => {
                            telemetry.reload(false);
                            warn!(error = %e, "reload rejected: the running config stays");
                        }
                    }
                }
                _ = usr2.recv() => {
                    match start_upgrade(&instance, binary.as_deref(), &command_line, upgrading.is_some()) {
                        Ok(task) => upgrading = Some(task),
                        Err(e) => {
                            telemetry.upgrade(false);
                            warn!(error = %e, "upgrade not started: this process keeps running");
                        }
                    }
                }
                done = async { upgrading.as_mut().expect("guarded by the branch condition").await }, if upgrading.is_some() => {
                    upgrading = None;
                    match done {
                        Ok(Ok(pid)) => {
                            let grace = instance.config().shutdown_grace;
                            info!(new_pid = pid, grace_ms = grace.as_millis() as u64, "upgrade: the new process accepts; this one stops accepting and serves its sessions until they end");
                            instance.handed_over(grace).await;
                            info!("upgrade: the last session of the old process ended");
                            return ExitCode::SUCCESS;
                        }
                        Ok(Err(e)) => {
                            telemetry.upgrade(false);
                            warn!(error = %e, "upgrade failed: this process keeps running");
                        }
                        Err(e) => {
                            telemetry.upgrade(false);
                            warn!(error = %e, "upgrade failed: this process keeps running");
                        }
                    }
                }
            }
        }
    })
}

/// Starts the new binary and the handover of the sockets to it, on a blocking thread.
fn start_upgrade(
    instance: &Instance,
    binary: Option<&std::path::Path>,
    command_line: &[std::ffi::OsString],
    in_progress: bool,
) -> Result<tokio::task::JoinHandle<Result<u32, upgrade::UpgradeError>>, String> {
    if in_progress {
        return Err("an upgrade is already in progress".into());
    }
    let binary = binary.ok_or("the binary this process was started from is unknown: run with --binary FILE")?;
    let sockets = instance.handover_sockets().map_err(|e| format!("cannot list the listening sockets: {e}"))?;
    let successor = upgrade::spawn(binary, command_line).map_err(|e| e.to_string())?;
    info!(binary = %binary.display(), new_pid = successor.pid(), sockets = sockets.len(), "SIGUSR2: upgrade: the new process is started");
    Ok(tokio::task::spawn_blocking(move || upgrade::hand_over(successor, &sockets, UPGRADE_WITHIN)))
}
