//! tracing setup for the binary.
//!
//! Log lines (the proxy's access log among them: one per connection) are formatted on the
//! thread that emits them and handed to one writer thread (`tracing-appender`), which writes
//! them to stderr in batches: an async worker never waits on a slow terminal, pipe or log
//! collector, and a burst of lines costs one `write` per batch rather than one per line.
//! Should the writer fall [`QUEUED_LINES`] lines behind, new lines are dropped rather than
//! blocking the workers.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// How many formatted lines may wait for the writer thread. The queue's slots are
/// allocated up front (tracing-appender's default of 128,000 cost about 4 MiB of resident
/// memory in every ferry process); 8,192 lines absorb any burst a sidecar logs.
pub const QUEUED_LINES: usize = 8192;

/// Installs the global subscriber writing to stderr through the writer thread. Keep the
/// guard until the process ends: dropping it flushes what is still queued.
pub fn init(level: &str, format: LogFormat) -> anyhow::Result<WorkerGuard> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v)?,
        _ => EnvFilter::try_new(level)
            .map_err(|e| anyhow::anyhow!("invalid --log-level {level:?}: {e}"))?,
    };
    let ansi = std::io::stderr().is_terminal();
    // The writer thread flushes whenever its queue runs empty, so the buffer only batches
    // lines that arrived together.
    let (writer, guard) = NonBlockingBuilder::default()
        .thread_name("ferry-log")
        .buffered_lines_limit(QUEUED_LINES)
        .finish(BufWriter::new(std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour only for a terminal: a log file or collector gets plain text.
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot install logger: {e}"))?;
    Ok(guard)
}
