"""What the stages stand on: `models.load_model` / `save_model`, the scalar head model over packed tokens, LoRA on
either (`models.lora`), `stages.common.prepare` and the always-backpropagating `distributed.accumulate`; the padded
Hugging Face forward (`tests/_oracle.py`) is the oracle."""
import json

import pytest
import torch

from _chat_models import build_model, build_tokenizer
from _oracle import hf_twin, padded_values
from rlhf_fast import distributed
from rlhf_fast.config import LoRAConfig, ParallelConfig
from rlhf_fast.heads import HEAD_FILE, ScalarHeadModel
from rlhf_fast.models import DecoderLM, ModelLoadError, UnsupportedModelError, load_model, lora, save_model
from rlhf_fast.models.packed import pack, packed_hidden
from rlhf_fast.stages.common import guarded_step, prepare

FAMILIES = ["llama", "qwen2", "gpt2"]
PROMPTS = [[5, 6, 7], [9, 10]]
RESPONSES = [[11, 12, 13, 14], [15]]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    tok = build_tokenizer(root / "tok", bos=False)
    for fam in FAMILIES:
        build_model(fam, tok, root / fam)
    return root


def _seqs():
    return [p + r for p, r in zip(PROMPTS, RESPONSES)]


def _padded(seqs):
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_load_model_is_ours_with_hf_numbers(root, family):
    from transformers import AutoModelForCausalLM

    model = load_model(root / family, "sft.model")
    assert isinstance(model, DecoderLM) and model.dtype == torch.float32 and model.lm_head is not None
    hf = AutoModelForCausalLM.from_pretrained(str(root / family)).eval()
    batch = pack(PROMPTS, RESPONSES)
    with torch.no_grad():
        ours = model.logits(packed_hidden(model, batch), False)
        theirs = torch.cat([hf(torch.tensor([s])).logits[0] for s in _seqs()])
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)
    assert load_model(root / family, "m", dtype=None).dtype == torch.float32  # the checkpoint's
    assert load_model(root / family, "m", backbone=True).lm_head is None


@pytest.mark.parametrize("family,cls", [("cohere", "CohereForCausalLM"), ("llama4_text", "Llama4ForCausalLM"),
                                        ("gpt_neox", "GPTNeoXForCausalLM")])
