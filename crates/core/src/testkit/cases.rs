//! The conformance cases, one function per behaviour.
//!
//! Every case takes a [`Harness`], asks it for a fresh store and panics (like `assert!`) when
//! the store misbehaves. Cases that depend on an optional ability first read the store's
//! [`Capabilities`](crate::Capabilities) and then hold the store to its claim: a store that
//! claims an ability must show it, and one that does not must answer
//! [`StoreError::Unsupported`].
//!
//! Each case picks its own namespaces with [`unique_namespace`]. The
//! [`conformance_tests!`](crate::conformance_tests) macro runs each case inside a
//! [`Scope`], which cleans those namespaces up afterwards; a case called
//! directly cleans up nothing.
//!
//! Cases about leases wait for real, since leases run on the store's clock: a short lease is
//! [`SHORT_LEASE`] and the cases wait [`LEASE_SLACK`] past it (about a second per case).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::{Harness, Scope, conn, node, poll_once, record, t0, unique_namespace, user};
use crate::{
    ConnectionRecord, ConnectionStore, Lease, NodeId, OrphanCleanup, PageRequest, Removal, Speed,
    StoreError, UserId, UserPage,
};

async fn fresh(harness: &dyn Harness) -> Arc<dyn ConnectionStore> {
    harness.store(&unique_namespace()).await
}

/// The live connections of `user`, sorted by id, or `None` when the store cannot look users up
/// (then it must say `Unsupported`).
async fn live(store: &dyn ConnectionStore, user: &UserId) -> Option<Vec<ConnectionRecord>> {
    match store.connections(user).await {
        Ok(mut records) => {
            assert!(
                store.capabilities().lookup,
                "store answered a lookup although its capabilities say lookup = false"
            );
            records.sort_by(|a, b| a.id().cmp(b.id()));
            Some(records)
        }
        Err(e) if e.is_unsupported() && !store.capabilities().lookup => None,
        Err(e) => panic!("connections({user}) failed: {e}"),
    }
}

/// Ids of `user`'s live connections, or `None` when lookup is unsupported.
async fn live_ids(store: &dyn ConnectionStore, user: &UserId) -> Option<Vec<String>> {
    live(store, user)
        .await
        .map(|records| records.iter().map(|r| r.id().to_string()).collect())
}

/// Every listed user, walking all pages of `page_size`; `None` when listing is unsupported.
async fn all_users(store: &dyn ConnectionStore, page_size: usize) -> Option<Vec<UserId>> {
    if !store.capabilities().can_list_users() {
        let err = store
            .users(PageRequest::first(page_size))
            .await
            .expect_err("store listed users although its capabilities say it cannot");
        assert!(err.is_unsupported(), "expected Unsupported, got {err}");
        return None;
    }
    let mut out = Vec::new();
    let mut after = None;
    for _ in 0..10_000 {
        let page = store
            .users(PageRequest {
                after: after.clone(),
                ..PageRequest::first(page_size)
            })
            .await
            .unwrap_or_else(|e| panic!("users() failed: {e}"));
        assert!(
            page.users.len() <= page_size,
            "page of {} users exceeds the limit {page_size}",
            page.users.len()
        );
        out.extend(page.users);
        match page.next {
            Some(next) => after = Some(next),
            None => return Some(out),
        }
    }
    panic!("users() pagination never ended");
}

async fn add_ok(store: &dyn ConnectionStore, r: ConnectionRecord) {
    let id = r.id().clone();
    store
        .add(r)
        .await
        .unwrap_or_else(|e| panic!("add({id}) failed: {e}"));
}

async fn remove_expect(store: &dyn ConnectionStore, u: &str, c: &str, expected: Removal) {
    let got = store
        .remove(&user(u), &conn(c))
        .await
        .unwrap_or_else(|e| panic!("remove({u}, {c}) failed: {e}"));
    assert_eq!(got, expected, "remove({u}, {c})");
}

/// A recorded connection can be looked up with every field intact, and removed.
pub async fn add_and_look_up(harness: &dyn Harness) {
    let store = fresh(harness).await;
    let r = ConnectionRecord::new(
        conn("c-add-1"),
        user("alice"),
        node("node-a"),
        t0() + Duration::from_millis(1234),
    )
    .with_user_agent("Microsoft SignalR/10.0 (10.0.11; Linux; NodeJS; 20.x)");
    add_ok(&*store, r.clone()).await;
    if let Some(records) = live(&*store, &user("alice")).await {
        assert_eq!(
            records,
            vec![r],
            "the record must read back exactly as written"
        );
    }
    assert_eq!(
        live_ids(&*store, &user("bob")).await.unwrap_or_default(),
        Vec::<String>::new()
    );
    remove_expect(&*store, "alice", "c-add-1", Removal::Removed).await;
    if let Some(records) = live(&*store, &user("alice")).await {
        assert!(
            records.is_empty(),
            "removed connection still listed: {records:?}"
        );
    }
}

/// A user may hold any number of connections; removing one leaves the others.
pub async fn several_connections_per_user(harness: &dyn Harness) {
    let store = fresh(harness).await;
    for c in ["c1", "c2", "c3"] {
        add_ok(&*store, record(c, "alice", "node-a")).await;
    }
    add_ok(&*store, record("c4", "bob", "node-b")).await;
    if let Some(ids) = live_ids(&*store, &user("alice")).await {
        assert_eq!(ids, ["c1", "c2", "c3"]);
        assert_eq!(
            live_ids(&*store, &user("bob")).await,
            Some(vec!["c4".to_string()])
        );
    }
    remove_expect(&*store, "alice", "c2", Removal::Removed).await;
    if let Some(ids) = live_ids(&*store, &user("alice")).await {
        assert_eq!(ids, ["c1", "c3"]);
        assert_eq!(
            live_ids(&*store, &user("bob")).await,
            Some(vec!["c4".to_string()])
        );
    }
    if store.capabilities().can_list_users() {
        let counts = store
            .counts()
            .await
            .unwrap_or_else(|e| panic!("counts(): {e}"));
        assert_eq!((counts.users, counts.connections), (2, 3));
    }
}

