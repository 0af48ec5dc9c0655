//! Bearer-token authentication: HS256 JSON Web Tokens.
//!
//! A client proves who it is with a compact JWS (`header.claims.signature`, each segment
//! base64url without padding) signed with HMAC-SHA256 under a secret shared with the server.
//! The token travels either in an `Authorization: Bearer <token>` header or, for transports
//! that cannot set headers (browser WebSockets, server-sent events), in the `access_token`
//! query parameter, exactly as the SignalR clients send it; [`bearer_token`] finds it.
//!
//! [`Authenticator::verify`] accepts only `"alg":"HS256"`, checks the signature in constant
//! time before it looks at the claims, requires `exp`, honours `nbf`, optionally checks `iss`
//! and `aud`, and turns the user claim (`sub` unless configured otherwise) into a
//! [`UserId`] with [`UserId::new`], the single place where user ids are normalized.
//!
//! Tokens are credentials: they never appear in an [`AuthError`], in its `Display` text, in
//! [`AuthError::client_message`] or in any `Debug` output of this module, and neither does
//! the secret.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;
use switchboard_core::{InvalidId, UserId};

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted HS256 secret, in bytes (the output size of SHA-256, per RFC 7518 §3.2).
const MIN_SECRET_LEN: usize = 32;

/// Longest accepted token, in bytes. Longer input is refused before any decoding.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Default claim naming the user.
const DEFAULT_USER_CLAIM: &str = "sub";

/// Default clock-skew allowance for `exp` and `nbf`.
const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Why a request could not be authenticated, or why a [`JwtConfig`] was refused.
///
/// Neither the variants nor their `Display` text ever contain the token or the secret.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// The request carried no bearer token (or an empty one).
    #[error("no bearer token was presented")]
    MissingToken,
    /// The token is not a well-formed compact JWS; the text says what is wrong.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm other than `HS256`, or none at all.
    ///
    /// Holds the algorithm name when it is short and plain, otherwise a placeholder such as
    /// `"missing"` or `"unrecognized"`.
    #[error("unsupported token algorithm {0:?}; only HS256 is accepted")]
    UnsupportedAlgorithm(String),
    /// The signature does not match the header and claims under the configured secret.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token's `exp` lies in the past, beyond the leeway.
    #[error("token has expired")]
    Expired,
    /// The token's `nbf` lies in the future, beyond the leeway.
    #[error("token is not valid yet")]
    NotYetValid,
    /// An issuer is configured and the token's `iss` is missing or different.
    #[error("token issuer does not match")]
    WrongIssuer,
    /// An audience is configured and the token's `aud` is missing or does not contain it.
    #[error("token audience does not match")]
    WrongAudience,
    /// The claim that names the user (given here) is missing or is not a JSON string.
    #[error("token has no string claim {0:?} naming the user")]
    MissingUserClaim(String),
    /// The user claim is present but is not a valid [`UserId`].
    #[error("token names an invalid user: {0}")]
    InvalidUser(#[source] InvalidId),
    /// The HS256 secret given to [`JwtConfig::new`] is shorter than 32 bytes.
    #[error("the HS256 secret is {len} bytes long; at least 32 bytes are required")]
    WeakSecret {
        /// Length of the refused secret, in bytes.
        len: usize,
    },
}

impl AuthError {
    /// Short text safe to send to the client in a 401 body (never contains the token).
    pub fn client_message(&self) -> String {
        match self {
            Self::MissingToken => "missing access token".to_owned(),
            Self::Malformed(what) => format!("malformed access token: {what}"),
            Self::UnsupportedAlgorithm(_) => "unsupported token algorithm".to_owned(),
            Self::BadSignature => "invalid token signature".to_owned(),
            Self::Expired => "token expired".to_owned(),
            Self::NotYetValid => "token not yet valid".to_owned(),
            Self::WrongIssuer => "wrong token issuer".to_owned(),
            Self::WrongAudience => "wrong token audience".to_owned(),
            Self::MissingUserClaim(_) => "token does not name a user".to_owned(),
            Self::InvalidUser(_) => "token names an invalid user".to_owned(),
            Self::WeakSecret { .. } => "server authentication is misconfigured".to_owned(),
        }
    }
}

/// How tokens are verified and issued: the HS256 secret plus optional issuer and audience
/// requirements, the claim naming the user and the clock-skew leeway.
///
/// Only the keyed HMAC state is kept, not the secret bytes; `Debug` shows no key material.
#[derive(Clone)]
pub struct JwtConfig {
    mac: HmacSha256,
    issuer: Option<String>,
    audience: Option<String>,
    user_claim: String,
    leeway: Duration,
}

