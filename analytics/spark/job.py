"""Mercato order analytics as a PySpark Structured Streaming job (the seed's Dataproc job).

Reads order events (the seed's JSON, one per message or line) from the Kafka `orders` topic,
or from files (`--source file`, for backfills and for the parity test against
`mercato analytics replay`), and computes per tumbling event-time window (1 minute, 30 s
watermark by default): order count, unique users, revenue, average order value, items sold
and events per type. Every window is written once, when the watermark has passed its end, to
the `analytics-results` Kafka topic (key: window_start) and/or to files (local path or gs://)
as JSON lines.

    python job.py --source file --input events.jsonl --output out/ --master 'local[2]'
    spark-submit --packages org.apache.spark:spark-sql-kafka-0-10_2.12:3.5.1 job.py \
        --source kafka --output gs://BUCKET/analytics/windows --checkpoint gs://BUCKET/analytics/checkpoint

Rules, the same as Mercato's analytics engine:
- Money is exact: `total_amount` is parsed as DECIMAL(19,2) from the JSON number's text (room
  for Mercato's largest amount, 92233720368547758.07) and summed as a decimal, which goes past
  64-bit cents as Mercato's 128-bit window sums do; the average is revenue cents / orders
  rounded half-even to the cent in exact decimal arithmetic.
- Only `order.created` events are orders (count, revenue, users, items); every event counts in
  `event_counts` under its type.
- An event is applied once: duplicates are dropped by its id, which is, as in Mercato's
  decoder (bus::event::order): `event_id`; else the seed's `id` when it is a UUID other than
  the order id (the seed's order service published events without `event_id`); else, for
  Kafka, the CloudEvents `ce_id` header; failing all, a hash of the message's text without
  surrounding whitespace, so an exactly duplicated line counts once.
- Event times are `created_at`: RFC 3339 with any offset, or naive ISO 8601 as the seed wrote
  it (`2024-01-01T10:00:00.123456`), read as UTC (the session time zone).
- `unique_users` is exact (the set of buyers per open window, held in the state store until
  the watermark closes the window); `unique_users_estimate` is Spark's HyperLogLog++
  (`approx_count_distinct`, relative standard deviation `--rsd`). With `--unique-users approx`
  the exact set is not kept and both fields carry the estimate (for windows with millions of
  buyers). See README.md for why.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

# Every event type Mercato publishes on `orders` (bus::event::types); others count as "other".
EVENT_TYPES = (
    "order.created",
    "order.paid",
    "order.cancelled",
    "order.refunded",
    "payment.succeeded",
    "payment.failed",
    "payment.refunded",
)
ORDER_CREATED = "order.created"
# A UUID as Python's str(uuid.uuid4()) writes it: only then is the seed's `id` an event id.
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
# What Rust's trim_ascii removes: the body hash must be taken over the same text as Mercato's.
EDGE_WHITESPACE = r"^[ \t\n\f\r]+|[ \t\n\f\r]+$"
# The event time of the end-of-input marker a finite (file) run feeds last: past every window,
# so the watermark passes every window and append mode emits the ones still open.
END_OF_INPUT_TIME = "9999-12-31T23:59:00Z"
END_OF_INPUT_TYPE = "__end_of_input__"
SASL_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}
_UNITS = {
    "second": 1, "seconds": 1, "sec": 1, "secs": 1, "s": 1,
    "minute": 60, "minutes": 60, "min": 60, "mins": 60, "m": 60,
    "hour": 3600, "hours": 3600, "h": 3600,
}


class ConfigError(ValueError):
    """A setting is missing or malformed: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# Pure parts (unit tested without a JVM)
# ---------------------------------------------------------------------------------------------

def duration_seconds(text: str) -> int:
    """'1 minute', '30 seconds', '90s', '2 hours' -> seconds (whole, positive)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]+)\s*", text)
    if not match or match.group(2).lower() not in _UNITS or int(match.group(1)) <= 0:
        raise ConfigError(f"not a duration: {text!r} (say '1 minute' or '30 seconds')")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def window_type(window: str) -> str:
    """The seed's `window_type`: `tumbling_1m`, or `tumbling_<n>s` when not whole minutes."""
    secs = duration_seconds(window)
    return f"tumbling_{secs // 60}m" if secs % 60 == 0 else f"tumbling_{secs}s"