/// A user is connected exactly while they have a connection: after the last one goes, the user
/// is neither listed nor counted.
pub async fn removing_the_last_connection_removes_the_user(harness: &dyn Harness) {
    let store = fresh(harness).await;
    add_ok(&*store, record("c1", "alice", "node-a")).await;
    add_ok(&*store, record("c2", "alice", "node-a")).await;
    add_ok(&*store, record("c3", "bob", "node-a")).await;
    remove_expect(&*store, "alice", "c1", Removal::Removed).await;
    remove_expect(&*store, "alice", "c2", Removal::Removed).await;
    if let Some(ids) = live_ids(&*store, &user("alice")).await {
        assert!(ids.is_empty(), "alice still has {ids:?}");
    }
    if let Some(users) = all_users(&*store, 10).await {
        assert_eq!(
            users,
            vec![user("bob")],
            "alice must disappear with her last connection"
        );
        let counts = store
            .counts()
            .await
            .unwrap_or_else(|e| panic!("counts(): {e}"));
        assert_eq!((counts.users, counts.connections), (1, 1));
    }
    // The user comes back with a new connection.
    add_ok(&*store, record("c5", "alice", "node-a")).await;
    if let Some(ids) = live_ids(&*store, &user("alice")).await {
        assert_eq!(ids, ["c5"]);
    }
}

