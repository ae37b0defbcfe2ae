"""`rlhf loop`: the whole RLHF loop from one config, resumable between and inside stages.

    data -> pretrain (or model.path) -> sft -> R rounds of
        {sample K per prompt from the current policy -> label (synthetic | import | human) ->
         reward (on ALL comparisons so far) -> ppo (from the current policy, reference = SFT) -> eval}
    -> report.html + a 5-line summary

`method: dpo` replaces reward + ppo by one `dpo` stage: DPO on ALL comparisons so far, from the current policy, with
the SFT model as reference (`dpo_reference: previous` makes the previous policy the reference instead: iterative
DPO). `compare_dpo: true` keeps PPO as the method that samples the next round and also trains a DPO policy track on
the same comparisons each round (round-<r>/dpo, starting from round r-1's DPO policy), evaluated beside PPO.

Each stage is the same `run(config)` that its CLI calls; the loop only builds their configs, calls them in order
and records each completed stage in `runs/<name>/state.json`. With `resume=true` completed stages are skipped and
the first unfinished one is called with `resume=true`, so it continues from its own newest checkpoint. Folders:
`runs/<name>/{data,pretrain,sft}/` and `runs/<name>/round-<r>/{sample,label,reward,ppo,dpo,eval}/`.

Per-stage settings live in the config's `pretrain:`, `sft:`, `sample:`, `reward:`, `ppo:`, `dpo:`, `eval:` sections
(any field of that stage's config); the loop sets the wiring (model paths, data files, run folders) itself.
`fp32_overrides` holds settings laid over those sections on a CPU where bf16 falls back to fp32 (a cheaper demo
where every stage runs 2-3x slower).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import ModelConfig, StageConfig, cpu_bf16_is_fast, from_dict, option, to_dict
from rlhf.errors import UserError
from rlhf.loop_state import State, deep_merge, has_field, stage_config
from rlhf.stagecli import parse_stage_args
from rlhf.tracking import setup_logging

log = logging.getLogger("rlhf")

DEFAULT_CORPUS = "data/corpus/children_stories_5books.txt"
ROUND_STAGES = ("sample", "label", "reward", "ppo", "dpo", "eval")  # the stages a round may have, in order
# each stage section of the loop config: the module and config class its settings are checked against
SECTION_CONFIGS = {
    "pretrain": ("rlhf.stages.pretrain", "PretrainConfig"), "sft": ("rlhf.stages.sft", "SFTConfig"),
    "sample": ("rlhf.stages.sample", "SampleConfig"), "reward": ("rlhf.stages.reward", "RewardConfig"),
    "ppo": ("rlhf.stages.ppo", "PPOConfig"), "dpo": ("rlhf.stages.dpo", "DPOConfig"),
    "eval": ("rlhf.evaluate", "EvalConfig"),
}  # fmt: skip
STAGE_SECTIONS = tuple(SECTION_CONFIGS)


@dataclass
class LoopConfig(StageConfig):
    model: ModelConfig = option(
        ModelConfig(), "base model: `path` skips pre-training; else `preset` is pre-trained"
    )
    rounds: int = option(2, "RLHF rounds of sample -> label -> reward -> ppo (or dpo) -> eval", low=1)
    method: str = option(
        "ppo",
        "how each round optimises the policy: ppo (reward model + PPO) or dpo (DPO on the comparisons, no reward "
        "model); the method's policy samples the next round",
        choices=("ppo", "dpo"),
    )
    compare_dpo: bool = option(
        False, "method=ppo: also train DPO on the same comparisons each round and evaluate it beside PPO"
    )
    dpo_reference: str = option(
        "sft",
        "reference of each round's DPO: sft (round r starts from round r-1's DPO policy, reference = SFT) or "
        "previous (the policy it starts from: iterative DPO, the KL tie restarts every round)",
        choices=("sft", "previous"),
    )
    corpus: str = option(DEFAULT_CORPUS, "plain-text corpus: pre-training text and the story task's source")
    story_demos: int = option(400, "story-continuation demonstrations cut from the corpus for SFT", low=0)
    prompts: int = option(256, "story prompts for sampling and PPO (disjoint from demos and eval)", low=1)
    eval_prompts: int = option(32, "held-out story prompts for evaluation", low=1)
    sft_data: list[str] = option(
        ["data/sft/self-instruct_seed_tasks.jsonl"],
        "extra human demonstration files for SFT (any supported format)",
    )
    prompts_per_round: int = option(
        64, "prompts sampled and labelled per round (fresh ones each round)", low=1
    )
    samples_per_prompt: int = option(4, "K: responses sampled per prompt and ranked together", low=2, high=9)
    labeller: str = option(
        "synthetic",
        "who ranks: a synthetic labeller, an imported file, or humans in the feedback app",
        choices=("synthetic", "import", "human"),
    )
    synthetic: str = option("sentiment", "synthetic labeller: the demo rubric (or `gold` with gold_model)")
    labeller_temperature: float = option(0.5, "Boltzmann noise of the synthetic labeller; 0 = exact", low=0.0)
    gold_model: str = option("", "frozen gold reward model folder for synthetic=gold")
    import_comparisons: list[str] = option(
        [], "labeller=import: one comparison file per round (the last one is reused for later rounds)"
    )
    feedback_db: str = option(
        "", "labeller=human: the feedback app's database (SQLite path or postgresql://)"
    )
    feedback_overlap: int = option(1, "labeller=human: annotators per item", low=1)
    poll_seconds: float = option(10.0, "labeller=human: seconds between progress checks", low=0.1)
    gold: str = option(
        "sentiment", "gold scorer for evaluation and PPO logging", choices=("sentiment", "none")
    )
    stop_after: str = option("", "stop after this stage (e.g. round-1/reward); resume=true continues")
    pretrain: dict = option({}, "settings of the pretrain stage (rlhf pretrain --help)")
    sft: dict = option({}, "settings of the sft stage (rlhf sft --help)")
    sample: dict = option({}, "settings of each round's sample stage (rlhf sample --help)")
    reward: dict = option({}, "settings of each round's reward stage (rlhf reward --help)")
    ppo: dict = option({}, "settings of each round's ppo stage (rlhf ppo --help)")
    dpo: dict = option({}, "settings of each round's dpo stage (rlhf dpo --help)")
    eval: dict = option({}, "settings of each round's eval (rlhf eval --help)")
    fp32_overrides: dict = option(
        {},
        "stage settings laid over the sections above when the stages fall back from bf16 to fp32 because this "
        "CPU has no fast bf16 (fp32 runs 2-3x slower): e.g. {ppo: {iterations: 48}} keeps a demo in its budget",
    )

    def validate(self) -> None:
        super().validate()
        if self.labeller == "import" and not self.import_comparisons:
            raise UserError("config field 'import_comparisons': labeller=import needs at least one file")
        if self.labeller == "human" and not self.feedback_db:
            raise UserError("config field 'feedback_db': labeller=human needs the feedback app's database")
        if self.compare_dpo and self.method == "dpo":
            raise UserError(
                "config field 'compare_dpo': method=dpo already trains DPO; compare_dpo needs method=ppo"
            )
        for key, value in self.fp32_overrides.items():
            if key not in STAGE_SECTIONS or not isinstance(value, dict):
                raise UserError(
                    f"config field 'fp32_overrides': '{key}' must be a stage section ({', '.join(STAGE_SECTIONS)}) "
                    "holding that stage's settings"
                )
        names = self.stage_names()
        if self.stop_after and self.stop_after not in names:
            raise UserError(
                f"config field 'stop_after': '{self.stop_after}' is not a stage ({', '.join(names)})"
            )

    def stage_names(self) -> list[str]:
        names = ["data"] + ([] if self.model.path else ["pretrain"]) + ["sft"]
        for r in range(1, self.rounds + 1):
            names += [f"round-{r}/{s}" for s in self.round_stages()]
        return names

    def round_stages(self) -> list[str]:
        """The stages of one round: PPO needs a reward model; DPO learns from the comparisons directly."""
        wanted = {"sample", "label", "eval"}
        wanted |= {"reward", "ppo"} if self.method == "ppo" else {"dpo"}
        if self.compare_dpo:
            wanted.add("dpo")
        return [s for s in ROUND_STAGES if s in wanted]


# ---------------------------------------------------------------------------------------------------------------
# The loop


def runs_in_fp32_fallback(config: LoopConfig) -> bool:
    """Whether the stages' bf16 falls back to fp32 here: a CPU run, bf16 asked for, no fast bf16 on this CPU."""
    asks_bf16 = any(section.get("bf16") for section in (getattr(config, k) for k in STAGE_SECTIONS))
    return config.device == "cpu" and asks_bf16 and not cpu_bf16_is_fast()


