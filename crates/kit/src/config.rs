//! Layered configuration: built-in defaults < `mercato.toml` < `MERCATO_*` environment.
//!
//! Nested keys use a double underscore (`MERCATO_ORDERS__PORT=9003`). The seed's own
//! environment names (`DATABASE_URL`, `SQS_QUEUE_URL`, `KAFKA_BOOTSTRAP_SERVERS`, ...) are
//! honoured too, so an existing deployment's settings carry over unchanged.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The seed's environment names and where each lands in [`Settings`].
pub const SEED_ENV: &[(&str, &str)] = &[
    ("DATABASE_URL", "default_database_url"),
    ("SQS_QUEUE_URL", "bus.queue_url"),
    ("KAFKA_BOOTSTRAP_SERVERS", "bus.kafka.bootstrap_servers"),
    ("KAFKA_SECURITY_PROTOCOL", "bus.kafka.security_protocol"),
    ("KAFKA_SASL_MECHANISM", "bus.kafka.sasl_mechanism"),
    ("KAFKA_API_KEY", "bus.kafka.api_key"),
    ("KAFKA_API_SECRET", "bus.kafka.api_secret"),
    ("ORDERS_TABLE", "tables.orders"),
    ("PAYMENTS_TABLE", "tables.payments"),
    ("NOTIFICATIONS_TABLE", "tables.notifications"),
    ("AWS_REGION", "aws_region"),
    ("LOG_LEVEL", "log.level"),
];

/// The environments where what only a developer may run is allowed: the payment simulator,
/// the demo accounts, fault injection (unless `faults.allowed` says otherwise).
pub const DEVELOPMENT_ENVIRONMENTS: [&str; 2] = ["development", "test"];

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(#[from] Box<figment::Error>);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where embedded databases live.
    pub data_dir: PathBuf,
    /// Address every listener binds.
    pub host: IpAddr,
    /// Seed a demo catalog into an empty products store at start-up.
    pub demo: bool,
    /// Used by every SQL store without a `database_url` of its own (the seed's `DATABASE_URL`).
    pub default_database_url: Option<String>,
    pub aws_region: Option<String>,
    pub log: LogSettings,
    pub http: HttpSettings,
    pub sqlite: SqliteSettings,
    pub postgres: PostgresSettings,
    pub bus: BusSettings,
    pub tables: TableNames,
    pub gateway: ServiceSettings,
    pub users: ServiceSettings,
    pub products: ServiceSettings,
    pub orders: ServiceSettings,
    pub payments: PaymentsSettings,
    pub notifications: ServiceSettings,
    pub analytics: ServiceSettings,
    pub saga: SagaSettings,
    pub limits: LimitsSettings,
    pub notifier: NotifierSettings,
    pub dynamodb: DynamoSettings,
    pub analytics_engine: AnalyticsSettings,
    /// The platform's currency (ISO 4217): every price and order is in it; a payment in another
    /// currency is refused. INR by default, as the seed's platform is Indian.
    pub currency: String,
    pub auth: AuthSettings,
    pub ops: OpsSettings,
    pub rate_limit: RateLimitSettings,
    /// `development` (the default), `test`, `production`, or any other name a deployment uses.
    /// Only `development` and `test` may run what only a developer may (the payment simulator).
    pub environment: String,
    pub faults: FaultSettings,
}

/// Run-time fault injection (`kit::faults`): who may switch faults on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// Unset: faults may be injected only when `environment` is `development` or `test`.
    /// `true`: in any environment (an explicit opt-in, warned about at start-up). `false`:
    /// never.
    pub allowed: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceSettings {
    /// Listening port; 0 picks a free one.
    pub port: u16,
    /// How other services reach this one; derived from host and bound port when unset.
    pub url: Option<String>,
    /// Storage URL; `sqlite://<data_dir>/<service>.db` when unset.
    pub database_url: Option<String>,
}

/// The payments service: where it listens and stores, like every service, and which payment
/// provider takes the money. In mercato.toml these are all keys of `[payments]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(from = "PaymentsKeys", into = "PaymentsKeys")]
pub struct PaymentsSettings {
    pub service: ServiceSettings,
    pub provider: PaymentProvider,
    pub stripe: StripeSettings,
    /// A payment left `pending` (its process died between charging and recording, or the
    /// provider is still working) is looked up at the provider once it is this old. Longer
    /// than a charge call can take, and than Stripe's search index lags.
    pub reconcile_after_secs: u64,
    /// How often pending payments are looked for (and once at start-up).
    pub reconcile_interval_secs: u64,
}

