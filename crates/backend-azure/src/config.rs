//! Where the table lives and how to talk to it: [`AzureConfig`], from a connection string.

use std::fmt;
use std::time::Duration;

use azure_storage::{CloudLocation, ConnectionString, StorageCredentials};

/// The table the store keeps its entities in unless told otherwise (`--azure-table`).
pub const DEFAULT_TABLE: &str = "connection";
/// How long one request may take before it counts as failed (and is retried).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an operation keeps retrying transient failures before it gives up.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(4);

/// How many requests one store sends to the service at the same time.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// The well-known account of the storage emulator.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
/// The table port of the storage emulator.
const EMULATOR_TABLE_PORT: u16 = 10002;

/// Why a connection string or a setting was refused. Messages never contain the account key
/// or a shared access signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The connection string is not `Name=value` pairs separated by `;`.
    #[error(
        "the Azure connection string is malformed: expected `Name=value` pairs separated by `;` \
         (for example `UseDevelopmentStorage=true`, or the account's string from the portal)"
    )]
    Malformed,
    /// The connection string names no way to sign requests.
    #[error(
        "the Azure connection string has no credentials: give `AccountName=` and `AccountKey=`, \
         or `SharedAccessSignature=`"
    )]
    NoCredentials,
    /// The connection string names no account or endpoint to talk to.
    #[error(
        "the Azure connection string names no table endpoint: give `TableEndpoint=` or \
         `AccountName=` (or `UseDevelopmentStorage=true`)"
    )]
    NoEndpoint,
    /// The endpoint is not an http(s) URL.
    #[error("the Azure table endpoint `{0}` is not an http:// or https:// URL")]
    BadEndpoint(String),
    /// The table name breaks the service's rules.
    #[error(
        "`{0}` is not a valid Azure table name: 3 to 63 letters and digits, starting with a letter"
    )]
    BadTableName(String),
}

/// How to reach the table: endpoint, credentials, table name and time bounds.
///
/// Built from a connection string with [`AzureConfig::from_connection_string`]; `Debug` never
/// shows the credentials.
#[derive(Clone)]
pub struct AzureConfig {
    pub(crate) location: CloudLocation,
    pub(crate) credentials: StorageCredentials,
    pub(crate) table: String,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_budget: Duration,
    pub(crate) max_in_flight: usize,
}

impl fmt::Debug for AzureConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureConfig")
            .field("endpoint", &self.endpoint())
            .field("table", &self.table)
            .field("request_timeout", &self.request_timeout)
            .field("retry_budget", &self.retry_budget)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl AzureConfig {
    /// Reads a storage connection string:
    ///
    /// * `UseDevelopmentStorage=true` — the emulator (Azurite) at `127.0.0.1:10002` with its
    ///   well-known account, or at `DevelopmentStorageProxyUri=` when given;
    /// * a full account string with `TableEndpoint=` — that endpoint, signed with
    ///   `AccountName=` / `AccountKey=` or a `SharedAccessSignature=`;
    /// * an account string without `TableEndpoint=` —
    ///   `https://{account}.table.{EndpointSuffix}` (`core.windows.net` by default).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] saying what is missing or malformed, never echoing a secret.
    pub fn from_connection_string(connection_string: &str) -> Result<Self, ConfigError> {
        let parsed = ConnectionString::new(connection_string.trim().trim_end_matches(';'))
            .map_err(|_| ConfigError::Malformed)?;
        let (location, credentials) = if parsed.use_development_storage == Some(true) {
            let location = match parsed.development_storage_proxy_uri {
                Some(proxy) => {
                    let proxy = checked_endpoint(proxy)?;
                    CloudLocation::Custom {
                        account: EMULATOR_ACCOUNT.to_owned(),
                        uri: format!("{proxy}:{EMULATOR_TABLE_PORT}/{EMULATOR_ACCOUNT}"),
                    }
                }
                None => CloudLocation::Emulator {
                    address: "127.0.0.1".to_owned(),
                    port: EMULATOR_TABLE_PORT,
                },
            };
            (location, StorageCredentials::emulator())
        } else {
            let credentials = parsed
                .storage_credentials()
                .map_err(|_| ConfigError::NoCredentials)?;
            let location = match (parsed.table_endpoint, parsed.account_name) {
                (Some(endpoint), account) => CloudLocation::Custom {
                    account: account.unwrap_or_default().to_owned(),
                    uri: checked_endpoint(endpoint)?,
                },
                (None, Some(account)) => {
                    let protocol = match parsed.default_endpoints_protocol {
                        Some(azure_storage::EndpointProtocol::Http) => "http",
                        _ => "https",
                    };
                    let suffix = parsed.endpoint_suffix.unwrap_or("core.windows.net");
                    CloudLocation::Custom {
                        account: account.to_owned(),
                        uri: format!("{protocol}://{account}.table.{suffix}"),
                    }
                }
                (None, None) => return Err(ConfigError::NoEndpoint),
            };
            (location, credentials)
        };
        Ok(Self {
            location,
            credentials,
            table: DEFAULT_TABLE.to_owned(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_budget: DEFAULT_RETRY_BUDGET,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        })
    }

    /// Uses table `name` instead of [`DEFAULT_TABLE`]. The store keeps connections and node
    /// leases in it (leases in a partition of their own).
    ///
    /// # Errors
    ///
    /// [`ConfigError::BadTableName`] unless `name` is 3 to 63 ASCII letters and digits
    /// starting with a letter (the service's rule).
    pub fn with_table(mut self, name: &str) -> Result<Self, ConfigError> {
        let valid = (3..=63).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric())
            && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
            && !name.eq_ignore_ascii_case("tables");
        if !valid {
            return Err(ConfigError::BadTableName(name.chars().take(80).collect()));
        }
        self.table = name.to_owned();
        Ok(self)
    }

    /// How long one request may take ([`DEFAULT_REQUEST_TIMEOUT`]); a slower one counts as a
    /// transient failure.
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout.max(Duration::from_millis(10));
        self
    }

    /// How long an operation retries transient failures ([`DEFAULT_RETRY_BUDGET`]) before it
    /// answers with a transient error. Zero means one attempt.
    #[must_use]
    pub fn with_retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// How many requests the store sends at the same time ([`DEFAULT_MAX_IN_FLIGHT`], at
    /// least 1). More wait for a turn, within the request timeout, so that a burst (a
    /// reconnect storm) queues here instead of opening a connection per request and piling
    /// up in a service that is already slow.
    #[must_use]
    pub fn with_max_in_flight(mut self, requests: usize) -> Self {
        self.max_in_flight = requests.max(1);
        self
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The table service's base URL (no credentials in it).
    pub fn endpoint(&self) -> String {
        match &self.location {
            CloudLocation::Emulator { address, port } => {
                format!("http://{address}:{port}/{EMULATOR_ACCOUNT}")
            }
            CloudLocation::Custom { uri, .. } => uri.clone(),
            CloudLocation::Public { account } => {
                format!("https://{account}.table.core.windows.net")
            }
            CloudLocation::China { account } => {
                format!("https://{account}.table.core.chinacloudapi.cn")
            }
        }
    }
}

