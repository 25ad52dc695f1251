"""MQTT delivery benchmark: N results through broker restarts, nothing lost, nothing duplicated.

A real Mosquitto on a free loopback port (persistence on, as in production), one MqttLink publishing
``--n`` results at ``--rate`` per second, and a consumer with a persistent QoS 1 session that
de-duplicates by result id. The broker is stopped (SIGTERM) ``--restarts`` times mid-stream, each time
for ``--down-s`` seconds. Prints one table:

* published: results handed to ``publish_result``; delivered: distinct results the consumer got
* lost: published results never delivered (target 0)
* duplicated after de-dup: results that arrived under more than one id (target 0); the at-least-once
  redeliveries that de-duplication by id removed are shown separately
* latency: ``publish_result`` -> broker PUBACK (the outbox write, the sender, the network, the ack):
  "steady" for results made while the broker was up and no backlog was waiting; "broker up" also counts
  results made just after a reconnect, which wait in order behind the backlog of the outage; "all"
  includes the outages themselves. And the time ``publish_result`` itself takes (the outbox write: the
  only thing the inspection loop waits for)

    python bench/mqtt.py                      # 10,000 results, 2 restarts
    python bench/mqtt.py --sync normal        # outbox without an fsync per result

The run is merged into --out under its --sync (default bench/out/mqtt.json; the README's figures:
bench/results/mqtt.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import at_least, check_out, command, input_errors_exit_2, merge_json, non_negative_float, out_default


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


CONSUMER = r"""
import json, sys, time
from edge_ad.mqtt.collector import Collector
from edge_ad.mqtt.settings import BrokerSettings
url, out = sys.argv[1], sys.argv[2]
col = Collector(BrokerSettings(url=url, reconnect_min_s=0.1, reconnect_max_s=1.0), "edge-ad/v1/bench/+/result",
                client_id="edge-ad-bench-consumer").start()
print("ready", flush=True)
n, wait_s = sys.stdin.readline().split()
col.wait_ids(int(n), float(wait_s))
time.sleep(0.5)                                   # late redeliveries count too
got = [[b["i"], b["id"], b["seq"]] for b in (m.json() for m in col.of_kind("result"))]
col.stop()
with open(out, "w") as fh:
    json.dump(got, fh)
