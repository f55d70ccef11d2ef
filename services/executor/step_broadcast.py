"""How each step reaches every tensor-parallel shard: rank 0 broadcasts it.

Rank 0 is the executor the scheduler talks to. Each job its torch worker runs (a step, a reset) is
first broadcast to the other shards over the control group, then run on rank 0's own shard; the other
shards run the same job, meeting rank 0 in the layers' collectives. Only rank 0 samples; it broadcasts the
sampled tokens over the data group (on the device, queued after the step like any kernel), so every
shard keeps them for the next decode's input and rank 0 can broadcast step N+1 before step N's tokens
reach its host. Sampling settings, which the other shards do not use, are left out of the copy sent.
A shard waits for step N's kernels only after it has launched step N+1, as rank 0 does.

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

from radixserve.executor.lora.adapter import LoraError
from radixserve.executor.parallel_state import broadcast_control, receive_control
from radixserve.executor.runner import LaunchedStep
from radixserve.common.sampling import SamplingParams, StoppingCriteria
from radixserve.common.step import StepError, StepInput, StepOutput

log = logging.getLogger("radixserve.executor.step_broadcast")

BROKEN_GROUP_EXIT_CODE = 1


def exit_broken_group(error: BaseException) -> None:
    """The default on_broken: log, flush and leave at once (the other shards then fail too)."""
    log.critical(
        "a tensor-parallel step failed midway (%s: %s); the shards can no longer agree, exiting so "
        "the executor restarts with all its shards",
        type(error).__name__,
        error,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(BROKEN_GROUP_EXIT_CODE)


def for_other_shards(step: StepInput) -> StepInput:
    """The step as the shards that do not sample need it: no sampling or stopping settings."""
    new = [
        dataclasses.replace(
            req,
            sampling=SamplingParams(),
            penalty_prompt_ids=[],
            stopping=StoppingCriteria(),
            trace_context=None,
        )
        for req in step.new_requests
    ]
    return dataclasses.replace(step, new_requests=new)


class TensorParallelLeader:
    """Rank 0's ModelRunner as the gRPC servicer drives it: every job goes to the other shards too."""

    def __init__(self, runner, on_broken: Callable[[BaseException], None] = exit_broken_group):
        self.runner = runner
        self.on_broken = on_broken

    def step(self, step: StepInput) -> StepOutput:
        return self.collect(self.launch(step))

    def launch(self, step: StepInput) -> LaunchedStep:
        self._unless_broken(broadcast_control, ("step", for_other_shards(step)))
        return self._unless_broken(self.runner.launch, step)

    def collect(self, launched: LaunchedStep) -> StepOutput:
        return self._unless_broken(self.runner.collect, launched)

    def _unless_broken(self, fn, *args):
        try:
            return fn(*args)
        except StepError:
            raise
        except BaseException as e:
            self.on_broken(e)
            raise

    def reset(self) -> int:
        self._unless_broken(broadcast_control, ("reset", None))
        return self.runner.reset()

    def load_lora(self, name: str, path: str) -> dict:
        """Every shard loads the adapter (its own slices of A and B); each refuses a bad one alike."""
        self._unless_broken(broadcast_control, ("lora_load", (name, path)))
        return self.runner.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self._unless_broken(broadcast_control, ("lora_unload", name))
        self.runner.unload_lora(name)

    def stop(self) -> None:
        """Tell the other shards to exit (their process exits 0)."""
        broadcast_control(("stop", None))

    def __getattr__(self, name):  # model_info, states, kv_slots, ...: the runner's
        return getattr(self.runner, name)


def follow(runner) -> None:
    """A shard other than rank 0: run what rank 0 broadcasts until it says stop. A failure other than
    an invalid step (which rank 0 reports) raises: the process exits and rank 0 with it."""
    previous = None  # the step launched last, collected once the next one is launched
    while True:
        kind, payload = receive_control()
        if kind == "stop":
            return
        if kind == "reset":
            if previous is not None:
                runner.collect(previous)
                previous = None
            runner.reset()
        elif kind in ("lora_load", "lora_unload"):
            try:
                if kind == "lora_load":
                    runner.load_lora(*payload)
                else:
                    runner.unload_lora(payload)
            except LoraError:
                pass  # rank 0 refuses it the same way and reports it
        elif kind == "step":
            if previous is not None and previous.verifying is not None:
                # A verify step's accepted counts set its requests' lengths, which the next step of
                # those requests builds on: rank 0 has read them before planning it, so must we.
                runner.collect(previous)
                previous = None
            try:
                launched = runner.launch(payload)
            except StepError:
                continue
            if previous is not None:
                runner.collect(previous)
            previous = launched
        else:
            raise RuntimeError(f"unknown message {kind!r} from rank 0")
