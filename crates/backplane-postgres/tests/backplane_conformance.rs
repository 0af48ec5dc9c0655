//! The backplane conformance suite against one throwaway PostgreSQL shared by the cases that
//! run at the same time; each case works in its own schema, dropped afterwards.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::testkit::BackplaneHarness;
use switchboard_core::{Backplane, ChannelNames, async_trait};
use switchboard_postgres::{PostgresBackplane, PostgresConfig};
use switchboard_testkit_postgres::PostgresServer;

struct PostgresHarness {
    server: Arc<PostgresServer>,
}

impl PostgresHarness {
    fn new() -> Self {
        Self {
            server: PostgresServer::shared(),
        }
    }
}

#[async_trait]
impl BackplaneHarness for PostgresHarness {
    async fn backplanes(&self, namespace: &str, nodes: usize) -> Vec<Arc<dyn Backplane>> {
        let names =
            ChannelNames::new(namespace).expect("the suite's namespaces are valid prefixes");
        (0..nodes)
            .map(|_| {
                let config = PostgresConfig::new(self.server.url())
                    .with_schema(namespace)
                    .with_channel_names(names.clone());
                Arc::new(PostgresBackplane::new(config).expect("a valid configuration"))
                    as Arc<dyn Backplane>
            })
            .collect()
    }

    async fn cleanup(&self, namespace: &str) {
        self.server
            .psql(
                "postgres",
                &format!("DROP SCHEMA IF EXISTS \"{namespace}\" CASCADE"),
            )
            .expect("the namespace's schema is dropped");
    }

    async fn unreachable(&self) -> Option<Arc<dyn Backplane>> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|addr| addr.port())
            .expect("a free port");
        let config = PostgresConfig::new(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .with_buffer_age(Duration::from_millis(500))
            .with_command_timeout(Duration::from_millis(500));
        Some(Arc::new(
            PostgresBackplane::new(config).expect("a valid configuration"),
        ))
    }

    fn quiet_period(&self) -> Duration {
        Duration::from_millis(200)
    }
}

switchboard_core::backplane_conformance_tests!(PostgresHarness::new());
