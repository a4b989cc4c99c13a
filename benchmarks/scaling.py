"""How peft-cvae's memory and time grow with the size of the LoRA (issue 14's measuring instrument).

For four real PEFT key layouts, from SmolLM2-135M r=8 on q_proj/v_proj (460,800 numbers per checkpoint) to
Llama-3-8B r=16 on every linear layer (41,943,040), it builds a bank of synthetic checkpoints with exactly the keys and
shapes PEFT writes (random values: memory and time do not depend on them), then measures, each layout in a fresh
process so that one measurement's memory never inflates the next:

- bank bytes on disk; generator parameters and file bytes;
- peak RSS of opening the bank, of `PeftCVAEGenerator.from_bank`, and of the first training steps, each as a multiple
  of the bank's size (Linux `VmHWM`, reset between stages through `/proc/self/clear_refs`);
- seconds per training step and activation bytes per LoRA number per sample (the bytes autograd saves for the
  backward pass, counted with `torch.autograd.graph.saved_tensors_hooks` at batch 1 and 2: the difference is one
  sample's share, so fixed costs cancel);
- `generate_adapter` latency (median of 3 after a warm-up call).

Training steps of layouts above `--max-train-numel` numbers are measured on the first layers of the same model only (a
prefix of the layout with the same tensor shapes: bytes per number per sample do not depend on the number of layers)
and scaled, so the benchmark fits this 24 GB machine; the report says which rows were scaled. Growth laws are fitted as
`value = a * N^b` over the four layouts.

    python benchmarks/scaling.py                  # all four layouts, writes benchmarks/results/scaling.json + report
    python benchmarks/scaling.py --report-only    # regenerate docs/benchmarks_scaling.md from the JSON
    python benchmarks/scaling.py --architecture factorised   # the factorised generator: scaling_factorised.json

The default (`--architecture conv`) measures `from_bank(bank, task_memory=False)`; `--architecture factorised` measures
`from_bank(bank, architecture="factorised")` (peft_cvae/factorised.py) and writes its own JSON, which the report shows
as a second table next to the conv one.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/scaling.py` imports benchmarks.bank_streaming for --streaming
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "scaling.json"
ARCHITECTURE_RESULTS = {"conv": RESULTS, "factorised": RESULTS.with_name("scaling_factorised.json")}
REPORT = REPO / "docs" / "benchmarks_scaling.md"


@dataclass(frozen=True)
class ModelShape:
    """The linear layers of a decoder-only transformer, as (module name, in_features, out_features) per layer."""

    name: str
    num_layers: int
    hidden: int
    kv: int  # output features of k_proj / v_proj (grouped-query attention)
    intermediate: int

    def linears(self, modules: tuple[str, ...]) -> list[tuple[str, str, int, int]]:
        shapes = {
            "q_proj": ("self_attn", self.hidden, self.hidden),
            "k_proj": ("self_attn", self.hidden, self.kv),
            "v_proj": ("self_attn", self.hidden, self.kv),
            "o_proj": ("self_attn", self.hidden, self.hidden),
            "gate_proj": ("mlp", self.hidden, self.intermediate),
            "up_proj": ("mlp", self.hidden, self.intermediate),
            "down_proj": ("mlp", self.intermediate, self.hidden),
        }
        return [
            (f"model.layers.{layer}.{shapes[module][0]}.{module}", module, shapes[module][1], shapes[module][2])
            for layer in range(self.num_layers)
            for module in modules
        ]


SMOLLM2 = ModelShape("SmolLM2-135M", num_layers=30, hidden=576, kv=192, intermediate=1536)
LLAMA3_8B = ModelShape("Llama-3-8B", num_layers=32, hidden=4096, kv=1024, intermediate=14336)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Layout:
    label: str
    model: ModelShape
    rank: int
    modules: tuple[str, ...]

    def state_dict_shapes(self, num_layers: int | None = None) -> dict[str, tuple[int, int]]:
        model = self.model if num_layers is None else ModelShape(**{**asdict(self.model), "num_layers": num_layers})
        shapes = {}
        for path, _, fan_in, fan_out in model.linears(self.modules):
            shapes[f"base_model.model.{path}.lora_A.weight"] = (self.rank, fan_in)
            shapes[f"base_model.model.{path}.lora_B.weight"] = (fan_out, self.rank)
        return shapes

    def numel(self, num_layers: int | None = None) -> int:
        return sum(a * b for a, b in self.state_dict_shapes(num_layers).values())


LAYOUTS = [
    Layout("SmolLM2-135M r=8 q,v", SMOLLM2, 8, ("q_proj", "v_proj")),
    Layout("SmolLM2-135M r=16 all-linear", SMOLLM2, 16, ALL_LINEAR),
    Layout("Llama-3-8B r=16 q,v", LLAMA3_8B, 16, ("q_proj", "v_proj")),
    Layout("Llama-3-8B r=16 all-linear", LLAMA3_8B, 16, ALL_LINEAR),
]


# ---- the worker: one layout, one fresh process --------------------------------------------------------------------
def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as file:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        file.write("5")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def random_bank(layout: Layout, num_layers: int | None, num_tasks: int, per_task: int):
    """`(bank, checkpoint)`: an in-memory bank of `per_task` random checkpoints (scale 0.01) and one random 384-d
    condition for each of `num_tasks` tasks, and the function that drew them, which goes on with the same seeded
    stream (`bank_streaming.write_bank` draws its further checkpoints from it)."""
    import torch
    from peft import LoraConfig

    from peft_cvae import LoraBank, LoraLayout

    shapes = layout.state_dict_shapes(num_layers)
    generator = torch.Generator().manual_seed(0)

    def checkpoint():
        return {key: torch.randn(shape, generator=generator) * 0.01 for key, shape in shapes.items()}

    config = LoraConfig(r=layout.rank, lora_alpha=2 * layout.rank, target_modules=list(layout.modules))
    bank = LoraBank(LoraLayout.from_state_dict(checkpoint(), config))
    for task in range(num_tasks):
        for step in range(per_task):
            bank.add_checkpoint(f"task{task}", checkpoint(), step=step)
        bank.set_condition(f"task{task}", torch.randn(384, generator=generator))
    return bank, checkpoint


def _build_bank(layout: Layout, num_layers: int | None, num_tasks: int, per_task: int, folder: Path):
    bank, _ = random_bank(layout, num_layers, num_tasks, per_task)
    bank.save_pretrained(folder)


def _saved_bytes(generator, params, conditions) -> int:
    """Bytes autograd saves for the backward pass of one loss computation."""
    import torch

    total = 0
    seen = set()

    def pack(tensor):
        nonlocal total
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        generator(params=params, condition=conditions)
    return total


def worker(layout: Layout, num_layers: int | None, args, train: bool = True) -> dict:
    import torch

    from peft_cvae import LoraBank, PeftCVAEGenerator, train_generator

    torch.set_num_threads(args.threads)
    record = {"numel": layout.numel(num_layers), "num_layers": num_layers or layout.model.num_layers}
    with tempfile.TemporaryDirectory(prefix="peft-cvae-scaling-") as scratch:
        bank_folder = Path(scratch) / "bank"
        _build_bank(layout, num_layers, args.tasks, args.checkpoints_per_task, bank_folder)
        record["bank_bytes"] = sum(file.stat().st_size for file in bank_folder.rglob("*") if file.is_file())
        record["num_checkpoints"] = args.tasks * args.checkpoints_per_task
        import gc

        gc.collect()
        record["baseline_rss_mb"] = _rss_mb("VmRSS")

        _reset_peak_rss()
        bank = LoraBank.from_pretrained(bank_folder)
        record["open_peak_rss_mb"] = _rss_mb("VmHWM")

        _reset_peak_rss()
        architecture = getattr(args, "architecture", "conv")
        # The plain generator, as the recorded rows were measured (task memory, from_bank's default since, adds one
        # checkpoint per task to the generator and a pass over the bank).
        overrides = {"task_memory": False, **({} if architecture == "conv" else {"architecture": architecture})}
        generator = PeftCVAEGenerator.from_bank(bank, **overrides)
        record["from_bank_peak_rss_mb"] = _rss_mb("VmHWM")
        record["generator_parameters"] = generator.num_parameters()
        record["generator_numel_with_buffers"] = sum(t.numel() for t in generator.state_dict().values())

        if not train:  # a full-size generator for its size and latency only
            return _size_and_latency(generator, Path(scratch), record)
        params = bank.vectors()[:2]
        conditions = bank.checkpoint_conditions()[:2]
        generator.train()
        saved = [_saved_bytes(generator, params[:batch], conditions[:batch]) for batch in (1, 2)]
        record["saved_bytes_batch1"], record["saved_bytes_batch2"] = saved
        record["activation_bytes_per_number_per_sample"] = (saved[1] - saved[0]) / record["numel"]
        del params, conditions

        steps = args.train_steps
        epochs = math.ceil(steps * args.batch_size / len(bank))
        _reset_peak_rss()
        start = time.perf_counter()
        # every epoch runs (no early stopping), so that train_steps below counts the steps that were timed
        train_generator(
            generator, bank, epochs=epochs, batch_size=args.batch_size, show_progress=False, early_stopping_patience=0
        )
        seconds = time.perf_counter() - start
        record["train_peak_rss_mb"] = _rss_mb("VmHWM")
        record["train_steps"] = epochs * math.ceil(len(bank) / args.batch_size)
        record["seconds_per_step"] = seconds / record["train_steps"]
        record["train_batch_size"] = args.batch_size

        return _size_and_latency(generator, Path(scratch), record)


def _size_and_latency(generator, scratch: Path, record: dict) -> dict:
    import torch

    generator.eval()
    generator_folder = scratch / "generator"
    generator.save_pretrained(generator_folder)
    record["generator_file_bytes"] = sum(f.stat().st_size for f in generator_folder.rglob("*") if f.is_file())
    with torch.no_grad():
        generator.generate_adapter("task0", temperature=0.0)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            generator.generate_adapter("task0", temperature=0.0)
            times.append(time.perf_counter() - start)
    record["generate_seconds"] = statistics.median(times)
    return record


# ---- the driver ---------------------------------------------------------------------------------------------------
def measure(args) -> dict:
    results = {"settings": vars(args).copy(), "layouts": []}
    streaming_only = ("streaming", "scratch", "stream_checkpoints", "stream_tasks", "stream_parts")
    streaming_only += ("storage_checkpoints", "stream_steps")  # --streaming's own options: not a worker's
    for key in ("report_only", "worker", "worker_layers", "no_train", "layouts", *streaming_only):
        results["settings"].pop(key, None)
    for layout in LAYOUTS:
        if args.layouts and layout.label not in args.layouts:
            continue
        full = layout.numel()
        num_layers = None
        if full > args.max_train_numel:  # measure on a prefix of layers with the same tensor shapes, then scale
            per_layer = full // layout.model.num_layers
            num_layers = max(1, args.max_train_numel // per_layer)
        where = f" (training measured on {num_layers} of {layout.model.num_layers} layers)" if num_layers else ""
        print(f"{layout.label}: {full:,} numbers per checkpoint{where}")
        record = _run_worker(layout, num_layers, results["settings"])
        record.update(label=layout.label, full_numel=full, scaled=num_layers is not None)
        if num_layers:  # size and latency of the full-size generator, from a 2-checkpoint bank
            full_size = _run_worker(
                layout, None, {**results["settings"], "tasks": 1, "checkpoints_per_task": 2}, "--no-train"
            )
            for key in (
                "generator_parameters",
                "generator_file_bytes",
                "generate_seconds",
                "generator_numel_with_buffers",
            ):
                record[key] = full_size[key]
        results["layouts"].append(record)
        print(json.dumps(record))
    results["growth"] = growth_laws(results["layouts"])
    return results


def _run_worker(layout: Layout, num_layers: int | None, settings: dict, *extra: str) -> dict:
    """Run `worker` in a fresh process (its peak memory is its own) and return its record."""
    command = [sys.executable, __file__, "--worker", layout.label, "--worker-layers", str(num_layers or 0), *extra]
    command += [f"--{key.replace('_', '-')}={value}" for key, value in settings.items()]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def growth_laws(records: list[dict]) -> dict:
    """Least-squares fit of log(value) = log(a) + b log(N) for each measured quantity (N = numbers measured)."""
    laws = {}
    full_size = ("generator_parameters", "generate_seconds")  # always measured on the full layout
    for key in (*full_size, "seconds_per_step", "activation_bytes_per_number_per_sample"):
        size = "full_numel" if key in full_size else "numel"
        points = [(math.log(r[size]), math.log(r[key])) for r in records if r.get(key, 0) > 0]
        if len(points) < 2:
            continue
        mean_x = statistics.fmean(x for x, _ in points)
        mean_y = statistics.fmean(y for _, y in points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        laws[key] = {"exponent": slope, "coefficient": math.exp(mean_y - slope * mean_x)}
    return laws


COLUMNS = [
    ("layout", lambda r: r["label"]),
    ("N", lambda r: f"{r['full_numel']:,}"),
    ("bank measured", lambda r: f"{r['bank_bytes'] / 1e6:.0f} MB ({r['num_checkpoints']} ckpts)"),
    ("generator parameters", lambda r: f"{r['generator_parameters']:,}"),
    ("generator file / one checkpoint", lambda r: f"{r['generator_file_bytes'] / (4 * r['full_numel']):.2f} x"),
    ("open bank", lambda r: _peak_over_bank(r, "open_peak_rss_mb")),
    ("from_bank", lambda r: _peak_over_bank(r, "from_bank_peak_rss_mb")),
    ("first training steps", lambda r: _peak_over_bank(r, "train_peak_rss_mb")),
    ("activation B / number / sample", lambda r: f"{r['activation_bytes_per_number_per_sample']:.0f}"),
    (
        "activations at batch 16",
        lambda r: f"{r['activation_bytes_per_number_per_sample'] * r['full_numel'] * 16 / 1e9:.1f} GB",
    ),
    ("s / step", lambda r: f"{r['seconds_per_step'] * r['full_numel'] / r['numel']:.2f}"),
    ("generate_adapter", lambda r: f"{r['generate_seconds']:.3f} s"),
]


def _peak_over_bank(record: dict, key: str) -> str:
    """A stage's peak RSS above the process's size before the bank was opened: MB, and as a multiple of the bank."""
    grown = record[key] - record["baseline_rss_mb"]
    return f"{grown:,.0f} MB ({grown / (record['bank_bytes'] / 2**20):.1f} x)"


def _table(results: dict) -> list[str]:
    return [
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(cell(record) for _, cell in COLUMNS) + " |" for record in results["layouts"]),
    ]


def _factorised_section() -> str:
    """The factorised generator's table, when `--architecture factorised` has been run."""
    path = ARCHITECTURE_RESULTS["factorised"]
    if not path.is_file():
        return ""
    results = json.loads(path.read_text())
    laws = "\n".join(f"- `{key}` ~ N^{law['exponent']:.2f}" for key, law in results.get("growth", {}).items())
    return f"""
## The factorised generator

`python benchmarks/scaling.py --architecture factorised`: `from_bank(bank, architecture="factorised")` (tokens per
row block with layer / module / A-B / block embeddings, one shared head; peft_cvae/factorised.py), same banks and
settings, from `benchmarks/results/scaling_factorised.json`.

{chr(10).join(_table(results))}

Growth laws fitted over the layouts:
{laws}
"""


