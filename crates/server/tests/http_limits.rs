//! The HTTP server's limits against slow-loris clients and connection floods: header-read
//! and idle timeouts, the request timeout, the request-head size, and the connection caps.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::{PATIENCE, TestServer};
use serde_json::{Value, json};
use switchboard::http::HttpLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const OTHER_LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A TCP connection that has not sent anything.
async fn silent(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// Waits (up to [`PATIENCE`]) until the server closes `stream`, ignoring anything it sends.
/// Panics if it stays open.
async fn closed_by_server(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server left the connection open");
}

/// A slow-loris client: sends a request head one header line at a time, one every 100 ms,
/// forever. Returns once the server closes the connection; panics if it stays open for
/// [`PATIENCE`].
async fn trickle_head(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let closed = tokio::time::timeout(PATIENCE, async {
        if stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n")
            .await
            .is_err()
        {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                },
                _ = tick.tick() => {
                    if stream.write_all(b"x-slow: loris\r\n").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept reading a head that never ends"
    );
}

/// Reads one HTTP response (head and `content-length` body) off `stream`; returns the
/// status, the head and the body.
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(end) = find(&data, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&data[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |value| value.trim().parse().expect("content-length"));
                if data.len() >= end + 4 + length {
                    return;
                }
            }
            let n = stream.read(&mut buf).await.expect("read the response");
            assert!(n > 0, "the connection closed before a complete response");
            data.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response in time");
    let end = find(&data, b"\r\n\r\n").expect("a head");
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let body = String::from_utf8_lossy(&data[end + 4..]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, head, body)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn error_of(body: &str) -> String {
    let json: Value = serde_json::from_str(body).expect("a JSON body");
    json["error"].as_str().expect("an error message").to_owned()
}

/// Requests `/healthz` from `local` until it is served, for up to [`PATIENCE`].
async fn served_again(server: &TestServer, local: IpAddr) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = server.http_from(local, "GET", "/healthz", &[], "").await;
        if status == 200 {
            return;
        }
        assert_eq!(status, 503, "unexpected answer: {body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "{local} is still refused: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed_while_a_healthy_client_connects() {
    let server = TestServer::start_limited(
        HttpLimits::default().with_header_read_timeout(Duration::from_secs(1)),
    )
    .await;
    let mut attack = JoinSet::new();
    for _ in 0..50 {
        let stream = silent(server.addr).await;
        attack.spawn(closed_by_server(stream));
        attack.spawn(trickle_head(server.addr));
    }

    // Meanwhile a well-behaved client negotiates and connects its WebSocket.
    let negotiated = server.negotiate("alice").await;
    let token = negotiated["connectionToken"]
        .as_str()
        .expect("a connection token");
    let mut alice = server
        .open(&format!("?id={token}"), Some(&server.token("alice")))
        .await
        .expect("the WebSocket is accepted");
    alice.handshake().await;

    while let Some(done) = attack.join_next().await {
        done.expect("every attacking connection is closed by the server");
    }
    // The WebSocket outlived the header-read timeout: it is not subject to it.
    let completion = alice
        .invoke("1", "SendChatMessage", json!(["alice", "still here"]))
        .await;
    assert!(
        completion.get("error").is_none(),
        "the hub answers: {completion}"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let server = TestServer::start_limited(
        HttpLimits::default().with_header_read_timeout(Duration::from_secs(1)),
    )
    .await;
    let mut stream = silent(server.addr).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .expect("write");
    let (status, head, _) = read_response(&mut stream).await;
    assert_eq!(status, 200);
    assert!(
        !head.to_lowercase().contains("connection: close"),
        "the server keeps the connection alive after the response: {head}"
    );
    closed_by_server(stream).await;
}

#[tokio::test]
async fn the_per_address_cap_refuses_one_address_and_serves_others() {
    let server = TestServer::start_limited(
        HttpLimits::default()
            .with_header_read_timeout(Duration::from_secs(60))
            .with_max_connections_per_address(3),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(silent(server.addr).await);
    }

    let (status, body) = server
        .http_from(LOCALHOST, "GET", "/healthz", &[], "")
        .await;
    assert_eq!(
        status, 503,
        "the fourth connection from 127.0.0.1 is refused"
    );
    assert_eq!(
        error_of(&body),
        "too many connections from your address (limit 3)"
    );

    let (status, body) = server
        .http_from(OTHER_LOOPBACK, "GET", "/healthz", &[], "")
        .await;
    assert_eq!(status, 200, "another address is served: {body}");

    drop(held);
    served_again(&server, LOCALHOST).await;
}

#[tokio::test]
async fn the_global_cap_counts_websockets_until_they_close() {
    let server = TestServer::start_limited(
        HttpLimits::default()
            .with_header_read_timeout(Duration::from_secs(60))
            .with_max_connections(3)
            .with_max_connections_per_address(0),
    )
    .await;
    let mut alice = server.connect("alice").await;
    let held = [silent(server.addr).await, silent(server.addr).await];

    for local in [LOCALHOST, OTHER_LOOPBACK] {
        let (status, body) = server.http_from(local, "GET", "/healthz", &[], "").await;
        assert_eq!(
            status, 503,
            "one WebSocket and two silent sockets fill the cap"
        );
        assert_eq!(
            error_of(&body),
            "too many connections to this server (limit 3)"
        );
    }

    alice.ws.close(None).await.expect("close the WebSocket");
    // Its place is free once the server drops the socket; the silent ones still hold theirs.
    served_again(&server, OTHER_LOOPBACK).await;
    drop(held);
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let server =
        TestServer::start_limited(HttpLimits::default().with_max_request_head(16 * 1024)).await;
    let fits = "a".repeat(12 * 1024);
    let (status, body) = server
        .http("GET", "/healthz", &[("x-padding", &fits)], "")
        .await;
    assert_eq!(status, 200, "a 12 KiB head is within the limit: {body}");

    let mut stream = silent(server.addr).await;
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: test\r\nx-padding: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    // Read while writing: the server answers before it has read the whole head.
    let (mut reader, mut writer) = stream.split();
    let write = async move {
        let _ = writer.write_all(request.as_bytes()).await;
    };
    let read = async move {
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = reader.read(&mut buf).await {
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&response).into_owned()
    };
    let ((), response) = tokio::time::timeout(PATIENCE, async { tokio::join!(write, read) })
        .await
        .expect("an answer in time");
    assert!(
        response.starts_with("HTTP/1.1 431 "),
        "a 20 KiB head gets 431, got {response:?}"
    );
    stream.shutdown().await.ok();
}

#[tokio::test]
async fn a_request_body_that_trickles_in_is_cut_off_by_the_request_timeout() {
    let server = TestServer::start_limited(
        HttpLimits::default()
            .with_header_read_timeout(Duration::from_secs(30))
            .with_request_timeout(Duration::from_secs(1)),
    )
    .await;
    let mut alice = server.connect("alice").await;

    let mut stream = silent(server.addr).await;
    stream
        .write_all(
            b"POST /auth/dev-token HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
              content-length: 1000\r\n\r\n{\"user\": \"",
        )
        .await
        .expect("write the head");
    // One byte every 100 ms would take well over a minute for the whole body.
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut writing = true;
    tokio::time::timeout(PATIENCE, async {
        loop {
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => response.extend_from_slice(&buf[..n]),
                },
                _ = tick.tick(), if writing => {
                    writing = stream.write_all(b"a").await.is_ok();
                }
            }
        }
    })
    .await
    .expect("the server cuts the request off");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 408 "),
        "the client is told the request timed out: {response:?}"
    );
    assert!(response.contains("the request took longer than 1000 ms"));

    // A WebSocket lives longer than the request timeout.
    let completion = alice
        .invoke("1", "SendChatMessage", json!(["alice", "still here"]))
        .await;
    assert!(
        completion.get("error").is_none(),
        "the hub answers: {completion}"
    );
}