/// Adding a connection id that is already recorded fails with `Conflict` and changes nothing.
pub async fn adding_a_recorded_connection_is_a_conflict(harness: &dyn Harness) {
    let store = fresh(harness).await;
    let original = record("c1", "alice", "node-a");
    add_ok(&*store, original.clone()).await;
    let duplicate = ConnectionRecord::new(conn("c1"), user("alice"), node("node-b"), t0());
    match store.add(duplicate).await {
        Err(StoreError::Conflict { user: u, id }) => {
            assert_eq!((u, id), (user("alice"), conn("c1")));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    if let Some(records) = live(&*store, &user("alice")).await {
        assert_eq!(
            records,
            vec![original],
            "a refused add must not change the record"
        );
    }
}

/// `reconnect` inserts a missing record, replaces an existing one, and repeating it changes
/// nothing.
pub async fn reconnect_is_an_idempotent_upsert(harness: &dyn Harness) {
    let store = fresh(harness).await;
    // Missing (for example swept while the client was away): inserted.
    let r = record("c1", "alice", "node-a");
    for _ in 0..3 {
        store
            .reconnect(r.clone())
            .await
            .unwrap_or_else(|e| panic!("reconnect failed: {e}"));
    }
    if let Some(records) = live(&*store, &user("alice")).await {
        assert_eq!(
            records,
            vec![r.clone()],
            "repeated reconnects must leave one record"
        );
    }
    // Existing: replaced (node, user agent and time all come from the new record).
    let moved = r
        .clone()
        .with_node(node("node-b"))
        .with_user_agent("agent/2");
    store
        .reconnect(moved.clone())
        .await
        .unwrap_or_else(|e| panic!("reconnect failed: {e}"));
    store
        .reconnect(moved.clone())
        .await
        .unwrap_or_else(|e| panic!("reconnect failed: {e}"));
    if let Some(records) = live(&*store, &user("alice")).await {
        assert_eq!(
            records,
            vec![moved],
            "reconnect must replace the stored record"
        );
    }
    if store.capabilities().can_list_users() {
        let counts = store
            .counts()
            .await
            .unwrap_or_else(|e| panic!("counts(): {e}"));
        assert_eq!((counts.users, counts.connections), (1, 1));
    }
    remove_expect(&*store, "alice", "c1", Removal::Removed).await;
}

/// Removing what is not there answers `NotFound` and disturbs nothing, including a removal
/// under the wrong user and a second removal of the same connection.
pub async fn unknown_removals_are_harmless(harness: &dyn Harness) {
    let store = fresh(harness).await;
    remove_expect(&*store, "nobody", "c-none", Removal::NotFound).await;
    add_ok(&*store, record("c1", "alice", "node-a")).await;
    remove_expect(&*store, "alice", "c-none", Removal::NotFound).await;
    remove_expect(&*store, "bob", "c1", Removal::NotFound).await;
    if let Some(ids) = live_ids(&*store, &user("alice")).await {
        assert_eq!(
            ids,
            ["c1"],
            "a removal under the wrong user must not touch the record"
        );
    }
    remove_expect(&*store, "alice", "c1", Removal::Removed).await;
    remove_expect(&*store, "alice", "c1", Removal::NotFound).await;
    if let Some(users) = all_users(&*store, 10).await {
        assert!(
            users.is_empty(),
            "unknown removals must not create users: {users:?}"
        );
    }
}

/// User ids are normalized by `UserId::new` only (surrounding whitespace) and stores keep them
/// byte for byte: case matters, and characters that some backends reserve in keys
/// (`/ \ # ?`, quotes, `%`, non-ASCII) round-trip, as do ids of the longest allowed length.
pub async fn user_ids_are_normalized_once_and_compared_exactly(harness: &dyn Harness) {
    let store = fresh(harness).await;
    // Added with surrounding whitespace, found and removed without: one normalization.
    add_ok(
        &*store,
        ConnectionRecord::new(conn("c1"), user("  Mixed.Case  "), node("n"), t0()),
    )
    .await;
    if let Some(ids) = live_ids(&*store, &user("Mixed.Case")).await {
        assert_eq!(ids, ["c1"]);
        assert_eq!(
            live_ids(&*store, &user("mixed.case")).await,
            Some(vec![]),
            "user ids are case-sensitive"
        );
    }
    add_ok(&*store, record("c2", "mixed.case", "n")).await;
    remove_expect(&*store, "\tMixed.Case\n", "c1", Removal::Removed).await;
    if let Some(ids) = live_ids(&*store, &user("mixed.case")).await {
        assert_eq!(ids, ["c2"], "removing Mixed.Case must not touch mixed.case");
    }

    let longest = "n".repeat(UserId::MAX_LEN);
    let longest_wide = "é".repeat(UserId::MAX_LEN / 2);
    let tricky = [
        "a/b\\c#d?e",
        "quote'\"s; --",
        "o'brien",
        "#",
        "?",
        "%",
        "~41",
        "!leases",
        "Åsa Öberg 名前 🚀",
        "%2F%00plus+space  in the middle",
        longest.as_str(),
        longest_wide.as_str(),
    ];
    for (i, name) in tricky.iter().enumerate() {
        add_ok(&*store, record(&format!("t{i}"), name, "n")).await;
    }
    for (i, name) in tricky.iter().enumerate() {
        if let Some(records) = live(&*store, &user(name)).await {
            assert_eq!(records.len(), 1, "user {name:?}");
            assert_eq!(records[0].user().as_str(), *name, "user id must round-trip");
            assert_eq!(records[0].id().as_str(), format!("t{i}"));
        }
    }
    if let Some(users) = all_users(&*store, 2).await {
        let mut expected: Vec<UserId> = tricky.iter().map(|n| user(n)).collect();
        expected.push(user("mixed.case"));
        expected.sort();
        assert_eq!(
            users, expected,
            "listing must return the exact ids in byte order"
        );
    }
    for (i, name) in tricky.iter().enumerate() {
        remove_expect(&*store, name, &format!("t{i}"), Removal::Removed).await;
    }
}

/// `lookup = true` means `connections` answers; `false` means it says `Unsupported`.
pub async fn lookup_matches_capabilities(harness: &dyn Harness) {
    let store = fresh(harness).await;
    add_ok(&*store, record("c1", "alice", "node-a")).await;
    let answer = store.connections(&user("alice")).await;
    if store.capabilities().lookup {
        let records = answer.unwrap_or_else(|e| panic!("lookup claimed but failed: {e}"));
        assert_eq!(records.len(), 1);
    } else {
        let err = answer.expect_err("lookup = false, yet the store answered");
        assert!(err.is_unsupported(), "expected Unsupported, got {err}");
    }
}

/// A store that claims it can list users lists every connected user exactly once across pages,
/// in byte order, and counts agree; one that cannot answers `Unsupported` to both.
pub async fn listing_matches_capabilities(harness: &dyn Harness) {
    let store = fresh(harness).await;
    let names = ["dave", "Carol", "alice", "bob", "erin"];
    for (i, name) in names.iter().enumerate() {
        add_ok(&*store, record(&format!("c{i}"), name, "node-a")).await;
        add_ok(&*store, record(&format!("d{i}"), name, "node-b")).await;
    }
    let caps = store.capabilities();
    if caps.can_list_users() {
        let mut expected: Vec<UserId> = names.iter().map(|n| user(n)).collect();
        expected.sort();
        for page_size in [1, 2, 3, 5, 100] {
            assert_eq!(
                all_users(&*store, page_size).await,
                Some(expected.clone()),
                "page size {page_size}"
            );
        }
        let first = store
            .users(PageRequest::first(2))
            .await
            .unwrap_or_else(|e| panic!("users(): {e}"));
        assert_eq!(first.users, expected[..2]);
        assert_eq!(first.next.as_ref(), Some(&expected[1]));
        let last = store
            .users(PageRequest {
                after: Some(expected[3].clone()),
                ..PageRequest::first(5)
            })
            .await
            .unwrap_or_else(|e| panic!("users(): {e}"));
        assert_eq!(last.users, expected[4..]);
        assert_eq!(last.next, None, "the last page has no cursor");
        let counts = store
            .counts()
            .await
            .unwrap_or_else(|e| panic!("counts(): {e}"));
        assert_eq!((counts.users, counts.connections), (5, 10));
    } else {
        assert_eq!(all_users(&*store, 2).await, None);
        let err = store.counts().await.expect_err("cannot list, yet counted");
        assert!(err.is_unsupported(), "expected Unsupported, got {err}");
    }
}

/// A store that can list users pages through exactly the users within a name prefix (byte
/// for byte, the cursor working within it) and counts live connections per node; one that
/// cannot answers `Unsupported` to both.
pub async fn prefix_pages_and_node_counts_match_capabilities(harness: &dyn Harness) {
    let store = fresh(harness).await;
    let names = [
        "al",
        "ali",
        "alice",
        "alicia",
        "Alice",
        "alí",
        "alj",
        "ali\u{10FFFF}x",
        "bob",
        "a",
    ];
    for (i, name) in names.iter().enumerate() {
        add_ok(&*store, record(&format!("c{i}"), name, "node-a")).await;
    }
    add_ok(&*store, record("d1", "alice", "node-b")).await;
    add_ok(&*store, record("d2", "bob", "node-b")).await;
    if !store.capabilities().can_list_users() {
        let err = store
            .users(PageRequest::first(10).with_prefix("ali"))
            .await
            .expect_err("cannot list, yet listed by prefix");
        assert!(err.is_unsupported(), "expected Unsupported, got {err}");
        let err = store
            .counts_by_node()
            .await
            .expect_err("cannot list, yet counted per node");
        assert!(err.is_unsupported(), "expected Unsupported, got {err}");
        return;
    }
    let expected: Vec<UserId> = ["ali", "alice", "alicia", "ali\u{10FFFF}x"]
        .iter()
        .map(|n| user(n))
        .collect();
    for page_size in [1, 2, 3, 10] {
        let mut got = Vec::new();
        let mut after = None;
        loop {
            let page = store
                .users(PageRequest {
                    after: after.clone(),
                    ..PageRequest::first(page_size).with_prefix("ali")
                })
                .await
                .unwrap_or_else(|e| panic!("users() by prefix: {e}"));
            assert!(page.users.len() <= page_size);
            got.extend(page.users);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
            assert!(got.len() <= names.len(), "the pages never end");
        }
        assert_eq!(got, expected, "prefix \"ali\", page size {page_size}");
    }
    let none = store
        .users(PageRequest::first(10).with_prefix("zed"))
        .await
        .unwrap_or_else(|e| panic!("users() by prefix: {e}"));
    assert_eq!(none, UserPage::default());
    let all = store
        .users(PageRequest::first(100).with_prefix(""))
        .await
        .unwrap_or_else(|e| panic!("users() with an empty prefix: {e}"));
    assert_eq!(
        all.users.len(),
        names.len(),
        "an empty prefix lists everyone"
    );
    let per_node = store
        .counts_by_node()
        .await
        .unwrap_or_else(|e| panic!("counts_by_node(): {e}"));
    let expected: BTreeMap<NodeId, u64> =
        [(node("node-a"), names.len() as u64), (node("node-b"), 2)].into();
    assert_eq!(per_node, expected);
}

/// With node leases, a sweep removes the connections of nodes whose lease ran out (or that
/// never took one) and spares the rest; without, `heartbeat` and `sweep` are `Unsupported`.
/// Leases run on the store's clock, so this case waits for real (about a second).
pub async fn sweep_removes_only_expired_nodes(harness: &dyn Harness) {
    let store = fresh(harness).await;
    let (a, b) = (node("node-a"), node("node-b"));
    if !store.capabilities().has_leases() {
        let err = store
            .heartbeat(&a, LONG_LEASE)
            .await
            .expect_err("no leases, yet heartbeat worked");
        assert!(err.is_unsupported(), "expected Unsupported, got {err}");
        let err = store
            .sweep()
            .await
            .expect_err("no leases, yet sweep worked");
        assert!(err.is_unsupported(), "expected Unsupported, got {err}");
        return;
    }
    let beat = |n: NodeId, ttl| {
        let store = store.clone();
        async move {
            store
                .heartbeat(&n, ttl)
                .await
                .unwrap_or_else(|e| panic!("heartbeat({n}) failed: {e}"))
        }
    };
    let _ = beat(a.clone(), LONG_LEASE).await;
    let _ = beat(b.clone(), SHORT_LEASE).await;
    add_ok(&*store, record("a1", "ann", "node-a")).await;
    add_ok(&*store, record("b1", "ann", "node-b")).await;
    add_ok(&*store, record("b2", "bob", "node-b")).await;
    add_ok(&*store, record("c1", "cat", "node-c")).await; // node-c never took a lease
    tokio::time::sleep(SHORT_LEASE + LEASE_SLACK).await;

    let swept = store
        .sweep()
        .await
        .unwrap_or_else(|e| panic!("sweep failed: {e}"));
    assert_eq!(
        swept, 3,
        "node-b expired (b1, b2), node-c never had a lease (c1)"
    );
    if let Some(ids) = live_ids(&*store, &user("ann")).await {
        assert_eq!(
            ids,
            ["a1"],
            "node-a's lease is live: its connection must survive"
        );
        assert_eq!(live_ids(&*store, &user("bob")).await, Some(vec![]));
    }
    if let Some(users) = all_users(&*store, 10).await {
        assert_eq!(users, vec![user("ann")]);
    }
    let again = store
        .sweep()
        .await
        .unwrap_or_else(|e| panic!("sweep failed: {e}"));
    assert_eq!(again, 0, "a second sweep must find nothing");

    // node-b comes back: its lease was swept, so it takes a new one.
    assert_eq!(beat(b.clone(), LONG_LEASE).await, Lease::Taken);
    add_ok(&*store, record("b3", "bob", "node-b")).await;
    assert_eq!(
        store
            .sweep()
            .await
            .unwrap_or_else(|e| panic!("sweep failed: {e}")),
        0
    );
    if let Some(ids) = live_ids(&*store, &user("bob")).await {
        assert_eq!(ids, ["b3"]);
    }
}

/// The capabilities do not contradict each other: records that outlive their node
/// (`LeaseSweep`) need leases to be cleaned up, and records that vanish with their node
/// (`DiesWithNode`) cannot survive a restart.
pub async fn capabilities_are_consistent(harness: &dyn Harness) {
    let caps = fresh(harness).await.capabilities();
    match caps.orphan_cleanup {
        OrphanCleanup::LeaseSweep => assert!(
            caps.leases,
            "orphan_cleanup = LeaseSweep needs leases = true: {caps:?}"
        ),
        OrphanCleanup::DiesWithNode => assert!(
            !caps.survives_restart,
            "records that vanish with their node cannot survive a restart: {caps:?}"
        ),
    }
    if caps.spans_nodes_with_backplane {
        assert!(
            !caps.shared_across_nodes && !caps.lookup,
            "a store spanning nodes through a backplane keeps its records per node and cannot \
             look users up (their connections travel on user channels): {caps:?}"
        );
    }
}

/// Two instances on one namespace (two nodes) see each other's records when the store claims
/// `shared_across_nodes`, and none of them when it does not.
pub async fn instances_on_one_namespace_share_records_as_claimed(harness: &dyn Harness) {
    let namespace = unique_namespace();
    let first = harness.store(&namespace).await;
    let second = harness.store(&namespace).await;
    let shared = first.capabilities().shared_across_nodes;
    add_ok(&*first, record("a1", "ann", "node-a")).await;
    add_ok(&*second, record("b1", "bob", "node-b")).await;
    let (theirs_a, theirs_b): (&[&str], &[&str]) = if shared {
        (&["a1"], &["b1"])
    } else {
        (&[], &[])
    };
    if let Some(ids) = live_ids(&*second, &user("ann")).await {
        assert_eq!(
            ids, theirs_a,
            "shared_across_nodes = {shared}: what the second instance sees of the first's records"
        );
        assert_eq!(
            live_ids(&*first, &user("bob")).await.unwrap_or_default(),
            theirs_b,
            "shared_across_nodes = {shared}: what the first instance sees of the second's records"
        );
    }
    if let Some(users) = all_users(&*second, 10).await {
        let expected = if shared {
            vec![user("ann"), user("bob")]
        } else {
            vec![user("bob")]
        };
        assert_eq!(
            users, expected,
            "shared_across_nodes = {shared}: users listed by the second instance"
        );
    }
    // Without lookup or listing, removal still tells: only a shared store finds the record.
    let expected = if shared {
        Removal::Removed
    } else {
        Removal::NotFound
    };
    let removal = second
        .remove(&user("ann"), &conn("a1"))
        .await
        .unwrap_or_else(|e| panic!("remove(ann, a1) failed: {e}"));
    assert_eq!(
        removal, expected,
        "shared_across_nodes = {shared}: the second instance removing the first's record"
    );
}

/// After the only instance is dropped and the namespace reopened (a restart), the records are
/// still there when the store claims `survives_restart`, and gone when it claims neither
/// `survives_restart` nor `shared_across_nodes`. (A shared store that does not survive a
/// restart of its backend keeps records across a restart of one node: nothing to check.)
pub async fn records_survive_a_restart_as_claimed(harness: &dyn Harness) {
    let namespace = unique_namespace();
    let first = harness.store(&namespace).await;
    let caps = first.capabilities();
    add_ok(&*first, record("c1", "ann", "node-a")).await;
    drop(first);
    let second = harness.store(&namespace).await;
    let expected = if caps.survives_restart {
        Removal::Removed
    } else if !caps.shared_across_nodes {
        Removal::NotFound
    } else {
        return;
    };
    let kept = expected == Removal::Removed;
    if let Some(ids) = live_ids(&*second, &user("ann")).await {
        let wanted: &[&str] = if kept { &["c1"] } else { &[] };
        assert_eq!(
            ids, wanted,
            "survives_restart = {}: the records after a restart",
            caps.survives_restart
        );
    }
    let removal = second
        .remove(&user("ann"), &conn("c1"))
        .await
        .unwrap_or_else(|e| panic!("remove(ann, c1) failed: {e}"));
    assert_eq!(
        removal, expected,
        "survives_restart = {}: removing a record written before the restart",
        caps.survives_restart
    );
}

/// Runs `operation` to its first poll and returns its output; panics, naming it, when it
/// waited.
fn on_first_poll<T>(operation: &str, future: impl Future<Output = T>) -> T {
    poll_once(future).unwrap_or_else(|| {
        panic!("capabilities say speed = InProcess, yet `{operation}` waited (was not ready on its first poll)")
    })
}

/// Asserts that an operation answered `Ok`, or `Unsupported` when the store does not claim it.
fn supported_ok<T: fmt::Debug>(operation: &str, claimed: bool, result: Result<T, StoreError>) {
    match result {
        Ok(_) if claimed => {}
        Err(e) if !claimed && e.is_unsupported() => {}
        other => panic!("`{operation}` (claimed: {claimed}) answered {other:?}"),
    }
}

/// A store that claims `speed = InProcess` completes every operation on its first poll: it
/// never waits for I/O, a lock held across an await, or a timer. (A `Network` store may answer
/// from a cache or wait: nothing to check.)
pub async fn in_process_stores_never_wait(harness: &dyn Harness) {
    let store = fresh(harness).await;
    let caps = store.capabilities();
    if caps.speed != Speed::InProcess {
        return;
    }
    let (lookup, listing, leases) = (caps.lookup, caps.can_list_users(), caps.leases);
    let n = node("node-a");
    on_first_poll("add", store.add(record("c1", "ann", "node-a")))
        .unwrap_or_else(|e| panic!("add failed: {e}"));
    on_first_poll("reconnect", store.reconnect(record("c2", "ann", "node-a")))
        .unwrap_or_else(|e| panic!("reconnect failed: {e}"));
    supported_ok(
        "connections",
        lookup,
        on_first_poll("connections", store.connections(&user("ann"))),
    );
    supported_ok(
        "users",
        listing,
        on_first_poll("users", store.users(PageRequest::first(10))),
    );
    supported_ok("counts", listing, on_first_poll("counts", store.counts()));
    supported_ok(
        "heartbeat",
        leases,
        on_first_poll("heartbeat", store.heartbeat(&n, LONG_LEASE)),
    );
    supported_ok("sweep", leases, on_first_poll("sweep", store.sweep()));
    supported_ok(
        "release",
        leases,
        on_first_poll("release", store.release(&n)),
    );
    let _ = on_first_poll("remove", store.remove(&user("ann"), &conn("c1")))
        .unwrap_or_else(|e| panic!("remove failed: {e}"));
}

/// Waits for `result` (at most [`UNREACHABLE_DEADLINE`]) and asserts that it failed
/// transiently, or with `Unsupported` for an operation the store does not claim.
async fn fails_transiently<T: fmt::Debug>(
    operation: &str,
    claimed: bool,
    result: impl Future<Output = Result<T, StoreError>>,
) {
    match tokio::time::timeout(UNREACHABLE_DEADLINE, result).await {
        Err(_) => panic!(
            "`{operation}` on an unreachable store did not answer within {UNREACHABLE_DEADLINE:?}"
        ),
        Ok(Ok(answer)) => {
            panic!("`{operation}` on an unreachable store answered {answer:?}; it must fail")
        }
        Ok(Err(e)) if !claimed && e.is_unsupported() => {}
        Ok(Err(e)) => assert!(
            e.is_transient(),
            "`{operation}` on an unreachable store must fail transiently (Unavailable, \
             Timeout or a transient Backend error), got {e:?}"
        ),
    }
}

/// A store whose backend cannot be reached fails every operation it supports with a transient
/// error (`Unavailable`, `Timeout`, or a transient `Backend` error), each within
/// [`UNREACHABLE_DEADLINE`], and never answers as if it had data. Harnesses of `Network`
/// stores must provide such a store ([`Harness::unreachable`]); in-process stores have no
/// backend to lose.
pub async fn an_unreachable_store_fails_transiently(harness: &dyn Harness) {
    let caps = fresh(harness).await.capabilities();
    let Some(store) = harness.unreachable().await else {
        assert!(
            caps.speed != Speed::Network,
            "the `{}` store's capabilities say speed = Network, so its harness must implement \
             `Harness::unreachable` (a store whose backend cannot be reached, e.g. a closed port)",
            caps.strategy
        );
        return;
    };
    let (lookup, listing, leases) = (caps.lookup, caps.can_list_users(), caps.leases);
    let n = node("node-a");
    fails_transiently("add", true, store.add(record("c1", "ann", "node-a"))).await;
    fails_transiently("remove", true, store.remove(&user("ann"), &conn("c1"))).await;
    fails_transiently(
        "reconnect",
        true,
        store.reconnect(record("c1", "ann", "node-a")),
    )
    .await;
    fails_transiently("connections", lookup, store.connections(&user("ann"))).await;
    fails_transiently("users", listing, store.users(PageRequest::first(10))).await;
    fails_transiently("counts", listing, store.counts()).await;
    fails_transiently("heartbeat", leases, store.heartbeat(&n, LONG_LEASE)).await;
    fails_transiently("sweep", leases, store.sweep()).await;
    fails_transiently("release", leases, store.release(&n)).await;
}

/// `heartbeat` tells what it found: `Taken` for a node's first lease, `Renewed` while the
/// lease is live, `Lapsed` once it expired (not swept yet), and `Taken` again after a sweep
/// forgot it. Without leases, `heartbeat`, `sweep` and `release` are all `Unsupported`.
pub async fn heartbeat_answers_what_it_found(harness: &dyn Harness) {
    let store = fresh(harness).await;
    let (a, b) = (node("node-a"), node("node-b"));
    if !store.capabilities().leases {
        for (operation, result) in [
            (
                "heartbeat",
                store.heartbeat(&a, LONG_LEASE).await.map(|_| 0),
            ),
            ("sweep", store.sweep().await),
            ("release", store.release(&a).await),
        ] {
            let err = result.expect_err("leases = false, yet the operation worked");
            assert!(
                err.is_unsupported(),
                "{operation} without leases: expected Unsupported, got {err}"
            );
        }
        return;
    }
    let beat = |n: &NodeId, ttl| {
        let (store, n) = (store.clone(), n.clone());
        async move {
            store
                .heartbeat(&n, ttl)
                .await
                .unwrap_or_else(|e| panic!("heartbeat({n}) failed: {e}"))
        }
    };
    assert_eq!(
        beat(&a, SHORT_LEASE).await,
        Lease::Taken,
        "node-a's first heartbeat"
    );
    assert_eq!(
        beat(&b, SHORT_LEASE).await,
        Lease::Taken,
        "node-b's first heartbeat"
    );
    assert_eq!(
        beat(&a, SHORT_LEASE).await,
        Lease::Renewed,
        "node-a's live lease"
    );
    tokio::time::sleep(SHORT_LEASE + LEASE_SLACK).await;
    assert_eq!(
        beat(&a, LONG_LEASE).await,
        Lease::Lapsed,
        "node-a's lease expired and was not swept"
    );
    let _ = store
        .sweep()
        .await
        .unwrap_or_else(|e| panic!("sweep failed: {e}"));
    assert_eq!(
        beat(&b, LONG_LEASE).await,
        Lease::Taken,
        "node-b's expired lease was swept"
    );
    assert_eq!(
        beat(&a, LONG_LEASE).await,
        Lease::Renewed,
        "node-a renewed in time: the sweep spared its lease"
    );
}

/// `release` ends a node's lease and removes exactly that node's connections, whatever their
/// user, and answers how many; other nodes' connections (leased or not) stay. A second release
/// finds nothing, and the node's next heartbeat takes a new lease.
pub async fn release_removes_exactly_the_nodes_records(harness: &dyn Harness) {
    let store = fresh(harness).await;
    if !store.capabilities().leases {
        return; // `heartbeat_answers_what_it_found` checks that release is Unsupported.
    }
    let (a, b) = (node("node-a"), node("node-b"));
    for n in [&a, &b] {
        let _ = store
            .heartbeat(n, LONG_LEASE)
            .await
            .unwrap_or_else(|e| panic!("heartbeat({n}) failed: {e}"));
    }
    add_ok(&*store, record("a1", "ann", "node-a")).await;
    add_ok(&*store, record("a2", "bob", "node-a")).await;
    add_ok(&*store, record("b1", "ann", "node-b")).await;
    add_ok(&*store, record("c1", "cat", "node-c")).await; // node-c never took a lease
    let released = store
        .release(&a)
        .await
        .unwrap_or_else(|e| panic!("release(node-a) failed: {e}"));
    assert_eq!(released, 2, "node-a held a1 and a2");
    if let Some(ids) = live_ids(&*store, &user("ann")).await {
        assert_eq!(ids, ["b1"], "node-b's connection of the same user stays");
        assert_eq!(live_ids(&*store, &user("bob")).await, Some(vec![]));
        assert_eq!(
            live_ids(&*store, &user("cat")).await,
            Some(vec!["c1".to_string()])
        );
    }
    if let Some(users) = all_users(&*store, 10).await {
        assert_eq!(users, vec![user("ann"), user("cat")]);
        let counts = store
            .counts()
            .await
            .unwrap_or_else(|e| panic!("counts(): {e}"));
        assert_eq!((counts.users, counts.connections), (2, 2));
    }
    let again = store
        .release(&a)
        .await
        .unwrap_or_else(|e| panic!("release(node-a) failed: {e}"));
    assert_eq!(again, 0, "a second release finds nothing");
    for (n, lease) in [(&a, Lease::Taken), (&b, Lease::Renewed)] {
        let found = store
            .heartbeat(n, LONG_LEASE)
            .await
            .unwrap_or_else(|e| panic!("heartbeat({n}) failed: {e}"));
        assert_eq!(found, lease, "heartbeat({n}) after node-a's release");
    }
}

/// Once a node's lease expires, lookups, listing and counts ignore its connections at once,
/// without waiting for a sweep; connections of nodes with a live lease, or that never took a
/// lease, stay visible. When the node renews (its lease lapsed but was not swept), they are
/// visible again.
pub async fn lookups_ignore_nodes_whose_lease_expired(harness: &dyn Harness) {
    let store = fresh(harness).await;
    if !store.capabilities().leases {
        return;
    }
    let (a, b) = (node("node-a"), node("node-b"));
    let _ = store
        .heartbeat(&a, LONG_LEASE)
        .await
        .unwrap_or_else(|e| panic!("heartbeat(node-a) failed: {e}"));
    let _ = store
        .heartbeat(&b, SHORT_LEASE)
        .await
        .unwrap_or_else(|e| panic!("heartbeat(node-b) failed: {e}"));
    add_ok(&*store, record("a1", "ann", "node-a")).await;
    add_ok(&*store, record("b1", "ann", "node-b")).await;
    add_ok(&*store, record("b2", "bob", "node-b")).await;
    add_ok(&*store, record("c1", "cat", "node-c")).await; // node-c never took a lease
    let visible =
        |ann: &'static [&'static str], bob: &'static [&'static str], when: &'static str| {
            let store = store.clone();
            async move {
                if let Some(ids) = live_ids(&*store, &user("ann")).await {
                    assert_eq!(ids, ann, "ann's connections {when}");
                    assert_eq!(
                        live_ids(&*store, &user("bob")).await.unwrap_or_default(),
                        bob,
                        "bob's connections {when}"
                    );
                    assert_eq!(
                        live_ids(&*store, &user("cat")).await.unwrap_or_default(),
                        ["c1"],
                        "a node that never took a lease stays visible until a sweep ({when})"
                    );
                }
                if let Some(users) = all_users(&*store, 1).await {
                    let mut expected = vec![user("ann"), user("cat")];
                    if !bob.is_empty() {
                        expected.insert(1, user("bob"));
                    }
                    assert_eq!(users, expected, "listed users {when}");
                    let counts = store
                        .counts()
                        .await
                        .unwrap_or_else(|e| panic!("counts(): {e}"));
                    let connections = (ann.len() + bob.len() + 1) as u64;
                    assert_eq!(
                        (counts.users, counts.connections),
                        (expected.len() as u64, connections),
                        "counts {when}"
                    );
                }
            }
        };
    visible(&["a1", "b1"], &["b2"], "while every lease is live").await;
    tokio::time::sleep(SHORT_LEASE + LEASE_SLACK).await;
    visible(
        &["a1"],
        &[],
        "once node-b's lease expired, before any sweep",
    )
    .await;
    let found = store
        .heartbeat(&b, LONG_LEASE)
        .await
        .unwrap_or_else(|e| panic!("heartbeat(node-b) failed: {e}"));
    assert_eq!(found, Lease::Lapsed, "node-b's lease expired, unswept");
    visible(
        &["a1", "b1"],
        &["b2"],
        "after node-b renewed its lapsed lease",
    )
    .await;
}