def write_report(results: dict) -> None:
    table = _table(results)
    scaled = [f"{r['label']} on {r['num_layers']} layers" for r in results["layouts"] if r["scaled"]]
    laws = "\n".join(f"- `{key}` ~ N^{law['exponent']:.2f}" for key, law in results.get("growth", {}).items())
    streaming = ""
    if "streaming" in results:
        from benchmarks.bank_streaming import report_section

        streaming = report_section(results["streaming"], results["layouts"])
    settings = results["settings"]
    text = f"""# Scaling: memory and time against the size of the LoRA

Generated by `python benchmarks/scaling.py` from `benchmarks/results/scaling.json`; do not edit by hand.

Synthetic banks with real PEFT key layouts ({settings["tasks"]} tasks x {settings["checkpoints_per_task"]}
checkpoints), the plain generator (`PeftCVAEGenerator.from_bank(bank, task_memory=False)`), training at batch
{settings["batch_size"]} on {settings["threads"]} CPU thread(s), each layout in a fresh process.

- *open bank*, *from_bank*, *first training steps*: each stage's peak RSS above the process's size before the bank
  was opened, in MB and as a multiple of the bank (so *from_bank* includes the opened bank itself).
- *activation B / number / sample*: bytes autograd saves for the backward pass, per LoRA number, per sample
  (batch 2 minus batch 1); *at batch 16* is that x N x 16.
- Bank, memory and training columns of some layouts were measured on a prefix of the model's layers (same tensor
  shapes, fewer layers) to fit this machine, with seconds per step scaled by the ratio of numbers:
  {", ".join(scaled) or "none"}. Generator size and `generate_adapter` latency are always of the full layout.

{chr(10).join(table)}

Growth laws fitted over the layouts (N = numbers measured per checkpoint):
{laws}
{_factorised_section()}{streaming}"""
    REPORT.write_text(text, encoding="utf-8")
    print(f"Wrote {REPORT}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=4, help="tasks in each synthetic bank")
    parser.add_argument("--checkpoints-per-task", type=int, default=4, help="checkpoints per task")
    parser.add_argument("--batch-size", type=int, default=2, help="generator training batch")
    parser.add_argument("--train-steps", type=int, default=4, help="training steps timed per layout")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument(
        "--max-train-numel", type=int, default=8_000_000, help="measure larger layouts on a prefix of layers"
    )
    parser.add_argument("--report-only", action="store_true", help="regenerate the report from the saved JSON")
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="measure banks streamed from disk (benchmarks/bank_streaming.py) and add them to the saved JSON",
    )
    parser.add_argument(
        "--stream-checkpoints",
        type=int,
        nargs="+",
        default=[26, 103, 512],
        help="sizes of the streamed banks, in SmolLM2 r=16 all-linear checkpoints (19.5 MB each)",
    )
    parser.add_argument("--stream-tasks", type=int, default=16, help="tasks of each streamed bank")
    parser.add_argument(
        "--stream-parts",
        nargs="+",
        choices=["banks", "storage", "read"],
        default=["banks", "storage", "read"],
        help="which streaming measurements to (re)run; the others keep their saved results",
    )
    parser.add_argument(
        "--storage-checkpoints", type=int, default=12, help="checkpoints of the safetensors-vs-Arrow comparison"
    )
    parser.add_argument("--stream-steps", type=int, default=10, help="training steps measured on a streamed bank")
    parser.add_argument("--scratch", default=None, help="folder for the streamed banks (default: the temp folder)")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURE_RESULTS), default="conv", help="generator")
    parser.add_argument("--layouts", nargs="*", default=None, help="labels of LAYOUTS to measure (default: all)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-layers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--no-train", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        layout = next(layout for layout in LAYOUTS if layout.label == args.worker)
        print(json.dumps(worker(layout, args.worker_layers or None, args, train=not args.no_train)))
        return 0
    if args.report_only:
        write_report(json.loads(RESULTS.read_text()))
        return 0
    if args.streaming:
        from benchmarks.bank_streaming import measure_streaming

        results = json.loads(RESULTS.read_text())
        settings = results.get("streaming", {}).get("settings", {})
        results["streaming"] = measure_streaming(args, results.get("streaming"))
        if "banks" in args.stream_parts:
            keys = ("stream_checkpoints", "stream_tasks", "stream_steps", "batch_size")
            settings = {**settings, **{key: getattr(args, key) for key in keys}}
        results["streaming"]["settings"] = settings
        RESULTS.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        write_report(results)
        return 0
    results = measure(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    ARCHITECTURE_RESULTS[args.architecture].write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.architecture != "conv":
        results = json.loads(RESULTS.read_text())  # the report's first table stays the conv one
    write_report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