impl JwtConfig {
    /// Configuration with the HS256 shared `secret`, no issuer or audience requirement, user
    /// claim `sub` and a 30 s leeway.
    ///
    /// # Errors
    ///
    /// [`AuthError::WeakSecret`] when the secret is shorter than 32 bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, AuthError> {
        let secret = secret.into();
        let len = secret.len();
        if len < MIN_SECRET_LEN {
            return Err(AuthError::WeakSecret { len });
        }
        // HMAC accepts keys of any length, so this cannot fail; map it anyway to stay panic-free.
        let mac = HmacSha256::new_from_slice(&secret).map_err(|_| AuthError::WeakSecret { len })?;
        Ok(Self {
            mac,
            issuer: None,
            audience: None,
            user_claim: DEFAULT_USER_CLAIM.to_owned(),
            leeway: DEFAULT_LEEWAY,
        })
    }

    /// Requires the `iss` claim to equal `iss`; issued tokens carry it.
    pub fn with_issuer(mut self, iss: impl Into<String>) -> Self {
        self.issuer = Some(iss.into());
        self
    }

    /// Requires the `aud` claim (a string or an array of strings) to contain `aud`; issued
    /// tokens carry it.
    pub fn with_audience(mut self, aud: impl Into<String>) -> Self {
        self.audience = Some(aud.into());
        self
    }

    /// Names the claim holding the user id (default `sub`). The claim must be a JSON string.
    pub fn with_user_claim(mut self, claim: impl Into<String>) -> Self {
        self.user_claim = claim.into();
        self
    }

    /// Clock-skew allowance applied to `exp` and `nbf` (default 30 s).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("user_claim", &self.user_claim)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Verifies and issues HS256 tokens under one [`JwtConfig`].
///
/// Cloning is cheap (a reference count); `Debug` does not show the secret.
#[derive(Clone)]
pub struct Authenticator {
    config: Arc<JwtConfig>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("config", &self.config)
            .finish()
    }
}

impl Authenticator {
    /// Authenticator for `config`.
    pub fn new(config: JwtConfig) -> Self {
        Self {
            config: Arc::new(config),
        }
    }

    /// Verifies a compact JWS and returns the user it names, using the current time.
    ///
    /// The token must be at most 8 KiB and consist of exactly 3 base64url segments without
    /// padding. The header must be a JSON object with `"alg":"HS256"` (anything else, including
    /// `none` or a missing `alg`, is [`AuthError::UnsupportedAlgorithm`]); `typ`, if present,
    /// must be `JWT` (any case) and `crit` must be absent. The HMAC-SHA256 signature is checked
    /// in constant time before the claims are parsed. The claims must be a JSON object with a
    /// numeric `exp` (refused when now > exp + leeway) and, optionally, a numeric `nbf`
    /// (refused when now + leeway < nbf); `iss` and `aud` are checked when configured; the user
    /// claim must be a string and goes through [`UserId::new`].
    ///
    /// # Errors
    ///
    /// The [`AuthError`] describing the first check that failed.
    pub fn verify(&self, token: &str) -> Result<UserId, AuthError> {
        self.verify_at(token, SystemTime::now())
    }

    /// [`Authenticator::verify`] with an explicit "now", for tests.
    ///
    /// # Errors
    ///
    /// As [`Authenticator::verify`].
    pub fn verify_at(&self, token: &str, now: SystemTime) -> Result<UserId, AuthError> {
        self.verify_claims_at(token, now)
            .map(|verified| verified.user)
    }

    /// [`Authenticator::verify`], keeping the verified claims as well as the user, for
    /// decisions beyond identity (such as an admin claim).
    ///
    /// # Errors
    ///
    /// As [`Authenticator::verify`].
    pub fn verify_claims(&self, token: &str) -> Result<Verified, AuthError> {
        self.verify_claims_at(token, SystemTime::now())
    }

