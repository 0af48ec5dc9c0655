//! Connection tokens handed out by negotiate, and the WebSockets that attach to them.
//!
//! A token is *pending* from negotiate until its WebSocket attaches or it expires
//! ([`HubOptions::negotiate_ttl`](crate::HubOptions::negotiate_ttl)). Pending tokens are
//! bounded in total and per user, so one user cannot take everyone's share, and they expire on
//! time: every negotiate first expires the tokens that are due (tokens expire in the order they
//! were handed out, so that is a look at the front of a queue).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::ws::WebSocket;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use switchboard_core::{ConnectionId, UserId};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// State of a connection token.
#[derive(Debug)]
pub(crate) enum TokenState {
    /// Negotiated; waiting for its WebSocket until `expires`.
    Pending {
        id: ConnectionId,
        user: UserId,
        user_agent: Option<Arc<str>>,
        expires: Instant,
        /// The client asked for stateful reconnect and it was granted.
        stateful: bool,
    },
    /// A WebSocket is attached (or, for stateful connections, was and may come back).
    Attached {
        user: UserId,
        /// Hands a new transport to a stateful connection's session.
        reattach: Option<mpsc::Sender<WebSocket>>,
    },
}

/// Why negotiate refused to hand out a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PendingRefusal {
    /// Too many tokens are pending in total.
    Total(usize),
    /// This user has too many tokens pending.
    User(usize),
}

/// A negotiated connection that waits for its WebSocket.
#[derive(Debug)]
pub(crate) struct PendingToken {
    pub(crate) id: ConnectionId,
    pub(crate) user: UserId,
    pub(crate) user_agent: Option<Arc<str>>,
    pub(crate) stateful: bool,
}

/// What presenting a token to the WebSocket endpoint leads to.
#[derive(Debug)]
pub(crate) enum Claimed {
    /// The first transport of a negotiated connection.
    New {
        id: ConnectionId,
        user_agent: Option<Arc<str>>,
        /// New transports for it, if it is stateful.
        reattach: Option<mpsc::Receiver<WebSocket>>,
    },
    /// A new transport for a live stateful connection.
    Reattach(mpsc::Sender<WebSocket>),
}

/// Why a token could not be claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimError {
    /// Unknown or expired: 404.
    NotFound,
    /// Negotiated by another user: 403.
    OtherUser,
    /// A transport is attached and the connection is not stateful: 409.
    Attached,
}

/// The token table of one hub.
#[derive(Debug, Default)]
pub(crate) struct Tokens {
    map: DashMap<Arc<str>, TokenState>,
    /// Pending tokens in the order they expire (the time-to-live is the same for all). May
    /// hold tokens that were claimed since; they are skipped.
    expiry: Mutex<VecDeque<(Instant, Arc<str>)>>,
    pending: AtomicUsize,
    pending_per_user: DashMap<UserId, usize>,
}

impl Tokens {
    /// Tokens pending in total.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Tokens `user` has pending.
    pub(crate) fn pending_for(&self, user: &UserId) -> usize {
        self.pending_per_user.get(user).map_or(0, |n| *n)
    }

    /// Expires the pending tokens that are due at `now`.
    pub(crate) fn expire(&self, now: Instant) {
        let mut expiry = self.expiry.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((expires, _)) = expiry.front()
            && *expires <= now
        {
            let Some((_, token)) = expiry.pop_front() else {
                break;
            };
            if let Some((_, TokenState::Pending { user, .. })) = self.map.remove_if(
                &token,
                |_, state| matches!(state, TokenState::Pending { expires, .. } if *expires <= now),
            ) {
                self.forget_pending(&user);
            }
        }
        if expiry.is_empty() && expiry.capacity() > 1024 {
            expiry.shrink_to_fit();
        }
    }

    /// Hands out `token` for a negotiated connection, unless too many are pending in total
    /// (`max_total`) or for its user (`max_per_user`). Expires due tokens first.
    pub(crate) fn add_pending(
        &self,
        token: Arc<str>,
        pending: PendingToken,
        expires: Instant,
        now: Instant,
        max_total: usize,
        max_per_user: usize,
    ) -> Result<(), PendingRefusal> {
        self.expire(now);
        if self.pending() >= max_total {
            return Err(PendingRefusal::Total(max_total));
        }
        {
            let mut mine = self
                .pending_per_user
                .entry(pending.user.clone())
                .or_default();
            if *mine >= max_per_user.max(1) {
                return Err(PendingRefusal::User(max_per_user.max(1)));
            }
            *mine += 1;
        }
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.map.insert(
            token.clone(),
            TokenState::Pending {
                id: pending.id,
                user: pending.user,
                user_agent: pending.user_agent,
                expires,
                stateful: pending.stateful,
            },
        );
        self.expiry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back((expires, token));
        Ok(())
    }

    fn forget_pending(&self, user: &UserId) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        self.pending_per_user.remove_if_mut(user, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }

