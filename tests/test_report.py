"""The report builder on a hand-made run folder: every plot embedded, tables and summary show the given numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rlhf.report import _methods_section, build_report, summary_lines
from rlhf.run_results import curve_keys, numeric_series, read_evals


def _policy(gold, proxy, kl, win, d2, role, **extra):
    return {
        "role": role, "gold/score": gold, "gold/stderr": 0.1, "proxy/score": proxy, "proxy/stderr": 0.1,
        "kl/mean": kl, "kl/stderr": 0.1, "kl/sqrt": kl**0.5, "win_rate/gold": win, "length/words": 20.0,
        "length/tokens": 25.0, "eos_rate": 0.9, "diversity/distinct_1": 0.5, "diversity/distinct_2": d2,
        "diversity/self_bleu": 0.2, "diversity/entropy": 3.0, **extra,
    }  # fmt: skip


def _write_run(run: Path, with_dpo: bool = False) -> None:
    for stage, key in (("pretrain", "train/loss"), ("sft", "val/loss")):
        (run / stage).mkdir(parents=True)
        rows = [{"step": s, "time": 0.0, key: 5.0 - s, "note": "text is ignored"} for s in range(4)]
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in (1, 2):
        rnd = run / f"round-{r}"
        for stage in ("reward", "ppo"):
            (rnd / stage).mkdir(parents=True)
        rows = [
            {"step": s, "train/loss": 0.7 - 0.1 * s, "val/accuracy": 0.6 + 0.05 * s + 0.02 * r}
            for s in range(3)
        ]
        (rnd / "reward" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        rows = [{"step": s, "objective/score": 0.1 * s, "objective/kl": 0.5 * s} for s in range(5)]
        (rnd / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        policies = {
            "sft": _policy(-0.2, 0.0, 0.0, 0.5, 0.8, "reference"),
            f"round-{r}/ppo@10": _policy(0.1 * r, 0.5, 1.0, 0.6, 0.7, "snapshot", step=10),
            f"round-{r}/ppo": _policy(0.3 * r, 1.0 * r, 2.0 * r, 0.7, 0.8 - 0.2 * r, "policy"),
        }
        if with_dpo:  # compare_dpo: DPO's final policy on the same prompts, after PPO's
            policies[f"round-{r}/dpo"] = _policy(
                0.25 * r, 0.4 * r, 1.5 * r, 0.65, 0.75, "policy", method="dpo"
            )
        bon = [{"n": n, "kl": 0.1 * n, "sqrt_kl": (0.1 * n) ** 0.5, "gold/score": 0.05 * n, "proxy/score": 0.2 * n}
               for n in (1, 2, 4)]  # fmt: skip
        ev = {"reference": "sft", "prompts": 2, "samples_per_prompt": 1, "rm_accuracy": 0.7,
              "policies": policies, "best_of_n": bon}  # fmt: skip
        (rnd / "eval").mkdir()
        (rnd / "eval" / "metrics.json").write_text(json.dumps(ev))
        samples = [
            {"policy": p, "prompt_id": f"e{i}", "prompt": f"Continue the story: prompt {i}", "sample": 0,
             "text": f"{p} says <hello> & {i}", "gold": 0.5, "proxy": 1.5, "kl": 2.0, "finished": True}
            for p in policies for i in range(2)
        ]  # fmt: skip
        (rnd / "eval" / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in samples))
    (run / "state.json").write_text(json.dumps({"stages": {"pretrain": {"seconds": 12.5, "summary": {}}}}))


def test_report_embeds_every_plot_and_shows_the_numbers(tmp_path):
    run = tmp_path / "demo"
    _write_run(run)
    path = build_report(run)
    assert path == run / "report.html"
    html = path.read_text(encoding="utf-8")
    ids = re.findall(
        r'<img id="fig-([\w-]+)" alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', html
    )
    # 3 result plots + one training-curve figure per stage with curves (pretrain, sft, 2 x reward, 2 x ppo)
    assert sorted(ids) == sorted(
        ["rounds", "overoptimisation", "diversity", "curves-pretrain", "curves-sft", "curves-round-1-reward",
         "curves-round-2-reward", "curves-round-1-ppo", "curves-round-2-ppo"]
    )  # fmt: skip
    assert html.count("<img ") == len(ids)
    assert "http://" not in html and "https://" not in html  # nothing to fetch: opens offline
    # side-by-side samples: SFT and each round's final policy, escaped
    assert "sft says &lt;hello&gt; &amp; 0" in html
    assert "round-1/ppo says" in html and "round-2/ppo says" in html
    assert "round-2/ppo@10 says" not in html  # snapshots are in the tables, not the sample columns
    assert "12.5" in html  # stage timings from state.json
    assert "id='methods'" not in html  # one method: no methods-compared table


def test_summary_lines_read_the_last_round(tmp_path):
    run = tmp_path / "demo"
    _write_run(run)
    lines = summary_lines(run)
    assert len(lines) == 5
    assert "SFT -0.200 -> round-2/ppo +0.600" in lines[0]
    assert "best-of-4: +0.200 at KL 0.40; the policy's KL is beyond best-of-n's range" in lines[0]
    assert "KL to SFT: 4.00" in lines[1] and "proxy (RM) score +0.000 -> +2.000" in lines[1]
    assert "0.70 over 2 pairs" in lines[2]
    assert "distinct-2 0.800 -> 0.400" in lines[3]
    # held-out accuracy: the last val/accuracy of each round's reward metrics (0.6 + 0.1 + 0.02 r)
    assert "round-1 0.72, round-2 0.74" in lines[4]


def test_best_of_n_is_compared_at_the_policys_own_kl():
    from rlhf.report import _best_of_n_text

    bon = [{"n": 1, "kl": 0.0, "gold/score": 0.0}, {"n": 4, "kl": 1.0, "gold/score": 0.4}]
    text = _best_of_n_text(bon, {"kl/mean": 0.25, "gold/score": 0.3})  # sqrt 0.5: halfway, 0.2
    # KL 0.25 is best-of-2.4's analytic KL (log n - (n - 1)/n)
    assert (
        text
        == " (above best-of-n at the same KL: +0.200, n = 2 samples per prompt; best-of-4: +0.400 at KL 1.00)"
    )
    assert "below" in _best_of_n_text(bon, {"kl/mean": 1.0, "gold/score": 0.1})
    assert _best_of_n_text([], {"kl/mean": 1.0, "gold/score": 0.1}) == ""


def test_curve_keys_pick_training_metrics():
    rows = [
        {"step": s, "train/loss": 1.0 / (s + 1), "perf/tokens_per_s": 100.0, "val/accuracy": 0.5}
        for s in range(3)
    ]
    series = numeric_series(rows + [{"step": 3, "objective/kl": float("nan")}])
    assert "objective/kl" not in series  # NaN dropped
    assert curve_keys(series) == ["train/loss", "val/accuracy"]


def test_ppo_and_dpo_side_by_side_in_one_table(tmp_path):
    """The methods table (the CI loop checks it inside a built report, with its plots) and the summary."""
    run = tmp_path / "compare"
    _write_run(run, with_dpo=True)
    table = re.search(r"<table id='methods'>(.*?)</table>", _methods_section(read_evals(run)), re.S)
    assert table, "no methods table"
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)[1:]
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in rows]
    assert [c[:3] for c in cells] == [
        ["SFT", "sft", "-"], ["round-1/ppo", "ppo", "round-1"], ["round-1/dpo", "dpo", "round-1"],
        ["round-2/ppo", "ppo", "round-2"], ["round-2/dpo", "dpo", "round-2"],
    ]  # fmt: skip
    assert cells[4][3:6] == ["0.5", "0.8", "3"]  # round-2/dpo: gold 0.25*2, proxy 0.4*2, KL 1.5*2
    lines = summary_lines(run)
    assert len(lines) == 5
    assert "-> round-2/ppo +0.600" in lines[0] and "; round-2/dpo +0.500 (KL 3.00, win 0.65)" in lines[0]
