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
    use reqwest::StatusCode;
    use serde_json::{Value, json};
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

    async fn post_with_key(
        app: &common::TestApp,
        path: &str,
        key: &str,
        body: &Value,
    ) -> (StatusCode, String, bool) {
        let response = app
            .client
            .post(format!("{}{path}", app.gateway))
            .header("idempotency-key", key)
            .json(body)
            .send()
            .await
            .unwrap();
        let replayed = response.headers().contains_key("idempotent-replayed");
        (response.status(), response.text().await.unwrap(), replayed)
    }

    #[tokio::test]
    async fn the_saga_holds_with_orders_and_payments_on_postgres() {
        let db = FreshDatabase::create().await;
        let dir = tempfile::tempdir().unwrap();
        let mut settings = test_settings(&dir);
        // Only these two: the other stores stay on SQLite in this branch.
        settings.orders.database_url = Some(db.url.clone());
        settings.payments.database_url = Some(db.url.clone());
        let app = spawn_with(settings, &ServiceName::ALL, dir).await;

        // One key, 20 concurrent requests: one order, one reservation, 19 replays.
        let user = app.create_user("pg-saga@example.com").await;
        let product = app.create_product("PG-IDEM", "9.99", 10).await;
        let body = json!({"user_id": user, "items": [{"product_id": product, "quantity": 3}], "shipping_address": "1 Key St"});
        let answers = futures_util::future::join_all(
            (0..20).map(|_| post_with_key(&app, "/api/v1/orders", "pg-order-key", &body)),
        )
        .await;
        let first = &answers[0];
        assert_eq!(first.0, StatusCode::CREATED, "{}", first.1);
        assert!(answers.iter().all(|a| (a.0, &a.1) == (first.0, &first.1)));
        assert_eq!(answers.iter().filter(|a| !a.2).count(), 1, "19 replays");
        assert_eq!(app.stock(&product).await, 7);
        let order: Value = serde_json::from_str(&first.1).unwrap();
        let order = order["id"].as_str().unwrap().to_owned();

        // 60 concurrent orders for 20 in stock: exactly 20 made.
        let hot = app.create_product("PG-HOT", "1.00", 20).await;
        let one = [(hot.as_str(), 1)];
        let crowd = futures_util::future::join_all((0..60).map(|_| app.order(&user, &one))).await;
        let created = crowd
            .iter()
            .filter(|a| a.status == StatusCode::CREATED)
            .count();
        let refused = crowd
            .iter()
            .filter(|a| a.status == StatusCode::CONFLICT)
            .count();
        assert_eq!((created, refused), (20, 40));
        assert_eq!(app.stock(&hot).await, 0);
        let listed = app
            .get(&format!("/api/v1/orders/user/{user}?limit=100"))
            .await;
        assert_eq!(listed.body.as_array().unwrap().len(), 21, "{}", listed.body);

        // A payment retried with one key charges once and moves the order.
        let pay = json!({"order_id": order});
        let answers = futures_util::future::join_all(
            (0..5).map(|_| post_with_key(&app, "/api/v1/payments", "pg-pay-key", &pay)),
        )
        .await;
        assert!(
            answers
                .iter()
                .all(|a| a.0 == StatusCode::CREATED && a.1 == answers[0].1),
            "{answers:?}"
        );
        let payments = app
            .get(&format!("/api/v1/payments/order/{order}"))
            .await
            .body;
        assert_eq!(payments.as_array().unwrap().len(), 1);
        assert_eq!(
            app.get(&format!("/api/v1/orders/{order}")).await.body["status"],
            "paid"
        );
        // Through the PostgreSQL outbox and its relay.
        assert!(app.notified(&order, "order.created").await);
        assert!(app.notified(&order, "order.paid").await);
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
