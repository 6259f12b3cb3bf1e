//! `Idempotency-Key` records in DynamoDB (feature `dynamodb`), for services whose store is a
//! DynamoDB table. The records are items of that same table (single-table design, as the
//! orders store keeps its processed events and counters): partition key
//! `idempotency#<key>`, `kind` = `idempotency`, so every replica of the service sees the same
//! keys and no table is added.
//!
//! - claiming is one conditional `PutItem`: it succeeds where no record is, or where the one
//!   there has expired or was claimed by a request that never finished (its process died);
//!   otherwise a consistent `GetItem` reads the record to replay or wait on;
//! - `expires_ms` (Unix ms) decides expiry exactly; `purge_at` (Unix seconds) is the table's
//!   TTL attribute, so DynamoDB deletes old records itself ([`Idempotency::purge_expired`]
//!   has nothing to do: TTL is configured on the table by Terraform);
//! - `fingerprint` is the request's hash (see [`super::fingerprint`]); items written before
//!   hashing hold the request text, are compared by its hash, and are left to the TTL;
//! - a stored answer is kept in the item (`status_code`, `content_type`, `body` as binary), so
//!   it shares DynamoDB's 400 KB item limit: an answer that does not fit is not stored, and a
//!   retry then waits for the claim to be abandoned (one minute) and runs again.
//!
//! [`Idempotency::purge_expired`]: super::Idempotency::purge_expired

use std::collections::HashMap;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use axum::body::Bytes;

use super::{ABANDONED_AFTER_MS, Claim, IdempotencyError};

const PREFIX: &str = "idempotency#";

/// How often a claim is retried when the record it lost to vanished before it could be read
/// (a failed request released it); beyond that the caller sees "in flight" and polls again.
const ATTEMPTS: u32 = 3;

/// The keys of one DynamoDB-backed service.
#[derive(Debug, Clone)]
pub(super) struct DynamoKeys {
    client: Client,
    table: String,
    partition_key: String,
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A failed request, as unavailable (the table did not answer in time or throttled: a 503 the
/// client may retry) or as a fault.
fn failure<E, R>(what: &str, e: SdkError<E, R>) -> IdempotencyError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let busy = match &e {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(service) => matches!(
            service.err().code(),
            Some(
                "ThrottlingException"
                    | "ProvisionedThroughputExceededException"
                    | "RequestLimitExceeded"
                    | "InternalServerError"
                    | "ServiceUnavailable"
            )
        ),
        _ => false,
    };
    let message = format!("{what}: {}", DisplayErrorContext(&e));
    if busy {
        IdempotencyError::Unavailable(message)
    } else {
        IdempotencyError::Dynamo(message)
    }
}

impl DynamoKeys {
    pub(super) fn new(client: Client, table: String, partition_key: String) -> DynamoKeys {
        DynamoKeys {
            client,
            table,
            partition_key,
        }
    }

    fn id(key: &str) -> AttributeValue {
        AttributeValue::S(format!("{PREFIX}{key}"))
    }

    pub(super) async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        now: i64,
        ttl_ms: i64,
    ) -> Result<Claim, IdempotencyError> {
        let expires = now.saturating_add(ttl_ms);
        for _ in 0..ATTEMPTS {
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .item(&self.partition_key, Self::id(key))
                .item("kind", AttributeValue::S("idempotency".into()))
                .item("fingerprint", AttributeValue::S(fingerprint.to_owned()))
                .item("claimed_at", n(now))
                .item("expires_ms", n(expires))
                .item("purge_at", n(expires / 1000 + 1))
                .condition_expression(
                    "attribute_not_exists(#pk) OR #expires <= :now \
                     OR (attribute_not_exists(#status) AND #claimed <= :abandoned)",
                )
                .expression_attribute_names("#pk", &self.partition_key)
                .expression_attribute_names("#expires", "expires_ms")
                .expression_attribute_names("#status", "status_code")
                .expression_attribute_names("#claimed", "claimed_at")
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":abandoned", n(now - ABANDONED_AFTER_MS))
                .send()
                .await;
            match put {
                Ok(_) => return Ok(Claim::Mine),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|e| e.is_conditional_check_failed_exception()) => {}
                Err(e) => return Err(failure("claiming an idempotency key", e)),
            }
            let stored = self
                .client
                .get_item()
                .table_name(&self.table)
                .key(&self.partition_key, Self::id(key))
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| failure("reading an idempotency key", e))?;
            if let Some(item) = stored.item {
                return Ok(Claim::of(fingerprint, parse(item)));
            }
        }
        Ok(Claim::InFlight)
    }

    pub(super) async fn complete(
        &self,
        key: &str,
        status: u16,
        content_type: Option<String>,
        body: Bytes,
    ) -> Result<(), IdempotencyError> {
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(&self.partition_key, Self::id(key))
            // Only the claim's own record: never recreate one that expired meanwhile.
            .condition_expression("attribute_exists(#pk)")
            .expression_attribute_names("#pk", &self.partition_key)
            .expression_attribute_names("#status", "status_code")
            .expression_attribute_names("#body", "body")
            .expression_attribute_values(":status", n(i64::from(status)))
            .expression_attribute_values(":body", AttributeValue::B(Blob::new(body.to_vec())));
        update = match content_type {
            Some(ct) => update
                .update_expression("SET #status = :status, #body = :body, #ct = :ct")
                .expression_attribute_names("#ct", "content_type")
                .expression_attribute_values(":ct", AttributeValue::S(ct)),
            None => update.update_expression("SET #status = :status, #body = :body"),
        };
        match update.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(failure("storing an idempotent answer", e)),
        }
    }

    /// Releases an unanswered claim (the request failed), leaving answered ones alone.
    pub(super) async fn forget(&self, key: &str) -> Result<(), IdempotencyError> {
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(&self.partition_key, Self::id(key))
            .condition_expression("attribute_not_exists(#status)")
            .expression_attribute_names("#status", "status_code")
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(failure("releasing an idempotency key", e)),
        }
    }
}

/// A stored record as (fingerprint, status, content type, body).
fn parse(
    item: HashMap<String, AttributeValue>,
) -> (String, Option<u16>, Option<String>, Option<Vec<u8>>) {
    let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
    let status = item
        .get("status_code")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok());
    let body = item
        .get("body")
        .and_then(|v| v.as_b().ok())
        .map(|b| b.as_ref().to_vec());
    (
        text("fingerprint").unwrap_or_default(),
        status,
        text("content_type"),
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::operation::put_item::PutItemError;

    #[test]
    fn a_table_that_does_not_answer_is_unavailable_not_a_fault() {
        // A 503 the client retries with its key, where it used to be a 500.
        let timeout: SdkError<PutItemError> = SdkError::timeout_error("no answer in time");
        assert!(failure("claiming an idempotency key", timeout).is_unavailable());
        let unsendable: SdkError<PutItemError> = SdkError::construction_failure("bad request");
        assert!(!failure("claiming an idempotency key", unsendable).is_unavailable());
    }
}
