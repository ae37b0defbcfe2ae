"""The RLHF loop end to end at CI size (configs/loop_ci.yaml), its resume, and the pieces it is made of.

The CI loop runs once per session (module fixture): pretrain -> SFT -> 2 rounds of sample -> label -> reward -> PPO
-> DPO (compare_dpo: on the same comparisons) -> eval -> report. The resume test copies that run, rewinds it to a
kill inside round 2's PPO (and DPO), and checks that `resume=true` (through a `stop_after` stop and a second resume)
ends at the same final metrics. The method=dpo test continues a copy after round 1's labels with DPO instead.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from rlhf.config import load_config
from rlhf.data.story_demos import INSTRUCTION, build_story_data, story_examples
from rlhf.errors import UserError
from rlhf.loop import LoopConfig
from rlhf.loop import run as run_loop
from rlhf.loop_state import stage_config

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "configs" / "loop_ci.yaml"
CORPUS = ROOT / "data" / "corpus" / "children_stories_5books.txt"
# Measured on 2 idle cores (2026-12-06), final policy minus SFT on 32 x 8 held-out samples (the stderr of each
# difference 0.03-0.04): over 6 seeds of this config in bf16, PPO's gold gain +0.06..+0.29 (proxy +0.61..+0.91, KL
# 1.05-1.43) and DPO's +0.12..+0.30; in fp32 (4 seeds, a stand-in for another machine's rounding) PPO +0.06..+0.17
# and DPO +0.10..+0.24. The test asserts a gold gain above GOLD_MARGIN for both, below every run's. The earlier,
# smaller CI loop (60 pre-training steps) could not: its PPO gold gain ranged -0.05..+0.17 over 22 runs, its base
# model knew too few words for the rubric to have a signal.
GOLD_MARGIN = 0.02
PROXY_MARGIN = 0.2


def _final_eval(run: Path) -> dict:
    return json.loads((run / "round-2" / "eval" / "metrics.json").read_text())


def _load_ci(runs: Path, *overrides: str) -> LoopConfig:
    """The CI config; RLHF_CI_LOOP_ARGS adds overrides (e.g. `threads=1` on a machine shared with other jobs)."""
    import os

    overrides = (*overrides, *os.environ.get("RLHF_CI_LOOP_ARGS", "").split())
    old = os.getcwd()
    os.chdir(ROOT)  # the config's data paths are relative to the repository
    try:
        return load_config(LoopConfig, str(CI_CONFIG), [f"runs_dir={runs}", *overrides])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    import os

    runs = tmp_path_factory.mktemp("runs")
    old = os.getcwd()
    os.chdir(ROOT)
    try:
        result = run_loop(_load_ci(runs))
    finally:
        os.chdir(old)
    return runs / "loop-ci", result


# ---------------------------------------------------------------------------------------------------------------
# The whole loop


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 2 minutes on an idle 2-core machine; generous for shared ones
def test_ci_loop_runs_every_stage_raises_gold_and_proxy_and_reports(ci_run):
    run, result = ci_run
    state = json.loads((run / "state.json").read_text())
    assert list(state["stages"]) == _load_ci(run.parent).stage_names()
    for r in (1, 2):
        for stage in ("sample", "label", "reward", "ppo", "dpo", "eval"):
            assert (run / f"round-{r}" / stage).is_dir()
    # round 2's reward model and DPO trained on both rounds' comparisons
    for stage in ("reward", "dpo"):
        cfg = (run / "round-2" / stage / "config.yaml").read_text()
        assert "round-1/label/comparisons.jsonl" in cfg and "round-2/label/comparisons.jsonl" in cfg
    # round 2's DPO continues round 1's DPO policy, with SFT as its reference (the anchor PPO and eval use)
    from rlhf.stages.dpo import DPOConfig

    dpo2 = load_config(DPOConfig, str(run / "round-2" / "dpo" / "config.yaml"), [])
    assert (
        Path(dpo2.model.path) == run / "round-1" / "dpo" / "model"
        and Path(dpo2.reference) == run / "sft" / "model"
    )
    # each DPO round fitted its pairs: a positive mean implicit-reward margin over its logged training windows (0 at
    # round 1's start, whose policy is the reference). The mean of a round's 4 windows of 16 pairs, not its last
    # window alone: round 2's windows are margins of an already-moved policy on fresh pairs; over three runs of
    # differing rounding its last window was -0.05 in two (single windows down to -0.11) while the round's mean
    # stayed 0.06-0.32 (round 1's: 0.08-0.13).
    # Held-out margins are not asserted: the held-out split is a few prompts.
    for r in (1, 2):
        logged = [json.loads(line) for line in (run / f"round-{r}" / "dpo" / "metrics.jsonl").open()]
        margins = [m["rewards/margins"] for m in logged if "train/loss" in m]
        print(f"CI loop round-{r} DPO: train margins by window {[round(m, 3) for m in margins]}")
        assert len(margins) == 4 and sum(margins) / len(margins) > 0, margins  # 8 steps, logged every 2

    ev = _final_eval(run)
    sft = ev["policies"][ev["reference"]]
    final = ev["policies"]["round-2/ppo"]
    assert final["role"] == "policy"
    print("CI loop gold: SFT", sft["gold/score"], "final", final["gold/score"], "KL", final["kl/mean"])
    assert final["proxy/score"] > sft["proxy/score"] + PROXY_MARGIN, (
        sft["proxy/score"],
        final["proxy/score"],
    )
    assert final["gold/score"] > sft["gold/score"] + GOLD_MARGIN, (
        sft["gold/score"],
        final["gold/score"],
        math.hypot(sft["gold/stderr"], final["gold/stderr"]),
    )
    assert final["win_rate/gold"] > 0.5  # 0.52..0.64 over the 10 runs above
    # KL: finite, positive (the policy moved) and below the bound: KL is at most the largest per-sequence log-ratio,
    # and a policy this close to SFT stays well under the max_new_tokens * log(vocab) ceiling.
    vocab = json.loads((run / "sft" / "model" / "config.json").read_text())["vocab_size"]
    max_new = 20  # eval.max_new_tokens of the CI config
    assert math.isfinite(final["kl/mean"]) and 0 < final["kl/mean"] < max_new * math.log(vocab)
    assert all(math.isfinite(v["kl/mean"]) for v in ev["policies"].values())
    # DPO's final policy evaluated beside PPO's on the same prompts: every headline number finite
    dpo = ev["policies"]["round-2/dpo"]
    assert dpo["role"] == "policy" and dpo["method"] == "dpo" and final["method"] == "ppo"
    print("CI loop DPO gold", dpo["gold/score"], "KL", dpo["kl/mean"], "win", dpo["win_rate/gold"])
    assert dpo["gold/score"] > sft["gold/score"] + GOLD_MARGIN, (sft["gold/score"], dpo["gold/score"])
    keys = (
        "gold/score",
        "proxy/score",
        "kl/mean",
        "win_rate/gold",
        "diversity/distinct_2",
        "diversity/self_bleu",
    )
    assert all(math.isfinite(dpo[k]) for k in keys) and dpo["kl/mean"] > 0
    # best-of-n at the analytic KL
    assert [b["n"] for b in ev["best_of_n"]] == [1, 2, 4, 8]
    assert ev["best_of_n"][2]["kl"] == pytest.approx(math.log(4) - 0.75)
    # snapshots give the over-optimisation curve
    assert any(v["role"] == "snapshot" for v in ev["policies"].values())

    # the report: exists, embeds every plot, and the loop's summary has 5 lines
    html = (run / "report.html").read_text(encoding="utf-8")
    ids = re.findall(
        r'<img id="fig-([\w-]+)" alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', html
    )
    expected = {"rounds", "overoptimisation", "diversity", "curves-pretrain", "curves-sft"}
    expected |= {f"curves-round-{r}-{s}" for r in (1, 2) for s in ("reward", "ppo", "dpo")}
    assert expected <= set(ids), expected - set(ids)
    assert html.count("<img ") == len(ids)
    assert result["report"] == str(run / "report.html")
    assert len(result["summary"]) == 5 and result["summary"][0].startswith("gold score")
    assert "round-2/dpo" in result["summary"][0]
    # one table holds SFT and both methods' final policies of each round
    table = re.search(r"<table id='methods'>(.*?)</table>", html, re.S).group(1)
    assert all(f"round-{r}/{m}" in table for r in (1, 2) for m in ("ppo", "dpo"))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_resume_after_a_kill_ends_at_the_same_metrics(ci_run, tmp_path):
    run, _ = ci_run
    copy = tmp_path / "loop-ci"
    shutil.copytree(run, copy)
    # Rewind the copy to a kill inside round 2's PPO: state has everything up to round-2/reward, PPO's newest
    # checkpoint and final model are gone (the older checkpoint stays), eval and report never happened.
    state = json.loads((copy / "state.json").read_text())
    names = list(state["stages"])
    state["stages"] = {
        k: v for k, v in state["stages"].items() if names.index(k) <= names.index("round-2/reward")
    }
    (copy / "state.json").write_text(json.dumps(state))
    ppo = copy / "round-2" / "ppo"
    checkpoints = sorted((ppo / "checkpoints").glob("step-*"))
    assert len(checkpoints) >= 2, "the CI config must keep two PPO checkpoints for this test"
    shutil.rmtree(checkpoints[-1])
    shutil.rmtree(ppo / "model")
    dpo = copy / "round-2" / "dpo"  # DPO had not finished either: killed between its two checkpoints
    dpo_checkpoints = sorted((dpo / "checkpoints").glob("step-*"))
    shutil.rmtree(dpo_checkpoints[-1])
    shutil.rmtree(dpo / "model")
    shutil.rmtree(copy / "round-2" / "eval")
    (copy / "report.html").unlink()

    stopped = run_loop(_load_ci(tmp_path, "resume=true", "stop_after=round-2/ppo"))
    assert stopped["stopped_after"] == "round-2/ppo"
    assert not (copy / "round-2" / "eval").exists()
    # the interrupted stage continued from its older checkpoint (step 24 of 48) instead of starting over
    assert f"resumed from {checkpoints[-2]}" in (ppo / "log.txt").read_text()
    result = run_loop(_load_ci(tmp_path, "resume=true"))
    assert (copy / "report.html").exists() and result["summary"]
    assert f"resumed from {dpo_checkpoints[-2]}" in (dpo / "log.txt").read_text()

    original, resumed = _final_eval(run), _final_eval(copy)
    for label in ("sft", "round-2/ppo", "round-2/dpo"):
        for key in ("gold/score", "proxy/score", "kl/mean", "win_rate/gold", "diversity/distinct_2"):
            assert resumed["policies"][label][key] == pytest.approx(
                original["policies"][label][key], abs=1e-4
            )
    assert [b["gold/score"] for b in resumed["best_of_n"]] == pytest.approx(
        [b["gold/score"] for b in original["best_of_n"]]
    )


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def test_story_data_is_deterministic_and_disjoint():
    a = build_story_data(CORPUS, n_demos=50, n_prompts=40, n_eval=10, seed=3)
    b = build_story_data(CORPUS, n_demos=50, n_prompts=40, n_eval=10, seed=3)
    assert a == b
    demo_prompts = {d.prompt for d in a.demos}
    assert len(demo_prompts) == 50 and len(set(a.prompts)) == 40 and len(set(a.eval_prompts)) == 10
    assert not demo_prompts & set(a.prompts) and not set(a.prompts) & set(a.eval_prompts)
    assert not demo_prompts & set(a.eval_prompts)
    assert all(p.startswith(INSTRUCTION + " ") for p in a.prompts)
    assert build_story_data(CORPUS, 50, 40, 10, seed=4).prompts != a.prompts
    with pytest.raises(UserError, match="story examples"):
        build_story_data(CORPUS, 10**6, 1, 1)


def test_shipped_story_files_are_the_demo_split(tmp_path, monkeypatch):
    """data/story/ (read by the stage-by-stage configs) is what `python -m rlhf.data.story_demos` writes, and the
    same split configs/demo.yaml's loop makes: the stage-by-stage chain and `make demo` see the same task."""
    from rlhf.data.story_demos import main

    monkeypatch.chdir(ROOT)
    main([str(tmp_path)])
    demo = load_config(LoopConfig, "configs/demo.yaml", [])
    assert (demo.story_demos, demo.prompts, demo.eval_prompts, demo.seed) == (600, 768, 32, 0)
    for name in ("demos.jsonl", "prompts.jsonl", "eval_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / "story" / name).read_bytes(), name


def test_story_examples_cut_opening_and_continuation():
    text = (
        "THE TITLE\n\n"
        "Once there was a little Tulip. She lived in a dark house under the ground. One day she heard a tap.\n\n"
        "     A verse line that is indented,\n     and so is skipped.\n\n"
        "Short.\n"
    )
    pairs = story_examples(text, min_response_words=3)
    assert pairs == [
        (
            "Once there was a little Tulip. She lived in a dark house under the ground.",
            "One day she heard a tap.",
        )
    ]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_method_dpo_replaces_reward_and_ppo(ci_run, tmp_path):
    """method=dpo: after round 1's labels (SFT samples, the same as the PPO run's), DPO and eval; no reward model."""
    from rlhf.loop import Loop
    from rlhf.report import summary_lines

    run, _ = ci_run
    copy = tmp_path / "loop-ci"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("round-2", "report.html"))
    for stage in ("reward", "ppo", "dpo", "eval"):
        shutil.rmtree(copy / "round-1" / stage)
    state = json.loads((copy / "state.json").read_text())
    keep = ("data", "pretrain", "sft", "round-1/sample", "round-1/label")
    state["stages"] = {k: v for k, v in state["stages"].items() if k in keep}
    (copy / "state.json").write_text(json.dumps(state))
    config = _load_ci(tmp_path, "method=dpo", "compare_dpo=false", "resume=true", "stop_after=round-1/eval")
    assert config.stage_names()[3:] == ["round-1/sample", "round-1/label", "round-1/dpo", "round-1/eval"] + [
        f"round-2/{s}" for s in ("sample", "label", "dpo", "eval")
    ]
    # round 2 would sample from, and continue, round 1's DPO policy
    assert Loop(config).policy_before(2) == str(copy / "round-1" / "dpo" / "model")
    run_loop(config)
    assert not (copy / "round-1" / "reward").exists() and not (copy / "round-1" / "ppo").exists()
    ev = json.loads((copy / "round-1" / "eval" / "metrics.json").read_text())
    assert list(ev["policies"]) == ["sft", "round-1/dpo"] and ev["best_of_n"] == []  # no RM: no best-of-n
    dpo = ev["policies"]["round-1/dpo"]
    assert math.isnan(dpo["proxy/score"]) and math.isfinite(dpo["gold/score"]) and dpo["kl/mean"] > 0
    lines = summary_lines(copy)
    assert len(lines) == 5 and "-> round-1/dpo" in lines[0]


