"""The FinOps report as one self-contained HTML page: inline SVG charts and a table, no
script, no external resource, so that it opens anywhere and can be mailed."""

from __future__ import annotations

from decimal import Decimal
from html import escape

from tierfleet.finops import Report

# One colour per rung, cheapest first (the default fleet: slm blue, frontier orange); the
# top rung is always orange, the colour of the all-top counterfactual.
_PALETTE = ("#4c78a8", "#72b7b2", "#b279a2", "#9d755d", "#eeca3b", "#bab0ac")
_TOP = "#f58518"
_OTHER = "#54a24b"
W, H, PAD = 720, 260, 48


def _the_top(report: Report) -> str:
    return "the frontier" if report.top_tier == "frontier" else report.top_tier


def _colours(report: Report) -> dict[str, str]:
    lower = report.ladder[:-1]
    colours = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(lower)}
    return colours | {report.top_tier: _TOP}


def render(report: Report) -> str:
    t = report.total
    top = report.top_tier
    per = t.cost_per_succeeded_usd
    cards = [
        ("spend", f"${t.spend_usd:,.4f}"),
        (f"all-{top} counterfactual", f"${t.baseline_usd:,.4f}"),
        ("saved", f"${t.savings_usd:,.4f} ({t.savings_pct:.1f}%)"),
        ("saved by Message Batches", f"${report.batch_savings_usd:,.4f}"),
        ("jobs", f"{t.jobs:,}"),
        ("cost per succeeded job", "—" if per is None else f"${per:,.6f}"),
        ("escalation rate", f"{t.escalation_rate:.1%}"),
        (f"{top} share", f"{t.frontier_share:.1%}"),
    ]
    warnings = "".join(f"<li>{escape(w)}</li>" for w in report.warnings)

    def per_job(g: object) -> str:
        value = getattr(g, "cost_per_succeeded_usd", None)
        return "—" if value is None else f"${value:,.6f}"

    rows = "".join(
        "<tr>"
        + f"<td>{escape(name)}</td><td>${g.spend_usd:,.4f}</td><td>{g.jobs:,}</td>"
        + f"<td>{g.attempts:,}</td>"
        + f"<td>{per_job(g)}</td>"
        + f"<td>{g.escalation_rate:.1%}</td><td>{g.frontier_share:.1%}</td>"
        + (f"<td>${g.savings_usd:,.4f}</td>" if report.by in ("feature", "batch") else "")
        + "</tr>"
        for name, g in report.groups.items()
    )
    cards_html = "".join(
        f'<div class="card"><span class="muted">{escape(k)}</span><b>{escape(v)}</b></div>'
        for k, v in cards
    )
    saved_head = "<th>saved</th>" if report.by in ("feature", "batch") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tierfleet FinOps report</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1000px; }}
