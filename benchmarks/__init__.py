"""The benchmarks of peft-cvae: each entry script (`lora_generation.py`, `bigbench_zero_shot.py`, ...) writes JSON to
`benchmarks/results/` and a markdown report to `docs/`. A package, so that entries share their settings, scoring and
report code by import instead of by copy; run an entry from the repository root, e.g.
`python benchmarks/lora_generation.py --quick`.
"""
