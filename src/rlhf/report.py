"""`rlhf report RUN`: one self-contained `runs/<name>/report.html` (plots embedded as base64 PNG; opens offline).

It reads only files the stages and `rlhf eval` wrote: each stage's metrics.jsonl, each round's eval/metrics.json and
eval/samples.jsonl, and the loop's state.json. Sections: the 5-line summary; results per policy; the
over-optimisation view (gold and proxy score against sqrt(KL) for PPO snapshots and best-of-n); diversity; training
curves and a final-value table per stage; sample responses of SFT and each round's policy side by side. The
readers of a run folder are in `rlhf.run_results`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.run_results import (
    curve_keys,
    final_policies,
    final_policy,
    method_of,
    numeric_series,
    read_evals,
    read_rows,
    rm_accuracies,
    stage_dirs,
)

# ---------------------------------------------------------------------------------------------------------------
# The summary (also printed by the loop)


def _f(x: float | None, fmt: str = "+.3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _best_of_n_text(rows: list[dict], pol: dict) -> str:
    """Best-of-n beside the final policy: at the policy's own KL where the best-of-n curve reaches it."""
    if not rows:
        return ""
    from rlhf.eval_metrics import best_of_n_at_kl, value_at_kl

    top = max(rows, key=lambda r: r["n"])
    largest = f"best-of-{top['n']}: {_f(top['gold/score'])} at KL {top['kl']:.2f}"
    matched = value_at_kl([(r["kl"], r["gold/score"]) for r in rows], pol["kl/mean"])
    if matched is None:
        return f" ({largest}; the policy's KL is beyond best-of-n's range)"
    verdict = "above" if pol["gold/score"] > matched else "below"
    # what best-of-n pays at inference for that KL, where the policy samples once
    n = best_of_n_at_kl(pol["kl/mean"])
    return f" ({verdict} best-of-n at the same KL: {_f(matched)}, n = {n:.0f} samples per prompt; {largest})"


