//! The azure store under the real server, on Azurite (the official Azure Storage emulator,
//! started by the tests on free loopback ports): two nodes on one table delivering to a user
//! connected to both through a backplane; an emulator that goes away and comes back under a
//! running hub, with its data and without it; `switchboard serve --store azure` processes
//! killed with SIGKILL (their users stop counting when the lease expires and their entities
//! are swept from the table); and the `users` and `connections` commands and their errors.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::{
    PATIENCE, ServerProcess, TestServer, chat, check_outage_answers, eventually, free_port,
    not_connected, send_chat,
};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use switchboard::HubOptions;
use switchboard_azure::{AzureConfig, AzureStore};
use switchboard_core::testkit::{node, user};
use switchboard_core::{Backplane, ConnectionStore, PageRequest};
use switchboard_redis::testing::RedisServer;
use switchboard_redis::{RedisBackplane, RedisConfig};
use switchboard_testkit_azurite::{ACCOUNT, ACCOUNT_KEY, Azurite};

/// The lease of every node these tests start.
const LEASE_SECONDS: u64 = 2;

/// A `switchboard serve --store azure` process on `table` of `azurite`.
async fn azure_server(azurite: &Azurite, table: &str) -> ServerProcess {
    ServerProcess::start(
        &["--store", "azure", "--azure-table", table],
        &[(
            "SWITCHBOARD_AZURE_CONNECTION_STRING",
            azurite.connection_string(),
        )],
        LEASE_SECONDS,
    )
    .await
}

/// A configuration for `table` on `azurite` that gives up quickly, so that an emulator that
/// went away is noticed within the hub's store timeout.
fn config(azurite: &Azurite, table: &str) -> AzureConfig {
    AzureConfig::from_connection_string(&azurite.connection_string())
        .expect("Azurite's connection string")
        .with_table(table)
        .expect("a valid table name")
        .with_request_timeout(Duration::from_millis(500))
        .with_retry_budget(Duration::from_secs(1))
}

async fn open_store(azurite: &Azurite, table: &str) -> Arc<AzureStore> {
    Arc::new(
        AzureStore::open(config(azurite, table))
            .await
            .expect("the store opens on Azurite"),
    )
}

/// The connected users as `store` lists them, or `None` when it cannot answer.
async fn listed(store: &dyn ConnectionStore) -> Option<Vec<String>> {
    let page = store.users(PageRequest::first(100)).await.ok()?;
    Some(page.users.iter().map(|u| u.as_str().to_owned()).collect())
}

/// The ids of `who`'s live connections, sorted, or `None` when the store cannot answer.
async fn connection_ids(store: &dyn ConnectionStore, who: &str) -> Option<Vec<String>> {
    let records = store.connections(&user(who)).await.ok()?;
    let mut ids: Vec<String> = records.iter().map(|r| r.id().as_str().to_owned()).collect();
    ids.sort();
    Some(ids)
}

// --- The table itself, read over Azurite's REST API (Shared Key Lite). ---