h1 {{ font-size: 22px; margin: 0 0 4px; }} h2 {{ font-size: 16px; margin: 28px 0 8px; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; min-width: 140px; }}
.card b {{ display: block; font-size: 18px; }} .muted {{ color: #666; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: right; padding: 4px 8px; border-bottom: 1px solid #eee; }}
th:first-child, td:first-child {{ text-align: left; }}
.warn {{ background: #fff4e5; border: 1px solid #f5a623; border-radius: 6px; padding: 8px 16px; }}
svg text {{ font: 11px system-ui, sans-serif; fill: #333; }}
</style></head><body>
<h1>tierfleet FinOps report</h1>
<p class="muted">{escape(report.since.strftime("%Y-%m-%d %H:%M"))} to
{escape(report.until.strftime("%Y-%m-%d %H:%M"))} UTC, by {escape(report.by)}</p>
<div class="cards">{cards_html}</div>
{f'<h2>Warnings</h2><ul class="warn">{warnings}</ul>' if warnings else ""}
<h2>Spend over time, by tier (USD a day)</h2>
{_spend_chart(report)}
<h2>Escalation rate by feature</h2>
{_escalation_chart(report)}
<h2>Savings against sending everything to {escape(_the_top(report))}</h2>
{_savings_chart(report)}
<h2>By {escape(report.by)}</h2>
<table><thead><tr><th>{escape(report.by)}</th><th>spend</th><th>jobs</th><th>attempts</th>
<th>per succeeded job</th><th>escalation</th><th>{escape(top)} share</th>{saved_head}</tr></thead>
<tbody>{rows}</tbody></table>
</body></html>
"""


def _svg(body: str, height: int = H) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
        f'viewBox="0 0 {W} {height}" role="img">{body}</svg>'
    )


def _spend_chart(report: Report) -> str:
    days = list(report.daily)
    if not days:
        return '<p class="muted">No spend in this window.</p>'
    seen = {t for d in report.daily.values() for t in d}
    tiers = [t for t in report.ladder if t in seen] + sorted(seen - set(report.ladder))
    colours = _colours(report)
    top = max(sum(report.daily[d].values(), Decimal(0)) for d in days) or Decimal(1)
    slot = (W - 2 * PAD) / len(days)
    bar = min(60.0, max(2.0, slot * 0.7))
    parts = [f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#999"/>']
    parts.append(f'<text x="4" y="{PAD}">${top:,.2f}</text>')
    for i, day in enumerate(days):
        x = PAD + i * slot + (slot - bar) / 2
        y = float(H - PAD)
        for tier in tiers:
            v = report.daily[day].get(tier, Decimal(0))
            h = float(v / top) * (H - 2 * PAD)
            y -= h
            colour = colours.get(tier, _OTHER)
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{escape(day)} {escape(tier)}: ${v:,.4f}</title></rect>'
            )
        if len(days) <= 14 or i % max(1, len(days) // 10) == 0:
            parts.append(f'<text x="{x:.1f}" y="{H - PAD + 16}">{escape(day[5:])}</text>')
    for j, tier in enumerate(tiers):
        colour = colours.get(tier, _OTHER)
        parts.append(
            f'<rect x="{W - PAD - 90}" y="{8 + j * 16}" width="10" height="10" fill="{colour}"/>'
        )
        parts.append(f'<text x="{W - PAD - 74}" y="{17 + j * 16}">{escape(tier)}</text>')
    return _svg("".join(parts))


def _escalation_chart(report: Report) -> str:
    rates = report.escalation_by_feature
    if not rates:
        lower = "small-tier" if len(report.ladder) <= 2 else "lower-rung"
        return f'<p class="muted">No {lower} jobs in this window.</p>'
    row = 22
    height = PAD + row * len(rates)
    left = 160
    parts = []
    for i, (feature, rate) in enumerate(rates.items()):
        y = 10 + i * row
        width = rate * (W - left - PAD)
        colour = "#e45756" if any(f"'{feature}'" in w for w in report.warnings) else "#4c78a8"
        parts.append(f'<text x="4" y="{y + 13}">{escape(feature[:24])}</text>')
        parts.append(
            f'<rect x="{left}" y="{y}" width="{width:.1f}" height="{row - 6}" fill="{colour}">'
            f"<title>{escape(feature)}: {rate:.1%}</title></rect>"
        )
        parts.append(f'<text x="{left + width + 4:.1f}" y="{y + 13}">{rate:.0%}</text>')
    return _svg("".join(parts), height)


def _savings_chart(report: Report) -> str:
    t = report.total
    top = max(t.baseline_usd, t.spend_usd) or Decimal(1)
    bars = [
        (f"all on {_the_top(report)}", t.baseline_usd, _TOP),
        ("tierfleet", t.spend_usd, "#4c78a8"),
    ]
    parts = []
    for i, (label, value, colour) in enumerate(bars):
        y = 16 + i * 44
        width = float(value / top) * (W - 200 - PAD)
        parts.append(f'<text x="4" y="{y + 20}">{escape(label)}</text>')
        parts.append(f'<rect x="160" y="{y}" width="{width:.1f}" height="30" fill="{colour}"/>')
        parts.append(f'<text x="{164 + width:.1f}" y="{y + 20}">${value:,.4f}</text>')
    parts.append(f'<text x="160" y="{16 + 2 * 44 + 10}">saved {t.savings_pct:.1f}%</text>')
    return _svg("".join(parts), 140)
