"""lopa: low-rank soft prompts for any Hugging Face causal LM, served without adapters.

>>> import lopa
>>> base, tokenizer = lopa.load_base("tiny-random-llama")
>>> config = lopa.make_config("prompt-tuning", num_virtual_tokens=4)
>>> model = lopa.SoftPromptModel(base, tokenizer, config)
>>> model.num_trainable_parameters()
256
"""

__version__ = "0.1.0"

from .methods import METHODS, make_config  # noqa: E402
from .models import load_base, load_encoder_model, load_tokenizer  # noqa: E402
from .encoders import load_encoder  # noqa: E402
from .model import SoftPromptModel  # noqa: E402
from .artifact import export_peft, import_peft, load_artifact, save_artifact  # noqa: E402

__all__ = ["METHODS", "SoftPromptModel", "export_peft", "import_peft", "load_artifact", "load_base",
           "load_encoder", "load_encoder_model", "load_tokenizer", "make_config", "save_artifact", "__version__"]
