//! `logit-lens`: see what every layer of a language model predicts.

mod backends;
mod bench;
mod bench_load;
mod bench_lsp;
mod bench_server;
mod cli;
mod diff;
mod doctor;
mod generate;
mod plot;
mod render;
mod serve;
mod tuned;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let log_file = match &args.command {
        cli::Command::Serve(s) => s.log_file.clone(),
        _ => None,
    };
    if let Err(err) = init_tracing(args.verbose, log_file.as_deref()) {
        #[allow(clippy::print_stderr)]
        {
            eprintln!("error: {err:#}");
        }
        return ExitCode::FAILURE;
    }
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("error: {err:#}");
            }
            // A request this build cannot honour (an unknown backend, a device or precision a
            // backend lacks) is a usage error, as clap's own are.
            let usage = err.chain().any(|e| {
                matches!(
                    e.downcast_ref::<lens_core::Error>(),
                    Some(lens_core::Error::Unsupported(_))
                )
            });
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// Logs go to stderr only (stdout carries results; for `serve --stdio` it is the LSP channel)
/// or to `--log-file`, filtered by `LOGIT_LENS_LOG`.
fn init_tracing(verbose: u8, log_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOGIT_LENS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match log_file {
        None => builder.with_writer(std::io::stderr).init(),
        Some(path) => {
            use anyhow::Context;
            let mut open = std::fs::OpenOptions::new();
            open.create(true).append(true);
            // Logs hold prompts: readable by their owner only, whatever the umask.
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut open, 0o600);
            let file = open
                .open(path)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot restrict the log file {}", path.display()))?;
            }
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
    }
    Ok(())
}
