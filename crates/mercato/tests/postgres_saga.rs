//! The order saga with orders and payments on PostgreSQL (feature `postgres`): one
//! Idempotency-Key sent concurrently makes one order, concurrent orders never oversell, a
//! payment retried with a key charges once, and the events still reach the notifier through
//! the PostgreSQL outbox. Each run gets a database of its own (schemas are named after the
//! services, so two runs cannot share one), dropped at the end.
//!
//! Without the feature, a PostgreSQL URL must stop start-up with an error naming the feature.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::test_settings;
use mercato::ServiceName;

#[cfg(feature = "postgres")]
mod on_postgres {
    use super::*;
    use common::spawn_with;
    use sqlx::Executor as _;

    /// A fresh database on the test server; dropped by [`FreshDatabase::drop`].
    struct FreshDatabase {
        admin: sqlx::PgPool,
        name: String,
        url: String,
    }

    impl FreshDatabase {
        async fn create() -> FreshDatabase {
            let base = kit::pg::test_database_url();
            let admin = sqlx::PgPool::connect(&base).await.unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {base}: {e}. This test needs a server: start one \
                     (scripts/test does) or point TEST_DATABASE_URL at one"
                )
            });
            let name = format!(
                "mercato_t{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            );
            admin
                .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .await
                .unwrap();
            // Same server and credentials, other database (keeping any ?query).
            let (address, query) = base.split_once('?').unwrap_or((&base, ""));
            let slash = address.rfind('/').unwrap();
            let mut url = format!("{}/{name}", &address[..slash]);
            if !query.is_empty() {
                url = format!("{url}?{query}");
            }
            FreshDatabase { admin, name, url }
        }

        async fn count(&self, table: &'static str) -> i64 {
            let pool = sqlx::PgPool::connect(&self.url).await.unwrap();
            let sql = format!("SELECT COUNT(*) FROM {table}");
            let n = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            n
        }

        async fn drop(self) {
            self.admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                )))
                .await
                .unwrap();
            self.admin.close().await;
        }
    }

    #[tokio::test]
    async fn the_saga_holds_with_orders_and_payments_on_postgres() {
        let db = FreshDatabase::create().await;
        let dir = tempfile::tempdir().unwrap();
        let mut settings = test_settings(&dir);
        // Only these two: the other stores stay on SQLite here.
        settings.orders.database_url = Some(db.url.clone());
        settings.payments.database_url = Some(db.url.clone());
        let app = spawn_with(settings, &ServiceName::ALL, dir).await;
        common::saga_keeps_its_promises(&app, "pg").await;
        app.stop().await;

        // And it all really is in PostgreSQL.
        assert_eq!(db.count("orders.orders").await, 21);
        assert_eq!(db.count("payments.payments").await, 1);
        assert_eq!(db.count("orders.idempotency_keys").await, 1);
        db.drop().await;
    }
}

#[cfg(not(feature = "postgres"))]
#[tokio::test]
async fn a_postgres_url_without_the_feature_names_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.orders.database_url = Some("postgres://postgres@127.0.0.1:5432/test".into());
    let error = mercato::startup::start(&settings, &[ServiceName::Orders])
        .await
        .err()
        .expect("start-up refuses");
    let message = format!("{error:#}");
    assert!(message.contains("--features postgres"), "{message}");
}
