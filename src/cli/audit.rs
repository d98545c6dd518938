//! `portcullis audit`: work with the decision log.

use std::io::Write;
use std::path::PathBuf;

use clap::Subcommand;

use super::{EXIT_ALLOWED, EXIT_FAILURE, EXIT_INVALID};
use crate::audit::{self, VerifyFailure, VerifySummary};

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check that no record of a decision log was edited, removed or reordered.
    ///
    /// Exit status: 0 when every record verifies, 1 when one does not (the first one is named;
    /// it and every record after it cannot be trusted), 2 when the log or the key cannot be read.
    Verify {
        /// The decision log, one JSON record a line.
        file: PathBuf,
        /// The file with the key the log was written with.
        #[arg(long, value_name = "KEY_FILE")]
        key: PathBuf,
    },
}

/// Runs `portcullis audit` and returns the exit code; prints to stdout and stderr.
pub fn run(args: &AuditArgs) -> u8 {
    run_to(
        args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    )
}

/// [`run`], printing to `out` and `err`.
pub fn run_to(args: &AuditArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    match &args.command {
        AuditCommand::Verify { file, key } => {
            let key = match audit::load_key(key) {
                Ok(key) => key,
                Err(e) => {
                    let _ = writeln!(err, "error: {e}");
                    return EXIT_INVALID;
                }
            };
            match audit::verify(file, &key) {
                Ok(summary) => {
                    let text = summary_text(&file.display().to_string(), &summary);
                    if out
                        .write_all(text.as_bytes())
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        return EXIT_FAILURE;
                    }
                    EXIT_ALLOWED
                }
                Err(e @ VerifyFailure::Unreadable { .. }) => {
                    let _ = writeln!(err, "error: {e}");
                    EXIT_INVALID
                }
                Err(e @ VerifyFailure::Bad { .. }) => {
                    let _ = writeln!(
                        err,
                        "error: {e}; the records from here on cannot be trusted"
                    );
                    EXIT_FAILURE
                }
            }
        }
    }
}

/// What `audit verify` prints for a log that verifies.
fn summary_text(file: &str, s: &VerifySummary) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if s.records == 0 {
        let _ = writeln!(out, "{file}: no records; nothing to verify");
        return out;
    }
    let plural = if s.records == 1 { "" } else { "s" };
    let _ = writeln!(
        out,
        "{file}: {} record{plural}, seq 1 to {}, every one verifies",
        s.records, s.records
    );
    if let (Some(first), Some(last)) = (s.first_time, s.last_time) {
        let _ = writeln!(
            out,
            "  from {} to {}",
            audit::format_time(first),
            audit::format_time(last)
        );
    }
    let _ = writeln!(
        out,
        "  last hash {} (records removed from the end leave a valid chain: compare seq {} and this hash with a copy kept elsewhere)",
        s.last_hash, s.records
    );
    let width = s
        .by_action
        .keys()
        .map(|a| a.as_str().len())
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "  by action:");
    for (action, n) in &s.by_action {
        let _ = writeln!(out, "    {:<width$}  {n}", action.as_str());
    }
    if !s.by_verdict.is_empty() {
        let verdicts: Vec<String> = s
            .by_verdict
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect();
        let _ = writeln!(out, "  by verdict: {}", verdicts.join(", "));
    }
    out
}
