//! A node's life in a shared store: start takes the lease and refuses duplicates, a clean stop
//! leaves nothing behind, failed removals are retried, a node whose lease lapsed records its
//! connections again, readiness follows the store, and connections held by a node that cannot
//! be reached are reported unreachable, never offline.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FlakyStore, TestServer, eventually, until_completion};
use serde_json::json;
use switchboard::auth::{Authenticator, JwtConfig};
use switchboard::{HubOptions, HubService, StartError, chat};
use switchboard_core::ConnectionStore;
use switchboard_core::testkit::{ReferenceStore, node, user};

/// A short lease, so that tests see renewals, lapses and sweeps within a second or two.
fn short_lease() -> HubOptions {
    HubOptions::default().with_lease(Duration::from_millis(600))
}

async fn ids_of(store: &dyn ConnectionStore, name: &str) -> Vec<String> {
    let mut ids: Vec<String> = store
        .connections(&user(name))
        .await
        .expect("lookup")
        .iter()
        .map(|r| r.id().to_string())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn connections_are_refused_until_the_hub_started() {
    let auth = Authenticator::new(JwtConfig::new(common::SECRET).expect("strong secret"));
    let hub =
        HubService::builder(chat::hub(), Arc::new(ReferenceStore::new()), auth.clone()).build();
    let app = axum::Router::new().nest(chat::PATH, hub.router());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let token = auth.issue(&user("ann"), Duration::from_secs(60));
    let auth_header = format!("Bearer {token}");
    let negotiate = || async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        common::http_request(
            stream,
            &addr.to_string(),
            "POST",
            &format!("{}/negotiate?negotiateVersion=1", chat::PATH),
            &[("authorization", &auth_header)],
            "",
        )
        .await
    };
    let (status, body) = negotiate().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("starting"), "{body}");
    assert!(!hub.readiness().is_ready());
    hub.start().await.expect("starts");
    let (status, body) = negotiate().await;
    assert_eq!(status, 200, "{body}");
    assert!(hub.readiness().is_ready());
    assert!(
        matches!(hub.start().await, Err(StartError::AlreadyStarted)),
        "a second start is refused"
    );
    server.abort();
}

#[tokio::test]
async fn a_node_id_held_by_a_live_node_is_refused() {
    let store: Arc<dyn ConnectionStore> = Arc::new(ReferenceStore::new());
    let _first = TestServer::start_node(node("web-1"), store.clone(), None, short_lease()).await;
    let auth = Authenticator::new(JwtConfig::new(common::SECRET).expect("strong secret"));
    let second = HubService::builder(chat::hub(), store.clone(), auth)
        .node(node("web-1"))
        .options(short_lease())
        .build();
    match second.start().await {
        Err(StartError::NodeInUse(id)) => assert_eq!(id, node("web-1")),
        other => panic!("expected NodeInUse, got {other:?}"),
    }
    let message = StartError::NodeInUse(node("web-1")).to_string();
    assert!(message.contains("in use by another live node"), "{message}");
}

#[tokio::test]
async fn fresh_node_ids_differ_on_every_start() {
    let a = switchboard::service::fresh_node_id("web").expect("valid");
    let b = switchboard::service::fresh_node_id("web").expect("valid");
    assert_ne!(a, b);
    assert!(a.as_str().starts_with("web-"), "{a}");
    assert!(switchboard::service::fresh_node_id("bad prefix").is_err());
    assert!(switchboard::service::fresh_node_id(&"p".repeat(60)).is_err());
}

#[tokio::test]
async fn a_node_that_stops_cleanly_leaves_no_record() {
    let store: Arc<dyn ConnectionStore> = Arc::new(ReferenceStore::new());
    let mut one = TestServer::start_node(node("n1"), store.clone(), None, short_lease()).await;
    let two = TestServer::start_node(node("n2"), store.clone(), None, short_lease()).await;
    let _a = one.connect("alice").await;
    let _b = one.connect("alice").await;
    let _c = two.connect("bob").await;
    two.wait_for_connections(3).await;
    one.stop().await;
    assert_eq!(ids_of(&*store, "alice").await, Vec::<String>::new());
    assert_eq!(
        ids_of(&*store, "bob").await.len(),
        1,
        "the other node's stay"
    );
    // Its lease is gone too: a sweep has nothing of it to remove.
    assert_eq!(store.sweep().await.expect("sweep"), 0);
}

