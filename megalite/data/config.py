"""DataConfig: where the tokens come from and how they are tokenized (Megatron's flag names)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from megalite.config import ConfigError, option
from megalite.data.tokenizers import TOKENIZER_TYPES


@dataclass
class DataConfig:
    """Datasets, split and tokenizer."""

    data_path: Optional[list[str]] = option(
        None, "PREFIX, or weighted: W1 PREFIX1 W2 PREFIX2 ...", nargs="+"
    )
    mock_data: bool = option(False, "synthetic, learnable token sequences (needs --vocab-size)")
    split: str = option("969,30,1", "train,valid,test weights of the documents")
    data_cache_path: Optional[str] = option(None, "where the sample index cache is written")
    tokenizer_type: Optional[str] = option(
        None,
        "default NullTokenizer, or GPT2BPETokenizer when --vocab-file and --merge-file are given",
        choices=TOKENIZER_TYPES,
    )
    tokenizer_model: Optional[str] = option(None, "tokenizer .model file, tokenizer.json or dir")
    vocab_file: Optional[str] = option(None, "vocabulary file (GPT2BPETokenizer)")
    merge_file: Optional[str] = option(None, "BPE merges file (GPT2BPETokenizer)")
    vocab_size: Optional[int] = option(None, "vocabulary size for NullTokenizer / mock data")
    tiktoken_pattern: Optional[str] = option(
        None, "TikTokenizer split pattern (v1 or v2)", choices=("v1", "v2")
    )
    tiktoken_num_special_tokens: int = option(1000, "TikTokenizer: ids reserved for specials")
    tiktoken_special_tokens: Optional[list[str]] = option(
        None, "TikTokenizer: special tokens (default <unk> <s> </s>)", nargs="+"
    )
    vocab_extra_ids: int = option(0, "SentencePieceTokenizer: extra <extra_id_N> tokens")
    num_workers: int = option(2, "accepted; samples are read in the training process")
    no_mmap_bin_files: bool = option(False, "accepted; .bin files are always memory-mapped")
    no_create_attention_mask_in_dataloader: bool = option(
        False, "accepted; attention is causal in the kernel, no mask is ever built"
    )

    def __post_init__(self) -> None:
        self.split = self.split.strip().strip("'\"")  # shell-quoted in Megatron's examples
        if self.tokenizer_type is None:
            both = self.vocab_file is not None and self.merge_file is not None
            self.tokenizer_type = "GPT2BPETokenizer" if both else "NullTokenizer"
        if self.data_path is None and not self.mock_data:
            raise ConfigError("give --data-path PREFIX (or --mock-data for synthetic tokens)")
        if self.data_path and self.mock_data:
            raise ConfigError("--data-path and --mock-data exclude each other")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError(f"--vocab-size {self.vocab_size} must be >= 2")
        if self.tokenizer_type == "NullTokenizer" and self.vocab_size is None:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")
        if self.mock_data and self.vocab_size is None:
            raise ConfigError("--mock-data needs --vocab-size")


TOKENIZER_SETTINGS = (
    "tokenizer_type",
    "tokenizer_model",
    "vocab_file",
    "merge_file",
    "vocab_size",
    "tiktoken_pattern",
    "tiktoken_num_special_tokens",
    "tiktoken_special_tokens",
    "vocab_extra_ids",
)


def tokenizer_from_settings(settings: Mapping[str, Any]):
    """The tokenizer a run's data settings name (a `DataConfig`'s fields, or a checkpoint's
    saved settings): the one place the tokenizer flags reach `build_tokenizer`."""
    from megalite.data.tokenizers import build_tokenizer

    kwargs = {k: settings[k] for k in TOKENIZER_SETTINGS if settings.get(k) is not None}
    return build_tokenizer(**kwargs)
