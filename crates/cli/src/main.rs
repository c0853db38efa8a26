//! `afnext`: the one binary of the AF-Next serving cluster. Each subcommand composes the typed
//! configuration of the crates it runs; this crate is the only one that reads flags or the environment.

mod input;
mod inspect;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "afnext",
    version,
    about = "Serve NVIDIA Audio Flamingo Next (AF-Next)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the front end and prompt processing on one input and write the tensors to a safetensors file.
    Inspect(inspect::InspectArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