def test_loop_config_checks_and_stage_wiring(tmp_path):
    config = _load_ci(tmp_path)
    names = config.stage_names()
    assert names[:3] == ["data", "pretrain", "sft"] and names[-1] == "round-2/eval" and len(names) == 15
    assert names[3:9] == [f"round-1/{s}" for s in ("sample", "label", "reward", "ppo", "dpo", "eval")]
    with pytest.raises(UserError, match="compare_dpo"):
        _load_ci(tmp_path, "method=dpo")  # the CI config compares: DPO alone is compare_dpo=false
    with pytest.raises(UserError, match="stop_after"):
        _load_ci(tmp_path, "stop_after=round-9/ppo")
    with pytest.raises(UserError, match="import_comparisons"):
        _load_ci(tmp_path, "labeller=import")
    from rlhf.evaluate import EvalConfig

    cfg = stage_config(
        EvalConfig, config, {"num_prompts": 5, "reference": "user/ref"},
        {"reference": "loop/ref", "prompts": "p.jsonl", "not_a_field": 1}, "round-2/eval", resume=True,
    )  # fmt: skip
    # the user's section wins over wiring; run folder and resume are the loop's
    assert (cfg.num_prompts, cfg.reference, cfg.prompts) == (5, "user/ref", "p.jsonl")
    assert (cfg.runs_dir, cfg.name, cfg.resume) == (str(tmp_path / "loop-ci"), "round-2", True)
    with pytest.raises(UserError, match="round-2/eval"):
        stage_config(
            EvalConfig, config, {"nope": 1}, {"reference": "r", "prompts": "p"}, "round-2/eval", False
        )