/// Lets the platform's service-generic code (ports, urls, database urls) treat the payments
/// settings as any service's.
impl std::ops::Deref for PaymentsSettings {
    type Target = ServiceSettings;
    fn deref(&self) -> &ServiceSettings {
        &self.service
    }
}

impl std::ops::DerefMut for PaymentsSettings {
    fn deref_mut(&mut self) -> &mut ServiceSettings {
        &mut self.service
    }
}

/// `[payments]` as written: one flat table, unknown keys refused (serde's `flatten` cannot
/// refuse them, hence this shape and the conversions).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PaymentsKeys {
    port: u16,
    url: Option<String>,
    database_url: Option<String>,
    provider: PaymentProvider,
    stripe: StripeSettings,
    reconcile_after_secs: u64,
    reconcile_interval_secs: u64,
}

impl Default for PaymentsKeys {
    fn default() -> Self {
        PaymentsSettings::default().into()
    }
}

impl From<PaymentsKeys> for PaymentsSettings {
    fn from(k: PaymentsKeys) -> Self {
        PaymentsSettings {
            service: ServiceSettings {
                port: k.port,
                url: k.url,
                database_url: k.database_url,
            },
            provider: k.provider,
            stripe: k.stripe,
            reconcile_after_secs: k.reconcile_after_secs,
            reconcile_interval_secs: k.reconcile_interval_secs,
        }
    }
}

impl From<PaymentsSettings> for PaymentsKeys {
    fn from(s: PaymentsSettings) -> Self {
        PaymentsKeys {
            port: s.service.port,
            url: s.service.url,
            database_url: s.service.database_url,
            provider: s.provider,
            stripe: s.stripe,
            reconcile_after_secs: s.reconcile_after_secs,
            reconcile_interval_secs: s.reconcile_interval_secs,
        }
    }
}