def test_load_model_refuses_other_families_from_config_alone(tmp_path, family, cls):
    """One line naming the covered families, from config.json alone (there are no weights to read)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": family, "architectures": [cls]}))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path, "sft.model")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"sft.model: {tmp_path} is a {cls}")
    assert "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg and "Qwen2ForCausalLM" in msg


def test_load_model_errors_name_what(tmp_path, root):
    with pytest.raises(ModelLoadError, match="^rm.model: .*no such directory"):
        load_model(tmp_path / "missing", "rm.model")
    with pytest.raises(ModelLoadError, match="^rm.model: .*no config.json"):
        load_model(tmp_path, "rm.model")
    (tmp_path / "config.json").write_text((root / "llama" / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="^rm.model: .*has no model.safetensors"):
        load_model(tmp_path, "rm.model")


@pytest.mark.parametrize("family", FAMILIES)
def test_scalar_head_matches_the_padded_oracle(root, family):
    torch.manual_seed(0)
    model = ScalarHeadModel.from_pretrained(root / family, new_head=True).eval()
    assert model.lm.lm_head is None and model.head.weight.dtype == torch.float32
    batch = pack(PROMPTS, RESPONSES)
    values = model(batch)  # (T,)
    ref = padded_values(hf_twin(model), _padded(_seqs()))
    torch.testing.assert_close(values, torch.cat([ref[i, :len(s)] for i, s in enumerate(_seqs())]),
                               atol=2e-5, rtol=1e-5)
    last = model(batch, reads=batch.last_reads())
    torch.testing.assert_close(last, values[batch.last_index()], atol=1e-6, rtol=1e-5)
    det = model(batch, reads=batch.predict_reads(4), deterministic=True)
    torch.testing.assert_close(det, values[batch.predict_index(4)], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_scalar_head_round_trip_and_hf_backbone(root, tmp_path, family):
    from transformers import AutoModel

    torch.manual_seed(0)
    model = ScalarHeadModel.from_pretrained(root / family, new_head=True)
    with torch.no_grad():
        model.head.bias.fill_(0.25)
    save_model(model, tmp_path / "rm", dtype=torch.bfloat16)
    back = ScalarHeadModel.from_pretrained(tmp_path / "rm", dtype=None)
    assert back.lm.dtype == torch.bfloat16 and json.loads((tmp_path / "rm" / "config.json").read_text())[
        "dtype"] == "bfloat16"
    from safetensors.torch import load_file

    head = load_file(str(tmp_path / "rm" / HEAD_FILE))
    assert head["weight"].dtype == torch.float32 and torch.equal(head["weight"], model.head.weight.detach())
    for k, v in back.lm.state_dict().items():
        assert torch.equal(v, model.lm.state_dict()[k].to(torch.bfloat16)), k
    hf = AutoModel.from_pretrained(str(tmp_path / "rm"), dtype=torch.float32)
    assert type(hf).__name__.endswith("Model")
    with pytest.raises(ModelLoadError, match="no scalar_head.safetensors, so this is not a reward"):
        ScalarHeadModel.from_pretrained(root / family)


def test_lora_on_a_scalar_head_model_exports_merged_and_peft(root, tmp_path):
    """Adapters in the backbone, the head trainable; the export is the merged backbone + head, and `adapter/` loads
    into peft on the HF backbone with the same values."""
    from peft import PeftModel
    from transformers import AutoModel

    torch.manual_seed(0)
    model = ScalarHeadModel.from_pretrained(root / "qwen2", new_head=True)
    names = lora.apply_lora(model, LoRAConfig(r=2, alpha=4), seed=0)
    assert names and lora.has_adapters(model) and not lora.has_adapters(model.lm.layers[0].attn_norm)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trained and all("lora_" in n or n.startswith("head.") for n in trained)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.3)
    batch = pack(PROMPTS, RESPONSES)
    with torch.no_grad():
        values = model(batch)
        with lora.adapters_disabled(model):
            base = model(batch)
    assert not torch.allclose(values, base)
    save_model(model, tmp_path / "rm", base_dir=root / "qwen2")
    merged = ScalarHeadModel.from_pretrained(tmp_path / "rm")
    torch.testing.assert_close(merged(batch).detach(), values, atol=2e-5, rtol=1e-5)
    cfg = json.loads((tmp_path / "rm" / lora.ADAPTER_DIR / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(root / "qwen2") and cfg["task_type"] is None
    peft = PeftModel.from_pretrained(AutoModel.from_pretrained(str(root / "qwen2")),
                                     str(tmp_path / "rm" / lora.ADAPTER_DIR)).eval()
    with torch.no_grad():
        h = peft(input_ids=_padded(_seqs())[:1]).last_hidden_state[0]
    torch.testing.assert_close(model.head(h).squeeze(-1).detach(), values[:len(_seqs()[0])], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_causal_lm_export(root, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_model(root / family, "m")
    lora.apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules="all-linear"), seed=1)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.3)
    batch = pack(PROMPTS, RESPONSES)
    with torch.no_grad():
        logits = model.logits(packed_hidden(model, batch), False)
    save_model(model, tmp_path / "out", dtype=torch.float32, base_dir=root / family)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / family)),
                                     str(tmp_path / "out" / lora.ADAPTER_DIR)).eval()
    with torch.no_grad():
        for hf in (merged, peft):
            theirs = torch.cat([hf(input_ids=torch.tensor([s])).logits[0] for s in _seqs()])
            torch.testing.assert_close(theirs, logits, atol=5e-5, rtol=1e-5)


def test_prepare_checkpoints_blocks_with_the_same_loss_and_gradients(root):
    """`prepare(gradient_checkpointing=True)` (one process: no sharding) recomputes each block in the backward:
    the loss and every gradient are those of the plain model."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    def loss_and_grads(model):
        h = packed_hidden(model, pack(PROMPTS, RESPONSES))
        loss = model.logits(h, False).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in
                               model.named_parameters()}

    plain = load_model(root / "qwen2", "m")
    ref_loss, ref = loss_and_grads(plain)
    model = prepare(load_model(root / "qwen2", "m"), device=torch.device("cpu"), parallel_cfg=ParallelConfig(),
                    gradient_checkpointing=True, mixed_precision="auto")
    assert all(isinstance(b, CheckpointWrapper) for b in model.layers)
    assert list(model.state_dict()) == list(plain.state_dict())  # names unchanged
    loss, got = loss_and_grads(model)
    assert torch.equal(loss, ref_loss) and got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_accumulate_always_backpropagates_and_the_step_only_steps():
    w = torch.nn.Parameter(torch.ones(3))
    batch = list(range(5))

    def loss_of(items, real):
        return sum(w.sum() * (i + 1) for i in items) / 15.0

    for micro in (0, 2):  # one micro-batch, then three
        w.grad = None
        loss = distributed.accumulate(batch, loss_of, micro)
        assert not loss.requires_grad and torch.allclose(loss, torch.tensor(3.0))
        torch.testing.assert_close(w.grad, torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    res = guarded_step(loss, [[w]], opt, None, grad_clip=0.0)
    assert res.applied and torch.allclose(w.detach(), torch.full((3,), 0.5)) and w.grad is None
    w.grad = torch.ones(3)
    res = guarded_step(torch.tensor(float("nan")), [[w]], opt, None, grad_clip=0.0)
    assert not res.applied and torch.allclose(w.detach(), torch.full((3,), 0.5)) and w.grad is None
