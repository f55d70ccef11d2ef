"""What the AWQ and GPTQ int4 schemes share: one linear method that, once the checkpoint's tensors are
loaded, turns them into the logical codes q [K, N], zeros z [G, N] and scales s [G, N] of
w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n] and repacks them into the one layout the Triton kernels
read (kernels/int4_gemm.py: Int4Weight). Each scheme (awq.py, gptq.py) says which tensors its
checkpoints hold (`create_weights`) and how to unpack them (`logical`).

Groups: contiguous runs of group_size input rows (group_size -1: one group). GPTQ act-order (desc_act)
gives each input row its own group (g_idx): if sorting the rows by group makes the groups contiguous
runs again (always at tp=1), the rows are permuted once at load and x's columns gathered to that order
at run time; otherwise (a row-parallel rank's rows, or a group size that is not a multiple of 16) the
kernels gather each row's scale and zero through g_idx.

On CUDA the layer runs kernels/int4_gemm.int4_linear; elsewhere (CPU) the torch reference, which
dequantizes the weight at every call: correct, not fast.
"""

from __future__ import annotations

import torch
from torch import nn

from radixserve.executor.parallel_state import tp_rank, tp_size
from radixserve.executor.quantization.base import LinearMethod, QuantConfig, new_param, tag
from radixserve.kernels.int4_gemm import RUN, Int4Weight, int4_linear, pack, padded

PACKED = 8  # int4 codes per int32
CHECKPOINT_PARAMS = ("qweight", "qzeros", "scales", "g_idx")


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., C] -> the 8 nibbles of each word, least significant first: uint8 [..., C, 8]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 15).to(torch.uint8)


def row_parallel(layer: nn.Module) -> bool:
    from radixserve.executor.layers.linear import RowParallelLinear

    return isinstance(layer, RowParallelLinear)


