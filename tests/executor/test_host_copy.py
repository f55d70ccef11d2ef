"""host_copy.to_device: the same tensor torch.tensor would make, and, on a GPU, a step's sampling and
verification paths that queue their host values without synchronizing the stream (PyTorch's sync
debug mode turns a synchronizing call into an error)."""

from __future__ import annotations

import pytest
import torch

from radixserve.common.sampling import SamplingParams
from radixserve.executor.host_copy import to_device, to_host
from radixserve.executor.sampling import sample_on_device
from radixserve.executor.spec_step import verify_on_device


@pytest.mark.parametrize(
    "values, dtype",
    [
        ([3, 1, 2], None),
        ([[0, 1], [5, 7]], torch.int64),
        ([0.5, 1.0], torch.float32),
        ([True, False, True], None),
        (2.5, None),
        ([], torch.int64),
    ],
)
def test_same_tensor_as_torch_tensor_on_cpu(values, dtype):
    got = to_device(values, "cpu", dtype)
    want = torch.tensor(values, dtype=dtype)
    assert got.dtype == want.dtype and got.device.type == "cpu"
    assert torch.equal(got, want)


def test_a_cpu_tensor_is_converted_not_copied_needlessly():
    host = torch.arange(4)
    assert to_device(host, torch.device("cpu")) is host
    assert to_device(host, "cpu", torch.float32).dtype == torch.float32


def test_to_host_passes_none_and_cpu_tensors_through():
    host = torch.arange(3)
    assert to_host(None) is None and to_host(host) is host


@pytest.mark.cuda
def test_to_host_is_a_pinned_copy_that_arrives_after_a_sync():
    t = torch.arange(6, device="cuda").reshape(2, 3)
    host = to_host(t)
    assert host.is_pinned() and host.device.type == "cpu"
    torch.cuda.current_stream().synchronize()
    assert host.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.fixture
def sync_errors():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_to_device_queues_without_a_sync(sync_errors):
    got = to_device([[1, 2, 3], [4, 5, 6]], "cuda", torch.int64)
    with pytest.raises(RuntimeError):
        torch.tensor([1, 2, 3], device="cuda")  # the pageable copy this module replaces
    torch.cuda.set_sync_debug_mode("default")
    assert got.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.cuda
def test_sampling_and_verification_launch_without_a_sync(sync_errors):
    vocab = 512
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(3, vocab, device="cuda", generator=gen)
    params = [
        SamplingParams(),
        SamplingParams(
            temperature=0.7, top_p=0.9, top_k=40, return_logprob=True, top_logprobs_num=2
        ),
        SamplingParams(temperature=1.0, min_p=0.05),
    ]
    sample_on_device(logits, params, [None] * 3).to_host()
    verify_logits = torch.randn(2 + 3 + 1, vocab, device="cuda", generator=gen)
    verify_on_device(verify_logits, [1, 2, 0], [[5], [6, 7], []], params, [None] * 3).to_host()
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
