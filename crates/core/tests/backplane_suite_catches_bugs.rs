//! The backplane conformance suite tested on itself: endpoints of the memory bus wrapped with
//! one deliberate bug each fail the case written for that behaviour, and the same wrappers
//! without a bug pass those cases.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use switchboard_core::testkit::{BackplaneHarness, MemoryBus, backplane_cases as cases};
use switchboard_core::{
    Address, Backplane, BackplaneCapabilities, BackplaneError, Health, Inbox, Message, NodeId,
    Reach, async_trait,
};

/// One deliberate bug each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bug {
    /// No bug: the wrapper only passes calls on.
    None,
    /// A message to one node reaches every node.
    DeliversNodeMessagesEverywhere,
    /// Now and then a message is held back and published after the next one to the same
    /// address.
    Reorders,
    /// `unsubscribe` does nothing.
    IgnoresUnsubscribe,
    /// A node never receives its own channel messages.
    DropsOwnChannelCopy,
    /// Payloads are cut to 64 KiB on the way.
    TruncatesPayloads,
    /// Channels are named by the bare name, so user `bob` and group `bob` share one.
    ConfusesUsersAndGroups,
    /// `stop` returns without stopping anything.
    IgnoresStop,
    /// `publish` says a message reached one node, whoever was subscribed.
    MiscountsReach,
}

/// The channel a backplane with [`Bug::ConfusesUsersAndGroups`] uses for `address`.
fn confused(address: &Address) -> Address {
    match address {
        Address::User(user) => Address::Group(Arc::from(user.as_str())),
        other => other.clone(),
    }
}

const TRUNCATED_LEN: usize = 64 * 1024;

#[derive(Debug)]
struct Buggy {
    inner: Arc<dyn Backplane>,
    bug: Bug,
    /// The nodes started on this bus.
    nodes: Arc<Mutex<Vec<NodeId>>>,
    published: AtomicU64,
    held: Mutex<Option<Message>>,
}

struct BuggyInbox {
    inner: Arc<dyn Inbox>,
    bug: Bug,
    node: NodeId,
}

#[async_trait]
impl Inbox for BuggyInbox {
    async fn receive(&self, mut message: Message) {
        match self.bug {
            Bug::DropsOwnChannelCopy
                if message.id.origin == self.node && !matches!(message.to, Address::Node(_)) =>
            {
                return;
            }
            Bug::TruncatesPayloads => message.payload.truncate(TRUNCATED_LEN),
            _ => {}
        }
        self.inner.receive(message).await;
    }
}

#[async_trait]
impl Backplane for Buggy {
    fn capabilities(&self) -> BackplaneCapabilities {
        self.inner.capabilities()
    }

    async fn start(&self, node: &NodeId, inbox: Arc<dyn Inbox>) -> Result<(), BackplaneError> {
        self.nodes.lock().expect("lock").push(node.clone());
        let inbox = Arc::new(BuggyInbox {
            inner: inbox,
            bug: self.bug,
            node: node.clone(),
        });
        self.inner.start(node, inbox).await
    }

    async fn publish(&self, message: &Message) -> Result<Reach, BackplaneError> {
        match self.bug {
            Bug::MiscountsReach => {
                self.inner.publish(message).await?;
                Ok(Reach::nodes(1))
            }
            Bug::DeliversNodeMessagesEverywhere if matches!(message.to, Address::Node(_)) => {
                let nodes = self.nodes.lock().expect("lock").clone();
                for node in nodes {
                    let mut copy = message.clone();
                    copy.to = Address::Node(node);
                    self.inner.publish(&copy).await?;
                }
                Ok(Reach::UNKNOWN)
            }
            Bug::Reorders => {
                let n = self.published.fetch_add(1, Ordering::SeqCst);
                let release = {
                    let mut held = self.held.lock().expect("lock");
                    match held.take() {
                        Some(first) if first.to == message.to => Some(first),
                        Some(first) => {
                            *held = Some(first);
                            None
                        }
                        None if n % 7 == 3 => {
                            *held = Some(message.clone());
                            return Ok(Reach::UNKNOWN);
                        }
                        None => None,
                    }
                };
                let reach = self.inner.publish(message).await?;
                if let Some(first) = release {
                    self.inner.publish(&first).await?;
                }
                Ok(reach)
            }
            Bug::ConfusesUsersAndGroups => {
                let mut message = message.clone();
                message.to = confused(&message.to);
                self.inner.publish(&message).await
            }
            _ => self.inner.publish(message).await,
        }
    }

