//! Child processes that die with the test binary.
//!
//! The control plane lives in a `static` that is never dropped, and a test binary can be killed
//! with SIGKILL, so no Rust destructor can be relied on to stop the servers. Each server runs
//! under a small bash watchdog instead: it polls the test process every 0.5 s and, once that is
//! gone (or the watchdog itself is asked to stop with SIGTERM/SIGINT/SIGHUP, or the server has
//! exited), sends the server SIGTERM (or the signal it was started with), and SIGKILL 2 s later
//! if it is still there.
//!
//! A second kind of watchdog, the reaper, removes the control plane's temporary directory once
//! the test process and every server whose pid is recorded in that directory are gone.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `bash -c` script: `$1` the pid to watch, `$2` a file to write the server's pid to, `$3` the
/// signal that stops the server (TERM for most; PostgreSQL's fast shutdown is INT), then the
/// server's command line.
const WATCHDOG: &str = r#"
parent=$1; pidfile=$2; sig=$3; shift 3
stop=
trap 'stop=1' INT TERM HUP
"$@" &
child=$!
echo "$child" > "$pidfile"
while [ -z "$stop" ] && kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do
    sleep 0.5
done
kill -"$sig" "$child" 2>/dev/null
for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
    kill -0 "$child" 2>/dev/null || break
    sleep 0.1
done
kill -KILL "$child" 2>/dev/null
wait "$child" 2>/dev/null
"#;

/// `bash -c` script: `$1` the pid to watch, `$2` the directory to remove, `$3` non-empty to keep
/// it. Waits (at most 10 s) for the servers listed in `$2/*.pid` to exit first.
const REAPER: &str = r#"
parent=$1; dir=$2; keep=$3
trap '' INT HUP
while kill -0 "$parent" 2>/dev/null; do sleep 0.5; done
for _ in $(seq 1 100); do
    alive=
    for f in "$dir"/*.pid; do
        [ -f "$f" ] && kill -0 "$(cat "$f" 2>/dev/null)" 2>/dev/null && alive=1
    done
    [ -z "$alive" ] && break
    sleep 0.1
done
if [ -z "$keep" ]; then rm -rf "$dir"; fi
"#;

/// A server process running under its watchdog.
pub(crate) struct Server {
    pub name: &'static str,
    pub log: PathBuf,
    watchdog: Child,
    /// Stop the server when this value is dropped (only while the control plane starts; the
    /// running control plane is in a static and never dropped).
    stop_on_drop: bool,
}

impl Server {
    /// Starts `program args...` under a watchdog; stdout and stderr go to `dir/<name>.log`, the
    /// server's pid to `dir/<name>.pid`.
    pub(crate) fn spawn(
        name: &'static str,
        dir: &Path,
        program: &Path,
        args: &[String],
    ) -> Result<Server, String> {
        Self::spawn_stopped_by(name, dir, program, args, "TERM")
    }

    /// As [`Server::spawn`], for a server that `stop_signal` (`TERM`, `INT`, ...) stops best.
    pub(crate) fn spawn_stopped_by(
        name: &'static str,
        dir: &Path,
        program: &Path,
        args: &[String],
        stop_signal: &str,
    ) -> Result<Server, String> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("dup {}: {e}", log.display()))?;
        let watchdog = Command::new("bash")
            .arg("-c")
            .arg(WATCHDOG)
            .arg(format!("portcullis-envtest-{name}"))
            .arg(std::process::id().to_string())
            .arg(dir.join(format!("{name}.pid")))
            .arg(stop_signal)
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {name} ({}): {e}", program.display()))?;
        Ok(Server {
            name,
            log,
            watchdog,
            stop_on_drop: true,
        })
    }

    /// Whether the server (and so its watchdog) has exited.
    pub(crate) fn exited(&mut self) -> bool {
        !matches!(self.watchdog.try_wait(), Ok(None))
    }

    /// Keep the server running after this value is dropped; its watchdog still stops it when the
    /// test process exits.
    pub(crate) fn detach(&mut self) {
        self.stop_on_drop = false;
    }

    /// The last `lines` lines of the server's log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Asks the watchdog to stop the server and waits (bounded) for both to exit.
    pub(crate) fn stop(&mut self) {
        if self.exited() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.watchdog.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The watchdog did not finish: kill it; the server itself got SIGKILL from it by now
        // unless the watchdog was stuck, which leaves the reaper and parent checks.
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.stop();
        }
    }
}

/// Starts the reaper that removes `dir` after the test process and the servers are gone. With
/// `PORTCULLIS_ENVTEST_KEEP` set (non-empty) the directory is kept, for reading the logs.
pub(crate) fn spawn_reaper(dir: &Path) -> Result<(), String> {
    let keep = std::env::var("PORTCULLIS_ENVTEST_KEEP").unwrap_or_default();
    Command::new("bash")
        .arg("-c")
        .arg(REAPER)
        .arg("portcullis-envtest-reaper")
        .arg(std::process::id().to_string())
        .arg(dir)
        .arg(keep)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(|_| ())
        .map_err(|e| format!("start the temp dir reaper: {e}"))
}

/// The last `lines` lines of the file at `path` (lossy UTF-8), or a note that it is unreadable.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
