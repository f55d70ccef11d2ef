"""The queue limit's rule (services/scheduler/queue_limit.py), shared by generate and embed requests."""

import grpc

from radixserve.scheduler.queue_limit import queue_refusal


def test_what_fits_what_never_fits_and_what_fits_later():
    assert queue_refusal(5, 0, None, "sequences", "requests") is None  # no limit
    assert queue_refusal(4, 60, 64, "sequences", "requests") is None
    code, message = queue_refusal(100, 0, 64, "sequences", "requests")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == (
        "this request has 100 sequences but at most 64 may wait in the queue "
        "(--max-queued-requests): it can never be queued; send fewer"
    )
    code, message = queue_refusal(5, 60, 64, "inputs", "inputs")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message == (
        "60 inputs are already waiting and this request needs room for 5 "
        "(--max-queued-requests 64); retry later"
    )
    assert queue_refusal(1, 64, 64, "sequences", "requests")[1] == (
        "64 requests are already waiting (--max-queued-requests 64); retry later"
    )