def _jaas_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def kafka_options(
    bootstrap_servers: str | None,
    security_protocol: str,
    sasl_mechanism: str,
    api_key: str | None,
    api_secret: str | None,
) -> dict[str, str]:
    """The `kafka.*` options shared by the source and the sink (the seed's SASL_SSL settings)."""
    if not bootstrap_servers:
        raise ConfigError("KAFKA_BOOTSTRAP_SERVERS (or --bootstrap-servers) is required for --source kafka")
    protocol = security_protocol.upper()
    options = {"kafka.bootstrap.servers": bootstrap_servers, "kafka.security.protocol": protocol}
    if protocol.startswith("SASL"):
        mechanism = sasl_mechanism.upper()
        if mechanism not in SASL_MODULES:
            raise ConfigError(f"KAFKA_SASL_MECHANISM {sasl_mechanism!r} is not one of {sorted(SASL_MODULES)}")
        if not api_key or not api_secret:
            raise ConfigError(
                f"{protocol} needs KAFKA_API_KEY and KAFKA_API_SECRET (environment, or Secret Manager "
                "via --kafka-api-key-secret / --kafka-api-secret-secret)"
            )
        options["kafka.sasl.mechanism"] = mechanism
        options["kafka.sasl.jaas.config"] = (
            f"{SASL_MODULES[mechanism]} required username={_jaas_quote(api_key)} password={_jaas_quote(api_secret)};"
        )
    return options


def secret_version_name(name: str) -> str:
    """`projects/P/secrets/S` -> `projects/P/secrets/S/versions/latest`; a version is kept."""
    if not re.fullmatch(r"projects/[^/]+/secrets/[^/]+(/versions/[^/]+)?", name):
        raise ConfigError(f"not a Secret Manager name: {name!r} (projects/PROJECT/secrets/NAME[/versions/V])")
    return name if "/versions/" in name else name + "/versions/latest"


Opener = Callable[[urllib.request.Request], "object"]


def access_secret(name: str, urlopen: Opener = urllib.request.urlopen) -> str:
    """A secret's payload from Secret Manager, authenticated as the VM's (or batch's) service
    account through the metadata server: no client library needed on the Dataproc image, and
    the secret never appears in the job's arguments or properties."""
    token_req = urllib.request.Request(
        "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token",
        headers={"Metadata-Flavor": "Google"},
    )
    with urlopen(token_req) as response:
        token = json.load(response)["access_token"]
    req = urllib.request.Request(
        f"https://secretmanager.googleapis.com/v1/{secret_version_name(name)}:access",
        headers={"Authorization": f"Bearer {token}"},
    )
    with urlopen(req) as response:
        return base64.b64decode(json.load(response)["payload"]["data"]).decode("utf-8")


def resolve_credentials(args: argparse.Namespace, env: Mapping[str, str], fetch=access_secret) -> tuple[str | None, str | None]:
    """KAFKA_API_KEY / KAFKA_API_SECRET from the environment, else from Secret Manager."""
    key = env.get("KAFKA_API_KEY") or (fetch(args.kafka_api_key_secret) if args.kafka_api_key_secret else None)
    secret = env.get("KAFKA_API_SECRET") or (
        fetch(args.kafka_api_secret_secret) if args.kafka_api_secret_secret else None
    )
    return key, secret


def kafka_package(spark_version: str, scala: str = "2.12") -> str:
    """The Maven coordinate of Spark's Kafka connector for this Spark."""
    return f"org.apache.spark:spark-sql-kafka-0-10_{scala}:{spark_version}"


def half_even_cents(cents: int, count: int) -> int:
    """Reference for the Spark expression in `window_metrics`: cents / count rounded half-even
    (what kit::Money::div_round does); 0 for an empty window."""
    if count <= 0:
        return 0
    q, r = divmod(cents, count)
    if 2 * r > count or (2 * r == count and q % 2 == 1):
        q += 1
    return q


