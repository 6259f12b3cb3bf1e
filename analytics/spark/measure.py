"""Runs a command and reports its wall time and the peak resident memory of its whole process
tree (for Spark: the python driver, spark-submit and the JVM together), by sampling /proc.

    python3 measure.py [--interval 0.1] [--out LOG] -- COMMAND ARGS...

Prints one JSON line: {"wall_s": ..., "peak_tree_rss_mib": ..., "peak_process_rss_mib": (the
largest single process), "exit": ...}. The command runs
in a session of its own; whatever of it is still running when it exits is ended. RSS is summed
over processes (pages two programs share count twice: an upper bound), a forked child that has
not exec'd yet counted with its parent. Linux only; standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def session_rss(sid: int) -> tuple[int, int]:
    """(bytes resident in every process of session `sid`, in the largest one).

    A child between fork/vfork and exec (the JVM starts helper commands that way) shares or
    copies its parent's address space and reports the parent's RSS: processes with the same
    code and stack addresses (unique per exec'd program under ASLR) are counted once."""
    by_layout: dict[tuple[str, str, str], int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:  # state ppid pgrp session ...
                continue
            with open(f"/proc/{entry}/statm") as f:
                rss = int(f.read().split()[1]) * PAGE
            layout = (fields[23], fields[24], fields[25])  # startcode endcode startstack
            by_layout[layout] = max(by_layout.get(layout, 0), rss)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return sum(by_layout.values()), max(by_layout.values(), default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--out", help="the command's stdout and stderr go here (default: inherited)")
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command")
    out = open(args.out, "w") if args.out else None
    started = time.monotonic()
    proc = subprocess.Popen(command, start_new_session=True, stdout=out, stderr=subprocess.STDOUT if out else None)

    def stop(signum, _frame):
        os.killpg(proc.pid, signal.SIGTERM)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    peak = peak_one = 0
    while proc.poll() is None:
        tree, one = session_rss(proc.pid)
        peak, peak_one = max(peak, tree), max(peak_one, one)
        time.sleep(args.interval)
    wall = time.monotonic() - started
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the tree, if any
    except ProcessLookupError:
        pass
    print(json.dumps({"wall_s": round(wall, 3), "peak_tree_rss_mib": round(peak / 2**20, 1),
                      "peak_process_rss_mib": round(peak_one / 2**20, 1), "exit": proc.returncode}))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
