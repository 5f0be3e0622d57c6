"""Own models of three families (Qwen2 GQA, GPT-2 with tied weights, Llama with tied embeddings and BOS), each with a
byte-level BPE tokenizer and a ChatML template, loaded as rlhf_fast's models: dtype round trips and gradient
checkpointing (`stages.common.prepare`)."""
import pytest
import torch

from _chat_models import build_model, build_tokenizer, chat_data
from rlhf_fast import data, precision
from rlhf_fast.config import ParallelConfig
from rlhf_fast.models import load_model, save_model
from rlhf_fast.stages.common import prepare
from rlhf_fast.stages.sft import response_nll

FAMILIES = ["llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("own")


@pytest.fixture(scope="module")
def toks(root):
    return {True: build_tokenizer(root / "tok-bos", bos=True), False: build_tokenizer(root / "tok", bos=False)}


def _model(family, toks, root):
    tok = toks[family == "llama"]
    if not (root / family).is_dir():
        build_model(family, tok, root / family)
    return load_model(root / family, "model"), tok


def _examples(tok, root):
    files = chat_data(root / "chat")
    return data.load_sft(files["sft"], tok, 128)[:4]


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, toks, root):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    model, tok = _model(family, toks, root)
    examples = _examples(tok, root)

    def loss_and_grads(m):
        nll, n = response_nll(m.train(), examples)
        loss = nll / n
        return loss.detach(), torch.autograd.grad(loss, list(m.parameters()))

    ref_loss, ref_grads = loss_and_grads(model)
    ckpt = prepare(_model(family, toks, root)[0], device=torch.device("cpu"), parallel_cfg=ParallelConfig(),
                   gradient_checkpointing=True)
    assert all(isinstance(b, CheckpointWrapper) for b in ckpt.layers)
    loss, grads = loss_and_grads(ckpt)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_checkpoint_saves_back_in_bf16(family, toks, root):
    from transformers import AutoModelForCausalLM

    model, _ = _model(family, toks, root)
    save_model(model, root / f"{family}-bf16", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the live weights are untouched
    assert precision.checkpoint_dtype(root / f"{family}-bf16") == torch.bfloat16
    assert precision.resolve_dtype("auto", root / f"{family}-bf16") == torch.bfloat16
    assert precision.resolve_dtype("auto", root / family) == torch.float32
    back = AutoModelForCausalLM.from_pretrained(str(root / f"{family}-bf16"), dtype="auto")
    assert next(back.parameters()).dtype == torch.bfloat16
    ours = load_model(root / f"{family}-bf16", "model", dtype=None)
    assert ours.dtype == torch.bfloat16
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_keeps_fp32_masters_and_matches_fp32(family, toks, root):
    model, tok = _model(family, toks, root)
    examples = _examples(tok, root)
    nll, n = response_nll(model, examples)
    with precision.autocast("bf16", torch.device("cpu")):
        nll16, _ = response_nll(model, examples)
    (nll16 / n).backward()
    assert nll16.dtype == torch.float32 and torch.isfinite(nll16)
    torch.testing.assert_close(nll16, nll.detach(), rtol=3e-2, atol=0)  # bf16 matmuls, fp32 log-softmax
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert not precision.autocast_on("auto", torch.device("cpu")) and not precision.autocast_on("no", None)