    async fn subscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        if self.bug == Bug::ConfusesUsersAndGroups {
            return self.inner.subscribe(&confused(address)).await;
        }
        self.inner.subscribe(address).await
    }

    async fn unsubscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        match self.bug {
            Bug::IgnoresUnsubscribe => Ok(()),
            Bug::ConfusesUsersAndGroups => self.inner.unsubscribe(&confused(address)).await,
            _ => self.inner.unsubscribe(address).await,
        }
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    async fn stop(&self) {
        if self.bug != Bug::IgnoresStop {
            self.inner.stop().await;
        }
    }
}

struct BrokenHarness(Bug);

#[async_trait]
impl BackplaneHarness for BrokenHarness {
    async fn backplanes(&self, _namespace: &str, nodes: usize) -> Vec<Arc<dyn Backplane>> {
        let bus = MemoryBus::new();
        let started = Arc::new(Mutex::new(Vec::new()));
        (0..nodes)
            .map(|_| {
                Arc::new(Buggy {
                    inner: bus.endpoint(),
                    bug: self.0,
                    nodes: Arc::clone(&started),
                    published: AtomicU64::new(0),
                    held: Mutex::new(None),
                }) as Arc<dyn Backplane>
            })
            .collect()
    }
}

/// Runs a case in its own task and asserts that it failed.
async fn assert_fails<F>(case: &str, run: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match tokio::spawn(run).await {
        Err(e) if e.is_panic() => {}
        other => panic!("the case `{case}` should have caught the bug, got {other:?}"),
    }
}

macro_rules! catches {
    ($name:ident, $bug:expr, $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            assert_fails(stringify!($case), async {
                cases::$case(&BrokenHarness($bug)).await
            })
            .await;
        }
    };
}

catches!(
    a_backplane_that_delivers_node_messages_everywhere_fails,
    Bug::DeliversNodeMessagesEverywhere,
    node_messages_reach_only_their_node
);
catches!(
    a_backplane_that_reorders_fails,
    Bug::Reorders,
    messages_from_one_sender_arrive_in_order
);
catches!(
    a_backplane_that_ignores_unsubscribe_fails,
    Bug::IgnoresUnsubscribe,
    subscribe_and_unsubscribe_are_idempotent
);
catches!(
    a_backplane_that_drops_the_publishers_own_copy_fails,
    Bug::DropsOwnChannelCopy,
    channel_messages_reach_every_subscriber_once
);
catches!(
    a_backplane_that_truncates_payloads_fails,
    Bug::TruncatesPayloads,
    every_field_round_trips
);
catches!(
    a_backplane_that_confuses_users_and_groups_fails,
    Bug::ConfusesUsersAndGroups,
    hostile_names_do_not_cross_talk
);
catches!(
    a_backplane_that_miscounts_its_reach_fails,
    Bug::MiscountsReach,
    publish_reports_its_reach_as_claimed
);
catches!(
    a_backplane_that_ignores_stop_fails,
    Bug::IgnoresStop,
    nothing_arrives_after_stop
);

/// The wrappers themselves are sound: without a bug, the same cases pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrappers_without_a_bug_pass() {
    let harness = BrokenHarness(Bug::None);
    cases::node_messages_reach_only_their_node(&harness).await;
    cases::messages_from_one_sender_arrive_in_order(&harness).await;
    cases::subscribe_and_unsubscribe_are_idempotent(&harness).await;
    cases::channel_messages_reach_every_subscriber_once(&harness).await;
    cases::every_field_round_trips(&harness).await;
    cases::hostile_names_do_not_cross_talk(&harness).await;
    cases::nothing_arrives_after_stop(&harness).await;
    cases::publish_reports_its_reach_as_claimed(&harness).await;
}
