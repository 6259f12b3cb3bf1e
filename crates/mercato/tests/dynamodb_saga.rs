//! The order saga with orders, payments and notifications on DynamoDB (feature `dynamodb`), as
//! the seed keeps them, on the server at `TEST_DYNAMODB_ENDPOINT` (scripts/check-aws starts
//! moto; the test fails, never skips, without it): the same promises as on SQLite and
//! PostgreSQL ([`common::saga_keeps_its_promises`]), with each store's outbox and its
//! Idempotency-Key records in DynamoDB too. Users and products stay in SQL.
//!
//! Whatever the features, a DynamoDB URL for users or products is refused at start-up with an
//! error that says which services can use one; without the feature, one for orders names the
//! feature.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::test_settings;
use mercato::ServiceName;

const NOWHERE: &str = "region=us-east-1&endpoint=http://127.0.0.1:9";

#[tokio::test]
async fn users_and_products_cannot_live_in_dynamodb() {
    for service in [ServiceName::Users, ServiceName::Products] {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = test_settings(&dir);
        settings.default_database_url = Some(format!("dynamodb://everything?{NOWHERE}"));
        let error = mercato::startup::start(&settings, &[service])
            .await
            .err()
            .expect("start-up refuses");
        let message = format!("{error:#}");
        assert!(
            message.contains("only orders, payments and notifications"),
            "{message}"
        );
        assert!(message.contains(service.as_str()), "{message}");
    }
}

#[cfg(not(feature = "dynamodb"))]
#[tokio::test]
async fn a_dynamodb_url_without_the_feature_names_the_feature() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.orders.database_url = Some(format!("dynamodb://orders?{NOWHERE}"));
    let error = mercato::startup::start(&settings, &[ServiceName::Orders])
        .await
        .err()
        .expect("start-up refuses");
    let message = format!("{error:#}");
    assert!(message.contains("--features dynamodb"), "{message}");
}

#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn the_saga_holds_with_orders_payments_and_notifications_on_dynamodb() {
    use common::spawn_with;
    use orders::OrderStore as _;
    use payments::PaymentStore as _;

    let dir = tempfile::tempdir().unwrap();
    let (settings, url) = common::on_dynamodb(&dir);
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let (order, user) = common::saga_keeps_its_promises(&app, "dynamo").await;

    // Nothing of theirs fell back to a local file.
    for file in ["orders.db", "payments.db", "notifications.db"] {
        assert!(!app.dir.path().join(file).exists(), "{file} was created");
    }
    app.stop().await;

    // And it all really is in DynamoDB.
    let orders = orders::dynamo::DynamoOrderStore::from_url(&url("orders"))
        .await
        .unwrap();
    assert_eq!(orders.count().await.unwrap(), 21);
    let paid = orders.get(order.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(paid.user_id.to_string(), user);
    let payments = payments::dynamo::DynamoPaymentStore::from_url(&url("payments"))
        .await
        .unwrap();
    let recorded = payments.by_order(order.parse().unwrap()).await.unwrap();
    assert_eq!(
        recorded
            .iter()
            .map(|p| p.status.as_str())
            .collect::<Vec<_>>(),
        ["succeeded"]
    );
}

/// DynamoDB unreachable: orders says so on `/ready` (so a load balancer drains it), and an
/// order fails with a problem+json that names nothing internal, its stock reservation given
/// back.
#[cfg(feature = "dynamodb")]
#[tokio::test]
async fn with_dynamodb_unreachable_orders_is_not_ready_and_gives_the_stock_back() {
    use common::{eventually, spawn_with};

    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(&dir);
    settings.orders.database_url = Some(format!("dynamodb://orders?{NOWHERE}"));
    let app = spawn_with(settings, &ServiceName::ALL, dir).await;
    let ops = app.platform.as_ref().unwrap().ops_url();
    let ready = app.client.get(format!("{ops}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let problem: serde_json::Value = ready.json().await.unwrap();
    assert!(
        problem["services"]["orders"]
            .as_str()
            .unwrap()
            .starts_with("not ready"),
        "{problem}"
    );

    let user = app.create_user("outage@example.com").await;
    let product = app.create_product("OUTAGE-1", "5.00", 4).await;
    let answer = app.order(&user, &[(product.as_str(), 3)]).await;
    assert!(answer.status.is_server_error(), "{}", answer.status);
    assert_eq!(answer.content_type, "application/problem+json");
    let body = answer.body.to_string();
    for internal in ["127.0.0.1", "dynamo", "Dynamo", "dispatch"] {
        assert!(!body.contains(internal), "{body}");
    }
    let restored = eventually(10, || async {
        (app.stock(&product).await == 4).then_some(())
    })
    .await;
    assert!(restored.is_some(), "the reservation was not released");
    app.stop().await;
}
