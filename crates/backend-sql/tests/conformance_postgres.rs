//! The store conformance suite against PostgreSQL, one schema per namespace on the test
//! process's shared server.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection as _;
use switchboard_core::ConnectionStore;
use switchboard_core::testkit::Harness as SuiteHarness;
use switchboard_sql::{SqlConfig, SqlStore};
use switchboard_testkit_postgres::PostgresServer;

struct Harness {
    server: Arc<PostgresServer>,
}

impl Harness {
    fn new() -> Self {
        Self {
            server: PostgresServer::shared(),
        }
    }
}

#[async_trait]
impl SuiteHarness for Harness {
    async fn store(&self, namespace: &str) -> Arc<dyn ConnectionStore> {
        let config = SqlConfig::new(self.server.url())
            .with_schema(namespace)
            .with_pool_size(4);
        Arc::new(
            SqlStore::open(config)
                .await
                .expect("open the PostgreSQL store"),
        )
    }

    async fn cleanup(&self, namespace: &str) {
        let mut conn = sqlx::PgConnection::connect(&self.server.url())
            .await
            .expect("connect for cleanup");
        sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{namespace}\" CASCADE"))
            .execute(&mut conn)
            .await
            .expect("drop the namespace's schema");
        let _ = conn.close().await;
    }

    async fn unreachable(&self) -> Option<Arc<dyn ConnectionStore>> {
        // A loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = SqlConfig::new(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
            .with_acquire_timeout(Duration::from_millis(500));
        Some(Arc::new(
            SqlStore::open_lazy(config).expect("a lazily opened store"),
        ))
    }

    fn proptest_cases(&self) -> u32 {
        16
    }
}

switchboard_core::conformance_tests!(Harness::new());
