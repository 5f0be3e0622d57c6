"""RolloutEngine: continuous-batching generation with a paged KV cache, on the policy's own parameters."""
from __future__ import annotations

import contextlib
import logging
import time

import torch

from rlhf_fast import ops
from rlhf_fast.models import as_decoder
from rlhf_fast.models.layers import cache_attention
from rlhf_fast.models.moe import RoutingRecord
from rlhf_fast.models.packed_weights import packed_projections
from rlhf_fast.rollout import block_table, philox, tp
from rlhf_fast.rollout.allocator import BlockAllocator
from rlhf_fast.rollout.decode_step import DecodeStep, bucket
from rlhf_fast.rollout.sampling import sample
from rlhf_fast.rollout.scheduler import Scheduler, Sequence, Step
from rlhf_fast.rollout.types import Completion, EngineStats, SamplingParams, check_prompts

DEFAULT_CPU_KV_BYTES = 256 * 2**20
log = logging.getLogger(__name__)
DEFAULT_GPU_KV_FRACTION = 0.5  # of the free device memory at construction


class RolloutEngine:
    """Generates completions for token-id prompts with a transformers causal LM, reading its live parameters.

    Args:
        model: a `models.DecoderLM`, or a LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM or GPT2LMHeadModel
            (converted once by `models.from_hf`, sharing its parameters).
        block_size: tokens per KV block.
        num_blocks / kv_cache_memory: size of the KV pool, in blocks or in bytes (default: 256 MiB on CPU, half the
            free memory on GPU).
        max_batch_tokens: tokens per prefill step at most (decode steps run at most this many sequences).
        max_num_seqs: sequences running at once at most.
        deterministic: batch-invariant forward (fixed-chunk GEMMs, paged attention for every query), so the log-probs
            are bitwise equal to `teacher_forced_logprobs(..., deterministic=True)`.
        compile: decode steps run as one compiled function (forward + sampler) per batch bucket, CUDA graphs on CUDA
            (`rollout/decode_step.py`); the draws are the eager engine's (bitwise in deterministic mode). Prefill
            stays eager. A mixture-of-experts model (`routed`) decodes eagerly: its routes are recorded (below).

    Routing replay: for a mixture-of-experts model every forward step records each input token's experts per MoE
    layer (`moe.RoutingRecord`), kept per sequence by input position (int16; a re-prefill after a preemption
    overwrites by position; a prompt's rows are recorded once and shared by its samples), and returned as
    `Completion.routes`. Dense models record nothing.

    Tensor parallelism (a model split by `parallelize.tensor_parallel`, `rollout/tp.py`): the cache holds this rank's
    kv_heads / tp heads; each step's sampled rows' logits are all-gathered over the tp group, and the seed is the
    group's first rank's, so every tp rank draws the same tokens. Every rank of a tp group calls `generate` with the
    same prompts and params (inside `parallelize.unsharded` when FSDP shards it over dp).
    """

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, max_batch_tokens: int = 4096, max_num_seqs: int = 256,
                 deterministic: bool = False, compile: bool = False):
        self.lm = as_decoder(model)
        if block_size < 1 or max_batch_tokens < 1 or max_num_seqs < 1:
            raise ValueError(f"block_size, max_batch_tokens and max_num_seqs must be >= 1; got {block_size}, "
                             f"{max_batch_tokens}, {max_num_seqs}")
        if num_blocks is not None and kv_cache_memory is not None:
            raise ValueError("give num_blocks or kv_cache_memory, not both")
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.deterministic = deterministic
        lm = self.lm
        tp.check(lm, "RolloutEngine")
        self.kv_heads = tp.kv_heads(lm)  # this rank's: num_kv_heads / tp on a tensor-parallel model
        elem = torch.empty((), dtype=lm.dtype).element_size()
        self.bytes_per_block = lm.num_layers * 2 * block_size * self.kv_heads * lm.head_dim * elem
        if num_blocks is None:
            if kv_cache_memory is None:
                if lm.device.type == "cuda":
                    kv_cache_memory = int(torch.cuda.mem_get_info(lm.device)[0] * DEFAULT_GPU_KV_FRACTION)
                else:
                    kv_cache_memory = DEFAULT_CPU_KV_BYTES
            num_blocks = int(kv_cache_memory) // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"the KV pool must hold at least one block of {self.bytes_per_block} bytes; "
                             f"got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.kv_cache: torch.Tensor | None = None  # (layers, 2, num_blocks, block_size, KVH, D), made on first use
        self.stats = EngineStats(num_blocks=num_blocks, bytes_per_block=self.bytes_per_block)
        self.routed = bool(getattr(lm, "routed", False))
        if compile and self.routed:
            log.warning("RolloutEngine(compile=True): %s is a mixture-of-experts model; its decode steps run eagerly "
                        "so that each step's routes are recorded", type(lm).__name__)
            compile = False
        self._routing: RoutingRecord | None = None  # the last forward's record (routed models)
        self._routes: dict[int, list] = {}  # seq_id -> [prompt routes (M, P, k), generated routes (M, G, k)] int16
        self._tp_head: torch.Tensor | None = None  # a tp rank's lm_head rows packed for oneDNN, in `generate`
        self.decode_step = DecodeStep(self._forward, deterministic=deterministic, compile=compile)

    def _cache(self) -> torch.Tensor:
        lm = self.lm
        heads = tp.kv_heads(lm)
        if heads != self.kv_heads:  # split by `tensor_parallel` after this engine was made: the same blocks, smaller
            self.bytes_per_block = self.bytes_per_block // self.kv_heads * heads
            self.kv_heads = heads
        shape = (lm.num_layers, 2, self.num_blocks, self.block_size, self.kv_heads, lm.head_dim)
        kv = self.kv_cache
        if kv is None or kv.device != lm.device or kv.dtype != lm.dtype or kv.shape != shape:  # the model moved
            self.kv_cache = kv = torch.empty(shape, dtype=lm.dtype, device=lm.device)
        return kv

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None, *,
                 first_index: int = 0) -> list[Completion]:
        """Sample `params.n` completions per prompt; returned in (prompt_index, sample) order. `first_index`: the
        global index of `prompts[0]` when a batch is split over processes. Each draw is Philox keyed by the seed at
        (position, global sequence index = global prompt index * n + sample) (`rollout/philox.py`), so the draws
        depend neither on the split, nor on the batch a sequence runs in, nor on preemptions."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        lm = self.lm
        prompts = check_prompts(prompts, lm.vocab_size, lm.max_context, params.max_new_tokens)
        longest = max(len(p) for p in prompts) + params.max_new_tokens - 1  # tokens of K/V one sequence holds
        need = -(-longest // self.block_size)
        window = lm.kv_window
        if window and not self.deterministic:  # a sequence holds its window's blocks only (rollout/scheduler.py)
            need = min(need, -(-window // self.block_size) + 1)
        if need > self.num_blocks:
            raise ValueError(f"a sequence of {longest} tokens needs {need} KV blocks but the pool has "
                             f"{self.num_blocks}: raise num_blocks / kv_cache_memory or shorten the request")
        if longest > self.max_batch_tokens:
            raise ValueError(f"a sequence of {longest} tokens exceeds max_batch_tokens={self.max_batch_tokens} "
                             f"(a preempted sequence is recomputed in one prefill step)")
        seed = tp.shared_seed(lm, params.seed if params.seed is not None else int(torch.randint(2**62, ())))
        allocator = BlockAllocator(self.num_blocks, self.block_size)
        sched = Scheduler(allocator, self.max_batch_tokens, self.max_num_seqs, window=window,
                          prefill_reads_cache=self.deterministic)
        all_seqs: list[Sequence] = []
        for i, p in enumerate(prompts):
            group = [Sequence(len(all_seqs) + j, i, j, list(p), len(p), (first_index + i) * params.n + j)
                     for j in range(params.n)]
            group[0].followers = group[1:]
            sched.add(group[0])
            all_seqs.extend(group)
        kv, key = self._cache(), philox.seed_key(seed, lm.device)
        width = -(-longest // self.block_size)  # table entries a sequence may need
        if self.decode_step.compiled:  # a few fixed shapes: power-of-two rows and widths
            width = bucket(width)
        batch = block_table.DecodeBatch(self.decode_step.rows_for(len(all_seqs)), width, self.block_size, lm.device)
        compiled_before = (self.decode_step.compilations, self.decode_step.compile_seconds)
        stats = EngineStats(num_blocks=self.num_blocks, bytes_per_block=self.bytes_per_block,
                            prompt_tokens=sum(len(p) for p in prompts))
        self._routes, self._max_new = {}, params.max_new_tokens
        t0 = time.perf_counter()
        with self._packed_head(min(len(all_seqs), self.max_num_seqs)):
            while sched.has_work():
                step = sched.schedule()
                self._run(step, kv, params, sched, batch, key)
                stats.steps += 1
                stats.prefill_steps += step.kind == "prefill"
        if lm.device.type == "cuda":
            torch.cuda.synchronize(lm.device)
        stats.seconds = time.perf_counter() - t0
        stats.preemptions = sched.preemptions
        stats.compilations = self.decode_step.compilations - compiled_before[0]
        stats.compile_seconds = self.decode_step.compile_seconds - compiled_before[1]
        stats.peak_blocks_used = allocator.peak_used
        stats.generated_tokens = sum(len(s.generated) for s in all_seqs)
        self.stats = stats
        if allocator.num_used:
            raise RuntimeError(f"KV block leak: {allocator.num_used} blocks still referenced after generation")
        routes, self._routes, self._routing = self._routes, {}, None
        return [Completion(s.prompt_index, s.generated, torch.tensor(s.logprobs, dtype=torch.float32),
                           s.finish_reason, torch.tensor(s.thresholds, dtype=torch.float32),
                           self._seq_routes(routes, s)) for s in all_seqs]

    def _seq_routes(self, routes: dict[int, list], s: Sequence) -> torch.Tensor | None:
        """(M, prompt + generated - 1, k) int16: the experts of every input token `s` fed (None: a dense model)."""
        if not self.routed:
            return None
        prompt, gen = routes[s.seq_id]
        return torch.cat([prompt, gen[:, :len(s.generated) - 1]], 1)

    def _keep_routes(self, step: Step, lengths: list[int]) -> None:
        """Keep the experts of `step`'s forward (`self._routing`) per sequence by input position; `lengths`: each
        prefilled sequence's tokens (the step's input, before the sampled tokens are appended)."""
        ex = self._routing.experts.to("cpu", torch.int16)  # (M, T, k)
        if ex.numel() == 0:  # no MoE layer
            ex = torch.empty(0, sum(lengths) if step.kind == "prefill" else len(step.seqs), 0, dtype=torch.int16)
        m, k = ex.shape[0], ex.shape[2]

        def entry(s: Sequence, prompt: torch.Tensor | None) -> list:
            if s.seq_id not in self._routes:
                self._routes[s.seq_id] = [prompt, torch.full((m, self._max_new, k), -1, dtype=torch.int16)]
            return self._routes[s.seq_id]

        if step.kind == "prefill":
            prompts, o = {}, 0
            for r, (s, n) in enumerate(zip(step.seqs, lengths)):
                rec, p = ex[:, o:o + n], s.num_prompt
                o += n
                e = entry(s, None)
                if e[0] is None:  # the first prefill
                    e[0] = rec[:, :p].clone()
                else:  # a re-prefill overwrites by position, but for the rows its last layer skipped (whose
                    merged = torch.where(rec[:, :p] >= 0, rec[:, :p], e[0])  # earlier record fed the samples)
                    if not torch.equal(merged, e[0]):
                        e[0] = merged  # its own copy: the samples sharing the old one keep it
                e[1][:, :n - p] = torch.where(rec[:, p:] >= 0, rec[:, p:], e[1][:, :n - p])
                prompts[r] = e[0]
            for s, r in step.samplers:  # samples sharing their leader's prefill share its prompt rows
                entry(s, prompts[r])
        else:
            for i, s in enumerate(step.seqs):
                self._routes[s.seq_id][1][:, len(s.tokens) - 1 - s.num_prompt] = ex[:, i]

    def _run(self, step: Step, kv: torch.Tensor, params: SamplingParams, sched: Scheduler,
             batch: block_table.DecodeBatch, key: torch.Tensor) -> None:
        dev, bs, det = self.lm.device, self.block_size, self.deterministic
        if step.copies:  # copy-on-write of shared partial blocks, before anything writes them
            src, dst = zip(*step.copies)
            ops.copy_blocks(kv, torch.tensor(src, device=dev), torch.tensor(dst, device=dev))
        if not step.samplers:  # every running sequence was preempted
            return
        if step.kind == "prefill":
            inputs = block_table.prefill_inputs([s.tokens for s in step.seqs], [s.block_table for s in step.seqs],
                                                bs, dev, deterministic=det)
            logits = self._forward(inputs, kv)  # (sequences, V)
            if self.routed:
                self._keep_routes(step, [len(s.tokens) for s in step.seqs])
            rows = [r for _, r in step.samplers]
            if rows != list(range(logits.shape[0])):
                logits = logits[torch.tensor(rows, device=dev)]  # (samplers, V): followers share their leader's
            streams, positions = torch.tensor([[s.stream, len(s.tokens) - 1] for s, _ in step.samplers],
                                              device=dev).unbind(1)
            out = torch.stack([t.double() for t in sample(logits, params, key, streams, positions, exact=det)])
        else:
            n = len(step.seqs)
            rows = batch.update([s.block_table for s in step.seqs], [s.tokens[-1] for s in step.seqs],
                                [s.num_cached for s in step.seqs], [s.stream for s in step.seqs],
                                rows=self.decode_step.rows_for(n))
            out = self.decode_step(rows, kv, key, params)[:, :n]
            if self.routed:
                self._keep_routes(step, [])
        # one device-to-host copy: tokens (exact in float64), log-probs, thresholds
        tok_list, lp_list, thr_list = out.tolist()
        stop = set(params.stop_token_ids)
        for (s, _), tok, lp, t in zip(step.samplers, map(int, tok_list), lp_list, thr_list):
            s.num_cached = len(s.tokens)
            s.tokens.append(tok)
            s.logprobs.append(lp)
            s.thresholds.append(t)
            if tok in stop:
                sched.finish(s, "stop")
            elif len(s.tokens) - s.num_prompt >= params.max_new_tokens:
                sched.finish(s, "length")

    def _forward(self, inputs: block_table.StepInputs, kv: torch.Tensor) -> torch.Tensor:
        """The model call of a step: float32 logits (R, V) of the tokens `inputs.logit_rows` (None: all)."""
        det = self.deterministic
        kw = {}
        if self.routed:  # eager only (a routed model never decodes compiled): the record is read after the call
            self._routing = kw["routing"] = RoutingRecord.record()
        with torch.no_grad():  # prefill: the last layer's MLP on the rows that sample only
            h = self.lm(inputs.input_ids, inputs.positions, cache_attention(inputs.meta, kv), det,
                        out_rows=inputs.logit_rows, **kw)
            logits = tp.logits(self.lm, h, det, self._tp_head)  # (R, V), gathered over a tp group
        return logits

    @contextlib.contextmanager
    def _packed_head(self, rows_hint: int):
        """The lm_head reordered for oneDNN for one `generate` (`DecoderLM.packed_head`; a tp rank's rows,
        `tp.pack_head`), and on one process the blocks' projections too (`models.packed_weights`: q/k/v and gate/up
        fused); nothing in deterministic mode."""
        if self.deterministic:
            yield
        elif tp.degree(self.lm) > 1:
            self._tp_head = tp.pack_head(self.lm, rows_hint)
            try:
                yield
            finally:
                self._tp_head = None
        else:
            with self.lm.packed_head(rows_hint), packed_projections(self.lm, rows_hint):
                yield

    def teacher_forced_logprobs(self, prompts, completions, *, temperature: float = 1.0, top_k: int = 0,
                                top_p: float = 1.0) -> list[torch.Tensor]:
        """`rlhf_fast.rollout.teacher_forced_logprobs` with this engine's block size and mode."""
        from rlhf_fast.rollout.scoring import teacher_forced_logprobs

        return teacher_forced_logprobs(self.lm, prompts, completions, temperature=temperature, top_k=top_k,
                                       top_p=top_p, deterministic=self.deterministic, block_size=self.block_size)

