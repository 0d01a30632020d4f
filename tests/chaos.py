"""A chaos run against a real broker: nothing confirmed is lost, per-key order holds.

    python -m tests.chaos --seconds 60 --broker embedded --seed 1
    python -m tests.chaos --seconds 600 --broker pulsar --seed 7      # a long run

Publisher processes publish numbered messages over many keys and record every
confirmed publish; worker processes (`python -m eventbus run tests.chaos_app`,
one group, key_shared) record every handling durably. On a seeded schedule the
run SIGKILLs and SIGTERMs workers (starting replacements) and restarts the
broker; some messages fail once (retried), a few always (dead-lettered), and
poison payloads are published. Then it drains and checks: every confirmed
publish was handled or dead-lettered, no key's message was first handled
before an earlier one of that key, every poison payload was dead-lettered, and
no worker died but by an injected signal. Exit 1 on any of those.

`--odd` adds what once stalled a subscription: handlers raising CancelledError and a
BaseException once (retried), an error text with a lone surrogate (dead-lettered),
a poison key that is not UTF-8; `--subscription failover` runs the group as failover
(members standing by, taking over when one is killed or stopped).

`--app` runs the workers as a service (tests/chaos_app.py): a lifespan holds the record files, a
middleware writes the records, and a second group handles the topic with a batch handler; that
group's deliveries are checked the same way (nothing lost, order per key, no duplicate after a
SIGTERM), and a message that should be handled but was dead-lettered fails the run. The first
group's handler also asks a third group of the same workers (`<topic>-ask`) with `bus.request`
and checks the reply names its own event: a reply naming another request, an input handled with
no answer recorded, a request dead-lettered, or one request answered twice because of a SIGTERM
fails the run.

`--broker cluster` runs on scripts/pulsar-cluster with its faults (the topic's owner SIGKILLed or
SIGTERMed and started again, rolling restarts, unloads, bundle splits, a bookie SIGKILLed) beside the
workers'; `--schedule cycle` takes the `--faults` in turn. A message handled twice under two ids was
stored twice (a publish whose receipt was lost with its connection, resent): reported as such.

`--schedule rolling` is a rolling deploy and nothing else: a new worker starts, then the
oldest gets SIGTERM, one at a time, under load. The report attributes every duplicate
handling to the fault that caused it (the first handler's worker killed or stopped, or a
broker restart, between the two handlings); a duplicate caused by SIGTERM fails the run,
since a graceful stop must hand over nothing it handled.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

from eventbus import EventBus, Message, PublishError, Router, Settings
from eventbus.broker.embedded import EmbeddedBroker
from eventbus.broker.embedded import restart_broker as restart_embedded
from eventbus.broker.embedded import start_broker as start_embedded
from eventbus.broker.embedded import stop_broker as stop_embedded

ROOT = Path(__file__).resolve().parent.parent
POISON = {
    "invalid-json": b'{"pub": 1, "key": ',
    "wrong-schema": b'{"pub": "one", "colour": "blue"}',
    "empty": b"",
    "non-utf8": b"\xff\xfe\xfa not text",
    "large": None,  # random bytes, made when sent: 4 MB (1 MB on the embedded broker, see docs/explanation/embedded-broker.md)
}


# -- the publisher process ------------------------------------------------------------


async def publisher(pub: int, seconds: float, keys: int, rate: float, seed: int, out: Path) -> None:
    rng = random.Random(seed * 1000 + pub)
    topic = os.environ["CHAOS_TOPIC"]
    confirmed = open(out / f"confirmed-{pub}.log", "a")
    failed = open(out / f"failed-{pub}.log", "a")
    latencies = open(out / f"latency-{pub}.log", "a")
    deadline = time.monotonic() + seconds
    odd = bool(os.environ.get("CHAOS_ODD"))
    async with EventBus(Settings(), routers=[]) as bus:

        async def one_key(k: int) -> None:
            key = f"p{pub}-k{k}"
            seq = 0
            while time.monotonic() < deadline:
                seq += 1
                roll = rng.random()
                kind = "always" if roll < 0.005 else "transient" if roll < 0.10 else "ok"
                if odd and kind == "ok" and roll < 0.16:
                    kind = ("cancelled", "base", "surrogate")[int(roll * 1000) % 3]
                try:
                    began = time.monotonic()
                    await bus.publish(topic, {"pub": pub, "key": key, "seq": seq, "kind": kind}, key=key)
                    latencies.write(f"{time.monotonic() - began:.4f}\n")
                    confirmed.write(f"{pub} {key} {seq} {kind}\n")
                    confirmed.flush()
                except PublishError as exc:
                    failed.write(f"{pub} {key} {seq} {kind} {exc}\n")
                    failed.flush()
                await anyio.sleep(keys / rate)

        async def poison() -> None:
            for name, data in POISON.items():
                await anyio.sleep(rng.uniform(0, seconds / len(POISON) / 2))
                big = 4 if os.environ.get("CHAOS_BROKER") in ("pulsar", "cluster") else 1
                body = os.urandom(big * 1024 * 1024) if data is None else data
                key: str | bytes = f"p{pub}-poison"
                if odd and name == "non-utf8":
                    key = b"\xff\xfe" + key.encode()  # a key only a Go or C++ producer would send
                try:
                    await bus.publish(topic, body, key=key, properties={"poison": f"{pub}-{name}"})
                    confirmed.write(f"{pub} poison {name} poison\n")
                    confirmed.flush()
                except PublishError as exc:
                    failed.write(f"{pub} poison {name} poison {exc}\n")
                    failed.flush()

        async with anyio.create_task_group() as tg:
            for k in range(keys):
                tg.start_soon(one_key, k)
            tg.start_soon(poison)


# -- the harness ----------------------------------------------------------------------


@dataclass
class Broker:
    kind: str
    workdir: Path
    url: str = ""
    token: str = ""
    pid: int = 0
    port: int = 0
    lease: EmbeddedBroker | None = None
    script: str = str(ROOT / "scripts" / "pulsar-standalone")
    state: dict = field(default_factory=dict)
    #: Whether this run started Apache Pulsar (or the cluster): then it stops it at the end, as the embedded one.
    started: bool = False

    def __post_init__(self) -> None:
        if self.kind == "cluster":
            self.script = str(ROOT / "scripts" / "pulsar-cluster")

    def start(self) -> None:
        if self.kind == "embedded":
            (self.workdir / "broker").mkdir(exist_ok=True)
            self.url, self.pid = start_embedded(self.workdir / "broker", 30, port=self.port or None)
            self.port = int(self.url.rsplit(":", 1)[1])
            # A user of our own: the broker stays up whichever workers come and go.
            self.lease = EmbeddedBroker.acquire(self.workdir / "broker")
        else:
            status = subprocess.run([sys.executable, self.script, "status"], capture_output=True)
            self.started = status.returncode != 0  # one already running (a test suite's) is left running
            subprocess.run([sys.executable, self.script, "start"], check=True, capture_output=True)
            run_dir = (
                os.environ.get("PULSAR_CLUSTER_RUN_DIR", "/tmp/eventbus-pulsar-cluster") if self.kind == "cluster"
                else os.environ.get("PULSAR_STANDALONE_RUN_DIR", "/tmp/eventbus-pulsar")
            )
            self.state = json.loads(Path(run_dir, "state.json").read_text())
            self.url, self.token = self.state["service_url"], self.state["client_token"]

    def cluster(self, *args: str) -> str:
        """scripts/pulsar-cluster's answer to a command (kill, term, restart, owner)."""
        done = subprocess.run([sys.executable, self.script, *args], capture_output=True, text=True, timeout=400)
        if done.returncode != 0:
            raise RuntimeError(f"pulsar-cluster {' '.join(args)}: {done.stderr[-500:]}")
        return done.stdout.strip()

    def admin(self, method: str, path: str) -> str:
        """The cluster's admin API as its superuser, from whichever broker answers (a fault may have one down)."""
        for urls in self.state["brokers"].values():
            try:
                answer = httpx.request(method, urls["web_url"] + path, timeout=60, follow_redirects=False,
                                       headers={"Authorization": f"Bearer {self.state['admin_token']}"})
            except httpx.HTTPError:
                continue
            if answer.is_redirect:  # another broker owns it: ask that one
                answer = httpx.request(method, answer.headers["location"], timeout=60,
                                       headers={"Authorization": f"Bearer {self.state['admin_token']}"})
            answer.raise_for_status()
            return answer.text
        raise RuntimeError(f"no broker answered {method} {path}")

    def restart(self, _: str = "") -> None:
        if self.kind == "embedded":
            self.url, self.pid = restart_embedded(self.workdir / "broker", self.pid, self.port, 30)
        else:
            subprocess.run([sys.executable, self.script, "restart"], check=True, capture_output=True)

    def stop(self) -> None:
        if self.kind == "embedded" and self.pid:
            if self.lease is not None:
                self.lease.release()
            stop_embedded(self.pid)
        elif self.started:
            subprocess.run([sys.executable, self.script, "stop"], capture_output=True, timeout=300)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path
    signalled: int | None = None