def parse_args(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> argparse.Namespace:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(prog="job.py", description="Mercato order analytics (Spark Structured Streaming)")
    p.add_argument("--source", choices=("kafka", "file"), default="kafka")
    p.add_argument("--input", help="file source: a JSON-lines file, directory or glob (local, gs://)")
    p.add_argument("--output", help="where window JSON lines go (local path or gs://); one directory per micro-batch")
    p.add_argument("--checkpoint", help="checkpoint location (default: OUTPUT/_checkpoint; required without --output)")
    p.add_argument("--window", default="1 minute", help="tumbling window size (default: 1 minute)")
    p.add_argument("--watermark", default="30 seconds", help="allowed lateness (default: 30 seconds)")
    p.add_argument("--unique-users", choices=("exact", "approx"), default="exact",
                   help="exact: the set of buyers per open window (default); approx: HyperLogLog++ only")
    p.add_argument("--rsd", type=float, default=0.01, help="relative standard deviation of the HyperLogLog++ estimate")
    p.add_argument("--trigger-once", action="store_true",
                   help="process what is available now, then stop (availableNow; the default for --source file)")
    p.add_argument("--trigger-interval", default="10 seconds", help="micro-batch interval of a continuous run")
    p.add_argument("--no-drain", action="store_true",
                   help="file source: leave the last windows open at end of input (by default they are closed and written, as replay does)")
    # Kafka
    p.add_argument("--bootstrap-servers", default=env.get("KAFKA_BOOTSTRAP_SERVERS"))
    p.add_argument("--security-protocol", default=env.get("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"))
    p.add_argument("--sasl-mechanism", default=env.get("KAFKA_SASL_MECHANISM", "PLAIN"))
    p.add_argument("--kafka-api-key-secret", default=env.get("KAFKA_API_KEY_SECRET"),
                   help="Secret Manager name of the API key, used when KAFKA_API_KEY is not set")
    p.add_argument("--kafka-api-secret-secret", default=env.get("KAFKA_API_SECRET_SECRET"),
                   help="Secret Manager name of the API secret, used when KAFKA_API_SECRET is not set")
    p.add_argument("--topic", default=env.get("KAFKA_ORDERS_TOPIC", "orders"))
    p.add_argument("--results-topic", default=env.get("KAFKA_RESULTS_TOPIC", "analytics-results"),
                   help="Kafka topic for window results ('' to not publish)")
    p.add_argument("--starting-offsets", default="latest", help="first run only: earliest | latest | JSON")
    p.add_argument("--max-offsets-per-trigger", type=int)
    # Spark
    p.add_argument("--master", help="e.g. local[2]; default: whatever spark-submit / Dataproc sets")
    p.add_argument("--shuffle-partitions", type=int, help="spark.sql.shuffle.partitions (fixed by the first run's checkpoint)")
    p.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE", help="extra Spark setting (repeatable)")
    p.add_argument("--log-level", default="WARN")
    args = p.parse_args(argv)

    duration_seconds(args.window)
    duration_seconds(args.watermark)
    if not 0.001 <= args.rsd <= 0.39:
        raise ConfigError("--rsd must be between 0.001 and 0.39")
    for item in args.conf:
        if "=" not in item:
            raise ConfigError(f"--conf {item!r}: expected KEY=VALUE")
    if args.source == "file":
        if not args.input:
            raise ConfigError("--source file needs --input")
        args.trigger_once = True
    if not args.output and not args.results_topic:
        raise ConfigError("nowhere to write: give --output and/or --results-topic")
    if args.source == "file" and not args.output:
        raise ConfigError("--source file needs --output")
    if args.source == "kafka" and not args.checkpoint:
        raise ConfigError("--source kafka needs --checkpoint (e.g. gs://BUCKET/analytics/checkpoint)")
    if not args.checkpoint:
        args.checkpoint = args.output.rstrip("/") + "/_checkpoint"
    if args.source == "file":
        args.results_topic = args.results_topic if args.bootstrap_servers else ""
    return args


@dataclass
class RunReport:
    lines: int = 0
    events: int = 0
    batches: int = 0
    windows_written: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (f"job: {self.lines} lines, {self.events} events (duplicates included), "
                f"{self.windows_written} windows written in {self.batches} micro-batches, "
                f"{self.seconds:.1f} s of streaming")


# ---------------------------------------------------------------------------------------------
# Spark parts
# ---------------------------------------------------------------------------------------------

def event_schema():
    from pyspark.sql import types as T

    # Only what the metrics and the event id need; unknown fields (items, status, ...) are
    # ignored. created_at is read as text and cast, so any RFC 3339 offset is honoured and a
    # naive time (the seed's) is taken in the session's time zone, UTC.
    return T.StructType([
        T.StructField("event_id", T.StringType()),
        T.StructField("id", T.StringType()),
        T.StructField("event_type", T.StringType()),
        T.StructField("order_id", T.StringType()),
        T.StructField("user_id", T.StringType()),
        T.StructField("total_amount", T.DecimalType(19, 2)),
        T.StructField("items_count", T.LongType()),
        T.StructField("created_at", T.StringType()),
    ])


def build_session(args: argparse.Namespace):
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("mercato-order-analytics")
    if args.master:
        builder = builder.master(args.master)
    builder = builder.config("spark.sql.session.timeZone", "UTC")
    if args.shuffle_partitions:
        builder = builder.config("spark.sql.shuffle.partitions", str(args.shuffle_partitions))
    for item in args.conf:
        key, value = item.split("=", 1)
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(args.log_level)
    return spark


def _scala_version(spark) -> str:
    full = spark.sparkContext._jvm.scala.util.Properties.versionNumberString()  # e.g. 2.12.18
    return ".".join(full.split(".")[:2])


def _hadoop_path(spark, path: str):
    jvm = spark.sparkContext._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    return hpath, hpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())


