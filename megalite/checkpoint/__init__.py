"""Offline checkpoint tools: resharding to any TP/PP layout, Hugging Face export and import.

- `megalite.checkpoint.reshard`: ``reshard(load, save, tp, pp, layers_per_virtual)``
  (``tools/checkpoint_reshard.py``);
- `megalite.checkpoint.hf_export` / `hf_import`: ``LlamaForCausalLM`` / ``GPT2LMHeadModel``
  folders (``tools/export_hf.py``, ``tools/import_hf.py``);
- `megalite.checkpoint.layout`: which parameter is split how, joining and cutting TP shards;
- `megalite.checkpoint.streaming`: torch.save files written and read one layer at a time.
"""
