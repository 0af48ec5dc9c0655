//! Claim validation behind a valid signature: tokens built from fuzzed header and claims
//! bytes, signed with HS256 under the server's secret, so that every input reaches the header
//! and claim checks of `Authenticator::verify`. Nothing panics, the signature is never
//! reported bad, a token is accepted exactly when a model of the checks accepts it, and an
//! accepted user survives a round trip through `Authenticator::issue`.
//!
//! Input layout: the first byte picks the configuration; the rest is `header 0x00 claims`,
//! or only the claims (under `{"alg":"HS256","typ":"JWT"}`) when there is no `0x00`.

#![no_main]

use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use switchboard::auth::{AuthError, Authenticator, JwtConfig};
use switchboard_core::UserId;
use switchboard_fuzz::{Members, sign};

const SECRET: &[u8] = b"switchboard-fuzzing-secret-0123456789abcdef";

/// 2023-11-14T22:13:20Z: a fixed "now", so that a failure replays the same way.
const NOW: u64 = 1_700_000_000;

const DEFAULT_HEADER: &[u8] = br#"{"alg":"HS256","typ":"JWT"}"#;

/// Longest token `verify` reads.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// One configuration under test and what the model needs to know about it.
struct Setup {
    auth: Authenticator,
    issuer: Option<&'static str>,
    audience: Option<&'static str>,
    user_claim: &'static str,
    leeway: f64,
}

fn setup(
    issuer: Option<&'static str>,
    audience: Option<&'static str>,
    user_claim: &'static str,
    leeway: u64,
) -> Setup {
    let mut config = JwtConfig::new(SECRET)
        .expect("the secret is 32 bytes or more")
        .with_user_claim(user_claim)
        .with_leeway(Duration::from_secs(leeway));
    if let Some(iss) = issuer {
        config = config.with_issuer(iss);
    }
    if let Some(aud) = audience {
        config = config.with_audience(aud);
    }
    Setup {
        auth: Authenticator::new(config),
        issuer,
        audience,
        user_claim,
        leeway: leeway as f64,
    }
}

static SETUPS: LazyLock<[Setup; 4]> = LazyLock::new(|| {
    [
        setup(None, None, "sub", 30),
        setup(
            Some("https://issuer.example"),
            Some("switchboard"),
            "sub",
            30,
        ),
        setup(None, Some("switchboard"), "name", 0),
        setup(Some("iss"), None, "preferred_username", 3600),
    ]
});

/// The header and claims checks as the documentation of `verify` states them.
fn model(setup: &Setup, header: &[u8], claims: &[u8]) -> Result<UserId, AuthError> {
    let header_members = Members::parse(header);
    let header: Map<String, Value> = serde_json::from_slice(header)
        .map_err(|_| AuthError::Malformed("header is not a JSON object"))?;
    if header_members.as_ref().is_some_and(has_duplicate) {
        return Err(AuthError::Malformed("header has a duplicate key"));
    }
    match header.get("alg") {
        Some(Value::String(alg)) if alg == "HS256" => {}
        _ => return Err(AuthError::UnsupportedAlgorithm(String::new())),
    }
    if let Some(typ) = header.get("typ")
        && !typ.as_str().is_some_and(|t| t.eq_ignore_ascii_case("jwt"))
    {
        return Err(AuthError::Malformed("header typ is not JWT"));
    }
    if header.contains_key("crit") {
        return Err(AuthError::Malformed(
            "critical header extensions are not supported",
        ));
    }
    let claims_members = Members::parse(claims);
    let claims: Map<String, Value> = serde_json::from_slice(claims)
        .map_err(|_| AuthError::Malformed("claims are not a JSON object"))?;
    if claims_members.as_ref().is_some_and(has_duplicate) {
        return Err(AuthError::Malformed("claims have a duplicate key"));
    }
    let now = NOW as f64;
    let exp = claims
        .get("exp")
        .ok_or(AuthError::Malformed("exp claim is missing"))?
        .as_f64()
        .ok_or(AuthError::Malformed("exp claim is not a number"))?;
    if now > exp + setup.leeway {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = nbf
            .as_f64()
            .ok_or(AuthError::Malformed("nbf claim is not a number"))?;
        if now + setup.leeway < nbf {
            return Err(AuthError::NotYetValid);
        }
    }
    if let Some(iss) = setup.issuer
        && claims.get("iss").and_then(Value::as_str) != Some(iss)
    {
        return Err(AuthError::WrongIssuer);
    }
    if let Some(aud) = setup.audience {
        let ok = match claims.get("aud") {
            Some(Value::Array(list)) => list.iter().any(|v| v.as_str() == Some(aud)),
            Some(v) => v.as_str() == Some(aud),
            None => false,
        };
        if !ok {
            return Err(AuthError::WrongAudience);
        }
    }
    let user = claims
        .get(setup.user_claim)
        .and_then(Value::as_str)
        .ok_or_else(|| AuthError::MissingUserClaim(setup.user_claim.to_owned()))?;
    UserId::new(user).map_err(AuthError::InvalidUser)
}