    fn verify_claims_at(&self, token: &str, now: SystemTime) -> Result<Verified, AuthError> {
        let config = &*self.config;
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed("token is longer than 8 KiB"));
        }
        let mut segments = token.split('.');
        let (Some(header_b64), Some(claims_b64), Some(signature_b64), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(AuthError::Malformed("expected 3 dot-separated segments"));
        };

        let header = decode_object(
            header_b64,
            "header is not base64url",
            "header is not a JSON object",
            "header has a duplicate key",
        )?;
        check_header(&header)?;

        let signature = URL_SAFE_NO_PAD
            .decode(signature_b64)
            .map_err(|_| AuthError::Malformed("signature is not base64url"))?;
        let mut mac = config.mac.clone();
        mac.update(signing_input(header_b64, claims_b64).as_bytes());
        mac.verify_slice(&signature)
            .map_err(|_| AuthError::BadSignature)?;

        let claims = decode_object(
            claims_b64,
            "claims are not base64url",
            "claims are not a JSON object",
            "claims have a duplicate key",
        )?;
        let user = check_claims(config, &claims, now)?;
        Ok(Verified { user, claims })
    }

    /// Mints an HS256 token for `user`, valid for `ttl` from now.
    ///
    /// Claims: the configured user claim (`sub` by default) holding the user id, `iat`, `exp`,
    /// plus `iss` and `aud` when configured. Used by the dev-token endpoint, tests and the load
    /// generator.
    pub fn issue(&self, user: &UserId, ttl: Duration) -> String {
        self.issue_at(user, ttl, SystemTime::now())
    }

    /// [`Authenticator::issue`] with further claims (a role, a scope), which never replace
    /// the user claim, `iat`, `exp`, `iss` or `aud`.
    pub fn issue_with_claims(
        &self,
        user: &UserId,
        ttl: Duration,
        extra: impl IntoIterator<Item = (String, Value)>,
    ) -> String {
        self.issue_at_with(user, ttl, SystemTime::now(), extra)
    }

    /// [`Authenticator::issue`] with an explicit "now".
    fn issue_at(&self, user: &UserId, ttl: Duration, now: SystemTime) -> String {
        self.issue_at_with(user, ttl, now, [])
    }

    fn issue_at_with(
        &self,
        user: &UserId,
        ttl: Duration,
        now: SystemTime,
        extra: impl IntoIterator<Item = (String, Value)>,
    ) -> String {
        let config = &*self.config;
        let iat = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let exp = iat.saturating_add(ttl.as_secs());

        let mut claims: Map<String, Value> = extra.into_iter().collect();
        claims.insert(config.user_claim.clone(), Value::from(user.as_str()));
        claims.insert("iat".to_owned(), Value::from(iat));
        claims.insert("exp".to_owned(), Value::from(exp));
        if let Some(iss) = &config.issuer {
            claims.insert("iss".to_owned(), Value::from(iss.as_str()));
        }
        if let Some(aud) = &config.audience {
            claims.insert("aud".to_owned(), Value::from(aud.as_str()));
        }

        let header_b64 = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let claims_b64 = URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string());
        let input = signing_input(&header_b64, &claims_b64);
        let mut mac = config.mac.clone();
        mac.update(input.as_bytes());
        let signature_b64 = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{input}.{signature_b64}")
    }
}

/// The bytes the signature covers: `header.claims`, both still base64url-encoded.
fn signing_input(header_b64: &str, claims_b64: &str) -> String {
    format!("{header_b64}.{claims_b64}")
}

/// Decodes one base64url segment holding a JSON object whose keys are all distinct.
///
/// A duplicate key is refused: parsers disagree on which copy wins (`{"alg":"none",
/// "alg":"HS256"}`), so a token that means different things to different readers is never
/// accepted.
fn decode_object(
    segment: &str,
    not_base64: &'static str,
    not_object: &'static str,
    duplicate: &'static str,
) -> Result<Map<String, Value>, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| AuthError::Malformed(not_base64))?;
    // Valid JSON first, so that any syntax error reads as "not a JSON object" wherever a
    // duplicate key sits; the second pass only looks for duplicates.
    let map: Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed(not_object))?;
    match serde_json::from_slice::<UniqueKeys>(&bytes) {
        Ok(UniqueKeys) => Ok(map),
        Err(_) => Err(AuthError::Malformed(duplicate)),
    }
}

/// Deserializes only from a JSON object whose top-level keys are all distinct (the values
/// are skipped).
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = access.next_key::<String>()? {
                    if !seen.insert(key) {
                        return Err(serde::de::Error::custom("duplicate key"));
                    }
                    access.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(UniqueKeys)
            }
        }

        deserializer.deserialize_map(Visitor)
    }
}

/// Checks `alg`, `typ` and `crit` of a decoded header.
fn check_header(header: &Map<String, Value>) -> Result<(), AuthError> {
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        Some(Value::String(alg)) => {
            return Err(AuthError::UnsupportedAlgorithm(printable_alg(alg)));
        }
        Some(_) => return Err(AuthError::UnsupportedAlgorithm("non-string".to_owned())),
        None => return Err(AuthError::UnsupportedAlgorithm("missing".to_owned())),
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(typ)) if typ.eq_ignore_ascii_case("JWT") => {}
        Some(_) => return Err(AuthError::Malformed("header typ is not JWT")),
    }
    // RFC 7515 §4.1.11: extensions listed in `crit` must be understood; we understand none.
    if header.contains_key("crit") {
        return Err(AuthError::Malformed(
            "critical header extensions are not supported",
        ));
    }
    Ok(())
}

/// The algorithm name to report: echoed only when short and plain, so that an error never
/// carries arbitrary attacker-chosen text.
fn printable_alg(alg: &str) -> String {
    let plain = !alg.is_empty()
        && alg.len() <= 16
        && alg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+'));
    if plain {
        alg.to_owned()
    } else {
        "unrecognized".to_owned()
    }
}

