"""Compile kernels/int4_gemm.py's kernels for an H100 (sm_90) without a GPU: Triton's own front end, LLVM
and ptxas, as a launch on the GPU would (16-byte aligned pointers and strides, the constexprs the
launcher passes). Run as `python -m tests.kernels.compile_for_hopper` (not under TRITON_INTERPRET);
prints one JSON line per kernel: shared memory, the global loads of its PTX and how many are 16-byte
vector loads."""

import json
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

from radixserve.kernels import int4_gemm as ig  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
ATOMIC = re.compile(r"\s*(@%p\d+\s+)?(atom|red)\.global")
POINTERS = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "g_ptr": "*i32"}
POINTERS |= {"b_ptr": "*bf16", "y_ptr": "*bf16"}


def compile_kernel(name, fn, scalars: dict, consts: dict, config: dict) -> dict:
    signature = {**scalars, **{k: "constexpr" for k in consts}}
    names = list(signature)
    aligned = [
        n for n, t in scalars.items() if t.startswith("*") or n in ("N", "stride_xm", "stride_ym")
    ]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=TARGET, options=config)
    ptx = kernel.asm["ptx"].splitlines()
    loads = [line for line in ptx if "ld.global" in line]
    return {
        "int_to_float": sum("cvt.rn.f32.s32" in line or "cvt.rn.f32.u32" in line for line in ptx),
        "fma": sum("fma.rn.f32" in line for line in ptx),
        "kernel": name,
        "shared": kernel.metadata.shared,
        "loads": len(loads),
        "v4_loads": sum(".v4." in line for line in loads),
        "atomics": sum(bool(ATOMIC.match(line)) for line in ptx),
        "cp_async": kernel.asm["ptx"].count("cp.async.cg") + kernel.asm["ptx"].count("cp.async.ca"),
    }


def main() -> None:
    k = 4096
    layout = dict(K=k, KP=k, GROUP=128, NGROUPS=k // 128)
    for m, label in ((1, "gemv"), (1, "gemv_split"), (16, "gemm16"), (4096, "gemm_large")):
        config = dict(ig.config_for(m))
        block_m = config.pop("BLOCK_M")
        launch = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        flags = dict(HAS_G_IDX=False, PER_PACK=True, HAS_BIAS=m == 16, **config)
        if m == 1:  # split: partial sums added atomically to a float32 y
            split = label == "gemv_split"
            scalars = {**POINTERS, "N": "i32"} | ({"y_ptr": "*fp32"} if split else {})
            flags["SPLIT_K"] = 4 if split else 1
            fn = ig._int4_gemv_kernel
        else:
            scalars = {**POINTERS, "M": "i32", "N": "i32", "stride_xm": "i32", "stride_ym": "i32"}
            fn = ig._int4_gemm_kernel
            flags |= dict(UPCAST=False, PRECISION="tf32", BLOCK_M=block_m)
        print(
            json.dumps(compile_kernel(label, fn, scalars, {**layout, **flags}, launch)), flush=True
        )
    scalars = {n: POINTERS[n] for n in ("q_ptr", "s_ptr", "z_ptr", "g_ptr")}
    scalars |= {"w_ptr": "*bf16", "N": "i32"}
    consts = {**layout, "HAS_G_IDX": True, "BLOCK_N": ig.DEQUANT_BLOCK_N}
    print(
        json.dumps(
            compile_kernel("dequantize", ig._dequantize_kernel, scalars, consts, {"num_warps": 4})
        )
    )


if __name__ == "__main__":
    main()
