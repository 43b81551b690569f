"""The Kubernetes manifests and the Datadog definitions match the code: every worker's
command is one the CLI has, each KEDA scaler reads the Redis list its pool consumes, the
GPU pool keeps a replica and cools down slowly, the API pool scales to zero, grace
periods outlast the longest call, and every metric a dashboard or monitor reads is one
the fleet sends."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from tests.conftest import ROOT
from tierfleet import constants as C
from tierfleet.cli import app
from tierfleet.settings import MAX_OUTPUT_TOKENS, Settings
from workers.app import plan_pool

K8S = ROOT / "deploy" / "k8s"
DATADOG = ROOT / "deploy" / "datadog"


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "secret.example.yaml"):
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in manifests() if d["kind"] == kind}


def worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["image"] == "tierfleet")


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present


def test_each_command_is_one_the_cli_has() -> None:
    commands = {
        c.name or c.callback.__name__.replace("_", "-")
        for c in app.registered_commands
        if c.callback is not None
    } | {g.name for g in app.registered_groups}
    for kind in ("Deployment", "Job"):
        for name, doc in by_kind(kind).items():
            args = (
                worker_container(doc)["args"]
                if kind == "Deployment"
                else doc["spec"]["template"]["spec"]["containers"][0]["args"]
            )
            assert args[0] in commands, (name, args)


def test_each_scaler_reads_the_list_its_pool_consumes() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    deployments = by_kind("Deployment")
    scaled = by_kind("ScaledObject")
    pools = {}
    for name, so in scaled.items():
        target = deployments[so["spec"]["scaleTargetRef"]["name"]]
        args = worker_container(target)["args"]
        assert args[:2] == ["worker", "--pool"], name
        pool = args[2]
        pools[pool] = so
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] in plan_pool(settings, pool).queues
        assert int(trigger["metadata"]["listLength"]) > 0
    assert set(pools) == {"triage", C.TIER_SLM, C.TIER_FRONTIER}
    gpu, api = pools[C.TIER_SLM]["spec"], pools[C.TIER_FRONTIER]["spec"]
    assert gpu["minReplicaCount"] >= 1 and gpu["cooldownPeriod"] >= 900
    assert api["minReplicaCount"] == 0
    assert (pools["triage"]["spec"]["maxReplicaCount"], gpu["maxReplicaCount"],
            api["maxReplicaCount"]) == (settings.scale_triage_max, settings.scale_slm_max,
                                        settings.scale_frontier_max)  # fmt: skip


def test_grace_periods_outlast_the_longest_call() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    longest = {
        C.TIER_SLM: settings.slm_timeout_s(MAX_OUTPUT_TOKENS),
        C.TIER_FRONTIER: settings.frontier_timeout_s,
    }
    for doc in by_kind("Deployment").values():
        args = worker_container(doc)["args"]
        if args[0] != "worker":
            continue
        grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > longest.get(args[2], 5), (args, grace)


def test_the_gpu_pool_runs_vllm_beside_its_worker_and_beat_is_a_singleton() -> None:
    deployments = by_kind("Deployment")
    slm = deployments["tierfleet-slm"]["spec"]["template"]["spec"]
    vllm = next(c for c in slm["containers"] if c["name"] == "vllm")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in worker_container(deployments["tierfleet-slm"])["env"]}
    assert env["VLLM_BASE_URL"] == "http://localhost:8000/v1"
    beat = deployments["tierfleet-beat"]["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"
    assert "tierfleet-beat" not in {
        s["spec"]["scaleTargetRef"]["name"] for s in by_kind("ScaledObject").values()
    }


def _metrics_in(text: str) -> set[str]:
    return set(re.findall(r"tierfleet\.[a-z_.]+[a-z_]", text))


def test_dashboards_and_monitors_read_only_metrics_the_fleet_sends() -> None:
    sent = {v for k, v in vars(C).items() if k.startswith("METRIC_") and k != "METRIC_PREFIX"}
    dashboard = json.loads((DATADOG / "dashboard.json").read_text())
    monitors = json.loads((DATADOG / "monitors.json").read_text())
    assert dashboard["widgets"] and dashboard["layout_type"] in ("ordered", "free")
    used = _metrics_in(json.dumps(dashboard)) | _metrics_in(json.dumps(monitors))
    assert used and used <= sent, used - sent
    names = {m["name"] for m in monitors}
    assert any("escalation" in n.lower() for n in names)
    assert any("oldest" in n.lower() for n in names)
    for m in monitors:
        assert m["type"] in ("query alert", "metric alert") and m["query"] and m["message"]