/// A lease long enough never to run out during a case.
pub const LONG_LEASE: Duration = Duration::from_secs(600);
/// A lease a case waits out.
pub const SHORT_LEASE: Duration = Duration::from_millis(600);
/// How long past [`SHORT_LEASE`] a case waits, for stores whose clock is behind a network.
pub const LEASE_SLACK: Duration = Duration::from_millis(400);
/// How long one operation on an unreachable store may take before it fails.
pub const UNREACHABLE_DEADLINE: Duration = Duration::from_secs(30);

/// One operation of a task in the property-based scenario. Each task owns its connection slots,
/// so its own results are deterministic, while users are shared between tasks.
#[derive(Debug, Clone, Copy)]
enum Op {
    Add(u8),
    Remove(u8),
    Reconnect(u8, u8),
}

const SLOTS: u8 = 4;
const USERS: [&str; 3] = ["ann", "Ann", "bob"];
const NODES: [&str; 2] = ["n0", "n1"];

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SLOTS).prop_map(Op::Add),
        2 => (0..SLOTS).prop_map(Op::Remove),
        1 => (0..SLOTS, 0..NODES.len() as u8).prop_map(|(s, n)| Op::Reconnect(s, n)),
    ]
}

fn slot_user(task: usize, slot: u8) -> &'static str {
    USERS[(task + usize::from(slot)) % USERS.len()]
}

