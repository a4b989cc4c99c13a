"""File names and format versions, in one place (as peft's `utils/constants.py`).

The names of files that another library owns (PEFT's adapter files, transformers' model files) are taken from that
library, so they cannot drift; diffusers is optional, so its one name is written out here and checked against
diffusers' own constant by the tests. The rest are peft-cvae's own.
"""

from peft.utils import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from peft.utils import WEIGHTS_NAME as ADAPTER_BIN_WEIGHTS_NAME
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils import WEIGHTS_NAME as BIN_WEIGHTS_NAME

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_BIN_WEIGHTS_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "BANK_CHECKPOINTS_FOLDER",
    "BANK_FORMAT_VERSION",
    "BANK_MANIFEST_NAME",
    "CARD_NAME",
    "CONDITIONS_NAME",
    "CONFIG_NAME",
    "DIFFUSERS_WEIGHTS_NAME",
    "INTEGRITY_FORMAT_VERSION",
    "INTEGRITY_NAME",
    "BIN_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
]

# diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE: the file `pipe.load_lora_weights(folder)` looks for.
DIFFUSERS_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

# The Hub card of a generator, adapter or bank repo (huggingface_hub's name for it).
CARD_NAME = "README.md"

# A LoRA bank folder: the manifest, one condition vector per task, one safetensors file per checkpoint.
BANK_MANIFEST_NAME = "bank.json"
CONDITIONS_NAME = "conditions.safetensors"
BANK_CHECKPOINTS_FOLDER = "checkpoints"
BANK_FORMAT_VERSION = 1

# The integrity record every folder peft-cvae saves ends with: the sha256 of each file that changes what is loaded.
INTEGRITY_NAME = "peft_cvae_integrity.json"
INTEGRITY_FORMAT_VERSION = 1
