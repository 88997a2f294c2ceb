"""Data pipeline: tokenizers, Megatron .bin/.idx datasets, preprocessing, GPT samples, blending.

Modules: ``tokenizers`` (Megatron's tokenizer types, ``build_tokenizer``, ``TOKENIZER_TYPES``;
``tiktokenizer`` holds TikTokenizer), ``indexed_dataset`` (reader/writer of .bin/.idx),
``readers`` (JSONL / .gz / .zst / parquet / shard folders, streamed), ``chunking`` +
``chunking_sp`` (exact document splitting for memoised encoding), ``fastpath`` (gigatoken behind
a self-check), ``encode`` + ``preprocess`` (corpus -> .bin/.idx, console script
``megalite-preprocess``), ``merge`` (several datasets -> one), ``shards`` (preprocessing as a
Slurm job array), ``index_cache`` (build-once .npy indices, ``distributed_hooks``),
``gpt_dataset`` (samples, splits, cached indices, ``build_train_valid_test_datasets`` for the
trainer) and ``blended`` (weighted mixtures).
"""
