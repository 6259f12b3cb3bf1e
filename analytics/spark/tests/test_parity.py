"""The comparison itself: it passes on equal windows and fails on any difference."""

import copy
import json
import os
import sys
import tempfile
import unittest
from decimal import Decimal

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import parity  # noqa: E402

MERCATO = [
    '{"window_start":"2026-11-24T10:00:00Z","window_end":"2026-11-24T10:01:00Z","order_count":2,"unique_users":2,'
    '"total_revenue":10.01,"avg_order_value":5.00,"items_sold":3,"event_counts":{"order.created":2,"order.paid":1},'
    '"late_events":0,"unique_users_estimate":2,"top_products":[],"final":true}',
    '{"window_start":"2026-11-24T10:01:00Z","window_end":"2026-11-24T10:02:00Z","order_count":1,"unique_users":1,'
    '"total_revenue":5.50,"avg_order_value":5.50,"items_sold":1,"event_counts":{"order.created":1},'
    '"late_events":0,"unique_users_estimate":1,"top_products":[],"final":true}',
]


def spark_of(line: str) -> str:
    r = json.loads(line, parse_float=Decimal)
    for k in ("late_events", "top_products", "final"):
        r.pop(k)
    r.update(processed_at="2026-11-25T00:00:00.000Z", metric_type="order_metrics", window_type="tumbling_1m")
    return json.dumps(r, default=str).replace('"10.01"', "10.01").replace('"5.00"', "5.00").replace('"5.50"', "5.50")


class Compare(unittest.TestCase):
    def setUp(self):
        self.mercato = {r["window_start"]: r for r in parity._records(MERCATO, "m")}
        self.spark = {r["window_start"]: r for r in parity._records([spark_of(x) for x in MERCATO], "s")}

    def check(self, spark):
        return parity.compare(self.mercato, spark, 0.01)[0]

    def test_equal_windows_pass(self):
        self.assertEqual(self.check(self.spark), [])

    def test_every_difference_is_reported(self):
        for field, value in (("order_count", 3), ("total_revenue", Decimal("10.02")), ("items_sold", 4),
                             ("unique_users", 1), ("avg_order_value", Decimal("5.01")),
                             ("window_end", "2026-11-24T10:02:00Z"), ("event_counts", {"order.created": 2})):
            spark = copy.deepcopy(self.spark)
            spark["2026-11-24T10:00:00Z"][field] = value
            problems = self.check(spark)
            self.assertEqual(len(problems), 1, (field, problems))
            self.assertIn(field, problems[0])

    def test_money_keeps_two_decimals(self):
        spark = copy.deepcopy(self.spark)
        spark["2026-11-24T10:01:00Z"]["total_revenue"] = Decimal("5.5")
        self.assertIn("total_revenue", self.check(spark)[0])

    def test_missing_window_and_estimate_tolerance(self):
        spark = copy.deepcopy(self.spark)
        del spark["2026-11-24T10:01:00Z"]
        self.assertIn("only in Mercato", self.check(spark)[0])
        big_m = {"w": dict(self.mercato["2026-11-24T10:00:00Z"], window_start="w", unique_users=1000)}
        big_s = {"w": dict(self.spark["2026-11-24T10:00:00Z"], window_start="w", unique_users=1000)}
        for estimate, ok in ((1029, True), (971, True), (1031, False), (969, False)):
            big_s["w"]["unique_users_estimate"] = estimate
            problems, worst = parity.compare(big_m, big_s, 0.01)
            self.assertEqual(problems == [], ok, (estimate, problems))

    def test_late_events_in_mercato_fail(self):
        self.mercato["2026-11-24T10:00:00Z"]["late_events"] = 1
        self.assertIn("late", self.check(self.spark)[0])

    def test_spark_output_files(self):
        with tempfile.TemporaryDirectory() as d:
            for batch, line in enumerate(spark_of(x) for x in MERCATO):
                os.makedirs(f"{d}/batch_id={batch:08d}")
                with open(f"{d}/batch_id={batch:08d}/part-00000-x.txt", "w") as f:
                    f.write(line + "\n")
            self.assertEqual(sorted(parity.load_spark(d)), sorted(self.mercato))
            with open(f"{d}/batch_id=00000001/part-00001-y.txt", "w") as f:
                f.write(spark_of(MERCATO[0]) + "\n")
            with self.assertRaisesRegex(parity.ParityError, "written twice"):
                parity.load_spark(d)


if __name__ == "__main__":
    unittest.main()
