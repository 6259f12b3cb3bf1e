//! The user journeys, step by step. Each step is one API call recorded under its name, timed
//! from when it was due (the journey's arrival, or the end of the think time before it), and
//! what the platform accepted is written into the [`Ledger`] the verifier checks afterwards.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Instant;

use chrono::{DateTime, Utc};
use kit::Money;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::plan::{Journey, Think};
use crate::stats::{CREATE_ORDER, Recorder};
use crate::target::{Call, Reply, Target};

/// Test cards of the payment simulator (docs/api.md).
pub const CARD_OK: &str = "4242424242424242";
pub const CARD_DECLINED: &str = "4000000000000002";
pub const CARD_UNREACHABLE: &str = "4000000000000119";

/// A signed-in account; its access token is renewed when the platform answers 401.
pub struct Account {
    pub id: Uuid,
    pub email: String,
    password: String,
    token: RwLock<String>,
}

impl Account {
    pub fn new(id: Uuid, email: String, password: String, token: String) -> Account {
        Account {
            id,
            email,
            password,
            token: RwLock::new(token),
        }
    }

    pub fn token(&self) -> String {
        self.token
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_token(&self, token: String) {
        *self.token.write().unwrap_or_else(PoisonError::into_inner) = token;
    }
}

/// A product the run created, and the price an order of it is charged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerProduct {
    pub id: Uuid,
    pub sku: String,
    pub name: String,
    pub price: Money,
    /// Units on the shelf when the run created it.
    pub initial_on_hand: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcceptedOrder {
    pub id: Uuid,
    pub user_id: Uuid,
    pub total_amount: Money,
}

/// What the run did that the books must show afterwards (written as the run file).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub target: String,
    pub run_id: String,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub products: Vec<LedgerProduct>,
    /// Every account the run created (customers and registrations).
    pub users: Vec<Uuid>,
    /// Orders the platform answered 201 for.
    pub accepted_orders: Vec<AcceptedOrder>,
    /// Per user, order creations whose outcome the run could not know (a timeout, a 5xx):
    /// the platform may hold that many orders the run never saw accepted.
    pub uncertain_orders: BTreeMap<Uuid, u32>,
}

/// Everything journeys share.
pub struct World {
    pub target: Target,
    pub run_id: String,
    pub admin: Account,
    pub customers: Vec<Account>,
    pub products: Vec<LedgerProduct>,
    pub think: Think,
    pub ledger: Mutex<Ledger>,
    /// Paid orders waiting for an operator (to ship or to refund).
    paid: Mutex<VecDeque<Uuid>>,
    registrations: AtomicU64,
}

impl World {
    pub fn new(
        target: Target,
        run_id: String,
        admin: Account,
        customers: Vec<Account>,
        products: Vec<LedgerProduct>,
        think: Think,
        ledger: Ledger,
    ) -> World {
        World {
            target,
            run_id,
            admin,
            customers,
            products,
            think,
            ledger: Mutex::new(ledger),
            paid: Mutex::new(VecDeque::new()),
            registrations: AtomicU64::new(0),
        }
    }

