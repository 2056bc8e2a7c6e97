"""The language-model side: tokenizer, causal LM (a local path or a config) and LoRA.

``transformers`` and ``peft`` are imported here only, when a model is built.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from umedpt.mllm.prompts import GRID

#: the embedded demo's causal LM (random init, no download); any key can be overridden.
#: ``initializer_range`` is 5x Llama's: with the frozen random output layer of std 0.02 the
#: logits could not grow large enough for low losses (a pretrained LLM does not have this problem).
TINY_LLM: dict[str, Any] = {
    "model_type": "llama",
    "initializer_range": 0.1,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}
#: a word of the built-in tokenizer: an optional leading space, then a grid cell, an image tag,
#: a task identifier, a word or one punctuation character
WORD_PATTERN = r" ?(?:<\d+>|</?img>|\[\w+\]|\w+|[^\w\s])"
SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}


def text_words(texts: Iterable[str]) -> set[str]:
    """The words of ``texts`` as the built-in tokenizer splits them (lower case, no spaces)."""
    return {w.strip() for text in texts for w in re.findall(WORD_PATTERN, text.lower())}


def build_word_tokenizer(words: Iterable[str]) -> Any:
    """A lower-casing word-level ``PreTrainedTokenizerFast`` over ``words`` and the box grid cells.

    Every word exists with and without a leading space, so ``decode(encode(text))`` gives back
    ``text`` with whitespace runs collapsed (and lower case); unknown words become ``<unk>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    for word in sorted(text_words(words) | {f"<{i}>" for i in range(GRID + 1)}):
        for variant in (word, " " + word):
            vocab.setdefault(variant, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS
    )


def load_tokenizer(source: str) -> Any:
    """A tokenizer from a local directory; the pad token defaults to EOS (padding is masked anyway)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {source!r} has no EOS token: answers could not end")
    return tokenizer


def build_llm(source: str | dict[str, Any] | None, tokenizer: Any, **kwargs: Any) -> nn.Module:
    """A causal LM: ``from_pretrained(source, **kwargs)`` for a local path, else built from a config.

    A mapping updates :data:`TINY_LLM` (``model_type`` plus that config class's arguments); the
    vocabulary and special token ids come from ``tokenizer``. Weights are random then.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(source, str):
        return AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kwargs)
    spec = {**TINY_LLM, **(source or {})}
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        **spec,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoModelForCausalLM.from_config(config, **kwargs)


def add_lora(
    llm: nn.Module, r: int, alpha: int, dropout: float, target_modules: str | list[str]
) -> nn.Module:
    """Wrap ``llm`` with peft LoRA adapters; the base weights are frozen.

    ``target_modules="all-linear"`` adapts every linear layer except the output layer (``lm_head``).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(llm, config)