/// `time` as an RFC 1123 date (`Wed, 02 Dec 2026 10:00:00 GMT`), as `x-ms-date` wants it.
fn http_date(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let days = i64::try_from(secs / 86_400).expect("a sane date");
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days.rem_euclid(7)) as usize];
    let month_name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!(
        "{weekday}, {day:02} {month_name} {year} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Percent-encodes an OData filter for a query string.
fn encode(filter: &str) -> String {
    filter
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The body of an HTTP/1.1 response, de-chunked when it came in chunks.
fn response_body(head: &str, body: &[u8]) -> Vec<u8> {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_vec();
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk size line");
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("an ASCII chunk size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("a hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Every entity of `table` matching `filter`, read straight from the emulator whatever the
/// leases say; empty when the table does not exist.
fn entities(azurite: &Azurite, table: &str, filter: &str) -> Vec<Value> {
    let date = http_date(SystemTime::now());
    let resource = format!("/{ACCOUNT}/{ACCOUNT}/{table}()");
    let key = base64::engine::general_purpose::STANDARD
        .decode(ACCOUNT_KEY)
        .expect("the account key is base64");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{date}\n{resource}").as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let request = format!(
        "GET /{ACCOUNT}/{table}()?$filter={} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\n\
         x-ms-date: {date}\r\nx-ms-version: 2019-02-02\r\n\
         accept: application/json;odata=nometadata\r\n\
         authorization: SharedKeyLite {ACCOUNT}:{signature}\r\nconnection: close\r\n\r\n",
        encode(filter),
        azurite.port()
    );
    let mut stream = TcpStream::connect(("127.0.0.1", azurite.port())).expect("Azurite is up");
    stream
        .set_read_timeout(Some(PATIENCE))
        .expect("a read timeout");
    stream.write_all(request.as_bytes()).expect("the request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("the response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let body = response_body(&head, &response[split + 4..]);
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(
        status,
        200,
        "querying {table}: {head}\n{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        !head.to_ascii_lowercase().contains("x-ms-continuation"),
        "more than one page of entities: {head}"
    );
    let parsed: Value = serde_json::from_slice(&body).expect("a JSON body");
    parsed["value"].as_array().cloned().expect("a value array")
}

fn entities_of(azurite: &Azurite, table: &str, who: &str) -> Vec<Value> {
    entities(azurite, table, &format!("User eq '{who}'"))
}

// --- Two nodes in one process. ---

fn backplane(redis: &RedisServer) -> Arc<dyn Backplane> {
    let config = RedisConfig::new(redis.url()).with_alive_ttl(Duration::from_secs(LEASE_SECONDS));
    Arc::new(RedisBackplane::new(config).expect("a valid configuration"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_table_deliver_to_a_user_connected_to_both() {
    let azurite = Azurite::start();
    let redis = RedisServer::start();
    let options = HubOptions::default().with_lease(Duration::from_secs(LEASE_SECONDS));
    // One store per node, as two processes would have.
    let a = TestServer::start_node(
        node("aznode-a"),
        open_store(&azurite, "twonodes").await,
        Some(backplane(&redis)),
        options.clone(),
    )
    .await;
    let b = TestServer::start_node(
        node("aznode-b"),
        open_store(&azurite, "twonodes").await,
        Some(backplane(&redis)),
        options,
    )
    .await;
    for server in [&a, &b] {
        eventually("the node is ready", || async {
            server.hub.readiness().is_ready()
        })
        .await;
    }
    let mut alice_a = a.connect("alice").await;
    let mut alice_b = b.connect("alice").await;
    let mut bob = b.connect("bob").await;

    // A third view of the table sees both of alice's connections, one on each node.
    let observer = open_store(&azurite, "twonodes").await;
    let records = observer
        .connections(&user("alice"))
        .await
        .expect("a lookup");
    let mut nodes: Vec<String> = records
        .iter()
        .map(|r| r.node().as_str().to_owned())
        .collect();
    nodes.sort();
    assert_eq!(nodes.len(), 2, "{records:?}");
    assert!(
        nodes[0].starts_with("aznode-a") && nodes[1].starts_with("aznode-b"),
        "{nodes:?}"
    );
    assert_eq!(
        listed(observer.as_ref()).await,
        Some(vec!["alice".to_owned(), "bob".to_owned()])
    );
    assert_eq!(entities_of(&azurite, "twonodes", "alice").len(), 2);

    for i in 0..5 {
        let answer = send_chat(&mut bob, &i.to_string(), "alice", &format!("hi {i}")).await;
        assert_eq!(answer.len(), 1, "only the completion: {answer:?}");
    }
    for client in [&mut alice_a, &mut alice_b] {
        for i in 0..5 {
            assert_eq!(
                client.next_message().await,
                Some(chat(&format!("bob: hi {i}")))
            );
        }
    }
    // And back: alice on node A reaches bob on node B.
    let answer = send_chat(&mut alice_a, "back", "bob", "hello").await;
    assert_eq!(answer.len(), 1, "only the completion: {answer:?}");
    assert_eq!(bob.next_message().await, Some(chat("alice: hello")));

    // A connection that closes leaves the table.
    drop(alice_b.ws.close(None).await);
    eventually("alice's connection on node B is removed", || async {
        entities_of(&azurite, "twonodes", "alice").len() == 1
    })
    .await;
    let answer = send_chat(&mut bob, "after", "alice", "still one").await;
    assert_eq!(answer.len(), 1, "only the completion: {answer:?}");
    assert_eq!(alice_a.next_message().await, Some(chat("bob: still one")));
}

// --- An emulator that goes away under a running hub. ---

async fn outage_is_answered_fast_and_reconciled(azurite: Azurite) {
    let table = "outage";
    let store = open_store(&azurite, table).await;
    let options = HubOptions::default()
        .with_lease(Duration::from_secs(3))
        .with_store_timeout(Duration::from_secs(2));
    let server = TestServer::start_node(node("azoutage"), store.clone(), None, options).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let leaving = server.connect("dave").await;
    assert_eq!(
        send_chat(&mut bob, "0", "alice", "before").await.len(),
        1,
        "only the completion"
    );
    assert_eq!(alice.next_message().await, Some(chat("bob: before")));
    let alice_ids = connection_ids(store.as_ref(), "alice")
        .await
        .expect("a lookup");
    assert_eq!(alice_ids.len(), 1, "{alice_ids:?}");
    assert_eq!(entities_of(&azurite, table, "dave").len(), 1);

    azurite.stop();
    check_outage_answers(
        &server,
        &mut bob,
        "alice",
        leaving,
        "erin",
        Duration::from_secs(5),
    )
    .await;
    azurite.start_again();
    // Within the lease window the table holds exactly the open connections again: dave's
    // pending removal is retried, and an emulator that lost its data (and table) gets
    // alice's and bob's records back from the node.
    eventually(
        "the table matches the node once the emulator is back",
        || async {
            listed(store.as_ref()).await == Some(vec!["alice".to_owned(), "bob".to_owned()])
                && connection_ids(store.as_ref(), "alice").await.as_ref() == Some(&alice_ids)
                && connection_ids(store.as_ref(), "dave").await == Some(Vec::new())
        },
    )
    .await;
    assert!(entities_of(&azurite, table, "dave").is_empty());
    assert_eq!(entities_of(&azurite, table, "bob").len(), 1);
    assert_eq!(
        send_chat(&mut bob, "2", "alice", "after").await.len(),
        1,
        "only the completion"
    );
    assert_eq!(alice.next_message().await, Some(chat("bob: after")));
    let mut erin = server.connect("erin").await;
    assert_eq!(
        send_chat(&mut erin, "3", "bob", "hello").await.len(),
        1,
        "only the completion"
    );
    assert_eq!(bob.next_message().await, Some(chat("erin: hello")));
    assert_eq!(
        listed(store.as_ref()).await,
        Some(vec![
            "alice".to_owned(),
            "bob".to_owned(),
            "erin".to_owned()
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_outage_with_its_data_kept_fails_fast_and_is_reconciled() {
    outage_is_answered_fast_and_reconciled(Azurite::start_persistent()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_restarted_empty_gets_the_table_and_the_live_connections_back() {
    outage_is_answered_fast_and_reconciled(Azurite::start()).await;
}

// --- `switchboard serve --store azure` processes. ---

/// Runs `switchboard <args> --store azure --azure-connection-string … --json`.
fn run_operator(azurite: &Azurite, table: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .args(["--store", "azure", "--azure-table", table, "--json"])
        .args(["--azure-connection-string", &azurite.connection_string()])
        .output()
        .expect("the command runs")
}

/// `switchboard <args>` against `table`, its JSON answer.
fn operator(azurite: &Azurite, table: &str, args: &[&str]) -> Value {
    let output = run_operator(azurite, table, args);
    assert!(
        output.status.success(),
        "switchboard {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

/// Polls `users` until it answers `expected`, then checks it keeps answering that for a
/// little while (an expired node's users are never reported again).
async fn users_become(azurite: &Azurite, table: &str, expected: Value, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if operator(azurite, table, &["users"]) == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "users never became {expected}: {}",
            operator(azurite, table, &["users"])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        assert_eq!(
            operator(azurite, table, &["users"]),
            expected,
            "users flipped back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_leaves_no_ghost_users_and_the_other_node_sweeps_its_entities() {
    let azurite = Azurite::start();
    let table = "killed";
    let a = azure_server(&azurite, table).await;
    let mut b = azure_server(&azurite, table).await;
    let mut alice = a.connect("alice").await;
    let _bob = b.connect("bob").await;
    let _bob2 = b.connect("bob").await;
    assert_eq!(
        operator(&azurite, table, &["users"]),
        json!(["alice", "bob"])
    );
    let connections = operator(&azurite, table, &["connections", "bob"]);
    let rows = connections.as_array().expect("an array");
    assert_eq!(rows.len(), 2, "{connections}");
    for row in rows {
        for field in ["id", "node", "user_agent", "connected_at"] {
            assert!(row.get(field).is_some(), "{field} missing in {row}");
        }
        assert!(
            row["id"].as_str().is_some_and(|id| id.contains('~')),
            "{row}"
        );
    }
    assert_eq!(entities_of(&azurite, table, "bob").len(), 2);
    // alice on node A finds bob on node B through the table (no backplane: the message is
    // reported, not delivered, but bob counts as connected).
    let first = send_chat(&mut alice, "1", "bob", "hi").await;
    assert_ne!(first[0], not_connected("bob"), "{first:?}");

    b.kill();
    let killed_at = Instant::now();
    // The entities outlive the process until its lease runs out; then they stop counting at
    // once, before any sweep.
    users_become(
        &azurite,
        table,
        json!(["alice"]),
        Duration::from_secs(LEASE_SECONDS + 3),
    )
    .await;
    assert!(
        killed_at.elapsed() >= Duration::from_millis(LEASE_SECONDS * 1000 / 3),
        "the entities counted for a while after the kill"
    );
    assert_eq!(
        operator(&azurite, table, &["connections", "bob"]),
        json!([])
    );
    for i in 0..3 {
        let answer = send_chat(&mut alice, &format!("after{i}"), "bob", "still there?").await;
        assert_eq!(answer[0], not_connected("bob"), "{answer:?}");
    }
    // Node A's maintenance sweeps B's entities out of the table.
    let deadline = Instant::now() + Duration::from_secs(LEASE_SECONDS * 3 + 5);
    loop {
        let left = entities_of(&azurite, table, "bob");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node B's entities were never swept: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(entities_of(&azurite, table, "alice").len(), 1);
    // A second store on the same table agrees.
    let observer = open_store(&azurite, table).await;
    assert_eq!(
        listed(observer.as_ref()).await,
        Some(vec!["alice".to_owned()])
    );
    drop(a);
}

#[test]
fn operators_are_told_what_is_missing_and_never_shown_the_key() {
    let missing = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["users", "--store", "azure"])
        .env_remove("SWITCHBOARD_AZURE_CONNECTION_STRING")
        .output()
        .expect("the command runs");
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("--azure-connection-string")
            && stderr.contains("UseDevelopmentStorage=true"),
        "{stderr}"
    );

    // A connection string without an endpoint or with a bad table: the error names the
    // problem, not the key.
    let key = "c2VjcmV0LWtleS10aGF0LW11c3Qtbm90LWxlYWs=";
    let broken = format!("DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={key}");
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["connections", "alice", "--store", "azure"])
        .env("SWITCHBOARD_AZURE_CONNECTION_STRING", &broken)
        .args(["--azure-table", "no"])
        .output()
        .expect("the command runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--azure-"), "{stderr}");
    assert!(!stderr.contains(key), "the key leaked: {stderr}");

    // --help never shows the value from the environment.
    let help = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--help"])
        .env("SWITCHBOARD_AZURE_CONNECTION_STRING", &broken)
        .output()
        .expect("the command runs");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--azure-connection-string"), "{help}");
    assert!(!help.contains(key), "the key leaked into --help: {help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_store_it_cannot_reach_without_printing_the_key() {
    // Nothing listens on this port: the store cannot create its table.
    let port = free_port();
    let connection_string = format!(
        "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};\
         TableEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    );
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--store", "azure", "--dev"])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .env("SWITCHBOARD_AZURE_CONNECTION_STRING", &connection_string)
        .stdin(Stdio::null())
        .output()
        .expect("the command runs");
    assert!(!output.status.success(), "serve started without its store");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "serve took {:?} to give up",
        started.elapsed()
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("azure"), "{stderr}");
    assert!(!stderr.contains(ACCOUNT_KEY), "the key leaked: {stderr}");
}

#[test]
fn rfc1123_dates_are_right() {
    assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
    assert_eq!(
        http_date(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        "Tue, 14 Nov 2023 22:13:20 GMT"
    );
    assert_eq!(
        http_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
        "Tue, 29 Feb 2000 00:00:00 GMT"
    );
}
