//! A throwaway PostgreSQL cluster on loopback for the database secrets engine: one per test
//! process, from the server programs `hack/postgres.sh` finds (PostgreSQL 15 from Debian), with
//! its own data directory and port, password authentication (so a delivered password is really
//! checked), and stopped with the test process by the same watchdog as etcd.
//!
//! As root (CI), `initdb` and `postgres` run as the `postgres` user (`setpriv`): PostgreSQL
//! refuses to run as root. Otherwise they run as the current user.
//!
//! The checks read where credentials land: [`Postgres::log_in`] connects with a delivered
//! username and password, [`Postgres::role`] reads `pg_roles` (gone after revocation,
//! `rolvaliduntil` moved after renewal).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::process::{Server, spawn_reaper};

/// The superuser Vault's database engine connects as.
pub(crate) const SUPERUSER: &str = "postgres";
/// How long the server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The running cluster.
pub(crate) struct Postgres {
    port: u16,
    password: String,
    bin: PathBuf,
    dir: PathBuf,
    startup: Duration,
    _server: Server,
}

/// A role as `pg_roles` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgRole {
    pub name: String,
    pub can_login: bool,
    /// `rolvaliduntil` as PostgreSQL prints it (`None`: no expiry).
    pub valid_until: Option<String>,
}

/// The cluster of this test process, started on first use.
pub(crate) fn postgres() -> &'static Postgres {
    static POSTGRES: OnceLock<Result<Postgres, String>> = OnceLock::new();
    match POSTGRES.get_or_init(start) {
        Ok(pg) => pg,
        Err(message) => panic!("postgres: the test cluster did not start:\n{message}"),
    }
}

impl Postgres {
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's password.
    pub(crate) fn password(&self) -> &str {
        &self.password
    }

    /// How long `hack/postgres.sh`, `initdb` and the start took.
    pub(crate) fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The connection URL template of Vault's `postgresql-database-plugin`.
    pub(crate) fn connection_url(&self) -> String {
        format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Runs `sql` as `user` with `password` over TCP; the single-column rows, or psql's error.
    pub(crate) fn query_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        psql(&self.bin, self.port, user, password, sql)
    }

    /// Logs in as `user` with `password`: `Ok` with `current_user`, or PostgreSQL's refusal
    /// (`password authentication failed`, `role ... does not exist`, an expired `VALID UNTIL`).
    pub(crate) fn log_in(&self, user: &str, password: &str) -> Result<String, String> {
        self.query_as(user, password, "SELECT current_user")
    }

    /// Runs `sql` as the superuser; panics on an error.
    pub(crate) fn query(&self, sql: &str) -> String {
        self.query_as(SUPERUSER, &self.password, sql)
            .unwrap_or_else(|e| panic!("postgres: {sql}: {e}"))
    }

    /// The role `name` in `pg_roles`, if it exists.
    pub(crate) fn role(&self, name: &str) -> Option<PgRole> {
        let quoted = name.replace('\'', "''");
        let row = self.query(&format!(
            "SELECT rolname || '|' || rolcanlogin || '|' || coalesce(rolvaliduntil::text, '') \
             FROM pg_roles WHERE rolname = '{quoted}'"
        ));
        let mut fields = row.lines().next()?.splitn(3, '|');
        let name = fields.next()?.to_string();
        let can_login = fields.next()? == "t";
        let valid_until = fields.next().filter(|v| !v.is_empty()).map(String::from);
        Some(PgRole {
            name,
            can_login,
            valid_until,
        })
    }

    /// The names of the roles that start with `prefix`.
    pub(crate) fn roles_starting_with(&self, prefix: &str) -> Vec<String> {
        let pattern = prefix.replace('\'', "''").replace('_', "\\_");
        self.query(&format!(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE '{pattern}%' ORDER BY 1"
        ))
        .lines()
        .map(String::from)
        .collect()
    }

