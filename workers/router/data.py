"""The public routing data the prior is trained and checked on (`shared/data/llmrouter`):
prompts with per-model benchmark scores, joined with their task names.

Labels, as the data's README gives them: the small model suffices where
`llama-3.1-8b-instruct` scores >= 0.5; a prompt needs a bigger model where it scores
below and the best of the three large models scores >= 0.5. The split is by prompt text,
from a hash of the seed and the prompt, so it is the same on every machine and Python.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SMALL_MODEL = "llama-3.1-8b-instruct"
LARGE_MODELS = (
    "llama-3.1-nemotron-51b-instruct",
    "llama-3.3-nemotron-super-49b-v1",
    "llama3-chatqa-1.5-70b",
)
PASS = 0.5
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


def load(data_dir: Path) -> list[Row]:
    """Every scored prompt of the data set, in the file's order."""
    scored = data_dir / "dcrouter_train.json"
    tasks_file = data_dir / "default_query_train.jsonl"
    for path in (scored, tasks_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (the llmrouter data directory?)")
    tasks: dict[str, str] = {}
    with tasks_file.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                item = json.loads(line)
                tasks[item["query"]] = item["task_name"]
    rows = []
    for item in json.loads(scored.read_text(encoding="utf-8")):
        scores = item["scores"]
        rows.append(
            Row(
                prompt=item["question"],
                task=tasks.get(item["question"], "unknown"),
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

    parser = argparse.ArgumentParser(
        description="Write the held-out split as `tierfleet triage eval` rows (JSONL)."
    )
    parser.add_argument("out", type=Path, help="where to write the rows")
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    held = split(load(args.data), args.seed)[1]
    write_eval(held, args.out)
    print(f"{len(held):,} held-out rows (seed {args.seed}) written to {args.out}")