fn slot_conn(task: usize, slot: u8) -> String {
    format!("t{task}s{slot}")
}

/// Runs one task's operations, checking every result against the task's own sequential model.
/// Returns the model's final state: slot → node.
async fn run_task(
    store: Arc<dyn ConnectionStore>,
    task: usize,
    ops: Vec<Op>,
) -> Result<BTreeMap<u8, &'static str>, String> {
    let mut model: BTreeMap<u8, &'static str> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Add(slot) => {
                let r = record(&slot_conn(task, slot), slot_user(task, slot), NODES[0]);
                let result = store.add(r).await;
                match (model.contains_key(&slot), result) {
                    (false, Ok(())) => {
                        model.insert(slot, NODES[0]);
                    }
                    (true, Err(StoreError::Conflict { .. })) => {}
                    (present, other) => {
                        return Err(format!(
                            "task {task} {op:?}: recorded={present}, store answered {other:?}"
                        ));
                    }
                }
            }
            Op::Remove(slot) => {
                let result = store
                    .remove(&user(slot_user(task, slot)), &conn(&slot_conn(task, slot)))
                    .await
                    .map_err(|e| format!("task {task} {op:?}: {e}"))?;
                let expected = if model.remove(&slot).is_some() {
                    Removal::Removed
                } else {
                    Removal::NotFound
                };
                if result != expected {
                    return Err(format!(
                        "task {task} {op:?}: expected {expected:?}, got {result:?}"
                    ));
                }
            }
            Op::Reconnect(slot, n) => {
                let node_name = NODES[usize::from(n)];
                let r = record(&slot_conn(task, slot), slot_user(task, slot), node_name);
                store
                    .reconnect(r)
                    .await
                    .map_err(|e| format!("task {task} {op:?}: {e}"))?;
                model.insert(slot, node_name);
            }
        }
    }
    Ok(model)
}

