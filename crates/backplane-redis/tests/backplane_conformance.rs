//! The backplane conformance suite against one `redis-server` shared by the cases that run
//! at the same time; each case works under its own prefix.

use std::net::TcpListener;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use switchboard_core::testkit::BackplaneHarness;
use switchboard_core::{Backplane, ChannelNames, async_trait};
use switchboard_redis::testing::RedisServer;
use switchboard_redis::{RedisBackplane, RedisConfig};

/// The server of the running cases; started by the first, stopped with the last.
static SERVER: Mutex<Weak<RedisServer>> = Mutex::new(Weak::new());

fn shared_server() -> Arc<RedisServer> {
    let mut slot = SERVER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(server) = slot.upgrade() {
        return server;
    }
    let server = Arc::new(RedisServer::start());
    *slot = Arc::downgrade(&server);
    server
}

struct RedisHarness {
    server: Arc<RedisServer>,
}

impl RedisHarness {
    fn new() -> Self {
        Self {
            server: shared_server(),
        }
    }
}

#[async_trait]
impl BackplaneHarness for RedisHarness {
    async fn backplanes(&self, namespace: &str, nodes: usize) -> Vec<Arc<dyn Backplane>> {
        let names =
            ChannelNames::new(namespace).expect("the suite's namespaces are valid prefixes");
        (0..nodes)
            .map(|_| {
                let config = RedisConfig::new(self.server.url()).with_channel_names(names.clone());
                Arc::new(RedisBackplane::new(config).expect("a valid configuration"))
                    as Arc<dyn Backplane>
            })
            .collect()
    }

    async fn cleanup(&self, namespace: &str) {
        self.server
            .delete_prefix(namespace)
            .await
            .expect("the namespace's keys are deleted");
    }

    async fn unreachable(&self) -> Option<Arc<dyn Backplane>> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port");
        let config = RedisConfig::new(format!("redis://127.0.0.1:{port}/"))
            .with_buffer_age(Duration::from_millis(500))
            .with_command_timeout(Duration::from_millis(500));
        Some(Arc::new(
            RedisBackplane::new(config).expect("a valid configuration"),
        ))
    }
}

switchboard_core::backplane_conformance_tests!(RedisHarness::new());
