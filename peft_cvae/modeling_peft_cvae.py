"""`PeftCVAEGenerator`: a conditional VAE over flattened LoRA checkpoints (after ICM-LoRA, 2025).

Two networks, chosen by `config.architecture`: `"conv"` (below; the default, and what every generator saved before
the field existed is) and `"factorised"` (`peft_cvae/factorised.py`: row-block tokens with layer / module / A-B /
block embeddings and one head shared by all layers, whose size does not grow with N). Both share everything else in
this file: normalisation, the optional canonical form of the LoRA factors (`peft_cvae/canonical.py`, applied to the
raw vectors before normalisation), the task memory (float32 or bfloat16), the loss, saving and loading.

How a LoRA checkpoint becomes something a small network can model
------------------------------------------------------------------
1. `LoraLayout.flatten` turns the PEFT state dict into one vector of N numbers (N = 460,800 for SmolLM2-135M with
   r=8 on q_proj, v_proj).
2. Normalisation: subtract the bank's element-wise mean (`param_offset`, a persistent buffer) and divide by one
   standard deviation per tensor (`param_scale`). The mean carries what all checkpoints share (LoRA A's common random
   init, the average task), so the network models only what makes tasks differ, and every tensor weighs the same in
   the loss.
3. Patches: every tensor is cut into patches of `patch_size` numbers (the last one zero-padded), giving a sequence of
   L tokens (L = 1,800 for the example above). No token mixes two tensors.

The network
-----------
Encoder q(z | x, c): a 1-D convolution with kernel = stride = patch_size embeds each patch into `hidden_channels`
(written as reshape + linear, which is the same map and much faster on CPU); a learned position embedding says which
patch of which tensor a token is; the projected condition c is added to every token (the same as concatenating c to the
input as extra channels); then `num_layers` residual blocks of GroupNorm -> SiLU -> Conv1d(kernel_size) run along the
token axis; the tokens are averaged and mapped to the mean and log-variance of z.

Decoder p(x | z, c): z and c are projected to `hidden_channels` and added to the decoder's own position embedding at
every token, `num_layers` residual conv blocks follow, and a linear map turns each token back into a patch (the
transpose of the patch embedding). The output layer starts at zero, so an untrained generator writes the bank mean.

Task memory (`config.task_memory`): the training tasks' mean checkpoints, mixed by condition similarity and added to
the decoder's output. With `config.memory_holdout` > 0, training hides each sample's own task from that mix with this
probability (leave-one-task-out) and the decoder gets the memory's best similarity as an input, so it learns to
correct a mix of other tasks, what an unseen task gets (issue 13); 0 keeps the original behaviour bit for bit.

Loss = mean squared error in normalised space + kl_weight * KL(q(z | x, c) || N(0, I)), kl_weight = 0.005 as in
ICM-LoRA. Generation samples z ~ N(0, temperature^2 I) (temperature 0 gives the mean, z = 0) and decodes.

Why not a plain stack of strided convolutions over the raw N-long vector: measured on SmolLM2 checkpoints, it
collapsed to the global mean, while models over per-tensor patches learned (DESIGN.md §7). Why no dense layer over the
whole vector: a (N x hidden) matrix would be larger than the bank it replaces. Here the size grows with L x
hidden_channels (position embeddings) and hidden_channels^2 x kernel_size x num_layers (convolutions), plus the N-long
mean buffer, i.e. about one checkpoint.

Size of this file (~610 lines, over the ~400 guideline): the network (~200 lines with this docstring), the flat <->
patch maps, and the `from_pretrained` / `save_pretrained` / `push_to_hub` overrides, which transformers requires on the
class itself; their helpers live in `generator_files.py`, generation in `generation.py`.
"""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .canonical import canonicalize
from .condition_similarity import condition_similarity
from .configuration_peft_cvae import PeftCVAEConfig
from .constants import (
    CARD_NAME,
)
from .errors import ConditionError, CorruptFileError, InvalidConfigError, LayoutMismatchError
from .factorised import FactorisedDecoder, FactorisedEncoder, TokenLayout
from .file_utils import atomic_directory, folder_lock
from .generation import GenerateAdapterMixin
from .generator_files import HUB_FILE_KWARGS, generator_folder, read_generator
from .hub import push_folder_to_hub
from .integrity import VerifiedFolder, write_integrity_record
from .model_card import generator_model_card, training_summary