/// `endpoint` without a trailing slash, if it is an http(s) URL.
fn checked_endpoint(endpoint: &str) -> Result<String, ConfigError> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let valid = (trimmed.starts_with("http://") || trimmed.starts_with("https://"))
        && reqwest::Url::parse(trimmed).is_ok_and(|url| url.host_str().is_some());
    if valid {
        Ok(trimmed.to_owned())
    } else {
        Err(ConfigError::BadEndpoint(
            trimmed.chars().take(200).collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1ub3QtZm9yLWxvZ3M=";

    #[test]
    fn development_storage_is_the_emulator() {
        let config =
            AzureConfig::from_connection_string("UseDevelopmentStorage=true").expect("valid");
        assert_eq!(config.endpoint(), "http://127.0.0.1:10002/devstoreaccount1");
        assert_eq!(config.table(), DEFAULT_TABLE);
        let proxied = AzureConfig::from_connection_string(
            "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://10.0.0.5",
        )
        .expect("valid");
        assert_eq!(proxied.endpoint(), "http://10.0.0.5:10002/devstoreaccount1");
    }

    #[test]
    fn table_endpoints_and_account_strings_are_read() {
        let with_endpoint = AzureConfig::from_connection_string(&format!(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={KEY};\
             TableEndpoint=http://127.0.0.1:4242/devstoreaccount1/;"
        ))
        .expect("valid");
        assert_eq!(
            with_endpoint.endpoint(),
            "http://127.0.0.1:4242/devstoreaccount1"
        );
        let account = AzureConfig::from_connection_string(&format!(
            "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={KEY};EndpointSuffix=core.windows.net"
        ))
        .expect("valid");
        assert_eq!(account.endpoint(), "https://acme.table.core.windows.net");
    }

    #[test]
    fn bad_strings_are_refused_without_echoing_secrets() {
        for (text, expected) in [
            ("garbage", ConfigError::Malformed),
            ("AccountName=acme", ConfigError::NoCredentials),
            (
                &format!("AccountName=acme;AccountKey={KEY};TableEndpoint=ftp://x") as &str,
                ConfigError::BadEndpoint("ftp://x".into()),
            ),
        ] {
            let err = AzureConfig::from_connection_string(text).expect_err("refused");
            assert_eq!(err, expected);
            assert!(!err.to_string().contains(KEY));
        }
        let config =
            AzureConfig::from_connection_string(&format!("AccountName=acme;AccountKey={KEY}"))
                .expect("valid");
        assert!(!format!("{config:?}").contains(KEY));
    }

    #[test]
    fn table_names_follow_the_service_rules() {
        let config =
            AzureConfig::from_connection_string("UseDevelopmentStorage=true").expect("valid");
        assert!(config.clone().with_table("conn2").is_ok());
        for bad in ["ab", "1abc", "with-dash", "tables", &"a".repeat(64)] {
            assert!(config.clone().with_table(bad).is_err(), "{bad}");
        }
    }
}
