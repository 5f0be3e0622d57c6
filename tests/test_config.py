"""Config loading: YAML + `--set` overrides onto frozen dataclasses; errors name the key."""
import dataclasses

import pytest
import yaml

from rlhf_fast.config import (ConfigError, OptimConfig, PipelineConfig, PPOConfig, SFTConfig, load_config,
                              parse_overrides, to_dict)


def test_defaults_are_valid_and_frozen():
    cfg = PipelineConfig()
    assert cfg.sft.optim.lr > 0 and cfg.ppo.kl.placement == "reward"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.sft.batch_size = 3


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  batch_size: 8\n  optim:\n    lr: 1e-3\nppo:\n  kl:\n    target: 6\n")
    cfg = load_config(PipelineConfig, path, ["sft.optim.lr=5e-4", "ppo.kl.kind=k3", "sft.optim.betas=[0.8, 0.9]"])
    assert cfg.sft.batch_size == 8
    assert cfg.sft.optim.lr == 5e-4  # the override wins over the file
    assert cfg.sft.optim.betas == (0.8, 0.9)
    assert cfg.ppo.kl.target == 6.0 and cfg.ppo.kl.kind == "k3"
    # keys not mentioned keep the pipeline's own defaults (not the bare dataclass defaults)
    assert cfg.sft.epochs == PipelineConfig().sft.epochs
    assert cfg.sft.optim.warmup_steps == PipelineConfig().sft.optim.warmup_steps


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(PipelineConfig, None, ["rm.epochs=4", "ppo.ptx_coef=0.5"])
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(PipelineConfig, path) == cfg


@pytest.mark.parametrize("override, message", [
    ("sft.lr=1", "sft.lr: unknown key"),
    ("nope=1", "nope: unknown key"),
    ("ppo.kl.coeff=1", "ppo.kl.coeff: unknown key"),
    ("sft.optim.lr=-1", "sft.optim.lr: must be a finite number > 0"),
    ("sft.optim.lr=.inf", "sft.optim.lr: expected a finite number"),
    ("rm.optim.lr=.nan", "rm.optim.lr: expected a finite number"),
    ("ppo.sampling.temperature=0", "ppo.sampling.temperature: must be > 0"),
    ("ppo.sampling.top_p=1.5", "ppo.sampling.top_p: must be in (0, 1]"),
    ("ppo.keep_checkpoints=0", "ppo.keep_checkpoints: must be >= 1"),
    ("sft.arch.hidden_size=36", "the head dim, 9) must be even"),
    ("ppo.kl.kind=k9", "ppo.kl.kind: must be"),
    ("rm.epochs=abc", "rm.epochs: expected an integer"),
    ("rm.epochs=1.5", "rm.epochs: expected an integer"),
    ("sft.optim.betas=[0.9]", "sft.optim.betas: expected a list of 2 values"),
    ("sft=3", "sft: expected a mapping"),
    ("ppo.gamma=2", "ppo.gamma: must be in [0, 1]"),
    ("task.k_max=12", "task.k_min: need 2 <= k_min <= k_max <= 9"),
    ("sft.arch.num_heads=3", "sft.arch.hidden_size: must be divisible by num_heads"),
    ("ppo.generator=vllm", "ppo.generator: removed"),
    ("eval_samples=0", "eval_samples: must be >= 1"),
])
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, [override])
    assert message in str(e.value)


def test_non_finite_numbers_are_rejected_when_built_directly():
    with pytest.raises(ConfigError, match="lr: must be a finite number"):
        OptimConfig(lr=float("inf"))


def test_stage_configs_load_alone(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: some/dir\ntrain_data: x.jsonl\n")
    cfg = load_config(SFTConfig, path, ["optim.schedule=linear"])
    assert cfg.model == "some/dir" and cfg.optim == OptimConfig(schedule="linear")
    with pytest.raises(ConfigError, match="iterations: must be >= 1"):
        load_config(PPOConfig, None, ["iterations=0"])


def test_bad_files_and_overrides(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(PipelineConfig, path)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["sft.lr"])
    assert parse_overrides(["a.b=1", "a.c=x", "d="]) == {"a": {"b": 1, "c": "x"}, "d": ""}