@dataclass
class Run:
    args: argparse.Namespace
    workdir: Path
    broker: Broker
    env: dict[str, str]
    rng: random.Random
    workers: list[Worker] = field(default_factory=list)
    faults: collections.Counter = field(default_factory=collections.Counter)
    #: (time.time_ns(), fault, worker name or "") of every fault injected.
    events: list[tuple[int, str, str]] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    counter: int = 0
    #: (start, end, fault) in time.time_ns() of every broker fault: from its first step until it was undone.
    windows: list[tuple[int, int, str]] = field(default_factory=list)

    def spawn_worker(self) -> Worker:
        self.counter += 1
        name = f"w{self.counter}"
        log = self.workdir / f"{name}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "run", "tests.chaos_app:router"],
            env={**self.env, "CHAOS_WORKER": name}, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        )
        worker = Worker(name, proc, log)
        self.workers.append(worker)
        return worker

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def check_deaths(self) -> None:
        for w in self.workers:
            code = w.proc.poll()
            if code is not None and w.signalled is None:
                w.signalled = -1  # report once
                self.unexpected.append(f"{w.name} exited with {code}: {w.log.read_text(errors='replace')[-500:]}")

    async def wait_subscribed(self, worker: Worker, timeout: float = 60) -> None:
        with anyio.fail_after(timeout):
            # A standby member (failover on Apache Pulsar, any group on the embedded broker) is in the group too.
            while not any(word in worker.log.read_text(errors="replace") for word in ("subscribed", "standby")):
                if worker.proc.poll() is not None:
                    return
                await anyio.sleep(0.1)

    async def stop(self, victim: Worker, sig: signal.Signals) -> None:
        kind = "sigkill" if sig == signal.SIGKILL else "sigterm"
        self.events.append((time.time_ns(), kind, victim.name))
        victim.signalled = sig
        victim.proc.send_signal(sig)
        code = await anyio.to_thread.run_sync(lambda: victim.proc.wait(60))
        if kind == "sigterm" and code != 0:
            self.unexpected.append(f"{victim.name} exited {code} after SIGTERM: {victim.log.read_text()[-500:]}")
        self.faults[kind] += 1

    async def roll(self) -> None:
        """One step of a rolling deploy: a new worker joins, then the oldest is stopped gracefully."""
        replacement = self.spawn_worker()
        self.faults["replacement"] += 1
        await self.wait_subscribed(replacement)
        oldest = next(w for w in self.workers if w.proc.poll() is None)
        await self.stop(oldest, signal.SIGTERM)

    async def fault(self) -> None:
        if self.args.schedule == "rolling":
            await self.roll()
            return
        kinds = {"sigkill": 4, "sigterm": 3, "broker-restart": 2, **CLUSTER_FAULTS}
        kinds = {k: w for k, w in kinds.items() if k in self.args.faults}
        if self.args.schedule == "cycle":  # each fault in turn: a short run still has every one
            kind = list(kinds)[sum(self.faults[k] for k in kinds) % len(kinds)]
        else:
            kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        live = self.live()
        if kind in ("sigkill", "sigterm") and live:
            await self.stop(self.rng.choice(live), signal.SIGKILL if kind == "sigkill" else signal.SIGTERM)
            replacement = self.spawn_worker()
            self.faults["replacement"] += 1
            await self.wait_subscribed(replacement)
        elif kind in BROKER_FAULTS:
            began = time.time_ns()
            self.events.append((began, kind, ""))
            await anyio.to_thread.run_sync(self.broker.restart if kind == "broker-restart" else self.cluster_fault, kind)
            self.windows.append((began, time.time_ns(), kind))
            self.faults[kind] += 1

    def cluster_fault(self, kind: str) -> None:
        """One fault of the cluster's: its brokers and bookies die, stop, restart; topics move."""
        broker, topic = self.broker, self.env["CHAOS_TOPIC"]
        path = f"persistent/public/default/{topic}"
        if kind in ("owner-kill", "owner-term"):
            owner = broker.cluster("owner", topic)
            broker.cluster("kill" if kind == "owner-kill" else "term", owner)
            time.sleep(self.rng.uniform(2, 6))  # down a while: its topics move to the others meanwhile
            broker.cluster("restart", owner)
        elif kind == "rolling-restart":
            for name in broker.state["brokers"]:
                broker.cluster("restart", name)
        elif kind == "topic-unload":
            broker.admin("PUT", f"/admin/v2/{path}/unload")
        elif kind == "bundle-split":
            bundle = broker.admin("GET", f"/lookup/v2/topic/{path}/bundle").strip('"')
            broker.admin("PUT", f"/admin/v2/namespaces/public/default/{bundle}/split?unload=true")
        elif kind == "bookie-kill":
            victim = self.rng.choice([n for n in broker.state["ports"] if n.startswith("bookie")])
            broker.cluster("kill", victim)
            time.sleep(self.rng.uniform(2, 6))
            broker.cluster("restart", victim)

    def cause(self, first: list[str], again: list[str]) -> str:
        """The fault between a message's first handling and its next one that explains the second."""
        start, end, worker = int(first[0]), int(again[0]), first[5]
        if len(first) > 6 and len(again) > 6 and first[4] == again[4] and first[6] != again[6]:
            # Stored twice: a publish whose receipt was lost with its connection, resent (not on public/dedup).
            return "publish-resent"
        between = [(kind, name) for t, kind, name in self.events if start < t <= end]
        if ("sigkill", worker) in between:
            return "sigkill"
        # Handled while its consumer was still reconnecting after a broker fault: the acknowledgement went
        # nowhere, so the message comes again whatever ends the worker next (a SIGTERM included).
        during = self.broker_fault(start, start)
        if during:
            return during
        if ("sigterm", worker) in between:
            return "sigterm"
        return self.broker_fault(start, end) or "none"

    def broker_fault(self, start: int, end: int) -> str:
        """The broker fault under way between `start` and `end`, or whose consumers were still reconnecting.

        An acknowledgement sent while its consumer is disconnected is lost and the broker sends the message
        again (measured within 10 ms of a topic unload on scripts/pulsar-cluster). The client retries a
        connection with a doubling backoff, so after an outage of d seconds its consumers may take up to
        about d more to come back (retries 0.1 s apart, doubling: 16 s down, the next try about 25 s after it went;
        a 600 s `--app` run on Apache Pulsar had 104 messages handled 6 s after the broker was back, SIGTERMed 2 s
        later, and sent again).
        """
        for began, ended, fault in self.windows:
            if began <= end and ended + max(RECONNECT_NS, (ended - began) * 6 // 5) >= start:
                return fault
        return ""


#: The cluster's faults (`--broker cluster`), by weight: each also attributes the duplicates it causes.
CLUSTER_FAULTS = {"owner-kill": 2, "owner-term": 2, "rolling-restart": 1, "topic-unload": 2, "bundle-split": 1,
                  "bookie-kill": 1}
BROKER_FAULTS = ("broker-restart", *CLUSTER_FAULTS)
RECONNECT_NS = 10 * 10**9


def read_lines(pattern: str, workdir: Path) -> list[list[str]]:
    out = []
    for path in sorted(workdir.glob(pattern)):
        out += [line.split() for line in path.read_text().splitlines() if line.strip()]
    return out


async def harness(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="chaos-"))
    broker = Broker(args.broker, workdir)
    broker.start()
    topic = f"chaos-{args.seed}-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVENTBUS_", "MQ_NAME_SERVER", "PULSAR_JWT"))}
    # The embedded broker as users run it: every process joins it through its data directory
    # (and takes turns on a subscription with the lease), not by URL.
    where = {"EVENTBUS_DATA_DIR": str(workdir / "broker")} if args.broker == "embedded" else {"EVENTBUS_URL": broker.url}
    env.update(
        **where, EVENTBUS_TOKEN=broker.token, CHAOS_DIR=str(workdir), CHAOS_TOPIC=topic,
        PYTHONPATH=str(ROOT), CHAOS_BROKER=args.broker, EVENTBUS_SHUTDOWN_DRAIN_TIMEOUT="10",
        EVENTBUS_LOG_LEVEL="INFO", CHAOS_SUBSCRIPTION=args.subscription,
    )
    if args.broker != "cluster":
        # A restarted single broker is the same broker: a publish it did not confirm fails fast and is counted.
        # On the cluster the default publish deadline stands: a failover must cost latency, not errors.
        env["EVENTBUS_PRODUCER_SEND_TIMEOUT_MS"] = "10000"
    if args.odd:
        env["CHAOS_ODD"] = "1"
    if args.app:
        env["CHAOS_APP"] = "1"
    namespace = args.namespace or ("dedup" if args.once else "default")
    env["EVENTBUS_NAMESPACE"] = namespace
    if args.once:
        env["CHAOS_ONCE"] = "1"
        if args.broker != "embedded":  # the workers ask the admin API whether the namespace deduplicates
            state = broker.state
            urls = [b["web_url"] for b in state["brokers"].values()] if "brokers" in state else [state["admin_url"]]
            env.update(EVENTBUS_ADMIN_URL=",".join(urls), EVENTBUS_ADMIN_TOKEN=state["admin_token"])
    run = Run(args, workdir, broker, env, random.Random(args.seed))
    settings = (
        Settings(_env_file=None, data_dir=workdir / "broker", namespace=namespace) if args.broker == "embedded"
        else Settings(_env_file=None, url=broker.url, token=broker.token or None, namespace=namespace)
    )
    dead: list[Message] = []
    router = Router()

    @router.subscribe(settings.topic(topic) + "-chaos-DLQ", "chaos-check", initial_position="earliest")
    async def read_dlq(data: bytes, msg: Message) -> None:
        dead.append(msg)

    dead_requests: list[Message] = []
    if args.app:

        @router.subscribe(settings.topic(topic + "-ask") + "-chaos-answer-DLQ", "chaos-check", initial_position="earliest")
        async def read_request_dlq(data: bytes, msg: Message) -> None:
            dead_requests.append(msg)

    started = time.monotonic()
    publishers: list[subprocess.Popen] = []
    if args.once:  # as a consumer of the outputs would: Apache Pulsar trims a topic nobody subscribes to
        await outputs_subscription(broker, settings.topic(topic + "-out"))
    try:
        for _ in range(args.workers):
            run.spawn_worker()
        for w in list(run.workers):
            await run.wait_subscribed(w)
        for pub in range(1, args.publishers + 1):
            publishers.append(subprocess.Popen(
                [sys.executable, "-m", "tests.chaos", "publish", "--id", str(pub), "--seconds", str(args.seconds),
                 "--keys", str(args.keys), "--rate", str(args.rate), "--seed", str(args.seed)],
                env=env, stdout=open(workdir / f"publisher-{pub}.log", "ab"), stderr=subprocess.STDOUT,
            ))
        while any(p.poll() is None for p in publishers):
            await anyio.sleep(run.rng.uniform(*args.fault_interval))
            run.check_deaths()
            if any(p.poll() is None for p in publishers):
                await run.fault()
        for pub, p in enumerate(publishers, 1):
            if p.returncode != 0:
                run.unexpected.append(f"publisher {pub} exited {p.returncode}: {(workdir / f'publisher-{pub}.log').read_text()[-800:]}")

        confirmed = read_lines("confirmed-*.log", workdir)
        must_handle = {(int(p), k, int(s)) for p, k, s, kind in confirmed if kind in ("ok", "transient", "cancelled", "base")}
        must_die = {(int(p), k, int(s)) for p, k, s, kind in confirmed if kind in ("always", "surrogate")}
        poison = {f"{p}-{s}" for p, k, s, kind in confirmed if kind == "poison"}

        def handled(pattern: str = "handled-*.log") -> dict[tuple[int, str, int], list[list[str]]]:
            out: dict[tuple[int, str, int], list[list[str]]] = collections.defaultdict(list)
            for line in read_lines(pattern, workdir):
                out[(int(line[1]), line[2], int(line[3]))].append(line)
            return out

        must_batch = (must_handle | must_die) if args.app else set()

        def dead_ids() -> tuple[set[tuple[int, str, int]], set[str]]:
            events, poisons = set(), set()
            for m in dead:
                if "poison" in m.properties:
                    poisons.add(m.properties["poison"])
                else:
                    body = json.loads(m.data)
                    events.add((body["pub"], body["key"], body["seq"]))
            return events, poisons

        async with EventBus(settings, routers=[router]) as bus:
            async with anyio.create_task_group() as tg:
                await tg.start(lambda task_status: bus.run(handle_signals=False, task_status=task_status))
                with anyio.move_on_after(args.drain_timeout):
                    while True:
                        h = handled()
                        events, poisons = dead_ids()
                        if (
                            must_handle <= (h.keys() | events) and must_die <= events and poison <= poisons
                            and must_batch <= handled("batch-*.log").keys()
                        ):
                            break
                        run.check_deaths()
                        await anyio.sleep(0.5)
                bus.stop()
        for w in run.live():
            w.signalled = signal.SIGTERM
            w.proc.send_signal(signal.SIGTERM)
        for w in run.workers:
            code = await anyio.to_thread.run_sync(lambda w=w: w.proc.wait(60))
            if w.signalled == signal.SIGTERM and code != 0:
                run.unexpected.append(f"{w.name} exited {code} after the final SIGTERM")
        stored_outputs = stored_by_key(broker, settings.topic(topic + "-out")) if args.once else {}
    finally:
        for p in publishers:
            if p.poll() is None:
                p.kill()
        for w in run.workers:
            if w.proc.poll() is None:
                w.proc.kill()
        if not args.keep_broker:
            broker.stop()

    (workdir / "faults.json").write_text(json.dumps({"events": run.events, "windows": run.windows}))
    h = handled()
    events, poisons = dead_ids()
    lost = sorted((must_handle - h.keys() - events) | (must_die - events))
    poison_missing = sorted(poison - poisons)
    violations, causes, handlings = examine(h, run)
    # The embedded broker's order under SIGKILL is best effort (docs, Guarantees: "Left open"): counted, not failed.
    killed_order = [v for v in violations if broker.kind == "embedded" and held_by_the_killed(h, run, v[0], v[2])]
    violations = [v for v in violations if v not in killed_order]
    failed = read_lines("failed-*.log", workdir)
    batch_rows: list[tuple[str, object]] = []
    request_failures = 0
    faulted = [f for f in BROKER_FAULTS if f in args.faults] if args.broker != "embedded" else ["broker-restart"]
    wrongly_dead = sorted(events & must_handle) if args.app else []
    if args.app:
        hb = handled("batch-*.log")
        batch_lost = sorted(must_batch - hb.keys())
        batch_violations, batch_causes, batch_handlings = examine(hb, run)
        lost += batch_lost
        violations += batch_violations
        causes["sigterm"] += batch_causes["sigterm"]
        batch_rows = [
            ("batch group: handled (distinct)", len(hb)), ("  duplicates (extra handlings)", batch_handlings - len(hb)),
        ] + [(f"    after {cause}", batch_causes[cause]) for cause in ("sigkill", "sigterm", *faulted, "publish-resent", "none")] + [
            ("  lost", len(batch_lost)), ("  order violations", len(batch_violations)),
            ("dead-lettered though handleable", len(wrongly_dead)),
        ]
        request_rows, request_failures = requests_report(workdir, run, h.keys() & must_handle, dead_requests)
        batch_rows += request_rows
    output_failures = 0
    if args.once:
        deduplicated = namespace == "dedup" and args.broker != "embedded"  # pulsar-lite does not deduplicate
        output_rows, output_failures = outputs_report(stored_outputs, h.keys() & must_handle, deduplicated)
        batch_rows += output_rows
    rows = [
        ("broker", broker.kind), ("seconds", f"{time.monotonic() - started:.0f}"), ("seed", args.seed),
        ("published (attempted)", len(confirmed) + len(failed)), ("confirmed", len(confirmed)),
        ("publish errors (unconfirmed, raised)", len(failed)),
        ("publish latency p99 / longest (s)", latency_summary(workdir)),
        ("handled (distinct)", len(h)), ("duplicates (extra handlings)", handlings - len(h)),
    ] + [(f"  after {cause}", causes[cause]) for cause in ("sigkill", "sigterm", *faulted, "publish-resent", "none")] + [
        ("dead-lettered", len(dead)), ("  of which poison", len(poisons)), ("  of which always-failing", len(events & must_die)),
        ("lost", len(lost)), ("order violations", len(violations)),
        ("order after SIGKILL (embedded)", len(killed_order)),
        ("poison not dead-lettered", len(poison_missing)),
        ("unexpected deaths", len(run.unexpected)),
    ] + batch_rows + [(f"faults: {k}", v) for k, v in sorted(run.faults.items())]
    width = max(len(str(k)) for k, _ in rows)
    print(f"\nchaos run, work dir {workdir}")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    for item in lost[:10]:
        print(f"  LOST {item}")
    for item in violations[:10]:
        print(f"  ORDER {item}")
    for item in killed_order[:10]:
        print(f"  ORDER AFTER SIGKILL (embedded, best effort) {item}")
    for item in run.unexpected[:5]:
        print(f"  DIED {item}")
    if causes["sigterm"]:
        print(f"  DUPLICATED BY SIGTERM {causes['sigterm']}: a graceful stop handed over messages it had handled")
    rolling_duplicates = args.schedule == "rolling" and handlings > len(h)
    if rolling_duplicates:
        print(f"  DUPLICATED IN A ROLLING DEPLOY {handlings - len(h)}")
    failing = lost or violations or poison_missing or run.unexpected or causes["sigterm"] or rolling_duplicates
    return 1 if failing or wrongly_dead or request_failures or output_failures else 0


