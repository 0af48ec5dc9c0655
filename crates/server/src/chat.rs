//! The chat hub of the classic user-mapping article.
//!
//! `SendChatMessage(who, message)` calls `addChatMessage("<sender>: <message>")` on every live
//! connection of user `who`, exactly once each, where `<sender>` is the caller's user from the
//! verified token. When `who` has no live connection, the caller alone gets
//! `showErrorMessage("The user '<who>' is not connected.")`. The invocation completes without
//! a result either way.

use switchboard_core::UserId;

use crate::hub::{Hub, HubContext, HubError};

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
    let delivered = match UserId::new(&who) {
        Ok(target) => {
            let text = format!("{}: {}", ctx.user(), message);
            ctx.clients()
                .user(&target)
                .send("addChatMessage", &(text,))
                .await?
                .connections
        }
        // No valid user id can be connected.
        Err(_) => 0,
    };
    if delivered == 0 {
        let _caller = ctx
            .clients()
            .caller()
            .send(
                "showErrorMessage",
                &(format!("The user '{}' is not connected.", who.trim()),),
            )
            .await?;
    }
    Ok(())
}
