#!/usr/bin/env python3
"""Where a request's instructions go: two callgrind profiles of the same proxy and workload, with N1
and N2 requests (`bench.py --only instr --keep-profiles DIR` keeps them), subtracted function by
function and divided by N2 - N1, so start-up and shutdown cancel as they do in the counted rows.

    python3 benches/callgrind_per_request.py DIR/callgrind.out.staybound.redis.run1.{20000,60000}

The request counts are read from the file names' last field unless given with --n1/--n2. Prints the
top functions by inclusive instructions per request (a function and everything it calls) and by
self instructions per request (its own code only), with the calls per request and the
instructions per call. Function names need an unstripped binary:
`CARGO_PROFILE_RELEASE_STRIP=none cargo build --release`. The linker folds identical functions, so a
name can stand for another function with the same machine code (tokio's `UdpSocket::poll_recv_ready`
for a TCP stream's read readiness, for example).

Python 3.11, standard library only; needs callgrind_annotate.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

# `  58,096,192 (12.94%)  *  ???:function [object]` (the function) or `... < ???:caller (960,263x) [...]`
LINE = re.compile(r"^\s*([\d,]+)\s+\([\d. ]+%\)\s+([*<>])?\s*(\S.*?)(?:\s+\(([\d,]+)x\))?"
                  r"(?:\s+\[[^\]]*\])?\s*$")


def annotate(path: Path, inclusive: bool) -> tuple[dict[str, int], dict[str, int]]:
    """Instructions and calls per `file:function` from callgrind_annotate, every function (no
    threshold); the calls are the sum of its callers' counts in the `--tree=caller` listing."""
    cp = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                         "--tree=caller", "--threshold=100", str(path)],
                        capture_output=True, text=True, timeout=300)
    if cp.returncode != 0:
        sys.exit(f"callgrind_annotate {path}: {cp.stderr.strip()[:300]}")
    cost: dict[str, int] = {}
    calls: dict[str, int] = {}
    pending = 0
    seen_header = False
    for line in cp.stdout.splitlines():
        if line.rstrip().endswith("PROGRAM TOTALS"):
            cost["PROGRAM TOTALS"] = int(line.split()[0].replace(",", ""))
            continue
        if "file:function" in line:
            seen_header = True
            continue
        m = LINE.match(line) if seen_header else None
        if not m:
            pending = 0
            continue
        n = int(m.group(1).replace(",", ""))
        if m.group(2) == "<":
            pending += int((m.group(4) or "0").replace(",", ""))
        elif m.group(2) == "*":
            key = m.group(3)
            cost[key] = cost.get(key, 0) + n
            calls[key] = calls.get(key, 0) + pending
            pending = 0
    return cost, calls


def short(key: str) -> str:
    """The function part of `file:function`, without the file."""
    return key.split(":", 1)[1] if key.startswith(("???:", "/", ".")) and ":" in key else key


def requests_of(path: Path) -> int | None:
    tail = path.name.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("small", type=Path, help="the profile of the run with fewer requests")
    p.add_argument("big", type=Path, help="the profile of the run with more requests")
    p.add_argument("--n1", type=int, help="requests of the smaller run (default: from its name)")
    p.add_argument("--n2", type=int, help="requests of the bigger run (default: from its name)")
    p.add_argument("--top", type=int, default=15, help="functions per table (default 15)")
    p.add_argument("--roots", action="store_true",
                   help="keep the call-tree roots (99 %% inclusive or more) in the inclusive table")
    a = p.parse_args(argv)
    n1 = a.n1 or requests_of(a.small)
    n2 = a.n2 or requests_of(a.big)
    if not n1 or not n2 or n2 <= n1:
        p.error("need N2 > N1 (from the file names' last field, or --n1/--n2)")
    for inclusive in (True, False):
        (small, calls1), (big, calls2) = annotate(a.small, inclusive), annotate(a.big, inclusive)
        per = {k: (big.get(k, 0) - small.get(k, 0)) / (n2 - n1) for k in set(small) | set(big)}
        cper = {k: (calls2.get(k, 0) - calls1.get(k, 0)) / (n2 - n1) for k in set(calls1) | set(calls2)}
        total = per.pop("PROGRAM TOTALS", None)
        what = "inclusive" if inclusive else "self"
        print(f"\n{what} instructions per request ({a.big.name} minus {a.small.name}, "
              f"/ {n2 - n1:,}); total {total:,.0f}\n")
        rows = sorted(per.items(), key=lambda kv: -kv[1])
        if inclusive and total and not a.roots:
            # main, block_on and the like hold every instruction and say nothing about where they go.
            roots = [k for k, v in rows if v >= 0.99 * total]
            rows = [(k, v) for k, v in rows if v < 0.99 * total]
            print(f"({len(roots)} call-tree roots with 99 % or more left out, e.g. "
                  f"`{short(roots[-1])}`; --roots shows them)\n" if roots else "", end="")
        print(f"| {what} | % of total | calls | {what} per call | function |")
        print("|---:|---:|---:|---:|---|")
        for k, v in rows[:a.top]:
            pct = f"{v / total * 100:.1f} %" if total else "—"
            c = cper.get(k, 0)
            each = f"{v / c:,.0f}" if c >= 0.01 else "—"
            print(f"| {v:,.0f} | {pct} | {c:.2f} | {each} | `{short(k)}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
