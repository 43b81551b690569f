"""Submit N example jobs through the producer client and wait for them.

    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379/0 \
        python examples/submit_many.py 200

Needs `tierfleet db upgrade` and a running `tierfleet worker --pool all`. Prints one line
per kind of outcome and, last, a summary line; exits 1 if a job failed or timed out.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter

from rich.progress import Progress

from producers import Client
from tierfleet.demo import example_jobs
from tierfleet.errors import TierfleetError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, help="how many jobs (the example batch is cycled)")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="give up after this long")
    args = parser.parse_args()
    if args.n < 1:
        parser.error("n must be at least 1")

    try:
        client = Client.from_env()
    except TierfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run = f"submit-many-{uuid.uuid4().hex[:8]}"
    with Progress(transient=True) as bar:
        task = bar.add_task("submitting", total=args.n)
        ids = []
        for envelope in example_jobs(args.n, run):
            ids.append(client.submit(envelope))
            bar.advance(task)
    print(f"submitted {len(ids)} jobs ({run})")
    if args.no_wait:
        for job_id in ids:
            print(job_id)
        return 0

    deadline = time.monotonic() + args.timeout_s
    statuses: Counter[str] = Counter()
    escalated = 0
    with Progress(transient=True) as bar:
        task = bar.add_task("waiting", total=len(ids))
        for job_id in ids:
            try:
                view = client.wait(job_id, timeout_s=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                statuses["timed out"] += 1
                continue
            statuses[view.status.value] += 1
            escalated += len({a.tier for a in view.attempts}) > 1
            bar.advance(task)
    client.close()
    for status, count in sorted(statuses.items()):
        print(f"{status}: {count}")
    print(
        f"summary: jobs={len(ids)} "
        + " ".join(f"{k.replace(' ', '_')}={v}" for k, v in sorted(statuses.items()))
        + f" escalated={escalated}"
    )
    return 0 if statuses["succeeded"] == len(ids) else 1


if __name__ == "__main__":
    sys.exit(main())
