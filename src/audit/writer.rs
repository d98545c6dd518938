//! Appending to the log, in segments.

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SubsecRound, Utc};

use super::verify::{ChainState, SEGMENT_DIGITS, StreamError, check_stream, sealed_segments};
use super::{AuditError, BadRecord, Entry, Keys, MIN_KEY_LEN, Problem, Record, SigningKey, Start};

/// How a log is kept: when to start a new segment, how many to keep, and whose chain it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogOptions {
    /// The active file is sealed (renamed to `<path>.<first seq>`) and a new one begun when an
    /// append would take it past this many bytes. 0: never.
    pub max_segment_bytes: u64,
    /// Sealed segments kept; older ones are deleted. 0: keep every one.
    pub keep_segments: usize,
    /// The `writer` of every record: the replica's name.
    pub writer: Option<String>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            max_segment_bytes: 64 * 1024 * 1024,
            keep_segments: 0,
            writer: None,
        }
    }
}

/// The writer of one log: its active file, and the sealed segments before it.
///
/// It holds an exclusive lock on the active file (`flock`) while it is open, so a second writer,
/// in this process or another, fails to open it instead of forking the chain. It does no locking
/// of its own otherwise: share it behind a `Mutex`.
pub struct AuditLog {
    file: File,
    path: PathBuf,
    key: SigningKey,
    options: LogOptions,
    last_seq: u64,
    last_hash: String,
    /// The `seq` of the active file's first record (the next record's, when it is empty).
    segment_first_seq: u64,
    /// The length of the active file, all of it complete records.
    len: u64,
    truncated_tail: Option<u64>,
    echo: Option<Box<dyn Write + Send>>,
    echo_failures: u64,
    /// An append failed and its bytes could not be removed yet.
    poisoned: bool,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("last_seq", &self.last_seq)
            .field("last_hash", &self.last_hash)
            .field("key_id", &self.key.id)
            .field("truncated_tail", &self.truncated_tail)
            .field("echo", &self.echo.is_some())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log at `path` with one key and the default [`LogOptions`]; see
    /// [`AuditLog::open_with`].
    pub fn open(path: impl AsRef<Path>, key: &[u8]) -> Result<AuditLog, AuditError> {
        if key.len() < MIN_KEY_LEN {
            return Err(AuditError::ShortKey { len: key.len() });
        }
        AuditLog::open_with(path, &Keys::one(key), LogOptions::default())
    }

