//! Authentication and connection setup: negotiate, the WebSocket upgrade, and the
//! skipNegotiation path all require a valid token; identity comes only from the token.

mod common;

use std::time::Duration;

use common::{SECRET, TestServer};
use serde_json::{Value, json};
use switchboard::HubOptions;
use switchboard::auth::{Authenticator, JwtConfig};
use switchboard::chat::PATH;
use switchboard_core::UserId;

fn forged_token(user: &str) -> String {
    let other = Authenticator::new(
        JwtConfig::new("another-secret-that-is-long-enough-0123456789").expect("secret"),
    );
    other.issue(&UserId::new(user).expect("user"), Duration::from_secs(600))
}

/// A correctly signed token that expired in 2001, far beyond any leeway.
fn expired_token(user: &str) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(json!({"sub": user, "exp": 1_000_000_000}).to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(format!("{header}.{claims}").as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    format!("{header}.{claims}.{signature}")
}

async fn negotiate_status(server: &TestServer, headers: &[(&str, &str)]) -> (u16, String) {
    server
        .http(
            "POST",
            &format!("{PATH}/negotiate?negotiateVersion=1"),
            headers,
            "",
        )
        .await
}

#[tokio::test]
async fn negotiate_requires_a_valid_token() {
    let server = TestServer::start(HubOptions::default()).await;
    let forged = format!("Bearer {}", forged_token("alice"));
    let expired = format!("Bearer {}", expired_token("alice"));
    for headers in [
        vec![],
        vec![("authorization", "Bearer not-a-jwt")],
        vec![("authorization", forged.as_str())],
        vec![("authorization", expired.as_str())],
        vec![("authorization", "Basic YWxpY2U6cGFzcw==")],
    ] {
        let (status, body) = negotiate_status(&server, &headers).await;
        assert_eq!(status, 401, "{headers:?} → {body}");
        let error: Value = serde_json::from_str(&body).expect("JSON error");
        assert!(error["error"].is_string());
        assert!(!body.contains("not-a-jwt"), "tokens are never echoed");
    }
}

#[tokio::test]
async fn negotiate_answers_version_1_with_a_separate_secret_token() {
    let server = TestServer::start(HubOptions::default()).await;
    let answer = server.negotiate("alice").await;
    assert_eq!(answer["negotiateVersion"], 1);
    let id = answer["connectionId"].as_str().expect("connectionId");
    let token = answer["connectionToken"].as_str().expect("connectionToken");
    assert_ne!(id, token);
    assert!(token.len() >= 40, "unguessable: {token}");
    assert!(
        token
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "URL-safe: {token}"
    );
    assert_eq!(
        answer["availableTransports"],
        json!([{"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}])
    );
    assert!(answer.get("useStatefulReconnect").is_none());
}

#[tokio::test]
async fn negotiate_version_0_has_no_token_and_the_id_attaches() {
    let server = TestServer::start(HubOptions::default()).await;
    let auth = format!("Bearer {}", server.token("alice"));
    let (status, body) = server
        .http(
            "POST",
            &format!("{PATH}/negotiate"),
            &[("authorization", &auth)],
            "",
        )
        .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["negotiateVersion"], 0);
    assert!(answer.get("connectionToken").is_none());
    let id = answer["connectionId"].as_str().expect("id");
    let mut client = server
        .open(&format!("?id={id}"), Some(&server.token("alice")))
        .await
        .expect("attaches");
    client.handshake().await;
}

#[tokio::test]
async fn the_websocket_attaches_once_and_only_for_its_user() {
    let server = TestServer::start(HubOptions::default()).await;
    let answer = server.negotiate("alice").await;
    let token = answer["connectionToken"].as_str().expect("token");
    let query = format!("?id={token}");

    assert_eq!(
        server
            .open(&query, Some(&server.token("mallory")))
            .await
            .err(),
        Some(403),
        "another user cannot take the connection"
    );
    assert_eq!(
        server
            .open("?id=unknown-token", Some(&server.token("alice")))
            .await
            .err(),
        Some(404)
    );
    let mut client = server
        .open(&query, Some(&server.token("alice")))
        .await
        .expect("attaches");
    assert_eq!(
        server
            .open(&query, Some(&server.token("alice")))
            .await
            .err(),
        Some(409),
        "a second transport for the same connection is refused"
    );
    client.handshake().await;
    // The hub sees the public id, not the token.
    let records = server
        .store
        .connections(&UserId::new("alice").expect("user"))
        .await
        .expect("lookup");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].id().as_str(), answer["connectionId"]);
    drop(client);
    server.wait_for_connections(0).await;
    assert_eq!(
        server
            .open(&query, Some(&server.token("alice")))
            .await
            .err(),
        Some(404),
        "a closed connection's token is gone"
    );
}

#[tokio::test]
async fn the_upgrade_requires_a_token_even_with_skip_negotiation() {
    let server = TestServer::start(HubOptions::default()).await;
    assert_eq!(server.open("", None).await.err(), Some(401));
    assert_eq!(
        server.open("", Some(&forged_token("alice"))).await.err(),
        Some(401)
    );
    assert_eq!(
        server.open("", Some(&expired_token("alice"))).await.err(),
        Some(401)
    );
    // A negotiated id does not replace the token either.
    let answer = server.negotiate("alice").await;
    let token = answer["connectionToken"].as_str().expect("token");
    assert_eq!(
        server.open(&format!("?id={token}"), None).await.err(),
        Some(401)
    );
}

#[tokio::test]
async fn browsers_send_the_token_as_access_token() {
    let server = TestServer::start(HubOptions::default()).await;
    let answer = server.negotiate("alice").await;
    let id = answer["connectionToken"].as_str().expect("token");
    let query = format!("?id={id}&access_token={}", server.token("alice"));
    let mut client = server
        .open(&query, None)
        .await
        .expect("authorized by query");
    client.handshake().await;
    assert_eq!(
        server
            .open(&format!("?access_token={}", forged_token("alice")), None)
            .await
            .err(),
        Some(401)
    );
}

#[tokio::test]
async fn the_sender_is_who_the_token_says() {
    let server = TestServer::start(HubOptions::default()).await;
    let mut bob = server.connect("bob").await;
    let mut alice = server.connect("alice").await;
    // Nothing the client sends can change its identity.
    let completion = alice
        .invoke("1", "SendChatMessage", json!(["bob", "hi", "from: admin"]))
        .await;
    assert!(
        completion["error"].is_string(),
        "extra arguments are refused"
    );
    alice
        .invoke("2", "SendChatMessage", json!(["bob", "hi"]))
        .await;
    let message = bob.next_message().await.expect("message");
    assert_eq!(message["arguments"], json!(["alice: hi"]));
}

#[tokio::test]
async fn dev_tokens_are_issued_for_valid_names_only() {
    let server = TestServer::start(HubOptions::default()).await;
    let (status, body) = server
        .http(
            "POST",
            "/auth/dev-token",
            &[("content-type", "application/json")],
            r#"{"user":" carol "}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["user"], "carol");
    let token = answer["token"].as_str().expect("token");
    let mut client = server.open("", Some(token)).await.expect("valid token");
    client.handshake().await;
    let (status, _) = server
        .http(
            "POST",
            "/auth/dev-token",
            &[("content-type", "application/json")],
            r#"{"user":"   "}"#,
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn health_reports_the_store() {
    let server = TestServer::start(HubOptions::default()).await;
    let (status, body) = server.http("GET", "/healthz", &[], "").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"], "memory");
}

#[tokio::test]
async fn negotiations_waiting_for_a_websocket_are_bounded() {
    let server = TestServer::start(HubOptions::default().with_max_pending_negotiations(2)).await;
    let first = server.negotiate("alice").await;
    server.negotiate("alice").await;
    let auth = format!("Bearer {}", server.token("alice"));
    let (status, body) = negotiate_status(&server, &[("authorization", &auth)]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many connections are being negotiated"));
    // Attaching one frees its place; attached connections do not count.
    let token = first["connectionToken"].as_str().expect("token");
    let mut client = server
        .open(&format!("?id={token}"), Some(&server.token("alice")))
        .await
        .expect("attach");
    client.handshake().await;
    server.negotiate("alice").await;
}
