"""lopa: low-rank soft prompts for any Hugging Face causal LM, served without adapters.

>>> import lopa
>>> base, tokenizer = lopa.load_base("tiny-random-llama")
>>> config = lopa.make_config("prompt-tuning", num_virtual_tokens=4)
>>> model = lopa.SoftPromptModel(base, tokenizer, config)
>>> model.num_trainable_parameters()
256
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names are imported on first use (PEP 562), not here: ``import lopa.serve.server`` must not
# pull in the methods, the wrapper or the artifacts just because it passes through this package
# (DESIGN.md, "Two walls"), and ``lopa --help`` stays fast.
_LAZY: dict[str, str] = {
    "METHODS": ".methods", "make_config": ".methods",
    "load_base": ".models", "load_encoder_model": ".models", "load_tokenizer": ".models",
    "load_encoder": ".encoders",
    "SoftPromptModel": ".model",
    "Client": ".client",
    "export_peft": ".artifact", "import_peft": ".artifact", "load_artifact": ".artifact",
    "save_artifact": ".artifact",
}

__all__ = ["METHODS", "Client", "SoftPromptModel", "export_peft", "import_peft", "load_artifact", "load_base",
           "load_encoder", "load_encoder_model", "load_tokenizer", "make_config", "save_artifact", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lopa' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
