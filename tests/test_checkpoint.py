"""Checkpoints: atomic writes, DCP model + optimiser state, RNG round trip, exact resume."""
import logging
import random

import pytest
import torch
from _tiny import TINY_ARCH, tiny_sft_config

from rlhf_fast.checkpoint import (STATE_FILE, find_checkpoint, load_state, read_models, rng_state, save_checkpoint,
                                  set_rng_state)
from rlhf_fast.config import RMConfig
from rlhf_fast.default_task import build_model
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import load_model
from rlhf_fast.models.packed import pack
from rlhf_fast.stages.rm import train_rm
from rlhf_fast.stages.sft import train_sft


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def optimizer_state(ckpt, tok, cfg) -> dict:
    """The optimiser state saved in checkpoint `ckpt`, read into a fresh model and AdamW."""
    model = build_model(TINY_ARCH, tok, seed=9)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    read_models(ckpt, {"model": model}, opt)
    return opt.state


def test_save_is_atomic_and_loadable(task, tmp_path):
    root, tok, _ = task
    lm = build_model(TINY_ARCH, tok, seed=1)
    rm = ScalarHeadModel(build_model(TINY_ARCH, tok, seed=2))  # a backbone: its lm_head is dropped
    path = tmp_path / "ckpt"
    save_checkpoint(path, {"policy": lm, "value": rm}, {"step": 1}, tok)
    assert load_state(path)["step"] == 1
    loaded, back = build_model(TINY_ARCH, tok, seed=3), ScalarHeadModel(build_model(TINY_ARCH, tok, seed=4))
    read_models(path, {"policy": loaded, "value": back})
    assert_bitwise_equal(weights(lm), weights(loaded))
    batch = pack([[3, 4], [5]], [[6, 7, 8], [9]])
    assert torch.equal(back(batch), rm(batch))

    class Boom(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # a crash mid-save ...
        save_checkpoint(path, {"policy": lm, "value": Boom()}, {"step": 2})
    assert load_state(find_checkpoint(path))["step"] == 1  # ... leaves the previous checkpoint whole
    save_checkpoint(path, {"policy": lm}, {"step": 3})
    assert load_state(path)["step"] == 3 and not (path / "value").exists()
    assert [p.name for p in tmp_path.iterdir() if "old" in p.name] == []


def test_crash_between_renames_falls_back_to_previous(tmp_path):
    path = tmp_path / "ckpt"
    save_checkpoint(path, {}, {"step": 5})
    path.rename(tmp_path / ".ckpt.old-123")  # the state right after the first rename of a save
    found = find_checkpoint(path)
    assert found is not None and load_state(found)["step"] == 5
    assert find_checkpoint(tmp_path / "other") is None
    assert (found / STATE_FILE).is_file()


def test_rng_state_round_trip():
    state = rng_state()
    a = (random.random(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_sft_resume_is_bitwise_exact(task, tmp_path, caplog):
    root, tok, paths = task
    cfg = tiny_sft_config(root, paths, epochs=2)  # 16 steps over two epochs
    full = train_sft(cfg, tmp_path / "full", plots=False)
    part = train_sft(cfg, tmp_path / "part", stop_after=11)  # stops mid-way through the second epoch
    assert part.steps == 11
    resumed = train_sft(cfg, tmp_path / "part", plots=False)
    assert resumed.steps == full.steps == 16
    a, b = (load_model(r.model_dir, "sft") for r in (full, resumed))
    assert_bitwise_equal(weights(a), weights(b))
    sa, sb = (optimizer_state(tmp_path / d / "checkpoint", tok, cfg) for d in ("full", "part"))
    for x, y in zip(sa.values(), sb.values()):
        assert torch.equal(x["exp_avg_sq"], y["exp_avg_sq"])
    assert resumed.eval_loss == full.eval_loss
    with caplog.at_level(logging.WARNING):
        again = train_sft(cfg, tmp_path / "part", plots=False)
    assert "already finished" in caplog.text and again.steps == 16


def test_rm_resume_is_bitwise_exact(task, tmp_path):
    root, tok, paths = task
    sft = train_sft(tiny_sft_config(root, paths, epochs=1), tmp_path / "sft", plots=False)
    cfg = RMConfig(model=str(sft.model_dir), train_data=paths["rm_train"], eval_data=paths["rm_eval"],
                   batch_size=8, epochs=2)
    full = train_rm(cfg, tmp_path / "full", plots=False)
    train_rm(cfg, tmp_path / "part", stop_after=3)
    resumed = train_rm(cfg, tmp_path / "part", plots=False)
    a = ScalarHeadModel.from_pretrained(full.model_dir)
    b = ScalarHeadModel.from_pretrained(resumed.model_dir)
    assert_bitwise_equal(weights(a), weights(b))
    assert resumed.accuracy == full.accuracy
