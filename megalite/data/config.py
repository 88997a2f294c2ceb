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
    vocab_extra_ids: int = option(
        0, "SentencePieceTokenizer with --tokenizer-sentencepiece-legacy: extra <extra_id_N>"
    )
    tokenizer_sentencepiece_legacy: bool = option(
        False,
        "the older Megatron wrapper's vocabulary: SentencePieceTokenizer adds <CLS> <SEP> <EOD> "
        "<MASK>... after the pieces (eod <EOD>); for data and checkpoints made that way",
    )
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
    "tokenizer_sentencepiece_legacy",
)


def tokenizer_from_settings(settings: Mapping[str, Any]):
    """The tokenizer a run's data settings name (a `DataConfig`'s fields, or a checkpoint's
    saved settings): the one place the tokenizer flags reach `build_tokenizer`."""
    from megalite.data.tokenizers import build_tokenizer

    kwargs = {k: settings[k] for k in TOKENIZER_SETTINGS if settings.get(k) is not None}
    return build_tokenizer(**kwargs)


def _tokenizer_flags(settings: Mapping[str, Any]) -> str:
    names = [k for k in TOKENIZER_SETTINGS if settings.get(k) not in (None, False, 0)]
    return " ".join(f"--{k.replace('_', '-')} {settings[k]}" for k in names).replace(" True", "")


def vocabulary_change(
    saved: Mapping[str, Any], run: Mapping[str, Any], saved_vocab: int, run_vocab: int
) -> str:
    """Why a checkpoint's vocabulary (``saved_vocab``, its tokenizer settings ``saved``) is not
    this run's (``run_vocab``, settings ``run``), and what reads it: a sentence for the error.

    The case it names in full: a SentencePieceTokenizer checkpoint trained with megalite's
    earlier rule (the older Megatron wrapper's added ``<CLS> <SEP> <EOD> <MASK>...``, now
    behind ``--tokenizer-sentencepiece-legacy``), loaded by today's tokenizer (its pieces only).
    """
    differ = [k for k in TOKENIZER_SETTINGS if (saved.get(k) or None) != (run.get(k) or None)]
    legacy_flag = "--tokenizer-sentencepiece-legacy"
    if (
        saved.get("tokenizer_type") == run.get("tokenizer_type") == "SentencePieceTokenizer"
        and not saved.get("tokenizer_sentencepiece_legacy")
        and not run.get("tokenizer_sentencepiece_legacy")
        and saved_vocab > run_vocab
    ):
        try:
            old = tokenizer_from_settings({**saved, "tokenizer_sentencepiece_legacy": True})
            eod = f"eod </s> {tokenizer_from_settings(run).eod}"
        except (ValueError, OSError):
            old, eod = None, "eod </s>"
        if old is not None and old.vocab_size == saved_vocab:
            added = ", ".join(
                f"{t} {i}" for t, i in sorted(old.special_tokens.items(), key=lambda x: x[1])
                if i >= run_vocab
            )  # fmt: skip
            what = (
                f"ids {run_vocab}..{saved_vocab - 1} are the tokens megalite's earlier "
                f"SentencePieceTokenizer added after the model's {run_vocab} pieces ({added}; "
                f"every document ended in <EOD> {old.eod})"
            )
        else:
            what = (
                f"ids {run_vocab}..{saved_vocab - 1} are {saved_vocab - run_vocab} tokens "
                "added after the model's pieces, as megalite's earlier SentencePieceTokenizer "
                "did (<CLS> <SEP> <EOD> <MASK>...)"
            )
        return (
            f"{what}; SentencePieceTokenizer now follows Megatron-LM (the model's pieces only, "
            f"{eod}, vocabulary {run_vocab}). Data preprocessed the old way holds those ids: "
            f"to keep training this checkpoint (on that data, or on data preprocessed today), "
            f"add {legacy_flag}, which gives the old vocabulary of {saved_vocab} back; "
            f"tools/preprocess_data.py {legacy_flag} writes more data the old way"
        )
    if differ:
        return (
            f"the checkpoint's tokenizer was `{_tokenizer_flags(saved)}`, this run's is "
            f"`{_tokenizer_flags(run)}`: give the checkpoint's tokenizer flags to train it on"
        )
    return (
        f"the same tokenizer flags (`{_tokenizer_flags(run)}`) give {run_vocab} tokens today "
        f"and gave {saved_vocab} when the checkpoint was saved: its files changed"
    )
