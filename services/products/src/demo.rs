//! The demo catalog `mercato up` seeds into an empty store, so the tour has something to order.

use kit::Money;

use crate::store::{NewProduct, ProductStore, StoreError};

const DEMO: &[(&str, &str, i64, i64, &str, &str)] = &[
    (
        "Laptop Pro 14",
        "14-inch laptop, 16 GB RAM, 512 GB SSD",
        199_999,
        25,
        "LAP-PRO-14",
        "electronics",
    ),
    (
        "Wireless Mouse",
        "Ergonomic 2.4 GHz mouse",
        2_499,
        200,
        "MOU-WL-01",
        "electronics",
    ),
    (
        "Mechanical Keyboard",
        "Tenkeyless, brown switches",
        8_950,
        80,
        "KEY-MX-TKL",
        "electronics",
    ),
    (
        "Coffee Beans 1 kg",
        "Single-origin arabica, medium roast",
        1_850,
        500,
        "COF-BN-1K",
        "grocery",
    ),
    (
        "Running Shoes",
        "Lightweight trainers, size 42",
        7_900,
        60,
        "SHO-RUN-42",
        "apparel",
    ),
    (
        "Desk Lamp",
        "LED, dimmable, USB-C",
        3_475,
        120,
        "LMP-DSK-01",
        "home",
    ),
];

/// Inserts the demo catalog when the store is empty; returns how many products were added.
pub async fn seed_if_empty(store: &dyn ProductStore) -> Result<usize, StoreError> {
    if store.count().await? > 0 {
        return Ok(0);
    }
    let mut added = 0;
    for (name, description, cents, stock, sku, category) in DEMO {
        let created = store
            .create(NewProduct {
                name: (*name).into(),
                description: (*description).into(),
                price: Money::from_cents(*cents).unwrap_or(Money::ZERO),
                on_hand: *stock,
                sku: (*sku).into(),
                category: (*category).into(),
            })
            .await;
        match created {
            Ok(_) => added += 1,
            // Another replica sharing the database seeded it at the same moment.
            Err(StoreError::DuplicateSku) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(added)
}