/// Whether a top-level key occurs more than once: such a token is refused, whichever copy a
/// reader would pick.
fn has_duplicate(members: &Members) -> bool {
    members
        .0
        .iter()
        .enumerate()
        .any(|(i, (key, _))| members.0[..i].iter().any(|(k, _)| k == key))
}

/// What the header's `alg` member is.
enum AlgKind {
    Missing,
    NotString,
    String,
}

fn header_alg_kind(header: &[u8]) -> AlgKind {
    let header: Map<String, Value> = serde_json::from_slice(header).unwrap_or_default();
    match header.get("alg") {
        None => AlgKind::Missing,
        Some(Value::String(_)) => AlgKind::String,
        Some(_) => AlgKind::NotString,
    }
}

/// Errors compare by kind; the algorithm name is not modelled.
fn same(got: &Result<UserId, AuthError>, want: &Result<UserId, AuthError>) -> bool {
    match (got, want) {
        (Err(AuthError::UnsupportedAlgorithm(_)), Err(AuthError::UnsupportedAlgorithm(_))) => true,
        _ => got == want,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let setup = &SETUPS[usize::from(selector) % SETUPS.len()];
    let (header, claims) = match rest.iter().position(|&b| b == 0) {
        Some(nul) => (&rest[..nul], &rest[nul + 1..]),
        None => (DEFAULT_HEADER, rest),
    };
    let token = sign(SECRET, header, claims);
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let got = setup.auth.verify_at(&token, now);

    assert_ne!(
        got,
        Err(AuthError::BadSignature),
        "a correct signature was refused"
    );
    assert_ne!(got, Err(AuthError::Malformed("signature is not base64url")));
    assert_ne!(got, Err(AuthError::Malformed("claims are not base64url")));
    assert_ne!(got, Err(AuthError::Malformed("header is not base64url")));
    assert_ne!(got, Err(AuthError::MissingToken));
    if token.len() > MAX_TOKEN_LEN {
        assert_eq!(got, Err(AuthError::Malformed("token is longer than 8 KiB")));
        return;
    }
    let want = model(setup, header, claims);
    assert!(same(&got, &want), "verify gave {got:?}, the model {want:?}");

    match got {
        Ok(user) => {
            // What was accepted can be issued again and verified with the real clock.
            let issued = setup.auth.issue(&user, Duration::from_secs(300));
            assert_eq!(setup.auth.verify(&issued), Ok(user.clone()));
            let raw = serde_json::from_slice::<Map<String, Value>>(claims)
                .ok()
                .and_then(|c| {
                    c.get(setup.user_claim)
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .expect("an accepted token has a string user claim");
            assert_eq!(user.as_str(), raw.trim());
        }
        Err(err) => {
            // Every error has client-safe text that holds neither token nor secret.
            let text = err.client_message();
            assert!(!text.is_empty());
            let secret = std::str::from_utf8(SECRET).expect("ASCII");
            for text in [text, err.to_string(), format!("{err:?}")] {
                assert!(!text.contains(&token) && !text.contains(secret), "{text}");
            }
            if let AuthError::UnsupportedAlgorithm(name) = &err {
                let plain = |s: &str| {
                    !s.is_empty()
                        && s.len() <= 16
                        && s.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_+".contains(c))
                };
                let alg = serde_json::from_slice::<Map<String, Value>>(header)
                    .ok()
                    .and_then(|h| h.get("alg").and_then(Value::as_str).map(str::to_owned));
                let expected = match header_alg_kind(header) {
                    AlgKind::Missing => "missing".to_owned(),
                    AlgKind::NotString => "non-string".to_owned(),
                    AlgKind::String => match alg {
                        Some(alg) if plain(&alg) => alg,
                        _ => "unrecognized".to_owned(),
                    },
                };
                assert_eq!(name, &expected);
            }
        }
    }
});
