"""The soft-prompt methods. Importing this package registers every built-in method.

>>> from lopa.methods import METHODS
>>> sorted(METHODS)
['full', 'idpg', 'lopa', 'lopt-1', 'lopt-2', 'lora', 'prompt-tuning']
"""

from .base import (METHODS, ConfigError, InitContext, InstanceConfig, MethodConfig, SoftPromptConfig,
                   SoftPromptGenerator, build_generator, get_method, make_config, soft_prompt_methods)
from . import prompt_tuning, lopt_1, lopt_2, idpg, lopa, weights  # noqa: F401  (registration)

__all__ = ["METHODS", "ConfigError", "InitContext", "InstanceConfig", "MethodConfig", "SoftPromptConfig",
           "SoftPromptGenerator", "build_generator", "get_method", "make_config", "soft_prompt_methods"]