async def outputs_subscription(broker: Broker, topic: str) -> None:
    from .conftest import raw_client

    client = raw_client(broker.url, broker.token or None)
    try:
        client.subscribe(topic, "chaos-outputs", initial_position=__import__("pulsar").InitialPosition.Earliest).close()
    finally:
        client.close()


def stored_by_key(broker: Broker, topic: str) -> dict[tuple[int, str], list[tuple[tuple[int, ...], int, int]]]:
    """`--once`: every output stored on `topic`, read back with the raw client: (pub, key) -> [(place, seq, part)]."""
    from .conftest import raw_client, read_messages

    client = raw_client(broker.url, broker.token or None)
    found: dict[tuple[int, str], list[tuple[tuple[int, ...], int, int]]] = collections.defaultdict(list)
    try:
        for message in read_messages(client, topic):
            mid, body = message.message_id(), json.loads(message.data())
            place = (mid.ledger_id(), mid.entry_id(), mid.batch_index())
            found[(body["pub"], body["key"])].append((place, body["seq"], body["part"]))
    finally:
        client.close()
    return found


def outputs_report(
    stored: dict[tuple[int, str], list[tuple[tuple[int, ...], int, int]]], handled: set[tuple[int, str, int]],
    deduplicated: bool,
) -> tuple[list[tuple[str, object]], int]:
    """`--once`: each handled message's two outputs, stored once (on a namespace that deduplicates), each key's in
    the order of its messages; the rows and how many failures."""
    copies = collections.Counter((pub, key, seq, part) for (pub, key), rows in stored.items() for _, seq, part in rows)
    expected = {(pub, key, seq, part) for pub, key, seq in handled for part in (1, 2)}
    missing = sorted(expected - copies.keys())
    twice = sum(n - 1 for n in copies.values())
    disorder = []
    for (pub, key), rows in stored.items():
        seen = [(seq, part) for _, seq, part in sorted(rows)]
        firsts = [item for index, item in enumerate(seen) if item not in seen[:index]]
        disorder += [((pub, key), a, b) for a, b in zip(firsts, firsts[1:]) if b < a]
    for item in missing[:10]:
        print(f"  OUTPUT MISSING {item}")
    for item in disorder[:10]:
        print(f"  OUTPUT ORDER {item}")
    rows: list[tuple[str, object]] = [
        ("outputs stored (distinct)", len(copies)), ("  missing", len(missing)),
        (f"  stored twice{'' if deduplicated else ' (no deduplication: at least once)'}", twice),
        ("  order violations", len(disorder)),
    ]
    return rows, len(missing) + len(disorder) + (twice if deduplicated else 0)


