"""Which HF architecture names serve pooled outputs rather than generation (--is-embedding).

Shared by the executor (which model class to build) and the gateway (which routes a model
answers), so the naming rule lives here once.
"""

from __future__ import annotations

SEQUENCE_CLASSIFIER_SUFFIX = "ForSequenceClassification"  # a score head over the last token
BARE_DECODER_SUFFIX = "Model"  # the decoder stack alone (e.g. MistralModel): no LM head
CAUSAL_LM_SUFFIX = "ForCausalLM"


def is_sequence_classifier(architecture: str) -> bool:
    return architecture.endswith(SEQUENCE_CLASSIFIER_SUFFIX)


def causal_lm_base(architecture: str, suffix: str) -> str | None:
    """The *ForCausalLM name whose decoder `architecture` (ending in suffix) reuses, else None."""
    if not architecture.endswith(suffix) or architecture == suffix:
        return None
    return architecture[: -len(suffix)] + CAUSAL_LM_SUFFIX