__all__ = ["PeftCVAEGenerator", "PeftCVAEOutput"]

MEMORY_CHUNK = 1 << 18  # columns of a compact task memory widened to float32 at once


@dataclass
class PeftCVAEOutput(ModelOutput):
    """Output of `PeftCVAEGenerator.forward`.

    Args:
        loss: reconstruction_loss + kl_weight * kl_loss.
        reconstruction_loss: mean squared error between input and reconstruction, in normalised space.
        kl_loss: KL(q(z | x, c) || N(0, I)), summed over latent dimensions, averaged over the batch.
        reconstruction: the decoded flat vectors in normalised space, shape (B, N).
        latent_mean, latent_log_variance: parameters of q(z | x, c), shape (B, latent_size).
        generated: with `return_generated=True`, what the generator writes for each condition at z = 0 (functional
            offset included), in normalised space, shape (B, N).
        offset_reconstruction: with a functional offset, the reconstruction plus the offset (what the generator
            writes for this latent), in normalised space, shape (B, N); None without one. Computed in `forward`, so a
            functional loss on it trains the offset under data-parallel training too.
    """

    loss: torch.Tensor | None = None
    reconstruction_loss: torch.Tensor | None = None
    kl_loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    latent_mean: torch.Tensor | None = None
    latent_log_variance: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    offset_reconstruction: torch.Tensor | None = None


def _num_groups(channels: int) -> int:
    """The largest of 8, 4, 2, 1 that divides `channels`."""
    return next(groups for groups in (8, 4, 2, 1) if channels % groups == 0)


class ConvBlock(nn.Module):
    """Pre-norm residual block along the token axis: x + Conv1d(SiLU(GroupNorm(x)))."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.norm = nn.GroupNorm(_num_groups(channels), channels)
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, C, L)
        return hidden + self.conv(F.silu(self.norm(hidden)))


class ConditionProjection(nn.Module):
    """LayerNorm then linear: task vectors come at any scale (sentence embeddings ~1, LM hidden states ~100)."""

    def __init__(self, condition_size: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(condition_size)
        self.linear = nn.Linear(condition_size, channels)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:  # (B, cond) -> (B, C)
        return self.linear(self.norm(condition))


class PeftCVAEEncoder(nn.Module):
    """q(z | x, c): patches (B, L, P) and condition (B, cond) -> mean and log-variance of z, each (B, Z)."""

    def __init__(self, config: PeftCVAEConfig):
        super().__init__()
        channels = config.hidden_channels
        self.patch_embedding = nn.Linear(config.patch_size, channels)
        self.position_embedding = nn.Parameter(torch.zeros(channels, config.num_tokens))
        self.condition_projection = ConditionProjection(config.condition_size, channels)
        self.blocks = nn.ModuleList(ConvBlock(channels, config.kernel_size) for _ in range(config.num_layers))
        self.norm = nn.GroupNorm(_num_groups(channels), channels)
        self.to_latent = nn.Linear(channels, 2 * config.latent_size)

    def forward(self, patches: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.patch_embedding(patches).transpose(1, 2)  # (B, C, L)
        hidden = hidden + self.position_embedding + self.condition_projection(condition)[:, :, None]
        for block in self.blocks:
            hidden = block(hidden)
        pooled = F.silu(self.norm(hidden)).mean(dim=2)  # (B, C)
        mean, log_variance = self.to_latent(pooled).chunk(2, dim=-1)  # (B, Z) each
        return mean, log_variance


class PeftCVAEDecoder(nn.Module):
    """p(x | z, c): latent (B, Z) and condition (B, cond) -> patches (B, L, P) in normalised space."""

    def __init__(self, config: PeftCVAEConfig):
        super().__init__()
        channels = config.hidden_channels
        self.latent_projection = nn.Linear(config.latent_size, channels)
        self.condition_projection = ConditionProjection(config.condition_size, channels)
        self.position_embedding = nn.Parameter(torch.zeros(channels, config.num_tokens))
        self.blocks = nn.ModuleList(ConvBlock(channels, config.kernel_size) for _ in range(config.num_layers))
        self.norm = nn.GroupNorm(_num_groups(channels), channels)
        self.to_patches = nn.Linear(channels, config.patch_size)
        self.to_patches.is_output_layer = True  # zero-initialised, see PeftCVAEGenerator._init_weights
        self.memory_projection = MemorySimilarityProjection(channels) if config.memory_holdout > 0 else None

    def forward(
        self, latent: torch.Tensor, condition: torch.Tensor, memory_similarity: torch.Tensor | None = None
    ) -> torch.Tensor:
        task_and_sample = self.latent_projection(latent) + self.condition_projection(condition)  # (B, C)
        if self.memory_projection is not None:
            task_and_sample = task_and_sample + self.memory_projection(memory_similarity)
        hidden = self.position_embedding + task_and_sample[:, :, None]  # (B, C, L)
        for block in self.blocks:
            hidden = block(hidden)
        return self.to_patches(F.silu(self.norm(hidden)).transpose(1, 2))  # (B, L, P)


class MemorySimilarityProjection(nn.Module):
    """The task memory's best cosine similarity (B,) -> a (B, C) term of the decoder's context
    (`config.memory_holdout` > 0): 1 says "this condition's own task is in the memory", lower values say how far the
    nearest stored task is, so the decoder knows whether to leave the memory's mix alone or correct it."""

    def __init__(self, channels: int):
        super().__init__()
        self.linear = nn.Linear(1, channels)

    def forward(self, similarity: torch.Tensor | None) -> torch.Tensor:  # (B,) -> (B, C)
        if similarity is None:
            raise ValueError("This decoder was built with memory_holdout > 0 and needs the memory's similarity.")
        return self.linear(similarity[:, None].to(self.linear.weight.dtype))