#[tokio::test]
async fn a_failed_removal_is_retried_until_it_succeeds() {
    let store = Arc::new(FlakyStore::default());
    let server = TestServer::start_with(chat::hub(), store.clone(), short_lease()).await;
    let alice = server.connect("alice").await;
    server.wait_for_connections(1).await;
    store.down.store(true, Ordering::SeqCst);
    drop(alice);
    eventually("the failed removal waits for a retry", || async {
        server.hub.pending_removals() == 1
    })
    .await;
    // Lease renewals fail too while the store is down: the node is not ready.
    eventually("readiness reports the store", || async {
        !server.hub.readiness().is_ready()
    })
    .await;
    let (status, body) = server.http("GET", "/readyz", &[], "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("lease"), "{body}");
    store.down.store(false, Ordering::SeqCst);
    eventually("the retry removed the record", || async {
        server.hub.pending_removals() == 0
    })
    .await;
    server.wait_for_connections(0).await;
    eventually("the node is ready again", || async {
        server.hub.readiness().is_ready()
    })
    .await;
    let (status, body) = server.http("GET", "/readyz", &[], "").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_node_whose_lease_lapsed_records_its_connections_again() {
    let shared: Arc<dyn ConnectionStore> = Arc::new(ReferenceStore::new());
    let view = Arc::new(FlakyStore::over(shared.clone()));
    let one = TestServer::start_node(node("n1"), view.clone(), None, short_lease()).await;
    let _two = TestServer::start_node(node("n2"), shared.clone(), None, short_lease()).await;
    let _alice = one.connect("alice").await;
    let original = shared.connections(&user("alice")).await.expect("lookup");
    assert_eq!(original.len(), 1);
    // Node 1 loses the store for longer than its lease: its record stops counting at once,
    // and node 2 sweeps it.
    view.down.store(true, Ordering::SeqCst);
    eventually("node 1's record is ignored and swept", || async {
        ids_of(&*shared, "alice").await.is_empty()
    })
    .await;
    eventually("a sweep removed it", || async {
        shared.counts().await.expect("counts").connections == 0
    })
    .await;
    // The store comes back: node 1 finds its lease gone and records alice again.
    view.down.store(false, Ordering::SeqCst);
    eventually("node 1 recorded alice again", || async {
        ids_of(&*shared, "alice").await.len() == 1
    })
    .await;
    assert_eq!(
        shared.connections(&user("alice")).await.expect("lookup"),
        original,
        "the record comes back as it was: same node, user agent and connection time"
    );
}

#[tokio::test]
async fn a_user_on_an_unreachable_node_is_reported_unreachable_not_offline() {
    let store: Arc<dyn ConnectionStore> = Arc::new(ReferenceStore::new());
    let one = TestServer::start_node(node("n1"), store.clone(), None, short_lease()).await;
    let two = TestServer::start_node(node("n2"), store.clone(), None, short_lease()).await;
    let _bob = two.connect("bob").await;
    let mut alice = one.connect("alice").await;
    alice
        .send_record(
            r#"{"type":1,"invocationId":"1","target":"SendChatMessage","arguments":["bob","hi"]}"#,
        )
        .await;
    assert_eq!(
        until_completion(&mut alice, "1").await,
        [
            json!({"type": 1, "target": "showErrorMessage", "arguments": [
                "The message to 'bob' could not reach 1 connection(s) on other servers right now; try again later."
            ]}),
            json!({"type": 3, "invocationId": "1", "result": null}),
        ]
    );
    let delivery = one
        .hub
        .user(&user("bob"))
        .send("addChatMessage", &("from outside",))
        .await
        .expect("delivery");
    assert_eq!((delivery.local, delivery.unreachable), (0, 1));
    assert!(!delivery.nobody_there());
}

#[tokio::test]
async fn a_backplane_is_refused_for_a_store_that_keeps_connections_per_node() {
    let auth = Authenticator::new(JwtConfig::new(common::SECRET).expect("strong secret"));
    let bus = switchboard_core::testkit::MemoryBus::new();
    let hub = HubService::builder(
        chat::hub(),
        Arc::new(switchboard_memory::MemoryStore::new()),
        auth,
    )
    .backplane(bus.endpoint())
    .build();
    match hub.start().await {
        Err(StartError::NodeLocalStore(store)) => assert_eq!(store, "memory"),
        other => panic!("expected NodeLocalStore, got {other:?}"),
    }
    let message = StartError::NodeLocalStore("memory").to_string();
    assert!(
        message.contains("use a store that spans servers"),
        "{message}"
    );
    assert!(!hub.readiness().started);
}
