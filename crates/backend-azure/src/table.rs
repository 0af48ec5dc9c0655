//! The seam between the store's logic and the Table service client.
//!
//! Everything the store asks of the service goes through [`Table`]: insert, upsert, delete,
//! point read, query, delete batches, create and delete the table. Its answers are plain
//! values and one error type, [`Failure`], so that the client behind it (today the
//! `azure_data_tables` SDK) could be replaced by speaking the Table REST API directly without
//! touching the store.
//!
//! What this layer works around in the SDK:
//!
//! * the SDK's own retry policy is switched off (it retried Azurite's 500 answers for about a
//!   minute); the store retries transient failures itself, within a budget of seconds;
//! * the SDK's default HTTP client keeps no idle connections; ours keeps them alive (closing
//!   them before Azurite's 5 s keep-alive runs out, so a pooled connection is not reused
//!   just as the server closes it);
//! * every request has a timeout of its own;
//! * a failed entity-group transaction comes back as success with per-operation statuses, so
//!   [`Table::delete_batch`] reads the statuses;
//! * keys are never escaped by the SDK: the store only passes keys from
//!   [`keys::encode`](crate::keys::encode), which hold no character that needs escaping.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use azure_core::error::ErrorKind;
use azure_core::{Etag, RetryOptions, TransportOptions};
use azure_data_tables::clients::TableServiceClientBuilder;
use azure_data_tables::prelude::*;
use futures_util::StreamExt as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::AzureConfig;

/// How long an idle pooled connection is kept. Node's HTTP server (Azurite) closes idle
/// connections after 5 s; the real service keeps them longer.
const POOL_IDLE: Duration = Duration::from_secs(4);

/// The most operations the service accepts in one entity-group transaction.
pub(crate) const MAX_BATCH: usize = 100;

/// Why a request failed.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The service answered with an error status.
    Status {
        /// The HTTP status.
        status: u16,
        /// The service's error code (`TableNotFound`, `AuthenticationFailed`, ...).
        code: String,
    },
    /// The request did not reach the service, or the connection broke.
    Transport(String),
    /// No answer within the request timeout.
    Timeout(Duration),
    /// The answer could not be read.
    Decode(String),
}

impl Failure {
    /// Whether trying again later can help: the service was unreachable, slow, busy
    /// (503 ServerBusy, 500 from throttling or an internal error, 408, 429, 502, 504).
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Timeout(_) => true,
            Self::Status { status, .. } => matches!(status, 408 | 429 | 500 | 502 | 503 | 504),
            Self::Decode(_) => false,
        }
    }

    /// Whether the table itself is missing (deleted, or an emulator restarted without data).
    pub(crate) fn is_table_missing(&self) -> bool {
        matches!(self, Self::Status { status: 404, code } if code == "TableNotFound")
    }

    fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status { status, code } if code.is_empty() => {
                write!(f, "the table service answered {status}")
            }
            Self::Status { status, code } => {
                write!(f, "the table service answered {status} {code}")?;
                match (*status, code.as_str()) {
                    (403, _) => f.write_str(
                        " (check the account name and key in the connection string, and the \
                         clock of this machine)",
                    ),
                    _ => Ok(()),
                }
            }
            Self::Transport(message) => write!(f, "the table service cannot be reached: {message}"),
            Self::Timeout(after) => write!(f, "the table service did not answer within {after:?}"),
            Self::Decode(message) => {
                write!(f, "the table service's answer is unreadable: {message}")
            }
        }
    }
}

impl std::error::Error for Failure {}

fn failure(error: azure_core::Error) -> Failure {
    match error.kind() {
        ErrorKind::HttpResponse { status, error_code } => Failure::Status {
            status: u16::from(*status),
            code: error_code.clone().unwrap_or_default(),
        },
        ErrorKind::Io => Failure::Transport(error_chain(&error)),
        ErrorKind::DataConversion => Failure::Decode(error_chain(&error)),
        _ => Failure::Transport(error_chain(&error)),
    }
}

/// The error and its sources, on one line (the SDK's top-level messages say little), with
/// the query of every URL in it cut off: with shared access signature credentials the query
/// holds the signature, which must never reach a log or an error message.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    redact_queries(&chain_text(error))
}

fn chain_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// `text` with the query string of every `http://` or `https://` URL replaced by `?…`.
fn redact_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let next_url = |text: &str| {
        [text.find("http://"), text.find("https://")]
            .into_iter()
            .flatten()
            .min()
    };
    while let Some(start) = next_url(rest) {
        out.push_str(&rest[..start]);
        let url = &rest[start..];
        let end = url
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>'))
            .unwrap_or(url.len());
        match url[..end].find('?') {
            Some(query) => {
                out.push_str(&url[..query]);
                out.push_str("?…");
            }
            None => out.push_str(&url[..end]),
        }
        rest = &url[end..];
    }
    out.push_str(rest);
    out
}

