//! `Idempotency-Key` for POST routes: a retry with the same key gets the stored answer (same
//! status and body, `idempotent-replayed: true`) without running the handler again; the same
//! key with a different body is refused with 422; concurrent requests with one key wait for
//! the first and then replay it. 5xx answers are not stored, so a retry after an outage runs
//! again. Keys expire after a configurable time.
//!
//! What a key costs is bounded: a body that is not JSON never claims one (the handler answers
//! its 400); only answers a retry of the same request would meet again are kept (2xx, 402,
//! 409, 422) and at most [`MAX_STORED_ANSWER`] bytes of them, anything else frees the key; a
//! request whose client went away frees its key at once; and waiters back off (10 ms
//! doubling to 250 ms) instead of asking the store every 10 ms.
//!
//! A record keeps the request's SHA-256 ([`fingerprint`]), never the request: bodies carry
//! card numbers and passwords, and a 24-hour cache must not become a copy of them. Records
//! written before that kept the canonical request itself; they still match (their text is
//! hashed on comparison) and [`Idempotency::run_purger`] rewrites them to their hash when the
//! service starts ([`Idempotency::hash_legacy_fingerprints`]). The stored answer is kept as
//! sent, so a route under this guard must answer nothing it would not store.
//!
//! The table lives in the owning service's database ([`MIGRATION`], [`PG_MIGRATION`]); for a
//! service on DynamoDB the records are items of its own table ([`Idempotency::on_dynamo`]). Handlers see the key as
//! an [`IdempotencyKey`] extension, so they can also make their own writes idempotent (the
//! orders service derives the order id from it), which closes the gap between committing the
//! work and storing the answer.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rusqlite::params;

use crate::db::{Db, DbError, now_ms};
use crate::problem::Problem;

#[cfg(feature = "dynamodb")]
mod dynamo;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The idempotency table, to include in the owning service's migrations.
pub const MIGRATION: &str = "CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status INTEGER,
    content_type TEXT,
    body BLOB,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);";

/// An in-flight claim older than this is taken to be abandoned (its process died).
const ABANDONED_AFTER_MS: i64 = 60_000;
/// How long a concurrent duplicate waits for the first request's answer.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(30);
/// The largest answer kept for a replay; a larger one frees its key (orders and payments
/// answer a few KiB).
pub const MAX_STORED_ANSWER: usize = 64 * 1024;

/// Answers a retry of the same request would meet again: what it did (2xx, or 402: the
/// provider declined the card, a payment recorded as failed), or a refusal of the request
/// itself (409, 422). Anything else (a malformed body, missing rights, a limit, an outage)
/// frees the key, so the client can fix and resend under it.
fn worth_storing(status: StatusCode) -> bool {
    status.is_success()
        || status == StatusCode::PAYMENT_REQUIRED
        || status == StatusCode::CONFLICT
        || status == StatusCode::UNPROCESSABLE_ENTITY
}

/// A claim this request holds: freed when dropped unsettled (the client went away and the
/// handler with it), rather than blocking its key until it counts as abandoned.
struct Claimed {
    idem: Idempotency,
    key: String,
    settled: bool,
}

impl Claimed {
    /// Frees the key now: the answer is not worth keeping.
    async fn forget(mut self) {
        self.settled = true;
        if let Err(e) = self.idem.forget(&self.key).await {
            tracing::warn!(error = %e, "could not release an idempotency key");
        }
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (idem, key) = (self.idem.clone(), std::mem::take(&mut self.key));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = idem.forget(&key).await {
                    tracing::warn!(error = %e, "could not release an abandoned idempotency key");
                }
            });
        }
    }
}

/// The validated key of the current request, with the fingerprint of its body (`sha256:` and
/// 64 hex digits): together they name "this request", so a handler can derive stable ids
/// from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    pub key: String,
    pub fingerprint: String,
}