async fn run_scenario(store: Arc<dyn ConnectionStore>, tasks: Vec<Vec<Op>>) -> Result<(), String> {
    let handles: Vec<_> = tasks
        .into_iter()
        .enumerate()
        .map(|(task, ops)| tokio::spawn(run_task(store.clone(), task, ops)))
        .collect();
    // What the store must hold: user → {connection id → node}.
    let mut expected: BTreeMap<&'static str, BTreeMap<String, &'static str>> =
        USERS.iter().map(|u| (*u, BTreeMap::new())).collect();
    for (task, handle) in handles.into_iter().enumerate() {
        let model = handle
            .await
            .map_err(|e| format!("task {task} panicked: {e}"))??;
        for (slot, node_name) in model {
            if let Some(conns) = expected.get_mut(slot_user(task, slot)) {
                conns.insert(slot_conn(task, slot), node_name);
            }
        }
    }
    if store.capabilities().lookup {
        for (name, conns) in &expected {
            let mut actual: Vec<(String, String)> = store
                .connections(&user(name))
                .await
                .map_err(|e| format!("connections({name}): {e}"))?
                .iter()
                .map(|r| (r.id().to_string(), r.node().to_string()))
                .collect();
            actual.sort();
            let wanted: Vec<(String, String)> = conns
                .iter()
                .map(|(c, n)| (c.clone(), (*n).to_string()))
                .collect();
            if actual != wanted {
                return Err(format!(
                    "user {name}: store holds {actual:?}, model says {wanted:?}"
                ));
            }
        }
    }
    if store.capabilities().can_list_users() {
        let mut wanted: Vec<UserId> = expected
            .iter()
            .filter(|(_, conns)| !conns.is_empty())
            .map(|(name, _)| user(name))
            .collect();
        wanted.sort();
        let listed = store
            .users(PageRequest::first(100))
            .await
            .map_err(|e| format!("users(): {e}"))?
            .users;
        if listed != wanted {
            return Err(format!("listed users {listed:?}, model says {wanted:?}"));
        }
        let counts = store.counts().await.map_err(|e| format!("counts(): {e}"))?;
        let connections: usize = expected.values().map(BTreeMap::len).sum();
        if (counts.users, counts.connections) != (wanted.len() as u64, connections as u64) {
            return Err(format!(
                "counts {counts:?}, model says {} users and {connections} connections",
                wanted.len()
            ));
        }
    }
    Ok(())
}

