"""Own models of three families (Qwen2 GQA, GPT-2 with dropout 0.1 and tied weights, Llama with tied embeddings
and BOS), each with a byte-level BPE tokenizer and a ChatML template: dtype round trips and gradient
checkpointing."""
import pytest
import torch

from _chat_models import build_model, build_tokenizer, chat_data
from rlhf_fast import data, precision
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
    return build_model(family, tok, root / family), tok


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, toks, root):
    model, tok = _model(family, toks, root)
    files = chat_data(root / "chat")
    ids, labels = data.sft_batch(data.load_sft(files["sft"], tok, 128)[:4], tok.pad_token_id)
    model.train()  # GPT-2's dropout is on: the recompute replays the same dropout masks

    def loss_and_grads():
        torch.manual_seed(1)
        nll, n = response_nll(model, ids, labels)
        loss = nll / n
        grads = torch.autograd.grad(loss, [p for p in model.parameters()])
        return loss.detach(), grads

    ref_loss, ref_grads = loss_and_grads()
    precision.enable_gradient_checkpointing(model)
    assert precision.is_checkpointing(model)
    loss, grads = loss_and_grads()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_checkpoint_saves_back_in_bf16(family, toks, root):
    from transformers import AutoModelForCausalLM

    model, _ = _model(family, toks, root)
    precision.save_in_dtype(model, root / f"{family}-bf16", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # the live weights are untouched
    assert precision.checkpoint_dtype(root / f"{family}-bf16") == torch.bfloat16
    assert precision.resolve_dtype("auto", root / f"{family}-bf16") == torch.bfloat16
    assert precision.resolve_dtype("auto", root / family) == torch.float32
    back = AutoModelForCausalLM.from_pretrained(str(root / f"{family}-bf16"), dtype="auto")
    assert next(back.parameters()).dtype == torch.bfloat16
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_keeps_fp32_masters_and_matches_fp32(family, toks, root):
    model, tok = _model(family, toks, root)
    model.eval()  # no dropout: the two passes see the same function
    files = chat_data(root / "chat")
    ids, labels = data.sft_batch(data.load_sft(files["sft"], tok, 128)[:4], tok.pad_token_id)
    nll, n = response_nll(model, ids, labels)
    with precision.autocast("bf16", torch.device("cpu")):
        nll16, _ = response_nll(model, ids, labels)
    (nll16 / n).backward()
    assert nll16.dtype == torch.float32 and torch.isfinite(nll16)
    torch.testing.assert_close(nll16, nll.detach(), rtol=3e-2, atol=0)  # bf16 matmuls, fp32 log-softmax
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert not precision.autocast_on("auto", torch.device("cpu")) and not precision.autocast_on("no", None)
