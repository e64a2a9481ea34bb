#!/usr/bin/python3
"""Runs pgrt's benchmarks side by side with their peers and writes docs/benchmarks.md.

Called by scripts/bench.sh (which installs the packages and builds the release preset first):

  bench.py --build-dir build/release --docs-dir docs [--repetitions 5] [--seconds 1]

With --baseline-build-dir DIR (scripts/bench.sh --baseline REV builds REV there), it runs only the
pool microbenchmarks (uncontended acquire + release, contended handoff), of both builds, and writes
a comparison to --baseline-report instead of docs/benchmarks.md: see compare_with_baseline().

One throwaway server (pgrt_bench_server) serves every contestant, so all of them see the same
settings. Each repetition runs every contestant once, in the same order (A B C A B C ...), so
drifts in the machine's speed spread over all of them; the report gives the median and the range
(min-max) over the repetitions, and the ratios of the medians.

Contestants:
  pgrt           build/release/benches/pgrt_benchmarks, one benchmark per run (JSON output)
  raw libpq      the BM_RawLibpq* benchmarks of the same binary (blocking libpq, a thread per
                 connection)
  pgbench        from postgresql-15, -n -M prepared, with its own script files
  asyncpg        asyncpg's pool on uvloop, default and with the reset query off (python_pools.py)
  psycopg        psycopg 3's AsyncConnectionPool (pure-Python build) (python_pools.py)
  psql COPY      \\copy of a generated file, for the pending-writes comparison
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PYTHON = "/usr/bin/python3"  # Debian's, which sees python3-asyncpg and python3-psycopg-pool


def precise_timers():
    """In a child before it runs its program: its sleeps end on time (a timer slack of 1 ns,
    prctl(PR_SET_TIMERSLACK), kept across exec), rather than up to the default 50 us late."""
    import ctypes
    PR_SET_TIMERSLACK = 29
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_TIMERSLACK) failed")


def fail(message):
    print(f"bench.py: {message}", file=sys.stderr)
    sys.exit(1)


class Bench:
    def __init__(self, args, server, workdir):
        self.args = args
        self.server = server
        self.workdir = Path(workdir)
        self.binary = Path(args.build_dir) / "benches" / "pgrt_benchmarks"
        self.pgbench = str(Path(server["bin_dir"]) / "pgbench")
        self.psql = str(Path(server["bin_dir"]) / "psql")
        self.env = dict(os.environ)
        self.env.update(
            DATABASE_URL=server["dsn"],
            DATABASE_URL_TCP=server["tcp_dsn"],
            DATABASE_URL_TLS=server["tls_dsn"],
            PGRT_BENCH_SECONDS=str(args.seconds),
            PGRT_LOG_LEVEL="warn",
        )
        self.pgbench_seconds = str(max(1, round(args.seconds)))
        self.scripts = {}
        self.single_task_us = {}  # one task's latency this repetition, for the sustainable rate

    # --- pgrt and raw libpq: one Google Benchmark per run -----------------------------------------

    def pgrt(self, name, extra_env=None, binary=None):
        binary = binary or self.binary
        out = self.workdir / "benchmark.json"  # a file: pgrt's log lines go to stdout
        completed = subprocess.run(
            [str(binary), f"--benchmark_filter={benchmark_filter(name)}",
             f"--benchmark_out={out}", "--benchmark_out_format=json"],
            env=dict(self.env, **(extra_env or {})), capture_output=True, text=True, timeout=300)
        if completed.returncode != 0:
            fail(f"{name} of {binary} failed ({completed.returncode}):\n"
                 f"{completed.stdout[-1000:]}{completed.stderr[-2000:]}")
        report = json.loads(out.read_text())
        runs = [b for b in report["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
        if len(runs) != 1:
            fail(f"the filter for {name} matched {len(runs)} benchmarks, expected 1")
        run = runs[0]
        if run.get("error_occurred"):
            fail(f"{name}: {run.get('error_message')}")
        metrics = {k: v for k, v in run.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if run.get("time_unit") == "ns":
            metrics["ns_per_cycle"] = run["real_time"]
        return metrics

    # --- pgbench --------------------------------------------------------------------------------

    def script(self, name, text):
        if name not in self.scripts:
            path = self.workdir / name
            path.write_text(text)
            self.scripts[name] = str(path)
        return self.scripts[name]

    def pgbench_run(self, script, clients, tcp=False, rate=None, mode="prepared"):
        """tcp: False (unix socket), True or "plain" (TCP without TLS), "tls" (TCP with TLS)."""
        host = "127.0.0.1" if tcp else self.server["socket_dir"]
        # The server offers TLS on TCP: say which one pgbench uses (its default would pick TLS).
        env = dict(os.environ, PGSSLMODE="require" if tcp == "tls" else "disable")
        command = [self.pgbench, "-n", "-M", mode, "-f", script, "-c", str(clients), "-j", "1",
                   "-T", self.pgbench_seconds, "-h", host, "-p", str(self.server["port"]),
                   "-U", "postgres", "postgres"]
        log_prefix = None
        if rate is not None:
            log_prefix = str(self.workdir / f"pgbench_log_{time.monotonic_ns()}")
            command += ["-R", str(int(rate)), "-l", f"--log-prefix={log_prefix}"]
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # Under -R, pgbench's sleeps until its next scheduled transaction end on time, as the
        # posted open loop's arrival thread's do (both set a timer slack of 1 ns): the kernel's
        # default 50 us slack would make the arrivals of either late by up to that much.
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                   cwd=self.workdir, env=env,
                                   preexec_fn=precise_timers if rate is not None else None)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if completed.returncode != 0:
            fail(f"pgbench failed ({completed.returncode}): {' '.join(command)}\n{completed.stderr}")
        tps = re.search(r"^tps = ([0-9.]+)", completed.stdout, re.M)
        if not tps:
            fail(f"no tps in pgbench's output:\n{completed.stdout}")
        metrics = {"tps": float(tps.group(1))}
        # pgbench's CPU per transaction (its connects included: small beside -T seconds).
        user = children_after.ru_utime - children_before.ru_utime
        system = children_after.ru_stime - children_before.ru_stime
        transactions = float(tps.group(1)) * float(self.pgbench_seconds)
        if transactions > 0 and user + system > 0:
            metrics["client_cpu_us"] = (user + system) * 1e6 / transactions
            metrics["client_kernel_share"] = system / (user + system)
        if log_prefix is not None:
            metrics.update(pgbench_log_percentiles(log_prefix))
        return metrics

    def pgbench_select1(self, clients, tcp=False):
        script = self.script("select1.sql", "SELECT 1;\n")
        metrics = self.pgbench_run(script, clients, tcp)
        metrics["queries_per_s"] = metrics.pop("tps")
        return metrics

    def pgbench_pipeline(self, depth, mode):
        script = self.script(f"pipeline{depth}.sql",
                             "\\startpipeline\n" + "SELECT 1;\n" * depth + "\\endpipeline\n")
        return {"statements_per_s": self.pgbench_run(script, 1, mode=mode)["tps"] * depth}

    def pgbench_rate(self, percent):
        rate = self.open_loop_rates.get(percent)
        if not rate:
            fail(f"no pgrt capacity measured yet for the {percent}% open loop")
        script = self.script("select1.sql", "SELECT 1;\n")
        metrics = self.pgbench_run(script, 3, rate=rate)
        metrics["offered_per_s"] = rate
        return metrics

    # --- the sustainable rate -------------------------------------------------------------------

    def note_single_task(self, key, metrics):
        """Keeps one task's latency (unix socket) for the sustainable rate's bar."""
        if key == "pgrt 0":
            self.single_task_us["pgrt"] = metrics["latency_p50_us"]
        elif key == "pgbench 0":
            self.single_task_us["pgbench"] = 1e6 / metrics["queries_per_s"]  # one client: its mean
        return metrics

    def sustainable_rate(self, probe):
        """The highest offered rate (Poisson arrivals) that a contestant sustains, by two bars: p99
        under SUSTAINABLE_FACTOR x the single-task latency (the lower of pgrt's one-task p50 and
        pgbench -c1's mean latency in this repetition, one bar for both), and p50 under the same bar
        (where queueing starts to hold every request up). `probe(rate)` runs one open loop and
        returns its metrics; the rates are SUSTAINABLE_SHARES of pgrt's closed-loop capacity, and a
        rate counts only if it and every lower one pass."""
        if not self.single_task_us or not self.capacity:
            fail("the sustainable rate needs the one-task and the closed-loop overload runs first")
        bar = SUSTAINABLE_FACTOR * min(self.single_task_us.values())
        best = {"latency_p99_us": 0.0, "latency_p50_us": 0.0}
        passing = set(best)  # the bars every rate so far has met
        for share in SUSTAINABLE_SHARES:
            rate = self.capacity * share
            metrics = probe(rate)
            passing = {m for m in passing if metrics[m] < bar}
            if not passing:
                break
            for m in passing:
                best[m] = rate
        return {"sustainable_p99_per_s": best["latency_p99_us"],
                "sustainable_p50_per_s": best["latency_p50_us"], "bar_us": bar}

    # --- the Python pools -----------------------------------------------------------------------

    def python(self, driver, workload, tasks=1):
        completed = subprocess.run(
            [PYTHON, str(HERE / "python_pools.py"), "--driver", driver, "--workload", workload,
             "--tasks", str(tasks), "--seconds", str(self.args.seconds),
             "--socket-dir", self.server["socket_dir"], "--port", str(self.server["port"])],
            capture_output=True, text=True, timeout=300)
        if completed.returncode != 0:
            fail(f"python_pools.py {driver} {workload} failed:\n{completed.stderr[-2000:]}")
        return json.loads(completed.stdout.strip().splitlines()[-1])

    # --- psql COPY and the tables -----------------------------------------------------------------

    def sql(self, statement):
        subprocess.run([self.psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.server["dsn"],
                        "-c", statement], check=True, capture_output=True, timeout=120)

    def psql_copy(self):
        rows = 200_000
        data = self.workdir / "copy_rows.txt"
        if not data.exists():
            payload = "a pending write of about forty bytes...."
            data.write_text("".join(f"{i}\t{payload}\n" for i in range(1, rows + 1)))
        self.sql("DROP TABLE IF EXISTS bench_copy; "
                 "CREATE UNLOGGED TABLE bench_copy (seq bigint PRIMARY KEY, payload text NOT NULL)")
        started = time.perf_counter()
        self.sql(f"\\copy bench_copy FROM '{data}'")
        return {"rows_per_s": rows / (time.perf_counter() - started)}


def benchmark_filter(name):
    """The --benchmark_filter that selects exactly the benchmark `name` of pgrt_benchmarks."""
    return f"^{re.escape(name)}(/iterations:1)?$"


def pgbench_log_percentiles(prefix):
    """Latency percentiles from pgbench's per-transaction logs. With -R each line's latency counts
    from the transaction's scheduled start (schedule lag included), as pgrt's open loop does. The
    values go through the same log-linear histogram as pgrt's and the Python pools' own, so every
    contestant's percentiles are read the same way."""
    from python_pools import Histogram

    histogram = Histogram()
    directory = Path(prefix).parent
    for path in directory.glob(Path(prefix).name + ".*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                histogram.record(int(fields[2]) * 1000)  # microseconds, recorded in ns
        path.unlink()
    if histogram.count == 0:
        fail("pgbench wrote no per-transaction log")
    return histogram.report("latency")


# --- the contest -------------------------------------------------------------------------------------

SAFE = "safe-default"
FAST = "fast"


def contestants(bench):
    """(section, name, label, run) in the order each repetition runs them."""
    items = []

    def add(section, name, label, run):
        items.append((section, name, label, run))

    # 1. Uncontended acquire + release.
    add("uncontended", "pgrt", SAFE, lambda: bench.pgrt("BM_PoolAcquireReleaseUncontended"))
    add("uncontended", "pgrt, timings off (no wait and use time histograms)", FAST,
        lambda: bench.pgrt("BM_PoolAcquireReleaseUncontendedUntimed"))
    add("uncontended", "asyncpg (default: reset query on release)", SAFE,
        lambda: bench.python("asyncpg", "uncontended"))
    add("uncontended", "asyncpg (reset off)", FAST, lambda: bench.python("asyncpg-noreset", "uncontended"))
    add("uncontended", "psycopg_pool (autocommit)", SAFE, lambda: bench.python("psycopg", "uncontended"))
    add("uncontended", FLOOR, FAST, lambda: bench.pgrt("BM_MinimalPoolAcquireReleaseUncontended"))

    # 2. Contended handoff.
    for waiters in HANDOFF_WAITERS:
        add(f"handoff/{waiters}", "pgrt", SAFE, lambda w=waiters: bench.pgrt(f"BM_PoolContendedHandoff/{w}"))
        add(f"handoff/{waiters}", "asyncpg (reset off)", FAST,
            lambda w=waiters: bench.python("asyncpg-noreset", "handoff", w))
        add(f"handoff/{waiters}", "psycopg_pool (autocommit)", SAFE, lambda w=waiters: bench.python("psycopg", "handoff", w))
        add(f"handoff/{waiters}", FLOOR, FAST,
            lambda w=waiters: bench.pgrt(f"BM_MinimalPoolContendedHandoff/{w}"))

    # 3 and 7. Acquire + prepared SELECT 1 + release, unix socket and TCP.
    for tcp in (0, 1):
        transport = "tcp" if tcp else "unix"
        for tasks in (1, 3, 64):
            add(f"select1/{transport}/{tasks}", "pgrt", SAFE,
                lambda t=tasks, c=tcp: bench.note_single_task(
                    f"pgrt {c}" if t == 1 else None, bench.pgrt(f"BM_PoolSelectOne/tasks:{t}/tcp:{c}")))
        add(f"select1/{transport}/1", "pgbench -c1", FAST,
            lambda c=tcp: bench.note_single_task(f"pgbench {c}", bench.pgbench_select1(1, bool(c))))
        add(f"select1/{transport}/3", "pgbench -c3 -j1", FAST, lambda c=tcp: bench.pgbench_select1(3, bool(c)))
        add(f"select1/{transport}/1", "raw libpq, 1 connection", FAST,
            lambda c=tcp: bench.pgrt(f"BM_RawLibpqSelectOne/connections:1/tcp:{c}"))
        add(f"select1/{transport}/3", "raw libpq, 3 connections (3 threads)", FAST,
            lambda c=tcp: bench.pgrt(f"BM_RawLibpqSelectOne/connections:3/tcp:{c}"))
        if tcp:  # the same over TLS (sslmode=verify-full for pgrt and raw libpq, require for pgbench)
            for tasks in (1, 3):
                add(f"select1/tls/{tasks}", "pgrt", SAFE,
                    lambda t=tasks: bench.pgrt(f"BM_PoolSelectOne/tasks:{t}/tcp:2"))
                add(f"select1/tls/{tasks}", f"pgbench -c{tasks}{' -j1' if tasks > 1 else ''}", FAST,
                    lambda t=tasks: {"queries_per_s": bench.pgbench_run(
                        bench.script("select1.sql", "SELECT 1;\n"), t, "tls")["tps"]})
                add(f"select1/tls/{tasks}",
                    "raw libpq, 1 connection" if tasks == 1 else "raw libpq, 3 connections (3 threads)",
                    FAST, lambda t=tasks: bench.pgrt(f"BM_RawLibpqSelectOne/connections:{t}/tcp:2"))
        if not tcp:
            for tasks in (1, 3, 64):
                add(f"select1/unix/{tasks}", "asyncpg (default)", SAFE,
                    lambda t=tasks: bench.python("asyncpg", "select1", t))
                add(f"select1/unix/{tasks}", "asyncpg (reset off)", FAST,
                    lambda t=tasks: bench.python("asyncpg-noreset", "select1", t))
                add(f"select1/unix/{tasks}", "psycopg_pool (autocommit)", SAFE,
                    lambda t=tasks: bench.python("psycopg", "select1", t))

    # 4. Overload: closed loop, then open loops at shares of pgrt's measured capacity, with
    # pgbench -R offered the same rate.
    def pgrt_closed():
        metrics = bench.pgrt("BM_PoolOverloadClosedLoop")
        bench.capacity = metrics["queries_per_s"]  # the open loops of this repetition use it
        return metrics

    add("overload/closed", "pgrt, 256 tasks on 3 connections", SAFE, pgrt_closed)
    add("overload/closed", "asyncpg (reset off), 256 tasks", FAST,
        lambda: bench.python("asyncpg-noreset", "select1", 256))
    for percent in OPEN_LOOP_PERCENTS:
        def pgrt_open(p=percent):
            metrics = bench.pgrt(f"BM_PoolOverloadOpenLoop/percent_of_capacity:{p}",
                                 {"PGRT_BENCH_CAPACITY": str(bench.capacity)})
            bench.open_loop_rates[p] = metrics["offered_per_s"]
            return metrics

        add(f"overload/open/{percent}", "pgrt, open loop", SAFE, pgrt_open)
        add(f"overload/open/{percent}", "pgrt, open loop, arrivals posted from another thread",
            SAFE, lambda p=percent: bench.pgrt(f"BM_PoolOverloadOpenLoopPosted/percent_of_capacity:{p}",
                                               {"PGRT_BENCH_CAPACITY": str(bench.capacity)}))
        add(f"overload/open/{percent}", "pgbench -c3 -j1 -R (same rate)", FAST,
            lambda p=percent: bench.pgbench_rate(p))

    # 4b. The sustainable rate of each, found by search (after the open loops, which measured the
    # capacity it starts from).
    add("overload/sustainable", "pgrt, open loop, arrivals posted from another thread", SAFE,
        lambda: bench.sustainable_rate(lambda rate: bench.pgrt(
            "BM_PoolOverloadOpenLoopPosted/percent_of_capacity:100",
            {"PGRT_BENCH_CAPACITY": str(rate)})))
    add("overload/sustainable", "pgbench -c3 -j1 -R", FAST,
        lambda: bench.sustainable_rate(
            lambda rate: bench.pgbench_run(bench.script("select1.sql", "SELECT 1;\n"), 3, rate=rate)))

    # 5. Pipelined batch on one lease.
    for depth in (10, 100):
        add(f"pipeline/{depth}", "pgrt (prepared statements, the default)", SAFE,
            lambda d=depth: bench.pgrt(f"BM_PoolPipelinedBatch/depth:{d}/prepared:1/sync_each:0"))
        add(f"pipeline/{depth}", "pgbench \\startpipeline -c1 -M prepared", FAST,
            lambda d=depth: bench.pgbench_pipeline(d, "prepared"))
        add(f"pipeline/{depth}", "pgrt, prepare_statements(false) (unnamed)", SAFE,
            lambda d=depth: bench.pgrt(f"BM_PoolPipelinedBatch/depth:{d}/prepared:0/sync_each:0"))
        add(f"pipeline/{depth}", "pgbench \\startpipeline -c1 -M extended", FAST,
            lambda d=depth: bench.pgbench_pipeline(d, "extended"))
    add("pipeline/100", "pgrt, prepared, a sync after each statement (as query() sends them)", SAFE,
        lambda: bench.pgrt("BM_PoolPipelinedBatch/depth:100/prepared:1/sync_each:1"))

    # 8. Statements without a lease: query() on shared connections (max 3), beside a lease per
    # statement and pgbench, 256 callers and 1.
    add("shared/256", "pgrt query(), 256 callers on 3 shared connections", SAFE,
        lambda: bench.pgrt("BM_PoolQueryShared/callers:256/shared:1"))
    add("shared/256", "pgrt, a lease per statement, 256 tasks on 3 connections", SAFE,
        lambda: bench.pgrt("BM_PoolQueryShared/callers:256/shared:0"))
    add("shared/256", "pgbench -c3 -j1 -M prepared", FAST, lambda: bench.pgbench_select1(3))
    add("shared/remote", "pgrt query(), 256 callers, 1 ms each way", SAFE,
        lambda: bench.pgrt("BM_PoolRemote/shared:1"))
    add("shared/remote", "pgrt, a lease per statement, 256 tasks, 1 ms each way", SAFE,
        lambda: bench.pgrt("BM_PoolRemote/shared:0"))
    add("shared/1", "pgrt query(), 1 caller", SAFE,
        lambda: bench.pgrt("BM_PoolQueryShared/callers:1/shared:1"))
    add("shared/1", "pgrt, a lease per statement, 1 task", SAFE,
        lambda: bench.pgrt("BM_PoolSelectOne/tasks:1/tcp:0"))

    # 6. Pending writes.
    add("writes", "pgrt pending writes (COPY batches)", SAFE, lambda: bench.pgrt("BM_PendingWritesRows"))
    add("writes", "single-row autocommit INSERTs (pgrt pool)", SAFE, lambda: bench.pgrt("BM_AutocommitInsertRows"))
    add("writes", "psql \\copy of 200,000 rows", FAST, bench.psql_copy)
    add("shutdown", "pgrt pending writes, stop() with 10,000 pending", SAFE,
        lambda: bench.pgrt("BM_PendingWritesShutdown"))
    return items


OPEN_LOOP_PERCENTS = (25, 50, 80, 95)
SUSTAINABLE_FACTOR = 10  # the sustainable rate keeps p99 under this many single-task latencies
SUSTAINABLE_SHARES = tuple(round(0.1 * i, 1) for i in range(1, 11))  # of pgrt's closed-loop capacity
HANDOFF_WAITERS = (3, 16, 64, 256)
# Benchmarks 1 and 2's floor: MinimalPool in pgrt_benchmarks.cpp, asio with no pool work.
FLOOR = "asio alone: a minimal pool (the floor: no connections, deadlines, stats or events)"


def summarize(samples):
    """{metric: {median, min, max}} over the repetitions."""
    summary = {}
    for metric in samples[0]:
        values = [s[metric] for s in samples if isinstance(s.get(metric), (int, float))]
        if values:
            summary[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


# --- the report ---------------------------------------------------------------------------------------


def number(value):
    if value >= 100_000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(summary, metric):
    entry = summary.get(metric)
    if entry is None:
        return "-"
    return f"{number(entry['median'])} ({number(entry['min'])}-{number(entry['max'])})"


def ratio(value, reference):
    if not reference or not value:
        return "-"
    return f"{value / reference:.2f}x"


class Report:
    def __init__(self, results):
        self.results = results  # section -> [(name, label, summary)]
        self.lines = []

    def table(self, section, metrics, ratio_metric, higher_is_better=True, ratio_title=None):
        rows = self.results.get(section, [])
        if not rows:
            return
        reference = next((s[ratio_metric]["median"] for n, _, s in rows
                          if n.startswith("pgrt") and ratio_metric in s), None)
        title = ratio_title or ("pgrt / this" if higher_is_better else "this / pgrt")
        header = ["contestant", "configuration"] + [m for m in metrics] + [f"{title} ({ratio_metric})"]
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        first_pgrt = next((n for n, _, s in rows if n.startswith("pgrt") and ratio_metric in s), None)
        for name, label, summary in rows:
            value = summary.get(ratio_metric, {}).get("median")
            if value is None:
                fail(f"{name} in {section} reported no {ratio_metric}")
            # The first pgrt row is the reference; a pgrt variant (timings off, arrivals posted
            # from another thread) is compared with it like any other contestant.
            if name == first_pgrt:
                shown = "1.00x (reference)"
            elif reference is None:
                shown = "-"
            elif higher_is_better:
                shown = ratio(reference, value)
            else:
                shown = ratio(value, reference)
            self.lines.append("| " + " | ".join([name, label] + [cell(summary, m) for m in metrics] + [shown]) + " |")
        self.lines.append("")

    def text(self, *paragraphs):
        for paragraph in paragraphs:
            self.lines.append(paragraph)
            self.lines.append("")


def write_plot(results, docs_dir, workdir):
    """Latency percentiles against offered load (open loop at shares of capacity, then the closed
    overload), for pgrt and pgbench -R; an SVG beside the page."""
    data = workdir / "latency.dat"
    rows = []
    for percent in OPEN_LOOP_PERCENTS:
        entry = {name: summary for name, _, summary in results.get(f"overload/open/{percent}", [])}
        pgrt = next((s for n, s in entry.items() if n.startswith("pgrt")), None)
        pgbench = next((s for n, s in entry.items() if n.startswith("pgbench")), None)
        if pgrt is None or pgbench is None:
            continue

        def median(summary, metric):
            return summary.get(metric, {}).get("median", float("nan"))

        rows.append(f"{percent} " + " ".join(
            f"{median(s, m)}" for s in (pgrt, pgbench)
            for m in ("latency_p50_us", "latency_p99_us", "latency_p999_us")))
    if not rows:
        return None
    data.write_text("\n".join(rows) + "\n")
    svg = Path(docs_dir) / "benchmarks-latency.svg"
    script = f"""
set terminal svg size 760,440 dynamic font 'sans,11'
set output '{svg}'
set title 'Acquire + prepared SELECT 1 + release, open loop on 3 connections (median of repetitions)'
set xlabel 'offered load (% of pgrt closed-loop capacity)'
set ylabel 'latency from intended start (us)'
set logscale y
set key top left
set grid
plot '{data}' using 1:2 with linespoints title 'pgrt p50', \\
     '' using 1:3 with linespoints title 'pgrt p99', \\
     '' using 1:4 with linespoints title 'pgrt p99.9', \\
     '' using 1:5 with linespoints dt 2 title 'pgbench -R p50', \\
     '' using 1:6 with linespoints dt 2 title 'pgbench -R p99', \\
     '' using 1:7 with linespoints dt 2 title 'pgbench -R p99.9'
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
    return svg.name


def machine_description():
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores, {cpu}"


def versions(bench):
    def first_line(command):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"

    python = first_line([PYTHON, "-c", "import asyncpg, uvloop, psycopg, psycopg_pool; "
                         "print(f'asyncpg {asyncpg.__version__}, uvloop {uvloop.__version__}, '"
                         "f'psycopg {psycopg.__version__} ({psycopg.pq.__impl__} build), '"
                         "f'psycopg_pool {psycopg_pool.__version__}')"])
    return {"pgbench": first_line([bench.pgbench, "--version"]), "python pools": python}


def transport_ratio_table(report, results, title, base, other, task_counts):
    """One row per contestant and task count measured over both transports: the q/s of each and
    their ratio. base and other are (results key, column name), e.g. ("tcp", "TCP")."""
    rows = []
    for tasks in task_counts:
        on_base = {n: s for n, _, s in results.get(f"select1/{base[0]}/{tasks}", [])}
        for name, _, summary in results.get(f"select1/{other[0]}/{tasks}", []):
            if name in on_base and "queries_per_s" in summary and "queries_per_s" in on_base[name]:
                rows.append(f"| {name}, {tasks} task(s) | {cell(on_base[name], 'queries_per_s')} | "
                            f"{cell(summary, 'queries_per_s')} | "
                            f"{ratio(summary['queries_per_s']['median'], on_base[name]['queries_per_s']['median'])} |")
    if rows:
        report.text(title, f"| contestant | {base[1]} q/s | {other[1]} q/s | {other[1]} / {base[1]} |\n"
                           "|---|---|---|---|\n" + "\n".join(rows))


def write_report(results, raw, args, bench, elapsed, plot):
    report = Report(results)
    info = versions(bench)
    report.text(
        "# Benchmarks",
        "Generated by `scripts/bench.sh` (do not edit by hand: rerun it; the numbers below are its own "
        "output). Raw results: [benchmarks.json](benchmarks.json). Where the time of one query goes "
        "(syscalls, wake-ups, allocations, coroutine frames and instructions per query, pgrt against "
        "raw libpq): [performance.md](performance.md), from `scripts/query-cost.sh`.",
        f"- Machine: {machine_description()}. The machine is shared and noisy: read the ratios, "
        "which come from contestants interleaved in the same run, rather than the absolute numbers.\n"
        f"- Server: one throwaway PostgreSQL 15 cluster for every contestant (default settings, "
        f"durable commits), on the same machine; unix socket unless a table says TCP.\n"
        f"- {args.repetitions} repetitions of a {args.seconds} s window per contestant "
        f"(pgbench: -T {bench.pgbench_seconds}, as it takes whole seconds), interleaved "
        "(each repetition runs every contestant once, in the same order). Each cell is the median, "
        "with the range (min-max) over the repetitions in brackets. Latency percentiles of every "
        "contestant come from the same log-linear histogram (16 buckets per power of two, a "
        "bucket's lower bound reported: up to 6% low, alike for all).\n"
        f"- Peers: {info['pgbench']}; {info['python pools']}; raw libpq is blocking `PQexecPrepared` "
        "in a loop, one thread per connection, in the benchmark binary.\n"
        "- Configurations: *safe-default* is what a user gets without tuning (pgrt's defaults, "
        "asyncpg's default reset on release, psycopg_pool's defaults with autocommit on, as pgrt "
        "and asyncpg run); *fast* gives up a safety net or is not a pool at all (asyncpg with its "
        "reset off, pgbench, raw libpq, psql).\n"
        f"- Whole run: {elapsed:.0f} s.")

    report.text("## 1. Uncontended acquire + release, no I/O",
                "An idle connection is available; the loop acquires and releases it without a query. "
                "Goal for pgrt: at most 50 ns. Published figures for comparison: puddle 56 ns, "
                "HikariCP about 140 ns per thread, asyncpg about 10 us. The last row is the floor on "
                "this machine: a minimal pool written on asio alone (`MinimalPool` in "
                "benches/pgrt_benchmarks.cpp), with the same interface (`co_await acquire()` returns "
                "a move-only token, one mutex, FIFO waiters woken by a post) and no pool work at all: "
                "what a coroutine call, its frame and two lock round trips cost here. What pgrt takes "
                "beyond it is its bookkeeping (the state machine's lists and counts, the connection's "
                "state read at its return, and with timings on the wait and use time histograms).")
    report.table("uncontended", ["ns_per_cycle"], "ns_per_cycle", higher_is_better=False)

    report.text("## 2. Contended handoff",
                "max 3 connections, W waiters; each holds its lease across one executor yield "
                "(`co_await post` for pgrt, `asyncio.sleep(0)` for the Python pools). Fairness is the "
                "fewest completions of a waiter divided by the most (1.0 is perfectly fair). The last "
                "row of each table is the floor, the minimal pool of benchmark 1 in the same loop, "
                "with a timer armed as pgrt's upkeep timer is: each cycle takes two trips through the "
                "io_context's queue (the holder's yield, the waiter's wake-up), and with a timer or a "
                "socket registered asio's scheduler looks at its reactor (`epoll_wait`) each time it "
                "gets round its queue, so on a machine where a syscall is dear this row, not the "
                "pool, bounds the rate.")
    for waiters in HANDOFF_WAITERS:
        report.text(f"### W = {waiters}")
        report.table(f"handoff/{waiters}",
                     ["acquires_per_s", "wait_p50_us", "wait_p99_us", "wait_p999_us", "fairness_min_over_max"],
                     "acquires_per_s")

    for transport, number_title in (("unix", "3"), ("tcp", "7")):
        if transport == "unix":
            report.text("## 3. Acquire + prepared `SELECT 1` + release (unix socket)",
                        "max 3 connections for every pool; pgbench and raw libpq have no pool "
                        "(their connections are the tasks). q/s is queries per second.")
        else:
            report.text(f"## {number_title}. Unix socket vs TCP (benchmark 3 over 127.0.0.1)",
                        "The same workload over TCP loopback; the last column compares with the "
                        "same contestant over the unix socket.")
        for tasks in (1, 3, 64):
            report.text(f"### {tasks} task{'s' if tasks > 1 else ''}")
            report.table(f"select1/{transport}/{tasks}", ["queries_per_s", "latency_p50_us", "latency_p99_us"],
                         "queries_per_s")
    transport_ratio_table(report, results, "### TCP / unix socket, q/s", ("unix", "unix"), ("tcp", "TCP"),
                          (1, 3, 64))

    report.text("### TLS (benchmark 3 over 127.0.0.1 with TLS)",
                "pgrt and raw libpq connect with `sslmode=verify-full`, pgbench with `sslmode=require` "
                "(the check is made once, at connect; a query costs the same). The last column compares "
                "with the same contestant over plain TCP.")
    for tasks in (1, 3):
        report.text(f"#### {tasks} task{'s' if tasks > 1 else ''}")
        report.table(f"select1/tls/{tasks}", ["queries_per_s", "latency_p50_us", "latency_p99_us"],
                     "queries_per_s")
    transport_ratio_table(report, results, "#### TLS / plain TCP, q/s", ("tcp", "TCP"), ("tls", "TLS"), (1, 3))

    report.text("## 4. Overload: 256 tasks on 3 connections",
                "Closed loop: every task loops acquire + `SELECT 1` + release as fast as it can.")
    report.table("overload/closed", ["queries_per_s", "latency_p50_us", "latency_p99_us", "latency_p999_us"],
                 "queries_per_s")
    report.text("Open loop: requests arrive at random (Poisson) moments at a mean rate, a share of pgrt's "
                "closed-loop capacity measured just before in the same repetition (the table above); each "
                "request's latency counts from its intended start, so a stall is not hidden (no "
                "coordinated omission). pgbench `-c3 -j1 -R` is offered the same rate, also on a Poisson "
                "schedule; its latencies come from its per-transaction log, which also counts from the "
                "scheduled start. A contestant whose own capacity is below the offered rate falls behind "
                "for the whole window, and its latencies grow with it. pgrt runs twice: once with its "
                "pacer on the io_context's own thread (it yields to the requests between arrivals), and "
                "once with the arrivals posted into the io_context from a thread of their own, as a "
                "network delivers them; the same arrivals (same seed) in both (the thread wakes at the "
                "next arrival and posts it with every later one already due by then). The arrival "
                "thread and pgbench -R both sleep with a timer slack of 1 ns (`PR_SET_TIMERSLACK`), so "
                "that neither's arrivals come up to 50 us late, the kernel's default, as a network's "
                "do not. Where both fall "
                "behind, the collapse is the pool's and not the load generator's. `client_cpu_us`: the "
                "client process's CPU time per request over the window, user and kernel (pgrt: the "
                "pool, the requests and, when posted, the arrival thread; pgbench: its own process), "
                "`generator_cpu_us` the arrival thread's part of it: client and server share the "
                "machine's cores, so what the client spends the server cannot. `delivery_p50_us` and "
                "`delivery_p99_us` (posted arrivals only): how late an arrival reached the io_context's "
                "thread, from its intended start to the moment that thread ran the post bringing it "
                "(the arrival thread's own wake-up, then the io thread's): time spent before the pool "
                "saw the request, and counted in its latency. A network delivers a request with one "
                "wake-up, the io thread's; this generator takes two in series, and its own competes "
                "with the server for the machine's cores. `served_p99_us`: the rest, from that "
                "delivery to the request's end (the wait for a connection, the query, the release): "
                "what the pool and the server took.")
    for percent in OPEN_LOOP_PERCENTS:
        report.text(f"### {percent}% of capacity")
        report.table(f"overload/open/{percent}", ["offered_per_s", "latency_p50_us", "latency_p99_us", "latency_p999_us",
                                                   "delivery_p50_us", "delivery_p99_us", "served_p99_us",
                                                   "client_cpu_us", "generator_cpu_us"],
                     "latency_p99_us", higher_is_better=False, ratio_title="this / pgrt")
    if plot:
        report.text(f"![latency percentiles against offered load]({plot})")
    report.text("### The sustainable rate",
                "The highest offered rate (Poisson arrivals, as above) each contestant sustains, probed at "
                "10%, 20%, ... 100% of pgrt's closed-loop capacity in the same repetition (a rate counts "
                "only if every lower one passed too). The bar is the same for both: "
                f"{SUSTAINABLE_FACTOR}x the single-task latency, the lower of pgrt's one-task p50 and "
                "pgbench `-c1`'s mean latency (benchmark 3) in the same repetition (`bar_us`). "
                "`sustainable_p99_per_s`: p99 under the bar, as issue 12 asks (0 when even the lowest "
                "rate misses it: on a machine whose wake-ups alone put p99 in milliseconds, nobody "
                "meets it). `sustainable_p50_per_s`: the median under the bar, where queueing starts "
                "to hold every request up: the knee of the curve.")
    report.table("overload/sustainable", ["sustainable_p99_per_s", "sustainable_p50_per_s", "bar_us"],
                 "sustainable_p50_per_s")

    report.text("## 5. Pipelined batch on one lease",
                "`depth` statements (`SELECT 1`) sent as one pipeline and read back, in a loop on one "
                "connection; pgbench runs the same batch between `\\startpipeline` and `\\endpipeline`. "
                "pgrt's `Pipeline` runs each statement as a prepared statement from the connection's "
                "cache (the server parses it once per connection), as pgbench `-M prepared` does; with "
                "`prepare_statements(false)` it sends them unnamed (parsed every time), as `-M extended` "
                "does. The last row at depth 100 ends each statement with a sync of its own, as "
                "`query()` does so that an error fails only its own caller: on libpq 15, whose "
                "`PQpipelineSync` flushes, that is one `send` per statement, and on the server one "
                "implicit transaction and one flush of its answers per statement.")
    for depth in (10, 100):
        report.text(f"### depth {depth}")
        report.table(f"pipeline/{depth}", ["statements_per_s"], "statements_per_s")

    report.text("## 6. Pending writes",
                "Rows of (bigint, 40-byte text) into an unlogged table with a primary key. pgrt's pending "
                "writes: 3 producers append for the window, batches go out by COPY, `stop()` flushes the "
                "rest and the time includes it. Autocommit: 3 tasks, one prepared INSERT per row through "
                "the pool. psql: `\\copy` of a 200,000-row file, psql's start-up included.")
    report.table("writes", ["rows_per_s"], "rows_per_s")
    report.text("### Shutdown with 10,000 pending writes",
                "10,000 rows accepted with no flush yet (batch size 10,000, interval 1 h); the time "
                "`stop()` takes to flush them all.")
    report.table("shutdown", ["stop_ms", "flushed"], "stop_ms", higher_is_better=False, ratio_title="-")

    report.text("## 8. Statements without a lease: `query()`",
                "`SELECT 1` through `Pool::query()` (docs/pool.md): the statements of all callers share "
                "the pool's 3 connections through pipelining, each statement in a sync segment of its "
                "own; beside it the same through a lease per statement (benchmark 4's closed loop) and "
                "pgbench with 3 connections. The 1-caller table shows what `query()` costs a lone "
                "statement against a lease (`latency_p50_us`: lower is better). `client_cpu_us`: the "
                "client process's CPU time per statement (user and system; the server's backends are "
                "other processes), and `client_kernel_share` the part of it in the kernel. Client "
                "and server share this machine's CPUs, so what the client spends the server cannot: "
                "`query()` sends each statement with a sync of its own (libpq 15 would send at "
                "every sync; the statements a connection takes together go out in one write: "
                "docs/pool.md), and the server commits an implicit transaction and flushes its "
                "answer per statement (see benchmark 5's sync-per-statement row, a `Pipeline` "
                "that sends at each sync).")
    report.text("### 256 callers")
    report.table("shared/256", ["queries_per_s", "latency_p50_us", "latency_p99_us", "client_cpu_us",
                                "client_kernel_share"], "queries_per_s")
    report.text("### A database in another zone",
                "The same 256 callers on 3 connections over TCP through a proxy that holds each chunk "
                "1 ms in each direction (the test harness's FaultProxy with set_latency): a round trip "
                "of about 2 ms, so a lease per statement is capped near 3 statements per round trip.")
    report.table("shared/remote", ["queries_per_s", "latency_p50_us", "latency_p99_us"], "queries_per_s")
    report.text("### 1 caller")
    report.table("shared/1", ["queries_per_s", "latency_p50_us", "latency_p99_us"], "queries_per_s")

    Path(args.docs_dir, "benchmarks.md").write_text("\n".join(report.lines).rstrip() + "\n")
    Path(args.docs_dir, "benchmarks.json").write_text(json.dumps(raw, indent=1) + "\n")


# --- against a baseline build ---------------------------------------------------------------------

LOWER, HIGHER = "lower", "higher"
HANDOFF_METRICS = [("acquires_per_s", HIGHER), ("wait_p50_us", LOWER), ("wait_p99_us", LOWER),
                   ("fairness_min_over_max", HIGHER)]


def microbenchmarks():
    """(section, benchmark, [(metric, which is better)]): the pool's own cost, without a query."""
    items = [("uncontended", "BM_PoolAcquireReleaseUncontended", [("ns_per_cycle", LOWER)])]
    for waiters in HANDOFF_WAITERS:
        items.append((f"handoff/{waiters}", f"BM_PoolContendedHandoff/{waiters}", HANDOFF_METRICS))
    return items


def listed_benchmarks(binary):
    completed = subprocess.run([str(binary), "--benchmark_list_tests=true"], capture_output=True,
                               text=True, timeout=60)
    if completed.returncode != 0:
        fail(f"{binary} --benchmark_list_tests failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    return completed.stdout.split()


def compare_with_baseline(args, bench, started):
    """Runs the pool microbenchmarks of this build (current) and of --baseline-build-dir's
    (baseline) against the same server. Each repetition runs every benchmark on both builds back to
    back, current first in odd repetitions and baseline first in even ones, so that drifts in the
    machine's speed and any order effect fall on both alike. Writes --baseline-report (Markdown,
    with the raw samples in a .json beside it) and prints it; docs/ is left alone. A benchmark the
    baseline's binary does not have is reported as missing there."""
    baseline = Path(args.baseline_build_dir) / "benches" / "pgrt_benchmarks"
    if not baseline.exists():
        fail(f"no baseline binary {baseline}")
    items = [m for m in microbenchmarks() if m[0].startswith(args.only)]
    if not items:
        fail(f"--only {args.only!r} selects none of the pool microbenchmarks "
             f"({', '.join(m[0] for m in microbenchmarks())})")
    binaries = {"current": bench.binary, "baseline": baseline}
    listed = {build: listed_benchmarks(binary) for build, binary in binaries.items()}

    def present(build, name):
        return any(re.match(benchmark_filter(name), line) for line in listed[build])

    samples = {(name, build): [] for _, name, _ in items for build in binaries}
    for repetition in range(1, args.repetitions + 1):
        print(f"bench.py: repetition {repetition}/{args.repetitions} "
              f"({time.monotonic() - started:.0f} s so far)", file=sys.stderr)
        order = ("current", "baseline") if repetition % 2 else ("baseline", "current")
        for _, name, _ in items:
            for build in order:
                if present(build, name):
                    samples[(name, build)].append(bench.pgrt(name, binary=binaries[build]))

    lines = [
        "# Pool microbenchmarks: current build against a baseline",
        "",
        f"- current: {args.current_name} ({binaries['current']})",
        f"- baseline: {args.baseline_name} ({baseline})",
        f"- Machine: {machine_description()}. One throwaway server for both builds.",
        f"- {args.repetitions} repetitions; handoff windows of {args.seconds} s, the uncontended "
        "loop as long as Google Benchmark runs it. Each repetition runs every benchmark on both "
        "builds back to back, the order alternating (current first, then baseline first).",
        "- Cells: median (min-max) over the repetitions. current / baseline is the ratio of the "
        "medians: read it with the *better* column (for a *lower is better* metric, above 1.00x is "
        "a slowdown). The noise floor is what a build gives against itself (`--baseline HEAD` on a "
        "clean tree): on a shared machine, 10-20 % for throughput and more for p99 waits.",
        f"- Whole run: {time.monotonic() - started:.0f} s.",
        "",
        "| benchmark | metric | better | baseline | current | current / baseline |",
        "|---|---|---|---|---|---|",
    ]
    raw = {"current": args.current_name, "baseline": args.baseline_name,
           "repetitions": args.repetitions, "seconds": args.seconds, "results": []}
    for section, name, metrics in items:
        summaries = {}
        for build in binaries:
            summaries[build] = summarize(samples[(name, build)]) if samples[(name, build)] else None
            raw["results"].append({"benchmark": name, "build": build, "present": present(build, name),
                                   "summary": summaries[build], "samples": samples[(name, build)]})
        for metric, better in metrics:
            cells = {}
            for build, summary in summaries.items():
                if summary is None:
                    cells[build] = f"missing in the {build} build"
                else:
                    cells[build] = cell(summary, metric)
            medians = [summaries[b][metric]["median"] if summaries[b] and metric in summaries[b] else None
                       for b in ("current", "baseline")]
            shown = ratio(*medians) if None not in medians else "-"
            lines.append(f"| {name} | {metric} | {better} | {cells['baseline']} | {cells['current']} | {shown} |")
    report = "\n".join(lines) + "\n"
    path = Path(args.baseline_report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    print(report)
    print(f"bench.py: wrote {path} and {path.with_suffix('.json').name} in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--build-dir", required=True)
    parser.add_argument("--docs-dir", required=True)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--only", default="", help="run only the sections starting with this (or with one of several, comma-separated)")
    parser.add_argument("--baseline-build-dir",
                        help="compare the pool microbenchmarks with this build's instead")
    parser.add_argument("--baseline-name", default="baseline", help="the baseline, for the report")
    parser.add_argument("--current-name", default="current", help="this build, for the report")
    parser.add_argument("--baseline-report", help="where the comparison goes (Markdown)")
    args = parser.parse_args()
    if args.repetitions < 1 or args.seconds <= 0:
        fail("--repetitions must be at least 1 and --seconds positive")
    if args.baseline_build_dir and not args.baseline_report:
        fail("--baseline-build-dir needs --baseline-report")

    started = time.monotonic()
    if not args.baseline_build_dir:
        Path(args.docs_dir).mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([str(Path(args.build_dir) / "benches" / "pgrt_bench_server")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()
    if not line:
        fail("the throwaway server did not start (pgrt_bench_server's error is above)")
    server = json.loads(line)
    try:
        with tempfile.TemporaryDirectory(prefix="pgrt-bench-") as workdir:
            os.chmod(workdir, 0o755)
            bench = Bench(args, server, workdir)
            if args.baseline_build_dir:
                compare_with_baseline(args, bench, started)
                return
            bench.open_loop_rates = {}
            bench.capacity = 0.0
            prefixes = tuple(args.only.split(","))
            items = [c for c in contestants(bench) if c[0].startswith(prefixes)]
            samples = {(section, name): [] for section, name, _, _ in items}
            for repetition in range(1, args.repetitions + 1):
                print(f"bench.py: repetition {repetition}/{args.repetitions} "
                      f"({time.monotonic() - started:.0f} s so far)", file=sys.stderr)
                for section, name, _, run in items:
                    samples[(section, name)].append(run())
            results, raw = {}, {"repetitions": args.repetitions, "seconds": args.seconds, "results": []}
            for section, name, label, _ in items:
                summary = summarize(samples[(section, name)])
                results.setdefault(section, []).append((name, label, summary))
                raw["results"].append({"section": section, "contestant": name, "configuration": label,
                                       "summary": summary, "samples": samples[(section, name)]})
            plot = write_plot(results, args.docs_dir, Path(workdir))
            write_report(results, raw, args, bench, time.monotonic() - started, plot)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    print(f"bench.py: wrote {Path(args.docs_dir, 'benchmarks.md')} in {time.monotonic() - started:.0f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