    /// Attaches a WebSocket of `user` to `token`.
    pub(crate) fn claim(
        &self,
        token: &str,
        user: &UserId,
        now: Instant,
    ) -> Result<(Arc<str>, Claimed), ClaimError> {
        let Entry::Occupied(mut entry) = self.map.entry(Arc::from(token)) else {
            return Err(ClaimError::NotFound);
        };
        let key = entry.key().clone();
        match entry.get() {
            TokenState::Attached { user: owner, .. } if owner != user => Err(ClaimError::OtherUser),
            TokenState::Attached {
                reattach: Some(sender),
                ..
            } => Ok((key, Claimed::Reattach(sender.clone()))),
            TokenState::Attached { reattach: None, .. } => Err(ClaimError::Attached),
            TokenState::Pending {
                expires,
                user: owner,
                ..
            } if *expires <= now => {
                let owner = owner.clone();
                entry.remove();
                self.forget_pending(&owner);
                Err(ClaimError::NotFound)
            }
            TokenState::Pending { user: owner, .. } if owner != user => Err(ClaimError::OtherUser),
            TokenState::Pending { stateful, .. } => {
                let (sender, receiver) = if *stateful {
                    let (tx, rx) = mpsc::channel(1);
                    (Some(tx), Some(rx))
                } else {
                    (None, None)
                };
                let attached = TokenState::Attached {
                    user: user.clone(),
                    reattach: sender,
                };
                let TokenState::Pending {
                    id,
                    user_agent,
                    user,
                    ..
                } = entry.insert(attached)
                else {
                    return Err(ClaimError::NotFound);
                };
                self.forget_pending(&user);
                Ok((
                    key,
                    Claimed::New {
                        id,
                        user_agent,
                        reattach: receiver,
                    },
                ))
            }
        }
    }

    /// The connection did not turn on stateful reconnect: later transports get 409.
    pub(crate) fn forbid_reattach(&self, token: &str) {
        if let Some(mut state) = self.map.get_mut(token)
            && let TokenState::Attached { reattach, .. } = &mut *state
        {
            *reattach = None;
        }
    }

    /// Forgets a token whose connection ended.
    pub(crate) fn remove(&self, token: &str) {
        if let Some((_, TokenState::Pending { user, .. })) = self.map.remove(token) {
            self.forget_pending(&user);
        }
    }

    /// Tokens in the table, pending or attached.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn user(s: &str) -> UserId {
        UserId::new(s).expect("valid")
    }

    fn pending(u: &str, n: usize) -> PendingToken {
        PendingToken {
            id: ConnectionId::new(&format!("c{n}")).expect("valid"),
            user: user(u),
            user_agent: None,
            stateful: false,
        }
    }

    #[test]
    fn each_user_gets_a_share_and_expired_tokens_free_it_on_time() {
        let tokens = Tokens::default();
        let t = Instant::now();
        let ttl = Duration::from_secs(30);
        for n in 0..3 {
            let token: Arc<str> = Arc::from(format!("m{n}"));
            assert_eq!(
                tokens.add_pending(token, pending("mallory", n), t + ttl, t, 100, 3),
                Ok(())
            );
        }
        assert_eq!(
            tokens.add_pending(Arc::from("m3"), pending("mallory", 3), t + ttl, t, 100, 3),
            Err(PendingRefusal::User(3)),
            "a user's share is bounded"
        );
        assert_eq!(
            tokens.add_pending(Arc::from("a0"), pending("alice", 9), t + ttl, t, 100, 3),
            Ok(()),
            "other users still get theirs"
        );
        assert_eq!(tokens.pending(), 4);
        // The moment they expire, they are gone and the share is free again.
        let later = t + ttl;
        assert_eq!(
            tokens.add_pending(
                Arc::from("m4"),
                pending("mallory", 4),
                later + ttl,
                later,
                100,
                3
            ),
            Ok(())
        );
        assert_eq!(tokens.pending(), 1);
        assert_eq!(tokens.pending_for(&user("mallory")), 1);
        assert_eq!(tokens.pending_for(&user("alice")), 0);
        assert_eq!(tokens.len(), 1, "expired tokens leave the table");
    }

    #[test]
    fn the_total_is_bounded_and_claiming_frees_a_slot() {
        let tokens = Tokens::default();
        let t = Instant::now();
        let expires = t + Duration::from_secs(30);
        assert!(
            tokens
                .add_pending(Arc::from("a"), pending("ann", 1), expires, t, 2, 10)
                .is_ok()
        );
        assert!(
            tokens
                .add_pending(Arc::from("b"), pending("bob", 2), expires, t, 2, 10)
                .is_ok()
        );
        assert_eq!(
            tokens.add_pending(Arc::from("c"), pending("cy", 3), expires, t, 2, 10),
            Err(PendingRefusal::Total(2))
        );
        assert_eq!(
            tokens.claim("a", &user("bob"), t).map(|_| ()),
            Err(ClaimError::OtherUser)
        );
        assert!(matches!(
            tokens.claim("a", &user("ann"), t),
            Ok((_, Claimed::New { reattach: None, .. }))
        ));
        assert_eq!(
            tokens.claim("a", &user("ann"), t).map(|_| ()),
            Err(ClaimError::Attached)
        );
        assert_eq!(tokens.pending(), 1);
        assert!(
            tokens
                .add_pending(Arc::from("c"), pending("cy", 3), expires, t, 2, 10)
                .is_ok()
        );
        assert_eq!(
            tokens.claim("b", &user("bob"), expires).map(|_| ()),
            Err(ClaimError::NotFound),
            "an expired token is gone"
        );
        assert_eq!(tokens.pending(), 1);
        tokens.remove("a");
        tokens.remove("c");
        assert_eq!((tokens.pending(), tokens.len()), (0, 0));
    }
}
