//! The stream and the queue as their consumers see them while faults may be injected
//! (`kit::faults`): `consumer-crash` makes a consumer fail after it handled a batch and before
//! it acknowledged all of it, as a crash would.
//!
//! Every consumer of the platform (the analytics consumer, the orders service's listener, the
//! notifier's poller) acknowledges through one of two calls, [`StreamConsumer::commit`] or
//! [`Queue::delete_batch`], whatever its backend: the hook sits there, once. When the fault
//! fires, the first half of the batch is acknowledged and the call fails; the consumer treats
//! it as the failure it is (a stream consumer subscribes again and resumes after the committed
//! offsets; the queue's unacknowledged messages come back after the visibility timeout), and
//! the rest of the batch is delivered again, which the consumers' deduplication must absorb.
//! The publishers' faults (`stream-publish`, `queue-publish`) are in the outbox relay.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kit::faults::Consumer;

use crate::{
    BusError, Delivered, OutgoingMessage, Queue, ReceivedMessage, Record, Stream, StreamConsumer,
    Unsent, names,
};

/// The consuming service a stream consumer group or a queue belongs to, as `consumer-crash`'s
/// `consumer` parameter names it.
fn consumer_of(group_or_queue: &str) -> Option<Consumer> {
    match group_or_queue {
        names::ANALYTICS_GROUP => Some(Consumer::Analytics),
        names::ORDERS_STATUS_GROUP => Some(Consumer::Orders),
        names::ORDER_EVENTS_QUEUE => Some(Consumer::Notifications),
        _ => None,
    }
}

const CRASH: BusError = BusError::Injected("consumer-crash");

/// A stream whose consumers may crash mid-batch.
pub struct FaultyStream(pub Arc<dyn Stream>);

#[async_trait]
impl Stream for FaultyStream {
    fn system(&self) -> &'static str {
        self.0.system()
    }

    async fn publish(&self, topic: &str, records: &[Record]) -> Result<(), BusError> {
        self.0.publish(topic, records).await
    }

    async fn publish_each(&self, topic: &str, records: &[Record]) -> Result<(), Unsent> {
        self.0.publish_each(topic, records).await
    }

    async fn subscribe(
        &self,
        topic: &str,
        group: &str,
    ) -> Result<Box<dyn StreamConsumer>, BusError> {
        let inner = self.0.subscribe(topic, group).await?;
        Ok(Box::new(FaultyConsumer {
            inner,
            consumer: consumer_of(group),
        }))
    }
}

struct FaultyConsumer {
    inner: Box<dyn StreamConsumer>,
    consumer: Option<Consumer>,
}

#[async_trait]
impl StreamConsumer for FaultyConsumer {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivered>, BusError> {
        self.inner.poll(max, wait).await
    }

    async fn commit(&mut self, delivered: &[Delivered]) -> Result<(), BusError> {
        if delivered.is_empty() || !kit::faults::consumer_crashes(self.consumer) {
            return self.inner.commit(delivered).await;
        }
        let half = delivered.len() / 2;
        if half > 0 {
            self.inner.commit(&delivered[..half]).await?;
        }
        tracing::warn!(
            consumer = self.consumer.map(Consumer::as_str),
            committed = half,
            batch = delivered.len(),
            "fault injection: the consumer crashes before committing the rest of its batch"
        );
        Err(CRASH)
    }

    async fn lag(&mut self) -> Result<Vec<(u32, i64)>, BusError> {
        self.inner.lag().await
    }
}

/// A queue whose consumers may crash mid-batch.
pub struct FaultyQueue(pub Arc<dyn Queue>);

#[async_trait]
impl Queue for FaultyQueue {
    fn system(&self) -> &'static str {
        self.0.system()
    }

    async fn send_batch(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), BusError> {
        self.0.send_batch(queue, messages).await
    }

    async fn send_each(&self, queue: &str, messages: &[OutgoingMessage]) -> Result<(), Unsent> {
        self.0.send_each(queue, messages).await
    }

    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, BusError> {
        self.0.receive(queue, max, wait).await
    }

    async fn delete(&self, queue: &str, receipt: &str) -> Result<(), BusError> {
        if kit::faults::consumer_crashes(consumer_of(queue)) {
            tracing::warn!(
                queue,
                "fault injection: the consumer crashes before acknowledging its message"
            );
            return Err(CRASH);
        }
        self.0.delete(queue, receipt).await
    }

    async fn delete_batch(&self, queue: &str, receipts: &[String]) -> Result<(), BusError> {
        if receipts.is_empty() || !kit::faults::consumer_crashes(consumer_of(queue)) {
            return self.0.delete_batch(queue, receipts).await;
        }
        let half = receipts.len() / 2;
        if half > 0 {
            self.0.delete_batch(queue, &receipts[..half]).await?;
        }
        tracing::warn!(
            queue,
            acknowledged = half,
            batch = receipts.len(),
            "fault injection: the consumer crashes before acknowledging the rest of its batch"
        );
        Err(CRASH)
    }

    async fn release(&self, queue: &str, receipt: &str, delay: Duration) -> Result<(), BusError> {
        self.0.release(queue, receipt, delay).await
    }

    async fn depth(&self, queue: &str) -> Result<i64, BusError> {
        self.0.depth(queue).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn each_consumer_is_known_by_its_group_or_queue() {
        assert_eq!(consumer_of("analytics"), Some(Consumer::Analytics));
        assert_eq!(consumer_of("orders-status"), Some(Consumer::Orders));
        assert_eq!(consumer_of("order-events"), Some(Consumer::Notifications));
        assert_eq!(consumer_of("a-test-group"), None);
    }
}
