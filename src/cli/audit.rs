//! `portcullis audit`: work with the decision log.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::{EXIT_ALLOWED, EXIT_FAILURE, EXIT_INVALID};
use crate::audit::{self, Keys, Start, VerifyFailure, VerifySummary};

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check that no record of a decision log was edited, removed or reordered.
    ///
    /// Given the log's active file, its sealed segments beside it (`FILE.<first seq>`) are
    /// checked first, oldest first, as one chain; given several files, they are checked in the
    /// order given; `-` reads standard input (a SIEM export, say).
    ///
    /// Exit status: 0 when every record verifies, 1 when one does not (the first one is named;
    /// it and every record after it cannot be trusted), 2 when the log or the key cannot be read.
    Verify {
        /// The decision log (its active file), its segments in order, or `-`.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The file with the key the log was written with. Give it again for each earlier key
        /// after a key rotation: each record names its key by id.
        #[arg(long, value_name = "KEY_FILE", required = true)]
        key: Vec<PathBuf>,
        /// Check from a later point than the beginning: the hash of the record before the first
        /// one read (from the segment before, or a copy kept elsewhere).
        #[arg(long, value_name = "HASH")]
        prev: Option<String>,
    },
    /// Print a decision log's records in a common event schema, one JSON document a line, for
    /// a SIEM: `ecs` (Elastic Common Schema 8.11; see docs/decision-log.md for the fields and
    /// for the OCSF classes). Export does not check the chain: run `audit verify` on the same
    /// files first. Exit status 2 when a file or a line cannot be read as a record.
    Export {
        /// The decision log (its active file: the sealed segments beside it come first), its
        /// segments in order, or `-` for standard input.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// The schema to print.
        #[arg(long, value_enum, default_value = "ecs")]
        format: ExportFormat,
    },
    /// Append runtime access records to a decision log from exported audit events: a managed
    /// cluster's Kubernetes audit log, or a Vault `file` audit device's output. The records,
    /// anomalies and usage are those `portcullis run --audit-webhook-addr` makes.
    Ingest(Box<super::ingest::IngestArgs>),
}

/// A schema `audit export` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Elastic Common Schema.
    Ecs,
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
        AuditCommand::Verify { files, key, prev } => run_verify(
            files,
            key,
            prev.as_deref(),
            &mut std::io::stdin().lock(),
            out,
            err,
        ),
        AuditCommand::Export { files, format } => {
            run_export(files, *format, &mut std::io::stdin().lock(), out, err)
        }
        AuditCommand::Ingest(ingest) => super::ingest::run(ingest, out, err),
    }
}

/// `audit export`, reading `-` from `stdin`.
pub fn run_export(
    files: &[PathBuf],
    format: ExportFormat,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let files = match files {
        [one] if one != Path::new("-") => match audit::segments(one) {
            Ok(found) if !found.is_empty() => found,
            _ => files.to_vec(),
        },
        _ => files.to_vec(),
    };
    for file in &files {
        let result = if file == Path::new("-") {
            export_lines(stdin, "(standard input)", format, out)
        } else {
            match std::fs::File::open(file) {
                Ok(f) => export_lines(
                    &mut std::io::BufReader::new(f),
                    &file.display().to_string(),
                    format,
                    out,
                ),
                Err(e) => Err(format!("cannot read {}: {e}", file.display())),
            }
        };
        if let Err(message) = result {
            let _ = writeln!(err, "error: {message}");
            return EXIT_INVALID;
        }
    }
    EXIT_ALLOWED
}

/// Prints the record of each line of `input` (`name` in messages) in `format`.
fn export_lines(
    input: &mut dyn BufRead,
    name: &str,
    format: ExportFormat,
    out: &mut dyn Write,
) -> Result<(), String> {
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read {name}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: audit::Record = serde_json::from_str(&line).map_err(|e| {
            format!(
                "{name}:{}: not a decision-log record ({e}); give the files `portcullis run --audit-log` writes",
                n + 1
            )
        })?;
        let document = match format {
            ExportFormat::Ecs => audit::to_ecs(&record),
        };
        writeln!(out, "{document}").map_err(|e| format!("cannot write: {e}"))?;
    }
    Ok(())
}

/// `audit verify`, reading `-` from `stdin`.
pub fn run_verify(
    files: &[PathBuf],
    key_files: &[PathBuf],
    prev: Option<&str>,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let mut keys = Vec::new();
    for path in key_files {
        match audit::load_key(path) {
            Ok(key) => keys.push(key),
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return EXIT_INVALID;
            }
        }
    }
    let keys = Keys::with_previous(&keys[0], &keys[1..]);
    let start = match prev {
        None => Start::Genesis,
        Some(hash) if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Start::After(hash.to_ascii_lowercase())
        }
        Some(other) => {
            let _ = writeln!(
                err,
                "error: --prev {other:?} is not a record hash: give the 64 hex digits of the `hash` of the record before the first one to check"
            );
            return EXIT_INVALID;
        }
    };
    let stdin_name = Path::new("-");
    let result = if files == [stdin_name] {
        audit::verify_reader(stdin, &keys, &start, Path::new("(standard input)"))
    } else {
        let files = match files {
            [one] => match audit::segments(one) {
                Ok(found) if !found.is_empty() => found,
                _ => files.to_vec(),
            },
            _ => files.to_vec(),
        };
        audit::verify_files(&files, &keys, &start).map(|mut s| {
            s.files = files.len();
            s
        })
    };
    let name = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    match result {
        Ok(summary) => {
            let text = summary_text(&name, &summary);
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

/// What `audit verify` prints for a log that verifies.
fn summary_text(file: &str, s: &VerifySummary) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if s.records == 0 {
        let _ = writeln!(out, "{file}: no records; nothing to verify");
        return out;
    }
    let plural = if s.records == 1 { "" } else { "s" };
    let segments = if s.files > 1 {
        format!(" in {} segments", s.files)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "{file}: {} record{plural}{segments}, seq {} to {}, every one verifies",
        s.records,
        s.first_seq.unwrap_or(1),
        s.last_seq
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
        s.last_hash, s.last_seq
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
