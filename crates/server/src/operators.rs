//! What `switchboard users` and `switchboard connections <user>` print: the configured store,
//! read directly, without a running server.
//!
//! Only stores that outlive the server process hold anything for another process to read
//! (`sql`, `azure`); the in-memory map and per-node groups live inside each server, so the
//! commands answer [`OperatorError::Unsupported`] for them. Like lookups, the answers leave
//! out the records of nodes whose lease has expired, from the moment it expires.

use std::time::SystemTime;

use serde::Serialize;
use switchboard_core::{ConnectionRecord, ConnectionStore, PageRequest, StoreError, UserId};

/// Users read per page while listing.
const PAGE: usize = 500;

/// Why an operator command could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    /// The store cannot answer this from outside the server.
    #[error("Unsupported: {0}")]
    Unsupported(String),
    /// The user id is not one a token could carry.
    #[error("invalid user id: {0}")]
    InvalidUser(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks that `store` holds records another process can read.
fn readable(store: &dyn ConnectionStore, what: &str) -> Result<(), OperatorError> {
    let caps = store.capabilities();
    if !caps.survives_restart {
        return Err(OperatorError::Unsupported(format!(
            "the `{}` store keeps its records inside each server process, so {what} cannot be \
             read from outside it; the sql and azure stores can",
            caps.strategy
        )));
    }
    Ok(())
}

/// Every connected user, in ascending byte order of their ids.
///
/// # Errors
///
/// [`OperatorError::Unsupported`] for stores that cannot list users or keep them in the
/// server's memory; store failures.
pub async fn list_users(store: &dyn ConnectionStore) -> Result<Vec<UserId>, OperatorError> {
    readable(store, "the connected users")?;
    let mut users = Vec::new();
    let mut page = PageRequest::first(PAGE);
    loop {
        let answer = store.users(page.clone()).await.map_err(unsupported)?;
        users.extend(answer.users);
        match answer.next {
            Some(next) => page.after = Some(next),
            None => return Ok(users),
        }
    }
}

/// The live connections of `user`, oldest first.
///
/// # Errors
///
/// [`OperatorError::InvalidUser`] for an id no token could carry; as [`list_users`].
pub async fn user_connections(
    store: &dyn ConnectionStore,
    user: &str,
) -> Result<Vec<ConnectionRecord>, OperatorError> {
    readable(store, "a user's connections")?;
    let user = UserId::new(user).map_err(|e| OperatorError::InvalidUser(e.to_string()))?;
    let mut records = store.connections(&user).await.map_err(unsupported)?;
    records.sort_by(|a, b| {
        (a.connected_at(), a.id().as_str()).cmp(&(b.connected_at(), b.id().as_str()))
    });
    Ok(records)
}

fn unsupported(e: StoreError) -> OperatorError {
    if e.is_unsupported() {
        OperatorError::Unsupported(e.to_string())
    } else {
        OperatorError::Store(e)
    }
}

/// One connection as `connections --json` prints it.
#[derive(Debug, Serialize)]
struct ConnectionJson<'a> {
    id: &'a str,
    node: &'a str,
    user_agent: Option<&'a str>,
    connected_at: String,
}

fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// `users --json`: one JSON array of user ids.
pub fn users_json(users: &[UserId]) -> String {
    let ids: Vec<&str> = users.iter().map(UserId::as_str).collect();
    serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned())
}

/// `connections --json`: one JSON array of objects with `id` (the connection id clients get
/// from negotiate), `node`, `user_agent` (or null) and `connected_at` (RFC 3339, UTC).
pub fn connections_json(records: &[ConnectionRecord]) -> String {
    let rows: Vec<ConnectionJson<'_>> = records
        .iter()
        .map(|r| ConnectionJson {
            id: r.id().as_str(),
            node: r.node().as_str(),
            user_agent: r.user_agent(),
            connected_at: timestamp(r.connected_at()),
        })
        .collect();
    serde_json::to_string(&rows).unwrap_or_else(|_| "[]".to_owned())
}

/// `users`: one user per line under a header, and a count.
pub fn users_table(users: &[UserId]) -> String {
    let mut out = String::from("USER\n");
    for user in users {
        out.push_str(&printable(user.as_str()));
        out.push('\n');
    }
    out.push_str(&format!("({} connected)\n", users.len()));
    out
}

/// `connections <user>`: one connection per line, columns aligned.
pub fn connections_table(records: &[ConnectionRecord]) -> String {
    let rows: Vec<[String; 4]> = records
        .iter()
        .map(|r| {
            [
                r.id().as_str().to_owned(),
                printable(r.node().as_str()),
                timestamp(r.connected_at()),
                printable(r.user_agent().unwrap_or("-")),
            ]
        })
        .collect();
    let header = [
        "CONNECTION".to_owned(),
        "NODE".to_owned(),
        "CONNECTED AT".to_owned(),
        "USER AGENT".to_owned(),
    ];
    let mut widths = header.clone().map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, width))| {
                if i + 1 == row.len() {
                    cell.clone()
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("({} connections)\n", records.len()));
    out
}

/// Control characters escaped, so a hostile user name or user agent cannot drive the
/// operator's terminal.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use switchboard_core::{ConnectionId, NodeId};
    use switchboard_memory::MemoryStore;

    use super::*;

    fn record(id: &str, user: &str) -> ConnectionRecord {
        ConnectionRecord::new(
            ConnectionId::new(id).expect("valid"),
            UserId::new(user).expect("valid"),
            NodeId::new("n1").expect("valid"),
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
        )
        .with_user_agent("Mozilla\u{1b}[31m")
    }

    #[test]
    fn json_has_the_documented_fields() {
        let json = connections_json(&[record("n1~abc", "alice")]);
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(
            value,
            serde_json::json!([{
                "id": "n1~abc",
                "node": "n1",
                "user_agent": "Mozilla\u{1b}[31m",
                "connected_at": "2023-11-14T22:13:20.123Z",
            }])
        );
        let users = users_json(&[UserId::new("a\"b").expect("valid")]);
        assert_eq!(
            serde_json::from_str::<Vec<String>>(&users).expect("an array"),
            ["a\"b"]
        );
    }

    #[test]
    fn tables_escape_control_characters() {
        let table = connections_table(&[record("n1~abc", "alice")]);
        assert!(!table.contains('\u{1b}'), "{table}");
        assert!(table.contains("Mozilla\\u{1b}[31m"), "{table}");
        assert!(table.ends_with("(1 connections)\n"));
    }

    #[tokio::test]
    async fn stores_inside_the_server_are_unsupported() {
        let store = MemoryStore::new();
        let err = list_users(&store).await.expect_err("memory is per process");
        assert!(matches!(err, OperatorError::Unsupported(_)), "{err}");
        assert!(
            err.to_string()
                .starts_with("Unsupported: the `memory` store")
        );
        let err = user_connections(&store, "alice")
            .await
            .expect_err("memory is per process");
        assert!(matches!(err, OperatorError::Unsupported(_)), "{err}");
    }
}
