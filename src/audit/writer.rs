//! Appending to the log.

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, SubsecRound, Utc};

use super::verify::check;
use super::{AuditError, Entry, HmacSha256, MIN_KEY_LEN, Record, mac};

/// The writer of one log file.
///
/// It holds an exclusive lock on the file (`flock`) while it is open, so a second writer, in this
/// process or another, fails to open it instead of forking the chain. It does no locking of its
/// own otherwise: share it behind a `Mutex`.
pub struct AuditLog {
    file: File,
    path: PathBuf,
    mac: HmacSha256,
    last_seq: u64,
    last_hash: String,
    /// The length of the file, all of it complete records.
    len: u64,
    truncated_tail: Option<u64>,
    echo: Option<Box<dyn Write + Send>>,
    echo_failures: u64,
    /// An append failed and its bytes could not be removed.
    poisoned: bool,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("last_seq", &self.last_seq)
            .field("last_hash", &self.last_hash)
            .field("truncated_tail", &self.truncated_tail)
            .field("echo", &self.echo.is_some())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log at `path`, creating it if it does not exist, and verifies the records it
    /// has with `key`; appends continue the chain after the last one.
    ///
    /// A last line without its newline, which a crash in the middle of an append leaves, is
    /// removed (see [`AuditLog::truncated_tail`]): it belongs to an append that never returned,
    /// so nothing was done on its strength. Any other defect is [`AuditError::Broken`], and
    /// nothing is appended.
    pub fn open(path: impl AsRef<Path>, key: &[u8]) -> Result<AuditLog, AuditError> {
        let path = path.as_ref();
        if key.len() < MIN_KEY_LEN {
            return Err(AuditError::ShortKey { len: key.len() });
        }
        let io_error = |doing: &'static str| {
            move |source: io::Error| AuditError::Io {
                path: path.to_path_buf(),
                doing,
                source,
            }
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io_error("open"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(AuditError::Locked {
                    path: path.to_path_buf(),
                });
            }
            // A filesystem without locks: go on without one.
            Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => {}
            Err(TryLockError::Error(e)) => return Err(io_error("lock")(e)),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_error("read"))?;
        let mac = mac(key);
        let chain = check(&bytes, &mac).map_err(|record| AuditError::Broken {
            path: path.to_path_buf(),
            record,
        })?;
        let len = chain.complete_len as u64;
        let tail = bytes.len() as u64 - len;
        let truncated_tail = if tail > 0 {
            file.set_len(len)
                .and_then(|()| file.sync_data())
                .map_err(io_error("remove the incomplete last line of"))?;
            Some(tail)
        } else {
            None
        };
        if bytes.is_empty() {
            sync_parent(path).map_err(io_error("record the creation of"))?;
        }
        Ok(AuditLog {
            file,
            path: path.to_path_buf(),
            mac,
            last_seq: chain.summary.records,
            last_hash: chain.summary.last_hash,
            len,
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
    /// only after this returns `Ok`.
    ///
    /// When writing or syncing fails, the bytes written are cut off again and the log is as it
    /// was; when even that fails, every later append fails with [`AuditError::Poisoned`].
    pub fn append(
        &mut self,
        entries: &[Entry],
        now: DateTime<Utc>,
    ) -> Result<Vec<Record>, AuditError> {
        if self.poisoned {
            return Err(AuditError::Poisoned {
                path: self.path.clone(),
            });
        }
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let time = now.trunc_subsecs(3);
        let mut records = Vec::with_capacity(entries.len());
        let mut lines = Vec::with_capacity(entries.len() * 512);
        let mut prev = self.last_hash.clone();
        for (i, entry) in entries.iter().enumerate() {
            let record =
                Record::signed(entry, self.last_seq + 1 + i as u64, time, &prev, &self.mac);
            serde_json::to_writer(&mut lines, &record).expect("records serialize");
            lines.push(b'\n');
            prev.clone_from(&record.hash);
            records.push(record);
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

    /// The `seq` of the last record; 0 when the log is empty.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The `hash` of the last record; 64 zeros when the log is empty.
    pub fn last_hash(&self) -> &str {
        &self.last_hash
    }

    /// How many bytes of an incomplete last line [`AuditLog::open`] removed, if it removed any.
    pub fn truncated_tail(&self) -> Option<u64> {
        self.truncated_tail
    }

    /// How many appends could not be echoed.
    pub fn echo_failures(&self) -> u64 {
        self.echo_failures
    }

    /// The file this writes.
    pub fn path(&self) -> &Path {
        &self.path
    }
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