def test_fp32_overrides_apply_only_where_the_stages_fall_back_to_fp32(tmp_path, monkeypatch):
    import dataclasses

    from rlhf.loop import Loop

    overrides = {"ppo": {"iterations": 3, "kl": {"coef": 0.5}}, "pretrain": {"max_steps": 7}}
    config = dataclasses.replace(_load_ci(tmp_path), fp32_overrides=overrides)
    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # as on a CPU without fast bf16
    c = Loop(config).c
    assert (c.ppo["iterations"], c.ppo["kl"], c.pretrain["max_steps"]) == (
        3,
        {"mode": "fixed", "coef": 0.5, "penalty": "loss"},
        7,
    )
    assert c.ppo["bf16"] and c.sft == config.sft  # the rest of each section stays; other sections untouched
    assert (
        config.ppo["iterations"] == 48 and config.ppo["kl"]["coef"] == 0.3
    )  # the given config is not changed
    no_bf16 = {k: {**getattr(config, k), "bf16": False} for k in ("pretrain", "sft", "reward", "ppo")}
    assert (
        Loop(dataclasses.replace(config, **no_bf16)).c.ppo["iterations"] == 48
    )  # fp32 asked for: as written
    monkeypatch.setenv("RLHF_CPU_BF16", "1")
    assert Loop(config).c.ppo["iterations"] == 48  # bf16 runs: as written
    with pytest.raises(UserError, match="fp32_overrides.*'ppo_typo'"):
        _load_ci(tmp_path, "fp32_overrides={ppo_typo: {iterations: 3}}")


