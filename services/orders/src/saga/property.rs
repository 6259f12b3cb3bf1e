//! Money is never kept for nothing, whatever the order of events: a property test over random
//! interleavings of paying, declining, cancelling, expiring, refunding (partly or fully) and
//! delivering payment events late, twice or out of order, for a few orders. The orders side is
//! the real one (the saga's handler, `apply_status`, the SQLite store); the payments side is a
//! small model that charges, refunds, writes versioned events and compensates when asked. The
//! products side is a fake with products' reservation rules (held, then committed or released,
//! never both): stock sold matches the paid orders, stock given back the cancelled ones.

use std::collections::BTreeMap;

use bus::Event;
use bus::event::types;
use proptest::prelude::*;
use uuid::Uuid;

use super::tests::{Harness, Stock, payment_event};
use crate::api::apply_status;
use crate::domain::OrderStatus;

#[derive(Debug, Clone)]
enum Op {
    /// A charge for order `order`; `sync` when payments also moves the order itself (its fast
    /// path), and refunds at once if that move is refused.
    Pay { order: usize, sync: bool },
    /// A declined card.
    Decline { order: usize, sync: bool },
    /// An operator's cancel, or the expiry sweep (the same move).
    Cancel { order: usize },
    /// A refund asked of payments: the rest of the charge, or half of it.
    Refund { order: usize, full: bool },
    /// One waiting event reaches orders (picked by `pick`), and with `again` stays waiting to
    /// come a second time.
    Deliver { pick: usize, again: bool },
}

/// Charges, refunds and deliveries weigh more than cancels and declines, which end an order's
/// story early, and most charges leave the order to the events (no fast path): most cases
/// then reach the late and reordered events this is about.
fn op(orders: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..orders, prop::bool::weighted(0.25)).prop_map(|(order, sync)| Op::Pay { order, sync }),
        1 => (0..orders, any::<bool>()).prop_map(|(order, sync)| Op::Decline { order, sync }),
        1 => (0..orders).prop_map(|order| Op::Cancel { order }),
        3 => (0..orders, any::<bool>()).prop_map(|(order, full)| Op::Refund { order, full }),
        4 => (any::<usize>(), any::<bool>()).prop_map(|(pick, again)| Op::Deliver { pick, again }),
    ]
}

/// One payment as the payments service keeps it.
#[derive(Debug)]
struct Payment {
    order: usize,
    succeeded: bool,
    charged: i64,
    refunded: i64,
    /// Refunds someone asked for (not compensations): money the shop chose to give back.
    chosen_refunds: i64,
    version: u64,
}

/// The payments side: its payments, and the events it has written that orders has not had yet.
#[derive(Default)]
struct PaymentsModel {
    payments: BTreeMap<Uuid, Payment>,
    waiting: Vec<Event>,
}

impl PaymentsModel {
    fn success_of(&self, order: usize) -> Option<Uuid> {
        self.payments
            .iter()
            .find(|(_, p)| p.order == order && p.succeeded)
            .map(|(id, _)| *id)
    }

    /// Refunds `amount` of `id` (bounded by what is left), writing its event.
    fn refund(&mut self, id: Uuid, amount: i64, order_id: Uuid, chosen: bool) {
        let Some(p) = self.payments.get_mut(&id) else {
            return;
        };
        let amount = amount.min(p.charged - p.refunded);
        if !p.succeeded || amount <= 0 {
            return;
        }
        p.refunded += amount;
        if chosen {
            p.chosen_refunds += amount;
        }
        p.version += 1;
        let status = if p.refunded == p.charged {
            "refunded"
        } else {
            "partially_refunded"
        };
        self.waiting.push(payment_event(
            types::PAYMENT_REFUNDED,
            order_id,
            id,
            status,
            amount,
            p.version,
        ));
    }
}

const TOTAL: i64 = 10_000;

