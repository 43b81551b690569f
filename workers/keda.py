"""KEDA ScaledObjects for every pool of the ladder, as `tierfleet scale --keda` prints
them: one per pool (triage, then each tier), scaling the pool's Deployment
(`tierfleet-NAME`) on the length of the Redis list its tier's queue is kept in.

`listLength` is the backlog one replica is meant to carry: its throughput (as
`tierfleet scale` measures it, or from the timeout before anything is measured) times
the drain target `TIERFLEET_SCALE_DRAIN_S`. A `vllm` tier keeps a warm GPU: it scales
down only after half an hour idle, one pod at a time. Any other tier may scale to zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tierfleet.settings import Settings
from workers.scale import limits

_GPU_COOLDOWN_S = 1800
_API_COOLDOWN_S = 300


def manifests(settings: Settings, rates: Mapping[str, tuple[float, str]]) -> str:
    """The ScaledObjects (YAML, `---` between documents) for `rates`, each pool's
    per-worker jobs a second (`workers.scale.per_worker_rates`)."""
    pools = [("triage", settings.queue_triage, False)]
    pools += [(t.name, t.queue, t.backend == "vllm") for t in settings.fleet]
    docs = []
    for pool, queue, gpu in pools:
        lo, hi = limits(settings, pool)
        rate, basis = rates[pool]
        length = max(1, math.ceil(rate * settings.scale_drain_s))
        docs.append(_scaled_object(pool, queue, lo, hi, length, gpu, basis))
    return "---\n".join(docs)


def _scaled_object(
    pool: str, queue: str, lo: int, hi: int, length: int, gpu: bool, basis: str
) -> str:
    cooldown = _GPU_COOLDOWN_S if gpu else _API_COOLDOWN_S
    behaviour = (
        "  advanced:\n"
        "    horizontalPodAutoscalerConfig:\n"
        "      behavior:\n"
        "        scaleDown:\n"
        f"          stabilizationWindowSeconds: {_GPU_COOLDOWN_S}\n"
        "          policies: [{type: Pods, value: 1, periodSeconds: 600}]\n"
        if gpu
        else ""
    )
    activation = ', activationListLength: "0"' if lo == 0 else ""
    return (
        f"# pool {pool}: one replica carries {length} messages ({basis})\n"
        "apiVersion: keda.sh/v1alpha1\n"
        "kind: ScaledObject\n"
        "metadata:\n"
        f"  name: tierfleet-{pool}\n"
        "spec:\n"
        f"  scaleTargetRef: {{name: tierfleet-{pool}}}\n"
        f"  minReplicaCount: {lo}\n"
        f"  maxReplicaCount: {hi}\n"
        f"  pollingInterval: {30 if gpu else 15}\n"
        f"  cooldownPeriod: {cooldown}\n"
        f"{behaviour}"
        "  triggers:\n"
        "    - type: redis\n"
        "      authenticationRef: {name: tierfleet-redis}\n"
        f'      metadata: {{listName: "{queue}", listLength: "{length}"{activation}, '
        'databaseIndex: "0"}\n'
    )