    fn ledger<T>(&self, f: impl FnOnce(&mut Ledger) -> T) -> T {
        f(&mut self.ledger.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn customer(&self) -> &Account {
        &self.customers[fastrand::usize(..self.customers.len())]
    }

    fn product(&self) -> &LedgerProduct {
        &self.products[fastrand::usize(..self.products.len())]
    }

    fn take_paid(&self) -> Option<Uuid> {
        self.paid
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }

    fn put_paid(&self, order: Uuid) {
        let mut paid = self.paid.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded: operators only ever need the next few.
        if paid.len() < 10_000 {
            paid.push_back(order);
        }
    }

    /// One step as `who`: the call `make` builds with their token, signed in again once if the
    /// token lapsed, recorded under `step` from `due`.
    async fn step(
        &self,
        recorder: &Recorder,
        step: &'static str,
        due: Instant,
        who: Option<&Account>,
        make: impl Fn(Option<String>) -> Call,
    ) -> Reply {
        let mut reply = self.target.call(make(who.map(Account::token))).await;
        if let Some(who) = who
            && reply.status_is(401)
            && sign_in(&self.target, who).await.is_ok()
        {
            reply = self.target.call(make(Some(who.token()))).await;
        }
        recorder.record(step, due, reply.failure.as_deref());
        reply
    }
}

/// A password sign-in: the access token and the account's id.
pub async fn request_tokens(
    target: &Target,
    email: &str,
    password: &str,
) -> Result<(String, Uuid), String> {
    let reply = target
        .call(
            Call::send(
                Method::POST,
                "/api/v1/auth/token",
                None,
                json!({"email": email, "password": password}),
            )
            .expecting(&[200]),
        )
        .await;
    if let Some(failure) = reply.failure {
        return Err(failure);
    }
    #[derive(Deserialize)]
    struct User {
        id: Uuid,
    }
    #[derive(Deserialize)]
    struct Tokens {
        access_token: String,
        user: User,
    }
    let tokens: Tokens = reply.json()?;
    Ok((tokens.access_token, tokens.user.id))
}

/// Signs `who` in again with their password.
pub async fn sign_in(target: &Target, who: &Account) -> Result<(), String> {
    let (token, _) = request_tokens(target, &who.email, &who.password).await?;
    who.set_token(token);
    Ok(())
}

/// The next step's due time: now plus a think time, slept until.
struct Clock {
    due: Instant,
    think: Think,
}

impl Clock {
    async fn think(&mut self) {
        self.due = Instant::now() + self.think.draw();
        tokio::time::sleep_until(self.due.into()).await;
    }
}

/// Runs one journey that arrived (was due) at `due`.
pub async fn run(world: &World, recorder: &Recorder, journey: Journey, due: Instant) {
    recorder.journey_started(journey.as_str());
    let mut clock = Clock {
        due,
        think: world.think,
    };
    match journey {
        Journey::Browse => browse(world, recorder, &mut clock).await,
        Journey::Register => register(world, recorder, &mut clock).await,
        Journey::Buy => {
            let who = world.customer();
            view_product(world, recorder, &mut clock).await;
            clock.think().await;
            if let Some(order) = create_order(world, recorder, &mut clock, who).await {
                clock.think().await;
                pay(world, recorder, &clock, who, order, CARD_OK, "pay", &[201]).await;
            }
        }
        Journey::Declined => {
            let who = world.customer();
            if let Some(order) = create_order(world, recorder, &mut clock, who).await {
                clock.think().await;
                pay(
                    world,
                    recorder,
                    &clock,
                    who,
                    order,
                    CARD_DECLINED,
                    "pay (declined card)",
                    &[402],
                )
                .await;
            }
        }
        Journey::NetworkFailure => {
            let who = world.customer();
            if let Some(order) = create_order(world, recorder, &mut clock, who).await {
                clock.think().await;
                let unreachable = pay(
                    world,
                    recorder,
                    &clock,
                    who,
                    order,
                    CARD_UNREACHABLE,
                    "pay (provider unreachable)",
                    &[503],
                )
                .await;
                if unreachable {
                    clock.think().await;
                    pay(
                        world,
                        recorder,
                        &clock,
                        who,
                        order,
                        CARD_OK,
                        "pay (retry)",
                        &[201],
                    )
                    .await;
                }
            }
        }
        Journey::Cancel => {
            let who = world.customer();
            if let Some(order) = create_order(world, recorder, &mut clock, who).await {
                clock.think().await;
                world
                    .step(recorder, "cancel order", clock.due, Some(who), |token| {
                        Call::send(
                            Method::PUT,
                            format!("/api/v1/orders/{order}/status"),
                            token,
                            json!({"status": "cancelled"}),
                        )
                        .expecting(&[200])
                    })
                    .await;
            }
        }
        Journey::Abandon => {
            let who = world.customer();
            create_order(world, recorder, &mut clock, who).await;
        }
        Journey::Order => {
            let who = world.customer();
            create_order(world, recorder, &mut clock, who).await;
        }
        Journey::Fulfil => {
            let Some(order) = world.take_paid() else {
                recorder.journey_skipped(journey.as_str());
                return;
            };
            let shipped = move_order(world, recorder, &clock, order, "ship", "shipped").await;
            if shipped {
                clock.think().await;
                move_order(world, recorder, &clock, order, "deliver", "delivered").await;
            }
        }
        Journey::Refund => {
            let Some(order) = world.take_paid() else {
                recorder.journey_skipped(journey.as_str());
                return;
            };
            refund(world, recorder, &mut clock, order).await;
        }
    }
}

async fn browse(world: &World, recorder: &Recorder, clock: &mut Clock) {
    world
        .step(recorder, "list products", clock.due, None, |_| {
            Call::get("/api/v1/products?limit=20", None)
        })
        .await;
    clock.think().await;
    view_product(world, recorder, clock).await;
    clock.think().await;
    // A word of a run product's name: searches that find something.
    let word = format!(
        "load item {}",
        fastrand::usize(..world.products.len().max(1))
    );
    world
        .step(recorder, "search", clock.due, None, |_| {
            Call::get(
                format!("/api/v1/products?q={}&limit=20", word.replace(' ', "%20")),
                None,
            )
        })
        .await;
}

async fn view_product(world: &World, recorder: &Recorder, clock: &mut Clock) {
    let product = world.product().id;
    world
        .step(recorder, "view product", clock.due, None, |_| {
            Call::get(format!("/api/v1/products/{product}"), None)
        })
        .await;
}

async fn register(world: &World, recorder: &Recorder, clock: &mut Clock) {
    let n = world.registrations.fetch_add(1, Ordering::Relaxed);
    let email = format!("load-{}-new-{n}@example.com", world.run_id);
    let password = format!("load password {}", Uuid::new_v4().simple());
    let reply = world
        .step(recorder, "register", clock.due, None, |_| {
            Call::send(
                Method::POST,
                "/api/v1/users",
                None,
                json!({"name": format!("Load customer {n}"), "email": email, "password": password}),
            )
            .expecting(&[201])
        })
        .await;
    #[derive(Deserialize)]
    struct Created {
        id: Uuid,
    }
    let Ok(created) = reply.json::<Created>() else {
        return;
    };
    world.ledger(|l| l.users.push(created.id));
    let account = Account::new(created.id, email, password, String::new());
    clock.think().await;
    let due = clock.due;
    let signed_in = sign_in(&world.target, &account).await;
    recorder.record("sign in", due, signed_in.as_ref().err().map(String::as_str));
    if signed_in.is_ok() {
        clock.think().await;
        world
            .step(recorder, "my profile", clock.due, Some(&account), |token| {
                Call::get("/api/v1/users/me", token)
            })
            .await;
    }
}

/// Places an order of one to three run products; the order's id when accepted.
async fn create_order(
    world: &World,
    recorder: &Recorder,
    clock: &mut Clock,
    who: &Account,
) -> Option<Uuid> {
    let mut lines: BTreeMap<Uuid, i64> = BTreeMap::new();
    for _ in 0..fastrand::usize(1..=3) {
        *lines.entry(world.product().id).or_default() += fastrand::i64(1..=3);
    }
    let items: Vec<_> = lines
        .iter()
        .map(|(id, quantity)| json!({"product_id": id, "quantity": quantity}))
        .collect();
    // The seed's structured address, and a key so the platform's retry rules are exercised
    // the way a real client would.
    let body = json!({
        "items": items,
        "shipping_address": {"street": "1 Load Lane", "city": "Pune", "state": "MH", "zip": "411001"},
    });
    let key = Uuid::new_v4().to_string();
    let reply = world
        .step(recorder, CREATE_ORDER, clock.due, Some(who), |token| {
            Call::send(Method::POST, "/api/v1/orders", token, body.clone())
                .expecting(&[201])
                .idempotent(key.clone())
        })
        .await;
    #[derive(Deserialize)]
    struct Created {
        id: Uuid,
        total_amount: Money,
    }
    if reply.is_ok() {
        let created: Created = reply.json().ok()?;
        world.ledger(|l| {
            l.accepted_orders.push(AcceptedOrder {
                id: created.id,
                user_id: who.id,
                total_amount: created.total_amount,
            })
        });
        return Some(created.id);
    }
    if reply.outcome_unknown() {
        world.ledger(|l| *l.uncertain_orders.entry(who.id).or_default() += 1);
    }
    None
}

/// Pays `order` with `card`; true when the answer was one of `expect`.
#[allow(clippy::too_many_arguments)] // one call site per journey; a struct would only rename them
async fn pay(
    world: &World,
    recorder: &Recorder,
    clock: &Clock,
    who: &Account,
    order: Uuid,
    card: &'static str,
    step: &'static str,
    expect: &'static [u16],
) -> bool {
    let key = Uuid::new_v4().to_string();
    let reply = world
        .step(recorder, step, clock.due, Some(who), |token| {
            Call::send(
                Method::POST,
                "/api/v1/payments",
                token,
                json!({"order_id": order, "payment_method": "credit_card", "card_number": card}),
            )
            .expecting(expect)
            .idempotent(key.clone())
        })
        .await;
    if reply.status_is(201) {
        world.put_paid(order);
    }
    reply.is_ok()
}

/// An operator's status move; true when it was made.
async fn move_order(
    world: &World,
    recorder: &Recorder,
    clock: &Clock,
    order: Uuid,
    step: &'static str,
    status: &'static str,
) -> bool {
    world
        .step(recorder, step, clock.due, Some(&world.admin), |token| {
            Call::send(
                Method::PUT,
                format!("/api/v1/orders/{order}/status"),
                token,
                json!({"status": status}),
            )
            .expecting(&[200])
        })
        .await
        .is_ok()
}

async fn refund(world: &World, recorder: &Recorder, clock: &mut Clock, order: Uuid) {
    #[derive(Deserialize)]
    struct Payment {
        id: Uuid,
        status: String,
    }
    #[derive(Deserialize)]
    struct Payments {
        payments: Vec<Payment>,
    }
    let reply = world
        .step(
            recorder,
            "find payment",
            clock.due,
            Some(&world.admin),
            |token| Call::get(format!("/api/v1/payments/order/{order}"), token),
        )
        .await;
    let Some(payment) = reply.json::<Payments>().ok().and_then(|p| {
        p.payments
            .into_iter()
            .find(|p| p.status == "succeeded")
            .map(|p| p.id)
    }) else {
        return;
    };
    clock.think().await;
    let key = Uuid::new_v4().to_string();
    world
        .step(recorder, "refund", clock.due, Some(&world.admin), |token| {
            Call::send(
                Method::POST,
                format!("/api/v1/payments/{payment}/refund"),
                token,
                json!({"reason": "load run refund"}),
            )
            .expecting(&[201])
            .idempotent(key.clone())
        })
        .await;
}