/// Random add/remove/reconnect sequences run concurrently from several tasks (sharing users,
/// each owning its connections) end in exactly the state a sequential model predicts, and every
/// single answer along the way matches the model.
///
/// Runs [`Harness::proptest_cases`] scenarios, each on a fresh namespace (cleaned up after the
/// scenario). Not async: it builds one two-worker runtime, builds the harness with
/// `make_harness` inside it, runs every scenario in it with `block_on` (so the harness may keep
/// a connection pool across scenarios) and drops the harness inside it.
pub fn concurrent_operations_match_a_sequential_model<H: Harness>(
    make_harness: impl FnOnce() -> H,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the scenarios' runtime: {e}"));
    let _inside = runtime.enter();
    let harness = make_harness();
    let strategy = proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..24), 2..6);
    let mut runner = TestRunner::new(Config {
        cases: harness.proptest_cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |tasks| {
        runtime.block_on(async {
            let scope = Scope::new(&harness);
            scope
                .run(async {
                    let store = scope.store(&unique_namespace()).await;
                    run_scenario(store, tasks).await
                })
                .await
                .map_err(TestCaseError::fail)
        })
    });
    drop(harness);
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn slots_share_users_across_tasks() {
        let users: BTreeSet<&str> = (0..3).map(|task| slot_user(task, 0)).collect();
        assert_eq!(users.len(), USERS.len());
    }
}