def requests_report(
    workdir: Path, run: Run, handled: set[tuple[int, str, int]], dead_requests: list[Message]
) -> tuple[list[tuple[str, object]], int]:
    """The app mode's request/reply between groups: its report rows and how many of them fail the run.

    Each request message's answers are grouped by its message id: one request answered twice is a
    redelivery (attributed to the fault between, a SIGTERM failing the run); an input asking again after
    it was handled again or its request timed out is a new request, counted apart.
    """
    answered = read_lines("answered-*.log", workdir)
    asked = read_lines("asked-*.log", workdir)
    by_request: dict[str, list[list[str]]] = collections.defaultdict(list)
    for line in answered:
        by_request[line[6]].append(line)
    causes: collections.Counter[str] = collections.Counter()
    for lines in by_request.values():
        lines.sort(key=lambda line: int(line[0]))
        for first, again in zip(lines, lines[1:]):
            causes[run.cause(first, again)] += 1
    inputs = {(int(line[1]), line[2], int(line[3])) for line in answered}
    unanswered = sorted(handled - inputs)
    lies = [line for line in asked if len(line) > 5 and line[5] == "lie"]
    timeouts = [line for line in asked if len(line) > 5 and line[5] == "timeout"]
    for item in unanswered[:5]:
        print(f"  HANDLED WITHOUT AN ANSWER {item}")
    for line in lies[:5]:
        print(f"  LIE {' '.join(line)}")
    rows: list[tuple[str, object]] = [
        ("requests asked", len(asked) - len(lies) - len(timeouts)), ("  answered (distinct requests)", len(by_request)),
        ("  answered more than once", sum(causes.values())),
    ] + [(f"    after {cause}", causes[cause])
         for cause in ("sigkill", "sigterm", *BROKER_FAULTS, "publish-resent", "none") if causes[cause] or cause == "sigterm"] + [
        ("  timed out (the input retried)", len(timeouts)), ("  dead-lettered", len(dead_requests)),
        ("  replies naming another request", len(lies)), ("  inputs handled with no answer", len(unanswered)),
    ]
    return rows, len(unanswered) + len(lies) + len(dead_requests) + causes["sigterm"]