    /// Opens the log whose active file is `path`, creating it if it does not exist, and
    /// verifies the active file's records (a line at a time: memory does not grow with the
    /// log), continuing from the last record of the newest sealed segment when there is one.
    /// Appends continue the chain after the last record, signed with the current key of `keys`;
    /// the earlier keys only check records written before a key rotation.
    ///
    /// A last line without its newline, which a crash in the middle of an append leaves, is
    /// removed (see [`AuditLog::truncated_tail`]): it belongs to an append that never returned,
    /// so nothing was done on its strength. Any other defect is [`AuditError::Broken`], and
    /// nothing is appended.
    pub fn open_with(
        path: impl AsRef<Path>,
        keys: &Keys,
        options: LogOptions,
    ) -> Result<AuditLog, AuditError> {
        let path = path.as_ref();
        let io_error = |doing: &'static str| {
            move |source: io::Error| AuditError::Io {
                path: path.to_path_buf(),
                doing,
                source,
            }
        };
        let start = match sealed_segments(path)
            .map_err(io_error("list the segments of"))?
            .last()
        {
            Some(sealed) => last_record_of(sealed, keys).map_err(|e| match e {
                TailError::Io(source) => AuditError::Io {
                    path: sealed.clone(),
                    doing: "read the last record of",
                    source,
                },
                TailError::Bad(record) => AuditError::Broken {
                    path: sealed.clone(),
                    record,
                },
            })?,
            None => Start::Anywhere,
        };
        let mut file = lock_new_or_existing(path).map_err(|e| match e {
            LockError::Io(doing, source) => io_error(doing)(source),
            LockError::Locked => AuditError::Locked {
                path: path.to_path_buf(),
            },
        })?;
        let mut chain = ChainState::new(&start);
        let end =
            check_stream(BufReader::new(&mut file), keys, &mut chain).map_err(|e| match e {
                StreamError::Io(source) => io_error("read")(source),
                StreamError::Bad(record) => AuditError::Broken {
                    path: path.to_path_buf(),
                    record,
                },
            })?;
        let truncated_tail = if end.tail.is_empty() {
            None
        } else {
            file.set_len(end.complete_len)
                .and_then(|()| file.sync_data())
                .map_err(io_error("remove the incomplete last line of"))?;
            Some(end.tail.len() as u64)
        };
        if end.lines == 0 && end.tail.is_empty() {
            sync_parent(path).map_err(io_error("record the creation of"))?;
        }
        let (last_seq, last_hash) = match (&start, chain.summary.records) {
            (Start::AfterSeq { seq, hash }, 0) => (*seq, hash.clone()),
            _ => (chain.summary.last_seq, chain.summary.last_hash.clone()),
        };
        Ok(AuditLog {
            file,
            path: path.to_path_buf(),
            key: keys.current().clone(),
            options,
            last_seq,
            last_hash,
            segment_first_seq: chain.summary.first_seq.unwrap_or(last_seq + 1),
            len: end.complete_len,
            truncated_tail,
            echo: None,
            echo_failures: 0,
            poisoned: false,
        })
    }

    /// Also writes every appended line to `echo` (stdout, in the controller, for the cluster's
    /// log collection: a copy of the log kept out of reach of whoever can edit the file).
    ///
    /// A line is echoed after it is durable in the file. The echo is a copy: when writing to it
    /// fails, the append still succeeds, and [`AuditLog::echo_failures`] counts the failure.
    pub fn with_echo(mut self, echo: Box<dyn Write + Send>) -> AuditLog {
        self.echo = Some(echo);
        self
    }

    /// Appends one record per entry, all stamped `now` (to the millisecond), with one write,
    /// and returns after the data is on disk (`sync_data`). Make the change the records describe
    /// only after this returns `Ok`. When the active file would grow past
    /// [`LogOptions::max_segment_bytes`], it is sealed first and the records begin a new one.
    ///
    /// When writing or syncing fails, the bytes written are cut off again and the log is as it
    /// was; when even that fails, appends fail with [`AuditError::Poisoned`] until cutting them
    /// off succeeds (each append tries again).
    pub fn append(
        &mut self,
        entries: &[Entry],
        now: DateTime<Utc>,
    ) -> Result<Vec<Record>, AuditError> {
        if self.poisoned {
            if self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .is_err()
            {
                return Err(AuditError::Poisoned {
                    path: self.path.clone(),
                });
            }
            self.poisoned = false;
        }
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let time = now.trunc_subsecs(3);
        let mut records = Vec::with_capacity(entries.len());
        let mut lines = Vec::with_capacity(entries.len() * 640);
        let mut prev = self.last_hash.clone();
        for (i, entry) in entries.iter().enumerate() {
            let record = Record::signed(
                entry,
                self.last_seq + 1 + i as u64,
                time,
                &prev,
                &self.key,
                self.options.writer.as_deref(),
            );
            serde_json::to_writer(&mut lines, &record).expect("records serialize");
            lines.push(b'\n');
            prev.clone_from(&record.hash);
            records.push(record);
        }
        let max = self.options.max_segment_bytes;
        if max > 0 && self.len > 0 && self.len + lines.len() as u64 > max {
            self.seal()?;
        }
        if let Err(source) = (&self.file)
            .write_all(&lines)
            .and_then(|()| self.file.sync_data())
        {
            // Cut off what was written, so that the next append continues a whole chain.
            if self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data())
                .is_err()
            {
                self.poisoned = true;
            }
            return Err(AuditError::Io {
                path: self.path.clone(),
                doing: "append to",
                source,
            });
        }
        self.len += lines.len() as u64;
        self.last_seq += records.len() as u64;
        self.last_hash = prev;
        if let Some(echo) = &mut self.echo
            && echo.write_all(&lines).and_then(|()| echo.flush()).is_err()
        {
            self.echo_failures += 1;
        }
        Ok(records)
    }

    /// Seals the active file as `<path>.<its first seq>` and begins a new, empty one; then
    /// deletes the oldest sealed segments beyond [`LogOptions::keep_segments`].
    fn seal(&mut self) -> Result<(), AuditError> {
        let io_error = |doing: &'static str| {
            let path = self.path.clone();
            move |source: io::Error| AuditError::Io {
                path,
                doing,
                source,
            }
        };
        let sealed = sealed_name(&self.path, self.segment_first_seq);
        if sealed.exists() {
            // Never overwrite a segment: that would lose records.
            return Err(io_error("seal the active segment of")(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists already", sealed.display()),
            )));
        }
        std::fs::rename(&self.path, &sealed).map_err(io_error("seal the active segment of"))?;
        let file = match lock_new_or_existing(&self.path) {
            Ok(file) => file,
            Err(LockError::Io(doing, source)) => return Err(io_error(doing)(source)),
            Err(LockError::Locked) => {
                return Err(AuditError::Locked {
                    path: self.path.clone(),
                });
            }
        };
        sync_parent(&self.path).map_err(io_error("record the new segment of"))?;
        self.file = file;
        self.len = 0;
        self.segment_first_seq = self.last_seq + 1;
        if self.options.keep_segments > 0 {
            let sealed = sealed_segments(&self.path).map_err(io_error("list the segments of"))?;
            let excess = sealed.len().saturating_sub(self.options.keep_segments);
            for old in &sealed[..excess] {
                std::fs::remove_file(old).map_err(io_error("remove an old segment of"))?;
                tracing::info!(segment = %old.display(), "removed a sealed decision-log segment beyond --decision-log-keep-segments");
            }
        }
        Ok(())
    }

    /// The `seq` of the last record; 0 when the log is empty.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The `hash` of the last record; 64 zeros when the log is empty.
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// The id of the key new records are signed with.
    pub fn key_id(&self) -> &str {
        &self.key.id
    }

    /// How many bytes of an incomplete last line [`AuditLog::open`] removed, if it removed any.
    pub fn truncated_tail(&self) -> Option<u64> {
        self.truncated_tail
    }

    /// How many appends could not be echoed.
    pub fn echo_failures(&self) -> u64 {
        self.echo_failures
    }

    /// The active file this writes.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The name `path`'s active segment gets when it is sealed.
