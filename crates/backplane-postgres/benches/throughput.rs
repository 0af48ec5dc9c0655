//! Throughput and latency of one node publishing to another over a throwaway PostgreSQL.
//!
//! `cargo bench -p switchboard-postgres --bench throughput` (environment: `BENCH_MESSAGES`,
//! default 20000; `BENCH_PROBES`, default 500; `BENCH_PAYLOAD`, default 100 bytes).

#![allow(clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_core::{Address, Backplane, Inbox, Message, MessageId, NodeId, async_trait};
use switchboard_postgres::{PostgresBackplane, PostgresConfig};
use switchboard_testkit_postgres::PostgresServer;
use tokio::sync::mpsc;

struct Forward(mpsc::UnboundedSender<(Message, Instant)>);

#[async_trait]
impl Inbox for Forward {
    async fn receive(&self, message: Message) {
        let _ = self.0.send((message, Instant::now()));
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let messages = env("BENCH_MESSAGES", 20_000);
    let probes = env("BENCH_PROBES", 500);
    let payload = Bytes::from(vec![b'x'; env("BENCH_PAYLOAD", 100)]);
    let server = PostgresServer::start();
    let config = || PostgresConfig::new(server.url()).with_schema("bench");
    let a = PostgresBackplane::new(config())?;
    let b = PostgresBackplane::new(config())?;
    let (node_a, node_b) = (NodeId::new("bench-a")?, NodeId::new("bench-b")?);
    let (tx_a, _rx_a) = mpsc::unbounded_channel();
    let (tx_b, mut rx_b) = mpsc::unbounded_channel();
    a.start(&node_a, Arc::new(Forward(tx_a))).await?;
    b.start(&node_b, Arc::new(Forward(tx_b))).await?;
    let a = Arc::new(a);
    let mut seq = 0u64;
    let mut next = |to: &NodeId| {
        seq += 1;
        Message::new(
            MessageId {
                origin: node_a.clone(),
                seq,
            },
            Address::Node(to.clone()),
            Vec::new(),
            payload.clone(),
        )
    };

    // Throughput: 64 publishers in flight, like a busy node's many connections.
    let started = Instant::now();
    let mut batch = Vec::with_capacity(messages);
    for _ in 0..messages {
        batch.push(next(&node_b));
    }
    let mut chunks: Vec<Vec<Message>> = (0..64).map(|_| Vec::new()).collect();
    for (i, m) in batch.into_iter().enumerate() {
        chunks[i % 64].push(m);
    }
    let mut publishers = Vec::new();
    for chunk in chunks {
        let a = Arc::clone(&a);
        publishers.push(tokio::spawn(async move {
            for m in chunk {
                a.publish(&m).await?;
            }
            Ok::<(), switchboard_core::BackplaneError>(())
        }));
    }
    for p in publishers {
        p.await??;
    }
    let published = started.elapsed();
    for _ in 0..messages {
        tokio::time::timeout(Duration::from_secs(30), rx_b.recv())
            .await?
            .ok_or("inbox closed")?;
    }
    let received = started.elapsed();
    println!(
        "throughput: {messages} messages of {} bytes a→b: published in {published:?}, all received in {received:?} = {:.0} msg/s",
        payload.len(),
        messages as f64 / received.as_secs_f64()
    );

    // Latency: one message at a time, publish call → inbox.
    let mut latencies = Vec::with_capacity(probes);
    for _ in 0..probes {
        let m = next(&node_b);
        let sent = Instant::now();
        a.publish(&m).await?;
        let (_, at) = tokio::time::timeout(Duration::from_secs(10), rx_b.recv())
            .await?
            .ok_or("inbox closed")?;
        latencies.push(at - sent);
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "latency publish→receive over {probes} sequential messages: p50 {:?}, p99 {:?}, max {:?}",
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
    a.stop().await;
    b.stop().await;
    Ok(())
}
