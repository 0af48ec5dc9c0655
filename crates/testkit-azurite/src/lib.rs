//! # switchboard-testkit-azurite
//!
//! Throwaway [Azurite](https://github.com/Azure/Azurite) table services for tests. Azurite is
//! the official Azure Storage emulator; `bash scripts/test.sh` installs it from npm (pinned in
//! `web/package-lock.json`). [`Azurite::start`] runs
//! `azurite-table --tableHost 127.0.0.1 --tablePort <free port> --inMemoryPersistence
//! --disableTelemetry` and waits until it accepts connections;
//! [`start_persistent`](Azurite::start_persistent) keeps the data in a temporary directory
//! instead, so that it survives [`stop`](Azurite::stop) and
//! [`start_again`](Azurite::start_again) (an in-memory emulator comes back empty, as an
//! account whose table was deleted would). Dropping the value stops the emulator and deletes
//! its directory.
//!
//! The executable is `SWITCHBOARD_AZURITE_TABLE` when set, else
//! `web/node_modules/.bin/azurite-table` in the workspace.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// The account every Azurite serves (the well-known development storage account).
pub const ACCOUNT: &str = "devstoreaccount1";
/// The well-known key of [`ACCOUNT`], published in Azurite's documentation.
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// How long a started emulator may take to accept connections.
const READY_BOUND: Duration = Duration::from_secs(30);
/// How long a stopping emulator may take to exit before it is killed.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// An Azurite table service on a loopback port; see the [crate docs](crate).
#[derive(Debug)]
pub struct Azurite {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    persistent: bool,
    child: Mutex<Option<Child>>,
}

/// The emulator of [`Azurite::shared`]: alive while some test holds it.
static SHARED: Mutex<Weak<Azurite>> = Mutex::new(Weak::new());

impl Azurite {
    /// Starts an in-memory emulator on a free port.
    ///
    /// # Panics
    ///
    /// When Azurite is not installed or does not accept connections within 30 s. The message
    /// says which, with the emulator's log.
    pub fn start() -> Self {
        Self::launch(false)
    }

