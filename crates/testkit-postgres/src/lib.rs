//! # switchboard-testkit-postgres
//!
//! Throwaway PostgreSQL servers for tests. [`PostgresServer::start`] initialises a cluster in
//! a temporary directory and runs it on a free port of 127.0.0.1, with trust authentication
//! for local connections and `fsync` off (the data is thrown away anyway). The server can be
//! stopped ([`stop`](PostgresServer::stop)), crashed
//! ([`stop_immediately`](PostgresServer::stop_immediately)) and brought back on the same port
//! with its data ([`start_again`](PostgresServer::start_again)), which is what outage and
//! restart tests need. Dropping the value stops the server and deletes the cluster.
//!
//! PostgreSQL refuses to run as root. When the tests run as root, the cluster belongs to the
//! `postgres` system user that Debian's `postgresql` package creates, and `initdb` and
//! `postgres` run as that user. The binaries are found with `pg_config --bindir`, in
//! `/usr/lib/postgresql/<version>/bin` (newest first), or in `SWITCHBOARD_PG_BIN`.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// How long a started server may take to accept connections.
const READY_BOUND: Duration = Duration::from_secs(30);
/// How long a stopping server may take to exit before it is killed.
const STOP_BOUND: Duration = Duration::from_secs(20);

/// A PostgreSQL server in a temporary directory; see the [crate docs](crate).
#[derive(Debug)]
pub struct PostgresServer {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    owner: Option<(u32, u32)>,
    settings: Vec<(String, String)>,
    child: Mutex<Option<Child>>,
}

/// The server of [`PostgresServer::shared`]: alive while some test holds it.
static SHARED: Mutex<Weak<PostgresServer>> = Mutex::new(Weak::new());

