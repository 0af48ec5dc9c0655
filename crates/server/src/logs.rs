//! How the server writes its logs: readable text for people, or one JSON object per line for
//! log pipelines (`--log-format json`).
//!
//! Every JSON line carries the node id (`"node"`), the level, the target, the message and
//! the event's fields; lines about a connection carry `connection` and `user` (and, with
//! debug logging on, the `connection` span with both). Tokens and secrets never appear: no
//! event records a request's query string, its headers or a token.

use std::fmt;

use switchboard_core::NodeId;
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::{FmtContext, format};
use tracing_subscriber::registry::LookupSpan;

/// The log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the node id on every line.
    Json,
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// Formats every event as tracing-subscriber's JSON does, with `"node":"<id>"` first.
#[derive(Debug)]
pub struct JsonWithNode {
    inner: format::Format<format::Json>,
    /// The node id as a JSON string, quotes included.
    node: String,
}

impl JsonWithNode {
    /// The JSON format for `node`, with the current span's fields and without the span list.
    pub fn new(node: &NodeId) -> Self {
        Self {
            inner: format::format()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false),
            node: serde_json::Value::from(node.as_str()).to_string(),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithNode
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(writer, "{{\"node\":{},{rest}", self.node),
            None => writer.write_str(&line),
        }
    }
}

/// Installs the process's log subscriber: `filter` (an `EnvFilter` directive such as
/// `info` or `switchboard=debug`) to stderr, in `format`.
///
/// # Errors
///
/// When a global subscriber is installed already.
pub fn init(
    format: LogFormat,
    node: &NodeId,
    filter: EnvFilter,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .event_format(JsonWithNode::new(node))
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex, PoisonError};

    use serde_json::Value;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_node_the_fields_and_the_connection_span() {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let node = NodeId::new("node-a1").expect("valid");
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(JsonWithNode::new(&node))
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(port = 5000, "listening");
            let span = tracing::info_span!("connection", id = "c-1", user = "alice");
            span.in_scope(|| tracing::warn!(connection = "c-1", user = "alice", "dropped"));
        });
        let bytes = buffer
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let lines: Vec<Value> = String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(|line| serde_json::from_str(line).expect("every line is JSON"))
            .collect();
        assert_eq!(lines.len(), 2);
        for line in &lines {
            assert_eq!(line["node"], "node-a1");
        }
        assert_eq!(lines[0]["message"], "listening");
        assert_eq!(lines[0]["port"], 5000);
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["connection"], "c-1");
        assert_eq!(lines[1]["user"], "alice");
        assert_eq!(lines[1]["span"]["user"], "alice");
    }
}
