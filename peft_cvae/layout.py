"""`LoraLayout`: the map between a PEFT LoRA state dict and one flat vector.

A generator works on vectors, PEFT works on state dicts. The layout records everything needed to go back and forth
exactly: the ordered keys as PEFT saves them (`base_model.model.<module>.lora_A.weight`, ...), their shapes and dtype,
and the `LoraConfig` that makes the tensors loadable again. It is JSON-serialisable so it can live in the generator's
`config.json`.

Normalisation statistics also live here, because they are defined by the layout: an element-wise mean over the bank
(`offset`, so the network does not have to reproduce what every checkpoint shares, like LoRA A's common random init)
and one standard deviation per tensor (`scale`, so tensors of very different magnitude weigh the same in the loss).
"""

import os
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict

from .adapter_io import check_supported, load_adapter, lora_config_to_dict, lora_field_problem
from .diffusers_utils import get_diffusers_lora_state_dict, is_diffusers_unet
from .errors import CorruptFileError, EmptyBankError, LayoutMismatchError, NonFiniteError, UnsupportedAdapterError

__all__ = ["LIBRARIES", "LoraLayout", "RunningStatistics", "lora_config_to_dict"]

# LoraConfig fields that do not change what a saved adapter computes: where it came from, and settings of training
# (dropout, the initialisation of the weights, the task head PEFT wraps the model for). Two adapters that differ only
# in these share a layout.
_NON_COMPUTING_FIELDS = (
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "lora_dropout",
    "init_lora_weights",
    "task_type",
    "auto_mapping",
)


def lora_config_differences(mine: LoraConfig | dict, theirs: LoraConfig | dict) -> dict[str, tuple]:
    """`{field: (mine, theirs)}` for every field, in sorted order, in which two LoRA configs differ in what the adapter
    computes (rank, alpha, target modules, rsLoRA, patterns, ...; not `_NON_COMPUTING_FIELDS`)."""
    mine, theirs = lora_config_to_dict(mine), lora_config_to_dict(theirs)
    keys = sorted(set(mine) | set(theirs))
    return {
        key: (mine.get(key), theirs.get(key))
        for key in keys
        if key not in _NON_COMPUTING_FIELDS and key != "peft_type" and mine.get(key) != theirs.get(key)
    }


# What the adapter's base model is, which decides which files a generated adapter is written as:
#   "peft": any model PEFT wraps (transformers, plain torch); PEFT files only.
#   "diffusers": the UNet of a diffusers pipeline; PEFT files and diffusers' pytorch_lora_weights.safetensors.
LIBRARIES = ("peft", "diffusers")


def _check_layout_dict(data: dict) -> None:
    """Raise `CorruptFileError` if a saved layout (from config.json or bank.json) has fields of the wrong type or
    shapes that contradict its LoRA rank; a file edited or corrupted this way must not load as a generator that writes
    unusable adapters."""
    keys, shapes, config = data["keys"], data["shapes"], data["lora_config"]
    problem = None
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        problem = "'keys' that are not a list of strings"
    elif not isinstance(shapes, list) or len(shapes) != len(keys):
        problem = f"{len(keys)} keys but {len(shapes) if isinstance(shapes, list) else 'no list of'} shapes"
    elif len(set(keys)) != len(keys):
        problem = "repeated keys"
    elif not isinstance(shapes, list) or not all(
        isinstance(shape, list)
        and shape
        and all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in shape)
        for shape in shapes
    ):
        problem = f"'shapes' that are not lists of positive integers: {str(shapes)[:200]}"
    elif not isinstance(data["dtype"], str):
        problem = f"dtype={data['dtype']!r}, not a string"
    elif not isinstance(config, dict):
        problem = f"a lora_config of type {type(config).__name__}, not an object"
    elif config.get("peft_type") == "LORA" and not config.get("use_dora"):
        problem = lora_field_problem(config)
        if problem is None and not config.get("rank_pattern") and len(keys) == len(shapes):
            for key, shape in zip(keys, shapes):
                rank_axis = None  # lora_B.bias (lora_bias=True) is (out_features,), with no rank axis
                if key.endswith(".weight"):
                    rank_axis = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
                if rank_axis is not None and (len(shape) <= rank_axis or shape[rank_axis] != config["r"]):
                    problem = f"tensor {key!r} of shape {tuple(shape)}, which does not match its rank r={config['r']}"
                    break
        if problem is None:
            try:
                LoraConfig(**{key: value for key, value in config.items() if key not in ("peft_type", "peft_version")})
            except (TypeError, ValueError) as error:
                problem = f"a lora_config that peft.LoraConfig refuses ({error})"
    if problem is not None:
        raise CorruptFileError(
            f"The saved LoRA layout has {problem}. The file was edited or is corrupted: save the generator or bank "
            "again, or download it again."
        )


