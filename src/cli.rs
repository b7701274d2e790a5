//! The command line: `run` (the default), `check`, `status`, `demo`, and the global logging flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// staybound keeps legacy clients working while the highly-available service behind them fails over.
#[derive(Debug, Parser)]
#[command(name = "staybound", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `run`'s arguments, when no subcommand is given.
    #[command(flatten)]
    pub run: RunArgs,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `staybound=debug,warn`); RUST_LOG also works.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the services in the config file (the default command); exits on SIGTERM after draining.
    Run(RunArgs),
    /// Validate the config file and print each service's effective settings and worst-case detection times.
    Check(RunArgs),
    /// Print the state of a running staybound, read from its admin endpoint.
    Status(StatusArgs),
    /// A self-contained demonstration on loopback: a logical host that fails over, a legacy client through
    /// staybound and one without, and what each saw.
    Demo(DemoArgs),
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The admin endpoint of the running staybound.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Print the raw JSON of /status instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seconds the clients run before the first move.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}
