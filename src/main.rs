//! The staybound binary: parses the command line, sets up logging, and hands over to the library.
//! Exit codes: 0 ok, 64 bad usage, 78 bad config, 1 runtime failure.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use staybound::cli::{Cli, Command, DEFAULT_CONFIG, LogFormat, RunArgs, StatusArgs};
use staybound::config::{Config, DEFAULT_ADMIN_LISTEN};
use staybound::metrics::Telemetry;
use staybound::server::Instance;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

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
            Err(_) => DEFAULT_ADMIN_LISTEN,
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

fn check(args: RunArgs) -> ExitCode {
    match load(&args) {
        Ok(config) => {
            let notes = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(staybound::check::neighbor_notes(&config)))
                .unwrap_or_default();
            print!("{}", staybound::check::report_with(&config, &notes));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

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

fn run(args: RunArgs) -> ExitCode {
    let config = match load(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match runtime_with(config.workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("staybound: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let (mut term, mut int, mut hup) =
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup())) {
                (Ok(t), Ok(i), Ok(h)) => (t, i, h),
                _ => {
                    error!("cannot install signal handlers");
                    return ExitCode::FAILURE;
                }
            };
        let telemetry = Telemetry::new();
        let path = config.path.clone();
        let mut instance = match Instance::start(config, telemetry.clone()).await {
            Ok(i) => i,
            Err(e) => {
                // why: one line, in the log format the operator chose; stderr is where the log goes.
                error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "staybound running");
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
            }
        }
    })
}