def test_human_labelling_waits_for_the_app_and_exports(tmp_path):
    """labeller=human: the batch goes into the feedback app, the loop waits while people rank, then exports."""
    import threading
    import time

    from sqlalchemy import select

    from rlhf.data.records import Response, SampleRecord, read_comparisons
    from rlhf.feedback import schemas, service
    from rlhf.feedback.store import Batch, open_database
    from rlhf.human_labels import label_with_app

    db_path = tmp_path / "feedback.db"
    config = _load_ci(tmp_path, "labeller=human", f"feedback_db={db_path}", "poll_seconds=0.1")
    texts = ["a happy day with a friend", "a sad dark night", "the end"]
    samples = [SampleRecord(f"p{i}", f"Continue the story: {i}", [Response(t, policy="sft") for t in texts])
               for i in range(3)]  # fmt: skip
    engine, session = open_database(str(db_path))  # the app's database exists (people are labelling in it)
    result: dict = {}
    worker = threading.Thread(
        target=lambda: result.update(
            label_with_app(
                config.feedback_db,
                samples,
                "ci-round-1",
                tmp_path / "label",
                poll_seconds=config.poll_seconds,
            )
        )
    )
    worker.start()
    for _ in range(600):  # the loop imports the batch
        time.sleep(0.1)
        with session() as db:
            if db.scalar(select(Batch.id).where(Batch.name == "ci-round-1")) is not None:
                break
    with session() as db:
        _, token = service.create_annotator(db, "alice")
        actor = service.authenticate(db, token)
        for n in range(3):
            assert worker.is_alive()  # still waiting for labels
            item, _ = service.next_item(db, actor, "ci-round-1")
            service.submit(
                db, actor, item.id, schemas.SubmitIn(ranks=[1, 3, 2], submission_id=f"submit-{n:04d}")
            )
    worker.join(timeout=60)
    engine.dispose()
    assert not worker.is_alive()
    assert result["count"] == 3 and result["labeller"] == "human"
    comparisons = read_comparisons(result["comparisons"])
    assert [c.ranks for c in comparisons] == [[1, 3, 2]] * 3
    assert all(c.responses == texts and c.labeller.endswith("alice") for c in comparisons)
