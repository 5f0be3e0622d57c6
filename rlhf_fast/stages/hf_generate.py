"""Rollouts through Hugging Face `generate`: the baseline the paged rollout engine is measured against, with the
engine's `generate(prompts, SamplingParams) -> list[Completion]` interface."""
from __future__ import annotations

import torch

from rlhf_fast import ops
from rlhf_fast.rollout import Completion, SamplingParams
from rlhf_fast.rollout.sampling import replay_threshold


class HFGenerator:
    """Left-padded batched `model.generate`, `batch_size` prompts at a time; log-probs from the raw logits."""

    def __init__(self, model, *, pad_id: int, batch_size: int = 64):
        self.model = model
        self.pad_id = pad_id
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        stops = set(params.stop_token_ids)
        out: list[Completion] = []
        with torch.random.fork_rng():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start:start + self.batch_size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                attn = torch.zeros_like(ids)
                for i, p in enumerate(chunk):
                    ids[i, width - len(p):] = torch.tensor(p)
                    attn[i, width - len(p):] = 1
                kw = dict(do_sample=not params.greedy, max_new_tokens=params.max_new_tokens,
                          num_return_sequences=params.n, pad_token_id=self.pad_id,
                          eos_token_id=list(stops) or None, output_logits=True, return_dict_in_generate=True)
                if not params.greedy:
                    kw.update(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)  # 0: no top-k
                dev = self.model.device
                res = self.model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), **kw)
                new = res.sequences[:, width:]  # (len(chunk) * n, L)
                logits = torch.stack(res.logits, dim=1).float()  # (len(chunk) * n, L, V)
                temp = params.logprob_temperature
                thr = None
                if params.truncated(logits.shape[-1]):  # HF's warpers: temperature, then top-k, then top-p
                    thr = ops.support_threshold(logits, temperature=temp, top_k=params.top_k, top_p=params.top_p)
                if thr is not None and params.logprobs == "sampled":
                    logp = ops.token_logprobs(logits, new, temperature=temp, top_k=params.top_k, top_p=params.top_p,
                                              support="replay", support_threshold=thr)
                else:
                    logp = ops.token_logprobs(logits, new, temperature=temp)
                logp = logp.cpu()
                thr = None if thr is None else replay_threshold(logits, temp, thr).cpu()
                for row in range(new.shape[0]):
                    toks = new[row].tolist()
                    end = next((i + 1 for i, t in enumerate(toks) if t in stops), None)
                    reason = "stop" if end is not None else "length"
                    end = end or len(toks)
                    out.append(Completion(start + row // params.n, toks[:end], logp[row, :end].clone(), reason,
                                          None if thr is None else thr[row, :end].clone()))
        return out
