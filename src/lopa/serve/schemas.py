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

from typing import Annotated, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError)

from .protocol import MAX_LOGPROBS

MAX_LABELS = 1000
MAX_LABEL_CHARS = 256  # a label word is scored by its first token; longer words only cost tokenising time
MAX_STOP = 16
MAX_CHOICES = 16  # n: each choice is a row of its own in the batch
MAX_MESSAGES = 1024
MAX_PROMPTS = 64  # prompts in one /v1/completions request; each makes n rows

__all__ = ["ChatCompletionRequest", "ChatMessage", "ClassifyRequest", "CompletionRequest", "GenerateRequest",
           "OpenAIRequest", "SoftPrompt", "ValidationError"]


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


Choices = Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)]
LogprobCount = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None
    """send one more chunk, with empty choices and the request's usage, before ``[DONE]``"""


class OpenAIRequest(BaseModel):
    """The decoding fields OpenAI's completions and chat bodies share; OpenAI fields lopa does not
    have are refused when set (see :data:`UNSUPPORTED`)."""

    model_config = ConfigDict(extra="allow")

    model: Text | None = None
    max_tokens: StrictInt | None = None
    temperature: Temperature | None = 1.0
    top_p: TopP | None = 1.0
    stop: StopString | StopList | None = None
    n: Choices | None = 1
    seed: Seed | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    soft_prompt: SoftPrompt | None = None


TokenIds = list[StrictInt]


class CompletionRequest(OpenAIRequest):
    """OpenAI's ``/v1/completions`` body: one prompt or a list of them (choice ``i * n + j`` is prompt
    ``i``'s choice ``j``), with one soft prompt for all of them or one per prompt.

    >>> CompletionRequest(prompt=["a", "b"], logprobs=3).logprobs
    3
    >>> try:
    ...     CompletionRequest(prompt="a", logprobs=21)
    ... except ValidationError as e:
    ...     print(e.errors()[0]["loc"], e.errors()[0]["msg"])
    ('logprobs',) Input should be less than or equal to 20
    """

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    """a text, a list of texts, token ids of the server's tokenizer, or a list of such lists"""
    soft_prompt: SoftPrompt | Annotated[list[SoftPrompt], Field(min_length=1, max_length=MAX_PROMPTS)] | None = None
    """one soft prompt for every prompt, or a list with one per prompt"""
    logprobs: LogprobCount | None = None
    """each generated token's log-probability and its step's k most likely tokens (0-20)"""
    echo: StrictBool | None = False
    """not supported (true is refused): the prompt's own tokens are not scored"""


class ChatMessage(BaseModel):
    """One turn of a conversation; ``content`` is a string (OpenAI's list-of-parts form is not taken)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI's ``/v1/chat/completions`` body; ``messages`` go through the model's chat template.

    >>> ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=2).n
    2
    >>> try:
    ...     ChatCompletionRequest(messages=[{"role": "user"}])
    ... except ValidationError as e:
    ...     print(e.errors()[0]["loc"], e.errors()[0]["msg"])
    ('messages', 0, 'content') Field required
    """

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = None
    """the newer name of max_tokens; give one of them"""
    logprobs: StrictBool | None = False
    """answer each generated token's log-probability"""
    top_logprobs: LogprobCount | None = None
    """with logprobs: the k most likely tokens of each step too (0-20)"""


# OpenAI fields lopa cannot honour, and the values that mean "not used"
# (a field the endpoint's schema declares never reaches this table: chat's logprobs, completions' echo)
UNSUPPORTED = {"echo": (False, None), "top_logprobs": (None,),
               "best_of": (None, 1), "suffix": (None, ""), "frequency_penalty": (None, 0, 0.0),
               "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
               "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
               "parallel_tool_calls": (None, False)}
IGNORED = {"user", "metadata", "store"}