def with_fp32_overrides(config: LoopConfig) -> LoopConfig:
    """The config with `fp32_overrides` laid over its stage sections where the stages will run fp32."""
    if not config.fp32_overrides or not runs_in_fp32_fallback(config):
        return config
    sections = {k: deep_merge(getattr(config, k), v) for k, v in config.fp32_overrides.items()}
    return dataclasses.replace(config, **sections)


class Loop:
    def __init__(self, config: LoopConfig):
        self.c = with_fp32_overrides(config)
        self.fp32_overridden = self.c is not config
        self.run_dir = Path(config.runs_dir) / config.name
        self.state = State(self.run_dir, fresh=not config.resume)
        self.resuming = config.resume

    # -- paths ---------------------------------------------------------------------------------------------
    def path(self, stage: str, *rest: str) -> Path:
        return self.run_dir.joinpath(*stage.split("/"), *rest)

    @property
    def sft_model(self) -> str:
        return str(self.path("sft", "model"))

    def policy_before(self, r: int, method: str | None = None) -> str:
        """The policy round r starts from (and samples with): SFT, then the previous round's policy of `method`."""
        return (
            self.sft_model if r == 1 else str(self.path(f"round-{r - 1}/{method or self.c.method}", "model"))
        )

    # -- running -------------------------------------------------------------------------------------------
    def stage(self, name: str, fn) -> dict | None:
        """Run one stage unless state says it is done; False from stop_after stops the loop."""
        if self.state.done(name):
            log.info("loop: %s already done (state.json), skipping", name)
            return self.state.summary(name)
        resume, self.resuming = self.resuming, False  # only the first unfinished stage continues a checkpoint
        names = self.c.stage_names()
        where = f"[{names.index(name) + 1}/{len(names)}]"
        log.info("loop: %s === %s%s ===", where, name, " (resuming)" if resume else "")
        started, cpu_started = time.perf_counter(), time.process_time()
        summary = fn(resume) or {}
        seconds = time.perf_counter() - started
        self.state.complete(name, summary, seconds, time.process_time() - cpu_started)
        setup_logging(self.run_dir / "loop.log")
        log.info("loop: %s done in %.1fs", name, seconds)
        return summary

    def call(self, module: str, cls_name: str, section: dict, wiring: dict, where: str, resume: bool) -> dict:
        mod = importlib.import_module(module)
        config = stage_config(getattr(mod, cls_name), self.c, section, wiring, where, resume)
        return mod.run(config)

    def check_sections(self) -> None:
        """Fail before any work when a stage section names an unknown field or a bad value."""
        for key, (module, cls_name) in SECTION_CONFIGS.items():
            if key == "pretrain" and self.c.model.path:
                continue
            try:
                from_dict(getattr(importlib.import_module(module), cls_name), getattr(self.c, key))
            except UserError as exc:
                raise UserError(f"loop config section '{key}': {exc}") from None

    def run(self) -> dict:
        self.check_sections()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(self.run_dir / "loop.log")
        if self.fp32_overridden:
            log.info(
                "loop: this CPU has no fast bf16, so every stage runs fp32; using the config's fp32_overrides: %s",
                json.dumps(self.c.fp32_overrides, sort_keys=True),
            )
        self.state.data["config"] = to_dict(self.c)
        self.state.save()
        for name in self.c.stage_names():
            self.stage(name, self._runner(name))
            if name == self.c.stop_after:
                log.info("loop: stopped after %s as asked (stop_after); continue with resume=true", name)
                return {"stopped_after": name, "run": str(self.run_dir)}
        from rlhf.report import build_report, summary_lines

        report = build_report(self.run_dir)
        return {"run": str(self.run_dir), "report": str(report), "summary": summary_lines(self.run_dir)}

    def _runner(self, name: str):
        if "/" not in name:
            return getattr(self, f"_{name}")
        rnd, stage = name.split("/")
        r = int(rnd.split("-")[1])
        return lambda resume: getattr(self, f"_round_{stage}")(r, resume)

    # -- stages --------------------------------------------------------------------------------------------
    def _data(self, resume: bool) -> dict:
        from rlhf.data.story_demos import build_story_data, write_story_data

        data = build_story_data(
            self.c.corpus, self.c.story_demos, self.c.prompts, self.c.eval_prompts, self.c.seed
        )
        paths = write_story_data(data, self.path("data"))
        log.info(
            "story task: %d SFT demos, %d RLHF prompts, %d held-out eval prompts in %s",
            len(data.demos),
            len(data.prompts),
            len(data.eval_prompts),
            self.path("data"),
        )
        return {k: str(v) for k, v in paths.items()}

    def _pretrain(self, resume: bool) -> dict:
        wiring = {f"model.{k}": v for k, v in to_dict(self.c.model).items()}
        wiring["data"] = [self.c.corpus]
        return self.call(
            "rlhf.stages.pretrain", "PretrainConfig", self.c.pretrain, wiring, "pretrain", resume
        )

    def _sft(self, resume: bool) -> dict:
        base = self.c.model.path or str(self.path("pretrain", "model"))
        demos = [str(self.path("data", "demos.jsonl"))] if self.c.story_demos else []
        wiring = {"model.path": base, "data": demos + list(self.c.sft_data)}
        return self.call("rlhf.stages.sft", "SFTConfig", self.c.sft, wiring, "sft", resume)

    def _round_prompts(self, r: int) -> Path:
        """This round's slice of the RLHF prompts (fresh prompts each round, wrapping around)."""
        from rlhf.data.records import read_jsonl, write_jsonl

        rows = [obj for _, obj in read_jsonl(self.path("data", "prompts.jsonl"), "prompts")]
        n = self.c.prompts_per_round
        start = ((r - 1) * n) % len(rows)
        picked = [rows[(start + i) % len(rows)] for i in range(min(n, len(rows)))]
        out = self.path(f"round-{r}", "prompts.jsonl")
        write_jsonl(out, picked)
        return out

    def _round_sample(self, r: int, resume: bool) -> dict:
        wiring = {
            "model.path": self.policy_before(r),
            "prompts": str(self._round_prompts(r)),
            "k": self.c.samples_per_prompt,
            "samples_per_prompt": self.c.samples_per_prompt,
            "num_samples": self.c.samples_per_prompt,
        }
        return self.call(
            "rlhf.stages.sample", "SampleConfig", self.c.sample, wiring, f"round-{r}/sample", resume
        )

    def _samples_file(self, r: int) -> Path:
        summary = self.state.summary(f"round-{r}/sample")
        for key in ("samples", "out", "output", "path"):
            if key in summary and str(summary[key]).endswith(".jsonl"):
                return Path(summary[key])
        return self.path(f"round-{r}/sample", "samples.jsonl")

    def _round_label(self, r: int, resume: bool) -> dict:
        from rlhf.data.records import read_samples, write_jsonl

        out_dir = self.path(f"round-{r}/label")
        out_dir.mkdir(parents=True, exist_ok=True)
        samples = read_samples(self._samples_file(r))
        if self.c.labeller == "human":
            from rlhf.human_labels import label_with_app

            return label_with_app(
                self.c.feedback_db,
                samples,
                f"{self.c.name}-round-{r}",
                out_dir,
                overlap=self.c.feedback_overlap,
                poll_seconds=self.c.poll_seconds,
            )
        from rlhf.labellers import get_labeller, gold_agreement, label_samples

        if self.c.labeller == "import":
            files = self.c.import_comparisons
            labeller = get_labeller("import", path=files[min(r, len(files)) - 1])
        else:
            labeller = get_labeller(
                self.c.synthetic, self.c.labeller_temperature, seed=self.c.seed + r, path=self.c.gold_model
            )
        comparisons = label_samples(samples, labeller)
        path = out_dir / "comparisons.jsonl"
        write_jsonl(path, comparisons)
        agree = gold_agreement(comparisons)
        log.info(
            "round %d: %d comparisons by %s (top choice = gold best in %.0f%%)",
            r,
            len(comparisons),
            labeller.name,
            100 * agree,
        )
        return {
            "comparisons": str(path),
            "count": len(comparisons),
            "labeller": labeller.name,
            "gold_agreement": agree,
        }

    def _round_reward(self, r: int, resume: bool) -> dict:
        files = [str(self.path(f"round-{i}/label", "comparisons.jsonl")) for i in range(1, r + 1)]
        wiring = {"model.path": self.sft_model, "comparisons": files}
        return self.call(
            "rlhf.stages.reward", "RewardConfig", self.c.reward, wiring, f"round-{r}/reward", resume
        )

    def _round_ppo(self, r: int, resume: bool) -> dict:
        from rlhf.stages import ppo

        wiring = {
            "model.path": self.policy_before(r),
            "reference": self.sft_model,
            "reward_model": str(self.path(f"round-{r}/reward", "model")),
            "prompts": str(self.path("data", "prompts.jsonl")),
            "gold": "" if self.c.gold == "none" else self.c.gold,
        }
        if r > 1 and not has_field(ppo.PPOConfig, "reference"):
            log.warning("ppo has no 'reference' field: round %d starts PPO from SFT (its reference) again", r)
            wiring["model.path"] = self.sft_model
        return self.call("rlhf.stages.ppo", "PPOConfig", self.c.ppo, wiring, f"round-{r}/ppo", resume)

    def _round_dpo(self, r: int, resume: bool) -> dict:
        """DPO on all comparisons so far, from the DPO track's previous policy (SFT in round 1). Reference: SFT
        (`dpo_reference: sft`, the same anchor as PPO's KL penalty and eval's KL) or that starting policy."""
        files = [str(self.path(f"round-{i}/label", "comparisons.jsonl")) for i in range(1, r + 1)]
        start = self.policy_before(r, "dpo")
        reference = self.sft_model if self.c.dpo_reference == "sft" and start != self.sft_model else ""
        wiring = {"model.path": start, "reference": reference, "comparisons": files}
        context = _context_of(self.sft_model)
        if context:  # the stage's default lengths must fit a small model's context
            wiring["max_length"] = min(256, context)
            wiring["max_prompt_length"] = min(128, context // 2)
        return self.call("rlhf.stages.dpo", "DPOConfig", self.c.dpo, wiring, f"round-{r}/dpo", resume)

    def _round_eval(self, r: int, resume: bool) -> dict:
        from rlhf import evaluate

        ppo = self.c.method == "ppo"
        methods = ["ppo"] * ppo + ["dpo"] * (not ppo or self.c.compare_dpo)  # the main method first
        wiring = {
            "policies": [str(self.path(f"round-{r}/{m}", "model")) for m in methods],
            "snapshots": [str(self.path(f"round-{r}/ppo"))] if ppo else [],
            "reference": self.sft_model,
            "reward_model": str(self.path(f"round-{r}/reward", "model")) if ppo else "",
            "prompts": str(self.path("data", "eval_prompts.jsonl")),
            "gold": self.c.gold,
        }
        config = stage_config(evaluate.EvalConfig, self.c, self.c.eval, wiring, f"round-{r}/eval", resume)
        summary = evaluate.run(config)
        return {k: summary[k] for k in ("metrics", "rm_accuracy")}


def _context_of(model_dir: str) -> int | None:
    """n_positions (or max_position_embeddings) from a model folder's config.json, if readable."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return config.get("n_positions") or config.get("max_position_embeddings")


def run(config: LoopConfig) -> dict:
    return Loop(config).run()


def main(argv: list[str]) -> int:
    config = parse_stage_args(LoopConfig, argv, "rlhf loop", __doc__.split("\n\n")[0])
    if config is None:
        return 0
    started = time.perf_counter()
    result = run(config)
    minutes = (time.perf_counter() - started) / 60
    if "stopped_after" in result:
        print(f"loop stopped after {result['stopped_after']}; continue with: rlhf loop ... resume=true")  # noqa: T201
        return 0
    print(f"\nRLHF loop finished in {minutes:.1f} min. Summary:")  # noqa: T201
    for line in result["summary"]:
        print(f"  {line}")  # noqa: T201
    print(f"report: {result['report']}")  # noqa: T201
    return 0
