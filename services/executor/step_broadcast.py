"""How each step reaches every tensor-parallel shard: rank 0 broadcasts it.

Rank 0 is the executor the scheduler talks to. Each job its torch worker runs (a step, a reset) is
first broadcast to the other shards over the control group, then run on rank 0's own shard; the other
shards run the same job, meeting rank 0 in the layers' collectives. Only rank 0 samples, so the other
shards never learn the sampled tokens: rank 0 spells a decode's input token out in the copy it sends
(the scheduler leaves it empty, meaning "the token sampled last step"). Sampling settings, which the
other shards do not use, are left out of that copy.

Every shard validates a step the same way before any collective, so an invalid step (StepError) fails
on all of them together and the group carries on. Any other failure may leave shards waiting in
different collectives: the group cannot go on, and rank 0 exits so that the supervisor restarts the
executor with all its shards.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Callable

from services.executor.parallel_state import broadcast_control, receive_control
from services.executor.request_state import RequestState
from services.executor.step_io import SamplingParams, StepError, StepInput, StepOutput

log = logging.getLogger("radixserve.executor.step_broadcast")

BROKEN_GROUP_EXIT_CODE = 1


def exit_broken_group(error: BaseException) -> None:
    """The default on_broken: log, flush and leave at once (the other shards then fail too)."""
    log.critical("a tensor-parallel step failed midway (%s: %s); the shards can no longer agree, exiting so "
                 "the executor restarts with all its shards", type(error).__name__, error)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(BROKEN_GROUP_EXIT_CODE)


def for_other_shards(step: StepInput, states: dict[str, RequestState]) -> StepInput:
    """The step as the shards that do not sample need it: decode tokens spelled out, no sampling settings."""
    continuing = []
    for req in step.continuing_requests:
        state = states.get(req.request_id)
        if not req.input_ids and state is not None and state.last_token is not None:
            req = dataclasses.replace(req, input_ids=[state.last_token])
        continuing.append(req)
    new = [dataclasses.replace(req, sampling=SamplingParams(), penalty_prompt_ids=[]) for req in step.new_requests]
    return dataclasses.replace(step, new_requests=new, continuing_requests=continuing)


class TensorParallelLeader:
    """Rank 0's ModelRunner as the gRPC servicer drives it: every job goes to the other shards too."""

    def __init__(self, runner, on_broken: Callable[[BaseException], None] = exit_broken_group):
        self.runner = runner
        self.on_broken = on_broken

    def step(self, step: StepInput) -> StepOutput:
        broadcast_control(("step", for_other_shards(step, self.runner.states)))
        try:
            return self.runner.step(step)
        except StepError:
            raise
        except BaseException as e:
            self.on_broken(e)
            raise

    def reset(self) -> int:
        broadcast_control(("reset", None))
        return self.runner.reset()

    def stop(self) -> None:
        """Tell the other shards to exit (their process exits 0)."""
        broadcast_control(("stop", None))

    def __getattr__(self, name):  # model_info, states, kv_slots, ...: the runner's
        return getattr(self.runner, name)


def follow(runner) -> None:
    """A shard other than rank 0: run what rank 0 broadcasts until it says stop. A failure other than
    an invalid step (which rank 0 reports) raises: the process exits and rank 0 with it."""
    while True:
        kind, payload = receive_control()
        if kind == "stop":
            return
        if kind == "reset":
            runner.reset()
        elif kind == "step":
            try:
                runner.step(payload)
            except StepError:
                pass
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")
