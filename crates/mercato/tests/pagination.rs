//! Every list route pages with an opaque cursor (`Link: <…>; rel="next"`), through the real
//! gateway: following it visits each row once, in order, and ends; the seed's `skip` still works
//! but is bounded; a cursor this platform never gave out is a 400, never a 500. An unfiltered
//! notification list is an operator's, and pages too.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestApp, spawn_app};
use reqwest::StatusCode;
use serde_json::Value;

/// Follows `next` links from `first` to the end: every page's rows (the `items` of each body,
/// as `rows` picks them), and how many pages there were.
async fn walk(
    app: &TestApp,
    token: Option<&str>,
    first: &str,
    rows: fn(&Value) -> Vec<Value>,
) -> (Vec<Value>, usize) {
    let caller = app.as_caller(token);
    let (mut seen, mut pages) = (Vec::new(), 0);
    let mut path = first.to_owned();
    loop {
        let page = caller.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
        pages += 1;
        seen.extend(rows(&page.body));
        match page.next {
            Some(next) => {
                assert!(next.contains("cursor="), "{next}");
                path = next;
            }
            None => return (seen, pages),
        }
        assert!(pages < 100, "the cursor never ends");
    }
}

fn array(body: &Value) -> Vec<Value> {
    body.as_array().unwrap().clone()
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn following_the_cursor_visits_every_row_once_on_every_list() {
    let app = spawn_app().await;
    let token = app.token.clone();
    for i in 0..7 {
        app.create_product(&format!("PAGE-{i}"), "10.00", 100).await;
    }
    // Products, filtered by category: the filter is kept in the next link.
    let everything = app.get("/api/v1/products?limit=100").await;
    assert_eq!(everything.next, None, "one page holds them all");
    let (paged, pages) = walk(
        &app,
        token.as_deref(),
        "/api/v1/products?category=test&limit=3",
        array,
    )
    .await;
    assert_eq!(ids(&paged), ids(&array(&everything.body)));
    assert_eq!(pages, 3, "3 + 3 + 1");
    // Exactly a page's worth: the last full page says it is the last.
    let (_, pages) = walk(&app, token.as_deref(), "/api/v1/products?limit=7", array).await;
    assert_eq!(pages, 1);
    // A search pages the same way, its text kept in the next link; a search too long, or with
    // a control character (which PostgreSQL would refuse), is the client's error.
    let (found, pages) = walk(
        &app,
        token.as_deref(),
        "/api/v1/products?q=page-&limit=2",
        array,
    )
    .await;
    assert_eq!(ids(&found), ids(&array(&everything.body)));
    assert_eq!(pages, 4, "2 + 2 + 2 + 1");
    let (none, _) = walk(
        &app,
        token.as_deref(),
        "/api/v1/products?q=nothing%20like%20it",
        array,
    )
    .await;
    assert!(none.is_empty());
    let long = format!("/api/v1/products?q={}", "x".repeat(101));
    let long_category = format!("/api/v1/products?category={}", "x".repeat(101));
    for bad in [
        long.as_str(),
        long_category.as_str(),
        "/api/v1/products?q=a%00b",
        "/api/v1/products?category=%07",
    ] {
        let answer = app.get(bad).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            answer.body
        );
        assert_eq!(answer.content_type, "application/problem+json", "{bad}");
    }

    // A customer's orders: the body names the next cursor too.
    let (customer, customer_token) = app.register("pager@example.com").await;
    let product = app.create_product("PAGE-ORDERS", "5.00", 100).await;
    let mut placed = Vec::new();
    for _ in 0..5 {
        let order = app
            .as_caller(Some(&customer_token))
            .post(
                "/api/v1/orders",
                serde_json::json!({"items": [{"product_id": product, "quantity": 1}],
                                   "shipping_address": "1 Main St, Pune"}),
            )
            .await;
        assert_eq!(order.status, StatusCode::CREATED, "{}", order.body);
        placed.push(order.body["id"].as_str().unwrap().to_owned());
    }
    let first = app
        .as_caller(Some(&customer_token))
        .get(&format!("/api/v1/orders/user/{customer}?limit=2"))
        .await;
    assert_eq!(first.body["count"], 2);
    let body_next = first.body["next"].as_str().unwrap();
    assert!(
        first
            .next
            .as_deref()
            .unwrap()
            .ends_with(&format!("cursor={body_next}"))
    );
    let (orders, pages) = walk(
        &app,
        Some(&customer_token),
        &format!("/api/v1/orders/user/{customer}?limit=2"),
        |body| body["orders"].as_array().unwrap().clone(),
    )
    .await;
    assert_eq!(ids(&orders), placed, "oldest first, each once");
    assert_eq!(pages, 3);
    let last = app
        .as_caller(Some(&customer_token))
        .get(&format!("/api/v1/orders/user/{customer}?limit=5"))
        .await;
    assert_eq!(last.body["next"], Value::Null);
    assert_eq!(last.next, None);

    // Users (an operator's list).
    let all_users = app.get("/api/v1/users?limit=1000").await;
    let (users, _) = walk(&app, token.as_deref(), "/api/v1/users?limit=1", array).await;
    assert_eq!(ids(&users), ids(&array(&all_users.body)));
    assert!(users.len() >= 2, "the administrator and the customer");

    // Notifications: a customer lists their own only, however they ask; an operator may list
    // everyone's, one page at a time.
    let notified = common::eventually(10, || async {
        let mine = app
            .as_caller(Some(&customer_token))
            .get("/api/v1/notifications?limit=1000")
            .await;
        (mine.body.as_array().unwrap().len() == 5).then_some(mine)
    })
    .await
    .expect("five order.created notifications");
    assert!(
        array(&notified.body)
            .iter()
            .all(|n| n["user_id"] == customer.as_str())
    );
    let (theirs, pages) = walk(
        &app,
        Some(&customer_token),
        "/api/v1/notifications?limit=2",
        array,
    )
    .await;
    assert_eq!(ids(&theirs), ids(&array(&notified.body)));
    assert_eq!(pages, 3);
    let (everyone, _) = walk(
        &app,
        token.as_deref(),
        "/api/v1/notifications?limit=2",
        array,
    )
    .await;
    let mut distinct = ids(&everyone);
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), everyone.len(), "each record once");
    assert!(everyone.len() >= 5);
    app.stop().await;
}

