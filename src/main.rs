//! `wsbroker`: argument parsing only; everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wsbroker::bench::BenchArgs;
use wsbroker::client::ClientOptions;
use wsbroker::config::{LoadOptions, Settings};
use wsbroker::lifecycle::ServeError;

/// A pub/sub broker over wss.
#[derive(Parser)]
#[command(name = "wsbroker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Built-in development defaults: wss on 127.0.0.1:8443 with a generated certificate.
        #[arg(long)]
        dev: bool,
    },
    /// Validate a configuration file and exit (0 valid, 1 invalid).
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long)]
        config: PathBuf,
    },
    /// Subscribe and print each message as one JSON line.
    Sub {
        #[command(flatten)]
        client: ClientOptions,
        /// Topic or pattern (repeatable).
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
    },
    /// Publish one message and wait for the ack.
    Pub {
        #[command(flatten)]
        client: ClientOptions,
        /// Topic (no wildcards).
        #[arg(long)]
        topic: String,
        /// The message: any JSON value.
        #[arg(long)]
        data: String,
    },
    /// Load generator (prints one JSON report).
    Bench(BenchArgs),
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. }) {
        // Before the runtime's threads exist: it edits the environment.
        wsbroker::activation::capture_from_env();
    }
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Serve { config, dev } => {
            if config.is_none() && !dev {
                eprintln!("error: serve needs --config FILE or --dev");
                return ExitCode::from(2);
            }
            let opts = LoadOptions {
                path: config,
                dev,
                env: None,
            };
            match rt.block_on(wsbroker::lifecycle::serve(opts)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ServeError::Config(errors)) => {
                    for line in errors.0 {
                        eprintln!("{line}");
                    }
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::CheckConfig { config } => {
            let opts = LoadOptions {
                path: Some(config.clone()),
                dev: false,
                env: None,
            };
            match Settings::load(&opts) {
                Ok(settings) => {
                    for w in settings.warnings() {
                        eprintln!("warning: {w}");
                    }
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    for line in errors.0 {
                        eprintln!("{line}");
                    }
                    ExitCode::from(1)
                }
            }
        }
        Command::Sub { mut client, topics } => {
            if let Err(e) = client.take_urls(false) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let r = rt.block_on(wsbroker::client::run_sub(&client, &topics));
            finish(r, |e| e.is_usage())
        }
        Command::Pub {
            mut client,
            topic,
            data,
        } => {
            if let Err(e) = client.take_urls(false) {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
            let r = rt.block_on(wsbroker::client::run_pub(&client, &topic, &data));
            finish(r, |e| e.is_usage())
        }
        Command::Bench(mut args) => match args
            .client
            .take_urls(true)
            .map_err(wsbroker::bench::BenchError::from)
            .map(|()| rt.block_on(wsbroker::bench::run(&args)))
            .and_then(|r| r)
        {
            Ok(report) => match serde_json::to_string(&report) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            },
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(if e.is_usage() { 2 } else { 1 })
            }
        },
    }
}

/// Exit code 2 for usage mistakes (bad URL, unreadable --ca, bad --data), 1 otherwise.
fn finish<E: std::fmt::Display>(result: Result<(), E>, is_usage: impl Fn(&E) -> bool) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if is_usage(&e) { 2 } else { 1 })
        }
    }
}
