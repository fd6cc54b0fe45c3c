"""A misbehaving subscriber for ``fluorosam-rt bench --faults``, one per process, torch-free.

Each kind is a fault a navigation system on the other end of the mask stream can have:

* ``slow``: reads one message a second and never drains its queue (default receive HWM), so the
  node's per-peer send queue stays full for the whole phase;
* ``reconnect``: connects, takes one message, closes the socket, and does it again, in a loop;
* ``dying``: reads every message like a healthy client until the benchmark SIGKILLs it;
* ``healthy``: reads every message until told to stop: the control group, so the baseline has
  as many peers as the fault phase and the comparison measures the faults, not the peer count.

Each prints one ``{"event": "ready"}`` line once it is connected and has received a message
(``reconnect``: once it has completed a whole reconnect), so the benchmark starts its
measurement window only after the fault is in place and Python's start-up is over. On SIGTERM
or SIGINT it writes its counters as JSON to OUT (``dying`` never gets the chance).

    python -m fluorosam_rt.bench.fault_subscriber KIND ENDPOINT OUT.json [--topic bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from fluorosam_rt.bench.procs import stop_on_signals

KINDS = ("slow", "reconnect", "dying")
CONTROL_KIND = "healthy"
POLL_S = 0.2  # every blocking wait is this short, so a stop signal is honoured within it


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fluorosam_rt.bench.fault_subscriber")
    ap.add_argument("kind", choices=(*KINDS, CONTROL_KIND))
    ap.add_argument("endpoint")
    ap.add_argument("out", help="counters are written here as JSON on SIGTERM")
    ap.add_argument("--topic", default="")
    ap.add_argument("--period", type=float, default=1.0, help="slow: seconds between reads")
    args = ap.parse_args(argv)

    from bridge import Subscriber, SubscriberTimeout

    stop = stop_on_signals()
    counters = {"kind": args.kind, "received": 0, "reconnects": 0, "lost": 0, "errors": 0}

    def one(sub: Subscriber) -> bool:
        """Wait for one message (oldest queued first) until it comes or we are told to stop."""
        while not stop.is_set():
            try:
                sub.receive(timeout=POLL_S, newest=False)
            except SubscriberTimeout:
                continue
            except Exception:  # a malformed message is counted; the fault goes on
                counters["errors"] += 1
                continue
            counters["received"] += 1
            return True
        return False

    def ready() -> None:
        print(json.dumps({"event": "ready", "kind": args.kind}), flush=True)

    if args.kind == "reconnect":
        announced = False
        while not stop.is_set():
            with Subscriber(args.endpoint, topic=args.topic) as sub:
                if one(sub):
                    counters["reconnects"] += 1
                    counters["lost"] += sub.lost
            if not announced and counters["reconnects"]:
                ready()
                announced = True
    else:
        with Subscriber(args.endpoint, topic=args.topic) as sub:
            if one(sub):
                ready()
            while not stop.is_set():
                if args.kind == "slow":
                    t_next = time.monotonic() + args.period
                    while not stop.is_set() and time.monotonic() < t_next:
                        time.sleep(min(POLL_S, max(0.0, t_next - time.monotonic())))
                one(sub)
            counters["lost"] = sub.lost
    with open(args.out, "w") as f:
        json.dump(counters, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
