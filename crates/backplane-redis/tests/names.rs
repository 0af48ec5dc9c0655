//! Hostile user names map to literal keys: each reaches only its own subscribers, and the
//! keys in Redis are exactly the documented ones.

mod common;

use std::collections::BTreeSet;

use common::{message, namespace, node, started};
use switchboard_core::{Address, Backplane, UserId};
use switchboard_redis::RedisConfig;
use switchboard_redis::testing::RedisServer;

fn user(name: &str) -> Address {
    Address::User(UserId::new(name).expect("a valid user id"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_user_names_are_literal_keys() {
    let server = RedisServer::start();
    let names = namespace("h");
    let config = RedisConfig::new(server.url()).with_channel_names(names.clone());
    let addresses = [
        user("*"),
        user("a:b"),
        user("{x}"),
        user("user:bob"),
        user("Åsa 名前 🚀"),
        user("bob"),
    ];
    let (publisher, publisher_in) = started(config.clone(), "pub").await;
    let mut receivers = Vec::new();
    for (i, address) in addresses.iter().enumerate() {
        let (plane, inbox) = started(config.clone(), &format!("r{i}")).await;
        plane.subscribe(address).await.expect("subscribes");
        receivers.push((plane, inbox));
    }
    let origin = node("pub");
    for (i, address) in addresses.iter().enumerate() {
        let seq = u64::try_from(i).expect("fits") + 1;
        let reach = publisher
            .publish(&message(&origin, seq, address.clone(), format!("to {i}")))
            .await
            .expect("publishes");
        assert_eq!(reach.nodes, Some(1), "{address} has one subscriber");
    }
    // A marker to every receiver, after the data: once it is in, the data is too.
    for (i, (_, inbox)) in receivers.iter().enumerate() {
        let to = Address::Node(node(&format!("r{i}")));
        publisher
            .publish(&message(&origin, 100 + i as u64, to, "marker"))
            .await
            .expect("publishes");
        inbox.wait_for(2).await;
        assert_eq!(inbox.texts(), [format!("to {i}"), "marker".to_owned()]);
    }
    assert!(publisher_in.all().is_empty());

    let mut want = BTreeSet::new();
    want.insert(format!("{}:epoch", names.prefix()));
    let pub_inbox = names.channel(&Address::Node(node("pub")));
    want.insert(format!("{pub_inbox}:alive"));
    for (i, address) in addresses.iter().enumerate() {
        let inbox = names.channel(&Address::Node(node(&format!("r{i}"))));
        want.insert(format!("{inbox}:alive"));
        want.insert(inbox);
        want.insert(format!("{}:members", names.channel(address)));
    }
    let got: BTreeSet<String> = server
        .keys_under(names.prefix())
        .await
        .expect("keys")
        .into_iter()
        .collect();
    assert_eq!(got, want);
    let members = format!("{}:members", names.channel(&user("*")));
    assert_eq!(members, format!("{}:user:%2A:members", names.prefix()));
    for key in &got {
        let rest = &key[names.prefix().len()..];
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._%:".contains(&b)),
            "{key:?} holds a character that could act as a pattern or hash tag"
        );
    }

    for (plane, _) in &receivers {
        plane.stop().await;
    }
    publisher.stop().await;
    // A stopped node leaves nothing behind but the epoch.
    let left: Vec<String> = server.keys_under(names.prefix()).await.expect("keys");
    assert_eq!(left, [format!("{}:epoch", names.prefix())]);
}

/// The backplane's own commands never match keys by pattern.
#[test]
fn no_command_matches_keys_by_pattern() {
    let source = include_str!("../src/backplane.rs");
    for command in [
        "\"KEYS\"",
        "\"SCAN\"",
        "PSUBSCRIBE",
        "\"SUBSCRIBE\"",
        "\"PUBLISH\"",
    ] {
        assert!(!source.contains(command), "the backplane sends {command}");
    }
    assert!(
        source.contains("\"XREAD\""),
        "the check reads the backplane's source"
    );
}
