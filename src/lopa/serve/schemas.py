"""The request bodies, as pydantic models: FastAPI checks them and the OpenAPI schema comes from them.

Every field is strict (a string is not a number, a number is not a string, ``true`` is not 1) and
every string must be encodable as UTF-8: JSON can carry a lone surrogate (``"\\ud800"``) that no
tokenizer takes, so it is refused here (422) rather than deep inside tokenisation.

>>> ClassifyRequest(text="a fine film", label_words=[" bad", " good"]).label_words
[' bad', ' good']
>>> try:
...     GenerateRequest(text="x", max_new_tokens="7")  # strict: a string is not a number
... except ValidationError as e:
...     print(e.errors()[0]["msg"])
Input should be a valid integer
>>> try:
...     ClassifyRequest(text="\\ud800", label_words=[" a", " b"])
... except ValidationError as e:
...     print(e.errors()[0]["msg"])
Value error, holds a lone surrogate (U+D800) at character 0, which UTF-8 cannot encode
"""

from __future__ import annotations

from typing import Annotated

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr,
                      ValidationError)

MAX_LABELS = 1000
MAX_LABEL_CHARS = 256  # a label word is scored by its first token; longer words only cost tokenising time
MAX_STOP = 16

__all__ = ["ClassifyRequest", "CompletionRequest", "GenerateRequest", "SoftPrompt", "ValidationError"]


def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(s[e.start]):04X}) at character {e.start}, "
                         f"which UTF-8 cannot encode") from None
    return s


Text = Annotated[StrictStr, AfterValidator(_encodable)]
LabelWord = Annotated[StrictStr, Field(max_length=MAX_LABEL_CHARS), AfterValidator(_encodable)]
StopString = Annotated[StrictStr, Field(min_length=1, max_length=256), AfterValidator(_encodable)]
Temperature = Annotated[StrictFloat, Field(ge=0.0, le=100.0, allow_inf_nan=False)]
TopP = Annotated[StrictFloat, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=0, lt=2 ** 63)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP)]


class SoftPrompt(BaseModel):
    """The wire object (:mod:`lopa.serve.wire`): its types are checked here, its meaning (dtype name,
    shape against the model, length of ``data``, finiteness) by :func:`~lopa.serve.wire.decode_soft_prompt`."""

    model_config = ConfigDict(extra="forbid")

    dtype: StrictStr
    """float32, float16 or bfloat16"""
    shape: list[StrictInt] = Field(max_length=2)
    """[m, d]: virtual tokens × the model's width"""
    data: StrictStr
    """standard base64 (with padding) of the little-endian, row-major array"""


class PromptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    text: Text | None = None
    """the prompt as text (tokenised by the server without special tokens); or give token_ids"""
    token_ids: list[StrictInt] | None = None
    """the prompt as token ids of the server's tokenizer; or give text"""
    soft_prompt: SoftPrompt | None = None
    """{"dtype", "shape": [m, d], "data": base64}: see lopa.serve.wire"""


class ClassifyRequest(PromptRequest):
    label_words: list[LabelWord] = Field(min_length=2, max_length=MAX_LABELS)
    """one word per class (leading space kept); each is scored by its first token"""


class GenerateRequest(PromptRequest):
    max_new_tokens: StrictInt = 64
    temperature: Temperature = 0.0
    """0 = greedy (so is anything below 1e-5)"""
    top_p: TopP = 1.0
    stop: StopList | None = None
    seed: Seed | None = None


class CompletionRequest(BaseModel):
    """OpenAI's ``/v1/completions`` body; fields it has and lopa does not are refused when set."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    prompt: Text | list[Text] | list[StrictInt]
    max_tokens: StrictInt | None = 16
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    stop: StopString | StopList | None = None
    n: StrictInt | None = 1
    seed: Seed | None = None
    soft_prompt: SoftPrompt | None = None


# OpenAI fields lopa cannot honour, and the value that means "not used"
UNSUPPORTED = {"stream": (False, None), "echo": (False, None), "logprobs": (None, 0), "best_of": (None, 1),
               "suffix": (None, ""), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
               "logit_bias": (None, {})}
IGNORED = {"user", "stream_options"}
