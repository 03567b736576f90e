//! `add-test-messages [N]`: enqueues N (default 100) realistic test messages, the way any
//! program would (INSERT of recipient and content), and prints how many it inserted.

use std::process::ExitCode;

use message_dispatcher::config::Config;
use message_dispatcher::error::Error;
use message_dispatcher::store::Store;
use message_dispatcher::{daemon, logging};

const USAGE: &str = "\
Usage: add-test-messages [N]

Inserts N (default 100) test messages into the messages table of DATABASE_URL (or DB_HOST,
DB_PORT, DB_USER, DB_PASSWORD, DB_NAME), applying pending migrations first.";

/// Rows per INSERT: large backlogs go in a few statements, each small enough to stay quick.
const CHUNK: usize = 10_000;

const TEMPLATES: &[&str] = &[
    "Your verification code is {n}. It expires in 10 minutes.",
    "Your order #{n} has shipped and will arrive tomorrow.",
    "Reminder: your appointment is tomorrow at 10:{m}.",
    "Payment of {n} TRY received. Thank you!",
    "Your package {n} is out for delivery.",
    "Welcome aboard! Reply STOP to unsubscribe.",
];

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("add-test-messages: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = match args.as_slice() {
        [] => 100,
        [flag] if flag == "-h" || flag == "--help" => {
            println!("{USAGE}");
            return Ok(());
        }
        [n] => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000_000).contains(n))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "N: expected a whole number from 1 to 10000000, got {n:?}\n\n{USAGE}"
                ))
            })?,
        _ => return Err(Error::Usage(USAGE.into())),
    };
    let config = Config::from_env()?;
    logging::init(&config);
    let mut store = Store::new(config.postgres()?, "add-test-messages");
    daemon::migrate(&mut store)?;

    let mut inserted = 0u64;
    let mut next = 0usize;
    while next < count {
        let end = (next + CHUNK).min(count);
        let (recipients, contents): (Vec<String>, Vec<String>) = (next..end).map(message).unzip();
        inserted += store.insert_many(&recipients, &contents)?;
        next = end;
        if count > CHUNK {
            eprintln!("add-test-messages: {inserted}/{count}");
        }
    }
    println!("Inserted {inserted} test messages");
    Ok(())
}

/// A plausible phone number and text, different for every `i`.
fn message(i: usize) -> (String, String) {
    let number = 5_550_000_000u64 + (i as u64 * 7_919) % 9_999_999;
    let seed = rand::random::<u32>();
    let text = TEMPLATES[i % TEMPLATES.len()]
        .replace("{n}", &format!("{}", 100_000 + seed % 900_000))
        .replace("{m}", &format!("{:02}", seed % 60));
    (format!("+90{number}"), text)
}