impl Default for PaymentsSettings {
    fn default() -> Self {
        PaymentsSettings {
            service: ServiceSettings::default(),
            provider: PaymentProvider::Simulator,
            stripe: StripeSettings::default(),
            reconcile_after_secs: 120,
            reconcile_interval_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PaymentProvider {
    /// Deterministic test cards, no money moves: development and tests only (refused when
    /// `environment = "production"`).
    #[default]
    Simulator,
    Stripe,
}

/// Stripe's REST API. The secrets are read from files (a mounted Kubernetes secret) at
/// start-up and never logged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StripeSettings {
    pub api_base: String,
    /// The secret API key (`sk_live_...`), alone in the file.
    pub secret_key_file: Option<PathBuf>,
    /// The webhook endpoint's signing secret (`whsec_...`); webhooks are refused without it.
    pub webhook_secret_file: Option<PathBuf>,
    /// Whole-call timeout of one API call.
    pub timeout_ms: u64,
}

impl Default for StripeSettings {
    fn default() -> Self {
        StripeSettings {
            api_base: "https://api.stripe.com".into(),
            secret_key_file: None,
            webhook_secret_file: None,
            timeout_ms: 10_000,
        }
    }
}

impl ServiceSettings {
    fn on(port: u16) -> Self {
        ServiceSettings {
            port,
            url: None,
            database_url: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `json` (default, one object per line) or `pretty`.
    pub format: String,
    /// A tracing filter such as `info` or `info,orders=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSettings {
    /// Whole-call timeout for service-to-service requests.
    pub client_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Largest accepted request body.
    pub body_limit_bytes: usize,
    /// Gateway: how long an upstream may take to answer.
    pub upstream_timeout_ms: u64,
    /// Gateway and services: a service running in the same process (`mercato up`) is handed
    /// their requests in memory, through its whole middleware stack, instead of over its TCP
    /// port. `false` sends them over TCP as between pods.
    pub in_process_upstreams: bool,
    /// How long an `Idempotency-Key` and its stored answer are kept.
    pub idempotency_ttl_secs: u64,
    /// Every listener: how long a client may take to send a request's headers, and how long
    /// an HTTP/1.1 keep-alive connection may sit idle between requests.
    pub header_read_timeout_ms: u64,
    /// Every listener: how long a request may take until its answer starts (a slow body upload
    /// included); then 503 `request-timeout`. Longer than `upstream_timeout_ms`, so the gateway
    /// answers its own 504 first. Streams (SSE) run on once their answer has started.
    pub request_timeout_ms: u64,
    /// Every listener: open connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Every listener: an idle HTTP/2 connection is pinged this often and closed when a ping
    /// goes unanswered for as long.
    pub http2_keep_alive_ms: u64,
    /// On SIGTERM, how long in-flight requests may finish before connections are cut; inside
    /// Kubernetes' default 30 s grace period.
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SqliteSettings {
    /// `normal` survives a process crash (WAL); `full` also survives power loss, slower.
    pub synchronous: String,
    pub busy_timeout_ms: u64,
    pub read_connections: u32,
    /// WAL pages after which a commit checkpoints (SQLite's `wal_autocheckpoint`, whose own
    /// default is 1,000): the writer waits on the checkpoint's fsyncs, so fewer pages are
    /// shorter, more frequent stalls. 250 measured a p99 of 14–15 ms where 1,000 gave 27–145
    /// (docs/benchmarks.md).
    pub wal_autocheckpoint_pages: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSettings {
    /// Connections per service pool (a service's stores, outbox relay and idempotency keys
    /// share it).
    pub max_connections: u32,
    /// How long a query waits for a free connection before the request fails with 503.
    pub acquire_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BusSettings {
    /// Embedded bus database; `sqlite://<data_dir>/bus.db` when unset.
    pub url: Option<String>,
    /// Queue backend override (the seed's `SQS_QUEUE_URL`): the URL of the SQS queue that
    /// carries `order-events`; the queue is then SQS (binary built with feature `sqs`), the
    /// stream stays embedded or Kafka.
    pub queue_url: Option<String>,
    pub kafka: KafkaSettings,
    pub sqs: SqsSettings,
    pub visibility_timeout_ms: u64,
    /// Deliveries before a queue message is moved to the dead-letter queue.
    pub max_receives: i64,
    pub stream_partitions: u32,
    /// How long stream records are kept (Kafka's `retention.ms`); consumers' dedup records of
    /// processed event ids are kept as long, since nothing older can be redelivered.
    pub retention_hours: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: Option<String>,
    pub security_protocol: Option<String>,
    pub sasl_mechanism: Option<String>,
    pub api_key: Option<String>,
    pub api_secret: Option<String>,
    /// Create the `orders`, `payments` and `analytics-results` topics (with
    /// `bus.stream_partitions` partitions) where missing: for local brokers; managed clusters
    /// get theirs from Terraform.
    pub create_topics: bool,
    /// Most records per produced batch (librdkafka `batch.num.messages`; its default when
    /// unset). tansu 0.6 cannot serve a fetch that starts inside a batch, so a consumer
    /// resuming mid-batch there stalls; `1` avoids it on that broker.
    pub batch_messages: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SqsSettings {
    /// Where the SQS API is (an SQS-compatible server such as moto or LocalStack). When unset:
    /// `AWS_ENDPOINT_URL_SQS` / `AWS_ENDPOINT_URL` if set, else the origin of `bus.queue_url`
    /// when that is not an `amazonaws.com` URL, else AWS's own endpoint for `aws_region`.
    pub endpoint_url: Option<String>,
    /// Create the queue and its dead-letter queue (`<name>-dlq`, redrive after
    /// `bus.max_receives` receives, visibility `bus.visibility_timeout_ms`) where missing: for
    /// local servers; AWS gets its queues from Terraform.
    pub create_queues: bool,
}

/// The seed's DynamoDB tables (`ORDERS_TABLE`, ...). A service whose table is named here keeps
/// its data there (region `aws_region`), unless its own `database_url` says otherwise: a
/// deployment of the seed carries over with its settings unchanged.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TableNames {
    pub orders: Option<String>,
    pub payments: Option<String>,
    pub notifications: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SagaSettings {
    /// Unpaid orders are cancelled, and their stock released, after this long.
    pub pending_order_ttl_secs: u64,
    /// How often expired orders and orphaned reservations are looked for.
    pub sweep_interval_ms: u64,
    /// Settled (sold or released) reservations are deleted this long after they settled, so
    /// products' tables do not grow with every order ever placed. Longer than any hold
    /// ([`LimitsSettings::MAX_HOLD_SECS`]) and unpaid-order window, or a late payment could
    /// find no reservation (it is then refused and refunded, not sold twice).
    pub reservation_retention_hours: u64,
}

impl SagaSettings {
    pub fn validate(&self) -> Result<(), String> {
        let retention = self.reservation_retention_hours.saturating_mul(3600);
        if retention <= u64::from(LimitsSettings::MAX_HOLD_SECS)
            || retention <= self.pending_order_ttl_secs
        {
            return Err(format!(
                "saga.reservation_retention_hours must be longer than a hold may last ({} hours) and than saga.pending_order_ttl_secs",
                LimitsSettings::MAX_HOLD_SECS / 3600
            ));
        }
        Ok(())
    }
}

/// Upper bounds on what a shop sells at once, against typing errors and abuse. Amounts are in
/// the platform's currency, written as decimals (`1000000.00`, or a string).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSettings {
    /// Highest unit price of a product (₹10,00,000.00 by default).
    #[serde(with = "decimal_money")]
    pub max_price: crate::Money,
    /// Highest total of one order (₹50,00,000.00 by default).
    #[serde(with = "decimal_money")]
    pub max_order_total: crate::Money,
    /// Most units of one product in one order (1 to 10000).
    pub max_line_quantity: i64,
    /// Most unpaid (pending) orders one user may have at once; 0 = no limit. Stock held by
    /// unpaid orders is stock nobody else can buy until they expire.
    pub max_pending_orders_per_user: i64,
    /// Most units one user's unpaid orders may hold in all; 0 = no limit.
    pub max_pending_units_per_user: i64,
}

impl Default for LimitsSettings {
    fn default() -> Self {
        LimitsSettings {
            max_price: crate::Money::from_cents(100_000_000).unwrap_or(crate::Money::ZERO),
            max_order_total: crate::Money::from_cents(500_000_000).unwrap_or(crate::Money::ZERO),
            max_line_quantity: 1_000,
            max_pending_orders_per_user: 20,
            max_pending_units_per_user: 10_000,
        }
    }
}

impl HttpSettings {
    /// Refuses listener settings that would refuse every request or never time out.
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout_ms == 0
            || self.request_timeout_ms == 0
            || self.max_connections == 0
            || self.http2_keep_alive_ms == 0
        {
            return Err("http.header_read_timeout_ms, request_timeout_ms, max_connections and http2_keep_alive_ms must be above 0".into());
        }
        Ok(())
    }
}

impl LimitsSettings {
    /// The most units of one product any order may hold, whatever `max_line_quantity` says.
    pub const LINE_QUANTITY_CAP: i64 = 10_000;

    /// The longest a reservation may hold stock: a day. Longer would let one caller lock
    /// inventory for as good as ever (orders asks for its pending TTL plus a minute).
    pub const MAX_HOLD_SECS: u32 = 24 * 60 * 60;

    /// Refuses bounds that would stop every sale, or go past what the services can hold.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_price.cents() <= 0 || self.max_order_total.cents() <= 0 {
            return Err("limits.max_price and limits.max_order_total must be above 0".into());
        }
        if !(1..=Self::LINE_QUANTITY_CAP).contains(&self.max_line_quantity) {
            return Err(format!(
                "limits.max_line_quantity must be between 1 and {}",
                Self::LINE_QUANTITY_CAP
            ));
        }
        Ok(())
    }
}

/// Money in settings: written as a string (figment's own values carry no raw JSON), read from
/// a string or a number, exactly to the cent.
mod decimal_money {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::Money;

    pub fn serialize<S: Serializer>(money: &Money, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&money.to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Whole(i64),
        Decimal(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        let text = match Written::deserialize(deserializer)? {
            Written::Whole(n) => n.to_string(),
            // TOML and the environment hand decimals over as floats: refuse rather than round
            // what is not whole cents.
            Written::Decimal(x) if ((x * 100.0).round() - x * 100.0).abs() < 1e-6 => {
                format!("{x:.2}")
            }
            Written::Decimal(x) => {
                return Err(serde::de::Error::custom(format!(
                    "{x} is not an amount in whole cents"
                )));
            }
            Written::Text(t) => t,
        };
        text.trim()
            .parse::<Money>()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoSettings {
    /// Create the tables of the stores on `dynamodb://` URLs (with their indexes, and the
    /// `<table>-outbox` tables) where missing: for local servers; AWS gets its tables from
    /// Terraform.
    pub create_tables: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NotifierSettings {
    /// Messages per batch handed to the handler (Lambda's own mapping allows 10 without a window).
    pub batch_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AnalyticsSettings {
    /// Tumbling window size.
    pub window_secs: i64,
    /// How far the watermark trails the latest event time: a window is final (and published)
    /// once an event this much past its end has been seen; events for final windows are late.
    pub allowed_lateness_secs: i64,
    /// Where final windows are written as JSON lines partitioned by date: `file://DIR`,
    /// `s3://bucket/prefix`, `gs://bucket/prefix`; `<data_dir>/analytics-results` when unset.
    pub results_url: Option<String>,
    /// Names this instance's partial windows so several instances' results can be merged;
    /// `$HOSTNAME` (a pod's name) when unset, else `analytics`.
    pub instance_id: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("data"),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            demo: true,
            default_database_url: None,
            aws_region: None,
            log: LogSettings::default(),
            http: HttpSettings::default(),
            sqlite: SqliteSettings::default(),
            postgres: PostgresSettings::default(),
            bus: BusSettings::default(),
            tables: TableNames::default(),
            gateway: ServiceSettings::on(8080),
            users: ServiceSettings::on(8001),
            products: ServiceSettings::on(8002),
            orders: ServiceSettings::on(8003),
            payments: PaymentsSettings {
                service: ServiceSettings::on(8004),
                ..PaymentsSettings::default()
            },
            notifications: ServiceSettings::on(8005),
            analytics: ServiceSettings::on(8006),
            saga: SagaSettings::default(),
            limits: LimitsSettings::default(),
            notifier: NotifierSettings::default(),
            dynamodb: DynamoSettings::default(),
            analytics_engine: AnalyticsSettings::default(),
            currency: "INR".into(),
            auth: AuthSettings::default(),
            ops: OpsSettings::default(),
            rate_limit: RateLimitSettings::default(),
            environment: "development".into(),
            faults: FaultSettings::default(),
        }
    }
}

/// The gateway's rate limits: requests per second, sustained, with a burst of twice as many;
/// 0 turns a limit off. Over a limit the gateway answers 429 with `Retry-After`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Each client address (an IPv6 client by its /64), every route.
    pub per_address_per_sec: u32,
    /// Each signed-in user, on the routes that need sign-in.
    pub per_user_per_sec: u32,
    /// All clients together, per route class: signing in and registering (password guessing).
    pub sign_in_per_sec: u32,
    /// All clients together: reads (GET, HEAD).
    pub reads_per_sec: u32,
    /// All clients together: every other method.
    pub writes_per_sec: u32,
    /// Proxies in front of the gateway (the load balancer's subnets, as CIDRs such as
    /// `10.0.0.0/16`): from them `X-Forwarded-For` and `X-Forwarded-Proto` are believed, and
    /// the client is the last address in the chain that is not one of them.
    pub trusted_proxies: Vec<String>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        RateLimitSettings {
            per_address_per_sec: 100,
            per_user_per_sec: 50,
            sign_in_per_sec: 50,
            reads_per_sec: 20_000,
            writes_per_sec: 5_000,
            trusted_proxies: Vec::new(),
        }
    }
}

impl RateLimitSettings {
    /// No limit at all: for benchmarks and tests that are not about limits.
    pub fn off() -> RateLimitSettings {
        RateLimitSettings {
            per_address_per_sec: 0,
            per_user_per_sec: 0,
            sign_in_per_sec: 0,
            reads_per_sec: 0,
            writes_per_sec: 0,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Identity and access control (see `kit::auth`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// `secure` (the default): every route has an owner and checks the caller's token. `open`:
    /// access control is off, as the seed's platform ran; start-up and `/ready` warn loudly.
    pub mode: AuthMode,
    /// `iss` of the tokens Mercato issues.
    pub issuer: String,
    /// `aud` of the tokens Mercato issues, and the audience every service expects of them.
    pub audience: String,
    /// Lifetime of an access token (a JWT): short, since it cannot be revoked once issued.
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token (opaque, stored hashed, rotated at each use).
    pub refresh_token_ttl_secs: u64,
    /// The Ed25519 private key (PKCS#8 PEM) that signs access tokens; only the users service uses
    /// it. With neither this nor `signing_key_file`, `<data_dir>/auth/` keeps a generated one.
    pub signing_key: Option<Secret>,
    pub signing_key_file: Option<PathBuf>,
    /// Public keys (SPKI PEM) of earlier signing keys: tokens they signed stay valid until they
    /// expire. Remove a key once `access_token_ttl_secs` has passed since its replacement.
    pub previous_public_keys: Vec<String>,
    /// Where a service that does not hold the signing key reads the public keys (a JWKS); the
    /// users service's `/.well-known/jwks.json` when unset.
    pub jwks_url: Option<String>,
    /// The Ed25519 private key (PKCS#8 PEM) services sign their calls to each other's
    /// `/internal/*` routes with; every service but the gateway holds it. With neither this nor
    /// `service_key_file`, `<data_dir>/auth/` keeps a generated one.
    pub service_key: Option<Secret>,
    pub service_key_file: Option<PathBuf>,
    /// External OpenID Connect providers whose access tokens are accepted (AWS Cognito, ...).
    pub issuers: Vec<ExternalIssuer>,
    /// Failed logins for one account within `login_failure_window_secs` before further attempts
    /// are answered 429 with `Retry-After`.
    pub login_max_failures: u32,
    /// The same for one client address, whatever the accounts tried.
    pub login_client_max_failures: u32,
    pub login_failure_window_secs: u64,
    /// The first administrator, from configuration: created at start-up (users service) when no
    /// user has this e-mail, promoted to admin when one has. Both must be set; there is never a
    /// default password.
    pub admin_email: Option<String>,
    pub admin_password: Option<Secret>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    Secure,
    Open,
}

/// An OpenID Connect provider whose tokens are accepted beside Mercato's own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuer {
    /// The provider's `iss` (`https://cognito-idp.<region>.amazonaws.com/<pool id>`).
    pub issuer: String,
    /// Its public keys (`<issuer>/.well-known/jwks.json` for Cognito).
    pub jwks_url: String,
    /// The value `audience_claim` must hold (Cognito: the app client id).
    pub audience: String,
    /// `aud` (OIDC), or `client_id` for Cognito access tokens, which carry no `aud`.
    #[serde(default = "default_audience_claim")]
    pub audience_claim: String,
    /// The claim listing the caller's groups or roles (`cognito:groups` for Cognito).
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    /// Members of any of these groups are administrators; everyone else is a customer.
    #[serde(default = "default_admin_roles")]
    pub admin_roles: Vec<String>,
}

fn default_audience_claim() -> String {
    "aud".into()
}

fn default_roles_claim() -> String {
    "roles".into()
}

fn default_admin_roles() -> Vec<String> {
    vec!["admin".into()]
}

/// A secret setting: its `Debug` never shows the value, so settings can be logged.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The operations listener: `/health`, `/ready` and `/metrics` for everything this process
/// runs, kept off the public listeners (the Kubernetes probes and the Prometheus scrape use it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpsSettings {
    /// 0 picks a free port.
    pub port: u16,
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings { port: 8090 }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            mode: AuthMode::Secure,
            issuer: "mercato".into(),
            audience: "mercato-api".into(),
            access_token_ttl_secs: 15 * 60,
            refresh_token_ttl_secs: 30 * 24 * 60 * 60,
            signing_key: None,
            signing_key_file: None,
            previous_public_keys: Vec::new(),
            jwks_url: None,
            service_key: None,
            service_key_file: None,
            issuers: Vec::new(),
            login_max_failures: 5,
            login_client_max_failures: 20,
            login_failure_window_secs: 15 * 60,
            admin_email: None,
            admin_password: None,
        }
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings::on(0)
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: "json".into(),
            level: "info".into(),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            client_timeout_ms: 2_000,
            connect_timeout_ms: 500,
            body_limit_bytes: 1024 * 1024,
            upstream_timeout_ms: 10_000,
            in_process_upstreams: true,
            idempotency_ttl_secs: 24 * 60 * 60,
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            max_connections: 10_000,
            http2_keep_alive_ms: 20_000,
            drain_timeout_ms: 25_000,
        }
    }
}

impl Default for SqliteSettings {
    fn default() -> Self {
        SqliteSettings {
            synchronous: "normal".into(),
            busy_timeout_ms: 5_000,
            read_connections: 4,
            wal_autocheckpoint_pages: 250,
        }
    }
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            max_connections: 10,
            acquire_timeout_ms: 5_000,
        }
    }
}

impl Default for BusSettings {
    fn default() -> Self {
        BusSettings {
            url: None,
            queue_url: None,
            kafka: KafkaSettings::default(),
            sqs: SqsSettings::default(),
            visibility_timeout_ms: 30_000,
            max_receives: 5,
            stream_partitions: 1,
            retention_hours: 7 * 24,
        }
    }
}

impl Default for SagaSettings {
    fn default() -> Self {
        SagaSettings {
            pending_order_ttl_secs: 15 * 60,
            sweep_interval_ms: 5_000,
            reservation_retention_hours: 7 * 24,
        }
    }
}

impl Default for NotifierSettings {
    fn default() -> Self {
        NotifierSettings { batch_size: 25 }
    }
}

impl Default for AnalyticsSettings {
    fn default() -> Self {
        AnalyticsSettings {
            window_secs: 60,
            allowed_lateness_secs: 30,
            results_url: None,
            instance_id: None,
        }
    }
}

impl Settings {
    /// Loads defaults, then `file` (or `./mercato.toml` if present), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::figment(file)
            .extract()
            .map_err(|e| ConfigError(Box::new(e)))
    }

    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        figment = match file {
            Some(path) => figment.merge(Toml::file_exact(path)),
            None => figment.merge(Toml::file("mercato.toml")),
        };
        figment
            .merge(Env::raw().filter_map(|key| {
                SEED_ENV
                    .iter()
                    .find(|(name, _)| key.as_str().eq_ignore_ascii_case(name))
                    .map(|(_, path)| (*path).into())
            }))
            // MERCATO_CONFIG names the file (read by the command line), it is not a setting.
            .merge(Env::prefixed("MERCATO_").split("__").ignore(&["config"]))
    }

    /// The storage URL of a service: its own, else its seed table (`dynamodb://TABLE`), else
    /// the shared one, else a SQLite file.
    pub fn database_url(&self, service: &ServiceSettings, name: &str) -> String {
        let table = match name {
            "orders" => self.tables.orders.as_ref(),
            "payments" => self.tables.payments.as_ref(),
            "notifications" => self.tables.notifications.as_ref(),
            _ => None,
        };
        let seed_table = table.map(|table| match &self.aws_region {
            Some(region) => format!("dynamodb://{table}?region={region}"),
            None => format!("dynamodb://{table}"),
        });
        service
            .database_url
            .clone()
            .or(seed_table)
            .or_else(|| self.default_database_url.clone())
            .unwrap_or_else(|| {
                format!(
                    "sqlite://{}",
                    self.data_dir.join(format!("{name}.db")).display()
                )
            })
    }

    pub fn bus_url(&self) -> String {
        self.bus
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("bus.db").display()))
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
mod tests {
    use super::*;

