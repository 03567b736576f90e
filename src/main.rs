//! The `message-dispatcher` command: parses the subcommand and hands over to the daemon.

use std::process::ExitCode;
use std::time::Duration;

use message_dispatcher::config::Config;
use message_dispatcher::error::Error;
use message_dispatcher::{daemon, logging, store::Store};

const USAGE: &str = "\
Usage: message-dispatcher [COMMAND]

Delivers messages waiting in PostgreSQL to WEBHOOK_URL. Configured by environment variables
(see README.md or `check-config`).

Commands:
  serve          run the daemon (the default)
  migrate        apply pending database migrations and exit
  check-config   validate the environment, print the effective config (secrets redacted)
  healthcheck [health|live|ready]
                 GET this instance's /health (the default), /livez or /readyz;
                 exit 0 when it answers 200, else 1
  help           print this text

Exit codes: 0 clean stop, 2 bad configuration or usage, 1 any other fatal error.";

fn main() -> ExitCode {
    message_dispatcher::connect::install_crypto_provider();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log::log_enabled!(log::Level::Error) && e.exit_code() != 2 {
                log::error!(error = e.to_string().as_str(); "Fatal error");
            } else {
                eprintln!("message-dispatcher: {e}");
            }
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(args: &[String]) -> Result<(), Error> {
    let command = match args {
        [] => "serve",
        [one] => one.as_str(),
        [first, probe] if first == "healthcheck" => return healthcheck(probe),
        _ => {
            return Err(Error::Usage(format!(
                "expected one command, got {args:?}\n\n{USAGE}"
            )))
        }
    };
    match command {
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        "--version" | "-V" => {
            println!("message-dispatcher {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        "serve" => {
            let config = Config::from_env()?;
            logging::init(&config);
            daemon::serve(&config)
        }
        "migrate" => {
            let config = Config::from_env()?;
            logging::init(&config);
            let mut store = Store::new(config.postgres()?, "migrate");
            daemon::migrate(&mut store)
        }
        "check-config" => {
            let config = Config::from_env()?;
            config.require_webhook()?;
            print!("{config}");
            Ok(())
        }
        "healthcheck" => healthcheck("health"),
        other => Err(Error::Usage(format!(
            "unknown command {other:?}\n\n{USAGE}"
        ))),
    }
}

/// For container HEALTHCHECKs in an image with no shell or curl: `live` (the image's own
/// HEALTHCHECK: the process is working), `ready` (its dependencies answer) or `health`.
fn healthcheck(probe: &str) -> Result<(), Error> {
    let path = match probe {
        "health" => "/health",
        "live" | "livez" => "/livez",
        "ready" | "readyz" => "/readyz",
        other => {
            return Err(Error::Usage(format!(
                "healthcheck: unknown probe {other:?} (health, live or ready)\n\n{USAGE}"
            )))
        }
    };
    let config = Config::from_env()?;
    let url = format!("http://127.0.0.1:{}{path}", config.server_port);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    match agent.get(&url).call() {
        Ok(response) if response.status() == 200 => Ok(()),
        Ok(response) => Err(Error::Other(format!(
            "{url} answered {}",
            response.status()
        ))),
        Err(e) => Err(Error::Other(format!("{url}: {e}"))),
    }
}
