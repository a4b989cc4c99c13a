"""Share a generator, a generated adapter and a LoRA bank on the Hugging Face Hub, and load them back.

    python examples/hub_push_and_load.py --quick    # a local Hub server on 127.0.0.1 and tiny models: ~25 s
    python examples/hub_push_and_load.py            # the real Hub: needs a token (`hf auth login` or HF_TOKEN)

What it pushes (the generator and bank of `llm_domain_adapters.py`, which is run first if they are missing):

1. the generator, with `generator.push_to_hub(repo_id)`: config.json, model.safetensors and a model card written by
   peft-cvae (library_name peft-cvae, base model, target modules, rank, tasks, task encoder, training figures,
   usage). It loads back with `PeftCVAEGenerator.from_pretrained(repo_id)` and, once `peft_cvae` is imported, with
   `transformers.AutoModel.from_pretrained(repo_id)`. `trust_remote_code=True` without the package is not supported.
2. a generated adapter, with `adapter.push_to_hub(repo_id)`: a standard PEFT adapter repo with a PEFT-style card, so
   `peft.PeftModel.from_pretrained(base_model, repo_id)` loads it without peft-cvae.
3. the bank, with `bank.push_to_hub(repo_id)`, as a dataset repo; `LoraBank.from_pretrained(repo_id)` reads it.

Each round trip is checked: the same weights, the same generated adapter, the same logits as from the local folder.

In `--quick` mode the "Hub" is the `LocalHubServer` of the test suite (tests/hub_server.py, standard library only):
the example starts it, points `HF_ENDPOINT` at it and uses a dummy token, so the real huggingface_hub, transformers
and peft clients talk HTTP to 127.0.0.1 and nothing leaves the machine. Run it from the repository root. In real mode
the repos are created private under your user name (pass --public to change that); delete them afterwards with
`huggingface_hub.delete_repo`.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a local Hub server and tiny models, offline")
    parser.add_argument("--workdir", default="~/.cache/peft_cvae/examples/llm", help="llm_domain_adapters' output")
    parser.add_argument("--name", default="peft-cvae-example", help="prefix of the repo names")
    parser.add_argument("--public", action="store_true", help="create public repos (default: private)")
    return parser.parse_args(argv)


def start_local_hub():
    """Start tests/hub_server.py's server and point the Hugging Face clients at it. This must happen before
    huggingface_hub is imported: it reads HF_ENDPOINT once, at import time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `tests`
    from tests.hub_server import LocalHubServer

    hub = LocalHubServer(username="user").start()
    hf_home = tempfile.mkdtemp(prefix="peft-cvae-hub-example-")
    os.environ.update(HF_ENDPOINT=hub.url, HF_TOKEN="hf_dummy", HF_HUB_DISABLE_XET="1", HF_HOME=hf_home)
    os.environ.pop("HF_HUB_OFFLINE", None)
    print(f"Local Hub server on {hub.url} (HF_HOME={hf_home})")
    return hub


def main(argv=None) -> dict:
    args = parse_args(argv)
    hub = start_local_hub() if args.quick else None

    import torch
    from huggingface_hub import HfApi, ModelCard
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    from peft_cvae import LoraBank, PeftCVAEGenerator

    workdir = Path(args.workdir).expanduser()
    if not (workdir / "generator" / "config.json").is_file():
        print(f"No generator in {workdir}: running llm_domain_adapters.py first")
        import llm_domain_adapters

        llm_domain_adapters.main(["--output", str(workdir), *(["--quick"] if args.quick else [])])
    user = HfApi().whoami()["name"]
    private = not args.public
    generator_repo, adapter_repo, bank_repo = (
        f"{user}/{args.name}-{kind}" for kind in ("generator", "adapter", "bank")
    )

    # 1. The generator: push, then load it back two ways and check it generates the same adapter.
    generator = PeftCVAEGenerator.from_pretrained(workdir / "generator")
    generator.push_to_hub(generator_repo, private=private)
    from_hub = PeftCVAEGenerator.from_pretrained(generator_repo)
    auto = AutoModel.from_pretrained(generator_repo)  # works because importing peft_cvae registered the classes
    task = generator.config.task_names[0]
    local_adapter = generator.generate_adapter(task, seed=0)
    for loaded in (from_hub, auto):
        adapter = loaded.generate_adapter(task, seed=0)
        assert all(torch.equal(adapter.state_dict[key], local_adapter.state_dict[key]) for key in adapter.state_dict)
    card = ModelCard.load(generator_repo)
    print(
        f"Pushed the generator to {generator_repo}; card: library_name={card.data.library_name}, tags={card.data.tags}"
    )
    print(f"  PeftCVAEGenerator.from_pretrained and AutoModel.from_pretrained({generator_repo!r}) generate the same")

    # 2. A generated adapter: a plain PEFT repo that PeftModel.from_pretrained loads without peft-cvae.
    adapter = from_hub.generate_adapter(task, seed=0)
    adapter.push_to_hub(adapter_repo, private=private)
    base_path = generator.config.lora_layout.lora_config["base_model_name_or_path"]
    tokens = torch.arange(1, 13)[None]  # (1, 12) token ids
    with torch.no_grad():
        pulled = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter_repo)
        pulled_logits = pulled(tokens).logits
        with tempfile.TemporaryDirectory() as folder:
            adapter.save_pretrained(folder)
            local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder)
            local_logits = local(tokens).logits
    assert torch.equal(pulled_logits, local_logits)
    card = ModelCard.load(adapter_repo)
    print(f"Pushed a generated {task!r} adapter to {adapter_repo}; card: library_name={card.data.library_name}")
    print(f"  PeftModel.from_pretrained(base, {adapter_repo!r}) gives the same logits as the local folder")

    # 3. The bank, as a dataset repo.
    bank = LoraBank.from_pretrained(workdir / "bank")
    bank.push_to_hub(bank_repo, private=private)
    pulled_bank = LoraBank.from_pretrained(bank_repo)
    assert torch.equal(pulled_bank.vectors(), bank.vectors()) and pulled_bank.task_names == bank.task_names
    print(
        f"Pushed the bank ({len(bank)} checkpoints) to the dataset repo {bank_repo}; LoraBank.from_pretrained reads it"
    )

    if hub is not None:
        hub.stop()
    return {"generator": generator_repo, "adapter": adapter_repo, "bank": bank_repo}


if __name__ == "__main__":
    main()