class TaskMemory(nn.Module):
    """The training tasks' mean checkpoints (normalised), mixed by how close a condition is to each task's condition.

    Used when `config.task_memory` is set: a condition equal to a training task's gives (almost) that task's mean
    once the temperature has been learned; a new condition gives a similarity-weighted average of the task means.
    `hidden_tasks` (training with `config.memory_holdout` > 0) masks a sample's own task out of the softmax, so the
    mix is what an unseen task would get: the other tasks' means.
    """

    def __init__(self, num_tasks: int, numel: int, dtype: torch.dtype = torch.float32, centered: bool = False):
        super().__init__()
        self.centered = centered  # config.memory_centered: cosines relative to the tasks' mean condition
        # (T, N), persistent: saved and reloaded; bfloat16 halves it (config.task_memory_dtype)
        self.register_buffer("task_means", torch.zeros(num_tasks, numel, dtype=dtype))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def weights(
        self, condition: torch.Tensor, task_conditions: torch.Tensor, hidden_tasks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixing weights (B, T) and the best cosine similarity to a task the sample may use (B,).

        `hidden_tasks` (B,) int64: the task index each sample may not use, -1 for none."""
        similarity = condition_similarity(condition, task_conditions, self.centered)  # (B, T)
        logits = similarity / self.log_temperature.exp()  # (B, T)
        if hidden_tasks is not None:
            columns = torch.arange(similarity.shape[1], device=similarity.device)
            hidden = columns[None, :] == hidden_tasks.to(similarity.device)[:, None]  # (B, T), no column for -1
            # masked after the division: -inf / temperature would give the temperature a NaN gradient
            logits = logits.masked_fill(hidden, -math.inf)
            similarity = similarity.masked_fill(hidden, -math.inf)
        return torch.softmax(logits, dim=-1), similarity.max(dim=-1).values  # (B, T), (B,)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        """Weights (B, T) -> the weighted sum of the task means (B, N), in the weights' dtype."""
        if self.task_means.dtype == weights.dtype:
            return weights @ self.task_means  # (B, N)
        # A compact memory is widened a slice of columns at a time: never a full-precision (T, N) copy.
        mixed = weights.new_empty(weights.shape[0], self.task_means.shape[1])  # (B, N)
        for start in range(0, self.task_means.shape[1], MEMORY_CHUNK):
            columns = slice(start, start + MEMORY_CHUNK)
            mixed[:, columns] = weights @ self.task_means[:, columns].to(weights)
        return mixed

    def forward(
        self, condition: torch.Tensor, task_conditions: torch.Tensor, hidden_tasks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The mixed task means (B, N)."""
        return self.mix(self.weights(condition, task_conditions, hidden_tasks)[0])


class PeftCVAEGenerator(GenerateAdapterMixin, PreTrainedModel):
    """A conditional VAE that generates PEFT LoRA adapters from task vectors.

    Build one from a `LoraBank` with `PeftCVAEGenerator.from_bank(bank)`, train it with
    `peft_cvae.train_generator`, then call `generate_adapter(task)`. Saved and loaded like any transformers model
    (`save_pretrained`, `from_pretrained`, `AutoModel.from_pretrained`).
    """

    config_class = PeftCVAEConfig
    base_model_prefix = "generator"
    main_input_name = "params"
    _no_split_modules = ["ConvBlock", "TrunkBlock"]

    def __init__(self, config: PeftCVAEConfig):
        super().__init__(config)
        layout = config.lora_layout
        self._sizes = layout.sizes  # per-tensor sizes, read at every normalisation (the config rebuilds the layout)
        # Persistent buffers: from_pretrained builds the model on the meta device and refills only saved state.
        self.register_buffer("param_offset", torch.zeros(layout.numel))  # (N,) element-wise bank mean
        self.register_buffer("param_scale", torch.ones(len(layout.keys)))  # (num_tensors,) per-tensor std
        self.register_buffer("task_conditions", torch.zeros(len(config.task_names), config.condition_size))
        if config.architecture == "factorised":
            self.tokens = TokenLayout(layout, config.block_rows)
            self.encoder = FactorisedEncoder(config, self.tokens)
            self.decoder = FactorisedDecoder(config, self.tokens)
        else:
            self.tokens = None
            self.encoder = PeftCVAEEncoder(config)
            self.decoder = PeftCVAEDecoder(config)
        self.task_memory = None
        if config.task_memory:
            dtype = getattr(torch, config.task_memory_dtype)
            self.task_memory = TaskMemory(len(config.task_names), layout.numel, dtype, config.memory_centered)
        # (N,) raw LoRA units, added to what the generator writes; trained by a functional loss only
        self.functional_offset = nn.Parameter(torch.zeros(layout.numel)) if config.functional_offset else None
        self._index_cache = {}
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (PeftCVAEEncoder, PeftCVAEDecoder)):
            init.normal_(module.position_embedding, mean=0.0, std=self.config.initializer_range)
        if getattr(module, "is_output_layer", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, TaskMemory):
            init.constant_(module.log_temperature, math.log(0.1))  # sharp enough to pick a task from the start
        if isinstance(module, PeftCVAEGenerator) and module.functional_offset is not None:
            init.zeros_(module.functional_offset)  # also when built on the meta device and initialised after

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_bank(cls, bank, *, seed: int = 0, task_memory: bool = True, **config_overrides) -> "PeftCVAEGenerator":
        """A new, untrained generator for a `LoraBank`: its layout, tasks, condition size and normalisation.

        `task_memory=True` (the recommended design, see `PeftCVAEConfig.task_memory`) keeps each task's mean
        checkpoint in the generator; `task_memory=False` gives the paper's plain CVAE, which on small banks of real
        models decodes close to the bank mean for every task. The default is set here, not in `PeftCVAEConfig`
        (whose default stays False), so that a config.json written before the field existed still loads as the plain
        generator it was. `config_overrides` set network sizes, e.g. `latent_size=32, hidden_channels=64,
        num_layers=4`. The weights are initialised from `seed` (0 by default) under a forked random state, so the
        same bank and seed give bit-identical generators, and `train_generator(seed=...)` then reproduces a whole
        run; torch's global random state is left as it was.
        """
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidConfigError(f"seed must be an integer, got {seed!r}.")
        config = PeftCVAEConfig(
            layout=bank.layout.to_dict(),
            condition_size=bank.condition_size,
            task_names=bank.task_names,
            task_descriptions=[bank.description(task) for task in bank.task_names],
            task_memory=task_memory,
            **{"condition_encoder": bank.condition_encoder, **config_overrides},
        )
        # One pass over the bank, chunk by chunk (a bank on disk is never loaded whole); raises if it is empty.
        # With a canonical form, the statistics and task means are those of the canonical vectors the network sees.
        transform = None
        if config.canonical_form is not None:
            layout = config.lora_layout
            transform = lambda chunk: canonicalize(chunk, layout)  # noqa: E731
        offset, scale, task_means = bank.statistics(task_means=config.task_memory, transform=transform)
        # offset (N,), scale (num_tensors,), task_means (T, N) or None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config)
        with torch.no_grad():
            model.param_offset.copy_(offset)
            model.param_scale.copy_(scale)
            model.task_conditions.copy_(bank.condition_matrix())
            if model.task_memory is not None:
                model.task_memory.task_means.copy_(
                    model.normalize(task_means)
                )  # the mean of normalised = normalised mean
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved generator (folder or Hub repo id), as `PreTrainedModel.from_pretrained`.

        Loading is checked, not assumed: only safetensors weights are read, and a missing, truncated or corrupted
        file, a config.json with missing or wrongly typed fields, or weights that do not fit the config (missing,
        unexpected or mismatched tensors, which transformers would otherwise initialise at random) raise a
        `PeftCVAEError` (`MissingFileError`, `CorruptFileError`, `InvalidConfigError`).
        """
        output_loading_info = kwargs.pop("output_loading_info", False)
        folder = generator_folder(pretrained_model_name_or_path, kwargs)
        if folder is None:  # a Hub repo that cannot be reached: transformers says why
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        kwargs.pop("config", None)  # AutoModel passes the config it parsed; the one read with the weights is used
        for name in (*HUB_FILE_KWARGS, "use_safetensors", "trust_remote_code", "_from_auto", "_commit_hash"):
            kwargs.pop(name, None)
        with folder_lock(folder):
            files = VerifiedFolder(folder, what="generator")
            config, state_dict = read_generator(files, pretrained_model_name_or_path)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # reported below as a CorruptFileError, not a RuntimeError
        model, info = super().from_pretrained(
            None, *args, config=config, state_dict=state_dict, output_loading_info=True, **kwargs
        )
        model.config.name_or_path = str(pretrained_model_name_or_path)  # as transformers records it for a path
        problems = [
            f"{len(info[kind])} {kind.replace('_keys', '')} (e.g. {sorted(map(str, info[kind]))[0]})"
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(kind)
        ]
        if problems:
            raise CorruptFileError(
                f"The weights of {pretrained_model_name_or_path} do not fit its config.json: tensors "
                f"{'; '.join(problems)}. Expected exactly the tensors of the generator that config describes; the "
                "files were edited, corrupted or mixed from two generators: save or download the generator again."
            )
        # Weights come memory-mapped from safetensors at unaligned addresses, where CPU kernels take other code paths
        # and round differently (~1e-7). Copying them into memory of our own keeps generation bit-identical to the
        # model that was saved, and frees the file.
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.data = tensor.data.clone()
        return (model, info) if output_loading_info else model

    # ---- saving and sharing -------------------------------------------------------------------------------------
    def save_pretrained(
        self, save_directory: str | os.PathLike, is_main_process: bool = True, *, push_to_hub: bool = False, **kwargs
    ):
        """Write `config.json` and `model.safetensors` (as `PreTrainedModel.save_pretrained`) and our model card,
        `README.md` (see `peft_cvae.model_card.generator_model_card`).

        If the generator has a `training_history` attribute (what `train_generator` returns), its summary is written
        into the saved config as `training_summary` (JSON), so the card's training figures survive `from_pretrained`.
        `push_to_hub=True` (with optional `repo_id`, `commit_message`, `commit_description`, `private`, `token`,
        `revision`, `create_pr`) then uploads with `push_to_hub`, so the Hub gets our card, not transformers' generic
        one.
        """
        hub_kwargs = {
            name: kwargs.pop(name)
            for name in ("repo_id", "commit_message", "commit_description", "private", "revision", "create_pr")
            if name in kwargs
        }
        self._save_with_card(save_directory, {"model_id": os.fspath(save_directory)}, is_main_process, **kwargs)
        if push_to_hub and is_main_process:
            repo_id = hub_kwargs.pop("repo_id", Path(save_directory).name)
            self.push_to_hub(repo_id, token=kwargs.get("token"), **hub_kwargs)

    def _save_with_card(self, save_directory, card_kwargs: dict, is_main_process: bool = True, **kwargs) -> None:
        """`save_pretrained` without the push: weights, config and the model card rendered once with `card_kwargs`."""
        history = getattr(self, "training_history", None)
        previous = vars(self.config).get("training_summary")
        if history:
            self.config.training_summary = training_summary(history)
        try:
            if is_main_process:  # all files at once: a crash mid-save leaves the previous version whole
                with atomic_directory(save_directory) as staging:
                    super().save_pretrained(staging, is_main_process=True, **kwargs)
                    generator_model_card(self, **card_kwargs).save(staging / CARD_NAME)
                    write_integrity_record(staging)  # last: the sha256 of config.json and the weights
            else:
                super().save_pretrained(save_directory, is_main_process=False, **kwargs)
        finally:  # saving has no side effect on the in-memory config
            if history and previous is None:
                del self.config.training_summary
            elif history:
                self.config.training_summary = previous

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Upload `config.json`, `model.safetensors` and our model card (`README.md`) to `repo_id`, in one commit.

        Same arguments as transformers' `push_to_hub`, whose generic card this replaces: the card states
        `library_name: peft-cvae`, the tags `peft`, `lora`, `lora-generator`, `peft-cvae` (plus `tags`), the base
        model, target modules, rank, the tasks with their descriptions, the condition encoder, training figures and
        a usage snippet.

        Loading back: `PeftCVAEGenerator.from_pretrained(repo_id)`, or `AutoModel.from_pretrained(repo_id)` once
        `peft_cvae` is imported (it registers the classes). `trust_remote_code=True` loading without the package is
        NOT supported: the generator's code spans several modules of this package (configuration, layout, errors,
        adapter writing), and copying them into every repo would ship a frozen copy of the library as executable
        code next to weights that are otherwise only safetensors and JSON. Install `peft-cvae` instead.

        Errors: a missing repo on `from_pretrained` is transformers' `OSError` ("... is not a local folder and is not
        a valid model identifier ..."); upload failures are huggingface_hub's `HfHubHTTPError` subclasses.

        Returns:
            the `huggingface_hub.CommitInfo` of the upload.
        """
        tags = [*(self.model_tags or []), *(tags or [])]

        def save(folder: Path, full_repo_id: str) -> None:
            self._save_with_card(folder, {"model_id": full_repo_id, "tags": tags}, max_shard_size=max_shard_size)

        return push_folder_to_hub(
            save,
            repo_id,
            commit_message=commit_message or "Upload peft-cvae generator",
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )

    # ---- flat vector <-> normalised patches ---------------------------------------------------------------------
    def _indices(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch_index, tensor_sizes): where each element of the flat vector sits in the padded (L * P) vector, and
        the number of elements of each tensor. Derived from the config, so computed lazily rather than stored."""
        if device not in self._index_cache:
            sizes = self.config.lora_layout.sizes
            patch = self.config.patch_size
            starts, position = [], 0
            for size in sizes:
                starts.append(torch.arange(size) + position)
                position += -(-size // patch) * patch
            self._index_cache[device] = (torch.cat(starts).to(device), torch.tensor(sizes, device=device))
        return self._index_cache[device]

    def _per_tensor(self, flat: torch.Tensor, op) -> torch.Tensor:
        """`op(piece, scale)` on each tensor's slice of (B, N) with that tensor's scale, concatenated: the same numbers
        as broadcasting an N-long `repeat_interleave` of the scales, without building it (it cost more than the
        decoder at N = 42M)."""
        pieces = flat.split(self._sizes, dim=1)
        return torch.cat([op(piece, scale) for piece, scale in zip(pieces, self.param_scale)], dim=1)

    def normalize(self, params: torch.Tensor) -> torch.Tensor:
        """Raw flat LoRA vectors (B, N) -> normalised (B, N)."""
        return self._per_tensor(params - self.param_offset, torch.div)

    def denormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalised (B, N) -> raw flat LoRA vectors (B, N)."""
        return self._per_tensor(normalized, torch.mul) + self.param_offset

    def canonicalize(self, params: torch.Tensor) -> torch.Tensor:
        """Raw flat LoRA vectors (B, N) -> the form the network models: unchanged, or re-factorised
        (`config.canonical_form`, see `peft_cvae.canonical`)."""
        if self.config.canonical_form is None:
            return params
        return canonicalize(params, self.config.lora_layout)

    def patchify(self, flat: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, L, P): patches of each tensor, or row-block tokens (factorised), zero-padded."""
        if self.tokens is not None:
            return self.tokens.tokenize(flat)
        index, _ = self._indices(flat.device)
        padded = flat.new_zeros(flat.shape[0], self.config.num_tokens * self.config.patch_size)
        padded[:, index] = flat
        return padded.view(flat.shape[0], self.config.num_tokens, self.config.patch_size)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, P) -> (B, N), dropping the padding."""
        if self.tokens is not None:
            return self.tokens.untokenize(patches)
        index, _ = self._indices(patches.device)
        return patches.reshape(patches.shape[0], -1)[:, index]

    # ---- the VAE ------------------------------------------------------------------------------------------------
    def _check_condition(self, condition: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        if not isinstance(condition, torch.Tensor):
            raise ConditionError(f"A condition must be a torch.Tensor, got {type(condition).__name__}.")
        if condition.dim() != 2 or condition.shape[1] != self.config.condition_size:
            raise ConditionError(
                f"Expected conditions of shape (batch, {self.config.condition_size}), got {tuple(condition.shape)}. "
                f"This generator was trained on {self.config.condition_size}-dimensional task vectors; encode the "
                "task with the same encoder as the training conditions."
            )
        if batch_size is not None and condition.shape[0] != batch_size:
            raise ConditionError(
                f"Got {condition.shape[0]} conditions for {batch_size} LoRA vectors; expected one per vector. Pass "
                f"one task vector of size {self.config.condition_size} (a 1-D tensor) per adapter to generate."
            )
        if condition.is_complex():
            raise ConditionError(
                f"A condition must hold real numbers, got dtype {condition.dtype}; pass the task vector as a float "
                "tensor."
            )
        if not torch.isfinite(condition).all():
            raise ConditionError("The condition contains NaN or Inf; check the task encoder's output.")
        return condition.to(device=self.param_offset.device, dtype=self.param_offset.dtype)

    def encode(self, params: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw flat LoRA vectors (B, N) and conditions (B, cond) -> mean and log-variance of q(z | x, c)."""
        condition = self._check_condition(condition, params.shape[0])
        return self.encoder(self.patchify(self.normalize(self.canonicalize(params))), condition)

    def decode(self, latent: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Latents (B, Z) and conditions (B, cond) -> raw flat LoRA vectors (B, N)."""
        condition = self._check_condition(condition, latent.shape[0])
        return self.denormalize(self._decode_normalized(latent, condition))

    def _decode_normalized(
        self,
        latent: torch.Tensor,
        condition: torch.Tensor,
        hidden_tasks: torch.Tensor | None = None,
        with_offset: bool = True,
    ) -> torch.Tensor:
        """(B, Z), (B, cond) -> normalised flat vectors (B, N): the decoder, plus the task memory when there is one,
        plus the functional offset when there is one and `with_offset` (what the generator writes; the CVAE loss
        compares the rest with a checkpoint).

        `hidden_tasks` (B,) int64: per sample, a task index masked out of the memory (-1: none); see
        `config.memory_holdout`."""
        if self.task_memory is None:
            if hidden_tasks is not None:
                raise InvalidConfigError("hidden_tasks hides tasks from the task memory; this generator has none.")
            decoded = self.unpatchify(self.decoder(latent, condition))  # (B, N)
        else:
            weights, best_similarity = self.task_memory.weights(condition, self.task_conditions, hidden_tasks)
            feature = best_similarity if self.config.memory_holdout > 0 else None  # (B,): is the task in the memory?
            decoded = self.unpatchify(self.decoder(latent, condition, feature)) + self.task_memory.mix(weights)
        return self.with_functional_offset(decoded) if with_offset else decoded

    def with_functional_offset(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalised flat vectors (B, N) plus the functional offset (`config.functional_offset`), which is kept in
        raw LoRA units so that its learning rate means what a LoRA's does; unchanged without one."""
        if self.functional_offset is None:
            return normalized
        return normalized + self._per_tensor(self.functional_offset[None].to(normalized), torch.div)  # (B, N)

    def forward(
        self,
        params: torch.Tensor,
        condition: torch.Tensor,
        return_dict: bool = True,
        noise: torch.Tensor | None = None,
        hidden_tasks: torch.Tensor | None = None,
        return_generated: bool = False,
    ) -> PeftCVAEOutput:
        """Encode, sample z (the mean in eval mode), decode, and score.

        Args:
            params: raw flat LoRA vectors, shape (B, N), as `LoraLayout.flatten` makes them.
            condition: task vectors, shape (B, condition_size).
            noise: standard normal noise of the reparameterisation in training mode, shape (B, latent_size); drawn
                from torch's global generator when None. `train_generator` passes noise drawn per global batch, so
                the result does not depend on the number of processes and resumes bit-identically.
            hidden_tasks: per sample, the index (in `config.task_names`) of a task to hide from the task memory, -1
                for none, shape (B,) int64. `train_generator` passes each sample's own task with probability
                `config.memory_holdout` (leave-one-task-out: the memory then mixes only other tasks).
            return_generated: also decode each condition at z = 0 (what `generate_adapter` writes for it, the
                functional offset included, `hidden_tasks` hidden from the memory) into `output.generated`: the
                LoRA a functional loss on the generation path scores.
        """
        if params.dim() != 2 or params.shape[1] != self.config.lora_layout.numel:
            raise LayoutMismatchError(
                f"Expected flat LoRA vectors of shape (batch, {self.config.lora_layout.numel}), got "
                f"{tuple(params.shape)}: these LoRA checkpoints have another layout (base model, rank or target "
                "modules) than the generator. Flatten adapters with generator.config.lora_layout.flatten(state_dict), "
                "or build a generator for that bank with PeftCVAEGenerator.from_bank(bank)."
            )
        condition = self._check_condition(condition, params.shape[0])
        target = self.normalize(self.canonicalize(params))  # (B, N)
        mean, log_variance = self.encoder(self.patchify(target), condition)  # (B, Z) each
        if self.training:
            noise = torch.randn_like(mean) if noise is None else noise.to(mean)
            latent = mean + noise * torch.exp(0.5 * log_variance)  # reparameterisation
        else:
            latent = mean
        reconstruction = self._decode_normalized(latent, condition, hidden_tasks, with_offset=False)  # (B, N)
        reconstruction_loss = F.mse_loss(reconstruction.float(), target.float())
        kl_loss = (-0.5 * (1 + log_variance - mean.pow(2) - log_variance.exp())).sum(dim=-1).mean()
        loss = reconstruction_loss + self.config.kl_weight * kl_loss
        generated = None
        if return_generated:  # z = 0, the prior's mean: what generation writes at temperature 0
            generated = self._decode_normalized(torch.zeros_like(mean), condition, hidden_tasks)  # (B, N)
        offset_reconstruction = None
        if self.functional_offset is not None:
            offset_reconstruction = self.with_functional_offset(reconstruction)  # (B, N)
        output = PeftCVAEOutput(
            loss, reconstruction_loss, kl_loss, reconstruction, mean, log_variance, generated, offset_reconstruction
        )
        return output if return_dict else output.to_tuple()
