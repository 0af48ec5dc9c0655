//! Token input as a client can send it: `auth::bearer_token` on fuzzed `Authorization`
//! headers and query strings, and `Authenticator::verify` on whatever token it finds and on
//! the raw input. Nothing panics, the query is decoded as `form_urlencoded` decodes it, a
//! token is accepted only with a valid signature, and errors never echo the token or secret.
//!
//! Input layout: the first byte `n` gives the number of `Authorization` headers (`n % 4`),
//! each a length byte followed by its value; the rest is the query string.

#![no_main]

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use switchboard::auth::{self, Authenticator, JwtConfig};
use switchboard_fuzz::{Frames, hs256};

const SECRET: &[u8] = b"switchboard-fuzzing-secret-0123456789abcdef";

/// 2023-11-14T22:13:20Z: a fixed "now", so that a failure replays the same way.
const NOW: u64 = 1_700_000_000;

static AUTH: LazyLock<Authenticator> = LazyLock::new(|| {
    Authenticator::new(JwtConfig::new(SECRET).expect("the secret is 32 bytes or more"))
});

fn check_token(token: &str) {
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    match AUTH.verify_at(token, now) {
        Ok(user) => {
            // Only a token signed with the secret can pass.
            let (input, signature) = token.rsplit_once('.').expect("a token has 3 segments");
            assert_eq!(
                signature,
                hs256(SECRET, input),
                "accepted a forged signature"
            );
            assert!(!user.as_str().is_empty());
        }
        Err(err) => {
            let texts = [err.to_string(), format!("{err:?}"), err.client_message()];
            for text in &texts {
                let secret = std::str::from_utf8(SECRET).expect("ASCII");
                assert!(!text.contains(secret), "an error shows the secret");
                // Short inputs may be substrings of fixed texts by chance; a token that looks
                // like one (two dots and some length) must never be echoed.
                if token.len() >= 16 && token.matches('.').count() == 2 {
                    assert!(!text.contains(token), "an error shows the token: {text}");
                }
            }
        }
    }
    // `verify` with the real clock must not panic either.
    let _ = AUTH.verify(token);
}

/// The first non-empty `access_token` of `query`, as the URL standard's form decoding reads it.
fn reference_query_token(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, value)| key == "access_token" && !value.is_empty())
        .map(|(_, value)| value.into_owned())
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let mut frames = Frames::new(rest);
    let mut headers = HeaderMap::new();
    let mut consumed = 0;
    for _ in 0..count % 4 {
        let Some(value) = frames.next() else { break };
        consumed += 1 + value.len();
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(AUTHORIZATION, value);
        }
    }
    let query_bytes = rest.get(consumed..).unwrap_or_default();
    let query = String::from_utf8_lossy(query_bytes);

    // Without headers the query decides, exactly as the reference decoder reads it.
    let empty = HeaderMap::new();
    let from_query = auth::bearer_token(&empty, Some(&query));
    assert_eq!(
        from_query.as_deref(),
        reference_query_token(&query).as_deref(),
        "query {query:?}"
    );
    if !query.contains(['%', '+']) {
        assert!(matches!(from_query, None | Some(Cow::Borrowed(_))));
    }
    assert_eq!(auth::bearer_token(&empty, None), None);

    // With headers: the first `Bearer <token>` header wins, its token borrowed from it.
    let found = auth::bearer_token(&headers, Some(&query));
    let header_token = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            // `to_str` admits only visible ASCII, spaces and tabs.
            let v = v.trim_matches([' ', '\t']);
            let (scheme, rest) = (v.get(..6)?, v.get(6..)?);
            let spaced = rest.starts_with([' ', '\t']);
            let token = rest.trim_matches([' ', '\t']);
            (scheme.eq_ignore_ascii_case("bearer") && spaced && !token.is_empty()).then_some(token)
        });
    match header_token {
        Some(expected) => {
            assert_eq!(found.as_deref(), Some(expected));
            assert!(matches!(found, Some(Cow::Borrowed(_))));
        }
        None => assert_eq!(found, from_query),
    }
    if let Some(token) = &found {
        assert!(!token.is_empty());
        check_token(token);
    }

    // The raw input as a token, too: most of it is refused early.
    check_token(&String::from_utf8_lossy(rest));
});
