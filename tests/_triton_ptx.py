"""Compile Triton kernels to sm_90 PTX without a GPU. Used by the tests/_compile_*_kernels.py scripts, which
tests/test_triton_compile.py runs in subprocesses without TRITON_INTERPRET (the interpreter accepts code that
compiled Triton rejects: plain Python globals, some dtype mixes, non-constexpr shapes)."""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_ptx(fn, types: dict, consts: dict) -> str:
    """`types`: Triton type string per runtime argument (`"*fp32"`, `"i32"`); `consts`: constexpr values."""
    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(name),): value for name, value in consts.items()}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def main(cases) -> None:
    """Compile every `(fn, types, consts)` case, print `ok ...`/`FAILED ...` per case, exit 1 on any failure."""
    failed = 0
    for fn, types, consts in cases:
        try:
            print(f"ok {fn.__name__} {consts}: {len(compile_ptx(fn, types, consts))} chars of PTX")
        except Exception as e:  # noqa: BLE001 - report every kernel, then fail
            failed += 1
            print(f"FAILED {fn.__name__} {consts}: {type(e).__name__}: {e}")
    sys.exit(1 if failed else 0)
