//! Who may see the operators' pages and data: `/admin`, its API and `/metrics` on the main
//! listener.
//!
//! An operator presents an access token exactly as a hub client does (`Authorization:
//! Bearer` or `?access_token=`, found by [`bearer_token`]); it must verify with the hub's
//! [`Authenticator`] and carry the admin claim ([`AdminClaim`], `role=admin` by default).
//! No token or a bad one answers 401, a valid token without the claim 403. With
//! [`AdminAccess::open`] (development only) everybody is let in, and the pages say so.

use std::fmt;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::{Authenticator, bearer_token};

/// The claim that makes a token an operator's: `name=value` (`role=admin` by default).
///
/// A token carries it when the claim is that string, an array holding it, or a
/// space-separated list holding it (see [`Verified::has_claim_value`](crate::auth::Verified::has_claim_value)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminClaim {
    name: String,
    value: String,
}

/// Why an [`AdminClaim`] could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an admin claim is written name=value (like role=admin), with neither part empty")]
pub struct InvalidAdminClaim;

impl AdminClaim {
    /// The default admin claim, `role=admin`.
    pub const DEFAULT: &str = "role=admin";

    /// The claim `name` holding `value`.
    ///
    /// # Errors
    ///
    /// [`InvalidAdminClaim`] when either is empty.
    pub fn new(
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, InvalidAdminClaim> {
        let (name, value) = (name.into(), value.into());
        if name.is_empty() || value.is_empty() {
            return Err(InvalidAdminClaim);
        }
        Ok(Self { name, value })
    }

    /// The claim's name (`role`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value it must hold (`admin`).
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl Default for AdminClaim {
    fn default() -> Self {
        Self {
            name: "role".to_owned(),
            value: "admin".to_owned(),
        }
    }
}

impl std::str::FromStr for AdminClaim {
    type Err = InvalidAdminClaim;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = s.split_once('=').ok_or(InvalidAdminClaim)?;
        Self::new(name.trim(), value.trim())
    }
}

impl fmt::Display for AdminClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.name, self.value)
    }
}

/// Who is looking, once let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    /// A verified token carrying the admin claim, of this user.
    Admin(switchboard_core::UserId),
    /// Nobody in particular: access is open (development mode).
    Anonymous,
}

/// Why a request was not let in; [`IntoResponse`] answers 401 or 403 with a JSON body
/// `{"error": ...}` that never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No token, or one that does not verify: 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token without the admin claim: 403.
    #[error("{0}")]
    Forbidden(String),
}

