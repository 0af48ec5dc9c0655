//! Hostile and careless clients against a real server: one user must never silence another,
//! and a client that floods, stops reading or hoards negotiations costs nothing to the others.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{NoLookupStore, PATIENCE, RawClient, TestServer, connect_stateful};
use futures_util::SinkExt;
use serde_json::{Value, json};
use switchboard::HubOptions;
use switchboard::hub::{Hub, HubContext, HubError};
use switchboard_memory::MemoryStore;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

fn invocation(target: &str, args: Value) -> String {
    format!(
        "{}\u{1e}",
        json!({"type": 1, "target": target, "arguments": args})
    )
}

/// Reads `client` until `n` chat messages arrived (panics on anything else but Pings and on a
/// close); returns their texts in order.
async fn read_chats(client: &mut RawClient, n: usize) -> Vec<String> {
    let mut texts = Vec::with_capacity(n);
    while texts.len() < n {
        let message = client
            .next_message()
            .await
            .unwrap_or_else(|| panic!("closed after {} of {n} messages", texts.len()));
        assert_eq!(message["target"], "addChatMessage", "{message}");
        texts.push(message["arguments"][0].as_str().expect("text").to_owned());
    }
    texts
}

#[tokio::test]
async fn a_flooding_user_cannot_make_a_reader_lose_a_message_or_its_connection() {
    // A small queue, so the flood overflows it many times over; no rate limit, so the flood
    // is as fast as the attacker can make it.
    let server = TestServer::start(
        HubOptions::default()
            .with_send_queue_size(4 * 1024)
            .with_invocation_rate(0, 0),
    )
    .await;
    let mut victim = server.connect("victim").await;
    let mut attacker = server.connect("mallory").await;
    server.wait_for_connections(2).await;

    // The reader reads everything it gets, as fast as it can.
    const FRAMES: usize = 5;
    const PER_FRAME: usize = 1100;
    let reader = tokio::spawn(async move {
        let texts = read_chats(&mut victim, FRAMES * PER_FRAME).await;
        (victim, texts)
    });
    // Each frame carries 1,100 non-blocking invocations addressed to the victim.
    for frame in 0..FRAMES {
        let mut text = String::new();
        for i in 0..PER_FRAME {
            let n = frame * PER_FRAME + i;
            text.push_str(&invocation(
                "SendChatMessage",
                json!(["victim", format!("m{n}")]),
            ));
        }
        attacker.send_text(&text).await;
    }
    let (mut victim, texts) = tokio::time::timeout(4 * PATIENCE, reader)
        .await
        .expect("the reader gets everything in time")
        .expect("reader task");
    let expected: Vec<String> = (0..FRAMES * PER_FRAME)
        .map(|n| format!("mallory: m{n}"))
        .collect();
    assert!(
        texts == expected,
        "every message arrives exactly once and in order"
    );
    // Both connections are alive and well.
    victim
        .send_text(&invocation(
            "SendChatMessage",
            json!(["victim", "still here"]),
        ))
        .await;
    assert_eq!(read_chats(&mut victim, 1).await, ["victim: still here"]);
    let completion = attacker
        .invoke("a", "SendChatMessage", json!(["mallory", "me too"]))
        .await;
    assert!(completion.get("error").is_none(), "{completion}");
}

#[tokio::test]
async fn a_flood_to_an_offline_user_slows_the_sender_down_without_dropping_it() {
    // Every invocation makes an error message for the sender itself: its own queue is what
    // fills up.
    let server = TestServer::start(
        HubOptions::default()
            .with_send_queue_size(4 * 1024)
            .with_invocation_rate(0, 0),
    )
    .await;
    let mut sender = server.connect("alice").await;
    const N: usize = 3000;
    let mut text = String::new();
    for i in 0..N {
        text.push_str(&invocation(
            "SendChatMessage",
            json!(["nobody", format!("{i}")]),
        ));
        if (i + 1) % 1000 == 0 {
            sender.send_text(&std::mem::take(&mut text)).await;
        }
    }
    for i in 0..N {
        let message = sender
            .next_message()
            .await
            .unwrap_or_else(|| panic!("closed after {i} replies"));
        assert_eq!(message["target"], "showErrorMessage", "{message}");
        assert_eq!(
            message["arguments"][0],
            "The user 'nobody' is not connected."
        );
    }
    let completion = sender
        .invoke("x", "SendChatMessage", json!(["alice", "ok"]))
        .await;
    assert!(completion.get("error").is_none(), "{completion}");
}