    /// Starts an emulator that keeps its data in a temporary directory, so that it survives a
    /// [`stop`](Self::stop) and [`start_again`](Self::start_again).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_persistent() -> Self {
        Self::launch(true)
    }

    /// One in-memory emulator per test process, shared by the tests that run at the same
    /// time: started by the first caller, stopped when the last holder drops it. Tests keep
    /// apart by working in tables of their own.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn shared() -> Arc<Self> {
        let mut slot = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(azurite) = slot.upgrade() {
            return azurite;
        }
        let azurite = Arc::new(Self::start());
        *slot = Arc::downgrade(&azurite);
        azurite
    }

    fn launch(persistent: bool) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let bin = executable();
        assert!(
            bin.is_file(),
            "Azurite is not installed at {}: run `npm ci` in web/ (bash scripts/test.sh does), \
             or point SWITCHBOARD_AZURITE_TABLE at azurite-table",
            bin.display()
        );
        let dir = std::env::temp_dir().join(format!(
            "switchboard-azurite-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let mut azurite = Self {
            port: free_port(),
            bin,
            dir,
            persistent,
            child: Mutex::new(None),
        };
        let mut failures = Vec::new();
        for _ in 0..3 {
            match azurite.spawn() {
                Ok(()) => return azurite,
                Err(why) => failures.push(why),
            }
            azurite.port = free_port();
        }
        panic!(
            "Azurite did not start in 3 attempts:\n{}",
            failures.join("\n")
        );
    }

    /// The port the table service listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The table endpoint, `http://127.0.0.1:{port}/devstoreaccount1`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    /// A full account connection string for this emulator, with `TableEndpoint=` (the form
    /// a real storage account's connection string takes, pointed at this port).
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};\
             TableEndpoint={};",
            self.endpoint()
        )
    }

    /// The emulator's log (its standard output and error) so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the emulator process is running.
    pub fn is_running(&self) -> bool {
        let mut child = self.child();
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the emulator (SIGTERM, then SIGKILL after 10 s). Without
    /// [persistence](Self::start_persistent) its data is gone. Does nothing if it is stopped.
    pub fn stop(&self) {
        self.signal_and_wait(Signal::TERM);
    }

    /// Kills the emulator at once (SIGKILL), as a crash would.
    pub fn kill(&self) {
        self.signal_and_wait(Signal::KILL);
    }

    /// Freezes the emulator (SIGSTOP): it keeps its port and its connections but answers
    /// nothing, as a hung service or a half-open network path would, until
    /// [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal(Signal::STOP);
    }

    /// Lets a [paused](Self::pause) emulator run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::CONT);
    }

    fn signal(&self, signal: Signal) {
        if let Some(child) = self.child().as_ref()
            && let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw)
        {
            let _ = kill_process(pid, signal);
        }
    }

    /// Starts the emulator again on the same port.
    ///
    /// # Panics
    ///
    /// When it is still running, or does not accept connections within 30 s.
    pub fn start_again(&self) {
        assert!(!self.is_running(), "Azurite is still running");
        if let Err(why) = self.spawn() {
            panic!("{why}");
        }
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("azurite.log")
    }

    /// Starts the process and waits until it answers; `Err` when it exited first (its port
    /// was taken, for one).
    fn spawn(&self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("cannot open the Azurite log: {e}"));
        let err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot open the Azurite log: {e}"));
        let mut command = Command::new(&self.bin);
        command
            .args(["--tableHost", "127.0.0.1", "--tablePort"])
            .arg(self.port.to_string())
            .arg("--disableTelemetry");
        if self.persistent {
            command.arg("--location").arg(self.dir.join("data"));
        } else {
            command.arg("--inMemoryPersistence");
        }
        let child = command
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        *self.child() = Some(child);
        let deadline = Instant::now() + READY_BOUND;
        while Instant::now() < deadline {
            // Another process may hold the port for a moment (a free-port probe of a test
            // running beside this one), so only Azurite's own answer counts as ready.
            if answers_as_azurite(self.port) && self.is_running() {
                return Ok(());
            }
            if !self.is_running() {
                return Err(format!("Azurite exited at start:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "Azurite did not accept connections on port {} within {READY_BOUND:?}:\n{}",
            self.port,
            self.log()
        );
    }

    fn signal_and_wait(&self, signal: Signal) {
        let mut slot = self.child();
        let Some(mut child) = slot.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw);
            match pid {
                Some(pid) => {
                    let _ = kill_process(pid, signal);
                }
                None => {
                    let _ = child.kill();
                }
            }
            let deadline = Instant::now() + STOP_BOUND;
            while Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The port is closed once the process is gone; wait for it so a restart can bind.
        let deadline = Instant::now() + STOP_BOUND;
        while Instant::now() < deadline && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.resume();
        self.signal_and_wait(Signal::KILL);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn executable() -> PathBuf {
    if let Some(path) = std::env::var_os("SWITCHBOARD_AZURITE_TABLE") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web/node_modules/.bin/azurite-table")
}

/// Whether the server on 127.0.0.1:`port` answers an HTTP request as Azurite does (its
/// `Server` header names it).
fn answers_as_azurite(port: u16) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 1024];
    let mut read = 0;
    while read < head.len() {
        match stream.read(&mut head[read..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    String::from_utf8_lossy(&head[..read]).contains("Azurite")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_and_starts_again_on_the_same_port() {
        let azurite = Azurite::start_persistent();
        let port = azurite.port();
        assert!(azurite.is_running());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        azurite.stop();
        assert!(!azurite.is_running());
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        azurite.start_again();
        assert_eq!(azurite.port(), port);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(azurite.connection_string().contains(&format!(
            "TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;"
        )));
    }
}
