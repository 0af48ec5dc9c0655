//! The store conformance suite against SQLite files, one file per namespace.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_core::ConnectionStore;
use switchboard_core::testkit::Harness as SuiteHarness;
use switchboard_sql::{SqlConfig, SqlStore};

/// Opens `<temp>/switchboard-sql-tests/<namespace>.db`.
struct Harness {
    dir: PathBuf,
}

impl Harness {
    fn new() -> Self {
        let dir = std::env::temp_dir().join("switchboard-sql-tests");
        std::fs::create_dir_all(&dir).expect("create the test directory");
        Self { dir }
    }

    fn path(&self, namespace: &str) -> PathBuf {
        self.dir.join(format!("{namespace}.db"))
    }
}

#[async_trait]
impl SuiteHarness for Harness {
    async fn store(&self, namespace: &str) -> Arc<dyn ConnectionStore> {
        let url = format!("sqlite://{}", self.path(namespace).display());
        Arc::new(
            SqlStore::open(SqlConfig::new(url))
                .await
                .expect("open the SQLite store"),
        )
    }

    async fn cleanup(&self, namespace: &str) {
        let db = self.path(namespace);
        for suffix in ["", "-wal", "-shm"] {
            let mut path = db.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }

    async fn unreachable(&self) -> Option<Arc<dyn ConnectionStore>> {
        // A file in a directory that does not exist: SQLite cannot open it.
        let url = format!(
            "sqlite://{}",
            self.dir
                .join("missing-dir")
                .join("nested")
                .join("x.db")
                .display()
        );
        let config = SqlConfig::new(url).with_acquire_timeout(Duration::from_millis(500));
        Some(Arc::new(
            SqlStore::open_lazy(config).expect("a lazily opened store"),
        ))
    }
}

switchboard_core::conformance_tests!(Harness::new());
