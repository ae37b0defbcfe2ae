"""Config loading: defaults, YAML, overrides, and errors that name the field."""

from dataclasses import dataclass

import pytest

from rlhf.config import ModelConfig, StageConfig, load_config, option
from rlhf.errors import UserError
from rlhf.stagecli import format_help, parse_stage_args


@dataclass
class DemoConfig(StageConfig):
    POSITIONAL = ("data",)
    data: str = option("x.txt", "input file")
    lr: float = option(3e-4, "learning rate", low=0.0)
    steps: int = option(10, "optimizer steps", low=1)
    mode: str = option("fast", "how", choices=("fast", "slow"))
    tags: list[str] = option([], "labels")
    model: ModelConfig = option(ModelConfig(), "model")


def test_defaults_and_dotted_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-3\nmodel:\n  preset: small\n")
    cfg = load_config(DemoConfig, cfg_file, ["steps=5", "model.vocab_size=1024", "tags=a,b"])
    assert cfg.lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string; we still get a float
    assert cfg.steps == 5 and cfg.model.preset == "small" and cfg.model.vocab_size == 1024
    assert cfg.tags == ["a", "b"]
    assert cfg.mode == "fast" and cfg.model.context == 0


def test_unknown_key_named_with_suggestion():
    with pytest.raises(UserError, match=r"unknown field 'model\.presett'.*did you mean 'model\.preset'"):
        load_config(DemoConfig, None, ["model.presett=tiny"])


def test_wrong_type_names_field():
    with pytest.raises(UserError, match=r"'steps': expected an integer"):
        load_config(DemoConfig, None, ["steps=many"])
    with pytest.raises(UserError, match=r"'resume': expected true or false"):
        load_config(DemoConfig, None, ["resume=maybe"])


def test_range_and_choices_named():
    with pytest.raises(UserError, match=r"'steps': must be >= 1"):
        load_config(DemoConfig, None, ["steps=0"])
    with pytest.raises(UserError, match=r"'mode': must be one of fast, slow"):
        load_config(DemoConfig, None, ["mode=medium"])


def test_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(DemoConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(DemoConfig, bad)


def test_cli_forms(capsys):
    cfg = parse_stage_args(DemoConfig, ["in.txt", "--steps", "7", "--resume", "--lr=0.5", "name=x"], "p", "d")
    assert (cfg.data, cfg.steps, cfg.resume, cfg.lr, cfg.name) == ("in.txt", 7, True, 0.5, "x")
    assert parse_stage_args(DemoConfig, ["--help"], "rlhf demo", "does demo things") is None
    out = capsys.readouterr().out
    for name in ("model.preset", "lr", "steps", "resume", "seed"):
        assert name in out
    help_text = format_help(DemoConfig, "p", "d")
    assert "[fast | slow]" in help_text


def test_cpu_bf16_detection_reads_the_cpu_flags(tmp_path, monkeypatch):
    from rlhf.config import cpu_bf16_is_fast

    monkeypatch.delenv("RLHF_CPU_BF16", raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
    )
    assert cpu_bf16_is_fast(str(info)) is False  # AVX2 only: bf16 would be emulated
    info.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_bf16_is_fast(str(info)) is True
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")  # Arm
    assert cpu_bf16_is_fast(str(info)) is True
    assert cpu_bf16_is_fast(str(tmp_path / "missing")) is True  # cannot tell: the user's setting stands
    info.write_text("flags\t\t: avx2\n")
    monkeypatch.setenv("RLHF_CPU_BF16", "1")
    assert cpu_bf16_is_fast(str(info)) is True
    info.write_text("flags\t\t: avx2 avx512_bf16\n")
    monkeypatch.setenv("RLHF_CPU_BF16", "0")  # fp32 as on a CPU without bf16 (what fp32_overrides react to)
    assert cpu_bf16_is_fast(str(info)) is False


@dataclass
class Bf16Config(StageConfig):
    bf16: bool = option(False, "bf16 autocast")


def test_bf16_falls_back_to_fp32_on_a_cpu_without_it(monkeypatch, caplog):
    import rlhf.config

    monkeypatch.setattr(rlhf.config, "cpu_bf16_is_fast", lambda: False)
    monkeypatch.setattr(
        rlhf.config, "_warned", set()
    )  # warned once per process: maybe already, by another test
    assert load_config(Bf16Config, None, ["bf16=true"]).bf16 is False  # on CPU: fp32, with a warning
    assert "AVX512-BF16" in caplog.text
    assert (
        load_config(Bf16Config, None, ["bf16=true", "device=cuda"]).bf16 is True
    )  # GPUs decide for themselves
    monkeypatch.setattr(rlhf.config, "cpu_bf16_is_fast", lambda: True)
    assert load_config(Bf16Config, None, ["bf16=true"]).bf16 is True
