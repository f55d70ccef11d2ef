"""Tensor-parallel rank and world size. Only tp=1 exists today; layers already shard by these."""


def tp_rank() -> int:
    return 0


def tp_size() -> int:
    return 1
