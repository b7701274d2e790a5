//! The command line: `run` (the default), `check`, `status`, `cleanup`, `setup`, `demo`, `completions`,
//! `man`, and the global logging flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Where `run`, `check` and `status` look for the config file when `--config` is not given: the path the
/// package, the image and the systemd unit use.
pub const DEFAULT_CONFIG: &str = "/etc/staybound/staybound.toml";

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
    /// Run the services in the config file (the default command); exits on SIGTERM after draining. SIGHUP
    /// reloads the config; SIGUSR2 upgrades: starts the binary again and hands it the listening sockets.
    Run(RunArgs),
    /// Validate the config file and print each service's effective settings and worst-case detection times.
    Check(RunArgs),
    /// Print the state of a running staybound, read from its admin endpoint.
    Status(StatusArgs),
    /// Remove the interception rules (nftables table `inet staybound`) a killed staybound left; touches no
    /// other table. Needs CAP_NET_ADMIN.
    Cleanup,
    /// Install the interception rules of the config file's `intercept` services and exit, for an init
    /// container: the long-running staybound then needs no CAP_NET_ADMIN. Needs CAP_NET_ADMIN.
    Setup(SetupArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `staybound man > /usr/share/man/man1/staybound.1`.
    Man,
    /// A self-contained demonstration on loopback: a logical host that fails over, a legacy client through
    /// staybound and one without, and what each saw.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The config file [default: /etc/staybound/staybound.toml].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The binary an upgrade (SIGUSR2) starts; default: the path this process was started with (argv[0],
    /// looked up in PATH if it has no slash), read from disk again at each upgrade.
    #[arg(long, value_name = "FILE")]
    pub binary: Option<PathBuf>,
}

impl RunArgs {
    /// The config file named, or the default one.
    pub fn path(&self) -> &Path {
        self.config.as_deref().unwrap_or(Path::new(DEFAULT_CONFIG))
    }
}

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// The config file whose `intercept` services are redirected [default: /etc/staybound/staybound.toml].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The user staybound will run as: its sockets are let through (it may not be able to mark them).
    #[arg(long, value_name = "UID")]
    pub exempt_uid: Option<u32>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The running staybound's config file, to read `admin.listen` from [default: /etc/staybound/staybound.toml,
    /// or 127.0.0.1:9901 when there is none].
    #[arg(long, short = 'c', value_name = "FILE", conflicts_with = "admin")]
    pub config: Option<PathBuf>,
    /// The admin endpoint of the running staybound, instead of reading it from the config file.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Print the raw JSON of /status instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(feature = "demo")]
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

/// The command line's definition, for completions and the man page.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    /// The help text cannot name a constant, so this keeps it in step with the default it states.
    #[test]
    fn the_status_help_names_the_default_admin_address() {
        let mut cmd = super::command();
        let status = cmd.find_subcommand_mut("status").expect("a status subcommand");
        let help = status.render_long_help().to_string();
        let default = crate::config::defaults::ADMIN_LISTEN.to_string();
        assert!(help.contains(&default), "the help should name {default}: {help}");
        assert!(help.contains(super::DEFAULT_CONFIG), "{help}");
    }
}
