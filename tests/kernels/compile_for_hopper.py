"""Compile kernels/int4_gemm.py's kernels for an H100 (sm_90) without a GPU: Triton's own front end, LLVM
and ptxas, as a launch on the GPU would (16-byte aligned pointers and strides, the constexprs the
launcher passes). Run as `python -m tests.kernels.compile_for_hopper` (not under TRITON_INTERPRET);
prints one JSON line per kernel: shared memory, the global loads of its PTX and how many are 16-byte
vector loads; for the GEMVs also the instructions of the K loop's body (PTX, and SASS through the nvdisasm
Triton ships) per 4-bit code that one thread handles per iteration (BLOCK_N * BLOCK_K / threads)."""

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

from radixserve.kernels import int4_gemm as ig  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
ATOMIC = re.compile(r"\s*(@%p\d+\s+)?(atom|red)\.global")
POINTERS = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "g_ptr": "*i32"}
POINTERS |= {"b_ptr": "*bf16", "y_ptr": "*bf16"}


def _ptx_loop(ptx: str) -> list[str]:
    """The instructions of the PTX's inner loop: from its header label to the branch back to it."""
    lines = ptx.splitlines()
    start = next(i for i, line in enumerate(lines) if "Inner Loop Header" in line)
    label = lines[start].split(":")[0]
    back = re.compile(r"bra(\.uni)?\s+" + re.escape(label) + ";")
    end = next(i for i in range(start, len(lines)) if back.search(lines[i]))
    body = [line.strip() for line in lines[start + 1 : end + 1]]
    # skip labels, directives, comments, braces and the `mov.u32 %r, 0x0` that Triton's load asm puts
    # before each masked load (no SASS)
    return [
        t
        for t in body
        if t
        and not t.startswith(("//", ".", "$", "{", "}"))
        and not (t.startswith("mov.u32") and t.endswith(", 0x0;"))
    ]


def _sass_loop(cubin: bytes) -> list[str] | None:
    """The SASS of the loop that ends in the cubin's first backward branch (None without nvdisasm)."""
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    if not nvdisasm.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    labels, ins = {}, []
    for line in text.splitlines():
        if m := re.match(r"\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(ins)
        elif m := re.search(r"/\*[0-9a-f]{4}\*/\s+(.*?);", line):
            ins.append(m.group(1))
    for i, t in enumerate(ins):
        m = re.search(r"BRA.*`\(\.(L_x_\d+)\)", t)
        if m and labels.get(m.group(1), i + 1) <= i:
            return ins[labels[m.group(1)] : i + 1]
    return None


def compile_kernel(
    name, fn, scalars: dict, consts: dict, config: dict, codes_per_iter: int = 0
) -> dict:
    """codes_per_iter: 4-bit codes one thread handles per iteration of the K loop (0: not counted)."""
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
    } | (_per_code(kernel, codes_per_iter) if codes_per_iter else {})


def _per_code(kernel, codes: int) -> dict:
    ptx = _ptx_loop(kernel.asm["ptx"])
    sass = _sass_loop(kernel.asm["cubin"])
    out = {"codes_per_iter": codes, "ptx_per_code": round(len(ptx) / codes, 2)}
    return out | ({"sass_per_code": round(len(sass) / codes, 2)} if sass else {})


def main() -> None:
    k = 4096
    layout = dict(K=k, KP=k, GROUP=128, NGROUPS=k // 128)
    gemvs = ((1, "gemv"), (1, "gemv_split"), (1, "gemv_late"), (1, "gemv_float32"))
    gemvs += ((1, "gemv_float32_split"),)
    for m, label in (*gemvs, (16, "gemm16"), (4096, "gemm_large")):
        config = dict(ig.config_for(m))
        block_m = config.pop("BLOCK_M")
        launch = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        flags = dict(HAS_G_IDX=False, PER_PACK=True, HAS_BIAS=m == 16, **config)
        codes = 0
        if m == 1:  # split: partial sums added atomically to a float32 y
            split = label.endswith("_split")
            scalars = {**POINTERS, "N": "i32"} | ({"y_ptr": "*fp32"} if split else {})
            flags["SPLIT_K"] = 4 if split else 1
            fn = ig._int4_gemv_kernel if "float32" in label else ig._int4_gemv_half2_kernel
            if fn is ig._int4_gemv_half2_kernel:
                scalars["MAGIC"] = "i32"  # after N, as in the kernel's signature
                flags["LATE_SCALE"] = label == "gemv_late"
            if not split:  # (split 4 ways K = 4096 is one step: no loop)
                codes = config["BLOCK_N"] * config["BLOCK_K"] // (32 * launch["num_warps"])
        else:
            scalars = {**POINTERS, "M": "i32", "N": "i32", "stride_xm": "i32", "stride_ym": "i32"}
            fn = ig._int4_gemm_kernel
            flags |= dict(UPCAST=False, PRECISION="tf32", BLOCK_M=block_m)
        print(
            json.dumps(compile_kernel(label, fn, scalars, {**layout, **flags}, launch, codes)),
            flush=True,
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
