//! Delivery of a stored notification. The default writes it to the log; an SES, SNS or SMTP
//! sender implements the same trait.

use async_trait::async_trait;

use crate::content::Notification;

#[derive(Debug, thiserror::Error)]
#[error("sending failed: {0}")]
pub struct SendError(pub String);

#[async_trait]
pub trait Sender: Send + Sync {
    async fn send(&self, notification: &Notification) -> Result<(), SendError>;
}

/// Logs each notification as a structured line.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSender;

#[async_trait]
impl Sender for LogSender {
    async fn send(&self, n: &Notification) -> Result<(), SendError> {
        tracing::info!(
            event_id = %n.event_id,
            order_id = %n.order_id,
            recipient = %n.recipient,
            subject = %n.subject,
            "notification sent"
        );
        Ok(())
    }
}
