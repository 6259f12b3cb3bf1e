"""The job's Spark expressions on a handful of events (local[1], a batch DataFrame through the
same functions the stream uses): exact money, half-even average, dedup, event types."""

import json
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import job  # noqa: E402


def event(event_type="order.created", user="u1", amount="10.00", at="2026-11-24T10:00:05Z", event_id=None, items=1):
    text = (f'{{"event_type":"{event_type}","order_id":"o","user_id":"{user}","total_amount":{amount},'
            f'"status":"pending","items_count":{items},"created_at":"{at}","items":[]}}')
    if event_id:
        text = text[:-1] + f',"event_id":"{event_id}"}}'
    return text


class SparkRules(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        args = job.parse_args(["--source", "file", "--input", "x", "--output", "y", "--master", "local[1]",
                               "--shuffle-partitions", "1", "--conf", "spark.ui.enabled=false",
                               "--conf", "spark.ui.showConsoleProgress=false", "--log-level", "ERROR"], env={})
        cls.spark = job.build_session(args)

    @classmethod
    def tearDownClass(cls):
        cls.spark.stop()

    def windows(self, lines, unique_users="exact"):
        raw = self.spark.createDataFrame([(line, None) for line in lines], "value string, header_id string")
        out = job.window_metrics(job.parse_events(raw), "1 minute", "30 seconds", unique_users, 0.01)
        rows = out.select(job_to_json(out)).collect()
        return {r["window_start"]: r for r in (json.loads(x[0]) for x in rows)}

    def test_rules(self):
        # One query over every case (a Spark query costs seconds); each case has its own hour.
        no_id = event(user="u3", amount="0.10", at="2026-11-24T10:00:30Z")
        lines = [
            event(amount="10.00", event_id="a"),
            event(amount="10.00", event_id="a"),  # redelivered: once
            event(user="u2", amount="20.01", at="2026-11-24T15:30:50+05:30", event_id="b", items=2),  # 10:00:50Z
            no_id, no_id,  # the same line twice, no id: once
            event(user="u3", amount="0.20", at="2026-11-24T10:00:31Z"),  # another line, no id
            event("order.paid", user="u9", amount="99.99", event_id="c"),  # not an order
            event("order.shipped", event_id="d"),  # unknown type: "other"
            "not json", '{"event_type":"order.created"}',  # no time: dropped
            event("order.cancelled", at="2026-11-24T10:01:00Z", event_id="e"),  # a window with no order
            # averages that fall on half a cent round to the even cent
            event(amount="10.00", at="2026-11-24T11:00:00Z", event_id="x1"),
            event(user="u2", amount="20.01", at="2026-11-24T11:00:01Z", event_id="y1"),  # 1500.5 -> 1500
            event(amount="10.00", at="2026-11-24T12:00:00Z", event_id="x2"),
            event(user="u2", amount="20.03", at="2026-11-24T12:00:01Z", event_id="y2"),  # 1501.5 -> 1502
            # sums past 64-bit cents stay exact (two of the largest amount an order can carry)
            event(amount="92233720368547758.07", at="2026-11-24T13:00:00Z", event_id="h1"),
            event(user="u2", amount="92233720368547758.07", at="2026-11-24T13:00:01Z", event_id="h2"),
            event(user="u3", amount="0.01", at="2026-11-24T13:00:02Z", event_id="h3"),
        ]
        w = self.windows(lines)
        self.assertEqual(sorted(w), ["2026-11-24T10:00:00Z", "2026-11-24T10:01:00Z",
                                     "2026-11-24T11:00:00Z", "2026-11-24T12:00:00Z", "2026-11-24T13:00:00Z"])
        first = w["2026-11-24T10:00:00Z"]
        self.assertEqual(first["window_end"], "2026-11-24T10:01:00Z")
        self.assertEqual((first["order_count"], first["unique_users"], first["items_sold"]), (4, 3, 5))
        self.assertEqual(first["total_revenue"], "30.31")
        self.assertEqual(first["avg_order_value"], "7.58")  # 757.75 cents -> 758
        self.assertEqual(first["event_counts"], {"order.created": 4, "order.paid": 1, "other": 1})
        self.assertEqual(first["unique_users_estimate"], 3)
        self.assertEqual((first["metric_type"], first["window_type"]), ("order_metrics", "tumbling_1m"))
        empty = w["2026-11-24T10:01:00Z"]
        self.assertEqual((empty["order_count"], empty["unique_users"], empty["total_revenue"], empty["avg_order_value"]),
                         (0, 0, "0.00", "0.00"))
        self.assertEqual(w["2026-11-24T11:00:00Z"]["avg_order_value"], "15.00")
        self.assertEqual(w["2026-11-24T12:00:00Z"]["avg_order_value"], "15.02")
        huge = w["2026-11-24T13:00:00Z"]
        self.assertEqual(huge["total_revenue"], "184467440737095516.15")
        self.assertEqual(huge["avg_order_value"], "61489146912365172.05")  # 18446744073709551615 / 3

    def test_kafka_records_use_the_ce_id_header_when_the_body_has_no_id(self):
        schema = "value binary, headers array<struct<key: string, value: binary>>"
        body = event(amount="1.00").encode()
        records = self.spark.createDataFrame([
            (body, [("ce_type", b"order.created"), ("ce_id", b"id-1")]),
            (body, [("ce_id", b"id-1")]),  # redelivered: once
            (body, [("ce_id", b"id-2")]),  # same body, another event: counted
            (event(amount="2.00", event_id="in-body").encode(), [("ce_id", b"id-1")]),  # the body's id wins
            (event(amount="4.00").encode(), None),  # no header at all: content hash
        ], schema)
        out = job.window_metrics(job.parse_events(job.kafka_values(records)), "1 minute", "30 seconds")
        w = json.loads(out.select(job_to_json(out)).collect()[0][0])
        self.assertEqual((w["order_count"], w["total_revenue"]), (4, "8.00"))

    def test_seed_shaped_events(self):
        # The seed's order service: `id` instead of `event_id`, naive times (UTC), `price`,
        # no currency; amounts as numbers or strings. The same id rule as Mercato's decoder.
        order = "5eed0000-0000-4000-8000-000000000001"

        def seed(event_type="order.created", seed_id="5eed0000-0000-4000-8000-00000000e001", amount="1999.99",
                 at="2024-01-01T10:00:00.123456", reorder=False):
            fields = [f'"order_id": "{order}"', '"user_id": "u1"', f'"total_amount": {amount}',
                      '"status": "pending"', '"items_count": 2', f'"event_type": "{event_type}"',
                      f'"created_at": "{at}"', '"items": [{"product_id": "p", "quantity": 2, "price": 999.99}]']
            if seed_id is not None:
                fields.insert(0, f'"id": "{seed_id}"')
            return "{" + ", ".join(reversed(fields) if reorder else fields) + "}"

        lines = [
            seed(),
            seed(reorder=True),  # the same id in other text: once
            seed(seed_id="5EED0000-0000-4000-8000-00000000E001"),  # the same UUID, upper case: once
            # The order's id as `id`: shared by the order's events, so not an event id.
            seed("order.paid", seed_id=order, at="2024-01-01T10:00:10"),
            seed("order.cancelled", seed_id=order, at="2024-01-01T10:00:10"),
            seed("order.cancelled", seed_id=order, at="2024-01-01T10:00:10"),  # the same line: once
            seed(seed_id="evt-7", amount='"0.01"', at="2024-01-01 10:00:59.999999"),  # not a UUID: by text
            seed(seed_id=None, amount="10.5", at="2024-01-01T10:00:30"),
            "  " + seed(seed_id=None, amount="10.5", at="2024-01-01T10:00:30") + "\t",  # padded: once
            seed(seed_id="5eed0000-0000-4000-8000-00000000e002", at="2024-01-01T10:01:00.000001"),
        ]
        w = self.windows(lines)
        self.assertEqual(sorted(w), ["2024-01-01T10:00:00Z", "2024-01-01T10:01:00Z"])
        first = w["2024-01-01T10:00:00Z"]
        self.assertEqual(first["event_counts"], {"order.created": 3, "order.paid": 1, "order.cancelled": 1})
        self.assertEqual(first["total_revenue"], "2010.50")
        self.assertEqual(w["2024-01-01T10:01:00Z"]["order_count"], 1)

    def test_approx_mode_reports_the_estimate(self):
        w = self.windows([event(event_id="x"), event(user="u2", event_id="y")], unique_users="approx")
        self.assertEqual(w["2026-11-24T10:00:00Z"]["unique_users"], 2)


def job_to_json(df):
    """Money as text, so the test sees the exact decimal the JSON writer prints."""
    from pyspark.sql import functions as F

    cols = [F.col(c).cast("string").alias(c) if c in ("total_revenue", "avg_order_value") else F.col(c) for c in df.columns]
    return F.to_json(F.struct(*cols))


if __name__ == "__main__":
    unittest.main()