    /// The data directory and log (`postgres.log`).
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

fn start() -> Result<Postgres, String> {
    let begin = Instant::now();
    let bin = bin_dir()?;
    let tempdir = tempfile::Builder::new()
        .prefix("portcullis-postgres-")
        .tempdir()
        .map_err(|e| format!("create a temp dir: {e}"))?;
    // The reaper removes it after the test process and the server are gone.
    let dir = tempdir.keep();
    spawn_reaper(&dir)?;
    let as_postgres = running_as_root();
    let data = dir.join("data");
    std::fs::create_dir(&data).map_err(|e| format!("mkdir {}: {e}", data.display()))?;
    let password = random_hex(16)?;
    let pwfile = dir.join("pwfile");
    std::fs::write(&pwfile, format!("{password}\n"))
        .map_err(|e| format!("write {}: {e}", pwfile.display()))?;
    if as_postgres {
        // The postgres user must reach its data directory and read the password file.
        chmod(&dir, "0755")?;
        chmod(&pwfile, "0644")?;
        let status = Command::new("chown")
            .args([SUPERUSER, &data.display().to_string()])
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !status.success() {
            return Err(format!(
                "chown {SUPERUSER} {}: {status} (is there a postgres user? hack/postgres.sh installs Debian's postgresql)",
                data.display()
            ));
        }
    }
    let (program, mut args) = command(as_postgres, &bin.join("initdb"));
    args.extend([
        format!("--pgdata={}", data.display()),
        format!("--username={SUPERUSER}"),
        "--auth=scram-sha-256".into(),
        format!("--pwfile={}", pwfile.display()),
        "--no-sync".into(),
        "--no-instructions".into(),
    ]);
    let output = Command::new(&program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run initdb: {e}"))?;
    let _ = std::fs::remove_file(&pwfile);
    if !output.status.success() {
        return Err(format!(
            "initdb failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let mut failures = Vec::new();
    for _ in 0..3 {
        let port = free_port()?;
        let (program, mut args) = command(as_postgres, &bin.join("postgres"));
        args.extend([
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-k".into(),
            data.display().to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "max_connections=200".into(),
        ]);
        // SIGINT is PostgreSQL's fast shutdown; SIGTERM would wait for Vault's pooled
        // connections to close.
        let mut server = Server::spawn_stopped_by("postgres", &dir, &program, &args, "INT")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let ready = loop {
            if server.exited() {
                break Err(server.log_tail(20));
            }
            match psql(&bin, port, SUPERUSER, &password, "SELECT 1") {
                Ok(_) => break Ok(()),
                Err(e) if Instant::now() > deadline => break Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        match ready {
            Ok(()) => {
                server.detach();
                let startup = begin.elapsed();
                eprintln!(
                    "postgres: test cluster on 127.0.0.1:{port} up in {:.1}s (data and log in {})",
                    startup.as_secs_f64(),
                    dir.display()
                );
                return Ok(Postgres {
                    port,
                    password,
                    bin,
                    dir,
                    startup,
                    _server: server,
                });
            }
            Err(log) => {
                let retry = log.contains("already in use");
                failures.push(format!("port {port}: {log}"));
                server.stop();
                if !retry {
                    break;
                }
            }
        }
    }
    Err(failures.join("\n"))
}

/// Runs `sql` with `psql` as `user` with `password` on `127.0.0.1:port`.
fn psql(bin: &Path, port: u16, user: &str, password: &str, sql: &str) -> Result<String, String> {
    let output = Command::new(bin.join("psql"))
        .args([
            "--no-psqlrc",
            "--tuples-only",
            "--no-align",
            "--set=ON_ERROR_STOP=1",
            "--host=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--username={user}"))
        .args(["--dbname=postgres", "--command", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run psql: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

/// Runs `bash hack/postgres.sh` and returns the directory it prints.
fn bin_dir() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("bash")
        .arg(root.join("hack/postgres.sh"))
        .current_dir(root)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run hack/postgres.sh: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "hack/postgres.sh failed ({}); its messages are on stderr above",
            output.status
        ));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    for program in ["initdb", "postgres", "psql"] {
        if !dir.join(program).is_file() {
            return Err(format!(
                "hack/postgres.sh printed {}, which has no {program}",
                dir.display()
            ));
        }
    }
    Ok(dir)
}

pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program` as itself, or through `setpriv` as the postgres user when running as root.
fn command(as_postgres: bool, program: &Path) -> (PathBuf, Vec<String>) {
    if as_postgres {
        (
            PathBuf::from("setpriv"),
            vec![
                format!("--reuid={SUPERUSER}"),
                format!("--regid={SUPERUSER}"),
                "--clear-groups".into(),
                "--".into(),
                program.display().to_string(),
            ],
        )
    } else {
        (program.to_path_buf(), Vec::new())
    }
}

fn chmod(path: &Path, mode: &str) -> Result<(), String> {
    let status = Command::new("chmod")
        .arg(mode)
        .arg(path)
        .status()
        .map_err(|e| format!("chmod: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("chmod {mode} {}: {status}", path.display()))
}

pub(crate) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("bind 127.0.0.1:0: {e}"))
}

/// `bytes` random bytes from the kernel, hex-encoded.
pub(crate) fn random_hex(bytes: usize) -> Result<String, String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| format!("read /dev/urandom: {e}"))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}