async fn run(orders: usize, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let h = Harness::new().await;
    let mut ids = Vec::new();
    for _ in 0..orders {
        ids.push(h.order(TOTAL).await);
    }
    let mut model = PaymentsModel::default();
    let mut compensations_seen = 0;

    for op in ops {
        match op {
            Op::Pay { order, sync } => {
                // Payments charges an order only while it has no successful payment.
                if model.success_of(order).is_some() {
                    continue;
                }
                let id = Uuid::now_v7();
                model.payments.insert(
                    id,
                    Payment {
                        order,
                        succeeded: true,
                        charged: TOTAL,
                        refunded: 0,
                        chosen_refunds: 0,
                        version: 1,
                    },
                );
                model.waiting.push(payment_event(
                    types::PAYMENT_SUCCEEDED,
                    ids[order],
                    id,
                    "succeeded",
                    TOTAL,
                    1,
                ));
                if sync {
                    match apply_status(&h.ctx, ids[order], OrderStatus::Paid, None).await {
                        Err(problem) if problem.status == 409 => {
                            // The order stopped being payable while the card was charged.
                            model.refund(id, TOTAL, ids[order], false);
                        }
                        _ => {}
                    }
                }
            }
            Op::Decline { order, sync } => {
                let id = Uuid::now_v7();
                model.payments.insert(
                    id,
                    Payment {
                        order,
                        succeeded: false,
                        charged: 0,
                        refunded: 0,
                        chosen_refunds: 0,
                        version: 1,
                    },
                );
                model.waiting.push(payment_event(
                    types::PAYMENT_FAILED,
                    ids[order],
                    id,
                    "failed",
                    TOTAL,
                    1,
                ));
                if sync {
                    for to in [OrderStatus::PaymentFailed, OrderStatus::Cancelled] {
                        let _ = apply_status(&h.ctx, ids[order], to, None).await;
                    }
                }
            }
            Op::Cancel { order } => {
                let _ = apply_status(&h.ctx, ids[order], OrderStatus::Cancelled, None).await;
            }
            Op::Refund { order, full } => {
                if let Some(id) = model.success_of(order) {
                    let amount = if full { TOTAL } else { TOTAL / 2 };
                    model.refund(id, amount, ids[order], true);
                }
            }
            Op::Deliver { pick, again } => {
                if model.waiting.is_empty() {
                    continue;
                }
                let i = pick % model.waiting.len();
                let event = if again {
                    model.waiting[i].clone()
                } else {
                    model.waiting.remove(i)
                };
                h.deliver(&event)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("nothing here is transient: {e}")))?;
            }
        }
        compensations_seen = answer_compensations(&h, &mut model, &ids, compensations_seen);
    }

    // Everything still waiting arrives, in an order of its own (last written first).
    while let Some(event) = model.waiting.pop() {
        h.deliver(&event)
            .await
            .map_err(|e| TestCaseError::fail(format!("nothing here is transient: {e}")))?;
        compensations_seen = answer_compensations(&h, &mut model, &ids, compensations_seen);
    }

    for (n, order_id) in ids.iter().enumerate() {
        let status = h.status(*order_id).await;
        let mine = model.payments.values().filter(|p| p.order == n);
        let (charged, refunded, chosen) = mine.fold((0, 0, 0), |(c, r, k), p| {
            (c + p.charged, r + p.refunded, k + p.chosen_refunds)
        });
        let net = charged - refunded;
        // Stock: sold exactly for orders that were paid (refunded ones keep their sale: the
        // goods go back through a return, not the reservation), back on the shelf for cancelled
        // ones, still held for the rest. Each unit is in one of the three, so on-hand + held +
        // sold stays the initial stock.
        let reservation = h.products.state(*order_id);
        let expected = match status {
            OrderStatus::Paid
            | OrderStatus::Refunded
            | OrderStatus::Shipped
            | OrderStatus::Delivered => Stock::Committed,
            OrderStatus::Cancelled => Stock::Released,
            OrderStatus::Pending | OrderStatus::PaymentFailed => Stock::Held,
        };
        prop_assert_eq!(reservation, expected, "order {} {} stock", n, status);
        match status {
            // Paid: the whole total, less only what someone chose to refund.
            OrderStatus::Paid => prop_assert_eq!(net, TOTAL - chosen, "order {} {}", n, status),
            // Every event has arrived: an order still pending was never charged.
            OrderStatus::Pending => prop_assert_eq!(charged, 0, "order {} pending", n),
            OrderStatus::Cancelled | OrderStatus::PaymentFailed | OrderStatus::Refunded => {
                prop_assert_eq!(net, 0, "order {} {}", n, status)
            }
            OrderStatus::Shipped | OrderStatus::Delivered => {
                prop_assert!(false, "nothing here ships an order")
            }
        }
    }
    Ok(())
}

/// Carries out the compensations orders asked for since `seen` the way payments does: the
/// rest of the charge goes back, with its event. Returns how many have been answered.
fn answer_compensations(
    h: &Harness,
    model: &mut PaymentsModel,
    ids: &[Uuid],
    seen: usize,
) -> usize {
    let asked = h.compensations();
    for (payment, _) in &asked[seen..] {
        if let Some(order) = model.payments.get(payment).map(|p| p.order) {
            model.refund(*payment, TOTAL, ids[order], false);
        }
    }
    asked.len()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn no_interleaving_keeps_money_for_nothing(
        (orders, ops) in (1usize..=3).prop_flat_map(|n| (Just(n), prop::collection::vec(op(n), 1..24)))
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(orders, ops))?;
    }
}
