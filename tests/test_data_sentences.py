"""Megatron's .idx layout for empty documents and for ``--split-sentences`` (and the GPT dataset
over such data).

Reference: what Megatron's ``tools/preprocess_data.py`` does per input line, written out here
with megalite's writer (whose bytes test_data_indexed checks against Megatron's builder):
``Encoder.encode`` tokenizes each sentence (the whole text when not splitting), keeps only
sentences with tokens, appends the eod to the last one when there is any, and
``builder.add_document(ids, sentence_lens)`` writes the document, an empty one included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megalite.data.gpt_dataset import build_train_valid_test_datasets
from megalite.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter, best_dtype
from megalite.data.preprocess import main
from megalite.data.sentences import build_splitter
from megalite.data.tokenizers import build_tokenizer
from tests.test_data_common import (
    EDGE_CASES,
    stdlib_text,
    train_byte_level_bpe,
    train_sentencepiece,
    write_jsonl,
)

PROSE = [
    "One sentence. Two sentences! A third? Yes.\n\nA new paragraph here.\nNo period line\n",
    "Mr. Smith went to Washington. He said hello.  Then he left.",
    "",
    "No end mark at all",
    "   ",
    "Ends with space. ",
    'Quote: "Stop." she said. 3.14 is pi. e.g. this one.\n\n\n',
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentences")
    hf = train_byte_level_bpe(str(d / "hf"), vocab_size=600)["tokenizer_json"]
    sp = train_sentencepiece(str(d / "sp.model"), vocab_size=500)
    docs = PROSE + EDGE_CASES + stdlib_text(10_000) + ["", "last one. Really."]
    return {
        "dir": d,
        "docs": docs,
        "corpus": write_jsonl(str(d / "c.jsonl"), docs),
        "hf": ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf],
        "sp": ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp],
    }


def megatron_reference(prefix, flags, docs, split=None, append_eod=True) -> None:
    tok = build_tokenizer(**dict(zip(["tokenizer_type", "tokenizer_model"], flags[1::2])))
    with IndexedDatasetWriter(prefix, best_dtype(tok.vocab_size)) as writer:
        for text in docs:
            ids, lens = [], []
            for sentence in split(text) if split else [text]:
                sentence_ids = tok.tokenize(sentence)
                if sentence_ids:
                    ids += sentence_ids
                    lens.append(len(sentence_ids))
            if ids and append_eod:
                ids.append(tok.eod)
                lens[-1] += 1
            writer.add_document(np.array(ids, dtype=np.int64), lens)


def _same_files(a: str, b: str) -> None:
    for ext in (".bin", ".idx"):
        assert open(a + ext, "rb").read() == open(b + ext, "rb").read(), ext


@pytest.mark.parametrize("kind", ["hf", "sp"])
@pytest.mark.parametrize("path", ["auto", "exact"])
def test_empty_documents_keep_their_index_entry(setup, tmp_path, kind, path):
    """Byte-for-byte Megatron's layout: an empty document is a document of no sequences."""
    ref = str(tmp_path / "ref")
    megatron_reference(ref, setup[kind], setup["docs"])
    out = str(tmp_path / "out")
    argv = ["--input", setup["corpus"], "--output-prefix", out, "--append-eod"]
    assert main(argv + ["--workers", "2", "--fast-tokenizer", path] + setup[kind]) == 0
    _same_files(ref, out + "_text_document")
    ds = IndexedDataset(out + "_text_document")
    assert ds.num_documents == len(setup["docs"])
    assert (np.diff(ds.document_indices) == 0).sum() >= 2  # "" and the other empty ones