def single_file_glob(qualified: str) -> str:
    """`dir/name` -> `dir/{name}`: a glob matching just that file. The file stream source
    lists directories and globs, not plain files."""
    parent, _, name = qualified.rpartition("/")
    return f"{parent}/{{{name}}}"


def stream_path(spark, path: str) -> str:
    if any(c in path for c in "*?[]{}\\,"):
        return path
    hpath, fs = _hadoop_path(spark, path)
    return single_file_glob(fs.makeQualified(hpath).toString()) if fs.isFile(hpath) else path


def end_of_input_dir(args: argparse.Namespace) -> str:
    return args.checkpoint.rstrip("/") + "/end-of-input"


def read_raw(spark, args: argparse.Namespace, kafka: dict[str, str] | None):
    """A stream of (value: the event's JSON text, header_id: CloudEvents ce_id or null)."""
    from pyspark.sql import functions as F

    if args.source == "kafka":
        reader = spark.readStream.format("kafka").options(**kafka)
        reader = (reader.option("subscribe", args.topic)
                  .option("startingOffsets", args.starting_offsets)
                  .option("includeHeaders", "true")
                  .option("failOnDataLoss", "false"))
        if args.max_offsets_per_trigger:
            reader = reader.option("maxOffsetsPerTrigger", str(args.max_offsets_per_trigger))
        return kafka_values(reader.load())
    data = spark.readStream.text(stream_path(spark, args.input))
    if args.no_drain:
        raw = data
    else:
        # A finite run ends with a marker from this directory (see `drain`); it is empty
        # until the input has been consumed.
        marker_dir = end_of_input_dir(args)
        hpath, fs = _hadoop_path(spark, marker_dir)
        fs.mkdirs(hpath)
        raw = data.unionByName(spark.readStream.text(marker_dir))
    return raw.select(F.col("value"), F.lit(None).cast("string").alias("header_id"))


def kafka_values(records):
    """Kafka records (value: binary, headers: array<key, value>) -> (value, header_id): the
    message text and its CloudEvents `ce_id` header (Mercato's event id), if any."""
    from pyspark.sql import functions as F

    ce_id = F.filter(F.col("headers"), lambda h: h.getField("key") == "ce_id")
    return records.select(
        F.col("value").cast("string").alias("value"),
        F.when(F.size(ce_id) > 0, ce_id.getItem(0).getField("value").cast("string")).alias("header_id"),
    )


def parse_events(raw):
    """Typed events with `event_time`; lines that are not events (no type or time) are dropped."""
    from pyspark.sql import functions as F

    parsed = raw.select(F.from_json(F.col("value"), event_schema()).alias("e"), F.col("header_id"), F.col("value"))
    # The seed's `id`, lower-cased as Mercato writes UUIDs, unless it is the order's own id
    # (which every event of the order would share).
    seed_id = F.lower(F.col("e.id"))
    seed_id = F.when(
        F.col("e.id").rlike(UUID_PATTERN) & (seed_id != F.lower(F.coalesce(F.col("e.order_id"), F.lit("")))),
        seed_id,
    )
    body_hash = F.sha2(F.regexp_replace(F.col("value"), EDGE_WHITESPACE, ""), 256)
    return parsed.select(
        # coalesce evaluates lazily: the hash is computed only for events without an id.
        F.coalesce(F.col("e.event_id"), seed_id, F.col("header_id"), body_hash).alias("event_id"),
        F.col("e.event_type").alias("event_type"),
        F.col("e.user_id").alias("user_id"),
        F.col("e.total_amount").alias("total_amount"),
        F.col("e.items_count").alias("items_count"),
        F.col("e.created_at").cast("timestamp").alias("event_time"),
    ).where(F.col("event_type").isNotNull() & F.col("event_time").isNotNull())