def latency_summary(workdir: Path) -> str:
    """The publishers' confirmation times: the 99th percentile and the longest (a failover's stall)."""
    times = sorted(float(line[0]) for line in read_lines("latency-*.log", workdir))
    if not times:
        return "-"
    return f"{times[int(len(times) * 0.99)]:.2f} / {times[-1]:.2f}"


def held_by_the_killed(handled: dict[tuple[int, str, int], list[list[str]]], run: Run, key: object, late: int) -> bool:
    """Whether a late message of an order violation was in the hands of a SIGKILLed worker: the key's last message
    handled before it (always-failing ones never are) was first handled by a worker SIGKILLed before the late
    one's first handling. On the embedded broker such a message can come back seconds after the key's newer ones
    (docs, Guarantees "Left open": pulsar-lite hands a dead consumer's messages back late), a broker fault the bus
    cannot see."""
    pub, name = key  # type: ignore[misc]
    earlier = [seq for seq in range(late - 1, max(late - 50, -1), -1) if (pub, name, seq) in handled]
    before, after = handled.get((pub, name, earlier[0])) if earlier else None, handled.get((pub, name, late))
    if not before or not after:
        return False
    first = min(before, key=lambda line: int(line[0]))
    late_at = min(int(line[0]) for line in after)
    return any(
        fault == "sigkill" and who == first[5] and int(first[0]) < at < late_at for at, fault, who in run.events
    )


