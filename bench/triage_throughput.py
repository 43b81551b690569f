"""How many triage decisions one core makes: the prior alone, and the learned router as
the triage worker runs it (per-feature memory in the real Redis, read as a snapshot
refreshed every two seconds, its histogram counts flushed with the refresh), with the
small-tier outcomes that feed it written to Redis as the tier workers write them.

    .venv/bin/python bench/triage_throughput.py [--decisions N] [--rounds 3]

Prompts: the example batch and the held-out routing data, mixed, over 14 features. Uses
BENCH_REDIS_URL (default redis://127.0.0.1:6379/12; the router's keys there are
replaced). One process, one thread: the figures are per core. Prints last
`triage_online_decisions_per_core_s: N` (the target is at least 2,000).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.router import data  # noqa: E402
from workers.router.memory import Outcome, RedisMemory  # noqa: E402
from workers.router.prior import load_prior  # noqa: E402
from workers.router.router import LearnedRouter  # noqa: E402


def prompts() -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    examples = ROOT / "examples" / "jobs.jsonl"
    for line in examples.read_text().splitlines():
        job = json.loads(line)
        text = job.get("prompt") or "\n".join(m["content"] for m in job.get("messages", []))
        rows.append((text, job["feature"]))
    if data.DEFAULT_DIR.is_dir():
        rows += [(r.prompt, r.task) for r in data.split(data.load(data.DEFAULT_DIR))[1]]
    return rows


def rates(n: int, rounds: int, *runs: Callable[[int], None]) -> list[float]:
    """Each run's best rate over `rounds`, the runs interleaved round by round so that a
    busy neighbour or a warming cache favours none of them."""
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            run(n)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [n / b for b in best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
    corpus = prompts()
    mean_chars = sum(len(t) for t, _ in corpus) / len(corpus)
    print(f"{len(corpus):,} prompts ({mean_chars:,.0f} characters on average), "
          f"{len({f for _, f in corpus})} features")  # fmt: skip

    t0 = time.perf_counter()
    load_prior.cache_clear()
    prior = load_prior()
    print(f"prior {prior.version}: loaded in {(time.perf_counter() - t0) * 1000:.0f} ms")

    def prior_only(n: int) -> None:
        for i in range(n):
            prior.score(corpus[i % len(corpus)][0])

    memory = RedisMemory(redis.Redis.from_url(url), refresh_s=2.0)
    memory.reset({})
    router = LearnedRouter(prior, memory)

    def online(n: int) -> None:
        for i in range(n):
            text, feature = corpus[i % len(corpus)]
            router.assess_text(text, feature, f"job-{i}")

    def learn(n: int) -> None:
        for i in range(n):
            text, feature = corpus[i % len(corpus)]
            p = prior.score(text)
            memory.learn(Outcome(feature, p, p, float(i % 3 == 0), i % 3 == 0))

    learn(args.decisions // 4)  # the memory holds outcomes for every feature
    prior_rate, online_rate = rates(args.decisions, args.rounds, prior_only, online)
    (learn_rate,) = rates(args.decisions // 4, args.rounds, learn)
    memory.reset({})
    memory.close()
    print(f"prior alone:          {prior_rate:,.0f} decisions/s per core")
    print(f"outcomes learnt:      {learn_rate:,.0f} per s per core (one Redis round trip each)")
    print(f"learned router:       {online_rate:,.0f} decisions/s per core")
    print(f"router_vs_prior_alone: {online_rate / prior_rate:.2f}")
    print(f"triage_online_decisions_per_core_s: {online_rate:.0f}")


if __name__ == "__main__":
    main()
