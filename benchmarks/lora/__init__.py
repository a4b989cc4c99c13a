"""The parts of the LoRA-generation benchmark (`benchmarks/lora_generation.py` is its entry):

- `settings`: `Settings`, the presets, and which fields each cached step depends on;
- `domains`: the base model, domain texts and descriptions, task vectors;
- `bank`: per-domain LoRA fine-tuning into the checkpoint bank, conditioned banks, cached generators;
- `scoring`: held-out perplexity of a LoRA (cached), PEFT merges, memorisation distances;
- `protocol`: seen / unseen / fusion / cost, and `run` for all of it;
- `targets`: the success criteria and their PASS / MISS;
- `report` and `plots`: the markdown page and its images.

Caching and report helpers shared with other benchmarks are in `benchmarks.caching` and `benchmarks.reporting`.
"""