def summary_lines(run: str | Path) -> list[str]:
    """Five lines: gold SFT -> final (and best-of-n), KL, win rate, diversity change, RM accuracy."""
    run = Path(run)
    evals = read_evals(run)
    if not evals:
        return ["no evaluation yet: run the loop (or `rlhf eval`) first"]
    rnd, last = evals[-1]
    ref = last["policies"][last["reference"]]
    final = final_policy(last)
    if final is None:
        return [f"{rnd}: only the reference was evaluated"]
    name, pol = final
    bon_text = _best_of_n_text(last.get("best_of_n") or [], pol)
    accs = ", ".join(f"{r} {_f(a, '.2f')}" for r, a in rm_accuracies(run))
    others = "".join(
        f"; {label} {_f(row['gold/score'])} (KL {_f(row['kl/mean'], '.2f')}, win {_f(row['win_rate/gold'], '.2f')})"
        for label, row in final_policies(last)[1:]
    )
    return [
        f"gold score (sentiment rubric): SFT {_f(ref['gold/score'])} -> {name} {_f(pol['gold/score'])}{bon_text}"
        f"{others}",
        f"KL to SFT: {_f(pol['kl/mean'], '.2f')} nats per response (sqrt {_f(pol['kl/sqrt'], '.2f')}); "
        f"proxy (RM) score {_f(ref['proxy/score'])} -> {_f(pol['proxy/score'])}",
        f"win rate vs SFT (gold judge, ties half): {_f(pol['win_rate/gold'], '.2f')} over "
        f"{last['prompts'] * last['samples_per_prompt']} pairs; EOS rate {_f(ref['eos_rate'], '.2f')} -> "
        f"{_f(pol['eos_rate'], '.2f')}",
        f"diversity: distinct-2 {_f(ref['diversity/distinct_2'], '.3f')} -> {_f(pol['diversity/distinct_2'], '.3f')}, "
        f"self-BLEU {_f(ref['diversity/self_bleu'], '.3f')} -> {_f(pol['diversity/self_bleu'], '.3f')}, "
        f"entropy {_f(ref['diversity/entropy'], '.2f')} -> {_f(pol['diversity/entropy'], '.2f')} nats/token",
        f"reward model held-out accuracy by round: {accs or 'n/a'}",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Plots


@dataclass
class Figure:
    key: str  # stable id (tests count these)
    title: str
    png: bytes


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(label: str, series: dict) -> Figure | None:
    keys = curve_keys(series)
    if not keys:
        return None
    plt = _plt()
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        xs, ys = series[key]
        ax.plot(xs, ys, lw=1.3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(f"{label}: training curves", fontsize=10)
    fig.tight_layout()
    return Figure(f"curves-{label.replace('/', '-')}", f"{label} training curves", _png(fig))


def plot_overoptimisation(evals: list[tuple[str, dict]]) -> Figure | None:
    """Gold and proxy score vs sqrt(KL): each round's PPO snapshots and final policy, and best-of-n."""
    if not evals:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("gold/score", "proxy/score")):
        for i, (rnd, ev) in enumerate(evals):
            color = f"C{i}"
            ref = ev["policies"][ev["reference"]]
            pts = [(0.0, ref[metric])]
            finals = final_policies(ev)
            main = method_of(*finals[0]) if finals else "ppo"
            trained = [
                v
                for k, v in ev["policies"].items()
                if v.get("role") in ("policy", "snapshot") and method_of(k, v) == main
            ]
            trained.sort(
                key=lambda v: (v["role"] == "policy", v.get("step") or 0)
            )  # snapshots by step, then final
            pts += [(v["kl/sqrt"], v[metric]) for v in trained]
            what = f"PPO ({rnd}, RM of {rnd})" if main == "ppo" else f"{main.upper()} ({rnd})"
            ax.plot(*zip(*pts), "o-", color=color, label=what, ms=4)
            for label, v in finals[1:]:  # other methods trained on the same comparisons: one point each
                ax.plot([v["kl/sqrt"]], [v[metric]], "^", color=color, ms=8, label=f"{label}")
            bon = ev.get("best_of_n") or []
            if bon:
                ax.plot(
                    [b["sqrt_kl"] for b in bon],
                    [b[metric] for b in bon],
                    "s--",
                    color=color,
                    alpha=0.7,
                    label=f"best-of-n ({rnd})",
                    ms=4,
                )
                for b in bon:
                    ax.annotate(f"n={b['n']}", (b["sqrt_kl"], b[metric]), fontsize=6, alpha=0.7)
        ax.set_xlabel("sqrt(KL to SFT)  [sqrt(nats)]")
        ax.set_ylabel(metric.split("/")[0] + " score")
        ax.set_title("gold (sentiment rubric)" if metric.startswith("gold") else "proxy (reward model)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Over-optimisation view (Gao et al. 2022): score vs sqrt(KL)", fontsize=10)
    fig.tight_layout()
    return Figure("overoptimisation", "gold and proxy score vs sqrt(KL)", _png(fig))


def plot_diversity(evals: list[tuple[str, dict]]) -> Figure | None:
    if not evals:
        return None
    first = evals[0][1]
    rows = [("SFT", first["policies"][first["reference"]])]
    for rnd, ev in evals:
        finals = final_policies(ev)
        rows += [(label if len(finals) > 1 else rnd, v) for label, v in finals]
    keys = [
        ("diversity/distinct_1", "distinct-1 (higher = more diverse)"),
        ("diversity/distinct_2", "distinct-2 (higher = more diverse)"),
        ("diversity/self_bleu", "self-BLEU (lower = more diverse)"),
        ("diversity/entropy", "entropy, nats/token"),
        ("length/words", "response length, words"),
        ("gold/score", "gold score"),
    ]
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.0 * len(keys), 3.0))
    for ax, (key, title) in zip(axes, keys):
        ax.bar(
            [r for r, _ in rows],
            [v.get(key, float("nan")) for _, v in rows],
            color=[f"C{i}" for i in range(len(rows))],
        )
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("What RLHF cost in diversity: SFT vs each round's policy", fontsize=10)
    fig.tight_layout()
    return Figure("diversity", "diversity of SFT and each round's policy", _png(fig))


def plot_rounds(evals: list[tuple[str, dict]], accs: list[tuple[str, float | None]]) -> Figure | None:
    if not evals:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.0))
    first = evals[0][1]
    sft = first["policies"][first["reference"]]
    labels = ["SFT"] + [rnd for rnd, _ in evals]
    methods: list[str] = []
    for _, ev in evals:
        methods += [m for k, v in final_policies(ev) if (m := method_of(k, v)) not in methods]
    for ax, key, title in (
        (axes[0], "gold/score", "gold score by round"),
        (axes[1], "win_rate/gold", "win rate vs SFT (gold judge)"),
    ):
        for i, method in enumerate(methods or ["policy"]):
            values = [sft] + [
                next((v for k, v in final_policies(ev) if method_of(k, v) == method), {}) for _, ev in evals
            ]
            ys = [v.get(key, float("nan")) for v in values]
            errs = [v.get("gold/stderr", 0.0) if key == "gold/score" else 0.0 for v in values]
            ax.errorbar(labels, ys, yerr=errs, fmt="o-", capsize=3, color=f"C{i}", label=method.upper())
        if len(methods) > 1:
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[2].plot(
        [r for r, _ in accs], [a if a is not None else float("nan") for _, a in accs], "o-", color="C2"
    )
    axes[2].set_title("reward model held-out accuracy", fontsize=9)
    axes[2].set_ylim(0.4, 1.0)
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    return Figure("rounds", "progress by round", _png(fig))