@dataclass
class LoraLayout:
    """Ordered keys, shapes and dtype of a LoRA adapter, plus the LoRA config that makes it loadable.

    Build one with `LoraLayout.from_peft_model(model)`, `LoraLayout.from_pretrained(adapter_dir)`,
    `LoraLayout.from_state_dict(state_dict, lora_config)` or, for a LoRA added to a diffusers UNet with
    `unet.add_adapter(config)`, `LoraLayout.from_diffusers(unet)`. `flatten` and `unflatten` are exact inverses.

    `library` says what the base model is: `"peft"` (default; any model PEFT wraps) or `"diffusers"` (a diffusers
    UNet: generated adapters are also written as `pytorch_lora_weights.safetensors` for `pipe.load_lora_weights`).
    """

    keys: list[str]
    shapes: list[list[int]]
    dtype: str
    lora_config: dict
    library: str = "peft"

    def __post_init__(self):
        self.keys = [str(key) for key in self.keys]
        self.shapes = [[int(size) for size in shape] for shape in self.shapes]
        if not self.keys:
            raise EmptyBankError("A LoRA layout needs at least one tensor, but the adapter's state dict is empty.")
        if len(self.keys) != len(self.shapes):
            raise CorruptFileError(f"The layout lists {len(self.keys)} keys but {len(self.shapes)} shapes.")
        if self.dtype not in ("float32", "float16", "bfloat16", "float64"):
            raise UnsupportedAdapterError(f"LoRA tensors of dtype {self.dtype} are not supported; use a float dtype.")
        check_supported(self.lora_config)
        if self.library not in LIBRARIES:
            raise UnsupportedAdapterError(
                f"LoraLayout.library is {self.library!r}; expected one of {list(LIBRARIES)} ('diffusers' for a LoRA "
                "on a diffusers UNet, 'peft' for anything else)."
            )

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, torch.Tensor], lora_config: LoraConfig | dict, library: str = "peft"
    ) -> "LoraLayout":
        """Layout of a PEFT state dict in saved form (keys without adapter name, as `get_peft_model_state_dict`).

        `library="diffusers"` marks the base model as a diffusers UNet (see the class docstring).
        """
        config = lora_config_to_dict(lora_config)
        check_supported(config)
        if not state_dict:
            raise EmptyBankError("The adapter's state dict is empty: there are no LoRA tensors to lay out.")
        dtypes = {str(tensor.dtype).removeprefix("torch.") for tensor in state_dict.values()}
        if len(dtypes) != 1:
            raise UnsupportedAdapterError(f"The adapter mixes dtypes {sorted(dtypes)}; cast it to one dtype first.")
        keys = sorted(state_dict)
        return cls(
            keys=keys,
            shapes=[list(state_dict[key].shape) for key in keys],
            dtype=dtypes.pop(),
            lora_config=config,
            library=library,
        )

    @classmethod
    def from_peft_model(cls, model: PeftModel, adapter_name: str = "default") -> "LoraLayout":
        """Layout of one adapter of a live `PeftModel` (`library="diffusers"` when it wraps a diffusers UNet)."""
        state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
        library = "diffusers" if is_diffusers_unet(model.get_base_model()) else "peft"
        return cls.from_state_dict(state_dict, model.peft_config[adapter_name], library=library)

    @classmethod
    def from_diffusers(cls, model, adapter_name: str = "default") -> "LoraLayout":
        """Layout of a LoRA on a diffusers UNet, added with `unet.add_adapter(LoraConfig(...))` (as diffusers'
        training scripts do) or by `pipe.load_lora_weights`. Keys take PEFT's saved form (`base_model.model.` +
        module), the same as for `peft.get_peft_model(unet, config)`."""
        state_dict = get_diffusers_lora_state_dict(model, adapter_name=adapter_name)
        return cls.from_state_dict(state_dict, model.peft_config[adapter_name], library="diffusers")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs) -> "LoraLayout":
        """Layout of a saved PEFT adapter (local folder or Hub repo id)."""
        config, state_dict = load_adapter(path, **hub_kwargs)
        return cls.from_state_dict(state_dict, config)

    def to_dict(self) -> dict:
        return {
            "keys": self.keys,
            "shapes": self.shapes,
            "dtype": self.dtype,
            "lora_config": self.lora_config,
            "library": self.library,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "LoraLayout":
        missing = [name for name in ("keys", "shapes", "dtype", "lora_config") if name not in data]
        if missing:
            raise CorruptFileError(f"The saved layout lacks the fields {missing}; save the generator or bank again.")
        _check_layout_dict(data)
        return cls(
            keys=data["keys"],
            shapes=data["shapes"],
            dtype=data["dtype"],
            lora_config=data["lora_config"],
            library=data.get("library", "peft"),  # layouts saved before the field existed are plain PEFT
        )

    # ---- sizes --------------------------------------------------------------------------------------------------
    @property
    def sizes(self) -> list[int]:
        """Number of elements of each tensor, in key order."""
        return [int(torch.Size(shape).numel()) for shape in self.shapes]

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(self.sizes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def peft_config(self) -> LoraConfig:
        """A fresh `LoraConfig` equal to the one the layout was built from."""
        fields = {key: value for key, value in self.lora_config.items() if key not in ("peft_type", "peft_version")}
        return LoraConfig(**fields)

    # ---- checks -------------------------------------------------------------------------------------------------
    def check(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Raise `LayoutMismatchError` naming the first key that is missing, unexpected or of another shape."""
        for key, shape in zip(self.keys, self.shapes):
            if key not in state_dict:
                raise LayoutMismatchError(
                    f"The adapter has no tensor {key!r} (expected shape {tuple(shape)}). It was trained on another "
                    "base model or other target modules than this layout; use adapters of the same base model, "
                    f"target modules {self.lora_config.get('target_modules')} and rank r={self.lora_config.get('r')}."
                )
            if list(state_dict[key].shape) != shape:
                raise LayoutMismatchError(
                    f"Tensor {key!r} has shape {tuple(state_dict[key].shape)} but the layout expects {tuple(shape)}. "
                    f"Use adapters of rank r={self.lora_config.get('r')} on the same base model."
                )
        unexpected = sorted(set(state_dict) - set(self.keys))
        if unexpected:
            raise LayoutMismatchError(
                f"The adapter has a tensor {unexpected[0]!r} (shape {tuple(state_dict[unexpected[0]].shape)}) that "
                f"the layout does not know ({len(unexpected)} such tensors in all). It targets more modules than "
                f"{self.lora_config.get('target_modules')}; use adapters with the same target modules."
            )

    def check_config(self, lora_config: LoraConfig | dict) -> None:
        """Raise `LayoutMismatchError` if a LoRA config differs from the layout's in a field that changes the tensors
        or their meaning (rank, alpha, target modules, rslora, ...)."""
        for key, (mine, theirs) in lora_config_differences(self.lora_config, lora_config).items():
            raise LayoutMismatchError(
                f"The adapter's LoraConfig has {key}={theirs!r} but the layout has {key}={mine!r}. All adapters "
                "of a bank must share one LoRA configuration."
            )

    # ---- flat vectors -------------------------------------------------------------------------------------------
    def flatten(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the tensors in key order into one float32 vector of length `numel`."""
        self.check(state_dict)
        vector = torch.cat([state_dict[key].detach().reshape(-1).float().cpu() for key in self.keys])
        # A NaN or Inf makes the sum non-finite, so one cheap reduction (far cheaper than isfinite(vector).all() on 42M
        # numbers) clears the common case; a sum that overflowed only sends us to the exact check.
        if not torch.isfinite(vector.sum()):
            self.check_finite(state_dict)
        return vector

    def check_finite(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Raise `NonFiniteError` naming the first tensor (in key order) that holds a NaN or an Inf."""
        bad = next(
            (
                key
                for key in self.keys
                if not torch.isfinite(state_dict[key].sum())  # finite: no NaN/Inf; else look (it may have overflowed)
                and not torch.isfinite(state_dict[key].float()).all()
            ),
            None,
        )
        if bad is not None:
            raise NonFiniteError(
                f"Tensor {bad!r} contains NaN or Inf. The checkpoint is broken (training diverged?); leave it out."
            )

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector back into a PEFT state dict (layout dtype, contiguous tensors)."""
        if vector.dim() != 1 or vector.numel() != self.numel:
            raise LayoutMismatchError(
                f"Expected a 1-D vector of {self.numel} elements for this layout, got shape {tuple(vector.shape)}."
            )
        pieces = torch.split(vector.detach(), self.sizes)
        return {
            key: piece.reshape(shape).to(self.torch_dtype).contiguous()
            for key, shape, piece in zip(self.keys, self.shapes, pieces)
        }

    # ---- normalisation ------------------------------------------------------------------------------------------
    def tensor_ids(self) -> torch.Tensor:
        """For each element of the flat vector, the index of the tensor it belongs to. Shape (numel,)."""
        return torch.repeat_interleave(torch.arange(len(self.keys)), torch.tensor(self.sizes))

    def statistics(self, vectors: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalisation statistics of a bank of flat vectors (K, numel), already in memory.

        Returns `offset` (numel,), the element-wise mean over the bank, and `scale` (num_tensors,), the standard
        deviation of each tensor's values around that mean. A tensor that never varies gets scale 1. A bank too large
        for memory gives the same numbers through `RunningStatistics`, fed chunk by chunk (`LoraBank.statistics`).
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.numel:
            raise LayoutMismatchError(f"Expected vectors of shape (K, {self.numel}), got {tuple(vectors.shape)}.")
        running = RunningStatistics(self)
        running.update(vectors)
        return running.result(eps)


class RunningStatistics:
    """`LoraLayout.statistics` in one pass over chunks of a bank: the memory is two float64 vectors of size N (the
    running mean and the sum of squared deviations, Welford's update), whatever the number of checkpoints, instead of
    float64 copies of the whole (K, N) bank.

    Welford's update keeps the sum of squared deviations without subtracting two large sums, so it agrees with the
    two-pass computation (mean first, then deviations from it) to float64 rounding.
    """

    def __init__(self, layout: LoraLayout):
        self.layout = layout
        self.count = 0
        self.mean = torch.zeros(layout.numel, dtype=torch.float64)  # (N,)
        self.squared_deviations = torch.zeros(layout.numel, dtype=torch.float64)  # (N,) sum of (x - mean)^2

    def update(self, vectors: torch.Tensor) -> None:
        """Add a chunk of flat vectors (B, N), one row at a time (each row a float64 temporary of size N)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.layout.numel:
            raise LayoutMismatchError(
                f"Expected vectors of shape (B, {self.layout.numel}), got {tuple(vectors.shape)}."
            )
        for row in vectors:
            self.count += 1
            value = row.double()  # (N,)
            delta = value - self.mean  # deviation from the old mean
            self.mean.add_(delta, alpha=1.0 / self.count)
            self.squared_deviations.addcmul_(delta, value.sub_(self.mean))  # x (deviation from the new mean)

    def result(self, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
        """(`offset` (N,), `scale` (num_tensors,)) as `LoraLayout.statistics` defines them."""
        if self.count == 0:
            raise EmptyBankError("Normalisation statistics need at least one checkpoint; none was added.")
        squared = self.squared_deviations / self.count  # (N,) mean squared deviation
        ids = self.layout.tensor_ids()
        per_tensor = torch.zeros(len(self.layout.keys), dtype=torch.float64).index_add_(0, ids, squared)
        scale = (per_tensor / torch.tensor(self.layout.sizes, dtype=torch.float64)).sqrt()
        scale = torch.where(scale > eps, scale, torch.ones_like(scale))
        return self.mean.float(), scale.float()
