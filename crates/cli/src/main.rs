//! `afnext`: the one binary of the AF-Next serving cluster. Each subcommand composes the typed
//! configuration of the crates it runs; this crate is the only one that reads flags or the environment.

mod ask;
mod cluster;
mod decoder;
mod etcd_args;
mod generate;
mod input;
mod inspect;
mod model_args;
mod pipeline;
mod serve;
mod tls_args;

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
    /// Return freed memory to the system at once (glibc's default). Otherwise the commands that run the
    /// model keep it for reuse: on a CPU, every step's large buffers would be faulted in again, page by page
    /// (see docs/PERFORMANCE.md).
    #[arg(long, global = true)]
    return_freed_memory: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask a running server or router (uploads audio with progress, streams the answer).
    Ask(ask::AskArgs),
    /// Answer one request with the model in this process, streaming the text (or --json).
    Generate(generate::GenerateArgs),
    /// Write every stage (processor outputs, encoder, RoTE, projector, logits, greedy ids) for one input.
    Inspect(inspect::InspectArgs),
    /// Serve the gRPC API with the whole model in this process (the embedded single-process mode).
    Serve(serve::ServeArgs),
    /// One rank of a tensor-parallel decoder group (rank 0 serves the API).
    Decoder(decoder::DecoderArgs),
    /// An encoder worker of a cluster: windows in, embeddings pushed to decoder groups.
    Encoder(cluster::EncoderArgs),
    /// The cluster router: the public API over encoder workers and decoder groups.
    Router(cluster::RouterArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runs_model = !matches!(cli.command, Command::Ask(_) | Command::Router(_));
    if runs_model && !cli.return_freed_memory {
        afnext_model::alloc::retain_freed_memory();
    }
    let result = match cli.command {
        Command::Ask(args) => ask::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Decoder(args) => decoder::run(args),
        Command::Encoder(args) => cluster::run_encoder(args),
        Command::Router(args) => cluster::run_router(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
