"""GPU: the rollout engine's log-probs against a teacher-forced recompute of the same completions, on the device,
in default mode (within the dtype's rounding) and in deterministic mode (bitwise), scored in another batch
composition and order than they were generated in."""
import pytest
import torch
from _gpu import DEVICE, ON_CUDA, first_in_dry_run
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhf_fast.rollout import RolloutEngine, SamplingParams, teacher_forced_logprobs

pytestmark = pytest.mark.gpu
# on CUDA: big enough that the matmuls and the paged kernel tile for real; in the dry run: the CPU tests' size
DIMS = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=32000) if ON_CUDA else dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
DEFAULT_ATOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}  # default mode: prefill and decode shapes differ


def _model(kind, dtype):
    torch.manual_seed(0)
    cfg = dict(DIMS, max_position_embeddings=512)
    m = LlamaForCausalLM(LlamaConfig(**cfg)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**cfg))
    return m.to(DEVICE, dtype).eval()


def _prompts(vocab):
    g = torch.Generator().manual_seed(1)
    lengths = [3, 20, 17, 7, 64, 1, 33, 16] if ON_CUDA else [3, 20, 7]
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("kind", first_in_dry_run("llama", "qwen2"))
@pytest.mark.parametrize("dtype", first_in_dry_run(torch.float32, torch.bfloat16))
@pytest.mark.parametrize("deterministic", first_in_dry_run(True, False))
def test_engine_logprobs_match_teacher_forced(kind, dtype, deterministic):
    model = _model(kind, dtype)
    prompts = _prompts(DIMS["vocab_size"])
    new = 40 if ON_CUDA else 6
    eng = RolloutEngine(model, block_size=16 if ON_CUDA else 4, deterministic=deterministic,
                        kv_cache_memory=256 << 20, max_num_seqs=7)
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0.7, top_p=0.95, n=2, seed=3))
    assert len(outs) == 2 * len(prompts)
    ps = [prompts[o.prompt_index] for o in outs]
    # the engine's log-probs are the top-p-cut distribution's: the recompute takes the same top_p
    rev = teacher_forced_logprobs(model, ps[::-1], outs[::-1], temperature=0.7, top_p=0.95,
                                  deterministic=deterministic, block_size=eng.block_size)[::-1]
    single = [eng.teacher_forced_logprobs([p], [o], temperature=0.7, top_p=0.95)[0] for p, o in zip(ps[:3], outs[:3])]
    for o, r in zip(outs, rev):
        assert r.dtype == torch.float32 and r.shape == o.logprobs.shape and r.device.type == DEVICE.type
        r = r.cpu()
        if deterministic:
            assert torch.equal(o.logprobs, r), float((o.logprobs - r).abs().max())
        else:
            torch.testing.assert_close(o.logprobs, r, atol=DEFAULT_ATOL[dtype], rtol=0)
    for o, s in zip(outs, single):
        if deterministic:
            assert torch.equal(o.logprobs, s.cpu())
        else:
            torch.testing.assert_close(o.logprobs, s.cpu(), atol=DEFAULT_ATOL[dtype], rtol=0)
