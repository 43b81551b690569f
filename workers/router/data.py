"""The public routing data the prior is trained and checked on (`shared/data/llmrouter`):
prompts with per-model benchmark scores, joined with their task names.

Labels, as the data's README gives them: the small model suffices where
`llama-3.1-8b-instruct` scores >= 0.5; a prompt needs a bigger model where it scores
below and the best of the three large models scores >= 0.5. The split is by prompt text,
from a hash of the seed and the prompt, so it is the same on every machine and Python.

Ladder rows (`tierfleet triage eval --ladder 8b,50b,70b`): three of the nine models as a
cascade of three sizes, `8b` = llama-3.1-8b-instruct, `50b` = llama-3.1-nemotron-51b-instruct
(the better of the two 49-51B models here), `70b` = llama3-chatqa-1.5-70b (the only 70B);
a rung is ok where its model scores >= 0.5. The data has no costs or token counts: a call
costs (prompt characters / 4 + 256 answer tokens) at the model's price per million tokens,
in and out alike: $0.18 for 8B and $0.88 for 70B (Together AI's serverless list prices for
Llama 3.1 8B and 70B Instruct Turbo, 2024), and the 51B model, which has no such list
price, by parameter count between them ($0.665).

    python -m workers.router.data rows.jsonl --ladder [--all] [--data DIR]

writes them (the held-out split, or every row with `--all`), from the data beside the
checkout or `--data`; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SMALL_MODEL = "llama-3.1-8b-instruct"
LARGE_MODELS = (
    "llama-3.1-nemotron-51b-instruct",
    "llama-3.3-nemotron-super-49b-v1",
    "llama3-chatqa-1.5-70b",
)
PASS = 0.5
# (rung, model, USD per million tokens in and out): see the module's docstring
LADDER: tuple[tuple[str, str, float], ...] = (
    ("8b", "llama-3.1-8b-instruct", 0.18),
    ("50b", "llama-3.1-nemotron-51b-instruct", 0.18 + (0.88 - 0.18) * (51 - 8) / (70 - 8)),
    ("70b", "llama3-chatqa-1.5-70b", 0.88),
)
ANSWER_TOKENS = 256
SEED = 20261202
HELD_OUT = 0.2
# The data beside a checkout (`shared/` next to the repository), unless told otherwise.
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "llmrouter"


@dataclass(frozen=True, slots=True)
class Row:
    prompt: str
    task: str
    small_ok: bool
    large_ok: bool

    @property
    def needs_frontier(self) -> bool:
        return not self.small_ok and self.large_ok

    def eval_record(self) -> dict[str, object]:
        """The row as `tierfleet triage eval` reads it (the task is the feature)."""
        return {
            "prompt": self.prompt,
            "feature": self.task,
            "small_ok": self.small_ok,
            "large_ok": self.large_ok,
        }


def _scored(data_dir: Path) -> Iterator[tuple[dict[str, Any], str]]:
    """(item, task name) of every scored prompt, in the file's order."""
    scored = data_dir / "dcrouter_train.json"
    tasks_file = data_dir / "default_query_train.jsonl"
    for path in (scored, tasks_file):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: not found (the llmrouter data: shared/data/llmrouter beside the "
                "checkout, or give --data DIR)"
            )
    tasks: dict[str, str] = {}
    with tasks_file.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                tasks[item["query"]] = item["task_name"]
    for item in json.loads(scored.read_text(encoding="utf-8")):
        yield item, tasks.get(item["question"], "unknown")


def ladder_record(item: dict[str, Any], task: str) -> dict[str, Any]:
    """One scored prompt as a ladder row of `tierfleet triage eval --ladder 8b,50b,70b`."""
    tokens = len(item["question"]) / 4 + ANSWER_TOKENS
    return {
        "prompt": item["question"],
        "feature": task,
        "ok": {rung: item["scores"][model] >= PASS for rung, model, _ in LADDER},
        "cost_usd": {rung: round(tokens * usd / 1e6, 10) for rung, _, usd in LADDER},
    }


def write_ladder(data_dir: Path, path: Path, *, held_out_only: bool = True) -> int:
    """Write the ladder rows (the held-out split, or every row); how many."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for item, task in _scored(data_dir):
            if held_out_only and not is_held_out(item["question"]):
                continue
            f.write(json.dumps(ladder_record(item, task), ensure_ascii=False) + "\n")
            n += 1
    return n


def load(data_dir: Path) -> list[Row]:
    """Every scored prompt of the data set, in the file's order."""
    rows = []
    for item, task in _scored(data_dir):
        scores = item["scores"]
        rows.append(
            Row(
                prompt=item["question"],
                task=task,
                small_ok=scores[SMALL_MODEL] >= PASS,
                large_ok=max(scores[m] for m in LARGE_MODELS) >= PASS,
            )
        )
    return rows


def is_held_out(prompt: str, seed: int = SEED, share: float = HELD_OUT) -> bool:
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def split(rows: list[Row], seed: int = SEED) -> tuple[list[Row], list[Row]]:
    """(train, held out): about 80/20 by prompt; every copy of a prompt on one side."""
    train: list[Row] = []
    held: list[Row] = []
    for row in rows:
        (held if is_held_out(row.prompt, seed) else train).append(row)
    return train, held


def write_eval(rows: list[Row], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row.eval_record(), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        description="Write the held-out split as `tierfleet triage eval` rows (JSONL)."
    )
    parser.add_argument("out", type=Path, help="where to write the rows")
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR, help="the llmrouter data")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--ladder", action="store_true", help="ladder rows for --ladder 8b,50b,70b (see above)"
    )
    parser.add_argument("--all", action="store_true", help="every row, not the held-out split")
    args = parser.parse_args()
    try:
        if args.ladder:
            if args.seed != SEED:
                parser.error("--seed: the ladder rows use the shipped split")
            n = write_ladder(args.data, args.out, held_out_only=not args.all)
            print(f"{n:,} ladder rows (8b, 50b, 70b) written to {args.out}")
            sys.exit(0)
        rows = load(args.data)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    chosen = rows if args.all else split(rows, args.seed)[1]
    write_eval(chosen, args.out)
    which = "" if args.all else "held-out "
    print(f"{len(chosen):,} {which}rows (seed {args.seed}) written to {args.out}")
