//! The storefront: catalog, cart, checkout and payment, a customer's orders and notifications,
//! and signing in and out.

pub mod account;
pub mod cart;
pub mod catalog;
pub mod checkout;
pub mod orders;

use std::collections::HashMap;

use uuid::Uuid;

use crate::Web;
use crate::api::Visit;
use crate::model::Product;

/// The products named by some lines, read once each (a page shows names, not ids). A product
/// since deleted is simply absent.
pub(crate) async fn products_by_id(
    web: &Web,
    visit: &Visit,
    ids: Vec<Uuid>,
) -> HashMap<Uuid, Product> {
    let mut found = HashMap::new();
    for id in ids {
        if found.contains_key(&id) {
            continue;
        }
        if let Ok(product) = web
            .api()
            .get::<Product>(visit, &format!("/api/v1/products/{id}"))
            .await
        {
            found.insert(id, product);
        }
    }
    found
}

/// A short form of an id for people: its first eight characters.
pub(crate) fn short_id(id: Uuid) -> String {
    id.simple().to_string().chars().take(8).collect()
}