fn sealed_name(path: &Path, first_seq: u64) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{first_seq:0width$}", width = SEGMENT_DIGITS));
    PathBuf::from(name)
}

enum LockError {
    Io(&'static str, io::Error),
    Locked,
}

/// Opens (creating) `path` for appending and reading, and takes its lock.
fn lock_new_or_existing(path: &Path) -> Result<File, LockError> {
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| LockError::Io("open", e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(LockError::Locked),
        // A filesystem without locks: go on without one.
        Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => Ok(file),
        Err(TryLockError::Error(e)) => Err(LockError::Io("lock", e)),
    }
}

enum TailError {
    Io(io::Error),
    Bad(BadRecord),
}

/// Where the chain of the segment after `sealed` starts: after its last record, read from the
/// end of the file (the last 64 KiB) and checked against its own hash.
fn last_record_of(sealed: &Path, keys: &Keys) -> Result<Start, TailError> {
    let mut file = File::open(sealed).map_err(TailError::Io)?;
    let len = file.metadata().map_err(TailError::Io)?.len();
    let from = len.saturating_sub(64 * 1024);
    file.seek(SeekFrom::Start(from)).map_err(TailError::Io)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(TailError::Io)?;
    let body = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
    let last = body
        .rsplit(|&b| b == b'\n')
        .next()
        .filter(|l| !l.is_empty() && (from == 0 || body.len() < bytes.len()))
        .unwrap_or_default();
    // Checked as the first record of a chain that may start anywhere: its hash must be right.
    let mut chain = ChainState::new(&Start::Anywhere);
    let mut line = last.to_vec();
    line.push(b'\n');
    check_stream(line.as_slice(), keys, &mut chain).map_err(|e| match e {
        StreamError::Io(e) => TailError::Io(e),
        StreamError::Bad(mut record) => {
            record.line = 0;
            TailError::Bad(record)
        }
    })?;
    if chain.summary.records == 0 {
        return Err(TailError::Bad(BadRecord {
            line: 0,
            seq: None,
            problem: Problem::NotARecord("the sealed segment has no last record".into()),
        }));
    }
    Ok(Start::AfterSeq {
        seq: chain.summary.last_seq,
        hash: chain.summary.last_hash,
    })
}

/// Makes the creation of `path` durable: a new file's name lives in its folder, which the file's
/// own `sync_data` does not write.
#[cfg(unix)]
fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

#[cfg(not(unix))]
fn sync_parent(_path: &Path) -> io::Result<()> {
    Ok(())
}
