"""Data pipeline: tokenizers, Megatron .bin/.idx datasets, preprocessing, GPT samples, blending.

Modules: ``tokenizers`` (build_tokenizer), ``indexed_dataset`` (reader/writer of .bin/.idx),
``chunking`` (exact document splitting for memoised encoding), ``encode`` + ``preprocess``
(JSONL -> .bin/.idx, console script ``megalite-preprocess``), ``merge`` (several datasets -> one),
``index_cache`` (build-once .npy indices, ``distributed_hooks``), ``gpt_dataset`` (samples,
splits, cached indices, ``build_train_valid_test_datasets`` for the trainer) and ``blended``
(weighted mixtures).
"""
