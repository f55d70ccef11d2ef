"""HF architecture name -> model class. The BERT-family encoders serve only with --is-embedding."""

from __future__ import annotations

from torch import nn

from radixserve.executor.models.bert import BertModel, XLMRobertaModel
from radixserve.executor.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from radixserve.executor.models.llama import LlamaForCausalLM
from radixserve.executor.models.mixtral import MixtralForCausalLM
from radixserve.executor.models.qwen2 import Qwen2ForCausalLM
from radixserve.executor.models.qwen2_moe import Qwen2MoeForCausalLM
from radixserve.executor.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "BertModel": BertModel,
    "BertForMaskedLM": BertModel,
    "XLMRobertaModel": XLMRobertaModel,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {sorted(MODEL_REGISTRY)}"
        ) from None