def window_metrics(events, window: str, watermark: str, unique_users: str = "exact", rsd: float = 0.01):
    """Per-window figures, in the output's shape (window_start ... window_type)."""
    from pyspark.sql import functions as F

    end_marker = F.to_timestamp(F.lit(END_OF_INPUT_TIME))
    # The marker moves the watermark, then goes: the filter names event_time, so the optimiser
    # cannot push it below the watermark node.
    deduped = (events.withWatermark("event_time", watermark)
               .where(~((F.col("event_type") == END_OF_INPUT_TYPE) & (F.col("event_time") >= end_marker)))
               .dropDuplicates(["event_id", "event_time"]))
    is_order = F.col("event_type") == ORDER_CREATED
    buyer = F.when(is_order, F.col("user_id"))
    aggregates = [
        F.count(F.when(is_order, 1)).alias("order_count"),
        F.sum(F.when(is_order, F.col("total_amount"))).alias("revenue"),
        F.sum(F.when(is_order, F.col("items_count"))).alias("items"),
        F.approx_count_distinct(buyer, rsd).alias("unique_users_estimate"),
    ]
    if unique_users == "exact":
        aggregates.append(F.size(F.collect_set(buyer)).alias("unique_users"))
    aggregates += [F.count(F.when(F.col("event_type") == t, 1)).alias(f"n_{i}") for i, t in enumerate(EVENT_TYPES)]
    aggregates.append(F.count(F.when(~F.col("event_type").isin(*EVENT_TYPES), 1)).alias("n_other"))
    agg = deduped.groupBy(F.window("event_time", window).alias("w")).agg(*aggregates)

    # Integer cents as a decimal (exact: revenue has two decimals; a long would overflow where
    # two of the largest orders meet in a window), then the average rounded half-even like
    # analytics::revenue::Revenue::average. The quotient's floor is corrected by the remainder's
    # sign: decimal division rounds its last digit, which could carry it to the next integer.
    agg = (agg.withColumn("cents", (F.coalesce(F.col("revenue"), F.lit(0)) * 100).cast("decimal(30,0)"))
           .withColumn("q0", F.expr("IF(order_count = 0, 0, FLOOR(cents / order_count))"))
           .withColumn("r0", F.expr("IF(order_count = 0, 0, cents - q0 * order_count)"))
           .withColumn("q", F.expr("IF(r0 < 0, q0 - 1, q0)"))
           .withColumn("r", F.expr("IF(r0 < 0, r0 + order_count, r0)")))
    n, q, r = F.col("order_count"), F.col("q"), F.col("r")
    avg_cents = F.when((2 * r > n) | ((2 * r == n) & (q % 2 == 1)), q + 1).otherwise(q)
    cents = F.col("cents")
    # Exact cents: multiplying by 0.01 only moves the decimal point.
    to_money = lambda c: (c.cast("decimal(36,0)") * F.lit(0.01).cast("decimal(2,2)")).cast("decimal(38,2)")  # noqa: E731
    counts = F.create_map(*[x for i, t in enumerate(EVENT_TYPES) for x in (F.lit(t), F.col(f"n_{i}"))],
                          F.lit("other"), F.col("n_other"))
    iso = "yyyy-MM-dd'T'HH:mm:ss'Z'"
    users = F.col("unique_users") if unique_users == "exact" else F.col("unique_users_estimate")
    return agg.select(
        F.date_format(F.col("w.start"), iso).alias("window_start"),
        F.date_format(F.col("w.end"), iso).alias("window_end"),
        F.col("order_count"),
        users.alias("unique_users"),
        F.col("unique_users_estimate"),
        to_money(cents).alias("total_revenue"),
        to_money(avg_cents).alias("avg_order_value"),
        F.coalesce(F.col("items"), F.lit(0)).cast("long").alias("items_sold"),
        F.map_filter(counts, lambda _k, v: v > 0).alias("event_counts"),
        F.date_format(F.current_timestamp(), "yyyy-MM-dd'T'HH:mm:ss.SSS'Z'").alias("processed_at"),
        F.lit("order_metrics").alias("metric_type"),
        F.lit(window_type(window)).alias("window_type"),
    )