/// Checks the time, issuer and audience claims and extracts the user.
fn check_claims(
    config: &JwtConfig,
    claims: &Map<String, Value>,
    now: SystemTime,
) -> Result<UserId, AuthError> {
    let now = unix_seconds(now);
    let leeway = config.leeway.as_secs_f64();

    let exp = match claims.get("exp") {
        None => return Err(AuthError::Malformed("exp claim is missing")),
        Some(value) => numeric_date(value, "exp claim is not a number")?,
    };
    if now > exp + leeway {
        return Err(AuthError::Expired);
    }
    if let Some(value) = claims.get("nbf") {
        let nbf = numeric_date(value, "nbf claim is not a number")?;
        if now + leeway < nbf {
            return Err(AuthError::NotYetValid);
        }
    }

    if let Some(expected) = &config.issuer {
        match claims.get("iss") {
            Some(Value::String(iss)) if iss == expected => {}
            _ => return Err(AuthError::WrongIssuer),
        }
    }
    if let Some(expected) = &config.audience {
        let matches = |value: &Value| value.as_str() == Some(expected.as_str());
        let ok = match claims.get("aud") {
            Some(Value::Array(auds)) => auds.iter().any(matches),
            Some(aud) => matches(aud),
            None => false,
        };
        if !ok {
            return Err(AuthError::WrongAudience);
        }
    }

    match claims.get(&config.user_claim) {
        Some(Value::String(user)) => UserId::new(user).map_err(AuthError::InvalidUser),
        _ => Err(AuthError::MissingUserClaim(config.user_claim.clone())),
    }
}

/// Seconds since the Unix epoch, negative for earlier times.
fn unix_seconds(time: SystemTime) -> f64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(since) => since.as_secs_f64(),
        Err(before) => -before.duration().as_secs_f64(),
    }
}

/// A JWT NumericDate: a JSON number of seconds since the epoch (fractions allowed).
fn numeric_date(value: &Value, not_number: &'static str) -> Result<f64, AuthError> {
    value.as_f64().ok_or(AuthError::Malformed(not_number))
}

/// What a verified token says: the user and every claim, signature and time checked.
///
/// `Debug` shows the user and the claim names, never their values.
#[derive(Clone)]
pub struct Verified {
    /// The user the token names.
    pub user: UserId,
    claims: Map<String, Value>,
}

impl Verified {
    /// The verified claim `name`, if the token has it.
    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.claims.get(name)
    }

    /// Whether claim `name` holds `value`: it is that string, or a JSON array holding that
    /// string (as `roles` and `groups` claims of identity providers are), or a
    /// space-separated list containing it (as OAuth's `scope` is).
    pub fn has_claim_value(&self, name: &str, value: &str) -> bool {
        match self.claims.get(name) {
            Some(Value::String(s)) => s == value || s.split(' ').any(|part| part == value),
            Some(Value::Array(items)) => items.iter().any(|item| item.as_str() == Some(value)),
            _ => false,
        }
    }
}

impl fmt::Debug for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("user", &self.user)
            .field("claims", &self.claims.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Finds the bearer token of a request.
///
/// The `Authorization: Bearer <token>` header (scheme case-insensitive) wins. Otherwise the
/// `access_token` query parameter is used, decoded as `application/x-www-form-urlencoded`
/// (`%XX` escapes and `+` for space; an invalid escape is kept as is). `query` is the raw query
/// string without `?`. An `Authorization` header with another scheme (e.g. `Basic`) or an
/// empty token counts as absent, so the query parameter is still consulted; the result is
/// `None` only when neither source holds a non-empty token.
pub fn bearer_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<Cow<'a, str>> {
    let from_header = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| {
            let value = value.trim();
            let (scheme, token) = value.split_once([' ', '\t'])?;
            let token = token.trim();
            (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
        });
    if let Some(token) = from_header {
        return Some(Cow::Borrowed(token));
    }

    query?
        .split('&')
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(key) == "access_token").then(|| form_decode(value))
        })
        .find(|token| !token.is_empty())
}

/// Decodes one `application/x-www-form-urlencoded` component, borrowing when nothing changes.
fn form_decode(raw: &str) -> Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return Cow::Borrowed(raw);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.as_bytes().iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let rest = bytes.as_slice();
                match (rest.first().and_then(hex), rest.get(1).and_then(hex)) {
                    (Some(high), Some(low)) => {
                        out.push((high << 4) | low);
                        bytes.nth(1);
                    }
                    _ => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
    }
    match String::from_utf8(out) {
        Ok(text) => Cow::Owned(text),
        Err(err) => Cow::Owned(String::from_utf8_lossy(err.as_bytes()).into_owned()),
    }
}

