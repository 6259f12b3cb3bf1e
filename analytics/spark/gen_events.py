"""Order events, one JSON per line, for the parity test and the benchmark.

    python3 gen_events.py --events 1000000 --out events.jsonl            # the benchmark's file
    python3 gen_events.py --events 20000 --users 500 --step-ms 30 \
        --other-every 10 --duplicates 40 --jitter-ms 5000 --without-id-every 1000 \
        --seed-shape-every 3 --out e.jsonl

Events are in Mercato's shape (`event_id`, `currency`, RFC 3339 times, `items[].unit_price`);
with --seed-shape-every N every Nth is written as the seed's order service wrote it: `id`
instead of `event_id` (every other such event that is not an order.created carries the order's
id there, as an order-keyed producer would), no currency, naive ISO times with microseconds
(UTC), `items[].price`; a repeated seed-shaped line with an event id of its own is then written
with its keys in another order, so only its `id` shows it is the same event.

Deterministic for a given --seed. Standard library only (runs on the system python3).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import uuid

OTHER_TYPES = ("order.paid", "order.cancelled", "payment.succeeded")


def seed_shaped(event: dict, index: int, order_id_as_id: bool) -> dict:
    """`event` as the seed's order service published it. The microseconds come from the index,
    not the random generator, so the other events stay as they were without the option."""
    at = datetime.datetime.fromisoformat(event["created_at"].replace("Z", "+00:00")).replace(tzinfo=None)
    at += datetime.timedelta(microseconds=(index * 7919) % 1000)
    seed = {}
    if "event_id" in event:
        seed["id"] = event["order_id"] if order_id_as_id else event["event_id"]
    seed.update((k, v) for k, v in event.items() if k not in ("event_id", "currency", "items", "created_at"))
    seed["created_at"] = at.isoformat()
    seed["items"] = [{"product_id": i["product_id"], "quantity": i["quantity"], "price": i["unit_price"]}
                     for i in event.get("items", [])]
    return seed


def resent(line: str) -> str:
    """A seed-shaped event with an event id of its own, written again with its keys in another
    order (the seed's producer retrying with other code): other bytes, the same event, counted
    once by its `id`. Any other line is repeated as it is."""
    event = json.loads(line)
    if "id" not in event or event["id"] == event.get("order_id"):
        return line
    return json.dumps(dict(reversed(list(event.items()))))


def generate(args: argparse.Namespace, out) -> int:
    rnd = random.Random(args.seed)
    ident = lambda: str(uuid.UUID(int=rnd.getrandbits(128), version=4))  # noqa: E731
    users = [ident() for _ in range(args.users)]
    products = [ident() for _ in range(args.products)]
    start = datetime.datetime(2026, 11, 24, 10, 0, 0)
    recent: list[str] = []  # lines that may be repeated a little later (a redelivery)
    created: list[dict] = []  # orders that a later non-created event can refer to
    duplicate_every = args.events // args.duplicates if args.duplicates else 0
    written = 0
    for i in range(args.events):
        jitter = rnd.randint(-args.jitter_ms, args.jitter_ms) if args.jitter_ms else 0
        at = start + datetime.timedelta(milliseconds=args.step_ms * i + jitter)
        stamp = at.isoformat(timespec="milliseconds") + "Z"
        if args.other_every and i % args.other_every == args.other_every - 1 and created:
            base = rnd.choice(created[-200:])
            event = dict(base, event_id=ident(), event_type=rnd.choice(OTHER_TYPES), created_at=stamp)
        else:
            quantity = rnd.randint(1, 3)
            cents = rnd.randint(100, 99999)
            event = {
                "event_id": ident(), "event_type": "order.created", "order_id": ident(),
                "user_id": rnd.choice(users), "total_amount": round(cents * quantity / 100, 2),
                "currency": "USD", "status": "pending", "items_count": quantity, "created_at": stamp,
                "items": [{"product_id": rnd.choice(products), "quantity": quantity, "unit_price": cents / 100}],
            }
            created.append(event)
            if len(created) > 1000:
                del created[:500]
        if args.without_id_every and i % args.without_id_every == 0:
            event = {k: v for k, v in event.items() if k != "event_id"}
        if args.seed_shape_every and i % args.seed_shape_every == 0:
            nth = i // args.seed_shape_every
            event = seed_shaped(event, i, event["event_type"] != "order.created" and nth % 2 == 1)
        line = json.dumps(event)
        out.write(line + "\n")
        written += 1
        recent.append(line)
        del recent[:-50]
        if duplicate_every and i % duplicate_every == duplicate_every // 2:
            again = rnd.choice(recent)  # the same bytes again: counted once
            if args.seed_shape_every:
                again = resent(again)
            out.write(again + "\n")
            written += 1
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="distinct events (duplicates come on top)")
    p.add_argument("--users", type=int, default=5000)
    p.add_argument("--products", type=int, default=200)
    p.add_argument("--step-ms", type=int, default=3, help="event time between consecutive events")
    p.add_argument("--jitter-ms", type=int, default=0, help="event times move up to this much either way (out of order)")
    p.add_argument("--other-every", type=int, default=0, help="every Nth event is order.paid/cancelled/payment.succeeded")
    p.add_argument("--duplicates", type=int, default=0, help="lines repeated verbatim shortly after they first appear")
    p.add_argument("--without-id-every", type=int, default=0, help="every Nth line carries no event_id")
    p.add_argument("--seed-shape-every", type=int, default=0,
                   help="every Nth event in the seed's shape (id, no currency, naive times, items[].price)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with open(args.out, "w") as out:
        lines = generate(args, out)
    print(lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