/// What [`Table::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// The entity is new.
    Created,
    /// An entity with these keys exists; nothing changed.
    AlreadyExists,
}

/// What [`Table::delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deleted {
    /// The entity is gone.
    Gone,
    /// There was no such entity.
    NotFound,
    /// The entity changed since the ETag the delete was conditional on; it stays.
    Changed,
}

/// What [`Table::delete_batch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchOutcome {
    /// Every delete in the batch happened.
    AllDeleted,
    /// The transaction failed as a whole (one entity was missing or had changed); nothing
    /// was deleted.
    RolledBack,
}

/// An entity as read back, with the service's ETag and timestamp.
#[derive(Debug, Clone, serde::Deserialize)]
pub(crate) struct Read<T> {
    #[serde(rename = "odata.etag")]
    pub(crate) etag: String,
    #[serde(rename = "Timestamp", default)]
    pub(crate) timestamp: String,
    #[serde(flatten)]
    pub(crate) entity: T,
}

/// One table on one account; cheap to clone.
#[derive(Clone)]
pub(crate) struct Table {
    client: TableClient,
    timeout: Duration,
    turns: Arc<tokio::sync::Semaphore>,
}

impl fmt::Debug for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.client.table_name())
            .finish_non_exhaustive()
    }
}

impl Table {
    /// A client for the configured table. No I/O.
    pub(crate) fn new(config: &AzureConfig) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(POOL_IDLE)
            .tcp_nodelay(true)
            .connect_timeout(config.request_timeout)
            .build()
            .map_err(|e| Failure::Transport(format!("cannot build the HTTP client: {e}")))?;
        let service = TableServiceClientBuilder::with_location(
            config.location.clone(),
            config.credentials.clone(),
        )
        .retry(RetryOptions::none())
        .transport(TransportOptions::new(Arc::new(http)))
        .build();
        Ok(Self {
            client: service.table_client(config.table.clone()),
            timeout: config.request_timeout,
            turns: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
        })
    }

    /// The table's name.
    pub(crate) fn name(&self) -> &str {
        self.client.table_name()
    }

    /// Waits for a turn (at most the request timeout), then runs `request` within the
    /// request timeout.
    async fn bounded<T>(
        &self,
        request: impl Future<Output = azure_core::Result<T>>,
    ) -> Result<T, Failure> {
        let _turn = self.turn().await?;
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result.map_err(failure),
            Err(_) => Err(Failure::Timeout(self.timeout)),
        }
    }

    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Failure> {
        match tokio::time::timeout(self.timeout, self.turns.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed.
            Ok(Err(_)) | Err(_) => Err(Failure::Timeout(self.timeout)),
        }
    }

    /// Creates the table; an existing table is success.
    pub(crate) async fn create(&self) -> Result<(), Failure> {
        match self.bounded(self.client.create().into_future()).await {
            Ok(_) => Ok(()),
            Err(Failure::Status { status: 409, .. }) => Ok(()),
            Err(other) => Err(other),
        }
    }

    /// Deletes the table; a missing table is success.
    pub(crate) async fn delete_table(&self) -> Result<(), Failure> {
        match self.bounded(self.client.delete().into_future()).await {
            Ok(_) => Ok(()),
            Err(Failure::Status { status: 404, .. }) => Ok(()),
            Err(other) => Err(other),
        }
    }

    /// Inserts `entity` (which carries its keys).
    pub(crate) async fn insert(&self, entity: &impl Serialize) -> Result<Inserted, Failure> {
        let request = self
            .client
            .insert::<_, serde_json::Value>(entity)
            .map_err(|e| Failure::Decode(error_chain(&e)))?;
        match self.bounded(request.into_future()).await {
            Ok(_) => Ok(Inserted::Created),
            Err(Failure::Status { status: 409, code }) if code != "TableBeingDeleted" => {
                Ok(Inserted::AlreadyExists)
            }
            Err(other) => Err(other),
        }
    }

    /// Inserts or replaces the entity at `(partition, row)`; answers its new ETag.
    pub(crate) async fn upsert(
        &self,
        partition: &str,
        row: &str,
        entity: &impl Serialize,
    ) -> Result<String, Failure> {
        let request = self
            .client
            .partition_key_client(partition)
            .entity_client(row)
            .insert_or_replace(entity)
            .map_err(|e| Failure::Decode(error_chain(&e)))?;
        let response = self.bounded(request.into_future()).await?;
        Ok(response.etag.to_string())
    }

    /// Deletes the entity at `(partition, row)`, only if its ETag is still `if_match` when
    /// given.
    pub(crate) async fn delete(
        &self,
        partition: &str,
        row: &str,
        if_match: Option<&str>,
    ) -> Result<Deleted, Failure> {
        let condition = match if_match {
            Some(etag) => IfMatchCondition::Etag(Etag::from(etag.to_owned())),
            None => IfMatchCondition::Any,
        };
        let request = self
            .client
            .partition_key_client(partition)
            .entity_client(row)
            .delete()
            .if_match(condition);
        match self.bounded(request.into_future()).await {
            Ok(_) => Ok(Deleted::Gone),
            Err(f) if f.status() == Some(404) && !f.is_table_missing() => Ok(Deleted::NotFound),
            Err(f) if f.status() == Some(412) => Ok(Deleted::Changed),
            Err(other) => Err(other),
        }
    }

    /// Reads the entity at `(partition, row)`, `None` when there is none.
    pub(crate) async fn get<T: DeserializeOwned + Send + Sync>(
        &self,
        partition: &str,
        row: &str,
    ) -> Result<Option<Read<T>>, Failure> {
        let request = self
            .client
            .partition_key_client(partition)
            .entity_client(row)
            .get::<serde_json::Value>();
        match self.bounded(request.into_future()).await {
            Ok(response) => serde_json::from_value(response.entity)
                .map(Some)
                .map_err(|e| Failure::Decode(e.to_string())),
            Err(f) if f.status() == Some(404) && !f.is_table_missing() => Ok(None),
            Err(other) => Err(other),
        }
    }

    /// Every entity matching `filter`, all pages, with only the `select`ed properties (and
    /// the keys, ETag and timestamp). Each page is one request, bounded by the timeout.
    pub(crate) async fn query<T: DeserializeOwned + Send + Sync>(
        &self,
        filter: String,
        select: &'static str,
    ) -> Result<Vec<Read<T>>, Failure> {
        let mut pages = self
            .client
            .query()
            .filter(Filter::new(filter))
            .select(Select::new(select))
            .into_stream::<Read<T>>();
        let mut all = Vec::new();
        loop {
            let turn = self.turn().await?;
            let page = match tokio::time::timeout(self.timeout, pages.next()).await {
                Err(_) => return Err(Failure::Timeout(self.timeout)),
                Ok(None) => break,
                Ok(Some(page)) => page.map_err(failure)?,
            };
            drop(turn);
            all.extend(page.entities);
        }
        Ok(all)
    }

    /// Deletes the entities `rows` of one partition in one entity-group transaction (at most
    /// [`MAX_BATCH`]), each only if its ETag is unchanged. The service applies all or none.
    pub(crate) async fn delete_batch(
        &self,
        partition: &str,
        rows: &[(String, String)],
    ) -> Result<BatchOutcome, Failure> {
        let mut transaction = self.client.partition_key_client(partition).transaction();
        for (row, etag) in rows {
            transaction = transaction
                .delete(
                    row.as_str(),
                    Some(IfMatchCondition::Etag(Etag::from(etag.clone()))),
                )
                .map_err(|e| Failure::Decode(error_chain(&e)))?;
        }
        let response = self.bounded(transaction.into_future()).await?;
        // A failed changeset answers 202 with the status of the operation that failed.
        let failed = response
            .operation_responses
            .iter()
            .find(|op| !u16::from(op.status_code).to_string().starts_with('2'));
        match failed {
            None if response.operation_responses.len() == rows.len() => {
                Ok(BatchOutcome::AllDeleted)
            }
            None => Err(Failure::Decode(format!(
                "a transaction of {} deletes answered {} statuses",
                rows.len(),
                response.operation_responses.len()
            ))),
            Some(op) => match u16::from(op.status_code) {
                404 | 412 => Ok(BatchOutcome::RolledBack),
                status => Err(Failure::Status {
                    status,
                    code: String::new(),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_in_urls_never_reach_messages() {
        let text = "error sending request for url (http://127.0.0.1:1/acct/Tables?sv=2019-02-02&sig=SECRET): \
                    connection refused; see https://example.invalid/x?sig=OTHER and http://h/p";
        let redacted = redact_queries(text);
        assert!(
            !redacted.contains("SECRET") && !redacted.contains("OTHER"),
            "{redacted}"
        );
        assert_eq!(
            redacted,
            "error sending request for url (http://127.0.0.1:1/acct/Tables?…): connection \
             refused; see https://example.invalid/x?… and http://h/p"
        );
    }
}
