//! A client must not be able to make the server log more than a few lines, however hard it
//! tries: every warning a client can cause is rate limited.
//!
//! One test per file: the log collector is the process's global subscriber.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::{FlakyStore, TestServer};
use serde_json::json;
use switchboard::HubOptions;

/// Every log line the server writes, in memory.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<u8>>>);

impl Collected {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Collected {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn clients_cannot_make_the_server_log_more_than_a_few_lines() {
    let collected = Collected::default();
    let writer = collected.clone();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let store = Arc::new(FlakyStore::default());
    let server = TestServer::start_with(
        switchboard::chat::hub(),
        store.clone(),
        HubOptions::default()
            .with_send_queue_size(4 * 1024)
            .with_send_timeout(Duration::from_millis(200))
            .with_invocation_rate(0, 0),
    )
    .await;
    let mut alice = server.connect("alice").await;

    // 1. More clients that stop reading than the log lets through, each flooded until it is
    //    dropped.
    for _ in 0..15 {
        let _stuck = server.connect_with_small_receive_buffer("stuck").await;
        let payload = "z".repeat(16 * 1024);
        let mut n = 0;
        loop {
            let record = json!({"type":1,"invocationId":"s","target":"SendChatMessage","arguments":["stuck", payload]});
            alice.send_record(&record.to_string()).await;
            let mut told = false;
            loop {
                let message = alice.next_message().await.expect("alice stays connected");
                if message["target"] == "showErrorMessage" {
                    told = true;
                }
                if message["type"] == 3 {
                    break;
                }
            }
            n += 1;
            assert!(n < 5000, "the stuck reader is dropped");
            if told {
                break;
            }
        }
    }

    // 2. Hundreds of calls failing while the store is down.
    store.down.store(true, Ordering::SeqCst);
    for i in 0..500 {
        let completion = alice
            .invoke(&i.to_string(), "SendChatMessage", json!(["bob", "x"]))
            .await;
        assert!(completion.get("error").is_some());
    }
    store.down.store(false, Ordering::SeqCst);

    let lines = collected.lines();
    let loud: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" WARN ") || l.contains("ERROR"))
        .collect();
    // 15 dropped clients and 500 failures: each kind of line is let through a few times, the
    // rest is counted ("suppressed").
    assert!(
        loud.len() <= 30,
        "{} warnings and errors were logged:\n{}",
        loud.len(),
        loud.iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        loud.iter().any(|l| l.contains("suppressed")),
        "held-back lines are counted"
    );
}