class Int4Config(QuantConfig):
    """bits 4, group_size (-1: the whole input is one group)."""

    method_class: type["Int4LinearMethod"]

    def __init__(self, group_size: int, *, checkpoint: bool = True):
        if group_size != -1 and (group_size <= 0 or group_size % PACKED):
            raise ValueError(f"{self.name}: group_size {group_size} is not a multiple of 8")
        self.group_size = group_size
        self.checkpoint = checkpoint

    @staticmethod
    def check_bits(name: str, hf: dict) -> None:
        bits = int(hf.get("bits", hf.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"{name}: {bits}-bit weights are not supported (only 4-bit)")

    def linear_method(self) -> "Int4LinearMethod":
        return self.method_class(self)

    def describe(self) -> str:
        group = "one group" if self.group_size == -1 else f"group {self.group_size}"
        source = "checkpoint" if self.checkpoint else "random weights, no checkpoint"
        return f"{self.name} int4 ({group}{self.extra()}, {source})"

    def extra(self) -> str:
        return ""


class Int4LinearMethod(LinearMethod):
    def __init__(self, config: Int4Config):
        self.config = config
        self.name = config.name

    # -- what a scheme defines
    def create_weights(self, layer, in_features, out_features, params_dtype) -> None:
        raise NotImplementedError

    def logical(self, layer: nn.Module):
        """(q uint8 [K, N], z [G, N], s [G, N], g_idx int [K] or None) from the loaded tensors."""
        raise NotImplementedError

    def dummy_g_idx(self, layer: nn.Module) -> None:
        """Fill g_idx (schemes that have one) with the contiguous groups of this rank's rows."""

    # -- shared
    def group_size(self, layer: nn.Module) -> int:
        """Input rows per group on this rank (one group: all of them)."""
        g = self.config.group_size
        return layer.in_features if g == -1 else g

    def splits_groups(self, layer: nn.Module) -> bool:
        """Whether scales and zeros split with the input rows (row-parallel layers): not with one group,
        nor with per-row groups (act-order), where every rank keeps all of them."""
        return self.config.group_size != -1 and not self.per_row_groups()

    def per_row_groups(self) -> bool:
        return False

    def num_groups(self, layer: nn.Module) -> int:
        """Groups whose scales this rank holds."""
        if self.config.group_size == -1:
            return 1
        k = layer.in_features
        if not self.splits_groups(layer) and row_parallel(layer):
            k *= tp_size()
        return -(-k // self.config.group_size)

    def grouped(self, layer: nn.Module, param: nn.Parameter, *, output_div: int) -> nn.Parameter:
        """Tag a per-group tensor [G, N / output_div]."""
        split = self.splits_groups(layer)
        return tag(
            param,
            output_dim=1,
            input_dim=0 if split else None,
            output_div=output_div,
            input_div=self.config.group_size if split else 1,
        )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, z, s, g_idx = self.logical(layer)
        for name in CHECKPOINT_PARAMS:
            if name in layer._parameters:
                delattr(layer, name)
        layer.int4 = to_kernel_layout(q, z.to(torch.uint8), s, g_idx, self.group_size(layer))

    def apply(self, layer, x, bias):
        return int4_linear(x, layer.int4, bias)

    def weight_bytes(self, layer) -> int:
        if hasattr(layer, "int4"):
            return layer.int4.nbytes()
        return super().weight_bytes(layer)

    def init_dummy(self, layer, generator, std) -> bool:
        """Random codes and zeros (every nibble valid) and scales that give weights of about std."""
        for name in ("qweight", "qzeros"):
            param = getattr(layer, name)
            words = torch.randint(
                0, 2**32, param.shape, generator=generator, device=param.device, dtype=torch.int64
            )
            param.data.copy_(torch.where(words >= 2**31, words - 2**32, words).to(torch.int32))
        # (q - z) with q, z uniform over 0..15 has a standard deviation of about 6.5.
        scales = layer.scales
        u = torch.rand(scales.shape, generator=generator, device=scales.device)
        scales.data.copy_((0.5 + u) * (std / 6.5))
        self.dummy_g_idx(layer)
        return True


def to_kernel_layout(
    q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor | None, group: int
) -> Int4Weight:
    """Repack logical codes, zeros, scales (and per-row groups) into the kernels' Int4Weight."""
    K = q.shape[0]
    kp = padded(K)
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        order = torch.argsort(g_idx, stable=True)
        ordered = g_idx[order]
        first = int(ordered[0]) if K else 0
        runs = first + torch.arange(K, device=q.device) // group
        if group % RUN == 0 and torch.equal(ordered, runs):
            # contiguous groups once sorted: permute the rows, keep this rank's groups' scales
            count = -(-K // group)
            s, z = s[first : first + count], z[first : first + count]
            if not torch.equal(order, torch.arange(K, device=q.device)):
                q, perm = q[order], order
            g_idx = None
        else:
            full = torch.zeros(kp, dtype=torch.int32, device=q.device)
            full[:K] = g_idx.to(torch.int32)
            g_idx = full
    if g_idx is None and group >= K:
        group = kp  # one group: the padded rows too
    elif g_idx is None and group % RUN:
        full = torch.zeros(kp, dtype=torch.int32, device=q.device)
        full[:K] = (torch.arange(K, device=q.device) // group).to(torch.int32)
        g_idx = full
    return Int4Weight(
        packed=pack(q),
        scales=s.contiguous(),
        zeros=z.contiguous(),
        in_features=K,
        group_size=group,
        g_idx=g_idx,
        perm=perm,
    )


def checkpoint_params(method: Int4LinearMethod, layer, out_features: int) -> None:
    """The qzeros / scales every int4 scheme has (per group), registered on layer; qweight's shape and
    tags are the scheme's."""
    if out_features % PACKED:
        raise ValueError(f"{method.name}: {out_features} output features are not a multiple of 8")
    groups = method.num_groups(layer)
    qzeros = new_param(groups, out_features // PACKED, dtype=torch.int32)
    scales = new_param(groups, out_features, dtype=torch.float16)
    layer.register_parameter("qzeros", method.grouped(layer, qzeros, output_div=PACKED))
    layer.register_parameter("scales", method.grouped(layer, scales, output_div=1))


def rank_rows(layer: nn.Module) -> torch.Tensor:
    """This rank's input rows as indices into the whole (tp=1) input."""
    k = layer.in_features
    offset = tp_rank() * k if row_parallel(layer) else 0
    return offset + torch.arange(k)
