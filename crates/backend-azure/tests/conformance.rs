//! The store conformance suite against Azurite, one table per namespace on the test
//! process's shared emulator.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_azure::{AzureConfig, AzureStore};
use switchboard_core::ConnectionStore;
use switchboard_core::testkit::Harness as SuiteHarness;
use switchboard_testkit_azurite::Azurite;

struct Harness {
    azurite: Arc<Azurite>,
}

impl Harness {
    fn new() -> Self {
        Self {
            azurite: Azurite::shared(),
        }
    }

    fn config(&self, namespace: &str) -> AzureConfig {
        AzureConfig::from_connection_string(&self.azurite.connection_string())
            .expect("Azurite's connection string")
            .with_table(namespace)
            .expect("the suite's namespaces are valid table names")
    }
}

#[async_trait]
impl SuiteHarness for Harness {
    async fn store(&self, namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(
            AzureStore::open(self.config(namespace))
                .await
                .expect("open the Azure store on Azurite"),
        )
    }

    async fn cleanup(&self, namespace: &str) {
        AzureStore::open_lazy(self.config(namespace))
            .expect("a store for cleanup")
            .delete_table()
            .await
            .expect("delete the namespace's table");
    }

    async fn unreachable(&self) -> Option<Arc<dyn ConnectionStore>> {
        // A loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let connection_string = self
            .azurite
            .connection_string()
            .replace(&self.azurite.port().to_string(), &port.to_string());
        let config = AzureConfig::from_connection_string(&connection_string)
            .expect("a connection string")
            .with_retry_budget(Duration::from_millis(500));
        Some(Arc::new(
            AzureStore::open_lazy(config).expect("a lazily opened store"),
        ))
    }

    fn proptest_cases(&self) -> u32 {
        12
    }
}

switchboard_core::conformance_tests!(Harness::new());