impl PostgresServer {
    /// Initialises a cluster and starts it on a free port.
    ///
    /// # Panics
    ///
    /// When PostgreSQL is not installed, `initdb` fails, or the server does not accept
    /// connections within 30 s. The message says which, with the server's log.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// As [`start`](Self::start), with extra server settings (`-c name=value`), for example
    /// `&[("fsync", "on"), ("synchronous_commit", "on")]` for benchmarks that must pay for
    /// durability.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_with(settings: &[(&str, &str)]) -> Self {
        let bin = bin_dir();
        let owner = cluster_owner();
        let dir = temp_dir();
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("cannot give {} to postgres: {e}", dir.display()));
        }
        let mut all = vec![
            ("listen_addresses".to_owned(), "127.0.0.1".to_owned()),
            ("unix_socket_directories".to_owned(), path_text(&dir)),
            ("fsync".to_owned(), "off".to_owned()),
            ("full_page_writes".to_owned(), "off".to_owned()),
            ("max_connections".to_owned(), "400".to_owned()),
            ("shared_buffers".to_owned(), "64MB".to_owned()),
        ];
        for (name, value) in settings {
            all.retain(|(n, _)| n != name);
            all.push(((*name).to_owned(), (*value).to_owned()));
        }
        let server = Self {
            port: free_port(),
            bin,
            dir,
            owner,
            settings: all,
            child: Mutex::new(None),
        };
        server.initdb();
        server.spawn();
        server
    }

    /// One server per test process, shared by the tests that run at the same time: started
    /// by the first caller, stopped when the last holder drops it. Tests keep apart by
    /// working in their own schema or database.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn shared() -> Arc<Self> {
        let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(server) = slot.upgrade() {
            return server;
        }
        let server = Arc::new(Self::start());
        *slot = Arc::downgrade(&server);
        server
    }

    /// `postgres://postgres@127.0.0.1:{port}/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of another database on this server (create it first, for example with
    /// `CREATE DATABASE`).
    pub fn url_for(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the server process is running.
    pub fn is_running(&self) -> bool {
        let mut child = self.child();
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    /// Fast shutdown (SIGINT): clients are disconnected, a checkpoint is written, the data is
    /// kept for [`start_again`](Self::start_again). Idempotent.
    pub fn stop(&self) {
        self.signal_and_wait(Signal::INT);
    }

    /// Immediate shutdown (SIGQUIT), like a crash: no checkpoint, and the next start runs
    /// crash recovery. Idempotent.
    pub fn stop_immediately(&self) {
        self.signal_and_wait(Signal::QUIT);
    }

    /// Starts the stopped server again on the same port, with its data. Does nothing while
    /// it runs.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_again(&self) {
        if !self.is_running() {
            self.spawn();
        }
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    /// Runs one SQL script with `psql` as the superuser (stops at the first error), for test
    /// set-up that needs no driver.
    ///
    /// # Errors
    ///
    /// `psql`'s error output when the script fails.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, String> {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", database, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql: {e}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(self.bin.join(program));
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        command.stdin(Stdio::null());
        command
    }

    fn initdb(&self) {
        let data = self.dir.join("data");
        let output = self
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb from {}: {e}", self.bin.display()));
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn spawn(&self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .unwrap_or_else(|e| panic!("cannot open the server log: {e}"));
        if let Some((uid, gid)) = self.owner {
            let _ = std::os::unix::fs::chown(self.log_file(), Some(uid), Some(gid));
        }
        let stderr = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot share the server log: {e}"));
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string());
        for (name, value) in &self.settings {
            command.arg("-c").arg(format!("{name}={value}"));
        }
        let child = command
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start postgres: {e}"));
        *self.child() = Some(child);
        self.wait_ready();
    }

    /// Waits (bounded) until `pg_isready` says the server accepts connections.
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_BOUND;
        loop {
            let ready = TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Command::new(self.bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-U", "postgres"])
                    .arg("-p")
                    .arg(self.port.to_string())
                    .stdin(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success());
            if ready {
                return;
            }
            if !self.is_running() || Instant::now() >= deadline {
                let log = fs::read_to_string(self.log_file()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                self.signal_and_wait(Signal::QUIT);
                panic!(
                    "PostgreSQL on port {} did not become ready within {READY_BOUND:?}; its log ends:\n{}",
                    self.port,
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal_and_wait(&self, signal: Signal) {
        let Some(mut child) = self.child().take() else {
            return;
        };
        let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
        if let Some(pid) = pid {
            let _ = kill_process(pid, signal);
        }
        let deadline = Instant::now() + STOP_BOUND;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        // Backends leave when the postmaster is gone; wait until the port is free again so
        // that a restart can bind it.
        let deadline = Instant::now() + STOP_BOUND;
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.signal_and_wait(Signal::QUIT);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Where PostgreSQL's server binaries are.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SWITCHBOARD_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        candidates.push(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim(),
        ));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    candidates.extend(versions.into_iter().map(|(_, dir)| dir));
    candidates
        .into_iter()
        .find(|dir| dir.join("postgres").is_file() && dir.join("initdb").is_file())
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL's server is not installed; install Debian's postgresql \
                 (apt-get install -y postgresql) or set SWITCHBOARD_PG_BIN to its bin directory"
            )
        })
}

/// `Some((uid, gid))` of the `postgres` user when running as root (PostgreSQL refuses root).
fn cluster_owner() -> Option<(u32, u32)> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let entry = passwd
        .lines()
        .find(|line| line.starts_with("postgres:"))
        .unwrap_or_else(|| {
            panic!(
                "running as root, and there is no `postgres` user to run PostgreSQL as; \
                 install Debian's postgresql package, which creates it"
            )
        });
    let fields: Vec<&str> = entry.split(':').collect();
    let id = |i: usize| fields.get(i).and_then(|f| f.parse::<u32>().ok());
    match (id(2), id(3)) {
        (Some(uid), Some(gid)) => Some((uid, gid)),
        _ => panic!("cannot read the postgres user's ids from /etc/passwd"),
    }
}

/// A fresh directory name under the system's temporary directory.
fn temp_dir() -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "switchboard-pg-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_crashes_and_keeps_its_data() {
        let server = PostgresServer::start();
        server
            .psql(
                "postgres",
                "CREATE TABLE kept (n int); INSERT INTO kept VALUES (7);",
            )
            .expect("the table is created");
        server.stop();
        assert!(!server.is_running());
        assert!(
            server.psql("postgres", "SELECT 1").is_err(),
            "a stopped server answers nothing"
        );
        server.start_again();
        assert_eq!(
            server
                .psql("postgres", "SELECT n FROM kept")
                .expect("reads")
                .trim(),
            "7"
        );
        server.stop_immediately();
        server.start_again();
        assert_eq!(
            server
                .psql("postgres", "SELECT n FROM kept")
                .expect("reads")
                .trim(),
            "7"
        );
        let dir = server.data_dir().to_path_buf();
        drop(server);
        assert!(!dir.exists(), "the cluster is deleted");
    }

    #[test]
    fn shared_servers_are_one_while_held() {
        let a = PostgresServer::shared();
        let b = PostgresServer::shared();
        assert_eq!(a.port(), b.port());
    }
}
