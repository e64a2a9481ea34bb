#!/usr/bin/python3
"""The Python pools as benchmark peers of pgrt (run by benches/bench.py).

Runs one measurement and prints one JSON object. The workloads mirror pgrt_benchmarks.cpp:

  uncontended  acquire + release with an idle connection available, no query: ns per cycle
  handoff      W tasks on a max-3 pool, each holding its lease across one event-loop yield
  select1      T tasks on a max-3 pool: acquire, prepared SELECT 1, release

Drivers:
  asyncpg          asyncpg's pool on uvloop, default configuration: every release runs the reset
                   query (a round trip)
  asyncpg-noreset  the same with the reset query turned off (a ROLLBACK is still sent when a
                   transaction was left open), the fast configuration
  psycopg          psycopg 3's AsyncConnectionPool on asyncio, its connections in autocommit (so
                   each request is one round trip, as for the others); Debian's psycopg is the
                   pure-Python build (no C acceleration)

Must run under Debian's /usr/bin/python3, which sees python3-asyncpg, python3-uvloop and
python3-psycopg-pool.
"""

import argparse
import asyncio
import json
import math
import sys
import time

POOL_MAX = 3


class Histogram:
    """Log-linear buckets (16 per power of two of nanoseconds), as the C++ benchmarks keep."""

    def __init__(self):
        self.buckets = {}
        self.count = 0

    def record(self, ns):
        ns = max(int(ns), 1)
        power = ns.bit_length() - 1
        sub = (ns >> (power - 4)) & 15 if power >= 4 else 0
        key = power * 16 + sub
        self.buckets[key] = self.buckets.get(key, 0) + 1
        self.count += 1

    def percentile_us(self, fraction):
        if self.count == 0:
            return 0.0
        wanted = math.ceil(fraction * self.count)
        seen = 0
        for key in sorted(self.buckets):
            seen += self.buckets[key]
            if seen >= wanted:
                power, sub = divmod(key, 16)
                low = (16 + sub) * 2.0 ** (power - 4) if power >= 4 else 2.0**power
                return low / 1000.0
        return 0.0

    def report(self, prefix):
        return {
            f"{prefix}_p50_us": self.percentile_us(0.50),
            f"{prefix}_p99_us": self.percentile_us(0.99),
            f"{prefix}_p999_us": self.percentile_us(0.999),
        }


# --- the pools behind one interface: open(), acquire() as an async context manager, close() ------


class AsyncpgPool:
    def __init__(self, args, reset):
        import asyncpg

        class NoResetConnection(asyncpg.Connection):
            # asyncpg 0.27 has no pool option to skip the reset; an empty reset query does it.
            def _get_reset_query(self):
                return ""

        self.asyncpg = asyncpg
        self.connection_class = asyncpg.Connection if reset else NoResetConnection
        self.args = args

    async def open(self):
        self.pool = await self.asyncpg.create_pool(
            host=self.args.socket_dir,
            port=self.args.port,
            user="postgres",
            database="postgres",
            min_size=POOL_MAX,
            max_size=POOL_MAX,
            connection_class=self.connection_class,
        )

    def acquire(self):
        return self.pool.acquire()

    async def select1(self, conn):
        # fetchval prepares the statement once and reuses it (asyncpg's statement cache).
        return await conn.fetchval("SELECT 1")

    async def close(self):
        await self.pool.close()


class PsycopgPool:
    def __init__(self, args):
        from psycopg_pool import AsyncConnectionPool

        self.pool = AsyncConnectionPool(
            f"host={args.socket_dir} port={args.port} user=postgres dbname=postgres",
            min_size=POOL_MAX,
            max_size=POOL_MAX,
            # Autocommit, as pgrt and asyncpg run: psycopg's default would wrap every request in
            # BEGIN ... COMMIT (three round trips instead of one).
            kwargs={"autocommit": True},
            open=False,
        )

    async def open(self):
        await self.pool.open(wait=True)

    def acquire(self):
        return self.pool.connection()

    async def select1(self, conn):
        cursor = await conn.execute("SELECT 1", prepare=True)
        return await cursor.fetchone()

    async def close(self):
        await self.pool.close()


def make_pool(args):
    if args.driver == "asyncpg":
        return AsyncpgPool(args, reset=True)
    if args.driver == "asyncpg-noreset":
        return AsyncpgPool(args, reset=False)
    if args.driver == "psycopg":
        return PsycopgPool(args)
    raise SystemExit(f"python_pools.py: unknown driver {args.driver!r}")


# --- the workloads ---------------------------------------------------------------------------------


async def uncontended(pool, args):
    async with pool.acquire():
        pass  # the connection is open and idle from here
    cycles = 0
    started = time.perf_counter_ns()
    until = started + int(args.seconds * 1e9)
    while True:
        for _ in range(100):
            async with pool.acquire():
                pass
        cycles += 100
        now = time.perf_counter_ns()
        if now >= until:
            break
    return {"ns_per_cycle": (now - started) / cycles, "cycles": cycles}


async def closed_loop(pool, args, tasks, body):
    """`tasks` coroutines loop acquire -> body -> release for the window."""
    latencies = Histogram()
    completions = [0] * tasks
    until = time.perf_counter_ns() + int(args.seconds * 1e9)

    async def worker(index):
        while time.perf_counter_ns() < until:
            asked = time.perf_counter_ns()
            await body(latencies, asked)
            completions[index] += 1

    started = time.perf_counter_ns()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    seconds = (time.perf_counter_ns() - started) / 1e9
    return latencies, completions, seconds


async def handoff(pool, args):
    async def body(waits, asked):
        async with pool.acquire():
            waits.record(time.perf_counter_ns() - asked)
            await asyncio.sleep(0)

    waits, completions, seconds = await closed_loop(pool, args, args.tasks, body)
    result = {
        "acquires_per_s": waits.count / seconds,
        "fairness_min_over_max": min(completions) / max(completions) if max(completions) else 0.0,
    }
    result.update(waits.report("wait"))
    return result


async def select1(pool, args):
    async def body(latencies, asked):
        async with pool.acquire() as conn:
            await pool.select1(conn)
        latencies.record(time.perf_counter_ns() - asked)

    latencies, _, seconds = await closed_loop(pool, args, args.tasks, body)
    result = {"queries_per_s": latencies.count / seconds}
    result.update(latencies.report("latency"))
    return result


async def main(args):
    pool = make_pool(args)
    await pool.open()
    try:
        workload = {"uncontended": uncontended, "handoff": handoff, "select1": select1}[args.workload]
        result = await workload(pool, args)
    finally:
        await pool.close()
    result.update(driver=args.driver, workload=args.workload, tasks=args.tasks)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--driver", required=True, choices=["asyncpg", "asyncpg-noreset", "psycopg"])
    parser.add_argument("--workload", required=True, choices=["uncontended", "handoff", "select1"])
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--socket-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    if arguments.driver.startswith("asyncpg"):
        import uvloop

        uvloop.install()
    try:
        asyncio.run(main(arguments))
    except Exception as error:  # one line the orchestrator can show
        print(f"python_pools.py: {arguments.driver} {arguments.workload}: {error!r}", file=sys.stderr)
        sys.exit(1)
