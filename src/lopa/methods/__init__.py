"""The soft-prompt methods. Importing this package registers every built-in method.

>>> from lopa.methods import METHODS
>>> sorted(METHODS)
['idpg', 'lopa', 'lopt-1', 'lopt-2', 'prompt-tuning']
"""

from .base import (METHODS, ConfigError, InitContext, InstanceConfig, SoftPromptConfig, SoftPromptGenerator,
                   build_generator, get_method, make_config)
from . import prompt_tuning, lopt_1, lopt_2, idpg, lopa  # noqa: F401  (registration)

__all__ = ["METHODS", "ConfigError", "InitContext", "InstanceConfig", "SoftPromptConfig", "SoftPromptGenerator",
           "build_generator", "get_method", "make_config"]
