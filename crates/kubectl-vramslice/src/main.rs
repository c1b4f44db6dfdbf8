//! `kubectl-vramslice`: parse the command line, connect with the user's kubeconfig, print, and
//! exit with a code scripts can rely on (see the library's `Exit`).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use kubectl_vramslice::render::Style;
use kubectl_vramslice::{Cli, Exit, client, run, use_color};

fn code(exit: Exit) -> ExitCode {
    ExitCode::from(exit as u8)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let color = use_color(
        cli.color,
        stdout.is_terminal(),
        std::env::var_os("NO_COLOR").is_some(),
    );
    let client = match client(&cli).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return code(Exit::Error);
        }
    };
    match run(&cli, &client, Style { color }).await {
        Ok(outcome) => {
            for warning in &outcome.warnings {
                eprintln!("warning: {warning}");
            }
            if let Some(note) = outcome.note {
                eprintln!("{note}");
            }
            let mut out = stdout.lock();
            if out
                .write_all(outcome.text.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
            {
                return code(Exit::Error);
            }
            code(outcome.exit)
        }
        Err(e) => {
            eprintln!("error: {e}");
            code(e.exit())
        }
    }
}