def batch_writer(args: argparse.Namespace, kafka: dict[str, str] | None, report: RunReport):
    """foreachBatch: each window as one JSON object, to files (`OUTPUT/batch_id=N/part-*.json`)
    and to Kafka (key: window_start). A batch replayed after a failure overwrites its own
    directory, so files hold each window once; Kafka gets it at least once."""
    from pyspark.sql import functions as F

    def write(batch, batch_id: int) -> None:
        batch = batch.persist()  # computed once, written twice
        try:
            rows = batch.count()
            if rows == 0:
                return
            if args.output:
                (batch.coalesce(1).write.mode("overwrite")
                 .json(f"{args.output.rstrip('/')}/batch_id={batch_id:08d}"))
            if args.results_topic:
                (batch.select(F.col("window_start").alias("key"),
                              F.to_json(F.struct(*[F.col(c) for c in batch.columns])).alias("value"))
                 .write.format("kafka").options(**kafka).option("topic", args.results_topic).save())
            report.windows_written += rows
        finally:
            batch.unpersist()

    return write


def run_query(spark, args: argparse.Namespace, kafka, report: RunReport) -> None:
    from pyspark.sql import functions as F

    raw = read_raw(spark, args, kafka)
    # Counted as they stream by (the end-of-input marker is not a line of the input).
    raw = raw.observe("lines", F.count(F.when(~F.col("value").contains(END_OF_INPUT_TYPE), 1)).alias("n"))
    events = parse_events(raw)
    events = events.observe("events", F.count(F.when(F.col("event_type") != END_OF_INPUT_TYPE, 1)).alias("n"))
    metrics = window_metrics(events, args.window, args.watermark, args.unique_users, args.rsd)
    writer = (metrics.writeStream.outputMode("append")
              .option("checkpointLocation", args.checkpoint)
              .queryName("order_metrics")
              .foreachBatch(batch_writer(args, kafka, report)))
    writer = writer.trigger(availableNow=True) if args.trigger_once else writer.trigger(processingTime=args.trigger_interval)
    query = writer.start()
    try:
        query.awaitTermination()
    finally:
        if query.isActive:
            query.stop()
    for progress in query.recentProgress:
        observed = progress.get("observedMetrics", {})
        report.lines += int(observed.get("lines", {}).get("n", 0))
        report.events += int(observed.get("events", {}).get("n", 0))
        report.batches += 1
        if os.environ.get("MERCATO_SPARK_PROGRESS"):
            print(json.dumps({"batch": progress["batchId"], "durationMs": progress["durationMs"]}), file=sys.stderr)


def drain(spark, args: argparse.Namespace) -> None:
    """End of a finite input: write the marker the next run of the query reads last."""
    hpath, fs = _hadoop_path(spark, end_of_input_dir(args) + "/end-of-input.json")
    marker = json.dumps({"event_id": "end-of-input", "event_type": END_OF_INPUT_TYPE, "created_at": END_OF_INPUT_TIME})
    stream = fs.create(hpath, True)
    try:
        stream.write(bytearray((marker + "\n").encode()))
    finally:
        stream.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        kafka = None
        if args.source == "kafka" or args.results_topic:
            key, secret = resolve_credentials(args, os.environ)
            kafka = kafka_options(args.bootstrap_servers, args.security_protocol, args.sasl_mechanism, key, secret)
    except ConfigError as e:
        print(f"job.py: {e}", file=sys.stderr)
        return 2
    spark = build_session(args)
    report = RunReport()
    started = time.monotonic()
    try:
        try:
            run_query(spark, args, kafka, report)
        except Exception as e:  # noqa: BLE001 - only to name the missing package
            if "kafka" in str(e) and ("DATA_SOURCE_NOT_FOUND" in str(e) or "Failed to find data source" in str(e)):
                print(f"job.py: the Kafka source/sink is not on the classpath: add {kafka_package(spark.version, _scala_version(spark))} "
                      "(spark-submit --packages, or --conf spark.jars.packages=...)", file=sys.stderr)
                return 2
            raise
        if args.source == "file" and not args.no_drain:
            # The input has been consumed: the marker's far-future event time moves the
            # watermark past every window, and the next run writes the windows still open.
            drain(spark, args)
            run_query(spark, args, kafka, report)
        report.seconds = time.monotonic() - started
        print(report.line(), flush=True)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
