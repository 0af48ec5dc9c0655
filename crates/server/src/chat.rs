//! The chat hub of the classic user-mapping article.
//!
//! `SendChatMessage(who, message)` calls `addChatMessage("<sender>: <message>")` on every live
//! connection of user `who`, exactly once each, where `<sender>` is the caller's user from the
//! verified token, on whichever node holds each connection. The caller alone is told when that
//! did not work, in one `showErrorMessage`:
//!
//! * `"The user '<who>' is not connected."` when `who` has no live connection on any node (a
//!   user connected only to another node is *not* reported offline: the message was
//!   forwarded there);
//! * `"The message to '<who>' could not reach N connection(s) on other servers right now; try
//!   again later."` when connections recorded on other nodes could not be reached (no
//!   backplane, or it failed);
//! * `"The message to '<who>' could not reach other servers right now; try again later."` when
//!   the user's channel could not be published on (stores without lookup);
//! * `"The message to '<who>' could not be delivered to N connection(s): the recipient is not
//!   reading its messages."` when some of `who`'s connections do not read (their queue stayed
//!   full; they are being closed).
//!
//! The invocation completes without a result either way.

use switchboard_core::UserId;

use crate::hub::{Delivery, Hub, HubContext, HubError};

/// The path the chat hub is served on.
pub const PATH: &str = "/hubs/chat";

/// Builds the chat hub.
pub fn hub() -> Hub {
    Hub::new().method("SendChatMessage", send_chat_message)
}

async fn send_chat_message(
    ctx: HubContext,
    (who, message): (String, String),
) -> Result<(), HubError> {
    let delivery = match UserId::new(&who) {
        Ok(target) => {
            let text = format!("{}: {}", ctx.user(), message);
            ctx.clients()
                .user(&target)
                .send("addChatMessage", &(text,))
                .await?
        }
        // No valid user id can be connected.
        Err(_) => Delivery::default(),
    };
    let who = who.trim();
    let mut errors = Vec::new();
    if delivery.nobody_there() {
        errors.push(format!("The user '{who}' is not connected."));
    }
    if delivery.unreachable > 0 {
        errors.push(format!(
            "The message to '{who}' could not reach {} connection(s) on other servers right \
             now; try again later.",
            delivery.unreachable
        ));
    }
    if delivery.publish_failed {
        errors.push(format!(
            "The message to '{who}' could not reach other servers right now; try again later."
        ));
    }
    if delivery.not_reading > 0 {
        errors.push(format!(
            "The message to '{who}' could not be delivered to {} connection(s): the recipient \
             is not reading its messages.",
            delivery.not_reading
        ));
    }
    if errors.is_empty() {
        return Ok(());
    }
    let _caller = ctx
        .clients()
        .caller()
        .send("showErrorMessage", &(errors.join(" "),))
        .await?;
    Ok(())
}
