"""Compares the Spark job's windows with `mercato analytics replay`'s over the same events.

    python3 parity.py --mercato OUT/windows.jsonl --spark SPARK_OUT [--rsd 0.01] [--lines N]

Per window (the same set of windows on both sides): window_end, order_count, total_revenue,
avg_order_value, items_sold, unique_users and event_counts must be equal, money compared as
exact decimals from the JSON text. Spark's `unique_users_estimate` (HyperLogLog++) must be
within three relative standard deviations of the exact count. Mercato must have counted no
late event (Spark drops late events, so the data must have none). Standard library only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from decimal import Decimal

EXACT = ("window_end", "order_count", "total_revenue", "avg_order_value", "items_sold", "unique_users")
KNOWN_TYPES = (
    "order.created", "order.paid", "order.cancelled", "order.refunded",
    "payment.succeeded", "payment.failed", "payment.refunded",
)


class ParityError(Exception):
    pass


def _records(lines, origin: str) -> list[dict]:
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line, parse_float=Decimal))
            except json.JSONDecodeError as e:
                raise ParityError(f"{origin}:{number}: not JSON: {e}") from e
    return out


def load_mercato(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {r["window_start"]: r for r in _records(f, path)}


def load_spark(directory: str) -> dict[str, dict]:
    """Windows from the job's output (`batch_id=N/part-*`). In append mode each window is
    written once; a window written twice is an error."""
    windows: dict[str, dict] = {}
    parts = sorted(glob.glob(os.path.join(directory, "batch_id=*", "part-*")))
    if not parts:
        raise ParityError(f"no output files under {directory}/batch_id=*/")
    for part in parts:
        with open(part) as f:
            for record in _records(f, part):
                start = record["window_start"]
                if start in windows:
                    raise ParityError(f"window {start} written twice ({part})")
                windows[start] = record
    return windows


def _show(value) -> str:
    """A value as its JSON text: a string keeps its quotes, so "1.00" and 1.00 differ visibly."""
    return str(value) if isinstance(value, Decimal) else json.dumps(value)


def _event_counts(record: dict) -> dict[str, int]:
    counts = {k: int(v) for k, v in (record.get("event_counts") or {}).items() if int(v)}
    other = sum(v for k, v in counts.items() if k not in KNOWN_TYPES)
    known = {k: v for k, v in counts.items() if k in KNOWN_TYPES}
    if other:
        known["other"] = other
    return known


def compare(mercato: dict[str, dict], spark: dict[str, dict], rsd: float) -> tuple[list[str], float]:
    """(mismatches, largest relative error of the users estimate)."""
    problems: list[str] = []
    only_m, only_s = sorted(set(mercato) - set(spark)), sorted(set(spark) - set(mercato))
    if only_m:
        problems.append(f"windows only in Mercato's output: {only_m[:5]}")
    if only_s:
        problems.append(f"windows only in Spark's output: {only_s[:5]}")
    worst = 0.0
    for start in sorted(set(mercato) & set(spark)):
        m, s = mercato[start], spark[start]
        for field in EXACT:
            if field not in s or field not in m:
                problems.append(f"{start}: {field} missing ({'Spark' if field not in s else 'Mercato'})")
            elif (type(m[field]), str(m[field])) != (type(s[field]), str(s[field])):  # 5.50 is not 5.5
                problems.append(f"{start}: {field} Mercato {_show(m[field])} != Spark {_show(s[field])}")
        if _event_counts(m) != _event_counts(s):
            problems.append(f"{start}: event_counts Mercato {_event_counts(m)} != Spark {_event_counts(s)}")
        if m.get("late_events", 0):
            problems.append(f"{start}: Mercato counted {m['late_events']} late events; the data must have none")
        exact, estimate = int(m.get("unique_users", 0)), s.get("unique_users_estimate")
        if estimate is None:
            problems.append(f"{start}: unique_users_estimate missing (Spark)")
            continue
        error = abs(int(estimate) - exact)
        relative = error / exact if exact else float(error)
        worst = max(worst, relative)
        if error > max(1, 3 * rsd * exact):
            problems.append(f"{start}: unique_users_estimate {estimate} is {relative:.1%} from {exact} (> 3 x rsd {rsd})")
    for start, s in spark.items():
        for field, want in (("metric_type", "order_metrics"), ("processed_at", None)):
            if field not in s or (want and s[field] != want):
                problems.append(f"{start}: Spark's {field} is {s.get(field)!r}")
    return problems, worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mercato", required=True, help="windows.jsonl from mercato analytics replay")
    p.add_argument("--spark", required=True, help="the Spark job's --output directory")
    p.add_argument("--rsd", type=float, default=0.01)
    p.add_argument("--lines", type=int, help="lines in the input (for the summary)")
    p.add_argument("--name", default="parity")
    args = p.parse_args(argv)
    try:
        mercato, spark = load_mercato(args.mercato), load_spark(args.spark)
    except (OSError, ParityError, KeyError) as e:
        print(f"{args.name}: {e}", file=sys.stderr)
        return 1
    problems, worst = compare(mercato, spark, args.rsd)
    if problems:
        print(f"{args.name}: {len(problems)} mismatches between Mercato and Spark:", file=sys.stderr)
        for problem in problems[:20]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    lines = f", {args.lines} events" if args.lines is not None else ""
    print(f"{args.name}: {len(mercato)} windows{lines}, parity exact (orders, revenue, average, items, "
          f"unique users, event counts), unique users estimate (HLL++, rsd {args.rsd}) max error {worst:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
