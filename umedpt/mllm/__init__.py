"""Uni-Med stage: the pretrained encoder attached to a causal LM through a connector-MoE.

``Resampler`` and ``ConnectorMoE`` need only torch; ``MLLMModule`` builds the LLM with
``transformers``/``peft`` (the ``llm`` extra), imported when a model is built.
"""

from umedpt.mllm.connector import ConnectorMoE, MLPConnector
from umedpt.mllm.datamodule import InstructionDataModule
from umedpt.mllm.model import MLLMModule
from umedpt.mllm.predictions import GenerationWriter
from umedpt.mllm.resampler import Resampler

__all__ = [
    "ConnectorMoE",
    "GenerationWriter",
    "InstructionDataModule",
    "MLLMModule",
    "MLPConnector",
    "Resampler",
]
