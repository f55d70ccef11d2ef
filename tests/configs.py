"""Component configs as the unit tests build them: the defaults their expectations were written against."""

from radixserve.common.config import RunnerConfig, SchedulerConfig


def scheduler_config(**fields) -> SchedulerConfig:
    """A SchedulerConfig that prefills each prompt whole (no chunking) unless chunked_prefill_size is given."""
    fields.setdefault("chunked_prefill_size", -1)
    return SchedulerConfig(**fields)


def runner_config(**fields) -> RunnerConfig:
    """A RunnerConfig that runs every step eagerly (no CUDA graphs) unless cuda_graph_max_bs is given."""
    fields.setdefault("disable_cuda_graph", "cuda_graph_max_bs" not in fields)
    return RunnerConfig(**fields)