#[tokio::test]
async fn cursors_never_given_out_and_unbounded_offsets_are_refused() {
    let app = spawn_app().await;
    let user = app.create_user("offsets@example.com").await;
    let long = "A".repeat(600);
    let foreign = "bm90IGEgcm93"; // base64 of "not a row"
    for path in [
        "/api/v1/products".to_owned(),
        "/api/v1/users".to_owned(),
        format!("/api/v1/orders/user/{user}"),
        "/api/v1/notifications".to_owned(),
        format!("/api/v1/notifications?user_id={user}"),
    ] {
        let join = if path.contains('?') { '&' } else { '?' };
        for query in [
            "cursor=!!!".to_owned(),
            format!("cursor={long}"),
            format!("cursor={foreign}"),
            "cursor=".to_owned(),
            "skip=10001".to_owned(),
            "skip=1&cursor=MHww".to_owned(),
            "limit=0".to_owned(),
            "limit=1001".to_owned(),
        ] {
            let a = app.get(&format!("{path}{join}{query}")).await;
            assert_eq!(
                a.status,
                StatusCode::BAD_REQUEST,
                "{path} {query}: {}",
                a.body
            );
            assert_eq!(a.content_type, "application/problem+json", "{path} {query}");
        }
        // The seed's offset, within bounds, still answers.
        let a = app.get(&format!("{path}{join}skip=10000&limit=5")).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.body);
    }
    app.stop().await;
}