/// The idempotency table for PostgreSQL stores (timestamps in Unix milliseconds, as in SQLite).
#[cfg(feature = "postgres")]
pub const PG_MIGRATION: &str = "CREATE TABLE idempotency_keys (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status INTEGER,
    content_type TEXT,
    body BYTEA,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);";

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error(transparent)]
    Sqlite(#[from] DbError),
    #[error(transparent)]
    SqliteQuery(#[from] rusqlite::Error),
    #[cfg(feature = "postgres")]
    #[error(transparent)]
    Postgres(#[from] sqlx::Error),
    #[cfg(feature = "dynamodb")]
    #[error("DynamoDB: {0}")]
    Dynamo(String),
    /// The store did not answer in time, or refused for load (throttled).
    #[error("idempotency store unavailable: {0}")]
    Unavailable(String),
}

impl IdempotencyError {
    /// True when the store was out of reach or overloaded: a 503 the client may retry with
    /// the same key, rather than a fault of ours.
    pub fn is_unavailable(&self) -> bool {
        match self {
            IdempotencyError::Unavailable(_) => true,
            #[cfg(feature = "postgres")]
            IdempotencyError::Postgres(e) => crate::pg::is_out_of_reach(e),
            _ => false,
        }
    }
}

/// Where the keys live: the owning service's own database, whichever it is.
#[derive(Debug, Clone)]
enum Backend {
    Sqlite(Db),
    #[cfg(feature = "postgres")]
    Postgres(crate::pg::Pg),
    #[cfg(feature = "dynamodb")]
    Dynamo(dynamo::DynamoKeys),
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    backend: Backend,
    ttl: Duration,
    body_limit: usize,
}

enum Claim {
    Mine,
    Replay {
        status: u16,
        content_type: Option<String>,
        body: Vec<u8>,
    },
    InFlight,
    Mismatch,
}

impl Claim {
    fn of(
        fingerprint: &str,
        stored: (String, Option<u16>, Option<String>, Option<Vec<u8>>),
    ) -> Claim {
        let (stored_fingerprint, status, content_type, body) = stored;
        if hashed(&stored_fingerprint).as_ref() != fingerprint {
            return Claim::Mismatch;
        }
        match status {
            None => Claim::InFlight,
            Some(status) => Claim::Replay {
                status,
                content_type,
                body: body.unwrap_or_default(),
            },
        }
    }
}

impl Idempotency {
    pub fn new(db: Db, ttl: Duration, body_limit: usize) -> Idempotency {
        Idempotency {
            backend: Backend::Sqlite(db),
            ttl,
            body_limit,
        }
    }

    /// Keys in the service's PostgreSQL schema (which must include [`PG_MIGRATION`]).
    #[cfg(feature = "postgres")]
    pub fn on_postgres(pg: crate::pg::Pg, ttl: Duration, body_limit: usize) -> Idempotency {
        Idempotency {
            backend: Backend::Postgres(pg),
            ttl,
            body_limit,
        }
    }

    /// Keys as items of the service's DynamoDB `table`, whose partition key attribute is
    /// `partition_key` (`order_id`, `payment_id`): see [`dynamo`](self::dynamo).
    #[cfg(feature = "dynamodb")]
    pub fn on_dynamo(
        client: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
        partition_key: impl Into<String>,
        ttl: Duration,
        body_limit: usize,
    ) -> Idempotency {
        Idempotency {
            backend: Backend::Dynamo(dynamo::DynamoKeys::new(
                client,
                table.into(),
                partition_key.into(),
            )),
            ttl,
            body_limit,
        }
    }

    async fn claim(&self, key: &str, fingerprint: &str) -> Result<Claim, IdempotencyError> {
        let (key, fingerprint) = (key.to_owned(), fingerprint.to_owned());
        let ttl = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let now = now_ms();
        match &self.backend {
            Backend::Sqlite(db) => {
                db.write(move |tx| {
                    tx.execute(
                        "DELETE FROM idempotency_keys WHERE key = ?1
                         AND (expires_at <= ?2 OR (status IS NULL AND created_at <= ?3))",
                        params![key, now, now - ABANDONED_AFTER_MS],
                    )?;
                    let mine = tx.execute(
                        "INSERT INTO idempotency_keys (key, fingerprint, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (key) DO NOTHING",
                        params![key, fingerprint, now, now.saturating_add(ttl)],
                    )? == 1;
                    if mine {
                        return Ok(Claim::Mine);
                    }
                    let stored = tx.query_row(
                        "SELECT fingerprint, status, content_type, body FROM idempotency_keys WHERE key = ?1",
                        [&key],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                    )?;
                    Ok(Claim::of(&fingerprint, stored))
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(pg) => {
                // A key seen for the first time (nearly every key) is claimed by one statement
                // committed on its own; only a key already there needs the transaction below.
                if insert_claim_pg(pg.pool(), &key, &fingerprint, now, ttl).await? {
                    return Ok(Claim::Mine);
                }
                let mut tx = pg.pool().begin().await?;
                sqlx::query(
                    "DELETE FROM idempotency_keys WHERE key = $1
                     AND (expires_at <= $2 OR (status IS NULL AND created_at <= $3))",
                )
                .bind(&key)
                .bind(now)
                .bind(now - ABANDONED_AFTER_MS)
                .execute(&mut *tx)
                .await?;
                // A concurrent insert of the same key waits here for the first to commit.
                let claim = if insert_claim_pg(&mut *tx, &key, &fingerprint, now, ttl).await? {
                    Claim::Mine
                } else {
                    let (stored, status, content_type, body): (
                        String,
                        Option<i32>,
                        Option<String>,
                        Option<Vec<u8>>,
                    ) = sqlx::query_as(
                        "SELECT fingerprint, status, content_type, body FROM idempotency_keys WHERE key = $1",
                    )
                    .bind(&key)
                    .fetch_one(&mut *tx)
                    .await?;
                    let status = status.and_then(|s| u16::try_from(s).ok());
                    Claim::of(&fingerprint, (stored, status, content_type, body))
                };
                tx.commit().await?;
                Ok(claim)
            }
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(keys) => keys.claim(&key, &fingerprint, now, ttl).await,
        }
    }

    async fn complete(
        &self,
        key: &str,
        status: u16,
        content_type: Option<String>,
        body: Bytes,
    ) -> Result<(), IdempotencyError> {
        let key = key.to_owned();
        match &self.backend {
            Backend::Sqlite(db) => {
                db.write(move |tx| {
                    tx.execute(
                        "UPDATE idempotency_keys SET status = ?1, content_type = ?2, body = ?3 WHERE key = ?4",
                        params![status, content_type, body.as_ref(), key],
                    )?;
                    Ok(())
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(pg) => {
                sqlx::query(
                    "UPDATE idempotency_keys SET status = $1, content_type = $2, body = $3 WHERE key = $4",
                )
                .bind(i32::from(status))
                .bind(content_type)
                .bind(body.as_ref())
                .bind(key)
                .execute(pg.pool())
                .await?;
                Ok(())
            }
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(keys) => keys.complete(&key, status, content_type, body).await,
        }
    }

    async fn forget(&self, key: &str) -> Result<(), IdempotencyError> {
        let key = key.to_owned();
        match &self.backend {
            Backend::Sqlite(db) => {
                db.write(move |tx| {
                    tx.execute(
                        "DELETE FROM idempotency_keys WHERE key = ?1 AND status IS NULL",
                        [key],
                    )?;
                    Ok(())
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(pg) => {
                sqlx::query("DELETE FROM idempotency_keys WHERE key = $1 AND status IS NULL")
                    .bind(key)
                    .execute(pg.pool())
                    .await?;
                Ok(())
            }
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(keys) => keys.forget(&key).await,
        }
    }

    /// Hashes records from before fingerprints were hashed (once), then purges expired keys
    /// every `every` until `shutdown`.
    pub async fn run_purger(self, every: Duration, shutdown: tokio_util::sync::CancellationToken) {
        match self.hash_legacy_fingerprints().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rewritten = n, "idempotency records now keep only a hash"),
            Err(e) => tracing::warn!(error = %e, "hashing old idempotency records failed"),
        }
        loop {
            match self.purge_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(purged = n, "expired idempotency keys removed"),
                Err(e) => tracing::warn!(error = %e, "purging idempotency keys failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Replaces the request text that records written before fingerprints were hashed keep
    /// (card numbers included) by its hash, so such a record still replays for its retry;
    /// returns how many. On SQLite the rewrite runs with `secure_delete`, so the old text is
    /// zeroed in the database pages rather than left in free space. On DynamoDB this rewrites
    /// none: a scan of the service's whole table on every start would cost more than waiting,
    /// and the table's TTL removes those records within a day of their expiry.
    pub async fn hash_legacy_fingerprints(&self) -> Result<usize, IdempotencyError> {
        match &self.backend {
            Backend::Sqlite(db) => {
                // Looked for on a reader, so the writer (every claim) waits only when there is
                // something to rewrite: after the first start, never.
                let legacy = db
                    .read(|conn| -> Result<Vec<(String, String)>, IdempotencyError> {
                        Ok(conn
                            .prepare(
                                "SELECT key, fingerprint FROM idempotency_keys
                                 WHERE fingerprint NOT LIKE 'sha256:%'",
                            )?
                            .query_map([], |r| {
                                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                            })?
                            .collect::<Result<Vec<_>, _>>()?)
                    })
                    .await?;
                if legacy.is_empty() {
                    return Ok(0);
                }
                db.write(move |tx| {
                    tx.pragma_update(None, "secure_delete", "ON")?;
                    let rewritten = rewrite_legacy(tx, &legacy);
                    // Back off whatever happened: the connection returns to the pool.
                    tx.pragma_update(None, "secure_delete", "OFF")?;
                    rewritten
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(pg) => {
                // One statement, hashed where the rows are; only rows still unhashed, so a
                // replica doing the same meanwhile changes nothing twice.
                let done = sqlx::query(
                    "UPDATE idempotency_keys
                     SET fingerprint = 'sha256:' || encode(sha256(convert_to(fingerprint, 'UTF8')), 'hex')
                     WHERE fingerprint NOT LIKE 'sha256:%'",
                )
                .execute(pg.pool())
                .await?;
                Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
            }
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(_) => Ok(0),
        }
    }

    /// Removes expired keys; returns how many. On DynamoDB the table's TTL removes them (and a
    /// claim treats an expired record as absent meanwhile), so this removes none.
    pub async fn purge_expired(&self) -> Result<usize, IdempotencyError> {
        let now = now_ms();
        match &self.backend {
            Backend::Sqlite(db) => {
                db.write(move |tx| {
                    Ok(tx.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?1", [now])?)
                })
                .await
            }
            #[cfg(feature = "postgres")]
            Backend::Postgres(pg) => {
                let done = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at <= $1")
                    .bind(now)
                    .execute(pg.pool())
                    .await?;
                Ok(usize::try_from(done.rows_affected()).unwrap_or(usize::MAX))
            }
            #[cfg(feature = "dynamodb")]
            Backend::Dynamo(_) => Ok(0),
        }
    }
}

/// Rewrites each `(key, request text)` to the text's fingerprint, if still unhashed.
fn rewrite_legacy(
    tx: &rusqlite::Transaction<'_>,
    legacy: &[(String, String)],
) -> Result<usize, IdempotencyError> {
    let mut rewrite = tx.prepare(
        "UPDATE idempotency_keys SET fingerprint = ?3 WHERE key = ?1 AND fingerprint = ?2",
    )?;
    let mut rewritten = 0;
    for (key, text) in legacy {
        rewritten += rewrite.execute(params![key, text, sha256_fingerprint(text)])?;
    }
    Ok(rewritten)
}

fn key_problem() -> Problem {
    Problem::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
        .with("header", HEADER)
}

/// What identifies "the same request": the SHA-256 of the method, the path and the body as
/// canonical JSON (key order and whitespace do not matter), or of the raw bytes when the body
/// is not JSON; as `sha256:` and 64 lowercase hex digits.
fn fingerprint(method: &str, path: &str, body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string(&v).ok());
    // Hashed in parts, so the body is not copied once more to be hashed. A body that is not
    // JSON is hashed as the (lossy) text records before hashing kept.
    let text;
    let body = match &canonical {
        Some(json) => json.as_bytes(),
        None => {
            text = String::from_utf8_lossy(body);
            text.as_bytes()
        }
    };
    crate::digest::sha256_hex_of(
        HASHED,
        &[method.as_bytes(), b" ", path.as_bytes(), b"\n", body],
    )
}

const HASHED: &str = "sha256:";

/// The fingerprint of a record's request text as records before hashing kept it
/// (`{method} {path}\n{canonical body}`).
fn sha256_fingerprint(request: &str) -> String {
    crate::digest::sha256_hex_of(HASHED, &[request.as_bytes()])
}

/// A stored fingerprint as it is compared: records from before hashing hold the request
/// text that is now hashed, so hashing it gives what the same request fingerprints to today.
fn hashed(stored: &str) -> std::borrow::Cow<'_, str> {
    if is_hashed(stored) {
        std::borrow::Cow::Borrowed(stored)
    } else {
        std::borrow::Cow::Owned(sha256_fingerprint(stored))
    }
}

fn is_hashed(stored: &str) -> bool {
    stored.strip_prefix(HASHED).is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The middleware: `post(handler).layer(middleware::from_fn_with_state(idempotency, guard))`.
pub async fn guard(State(idem): State<Idempotency>, req: Request, next: Next) -> Response {
    let Some(raw) = req.headers().get(HEADER) else {
        return next.run(req).await;
    };
    let key = match raw.to_str() {
        Ok(k) if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()) => {
            k.to_owned()
        }
        _ => return key_problem().into_response(),
    };
    // Keys are per caller: another user sending the same key must never get this answer.
    // A request without valid credentials skips the guard; its handler refuses it.
    let scope = match req.extensions().get::<std::sync::Arc<crate::auth::Auth>>() {
        Some(auth) => match auth.caller(req.headers()).await {
            Ok(Some(caller)) => caller
                .user_id()
                .map_or_else(|| "anonymous".to_owned(), |id| id.to_string()),
            Ok(None) | Err(_) => return next.run(req).await,
        },
        None => "anonymous".to_owned(),
    };
    let key = format!("{scope}/{key}");
    let (mut parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, idem.body_limit).await {
        Ok(b) => b,
        Err(_) => return crate::extract::too_large().into_response(),
    };
    if !bytes.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_err() {
        // Not JSON: the handler refuses it, and the refusal is not worth a key.
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }
    let fingerprint = fingerprint(parts.method.as_str(), parts.uri.path(), &bytes);
    let deadline = tokio::time::Instant::now() + WAIT_FOR_FIRST;
    let mut pause = Duration::from_millis(10);
    loop {
        let claim = match idem.claim(&key, &fingerprint).await {
            Ok(c) => c,
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "idempotency store unavailable");
                return Problem::unavailable("the idempotency store").into_response();
            }
            Err(e) => {
                tracing::error!(error = %e, "idempotency store failed");
                return Problem::internal().into_response();
            }
        };
        match claim {
            Claim::Mine => break,
            Claim::Replay {
                status,
                content_type,
                body,
            } => return replay(status, content_type, body),
            Claim::Mismatch => {
                return Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency-key-reused",
                    "Idempotency-Key reused with a different request",
                )
                .with_detail("this Idempotency-Key was used for a different request; use a new key")
                .into_response();
            }
            Claim::InFlight if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(250));
            }
            Claim::InFlight => {
                return Problem::conflict(
                    "idempotency-key-in-flight",
                    "a request with this Idempotency-Key is still being processed; retry later",
                )
                .into_response();
            }
        }
    }

    let mut claimed = Claimed {
        idem: idem.clone(),
        key: key.clone(),
        settled: false,
    };
    parts.extensions.insert(IdempotencyKey {
        key: key.clone(),
        fingerprint,
    });
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    if !worth_storing(response.status()) {
        claimed.forget().await;
        return response;
    }
    let (parts, body) = response.into_parts();
    // The handler's own answer: bounded by what the handler writes, not by the client.
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        claimed.forget().await;
        return Problem::internal().into_response();
    };
    if body.len() > MAX_STORED_ANSWER {
        tracing::warn!(
            key,
            bytes = body.len(),
            "an answer too large to keep for a replay"
        );
        claimed.forget().await;
        return Response::from_parts(parts, Body::from(body));
    }
    claimed.settled = true;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Err(e) = idem
        .complete(&key, parts.status.as_u16(), content_type, body.clone())
        .await
    {
        tracing::warn!(error = %e, "could not store an idempotent answer");
    }
    Response::from_parts(parts, Body::from(body))
}

fn replay(status: u16, content_type: Option<String>, body: Vec<u8>) -> Response {
    let mut response =
        (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response();
    if let Some(ct) = content_type.and_then(|ct| HeaderValue::from_str(&ct).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

/// Inserts the claim of `key` unless the key is there: true when this call inserted it.
#[cfg(feature = "postgres")]
async fn insert_claim_pg<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    key: &str,
    fingerprint: &str,
    now: i64,
    ttl: i64,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO idempotency_keys (key, fingerprint, created_at, expires_at)
         VALUES ($1, $2, $3, $4) ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(fingerprint)
    .bind(now)
    .bind(now.saturating_add(ttl))
    .execute(executor)
    .await?
    .rows_affected()
        == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256_hex;

    #[test]
    fn fingerprints_ignore_json_formatting_but_not_content() {
        let a = fingerprint("POST", "/x", br#"{"a": 1, "b": [1,2]}"#);
        let b = fingerprint("POST", "/x", br#"{"b":[1,2],"a":1}"#);
        let c = fingerprint("POST", "/x", br#"{"b":[1,2],"a":2}"#);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, fingerprint("POST", "/y", br#"{"a": 1, "b": [1,2]}"#));
    }

    #[test]
    fn a_fingerprint_is_a_hash_that_holds_nothing_of_the_request() {
        let body = br#"{"order_id": "o-1", "card_number": "4242 4242 4242 4242"}"#;
        let f = fingerprint("POST", "/api/v1/payments", body);
        assert!(is_hashed(&f), "{f}");
        assert!(!f.contains("4242"), "{f}");
        assert_eq!(
            f,
            "sha256:".to_owned()
                + &sha256_hex(
                    br#"POST /api/v1/payments
{"card_number":"4242 4242 4242 4242","order_id":"o-1"}"#
                ),
            "the hash of the canonical request"
        );
    }

    #[test]
    fn a_record_from_before_hashing_still_matches_its_request() {
        let body = br#"{"b": 2, "a": 1}"#;
        let legacy = "POST /x\n{\"a\":1,\"b\":2}".to_owned();
        let stored = |fp: String| (fp, Some(201), None, Some(b"ok".to_vec()));
        assert!(matches!(
            Claim::of(&fingerprint("POST", "/x", body), stored(legacy.clone())),
            Claim::Replay { status: 201, .. }
        ));
        assert!(matches!(
            Claim::of(&fingerprint("POST", "/x", br#"{"a":2}"#), stored(legacy)),
            Claim::Mismatch
        ));
        assert!(
            !is_hashed("sha256:xyz"),
            "only a full digest counts as hashed"
        );
    }
}