#[tokio::test]
async fn a_reader_that_stops_is_dropped_promptly_and_senders_are_told_why() {
    // The client timeout is long: only the flow control can drop the stuck reader in time.
    let server = TestServer::start(
        HubOptions::default()
            .with_send_queue_size(32 * 1024)
            .with_send_timeout(Duration::from_millis(500))
            .with_client_timeout(Duration::from_secs(120)),
    )
    .await;
    let _stuck = server.connect("stuck").await; // never reads again
    let mut alice = server.connect("alice").await;
    server.wait_for_connections(2).await;
    let payload = "z".repeat(16 * 1024);
    let mut sent = 0;
    let error = loop {
        assert!(sent < 20_000, "a reader that stopped must be noticed");
        let completion = alice
            .send_then_collect(
                &invocation_with_id(sent, json!(["stuck", payload])),
                &sent.to_string(),
            )
            .await;
        sent += 1;
        if let Some(error) = completion
            .iter()
            .find(|m| m["target"] == "showErrorMessage")
        {
            break error["arguments"][0].as_str().expect("text").to_owned();
        }
    };
    assert_eq!(
        error,
        "The message to 'stuck' could not be delivered to 1 connection(s): the recipient is not \
         reading its messages."
    );
    // Gone from the store, long before the client timeout.
    server.wait_for_connections(1).await;
    let replies = alice
        .send_then_collect(
            &invocation_with_id(sent, json!(["stuck", "hello?"])),
            &sent.to_string(),
        )
        .await;
    assert!(
        replies
            .iter()
            .any(|m| m["arguments"][0] == "The user 'stuck' is not connected."),
        "{replies:?}"
    );
}

fn invocation_with_id(id: usize, args: Value) -> String {
    json!({"type": 1, "invocationId": id.to_string(), "target": "SendChatMessage", "arguments": args})
        .to_string()
}

trait Collect {
    async fn send_then_collect(&mut self, record: &str, id: &str) -> Vec<Value>;
}