# ---------------------------------------------------------------------------------------------------------------
# HTML


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;
text-align:right;vertical-align:top}th{background:#f3f3f3}td.t{text-align:left;max-width:30em;white-space:pre-wrap}
pre.summary{background:#f6f8fa;padding:.8em;border-left:4px solid #4a7;white-space:pre-wrap}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}.note{color:#666;font-size:.9em}
"""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _e(x: Any) -> str:
    return html.escape(_CONTROL.sub("", str(x)))


def _num(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}"
    return _e(v)


def _table(header: list[str], rows: list[list[Any]], text_cols: tuple[int, ...] = (0,)) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td class='t'>{_e(c)}</td>" if i in text_cols else f"<td>{_num(c)}</td>"
            for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return f'<img id="fig-{_e(fig.key)}" alt="{_e(fig.title)}" src="data:image/png;base64,{data}">'


RESULT_COLS = [
    ("gold/score", "gold"),
    ("proxy/score", "proxy (RM)"),
    ("kl/mean", "KL"),
    ("win_rate/gold", "win vs SFT"),
    ("length/words", "words"),
    ("eos_rate", "EOS rate"),
    ("diversity/distinct_1", "distinct-1"),
    ("diversity/distinct_2", "distinct-2"),
    ("diversity/self_bleu", "self-BLEU"),
    ("diversity/entropy", "entropy"),
]


def _results_section(evals: list[tuple[str, dict]]) -> str:
    parts = []
    for rnd, ev in evals:
        rows = [
            [label, v.get("role", "")] + [v.get(k, float("nan")) for k, _ in RESULT_COLS]
            for label, v in ev["policies"].items()
        ]
        parts.append(
            f"<h3>{_e(rnd)} evaluation ({ev['prompts']} held-out prompts x {ev['samples_per_prompt']} samples; "
            f"proxy = {_e(rnd)}'s reward model, held-out accuracy {_num(ev.get('rm_accuracy') or float('nan'))})</h3>"
        )
        parts.append(_table(["policy", "role"] + [h for _, h in RESULT_COLS], rows, (0, 1)))
        if ev.get("best_of_n"):
            parts.append(
                "<p>Best-of-n on SFT samples, picked by the proxy RM, at the analytic KL log n - (n-1)/n:</p>"
            )
            parts.append(
                _table(
                    ["n", "KL", "sqrt KL", "gold", "proxy"],
                    [
                        [b["n"], b["kl"], b["sqrt_kl"], b["gold/score"], b["proxy/score"]]
                        for b in ev["best_of_n"]
                    ],
                    (),
                )
            )
    return "\n".join(parts)


def methods_rows(evals: list[tuple[str, dict]]) -> list[list[Any]]:
    """SFT, then each round's final policy of every method, with the RESULT_COLS metrics: one table of methods."""
    if not evals:
        return []
    first = evals[0][1]
    rows = [
        ["SFT", "sft", "-"]
        + [first["policies"][first["reference"]].get(k, float("nan")) for k, _ in RESULT_COLS]
    ]
    for rnd, ev in evals:
        for label, v in final_policies(ev):
            rows.append([label, method_of(label, v), rnd] + [v.get(k, float("nan")) for k, _ in RESULT_COLS])
    return rows


def _methods_section(evals: list[tuple[str, dict]]) -> str:
    rows = methods_rows(evals)
    if not rows:
        return ""
    note = (
        "<p>Every method's policy on the same held-out prompts and sampling seed; KL and win rate are against SFT, "
        "gold is the rubric, proxy the round's reward model (none without a reward model). DPO (when present) learned "
        "from the same comparison records the reward model learned from.</p>"
    )
    table = _table(["policy", "method", "round"] + [h for _, h in RESULT_COLS], rows, (0, 1, 2))
    return note + table.replace("<table>", "<table id='methods'>", 1)


def _stage_table(stages: list[tuple[str, Path]]) -> str:
    parts = []
    for label, folder in stages:
        series = numeric_series(read_rows(folder))
        if not series:
            continue
        rows = [[k, len(ys), ys[0], ys[-1], min(ys), max(ys)] for k, (_, ys) in sorted(series.items())]
        parts.append(
            f"<h3>{_e(label)}</h3>" + _table(["metric", "points", "first", "last", "min", "max"], rows)
        )
    return "\n".join(parts)


def _samples_section(run: Path, evals: list[tuple[str, dict]], count: int = 6) -> str:
    if not evals:
        return "<p class='note'>no evaluation samples yet</p>"
    columns: list[tuple[str, dict]] = []  # (heading, {prompt_id: row})
    for i, (rnd, ev) in enumerate(evals):
        rows = [
            json.loads(line)
            for line in (run / rnd / "eval" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        if i == 0:
            columns.append(
                (
                    "SFT",
                    {r["prompt_id"]: r for r in rows if r["policy"] == ev["reference"] and r["sample"] == 0},
                )
            )
        for label, _ in final_policies(ev):
            columns.append(
                (label, {r["prompt_id"]: r for r in rows if r["policy"] == label and r["sample"] == 0})
            )
    prompts = list(columns[0][1].values())[:count]
    head = "<tr><th>prompt</th>" + "".join(f"<th>{_e(h)}</th>" for h, _ in columns) + "</tr>"
    body = []
    for p in prompts:
        cells = [f"<td class='t'>{_e(p['prompt'])}</td>"]
        for _, by_id in columns:
            r = by_id.get(p["prompt_id"])
            cells.append(
                f"<td class='t'>{_e(r['text'])}\n<b>gold {_num(r['gold'])} · proxy {_num(r['proxy'])} · KL {_num(r['kl'])}</b></td>"
                if r
                else "<td>–</td>"
            )
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def build_report(run: str | Path) -> Path:
    """Write `<run>/report.html` from the run folder and return its path."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    evals = read_evals(run)
    stages = stage_dirs(run)
    accs = rm_accuracies(run)
    figures = [
        f for f in (plot_rounds(evals, accs), plot_overoptimisation(evals), plot_diversity(evals)) if f
    ]
    curves = [
        f for f in (plot_curves(label, numeric_series(read_rows(folder))) for label, folder in stages) if f
    ]
    state_path = run / "state.json"
    state = json.loads(state_path.read_text(encoding="utf-8")) if state_path.exists() else {}
    timing = [
        [k, v.get("seconds", float("nan")), v.get("cpu_seconds", float("nan"))]
        for k, v in state.get("stages", {}).items()
    ]
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>rlhf report: {_e(run.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>RLHF run <code>{_e(run.name)}</code></h1>",
        "<p class='note'>Preference: the SYNTHETIC <code>sentiment</code> rubric (a cheerful/gloomy word lexicon with a "
        "repetition penalty) judged with Boltzmann noise: a simulated labeller, not people. Gold = that rubric without "
        "noise; proxy = the learned reward model PPO optimised.</p>",
        "<h2>Summary</h2><pre class='summary'>" + _e("\n".join(summary_lines(run))) + "</pre>",
    ]
    named = {f.key: f for f in figures}
    if "rounds" in named:
        out += ["<h2>Progress by round</h2>", _img(named["rounds"])]
    if len({r[1] for r in methods_rows(evals)} - {"sft"}) > 1:
        out += ["<h2>Methods compared: SFT, PPO and DPO</h2>", _methods_section(evals)]
    out += ["<h2>Results</h2>", _results_section(evals) or "<p class='note'>no evaluation yet</p>"]
    if "overoptimisation" in named:
        out += [
            "<h2>Reward over-optimisation</h2><p>Each point is a policy evaluated on fresh samples: PPO snapshots "
            "(circles) and best-of-n on SFT (squares). The proxy keeps rising with KL; where the gold score stops "
            "following it, the policy is exploiting the reward model.</p>",
            _img(named["overoptimisation"]),
        ]
    if "diversity" in named:
        out += ["<h2>Diversity</h2>", _img(named["diversity"])]
    out += ["<h2>Samples: SFT and each round's policy on held-out prompts</h2>", _samples_section(run, evals)]
    out += ["<h2>Training curves</h2>"] + [_img(f) for f in curves]
    out += ["<h2>Per-stage metrics</h2>", _stage_table(stages)]
    if timing:
        out += [
            "<h2>Stage timings</h2>",
            _table(["stage", "wall seconds", "CPU seconds (all threads)"], timing),
        ]
    out.append("</body></html>")
    path = run / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text("\n".join(out), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: rlhf report RUN_FOLDER   (e.g. runs/demo): rebuild RUN_FOLDER/report.html")  # noqa: T201
        return 0
    path = build_report(argv[0])
    for line in summary_lines(argv[0]):
        print(line)  # noqa: T201
    print(f"report: {path}")  # noqa: T201
    return 0