    #[test]
    fn limits_are_read_exactly_and_checked() {
        figment::Jail::expect_with(|jail| {
            let defaults = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(defaults.limits.max_price.cents(), 100_000_000);
            assert_eq!(defaults.limits.max_order_total.cents(), 500_000_000);
            assert_eq!(defaults.limits.validate(), Ok(()));
            assert_eq!(defaults.saga.validate(), Ok(()));
            let mut short = defaults.saga.clone();
            short.reservation_retention_hours = 24;
            assert!(short.validate().is_err(), "as long as a hold may last");
            jail.create_file(
                "mercato.toml",
                "[limits]\nmax_price = 2500.5\nmax_order_total = 100000\nmax_line_quantity = 0\n",
            )?;
            jail.set_env("MERCATO_LIMITS__MAX_PRICE", "\"1999.99\"");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.limits.max_price.cents(), 199_999, "env beats file");
            assert_eq!(s.limits.max_order_total.cents(), 10_000_000);
            assert!(s.limits.validate().is_err(), "no order could hold a unit");
            jail.set_env("MERCATO_LIMITS__MAX_PRICE", "1.234");
            assert!(Settings::load(None).is_err(), "not a sum of money");
            Ok(())
        });
    }

    #[test]
    fn trusted_proxies_come_from_the_environment_as_the_eks_overlay_writes_them() {
        figment::Jail::expect_with(|jail| {
            // deploy/k8s/overlays/aws-eks/settings.env's line, as written there.
            jail.set_env("MERCATO_RATE_LIMIT__TRUSTED_PROXIES", r#"["10.0.0.0/16"]"#);
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.rate_limit.trusted_proxies, vec!["10.0.0.0/16".to_owned()]);
            Ok(())
        });
    }

    #[test]
    fn layers_apply_in_order() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "mercato.toml",
                "demo = false\n[orders]\nport = 9100\n[users]\nport = 9101\n",
            )?;
            jail.set_env("MERCATO_ORDERS__PORT", "9200");
            jail.set_env("MERCATO_CONFIG", "mercato.toml");
            jail.set_env("DATABASE_URL", "postgres://db/mercato");
            jail.set_env("SQS_QUEUE_URL", "http://localhost:4566/000/q");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert!(!s.demo);
            assert_eq!(s.orders.port, 9200, "env beats file");
            assert_eq!(s.users.port, 9101, "file beats default");
            assert_eq!(s.products.port, 8002, "default");
            assert_eq!(s.database_url(&s.users, "users"), "postgres://db/mercato");
            assert_eq!(
                s.bus.queue_url.as_deref(),
                Some("http://localhost:4566/000/q")
            );
            Ok(())
        });
    }

    #[test]
    fn the_seed_tables_put_their_services_on_dynamodb() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "postgres://db/mercato");
            jail.set_env("ORDERS_TABLE", "prod-orders");
            jail.set_env("PAYMENTS_TABLE", "prod-payments");
            jail.set_env("AWS_REGION", "ap-south-1");
            jail.set_env("MERCATO_PAYMENTS__DATABASE_URL", "postgres://db/payments");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                s.database_url(&s.orders, "orders"),
                "dynamodb://prod-orders?region=ap-south-1"
            );
            assert_eq!(
                s.database_url(&s.payments, "payments"),
                "postgres://db/payments",
                "a service's own url wins"
            );
            assert_eq!(
                s.database_url(&s.notifications, "notifications"),
                "postgres://db/mercato",
                "no table named: the shared url"
            );
            assert_eq!(s.database_url(&s.users, "users"), "postgres://db/mercato");
            Ok(())
        });
    }

    #[test]
    fn external_issuers_come_from_one_environment_variable() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "MERCATO_AUTH__ISSUERS",
                r#"[{issuer="https://cognito-idp.ap-south-1.amazonaws.com/ap-south-1_abc", jwks_url="https://cognito-idp.ap-south-1.amazonaws.com/ap-south-1_abc/.well-known/jwks.json", audience="client123", audience_claim="client_id", roles_claim="cognito:groups"}]"#,
            );
            jail.set_env("MERCATO_AUTH__MODE", "open");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.auth.mode, AuthMode::Open);
            assert_eq!(s.auth.issuers.len(), 1);
            let cognito = &s.auth.issuers[0];
            assert_eq!(cognito.audience, "client123");
            assert_eq!(cognito.audience_claim, "client_id");
            assert_eq!(cognito.roles_claim, "cognito:groups");
            assert_eq!(cognito.admin_roles, vec!["admin".to_owned()]);
            assert_eq!(format!("{:?}", Secret("hunter2".into())), "Secret(..)");
            Ok(())
        });
    }

    #[test]
    fn payments_keys_sit_beside_the_service_keys() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "mercato.toml",
                "environment = \"production\"\n[payments]\nport = 9104\nprovider = \"stripe\"\n\
                 [payments.stripe]\nsecret_key_file = \"/run/secrets/stripe\"\n",
            )?;
            jail.set_env("MERCATO_PAYMENTS__DATABASE_URL", "postgres://db/payments");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.environment, "production");
            assert_eq!(s.payments.port, 9104);
            assert_eq!(s.payments.provider, PaymentProvider::Stripe);
            assert_eq!(
                s.payments.stripe.secret_key_file.as_deref(),
                Some(Path::new("/run/secrets/stripe"))
            );
            assert_eq!(s.payments.stripe.api_base, "https://api.stripe.com");
            assert_eq!(
                s.database_url(&s.payments, "payments"),
                "postgres://db/payments"
            );
            assert_eq!(Settings::default().environment, "development");
            assert_eq!(Settings::default().payments.port, 8004);
            Ok(())
        });
    }

    #[test]
    fn faults_are_allowed_by_setting_or_by_environment() {
        figment::Jail::expect_with(|jail| {
            assert_eq!(
                Settings::load(None)
                    .map_err(|e| e.to_string())?
                    .faults
                    .allowed,
                None
            );
            jail.set_env("MERCATO_FAULTS__ALLOWED", "true");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.faults.allowed, Some(true));
            jail.create_file("mercato.toml", "[faults]\nallowd = true\n")?;
            assert!(Settings::load(None).is_err(), "a typo is refused");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("mercato.toml", "[orders]\nprot = 1\n")?;
            assert!(Settings::load(None).is_err());
            jail.create_file("mercato.toml", "[payments]\nprovder = \"stripe\"\n")?;
            assert!(Settings::load(None).is_err(), "in [payments] too");
            Ok(())
        });
    }
}
