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
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `outer: inner`, leaving out a cause whose message the text so far already ends
/// with: our typed errors (`PromptError::Audio`, ...) put their source in their own message, so anyhow's
/// `{:#}` printed it twice.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.is_empty() {
            out = msg;
        } else if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("audio 0: {0}")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("audio is 31.70 s long")]
    struct Inner;

    #[test]
    fn a_cause_already_in_the_message_is_printed_once() {
        let e = anyhow::Error::new(Outer(Inner));
        assert_eq!(error_chain(&e), "audio 0: audio is 31.70 s long");
        let e = anyhow::Error::new(Inner).context("reading /x.flac");
        assert_eq!(error_chain(&e), "reading /x.flac: audio is 31.70 s long");
    }
}