@pytest.mark.parametrize("kind", ["hf", "sp"])
@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_layout(setup, tmp_path, kind, keep_newlines):
    """--split-sentences: one document per line, one sequence per sentence with tokens, the eod
    in the last one; gigatoken and the exact path give the same bytes as the reference."""
    split = build_splitter(keep_newlines)
    ref = str(tmp_path / "ref")
    megatron_reference(ref, setup[kind], setup["docs"], split)
    argv = ["--input", setup["corpus"], "--append-eod", "--workers", "2", "--split-sentences"]
    argv += ["--keep-newlines"] if keep_newlines else []
    for path in ("auto", "exact"):
        out = str(tmp_path / path)
        assert main(argv + ["--output-prefix", out, "--fast-tokenizer", path] + setup[kind]) == 0
        _same_files(ref, out + "_text_sentence")
    ds = IndexedDataset(str(tmp_path / "auto_text_sentence"))
    per_doc = np.diff(ds.document_indices)
    assert ds.num_documents == len(setup["docs"]) and len(ds) > ds.num_documents
    first = split(PROSE[0])  # Punkt untrained still ends sentences at . ! ? + space
    assert len(first) == 6 and per_doc[0] == 6
    assert first[0] == ("One sentence. " if keep_newlines else "One sentence.")
    assert ("\n\n" in first[3]) == keep_newlines  # the blank line stays with "Yes."
    assert per_doc[2] == 0 and per_doc[4] == 0  # "" and "   ": no sentences, still a document
    tok = build_tokenizer(**dict(zip(["tokenizer_type", "tokenizer_model"], setup[kind][1::2])))
    assert ds[int(ds.document_indices[3])].tolist() == tok.tokenize(PROSE[3]) + [tok.eod]


def test_split_sentences_without_eod_and_with_partitions(setup, tmp_path):
    """No eod: sentences as they are; --partitions deals whole documents (all their sentences)."""
    split = build_splitter(False)
    docs = setup["docs"]
    ref = str(tmp_path / "ref")
    megatron_reference(ref, setup["sp"], docs, split, append_eod=False)
    out = str(tmp_path / "o")
    argv = ["--input", setup["corpus"], "--output-prefix", out, "--split-sentences"]
    assert main(argv + setup["sp"]) == 0
    _same_files(ref, out + "_text_sentence")
    rr = str(tmp_path / "rr")
    assert main(argv[:2] + ["--output-prefix", rr, "--split-sentences", "--partitions", "2"]
                + setup["sp"]) == 0  # fmt: skip
    ref_rr = str(tmp_path / "ref_rr")
    megatron_reference(ref_rr, setup["sp"], docs[0::2] + docs[1::2], split, append_eod=False)
    _same_files(ref_rr, rr + "_text_sentence")


def test_gpt_dataset_over_empty_documents(setup, tmp_path):
    """Empty documents have no sequences, and GPT samples are cut from sequences (Megatron's
    GPTDataset splits and samples by sequence): the samples equal those of the same data
    without the empty documents, and a split made only of them is empty, not a crash."""
    out = str(tmp_path / "with")
    flags = setup["sp"]
    assert main(["--input", setup["corpus"], "--output-prefix", out, "--append-eod"] + flags) == 0
    nonempty = [d for d in setup["docs"] if build_tokenizer(
        **dict(zip(["tokenizer_type", "tokenizer_model"], flags[1::2]))).tokenize(d)]  # fmt: skip
    src = write_jsonl(str(tmp_path / "nonempty.jsonl"), nonempty)
    out2 = str(tmp_path / "without")
    assert main(["--input", src, "--output-prefix", out2, "--append-eod"] + flags) == 0
    with_empty = IndexedDataset(out + "_text_document")
    assert with_empty.num_documents > IndexedDataset(out2 + "_text_document").num_documents
    kw = dict(split="90,10,0", seq_length=32, seed=5, num_samples=(40, 8, 0))
    a = build_train_valid_test_datasets([out + "_text_document"], cache_path=str(tmp_path / "a"),
                                        **kw)  # fmt: skip
    b = build_train_valid_test_datasets([out2 + "_text_document"], cache_path=str(tmp_path / "b"),
                                        **kw)  # fmt: skip
    assert a[2] is None and b[2] is None
    for da, db in zip(a[:2], b[:2]):
        for i in range(len(da)):
            torch.testing.assert_close(da[i]["tokens"], db[i]["tokens"])
            torch.testing.assert_close(da[i]["labels"], db[i]["labels"])
    # a dataset of only empty documents: no sequences, so every split is empty
    empty = str(tmp_path / "empty")
    with IndexedDatasetWriter(empty, np.uint16) as w:
        for _ in range(5):
            w.add_document(np.zeros(0, np.uint16), [])
    assert build_train_valid_test_datasets([empty], cache_path=str(tmp_path / "c"), **kw) == (
        None,
        None,
        None,
    )