print("done", flush=True)
"""


def run(n: int, restarts: int, down_s: float, rate: float, sync: str, workdir: Path) -> dict:
    from edge_ad.mqtt import MqttLink, MqttSettings
    from edge_ad.mqtt.broker import Mosquitto, find_mosquitto

    if find_mosquitto() is None:
        raise SystemExit("skipped: mosquitto not installed (apt-get install -y mosquitto)")
    fast = {"reconnect_min_s": 0.1, "reconnect_max_s": 1.0, "keepalive_s": 10}
    broker = Mosquitto(workdir / "broker").start()
    acks: dict[str, tuple[float, float]] = {}
    outages: list[list[float]] = []            # [broker stop began, link connected again]
    link = None
    # the consumer runs in its own process, as it would in a plant: it does not share this one's CPU time
    received_path = workdir / "received.json"
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER, broker.url, str(received_path)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if consumer.stdout.readline().strip() != "ready":
            raise SystemExit("the consumer process did not start")
        settings = MqttSettings(url=broker.url, site="bench", device="dev1", outbox_path=workdir / "outbox.sqlite",
                                outbox_sync=sync, **fast)
        link = MqttLink(settings, ack_listener=lambda kind, mid, created, acked: acks.__setitem__(mid, (created,
                                                                                                       acked)))
        link.start()
        deadline = time.monotonic() + 10
        while not link.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        ids: list[str] = []
        call_ms: list[float] = []
        stop_at = [int(n * (k + 1) / (restarts + 1)) for k in range(restarts)]
        restart_threads: list[threading.Thread] = []

        def bounce():
            outage = [time.time(), float("inf")]
            outages.append(outage)
            broker.stop()
            time.sleep(down_s)
            broker.start()
            t_wait = time.monotonic() + 30
            while not link.connected and time.monotonic() < t_wait:
                time.sleep(0.005)
            outage[1] = time.time()

        # how late a thread that only sleeps 1 ms wakes up: the machine's own scheduling noise
        jitter_ms: list[float] = []
        probing = threading.Event()

        def probe():
            while not probing.is_set():
                a = time.perf_counter()
                time.sleep(0.001)
                jitter_ms.append((time.perf_counter() - a) * 1000.0 - 1.0)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        t0 = time.time()
        period = 1.0 / rate if rate > 0 else 0.0
        next_t = time.perf_counter()
        for i in range(n):
            if i in stop_at:
                th = threading.Thread(target=bounce)
                th.start()
                restart_threads.append(th)
                while broker.running:                    # the stop has begun before the next publish
                    time.sleep(0.001)
            c0 = time.perf_counter()
            ids.append(link.publish_result({"score": (i % 1000) / 1000.0, "ng": i % 97 == 0, "i": i}))
            call_ms.append((time.perf_counter() - c0) * 1000.0)
            if period:
                next_t += period
                sleep = next_t - time.perf_counter()
                if sleep > 0:
                    time.sleep(sleep)
        produce_s = time.time() - t0
        probing.set()
        prober.join()
        for th in restart_threads:
            th.join()
        drain_deadline = time.monotonic() + 60
        while link.stats()["outbox_depth"] and time.monotonic() < drain_deadline:
            time.sleep(0.02)
        acked_s = time.time() - t0
        stats = link.stats()
        consumer.stdin.write(f"{n} 60\n")
        consumer.stdin.flush()
        consumer.wait(90)
        received = json.loads(received_path.read_text())
    finally:
        if link is not None:
            link.stop(timeout=5)
        if consumer.poll() is None:
            consumer.kill()
        broker.close()

    by_index: dict[int, set[str]] = {}
    copies: dict[str, int] = {}
    seqs = set()
    for i, rid, seq in received:
        by_index.setdefault(i, set()).add(rid)
        copies[rid] = copies.get(rid, 0) + 1
        seqs.add(seq)
    delivered = len(by_index)
    lost = n - len(set(range(n)) & set(by_index))
    dup_after = sum(1 for v in by_index.values() if len(v) > 1)
    redelivered = sum(c - 1 for c in copies.values())

    def overlaps(created: float, acked: float, windows) -> bool:
        return any(created <= end and acked >= start for start, end in windows)

    # after each outage the backlog is sent in order, so results made right after the reconnect wait
    # behind it: "recovering" lasts until everything made before the reconnect is acknowledged
    pairs = list(acks.values())
    recovering = []
    for start, end in outages:
        done = max((a for c, a in pairs if c <= end), default=end)
        backlog = sum(1 for c, a in pairs if c <= end and a >= end)
        recovering.append((start, done, backlog, done - end))
    up = [(a - c) * 1000.0 for c, a in pairs if not overlaps(c, a, outages)]
    steady = [(a - c) * 1000.0 for c, a in pairs if not overlaps(c, a, [(s0, d) for s0, d, _, _ in recovering])]
    every = [(a - c) * 1000.0 for c, a in pairs]
    catch_up = [round(b / t) for _, _, b, t in recovering if t > 0]
    return {
        "n": n, "restarts": restarts, "down_s": down_s, "rate": rate, "sync": sync,
        "published": len(ids), "delivered": delivered, "lost": lost, "duplicated_after_dedup": dup_after,
        "redelivered_removed_by_dedup": redelivered, "seq_contiguous": seqs == set(range(1, n + 1)),
        "acked": stats["acked"], "outbox_dropped": stats["outbox_dropped"], "connects": stats["connects"],
        "ack_ms_steady_p50": _pct(steady, 0.5), "ack_ms_steady_p99": _pct(steady, 0.99),
        "ack_ms_steady_max": _pct(steady, 1.0), "ack_n_steady": len(steady),
        "ack_ms_up_p50": _pct(up, 0.5), "ack_ms_up_p99": _pct(up, 0.99), "ack_ms_up_max": _pct(up, 1.0),
        "ack_n_up": len(up), "ack_ms_all_p99": _pct(every, 0.99), "ack_ms_all_max": _pct(every, 1.0),
        "backlog_after_outage": [b for _, _, b, _ in recovering], "catch_up_per_s": catch_up,
        "publish_call_ms_p50": _pct(call_ms, 0.5), "publish_call_ms_p99": _pct(call_ms, 0.99),
        "sleep_jitter_ms_p99": _pct(jitter_ms, 0.99), "sleep_jitter_ms_max": _pct(jitter_ms, 1.0),
        "load_avg_1min": os.getloadavg()[0],
        "produce_s": round(produce_s, 2), "acked_s": round(acked_s, 2),
        "outages_s": [round(e - s, 2) for s, e in outages],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }


def table(r: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.1f} ms"

    rows = [
        ("results published", f"{r['published']:,}"),
        ("delivered (distinct)", f"{r['delivered']:,}"),
        ("lost", f"{r['lost']}  (target 0)"),
        ("duplicated after de-dup by id", f"{r['duplicated_after_dedup']}  (target 0)"),
        ("redeliveries removed by de-dup", f"{r['redelivered_removed_by_dedup']}"),
        ("seq 1..N contiguous", "yes" if r["seq_contiguous"] else "NO"),
        ("broker restarts (down each)", f"{r['restarts']} ({r['down_s']:g} s; outage to reconnect: "
                                        f"{', '.join(f'{x:g} s' for x in r['outages_s'])})"),
        ("publish -> PUBACK p50 / p99, steady", f"{ms(r['ack_ms_steady_p50'])} / {ms(r['ack_ms_steady_p99'])}"
                                                f"  (broker up, no backlog; n = {r['ack_n_steady']:,})"),
        ("publish -> PUBACK p50 / p99, broker up", f"{ms(r['ack_ms_up_p50'])} / {ms(r['ack_ms_up_p99'])}"
                                                   f"  (incl. results queued behind a backlog; n = {r['ack_n_up']:,})"),
        ("publish -> PUBACK p99 / max, all", f"{ms(r['ack_ms_all_p99'])} / {ms(r['ack_ms_all_max'])}"
                                             "  (incl. waiting out the outages)"),
        ("backlog after each outage", ", ".join(f"{b:,} sent at {c:,}/s" for b, c in
                                                 zip(r["backlog_after_outage"], r["catch_up_per_s"])) or "-"),
        ("publish_result() call p50 / p99", f"{ms(r['publish_call_ms_p50'])} / {ms(r['publish_call_ms_p99'])}"
                                           f"  (outbox sync={r['sync']})"),
        ("machine noise: 1 ms sleep overshoot", f"p99 {ms(r['sleep_jitter_ms_p99'])}, max "
                                                f"{ms(r['sleep_jitter_ms_max'])}; load average "
                                                f"{r['load_avg_1min']:.1f} on {os.cpu_count()} CPUs"),
        ("rate asked / time to publish all", f"{r['rate']:g}/s / {r['produce_s']} s"),
        ("time until all acknowledged", f"{r['acked_s']} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


@input_errors_exit_2
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=at_least(1), default=10_000, help="results to publish")
    ap.add_argument("--restarts", type=at_least(0), default=2, help="broker restarts mid-stream")
    ap.add_argument("--down-s", type=non_negative_float, default=1.0, help="seconds the broker stays down each time")
    ap.add_argument("--rate", type=non_negative_float, default=1000.0, help="results per second (0: as fast as possible)")
    ap.add_argument("--sync", choices=["full", "normal"], default="full", help="outbox SQLite synchronous mode")
    ap.add_argument("--out", default=out_default("mqtt.json"),
                    help="JSON results, merged by --sync (default: %(default)s; '' for none; the README's "
                         "figures: bench/results/mqtt.json)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the link's log (reconnects)")
    args = ap.parse_args(argv)
    if args.out:
        check_out(ap, args.out)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="edge-ad-bench-mqtt-") as tmp:
        r = run(args.n, args.restarts, args.down_s, args.rate, args.sync, Path(tmp))
    print(table(r))
    if args.out:
        merge_json(args.out, {f"sync={args.sync}": {**r, "command": command("mqtt", argv)}})
        print(f"wrote {args.out}")
    return 0 if r["lost"] == 0 and r["duplicated_after_dedup"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
