// Host launcher of the CUDA paged-attention decode kernel (no CUDA includes: included by csrc/paged_attention.cpp).
#pragma once
#include <cstdint>

namespace rlhf_fast {

// out, q: (rows, heads, head_dim); k_cache, v_cache: (num_blocks, block_size, kv_heads, head_dim), device pointers of
// one dtype (0 = f32, 1 = f16, 2 = bf16); block_tables (rows, max_blocks) int32; context_lens (rows,) int32.
// head_dim <= 256. window: sliding window (0 = none); softcap: score soft-capping (0 = none); sinks: (heads,)
// float32 device pointer or 0 (none). Enqueued on `stream`.
void paged_attention_cuda(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                          std::uintptr_t block_tables, std::uintptr_t context_lens, std::int64_t rows, int heads,
                          int kv_heads, int head_dim, int block_size, int max_blocks, float scale, int dtype,
                          int window, float softcap, std::uintptr_t sinks, std::uintptr_t stream);

}  // namespace rlhf_fast