/// Value of one ASCII hex digit.
fn hex(byte: &u8) -> Option<u8> {
    char::from(*byte)
        .to_digit(16)
        .and_then(|digit| u8::try_from(digit).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";
    /// 2023-11-14T22:13:20Z.
    const NOW: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn config() -> JwtConfig {
        JwtConfig::new(SECRET).expect("strong secret")
    }

    fn auth() -> Authenticator {
        Authenticator::new(config())
    }

    fn user(raw: &str) -> UserId {
        UserId::new(raw).expect("valid user id")
    }

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Signs arbitrary header and claims JSON text with `secret`.
    fn sign_with(secret: &[u8], header: &str, claims: &str) -> String {
        let input = format!("{}.{}", b64(header), b64(claims));
        let mut mac = HmacSha256::new_from_slice(secret).expect("any key length");
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(mac.finalize().into_bytes()))
    }

    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    fn sign(claims: &str) -> String {
        sign_with(SECRET, HS256, claims)
    }

    fn claims(extra: &str) -> String {
        format!(r#"{{"sub":"alice","exp":{}{extra}}}"#, NOW + 3600)
    }

    #[test]
    fn issued_token_round_trips() {
        let auth = Authenticator::new(
            config()
                .with_issuer("https://issuer.example")
                .with_audience("switchboard"),
        );
        let token = auth.issue_at(&user("alice"), Duration::from_secs(60), at(NOW));
        assert_eq!(token.split('.').count(), 3);
        assert_eq!(auth.verify_at(&token, at(NOW + 10)), Ok(user("alice")));
        assert_eq!(
            auth.verify_at(&token, at(NOW + 60 + 31)),
            Err(AuthError::Expired)
        );
        // `issue` uses the real clock, and so does `verify`.
        let fresh = auth.issue(&user("bob"), Duration::from_secs(300));
        assert_eq!(auth.verify(&fresh), Ok(user("bob")));
    }

    #[test]
    fn python_reference_vector_verifies() {
        // Produced independently with Python's hmac/hashlib/base64/json (json.dumps default
        // separators, so the JSON has spaces), secret below, verified at now = 1_700_001_800.
        const TOKEN: &str = "eyJ0eXAiOiAiSldUIiwgImFsZyI6ICJIUzI1NiJ9.eyJzdWIiOiAiIGFsaWNlQGV4YW1wbGUuY29tICIsICJpc3MiOiAiaHR0cHM6Ly9pc3N1ZXIuZXhhbXBsZSIsICJhdWQiOiBbIm90aGVyIiwgInN3aXRjaGJvYXJkIl0sICJpYXQiOiAxNzAwMDAwMDAwLCAibmJmIjogMTcwMDAwMDAwMCwgImV4cCI6IDE3MDAwMDM2MDB9.uT5MM8IvcqqrpeGsCoEhzz9QdQuYIJMrQLMCVkMxyzo";
        let auth = Authenticator::new(
            JwtConfig::new(&b"python-reference-secret-0123456789abcdef"[..])
                .expect("strong secret")
                .with_issuer("https://issuer.example")
                .with_audience("switchboard"),
        );
        assert_eq!(
            auth.verify_at(TOKEN, at(1_700_001_800)),
            Ok(user("alice@example.com"))
        );
        assert_eq!(
            auth.verify_at(TOKEN, at(1_700_003_600 + 31)),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn duplicate_keys_in_header_or_claims_are_refused() {
        let auth = Authenticator::new(config());
        // Each reader of a token must see the same token: no "last key wins".
        let header = r#"{"alg":"none","alg":"HS256"}"#;
        assert_eq!(
            auth.verify_at(&sign_with(SECRET, header, &claims("")), at(NOW)),
            Err(AuthError::Malformed("header has a duplicate key"))
        );
        let twice = format!(r#"{{"sub":"mallory","sub":"alice","exp":{}}}"#, NOW + 3600);
        assert_eq!(
            auth.verify_at(&sign(&twice), at(NOW)),
            Err(AuthError::Malformed("claims have a duplicate key"))
        );
        let expired_then_fresh = format!(r#"{{"sub":"alice","exp":1,"exp":{}}}"#, NOW + 3600);
        assert_eq!(
            auth.verify_at(&sign(&expired_then_fresh), at(NOW)),
            Err(AuthError::Malformed("claims have a duplicate key"))
        );
        // Nested objects may repeat the keys of their parents.
        let nested = claims(r#","ctx":{"sub":"x","exp":2}"#);
        assert_eq!(auth.verify_at(&sign(&nested), at(NOW)), Ok(user("alice")));
    }

    #[test]
    fn forged_signature_is_rejected() {
        let token = sign(&claims(""));
        // Flip one character of the signature (keep it valid base64url).
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 10;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).expect("ascii");
        assert_eq!(
            auth().verify_at(&flipped, at(NOW)),
            Err(AuthError::BadSignature)
        );
        // Tampered claims under the original signature.
        let (_, signature) = token.rsplit_once('.').expect("3 segments");
        let tampered = format!(
            "{}.{}.{signature}",
            b64(HS256),
            b64(claims("").replace("alice", "admin"))
        );
        assert_eq!(
            auth().verify_at(&tampered, at(NOW)),
            Err(AuthError::BadSignature)
        );
        // Signed with another secret.
        let other = sign_with(b"another-secret-another-secret-0123", HS256, &claims(""));
        assert_eq!(
            auth().verify_at(&other, at(NOW)),
            Err(AuthError::BadSignature)
        );
        // A truncated signature (valid base64url, 16 of the 32 bytes).
        let full = URL_SAFE_NO_PAD.decode(signature).expect("base64url");
        let short = format!(
            "{}.{}",
            token.rsplit_once('.').expect("3").0,
            b64(&full[..16])
        );
        assert_eq!(
            auth().verify_at(&short, at(NOW)),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn only_hs256_is_accepted() {
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(claims("")));
        assert_eq!(
            auth().verify_at(&none, at(NOW)),
            Err(AuthError::UnsupportedAlgorithm("none".to_owned()))
        );
        for (header, reported) in [
            (r#"{"alg":"HS512","typ":"JWT"}"#, "HS512"),
            (r#"{"alg":"RS256"}"#, "RS256"),
            (r#"{"alg":"hs256"}"#, "hs256"),
            (r#"{"typ":"JWT"}"#, "missing"),
            (r#"{"alg":256}"#, "non-string"),
            (
                r#"{"alg":"HS256 but much longer than that"}"#,
                "unrecognized",
            ),
        ] {
            let token = sign_with(SECRET, header, &claims(""));
            assert_eq!(
                auth().verify_at(&token, at(NOW)),
                Err(AuthError::UnsupportedAlgorithm(reported.to_owned())),
                "{header}"
            );
        }
    }

    #[test]
    fn typ_and_crit_headers_are_checked() {
        let lower = sign_with(SECRET, r#"{"alg":"HS256","typ":"jwt"}"#, &claims(""));
        assert_eq!(auth().verify_at(&lower, at(NOW)), Ok(user("alice")));
        let untyped = sign_with(SECRET, r#"{"alg":"HS256"}"#, &claims(""));
        assert_eq!(auth().verify_at(&untyped, at(NOW)), Ok(user("alice")));
        let wrong = sign_with(SECRET, r#"{"alg":"HS256","typ":"JOSE+JSON"}"#, &claims(""));
        assert!(matches!(
            auth().verify_at(&wrong, at(NOW)),
            Err(AuthError::Malformed(_))
        ));
        let crit = sign_with(SECRET, r#"{"alg":"HS256","crit":["b64"]}"#, &claims(""));
        assert!(matches!(
            auth().verify_at(&crit, at(NOW)),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let good = sign(&claims(""));
        let (head, signature) = good.rsplit_once('.').expect("3 segments");
        let cases: Vec<(String, &str)> = vec![
            (head.to_owned(), "expected 3 dot-separated segments"),
            (format!("{good}.extra"), "expected 3 dot-separated segments"),
            (
                "not-a-token".to_owned(),
                "expected 3 dot-separated segments",
            ),
            (
                format!("{}.{signature}", head.replacen('e', "*", 1)),
                "header is not base64url",
            ),
            (
                format!(
                    "{}=.{}.{signature}",
                    b64(HS256),
                    head.split_once('.').expect("2").1
                ),
                "header is not base64url",
            ),
            (format!("{head}.!!!"), "signature is not base64url"),
            (
                sign_with(SECRET, "not json", &claims("")),
                "header is not a JSON object",
            ),
            (
                sign_with(SECRET, "[1,2]", &claims("")),
                "header is not a JSON object",
            ),
            (sign("[\"alice\"]"), "claims are not a JSON object"),
            (sign("\"alice\""), "claims are not a JSON object"),
            (sign("{\"sub\":"), "claims are not a JSON object"),
        ];
        for (token, what) in cases {
            assert_eq!(
                auth().verify_at(&token, at(NOW)),
                Err(AuthError::Malformed(what)),
                "{what}"
            );
        }
        // Claims that are valid JSON but not base64url (signature is checked first, so sign it).
        let input = format!("{}.{}", b64(HS256), "@@@");
        let mut mac = HmacSha256::new_from_slice(SECRET).expect("any key length");
        mac.update(input.as_bytes());
        let bad_claims = format!("{input}.{}", b64(mac.finalize().into_bytes()));
        assert_eq!(
            auth().verify_at(&bad_claims, at(NOW)),
            Err(AuthError::Malformed("claims are not base64url"))
        );
    }

    #[test]
    fn huge_token_is_rejected_early() {
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            auth().verify_at(&huge, at(NOW)),
            Err(AuthError::Malformed("token is longer than 8 KiB"))
        );
        // Even a correctly signed one.
        let padding = "x".repeat(MAX_TOKEN_LEN);
        let signed = sign(&claims(&format!(r#","pad":"{padding}""#)));
        assert_eq!(
            auth().verify_at(&signed, at(NOW)),
            Err(AuthError::Malformed("token is longer than 8 KiB"))
        );
    }

    #[test]
    fn empty_token_is_missing() {
        assert_eq!(auth().verify_at("", at(NOW)), Err(AuthError::MissingToken));
    }

    #[test]
    fn expired_and_within_leeway() {
        let token = sign(&format!(r#"{{"sub":"alice","exp":{NOW}}}"#));
        assert_eq!(auth().verify_at(&token, at(NOW)), Ok(user("alice")));
        assert_eq!(auth().verify_at(&token, at(NOW + 30)), Ok(user("alice")));
        assert_eq!(
            auth().verify_at(&token, at(NOW + 31)),
            Err(AuthError::Expired)
        );
        let strict = Authenticator::new(config().with_leeway(Duration::ZERO));
        assert_eq!(
            strict.verify_at(&token, at(NOW + 1)),
            Err(AuthError::Expired)
        );
        // Fractional NumericDate.
        let fractional = sign(&format!(r#"{{"sub":"alice","exp":{NOW}.5}}"#));
        assert_eq!(
            strict.verify_at(
                &fractional,
                UNIX_EPOCH + Duration::from_millis(NOW * 1000 + 400)
            ),
            Ok(user("alice"))
        );
        assert_eq!(
            strict.verify_at(
                &fractional,
                UNIX_EPOCH + Duration::from_millis(NOW * 1000 + 600)
            ),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn nbf_in_the_future_is_rejected() {
        let nbf = NOW + 100;
        let token = sign(&claims(&format!(r#","nbf":{nbf}"#)));
        assert_eq!(
            auth().verify_at(&token, at(NOW)),
            Err(AuthError::NotYetValid)
        );
        assert_eq!(auth().verify_at(&token, at(nbf - 30)), Ok(user("alice")));
        assert_eq!(
            auth().verify_at(&token, at(nbf - 31)),
            Err(AuthError::NotYetValid)
        );
        let text = sign(&claims(r#","nbf":"soon""#));
        assert_eq!(
            auth().verify_at(&text, at(NOW)),
            Err(AuthError::Malformed("nbf claim is not a number"))
        );
    }

    #[test]
    fn exp_is_required_and_numeric() {
        let missing = sign(r#"{"sub":"alice"}"#);
        assert_eq!(
            auth().verify_at(&missing, at(NOW)),
            Err(AuthError::Malformed("exp claim is missing"))
        );
        let text = sign(r#"{"sub":"alice","exp":"tomorrow"}"#);
        assert_eq!(
            auth().verify_at(&text, at(NOW)),
            Err(AuthError::Malformed("exp claim is not a number"))
        );
    }

    #[test]
    fn issuer_is_checked_when_configured() {
        let auth = Authenticator::new(config().with_issuer("https://issuer.example"));
        let right = sign(&claims(r#","iss":"https://issuer.example""#));
        assert_eq!(auth.verify_at(&right, at(NOW)), Ok(user("alice")));
        let wrong = sign(&claims(r#","iss":"https://evil.example""#));
        assert_eq!(auth.verify_at(&wrong, at(NOW)), Err(AuthError::WrongIssuer));
        let missing = sign(&claims(""));
        assert_eq!(
            auth.verify_at(&missing, at(NOW)),
            Err(AuthError::WrongIssuer)
        );
        let array = sign(&claims(r#","iss":["https://issuer.example"]"#));
        assert_eq!(auth.verify_at(&array, at(NOW)), Err(AuthError::WrongIssuer));
        // Not configured: any issuer passes.
        assert_eq!(self::auth().verify_at(&wrong, at(NOW)), Ok(user("alice")));
    }

    #[test]
    fn audience_is_checked_when_configured() {
        let auth = Authenticator::new(config().with_audience("switchboard"));
        let string = sign(&claims(r#","aud":"switchboard""#));
        assert_eq!(auth.verify_at(&string, at(NOW)), Ok(user("alice")));
        let array = sign(&claims(r#","aud":["other",7,"switchboard"]"#));
        assert_eq!(auth.verify_at(&array, at(NOW)), Ok(user("alice")));
        for aud in [
            r#","aud":"other""#,
            r#","aud":["other"]"#,
            r#","aud":[]"#,
            "",
        ] {
            let token = sign(&claims(aud));
            assert_eq!(
                auth.verify_at(&token, at(NOW)),
                Err(AuthError::WrongAudience),
                "{aud}"
            );
        }
    }

    #[test]
    fn custom_user_claim() {
        let auth = Authenticator::new(config().with_user_claim("preferred_username"));
        let present = sign(&claims(r#","preferred_username":"carol""#));
        assert_eq!(auth.verify_at(&present, at(NOW)), Ok(user("carol")));
        let missing = sign(&claims(""));
        assert_eq!(
            auth.verify_at(&missing, at(NOW)),
            Err(AuthError::MissingUserClaim("preferred_username".to_owned()))
        );
        let number = sign(&claims(r#","preferred_username":42"#));
        assert_eq!(
            auth.verify_at(&number, at(NOW)),
            Err(AuthError::MissingUserClaim("preferred_username".to_owned()))
        );
        // Issued tokens carry the user under the configured claim.
        let issued = auth.issue_at(&user("dave"), Duration::from_secs(60), at(NOW));
        assert_eq!(auth.verify_at(&issued, at(NOW)), Ok(user("dave")));
    }

    #[test]
    fn user_id_is_trimmed_and_validated() {
        let padded = sign(&format!(r#"{{"sub":"  Alice \t","exp":{}}}"#, NOW + 60));
        assert_eq!(auth().verify_at(&padded, at(NOW)), Ok(user("Alice")));
        let empty = sign(&format!(r#"{{"sub":"   ","exp":{}}}"#, NOW + 60));
        assert_eq!(
            auth().verify_at(&empty, at(NOW)),
            Err(AuthError::InvalidUser(
                UserId::new("").expect_err("empty user id")
            ))
        );
        let control = sign(&format!(r#"{{"sub":"a\u0000b","exp":{}}}"#, NOW + 60));
        assert!(matches!(
            auth().verify_at(&control, at(NOW)),
            Err(AuthError::InvalidUser(InvalidId::BadCharacter {
                found: '\0',
                ..
            }))
        ));
    }

    #[test]
    fn weak_secret_is_refused() {
        assert_eq!(
            JwtConfig::new(&b"too short"[..]).map(|_| ()),
            Err(AuthError::WeakSecret { len: 9 })
        );
        assert_eq!(
            JwtConfig::new(vec![7u8; 31]).map(|_| ()),
            Err(AuthError::WeakSecret { len: 31 })
        );
        assert!(JwtConfig::new(vec![7u8; 32]).is_ok());
    }

    #[test]
    fn secrets_and_tokens_stay_out_of_output() {
        let auth = Authenticator::new(config().with_issuer("iss"));
        let debug = format!("{auth:?}");
        assert!(!debug.contains("0123456789abcdef"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");

        let token = sign_with(
            SECRET,
            r#"{"alg":"HS256"}"#,
            &format!(r#"{{"sub":"","exp":{}}}"#, NOW + 60),
        );
        let (_, signature) = token.rsplit_once('.').expect("3 segments");
        let tampered = format!("{token}x");
        for candidate in [&token, &tampered, &format!("{token}.x")] {
            let err = auth.verify_at(candidate, at(NOW)).expect_err("rejected");
            for text in [err.to_string(), format!("{err:?}"), err.client_message()] {
                assert!(!text.contains(signature), "{text}");
                assert!(!text.contains(candidate.as_str()), "{text}");
            }
        }
    }

    #[test]
    fn client_messages_are_short() {
        assert_eq!(AuthError::Expired.client_message(), "token expired");
        assert_eq!(
            AuthError::MissingToken.client_message(),
            "missing access token"
        );
        assert_eq!(
            AuthError::Malformed("exp claim is missing").client_message(),
            "malformed access token: exp claim is missing"
        );
    }

    fn headers(values: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(AUTHORIZATION, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn bearer_token_from_header() {
        let map = headers(&["Bearer abc.def.ghi"]);
        assert_eq!(bearer_token(&map, None).as_deref(), Some("abc.def.ghi"));
        assert!(matches!(bearer_token(&map, None), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for value in ["bearer t1", "BEARER t1", "BeArEr   t1  "] {
            let map = headers(&[value]);
            assert_eq!(bearer_token(&map, None).as_deref(), Some("t1"), "{value}");
        }
    }

    #[test]
    fn bearer_token_from_query() {
        let map = HeaderMap::new();
        assert_eq!(
            bearer_token(&map, Some("id=42&access_token=abc.def.ghi&x=1")).as_deref(),
            Some("abc.def.ghi")
        );
        assert!(matches!(
            bearer_token(&map, Some("access_token=abc")),
            Some(Cow::Borrowed("abc"))
        ));
    }

    #[test]
    fn bearer_token_query_is_percent_decoded() {
        let map = HeaderMap::new();
        assert_eq!(
            bearer_token(&map, Some("access_token=a%2Eb%2ec%3D%3d&z")).as_deref(),
            Some("a.b.c==")
        );
        assert_eq!(
            bearer_token(&map, Some("access%5Ftoken=x%20y+z")).as_deref(),
            Some("x y z")
        );
        // Invalid escapes are kept; non-UTF-8 bytes are replaced, never panic.
        assert_eq!(
            bearer_token(&map, Some("access_token=100%zz%4")).as_deref(),
            Some("100%zz%4")
        );
        assert_eq!(
            bearer_token(&map, Some("access_token=%FF")).as_deref(),
            Some("\u{FFFD}")
        );
    }

    #[test]
    fn bearer_header_wins_over_query() {
        let map = headers(&["Bearer from-header"]);
        assert_eq!(
            bearer_token(&map, Some("access_token=from-query")).as_deref(),
            Some("from-header")
        );
    }

    #[test]
    fn other_scheme_falls_back_to_query() {
        let basic = headers(&["Basic dXNlcjpwYXNz"]);
        assert_eq!(
            bearer_token(&basic, Some("access_token=from-query")).as_deref(),
            Some("from-query")
        );
        assert_eq!(bearer_token(&basic, None), None);
        assert_eq!(bearer_token(&basic, Some("other=1")), None);
        // A Bearer header after a Basic one is still found.
        let both = headers(&["Basic dXNlcjpwYXNz", "Bearer second"]);
        assert_eq!(bearer_token(&both, None).as_deref(), Some("second"));
    }

    #[test]
    fn bearer_token_absent() {
        let map = HeaderMap::new();
        assert_eq!(bearer_token(&map, None), None);
        assert_eq!(bearer_token(&map, Some("")), None);
        assert_eq!(bearer_token(&map, Some("access_token=")), None);
        assert_eq!(bearer_token(&map, Some("access_token")), None);
        assert_eq!(bearer_token(&map, Some("my_access_token=x")), None);
        assert_eq!(bearer_token(&headers(&["Bearer"]), None), None);
        assert_eq!(bearer_token(&headers(&["Bearer   "]), None), None);
    }
}
