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

/// The products named by some lines, each read once and all at the same time (a page shows
/// names, not ids; a cart has at most 20 lines). A product since deleted is simply absent.
pub(crate) async fn products_by_id(
    web: &Web,
    visit: &Visit,
    mut ids: Vec<Uuid>,
) -> HashMap<Uuid, Product> {
    ids.sort_unstable();
    ids.dedup();
    let reads = ids.into_iter().map(|id| async move {
        web.api()
            .get::<Product>(visit, &format!("/api/v1/products/{id}"))
            .await
            .ok()
            .map(|product| (id, product))
    });
    futures_util::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// A short form of an id for people: its first eight characters.
pub(crate) fn short_id(id: Uuid) -> String {
    id.simple().to_string().chars().take(8).collect()
}
