"""SFT and the reward model on a tiny random model for a few steps; their losses and gradients against the padded
Hugging Face forward (the oracle, `tests/_oracle.py`); the ranking pairs; the labeler."""
import json
import math

import pytest
import torch
from _oracle import hf_twin, padded_scores, twin_grads
from _tiny import TINY_ARCH, rows, tiny_sft_config

from rlhf_fast.config import OptimConfig, RMConfig
from rlhf_fast.data import IGNORE_INDEX, RankedExample, SFTExample, pad_right, sft_batch
from rlhf_fast.default_task import labeler
from rlhf_fast.heads import ScalarHeadModel
from rlhf_fast.models import build_model
from rlhf_fast.stages.rm import bradley_terry_loss, ranked_batch, score, train_rm
from rlhf_fast.stages.sft import response_nll, train_sft


def test_sft_loss_decreases_on_a_fixed_batch(task, tmp_path):
    root, tok, paths = task
    one_batch = tmp_path / "one.jsonl"
    one_batch.write_text("".join(json.dumps(r) + "\n" for r in rows(paths["sft_train"])[:8]))
    cfg = tiny_sft_config(root, paths, train_data=str(one_batch), epochs=12,
                          optim=OptimConfig(lr=1e-2, schedule="constant"))
    res = train_sft(cfg, tmp_path / "sft")
    losses = [r["loss"] for r in rows(tmp_path / "sft" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12 and res.steps == 12 and res.skipped_steps == 0
    assert losses[-1] < 0.5 * losses[0]
    assert math.isfinite(res.eval_loss)
    assert (tmp_path / "sft" / "sft_curves.png").is_file() and (res.model_dir / "config.json").is_file()


def _tiny(family: str, lm_head: bool = True):
    from transformers import GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = build_model(cfg, lm_head=lm_head, device="cpu")
    with torch.no_grad():  # nonzero norm weights and biases, so their gradients are tested too
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _ids(g, n):
    return torch.randint(1, 97, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sft_nll_and_gradients_are_the_padded_forward(family):
    """`response_nll` (packed, the trained rows only) against the padded HF forward: the same summed NLL and token
    count, and the same gradient of every parameter; a multi-turn example trains its spans only."""
    model = _tiny(family).train()
    g = torch.Generator().manual_seed(1)
    ex = [SFTExample(_ids(g, 9), 4), SFTExample(_ids(g, 3), 1), SFTExample(_ids(g, 14), 2, ((3, 6), (9, 14))),
          SFTExample(_ids(g, 6), 6)]  # the last one trains nothing
    nll, n = response_nll(model, ex)
    nll.backward()
    twin = hf_twin(model)
    ids, labels = sft_batch(ex, 0)
    logp = torch.log_softmax(twin(input_ids=ids).logits[:, :-1].float(), -1)
    ref = -(logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != IGNORE_INDEX)).sum()
    ref.backward()
    assert n == int((labels != IGNORE_INDEX).sum()) == 5 + 2 + 8
    torch.testing.assert_close(nll.detach(), ref.detach(), rtol=1e-5, atol=1e-5)
    theirs = twin_grads(model, twin)
    assert theirs.keys() == {k for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[k], rtol=1e-4, atol=2e-5, msg=k)


def test_ranked_pairs_skip_ties_and_normalise_per_prompt():
    ex = [RankedExample([5], [[1], [2], [3]], [0, 1, 1]),  # 2 pairs (the tie gives none)
          RankedExample([5], [[1], [2]], [1, 0])]  # 1 pair, the second completion preferred
    b = ranked_batch(ex)
    assert b.packed.num_tokens == 1 + 3 + 1 + 2 and len(b.packed.samples) == 5  # each prompt once
    assert sorted(zip(b.better.tolist(), b.worse.tolist())) == [(0, 1), (0, 2), (4, 3)]
    torch.testing.assert_close(b.weight, torch.tensor([0.25, 0.25, 0.5]))
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 3.0])
    loss, margin = bradley_terry_loss(scores, b)
    sp = torch.nn.functional.softplus  # -log sigmoid(m) = softplus(-m)
    expected = 0.5 * (sp(torch.tensor(-1.0)) + sp(torch.tensor(-2.0))) / 2 * 2 / 2 + 0.5 * sp(torch.tensor(-3.0))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(margin, torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rm_shared_prompt_forward_is_the_padded_forward(family):
    """The RM's packed scoring (each prompt once, its completions after it) against the padded HF forward: same
    scores, same BT loss, same gradients of every parameter, on prompts and completions of different lengths."""
    model = ScalarHeadModel(_tiny(family, lm_head=False)).train()
    g = torch.Generator().manual_seed(1)
    ex = [RankedExample(_ids(g, p), [_ids(g, c) for c in cs], rk)
          for p, cs, rk in ((5, (3, 1, 6, 2), [0, 1, 2, 2]), (2, (4, 4), [1, 0]), (7, (1, 5, 2), [2, 0, 1]))]
    b = ranked_batch(ex)
    assert b.packed.num_tokens == 5 + 2 + 7 + 12 + 8 + 8  # every prompt once, no padding
    s = score(model, b)
    loss = bradley_terry_loss(s, b)[0]
    loss.backward()
    twin = hf_twin(model)
    ids, lengths = pad_right([e.prompt_ids + c for e in ex for c in e.completions], 0)
    s_ref = padded_scores(twin, ids, lengths)
    loss_ref = bradley_terry_loss(s_ref, b)[0]
    loss_ref.backward()
    torch.testing.assert_close(s.detach(), s_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.detach(), loss_ref.detach(), rtol=1e-5, atol=1e-6)
    theirs = {**twin_grads(model, twin), **{f"head.{k}": p.grad for k, p in twin[1].named_parameters()}}
    for k, p in model.named_parameters():
        theirs_k = theirs[k.removeprefix("lm.")] if k.startswith("lm.") else theirs[k]
        torch.testing.assert_close(p.grad, theirs_k, rtol=1e-4, atol=2e-5, msg=k)


def test_rm_learns_a_planted_preference(task, tmp_path):
    """Chosen completions are concise, rejected ones padded with filler: the RM must learn it."""
    root, tok, paths = task
    sft = train_sft(tiny_sft_config(root, paths, epochs=1), tmp_path / "sft", plots=False)

    def write(name, n, seed):
        g = __import__("random").Random(seed)
        with open(tmp_path / name, "w") as f:
            for _ in range(n):
                p = labeler.random_problem(g, 2, 3)
                ans = " ".join(labeler.answer(p))
                f.write(json.dumps({"prompt": labeler.prompt_text(p), "chosen": ans,
                                    "rejected": "ok , the result is : " + ans}) + "\n")
        return str(tmp_path / name)

    cfg = RMConfig(model=str(sft.model_dir), train_data=write("tr.jsonl", 96, 1), eval_data=write("ev.jsonl", 32, 2),
                   batch_size=16, epochs=2, optim=OptimConfig(lr=3e-3))
    res = train_rm(cfg, tmp_path / "rm", plots=False)
    assert res.accuracy >= 0.9
    head = ScalarHeadModel.from_pretrained(res.model_dir)
    assert head.head.weight.shape == (1, TINY_ARCH.hidden_size)


def test_labeler_prefers_correct_then_short():
    p = labeler.prompt_text(labeler.Problem("reverse", ("c", "a", "b")))
    assert labeler.judge(p, "b a c") == labeler.Judgement(True, 3)
    assert labeler.judge(p, "sure , here is the answer : b a c . done").correct
    assert not labeler.judge(p, "b c a").correct
    assert labeler.rank(p, ["b a c . done", "b a c", "a b c", "c a b"]) == [1, 0, 2, 2]
    assert labeler.compare(p, "b a c", "ok , the result is : b a c") == 1.0
    assert labeler.compare(p, "b c", "b a c . done") == 0.0
    assert labeler.compare(p, "a", "c") == 0.5
    with pytest.raises(ValueError, match="not a prompt"):
        labeler.parse_prompt("user : juggle a b assistant :")
