"""HF architecture name -> model class. The BERT-family encoders serve only with --is-embedding."""

from __future__ import annotations

from torch import nn

from radixserve.executor.models.bert import BertModel, XLMRobertaModel
from radixserve.executor.models.exaone import ExaoneForCausalLM
from radixserve.executor.models.dbrx import DbrxForCausalLM
from radixserve.executor.models.gemma import GemmaForCausalLM
from radixserve.executor.models.gemma2 import Gemma2ForCausalLM
from radixserve.executor.models.gemma3 import Gemma3ForCausalLM
from radixserve.executor.models.grok import Grok1ForCausalLM, Grok1ModelForCausalLM
from radixserve.executor.models.internlm2 import InternLM2ForCausalLM
from radixserve.executor.models.chatglm import ChatGLMForCausalLM
from radixserve.executor.models.cohere import CohereForCausalLM
from radixserve.executor.models.glm import GlmForCausalLM
from radixserve.executor.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from radixserve.executor.models.llama import LlamaForCausalLM
from radixserve.executor.models.llava import LlavaForConditionalGeneration
from radixserve.executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)
from radixserve.executor.models.mistral import MistralForCausalLM
from radixserve.executor.models.mixtral import MixtralForCausalLM
from radixserve.executor.models.olmo import Olmo2ForCausalLM, OlmoForCausalLM
from radixserve.executor.models.phi3 import Phi3ForCausalLM
from radixserve.executor.models.pooling_heads import derived_model_class
from radixserve.executor.models.qwen2 import Qwen2ForCausalLM
from radixserve.executor.models.qwen2_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from radixserve.executor.models.qwen2_moe import Qwen2MoeForCausalLM
from radixserve.executor.models.qwen3 import Qwen3ForCausalLM
from radixserve.executor.models.qwen3_moe import Qwen3MoeForCausalLM
from radixserve.executor.models.stablelm import StableLmForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,  # vision (issue 22)
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "OlmoForCausalLM": OlmoForCausalLM,
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "ExaoneForCausalLM": ExaoneForCausalLM,
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "StableLmForCausalLM": StableLmForCausalLM,
    "CohereForCausalLM": CohereForCausalLM,
    "GlmForCausalLM": GlmForCausalLM,
    "ChatGLMModel": ChatGLMForCausalLM,  # remote code (ChatGLM2/3, GLM-4 chat)
    "ChatGLMForConditionalGeneration": ChatGLMForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "DbrxForCausalLM": DbrxForCausalLM,
    "Grok1ForCausalLM": Grok1ForCausalLM,
    "Grok1ModelForCausalLM": Grok1ModelForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionForConditionalGeneration,
    "BertModel": BertModel,
    "BertForMaskedLM": BertModel,
    "XLMRobertaModel": XLMRobertaModel,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    model_class = MODEL_REGISTRY.get(architecture) or derived_model_class(
        architecture, MODEL_REGISTRY
    )
    if model_class is None:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: {sorted(MODEL_REGISTRY)}, "
            "and XModel / XForSequenceClassification for each XForCausalLM (--is-embedding)"
        )
    return model_class
