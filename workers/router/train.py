"""Train the triage prior and write its model card.

    python -m workers.router.train [--data DIR] [--out workers/router/prior.json]

Reads the public routing data (`workers/router/data.py`), holds out 20% of the prompts
(by a hash of the seed and the prompt), compares candidate models by five-fold
cross-validated AUROC on the rest, refits the best on the whole training part, checks that
the pure-Python scorer reproduces scikit-learn's probabilities, and writes the model and
`MODEL_CARD.md` with the candidates' figures and the held-out ones.

Needs the `train` extra (scikit-learn); scoring does not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.router import data
from workers.router.features import STRUCTURAL, structural, terms
from workers.router.metrics import auroc, gap_curve
from workers.router.prior import ARTIFACT, Prior

CARD = Path(__file__).with_name("MODEL_CARD.md")
C_GRID = (0.1, 0.3, 1.0, 3.0)
FOLDS = 5


@dataclass
class Candidate:
    name: str
    lexical: bool
    structural: bool
    cv_auroc: float = 0.0
    c: float = 1.0


def _design(cand: Candidate, texts: list[str], fitted: dict[str, Any] | None = None) -> Any:
    from scipy.sparse import csr_matrix, hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import StandardScaler

    fitted = {} if fitted is None else fitted
    blocks = []
    if cand.lexical:
        if "tfidf" not in fitted:
            fitted["tfidf"] = TfidfVectorizer(analyzer=terms, min_df=2, sublinear_tf=True)
            fitted["tfidf"].fit(texts)
        blocks.append(fitted["tfidf"].transform(texts))
    if cand.structural:
        rows = [structural(t) for t in texts]
        if "scaler" not in fitted:
            fitted["scaler"] = StandardScaler().fit(rows)
        blocks.append(csr_matrix(fitted["scaler"].transform(rows)))
    return hstack(blocks).tocsr(), fitted


def _fit(cand: Candidate, texts: list[str], labels: list[int], c: float) -> tuple[Any, Any]:
    from sklearn.linear_model import LogisticRegression

    x, fitted = _design(cand, texts)
    model = LogisticRegression(C=c, max_iter=5000).fit(x, labels)
    return model, fitted


def _predict(cand: Candidate, model: Any, fitted: dict[str, Any], texts: list[str]) -> list[float]:
    x, _ = _design(cand, texts, fitted)
    return [float(p) for p in model.predict_proba(x)[:, 1]]


def cross_validate(cand: Candidate, texts: list[str], labels: list[int]) -> None:
    from sklearn.model_selection import StratifiedKFold

    best = (-1.0, 1.0)
    for c in C_GRID:
        folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=data.SEED % 2**32)
        scores: list[float] = []
        for train_idx, test_idx in folds.split(texts, labels):
            model, fitted = _fit(
                cand, [texts[i] for i in train_idx], [labels[i] for i in train_idx], c
            )
            predicted = _predict(cand, model, fitted, [texts[i] for i in test_idx])
            scores.append(auroc(predicted, [bool(labels[i]) for i in test_idx]))
        mean = sum(scores) / len(scores)
        if mean > best[0]:
            best = (mean, c)
    cand.cv_auroc, cand.c = best


def export(cand: Candidate, model: Any, fitted: dict[str, Any], version: str) -> dict[str, Any]:
    coef = [float(w) for w in model.coef_[0]]
    doc: dict[str, Any] = {"version": version, "intercept": float(model.intercept_[0])}
    offset = 0
    if cand.lexical:
        tfidf = fitted["tfidf"]
        vocab = tfidf.vocabulary_
        doc["terms"] = {
            term: [round(float(tfidf.idf_[i]), 6), round(coef[i], 6)]
            for term, i in sorted(vocab.items())
        }
        offset = len(vocab)
    else:
        doc["terms"] = {}
    if cand.structural:
        scaler = fitted["scaler"]
        doc["structural"] = {
            "names": list(STRUCTURAL),
            "mean": [float(v) for v in scaler.mean_],
            "scale": [float(v) for v in scaler.scale_],
            "weights": coef[offset : offset + len(STRUCTURAL)],
        }
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=data.DEFAULT_DIR)
    parser.add_argument("--out", type=Path, default=ARTIFACT)
    parser.add_argument("--card", type=Path, default=CARD)
    args = parser.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("error: training needs scikit-learn: pip install -e '.[train]'", file=sys.stderr)
        return 2

    rows = data.load(args.data)
    train_rows, held = data.split(rows)
    labelled = [r for r in train_rows if r.small_ok or r.needs_frontier]
    texts = [r.prompt for r in labelled]
    labels = [int(r.needs_frontier) for r in labelled]
    print(
        f"{len(rows)} prompts: {len(train_rows)} train ({len(labelled)} labelled), "
        f"{len(held)} held out"
    )

    candidates = [
        Candidate("lexical", lexical=True, structural=False),
        Candidate("structural", lexical=False, structural=True),
        Candidate("lexical+structural", lexical=True, structural=True),
    ]
    for cand in candidates:
        t0 = time.perf_counter()
        cross_validate(cand, texts, labels)
        print(
            f"  {cand.name}: cv auroc {cand.cv_auroc:.3f} (C={cand.c}) "
            f"in {time.perf_counter() - t0:.0f} s"
        )
    best = max(candidates, key=lambda c: c.cv_auroc)
    model, fitted = _fit(best, texts, labels, best.c)
    version = f"prior-{best.name.replace('+', '-')}-{dt.date.today():%Y%m%d}"
    doc = export(best, model, fitted, version)

    # the pure-Python scorer must give scikit-learn's probabilities
    prior = Prior.from_dict(doc)
    held_texts = [r.prompt for r in held]
    reference = _predict(best, model, fitted, held_texts)
    drift = max(abs(prior.score(t) - p) for t, p in zip(held_texts, reference, strict=True))
    if drift > 1e-4:
        print(f"error: the scorer drifts from scikit-learn by {drift:.2e}", file=sys.stderr)
        return 1

    figures = held_out_figures(prior.score, held)
    per_candidate = {}
    for cand in candidates:
        m, f = _fit(cand, texts, labels, cand.c)
        per_candidate[cand.name] = held_out_figures(_scorer(cand, m, f), held)
    args.out.write_text(json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n")
    args.card.write_text(
        card(
            version,
            rows,
            train_rows,
            held,
            labelled,
            candidates,
            best,
            per_candidate,
            figures,
            drift,
            doc,
        )
    )
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, "
        f"{len(doc['terms']):,} terms) and {args.card}"
    )
    print(f"held out: auroc {figures['auroc']:.3f}, apgr {figures['apgr']:.3f}")
    return 0


def _scorer(cand: Candidate, model: Any, fitted: dict[str, Any]) -> Callable[[str], float]:
    return lambda text: _predict(cand, model, fitted, [text])[0]


def held_out_figures(score: Callable[[str], float], held: list[data.Row]) -> dict[str, float]:
    scores = [score(r.prompt) for r in held]
    pairs = [
        (s, r.needs_frontier)
        for s, r in zip(scores, held, strict=True)
        if r.small_ok or r.needs_frontier
    ]
    curve = gap_curve(scores, [r.small_ok for r in held], [r.large_ok for r in held])
    return {
        "auroc": auroc([s for s, _ in pairs], [y for _, y in pairs]),
        "apgr": curve.area(),
        "cpt50": curve.share_for(0.5) or 1.0,
        "cpt80": curve.share_for(0.8) or 1.0,
    }


def card(
    version: str,
    rows: list[data.Row],
    train_rows: list[data.Row],
    held: list[data.Row],
    labelled: list[data.Row],
    candidates: list[Candidate],
    best: Candidate,
    per_candidate: dict[str, dict[str, float]],
    figures: dict[str, float],
    drift: float,
    doc: dict[str, Any],
) -> str:
    needs = sum(r.needs_frontier for r in held)
    ok = sum(r.small_ok for r in held)
    lines = [
        f"# Model card: the triage prior `{version}`",
        "",
        "p(a prompt needs a bigger model than the small tier's), from the prompt alone. It is",
        "the generic starting point of triage; the fleet's own outcomes adjust it per feature",
        "(see the README's Routing section). Rebuild: `python -m workers.router.train`.",
        "",
        "## Data",
        "",
        f"- {len(rows):,} benchmark prompts of the public LLMRouter data (MIT licence): 14 task",
        "  types (trivia, commonsense, GSM8K, MMLU, MATH, GPQA, code, logic grids, ...), each",
        "  scored for nine open models.",
        f"- Label: the small model suffices where `{data.SMALL_MODEL}` scores >= {data.PASS};",
        "  the prompt needs a bigger model where it scores below and the best of",
        f"  {', '.join(f'`{m}`' for m in data.LARGE_MODELS)} scores >= {data.PASS}. Prompts",
        "  that every model fails are left out of training (routing cannot help them).",
        f"- Split by prompt: {len(held):,} held out ({data.HELD_OUT:.0%}, where the SHA-256 of",
        f"  the seed {data.SEED} and the prompt falls below {data.HELD_OUT}); {len(train_rows):,}",
        f"  to train on, {len(labelled):,} of them labelled. Held out: {needs} need a bigger",
        f"  model, {ok} are answered by the small one, {len(held) - needs - ok} by neither.",
        "",
        "## Model",
        "",
        f"Logistic regression (scikit-learn, L2, C={best.c}) over "
        + {
            "lexical": "tf-idf word and word-pair terms (sublinear tf, min df 2, L2-normalised).",
            "structural": "structural measures (standardised).",
            "lexical+structural": "tf-idf word and word-pair terms (sublinear tf, min df 2,"
            " L2-normalised) and structural measures (standardised): "
            + ", ".join(STRUCTURAL)
            + ".",
        }[best.name],
        f"{len(doc['terms']):,} terms. Scored in pure Python (`workers/router/prior.py`); the",
        "largest difference from scikit-learn's probabilities on the held-out prompts is "
        f"{drift:.1e}.",
        "",
        "## Candidates",
        "",
        f"Chosen by {FOLDS}-fold cross-validated AUROC on the training part "
        f"(C from {list(C_GRID)});",
        "the held-out figures are for information, not for choosing.",
        "",
        "| candidate | CV AUROC | held-out AUROC | held-out APGR | CPT(50%) | CPT(80%) |",
        "|---|---|---|---|---|---|",
    ]
    for cand in candidates:
        f = per_candidate[cand.name]
        mark = " (chosen)" if cand is best else ""
        lines.append(
            f"| {cand.name}{mark} | {cand.cv_auroc:.3f} | {f['auroc']:.3f} | {f['apgr']:.3f} "
            f"| {f['cpt50']:.1%} | {f['cpt80']:.1%} |"
        )
    lines += [
        "",
        "A small local sentence-embedding model (all-MiniLM-L6-v2, from a package that ships",
        "its weights, with PyTorch on the CPU) was measured too, outside this script, on",
        "another random fifth of the same data held out: as features on their own, AUROC",
        "0.642; beside the tf-idf terms, 0.659, against 0.651 for the terms alone. It does not",
        "pay: about 0.01 AUROC for a PyTorch dependency and about 36 prompts a second per",
        "core, against thousands for this model.",
        "",
        "## Held-out figures of the chosen model",
        "",
        f"- AUROC on needs-bigger against small-suffices: **{figures['auroc']:.3f}**",
        f"- APGR: {figures['apgr']:.3f} (a random router: 0.5); CPT(50%): {figures['cpt50']:.1%},"
        f" CPT(80%): {figures['cpt80']:.1%} of prompts to the frontier",
        "",
        "## Limits",
        "",
        "- Benchmark prompts and open models from 2024: a stand-in for the small tier against",
        "  Claude, not a measurement of them. The fleet's own outcomes, learnt per feature,",
        "  are what make routing fit a workload.",
        "- From the prompt alone the signal is weak on this data: even told each prompt's",
        "  task type, the same model reached a held-out AUROC of only about 0.70 (on that",
        "  other split), because within a task, which questions the 8B model misses is close",
        "  to chance from the text. The task type alone gives about 0.70 too.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