def examine(
    handled: dict[tuple[int, str, int], list[list[str]]], run: Run
) -> tuple[list[tuple[object, int, int]], collections.Counter[str], int]:
    """Per-key order violations (by each message's first handling), the cause of every extra handling, and
    how many handlings there were."""
    first: dict[tuple[int, str], list[tuple[int, int]]] = collections.defaultdict(list)
    for (pub, key, seq), lines in handled.items():
        first[(pub, key)].append((min(int(line[0]) for line in lines), seq))
    violations: list[tuple[object, int, int]] = []
    for key, seen in first.items():
        seqs = [seq for _, seq in sorted(seen)]
        violations += [(key, a, b) for a, b in zip(seqs, seqs[1:]) if b < a]
    causes: collections.Counter[str] = collections.Counter()
    for lines in handled.values():
        lines = sorted(lines, key=lambda line: int(line[0]))
        for first_line, again in zip(lines, lines[1:]):
            causes[run.cause(first_line, again)] += 1
    return violations, causes, sum(len(v) for v in handled.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "publish"])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--broker", choices=["embedded", "pulsar", "cluster"], default="embedded")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--keys", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200.0, help="messages per second per publisher")
    parser.add_argument("--fault-interval", type=float, nargs=2, default=(3.0, 8.0))
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--faults", nargs="+", default=None,
                        help="sigkill sigterm broker-restart (default); on the cluster sigkill sigterm and "
                        + " ".join(CLUSTER_FAULTS))
    parser.add_argument("--keep-broker", action="store_true", help="leave the broker running, to inspect it")
    parser.add_argument("--id", type=int, default=1)
    parser.add_argument("--odd", action="store_true", help="odd exceptions, error texts and keys (see above)")
    parser.add_argument("--app", action="store_true", help="workers built as a service: lifespan, middleware, a batch group")
    parser.add_argument("--subscription", choices=["key_shared", "failover"], default="key_shared")
    parser.add_argument("--once", action="store_true",
                        help="the first group's handler stores two outputs effectively once (on public/dedup)")
    parser.add_argument("--namespace", default=None, help="the run's namespace (default: dedup with --once, else default)")
    parser.add_argument("--schedule", choices=["chaos", "rolling", "cycle"], default="chaos",
                        help="rolling: only a rolling deploy (a new worker, then SIGTERM to the oldest), under load; "
                        "cycle: the --faults in turn rather than at random")
    args = parser.parse_args()
    if args.faults is None:
        args.faults = ["sigkill", "sigterm", *(CLUSTER_FAULTS if args.broker == "cluster" else ["broker-restart"])]
    if args.mode == "publish":
        asyncio.run(publisher(args.id, args.seconds, args.keys, args.rate, args.seed, Path(os.environ["CHAOS_DIR"])))
        return
    sys.exit(asyncio.run(harness(args)))


if __name__ == "__main__":
    main()