impl Refusal {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response =
            (status, axum::Json(json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The operators' access policy: the hub's authenticator plus the admin claim, or open.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    auth: Authenticator,
    claim: AdminClaim,
    open: bool,
}

impl AdminAccess {
    /// Tokens verified by `auth` that carry `claim` are let in; nobody else.
    pub fn new(auth: Authenticator, claim: AdminClaim) -> Self {
        Self {
            auth,
            claim,
            open: false,
        }
    }

    /// Everybody is let in, token or not (development mode). A token that is presented is
    /// still verified, so the page can name who is looking.
    pub fn open(auth: Authenticator) -> Self {
        Self {
            auth,
            claim: AdminClaim::default(),
            open: true,
        }
    }

    /// Whether everybody is let in.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The admin claim a token needs.
    pub fn claim(&self) -> &AdminClaim {
        &self.claim
    }

    /// Checks the token of a request (its headers and raw query string, without `?`).
    ///
    /// # Errors
    ///
    /// [`Refusal::Unauthenticated`] without a token or with one that does not verify,
    /// [`Refusal::Forbidden`] for a valid token without the admin claim; neither when open.
    pub fn check(&self, headers: &HeaderMap, query: Option<&str>) -> Result<Operator, Refusal> {
        let verified = match bearer_token(headers, query) {
            None if self.open => return Ok(Operator::Anonymous),
            None => {
                return Err(Refusal::Unauthenticated(
                    "an access token carrying the admin claim is required (Authorization: \
                     Bearer, or ?access_token=)"
                        .to_owned(),
                ));
            }
            Some(token) => self.auth.verify_claims(&token),
        };
        match verified {
            Ok(verified) if self.open => Ok(Operator::Admin(verified.user)),
            Ok(verified) if verified.has_claim_value(self.claim.name(), self.claim.value()) => {
                Ok(Operator::Admin(verified.user))
            }
            Ok(_) => Err(Refusal::Forbidden(format!(
                "this token does not carry the admin claim {}",
                self.claim
            ))),
            Err(_) if self.open => Ok(Operator::Anonymous),
            Err(e) => {
                tracing::debug!(reason = %e.client_message(), "refused an operator's token");
                Err(Refusal::Unauthenticated(e.client_message()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::http::HeaderValue;
    use serde_json::Value;
    use switchboard_core::UserId;

    use super::*;
    use crate::auth::JwtConfig;

    fn auth() -> Authenticator {
        Authenticator::new(JwtConfig::new(vec![7u8; 32]).expect("long enough"))
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).expect("ascii"),
        );
        headers
    }

    fn user(name: &str) -> UserId {
        UserId::new(name).expect("valid")
    }

    #[test]
    fn claims_parse_as_name_equals_value() {
        let claim: AdminClaim = "roles = ops".parse().expect("valid");
        assert_eq!((claim.name(), claim.value()), ("roles", "ops"));
        assert_eq!(claim.to_string(), "roles=ops");
        assert_eq!(
            AdminClaim::DEFAULT.parse::<AdminClaim>(),
            Ok(AdminClaim::default())
        );
        for bad in ["role", "=admin", "role=", ""] {
            assert_eq!(bad.parse::<AdminClaim>(), Err(InvalidAdminClaim), "{bad:?}");
        }
    }

    #[test]
    fn only_tokens_with_the_claim_get_in() {
        let auth = auth();
        let access = AdminAccess::new(auth.clone(), AdminClaim::default());
        let ttl = Duration::from_secs(60);
        let admin = auth.issue_with_claims(
            &user("root"),
            ttl,
            [("role".to_owned(), Value::from("admin"))],
        );
        assert_eq!(
            access.check(&bearer(&admin), None),
            Ok(Operator::Admin(user("root")))
        );
        let in_list = auth.issue_with_claims(
            &user("ops"),
            ttl,
            [("role".to_owned(), serde_json::json!(["reader", "admin"]))],
        );
        assert!(access.check(&bearer(&in_list), None).is_ok());
        let query = format!("access_token={admin}");
        assert!(access.check(&HeaderMap::new(), Some(&query)).is_ok());

        let plain = auth.issue(&user("alice"), ttl);
        let refused = access.check(&bearer(&plain), None).expect_err("no claim");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let other_value = auth.issue_with_claims(
            &user("bob"),
            ttl,
            [("role".to_owned(), Value::from("administrator"))],
        );
        assert_eq!(
            access
                .check(&bearer(&other_value), None)
                .map_err(|r| r.status()),
            Err(StatusCode::FORBIDDEN)
        );
        for headers in [
            HeaderMap::new(),
            bearer("not.a.token"),
            bearer(&format!("{admin}x")),
        ] {
            let refused = access.check(&headers, None).expect_err("refused");
            assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
            assert!(!refused.to_string().contains(&admin));
        }
    }

    #[test]
    fn open_access_lets_everybody_in_and_still_names_a_verified_user() {
        let auth = auth();
        let access = AdminAccess::open(auth.clone());
        assert!(access.is_open());
        assert_eq!(
            access.check(&HeaderMap::new(), None),
            Ok(Operator::Anonymous)
        );
        assert_eq!(
            access.check(&bearer("garbage"), None),
            Ok(Operator::Anonymous)
        );
        let plain = auth.issue(&user("alice"), Duration::from_secs(60));
        assert_eq!(
            access.check(&bearer(&plain), None),
            Ok(Operator::Admin(user("alice")))
        );
    }
}