impl Collect for RawClient {
    /// Sends one record, then returns everything up to and including its Completion.
    async fn send_then_collect(&mut self, record: &str, id: &str) -> Vec<Value> {
        self.send_record(record).await;
        let mut seen = Vec::new();
        loop {
            let message = self.next_message().await.expect("a Completion");
            let done = message["type"] == 3 && message["invocationId"] == id;
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

#[tokio::test]
async fn a_reader_that_cannot_keep_up_gets_what_was_queued_and_a_close_message() {
    // A stateful connection takes new records only as fast as its client acknowledges them,
    // so the client sets its own reading speed exactly, whatever the sockets buffer.
    let mut options = HubOptions::default()
        .with_stateful_reconnect(true, Duration::from_secs(5))
        .with_send_queue_size(32 * 1024)
        .with_send_timeout(Duration::from_secs(1))
        .with_client_timeout(Duration::from_secs(120));
    options.reconnect_buffer_size = 10_000;
    let server = TestServer::start(options).await;
    let (_token, mut slow) = connect_stateful(&server, "slow").await;
    let mut senders = Vec::new();
    for _ in 0..20 {
        senders.push(server.connect("alice").await);
    }
    server.wait_for_connections(21).await;
    // Together the senders want far more than the slow reader takes, so the later ones wait
    // in line for longer than the send timeout.
    let payload = "p".repeat(8 * 1024);
    for (s, sender) in senders.iter_mut().enumerate() {
        let mut text = String::new();
        for k in 0..3 {
            text.push_str(&invocation(
                "SendChatMessage",
                json!(["slow", format!("{s}.{k}.{payload}")]),
            ));
        }
        sender.send_text(&text).await;
    }
    // The slow reader acknowledges what it got every 200 ms: everything queued for it
    // arrives, in each sender's order, followed by a Close message that lets it reconnect.
    let mut last_of_sender = vec![None::<usize>; senders.len()];
    let mut received = 0u64;
    let close = loop {
        let Some(message) = slow.next_message().await else {
            panic!("the socket closed without a Close message");
        };
        if message["type"] == 7 {
            break message;
        }
        assert_eq!(message["target"], "addChatMessage", "{message}");
        received += 1;
        let text = message["arguments"][0].as_str().expect("text");
        let mut parts = text.trim_start_matches("alice: ").split('.');
        let s: usize = parts.next().and_then(|p| p.parse().ok()).expect("sender");
        let k: usize = parts.next().and_then(|p| p.parse().ok()).expect("index");
        assert!(
            last_of_sender[s].is_none_or(|last| k > last),
            "a sender's messages arrive in order"
        );
        last_of_sender[s] = Some(k);
        tokio::time::sleep(Duration::from_millis(200)).await;
        slow.send_record(&json!({"type": 8, "sequenceId": received}).to_string())
            .await;
    };
    assert_eq!(close["allowReconnect"], true, "{close}");
    let reason = close["error"].as_str().expect("a reason");
    assert!(reason.contains("did not keep up"), "{reason}");
    assert!(received < 60, "not everything fitted: {received} of 60");
    // The senders whose messages did not fit were told why.
    let mut told = 0;
    for sender in &mut senders {
        sender
            .send_text(&invocation("SendChatMessage", json!(["alice", "done"])))
            .await;
        told += usize::from(drain_errors(sender).await);
    }
    assert!(
        told > 0,
        "some sender hears the message could not be delivered"
    );
}

/// Reads what a sender got until its own "done" message; whether it was told a message could
/// not be delivered.
async fn drain_errors(sender: &mut RawClient) -> bool {
    let mut told = false;
    loop {
        let message = sender.next_message().await.expect("message");
        if message["target"] == "showErrorMessage" {
            told |= message["arguments"][0]
                .as_str()
                .is_some_and(|t| t.contains("not reading"));
        }
        if message["target"] == "addChatMessage" {
            return told;
        }
    }
}

#[tokio::test]
async fn a_connection_that_invokes_too_fast_is_slowed_down_not_refused_or_timed_out() {
    let server = TestServer::start(
        HubOptions::default()
            .with_invocation_rate(20, 5)
            .with_client_timeout(Duration::from_millis(800)),
    )
    .await;
    let mut fast = server.connect("fast").await;
    let mut other = server.connect("other").await;
    const N: usize = 45;
    let mut text = String::new();
    for i in 0..N {
        text.push_str(&format!(
            "{}\u{1e}",
            json!({"type": 1, "invocationId": i.to_string(), "target": "SendChatMessage", "arguments": ["fast", i.to_string()]})
        ));
    }
    let started = tokio::time::Instant::now();
    fast.send_text(&text).await;
    // Meanwhile another connection is served as usual.
    let completion = other
        .invoke("o", "SendChatMessage", json!(["other", "hi"]))
        .await;
    assert!(completion.get("error").is_none(), "{completion}");
    let mut completed = 0;
    while completed < N {
        let message = fast.next_message().await.expect("not closed");
        if message["type"] == 3 {
            assert!(
                message.get("error").is_none(),
                "nothing is refused: {message}"
            );
            completed += 1;
        }
    }
    // 5 at once, then 20 per second: the last one cannot start before (45 - 5) / 20 s. The
    // connection stayed up although it was held back longer than the client timeout.
    assert!(started.elapsed() >= Duration::from_secs(2));
    let completion = fast
        .invoke("last", "SendChatMessage", json!(["fast", "alive"]))
        .await;
    assert!(completion.get("error").is_none());
}

/// A hub whose `Hold` calls wait for a permit the test hands out with [`Semaphore::add_permits`]
/// and whose `Burst(n)` sends `n` messages to the caller.
fn holding_hub(gate: &Arc<Semaphore>, finished: &Arc<AtomicUsize>) -> Hub {
    let gate = gate.clone();
    let finished = finished.clone();
    switchboard::chat::hub()
        .method("Hold", move |_ctx: HubContext, (): ()| {
            let gate = gate.clone();
            let finished = finished.clone();
            async move {
                let permit = gate
                    .acquire()
                    .await
                    .map_err(|e| HubError::client(e.to_string()))?;
                permit.forget();
                finished.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HubError>("held")
            }
        })
        .method("Burst", |ctx: HubContext, (n,): (usize,)| async move {
            for i in 0..n {
                let _ = ctx.clients().caller().send("burst", &(i,)).await?;
            }
            Ok::<_, HubError>(n)
        })
}

#[tokio::test]
async fn calls_in_flight_are_limited_and_the_connection_keeps_receiving_meanwhile() {
    let gate = Arc::new(Semaphore::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let server = TestServer::start_with(
        holding_hub(&gate, &finished),
        Arc::new(MemoryStore::new()),
        HubOptions::default().with_max_parallel_invocations(2),
    )
    .await;
    let mut client = server.connect("ann").await;
    let mut friend = server.connect("bob").await;
    let hold =
        |id: &str| json!({"type":1,"invocationId":id,"target":"Hold","arguments":[]}).to_string();
    // Two calls may run at once: the third record waits until one of them completes.
    client
        .send_text(&format!(
            "{}\u{1e}{}\u{1e}{}\u{1e}",
            hold("1"),
            hold("2"),
            json!({"type":1,"invocationId":"3","target":"SendChatMessage","arguments":["ann","third"]})
        ))
        .await;
    // While both run, messages for the connection are still delivered to it.
    friend
        .invoke("f", "SendChatMessage", json!(["ann", "while you wait"]))
        .await;
    assert_eq!(read_chats(&mut client, 1).await, ["bob: while you wait"]);
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    gate.add_permits(1);
    let mut order = Vec::new();
    while order.len() < 2 {
        let message = client.next_message().await.expect("message");
        if message["type"] == 3 {
            order.push(message["invocationId"].as_str().expect("id").to_owned());
        }
    }
    assert_eq!(order[0], "1", "the first Hold completes first");
    assert_eq!(order[1], "3", "the waiting record ran once there was room");
    gate.add_permits(1);
    let completion = client.next_message().await.expect("message");
    assert_eq!(completion["invocationId"], "2");
    assert_eq!(completion["result"], "held");
}

#[tokio::test]
async fn a_method_may_send_its_caller_more_than_its_queue_holds() {
    let gate = Arc::new(Semaphore::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let server = TestServer::start_with(
        holding_hub(&gate, &finished),
        Arc::new(MemoryStore::new()),
        HubOptions::default().with_send_queue_size(2 * 1024),
    )
    .await;
    let mut client = server.connect("ann").await;
    let n = 2000;
    client
        .send_record(
            &json!({"type":1,"invocationId":"b","target":"Burst","arguments":[n]}).to_string(),
        )
        .await;
    for i in 0..n {
        let message = client.next_message().await.expect("message");
        assert_eq!(message["target"], "burst", "{message}");
        assert_eq!(message["arguments"][0], i);
    }
    let completion = client.next_message().await.expect("completion");
    assert_eq!(completion["result"], n);
}

async fn negotiate_as(server: &TestServer, user: &str) -> (u16, String) {
    let auth = format!("Bearer {}", server.token(user));
    server
        .http(
            "POST",
            "/hubs/chat/negotiate?negotiateVersion=1",
            &[("authorization", &auth)],
            "",
        )
        .await
}

#[tokio::test]
async fn one_user_cannot_lock_others_out_of_negotiate_and_pending_tokens_expire_on_time() {
    let server = TestServer::start(
        HubOptions::default()
            .with_max_pending_negotiations_per_user(8)
            .with_negotiate_ttl(Duration::from_secs(1)),
    )
    .await;
    // The hoarder takes its share, then is refused.
    for _ in 0..8 {
        assert_eq!(negotiate_as(&server, "mallory").await.0, 200);
    }
    let (status, body) = negotiate_as(&server, "mallory").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("at most 8 at once"), "{body}");
    // Everyone else still negotiates.
    for user in ["alice", "bob", "carol"] {
        assert_eq!(negotiate_as(&server, user).await.0, 200, "{user}");
    }
    // Once the tokens expired, they no longer count.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..8 {
        assert_eq!(negotiate_as(&server, "mallory").await.0, 200);
    }
}

#[tokio::test]
async fn a_user_holds_at_most_the_allowed_connections() {
    let server = TestServer::start(HubOptions::default().with_max_connections_per_user(2)).await;
    let _tab1 = server.connect("ann").await;
    let tab2 = server.connect("ann").await;
    // A third tab: refused before the upgrade, at negotiate and at the WebSocket.
    let (status, body) = negotiate_as(&server, "ann").await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("at most 2 connections"), "{body}");
    assert_eq!(
        server.open("", Some(&server.token("ann"))).await.err(),
        Some(429)
    );
    // Other users are not affected, and a closed tab frees its place.
    let _bob = server.connect("bob").await;
    drop(tab2);
    server.wait_for_connections(2).await;
    let _tab3 = server.connect("ann").await;
}

#[tokio::test]
async fn no_group_name_a_client_picks_reaches_another_users_deliveries() {
    let hub = switchboard::chat::hub().method(
        "JoinGroup",
        |ctx: HubContext, (name,): (String,)| async move {
            ctx.clients().join_group(&name).await?;
            Ok::<_, HubError>(true)
        },
    );
    let server = TestServer::start_with(
        hub,
        Arc::new(NoLookupStore::default()),
        HubOptions::default(),
    )
    .await;
    let mut bob = server.connect("bob").await;
    let mut eve = server.connect("eve").await;
    let mut alice = server.connect("alice").await;
    for name in ["\u{0}user:bob", "user:bob", "bob"] {
        let joined = eve.invoke("j", "JoinGroup", json!([name])).await;
        assert_eq!(joined["result"], true);
    }
    alice
        .invoke("1", "SendChatMessage", json!(["bob", "for bob only"]))
        .await;
    alice
        .invoke("2", "SendChatMessage", json!(["eve", "for eve"]))
        .await;
    assert_eq!(read_chats(&mut bob, 1).await, ["alice: for bob only"]);
    assert_eq!(
        read_chats(&mut eve, 1).await,
        ["alice: for eve"],
        "eve never sees bob's message"
    );
}

#[tokio::test]
async fn the_vendor_directory_answer_reveals_nothing() {
    let server = TestServer::start_vendor(std::env::temp_dir().join("no-such-vendor-dir")).await;
    for path in [
        "/vendor/signalr.min.js",
        "/vendor/secret%3Cscript%3E.js",
        "/vendor/..hidden",
    ] {
        let (status, body) = server.http("GET", path, &[], "").await;
        assert_eq!(status, 404, "{path}");
        assert!(!body.contains("no-such-vendor-dir"), "{path}: {body}");
        assert!(!body.contains(std::path::MAIN_SEPARATOR), "{path}: {body}");
        assert!(
            !body.contains("secret") && !body.contains("script"),
            "{path}: {body}"
        );
    }
}

#[tokio::test]
async fn a_token_with_duplicate_keys_is_refused() {
    let server = TestServer::start(HubOptions::default()).await;
    let forged = common::sign_raw(
        r#"{"alg":"none","alg":"HS256"}"#,
        &format!(r#"{{"sub":"alice","exp":{}}}"#, u32::MAX),
    );
    assert_eq!(server.open("", Some(&forged)).await.err(), Some(401));
    let twice = common::sign_raw(
        r#"{"alg":"HS256"}"#,
        &format!(r#"{{"sub":"mallory","sub":"alice","exp":{}}}"#, u32::MAX),
    );
    assert_eq!(server.open("", Some(&twice)).await.err(), Some(401));
}

#[tokio::test]
async fn a_client_that_never_reads_its_replies_is_dropped_and_costs_the_others_nothing() {
    let server = TestServer::start(
        HubOptions::default()
            .with_send_queue_size(4 * 1024)
            .with_send_timeout(Duration::from_millis(300))
            .with_invocation_rate(0, 0),
    )
    .await;
    let mut hog = server.connect("hog").await;
    let mut other = server.connect("other").await;
    server.wait_for_connections(2).await;
    // Every record makes a reply for the hog, which never reads.
    let spam = invocation("SendChatMessage", json!(["nobody", "x".repeat(1000)])).repeat(100);
    let flood = tokio::spawn(async move {
        for _ in 0..1000 {
            let sent =
                tokio::time::timeout(PATIENCE, hog.ws.send(Message::text(spam.clone()))).await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
        }
        hog
    });
    for _ in 0..20 {
        other
            .send_text(&invocation("SendChatMessage", json!(["other", "fine"])))
            .await;
        assert_eq!(read_chats(&mut other, 1).await, ["other: fine"]);
    }
    // The hog is dropped without waiting for the client timeout.
    server.wait_for_connections(1).await;
    drop(flood.await.expect("flood task"));
}
