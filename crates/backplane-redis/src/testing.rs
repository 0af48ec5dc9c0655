//! Throwaway `redis-server` processes for tests (cargo feature `testing`).
//!
//! [`RedisServer::start`] runs `redis-server` on a free local port with persistence off, and
//! kills it when dropped. [`RedisServer::restart`] brings it back on the same port, empty,
//! like a Redis restarted without persistence.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How long a started server may take to answer `PING`.
const READY_BOUND: Duration = Duration::from_secs(10);

/// A `redis-server` child process.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    password: Option<String>,
    tls: Option<Tls>,
    child: Mutex<Option<Child>>,
}

/// The files of a TLS server: a private CA and a certificate for 127.0.0.1 signed by it.
#[derive(Debug)]
struct Tls {
    dir: PathBuf,
    ca: Vec<u8>,
}

impl Tls {
    /// Makes a CA and a server certificate with the `openssl` command.
    fn generate(port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-redis-tls-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the certificates");
        let run = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap_or_else(|e| panic!("cannot run openssl (install Debian's openssl): {e}"));
            assert!(status.success(), "openssl {args:?} failed");
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=switchboard test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ]);
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")
            .expect("writes the extension file");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ]);
        let ca = std::fs::read(dir.join("ca.crt")).expect("reads the CA certificate");
        Self { dir, ca }
    }

    fn file(&self, name: &str) -> String {
        path_text(&self.dir.join(name))
    }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl RedisServer {
    /// Starts a server on a free port of 127.0.0.1, without persistence.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not answer within 10 s.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// As [`start`](Self::start), with `--requirepass password`.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn start_with_password(password: &str) -> Self {
        Self::launch(Some(password.to_owned()))
    }

    /// As [`start`](Self::start), serving TLS only (with a fresh private CA, see
    /// [`tls_root_certificate`](Self::tls_root_certificate)); [`url`](Self::url) is
    /// `rediss://…`.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start), and when `openssl` cannot make the certificates.
    pub fn start_tls() -> Self {
        let port = free_port();
        let server = Self {
            port,
            password: None,
            tls: Some(Tls::generate(port)),
            child: Mutex::new(None),
        };
        server.spawn();
        server
    }

    /// The PEM certificate of the CA a [`start_tls`](Self::start_tls) server's certificate
    /// is signed by.
    pub fn tls_root_certificate(&self) -> Option<Vec<u8>> {
        self.tls.as_ref().map(|tls| tls.ca.clone())
    }

    fn launch(password: Option<String>) -> Self {
        let server = Self {
            port: free_port(),
            password,
            tls: None,
            child: Mutex::new(None),
        };
        server.spawn();
        server
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn spawn(&self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.arg("--port").arg(self.port.to_string()),
            Some(tls) => command
                .arg("--port")
                .arg("0")
                .arg("--tls-port")
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(tls.file("server.crt"))
                .arg("--tls-key-file")
                .arg(tls.file("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(tls.file("ca.crt"))
                .arg("--tls-auth-clients")
                .arg("no"),
        };
        command
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(password) = &self.password {
            command.arg("--requirepass").arg(password);
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "`redis-server` is not installed; install Debian's redis-server \
                 (apt-get install -y redis-server) to run these tests"
            ),
            Err(e) => panic!("cannot start redis-server: {e}"),
        };
        *self.child() = Some(child);
        self.wait_ready();
    }

    /// Waits (bounded) until the server answers `PING` (or asks for a password).
    fn wait_ready(&self) {
        let deadline = Instant::now() + READY_BOUND;
        loop {
            if self.answers_ping() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer within {READY_BOUND:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn answers_ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        if self.tls.is_some() {
            // Redis listens once it is ready; the handshake is the client's to test.
            return true;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut reply = [0u8; 64];
        match stream.read(&mut reply) {
            Ok(n) => {
                let reply = &reply[..n];
                reply.starts_with(b"+PONG") || reply.starts_with(b"-NOAUTH")
            }
            Err(_) => false,
        }
    }

    /// `redis://127.0.0.1:{port}/`, with the password when there is one
    /// (`rediss://…` for a TLS server).
    pub fn url(&self) -> String {
        if self.tls.is_some() {
            return format!("rediss://127.0.0.1:{}/", self.port);
        }
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}/", self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server and waits for it to exit. Idempotent.
    pub fn stop(&self) {
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server and starts it again on the same port, with no data.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    /// Sends one command on a fresh connection and answers Redis's reply, for tests that
    /// need to reach behind the backplane (`CLIENT PAUSE`, `SCAN`, …).
    ///
    /// # Errors
    ///
    /// When the server cannot be reached or refuses the command.
    pub async fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = self.client()?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args.first().copied().unwrap_or("PING"));
        for arg in args.iter().skip(1) {
            cmd.arg(*arg);
        }
        cmd.query_async(&mut conn).await
    }

    /// Every key whose name starts with `prefix` followed by `:`, found with `SCAN` (a test
    /// helper; the backplane itself never scans).
    ///
    /// # Errors
    ///
    /// When the server cannot be reached.
    pub async fn keys_under(&self, prefix: &str) -> redis::RedisResult<Vec<String>> {
        let client = self.client()?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cursor: u64 = 0;
        let mut keys = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Deletes every key under `prefix` (see [`keys_under`](Self::keys_under)).
    ///
    /// # Errors
    ///
    /// When the server cannot be reached.
    pub async fn delete_prefix(&self, prefix: &str) -> redis::RedisResult<()> {
        let keys = self.keys_under(prefix).await?;
        if keys.is_empty() {
            return Ok(());
        }
        let client = self.client()?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        for chunk in keys.chunks(500) {
            redis::cmd("DEL")
                .arg(chunk)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }
}

impl RedisServer {
    fn client(&self) -> redis::RedisResult<redis::Client> {
        match &self.tls {
            None => redis::Client::open(self.url()),
            Some(tls) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(tls.ca.clone()),
                },
            ),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free local port")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(tls) = &self.tls {
            let _ = std::fs::remove_dir_all(&tls.dir);
        }
    }
}
