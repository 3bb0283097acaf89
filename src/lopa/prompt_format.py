"""How a prompt becomes the model's text: a plain template, or the tokenizer's chat template.

One function, :func:`build_text`, builds the text for every user of a prompt (training, ``lopa
eval``, generation, the client and the server's completions), so that a soft prompt meets the model
in the format it was trained in. A :class:`PromptFormat` says which format; it is recorded in the
artifact (the task's settings) and rebuilt from there with :meth:`PromptFormat.from_settings`.

* plain: the prompt as written, after the system prompt and a blank line when there is one;
* chat: the tokenizer's chat template over ``[system] + user prompt`` (or over a whole ``messages``
  conversation), ending with the template's generation prompt (``<|im_start|>assistant\\n``, ...).

For a conversation with several assistant turns, the loss covers every assistant turn and nothing
else. The chat template is rendered prefix by prefix (the conversation up to each assistant turn,
with and without that turn): the difference is exactly the text the template writes for that turn.
Those character spans are recorded in :attr:`Rendered.loss_spans`, and :func:`token_loss_mask` turns
them into a per-token mask of the same tokenization the model uses.

Example::

    >>> from lopa.models import load_base
    >>> _, tok = load_base("tiny-random-llama")           # SmolLM2's tokenizer and chat template
    >>> plain = build_text(tok, PromptFormat(), prompt="2 + 2 =", completion=" 4")
    >>> plain.prompt, plain.completion
    ('2 + 2 =', ' 4')
    >>> chat = build_text(tok, PromptFormat(chat_template=True, system_prompt="Be brief."),
    ...                   prompt="2 + 2 =", completion="4")
    >>> print(chat.prompt)
    <|im_start|>system
    Be brief.<|im_end|>
    <|im_start|>user
    2 + 2 =<|im_end|>
    <|im_start|>assistant
    <BLANKLINE>
    >>> chat.completion                       # the end of turn is the EOS the trainer appends
    '4'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .tasks.base import TaskError

CHAT_TEMPLATE_MODES = ("auto", "none")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class PromptFormat:
    """Which text the model sees: ``chat_template`` on or off, and an optional system prompt.

    >>> PromptFormat(chat_template=True, system_prompt="Answer in JSON.").settings()
    {'chat_template': True, 'system_prompt': 'Answer in JSON.'}
    >>> PromptFormat.from_settings({"chat_template": False, "system_prompt": None})
    PromptFormat(chat_template=False, system_prompt=None)
    """

    chat_template: bool = False
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise TaskError(f"system prompt must be a string, got {type(self.system_prompt).__name__}")

    def settings(self) -> dict[str, Any]:
        """What an artifact records so that inference builds the same text."""
        return {"chat_template": self.chat_template, "system_prompt": self.system_prompt}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> "PromptFormat":
        """The format recorded in a task's settings (plain when nothing was recorded: older artifacts)."""
        s = dict(settings or {})
        return cls(chat_template=bool(s.get("chat_template", False)), system_prompt=s.get("system_prompt"))


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_format(mode: str, tokenizer: Any, system_prompt: str | None = None) -> PromptFormat:
    """``--chat-template auto|none`` for this tokenizer: auto uses the chat template where there is one.

    >>> from lopa.models import load_base
    >>> _, tok = load_base("tiny-random-llama")
    >>> resolve_format("auto", tok).chat_template, resolve_format("none", tok).chat_template
    (True, False)
    """
    if mode not in CHAT_TEMPLATE_MODES:
        raise TaskError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    return PromptFormat(chat_template=mode == "auto" and has_chat_template(tokenizer),
                        system_prompt=system_prompt or None)


def check_messages(messages: Any, where: str, *, need_assistant: bool = True) -> list[dict[str, str]]:
    """Validate an OpenAI/TRL-style ``messages`` list and return it as plain dicts.

    >>> check_messages([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "line 3")
    Traceback (most recent call last):
    ...
    lopa.tasks.base.TaskError: line 3: message 1 has role 'bot'; roles must be one of system, user, assistant
    """
    if not isinstance(messages, list) or not messages:
        raise TaskError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TaskError(f"{where}: message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise TaskError(f"{where}: message {i} has role {role!r}; roles must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TaskError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}; "
                            f"it must be a string")
        if role == "assistant" and not content.strip():
            raise TaskError(f"{where}: message {i} is an empty assistant turn (an empty completion)")
        out.append({"role": role, "content": content})
    if need_assistant:
        if not any(m["role"] == "assistant" for m in out):
            raise TaskError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
        if out[-1]["role"] != "assistant":
            raise TaskError(f"{where}: the last message must be the assistant's (the completion to learn), "
                            f"got {out[-1]['role']!r}")
    return out


@dataclass(frozen=True)
class Rendered:
    """The model text of one row.

    ``prompt`` is what the model reads (it ends where generation starts); ``completion`` the text to
    learn or the reference (None at inference); ``loss_spans`` the ``(start, end)`` character spans of
    ``prompt`` that are earlier assistant turns, trained on as well.
    """

    prompt: str
    completion: str | None = None
    loss_spans: tuple[tuple[int, int], ...] = field(default=())


def _apply(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja errors, templates that reject a role order, ...
        raise TaskError(f"the tokenizer's chat template failed on this conversation ({type(e).__name__}: {e}); "
                        f"use --chat-template none or fix the roles") from e


def _turn_text(span: str, eos: str | None) -> str:
    """An assistant turn as rendered, up to and including the end-of-turn token when it is the EOS."""
    if eos and eos in span:
        return span[:span.index(eos) + len(eos)]
    return span


def build_text(tokenizer: Any, fmt: PromptFormat, *, prompt: str | None = None, completion: str | None = None,
               messages: Sequence[Mapping[str, str]] | None = None) -> Rendered:
    """The model text for a prompt (plain or chat) or a ``messages`` conversation.

    Give ``prompt`` (and ``completion`` for training or a reference), or ``messages``: a conversation
    ending with an assistant turn (its last turn becomes the completion) or, at inference, with a user
    turn. A system prompt in ``fmt`` goes first unless the conversation has its own.

    The completion is returned without the end-of-turn token when that token is the tokenizer's EOS,
    because the trainer appends EOS to every completion and generation stops there.

    >>> from lopa.models import load_base
    >>> _, tok = load_base("tiny-random-llama")
    >>> conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
    ...         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]
    >>> r = build_text(tok, PromptFormat(chat_template=True), messages=conv)
    >>> r.completion, [r.prompt[a:b] for a, b in r.loss_spans]
    ('ciao', ['yo<|im_end|>'])
    """
    if (prompt is None) == (messages is None):
        raise TaskError("give exactly one of prompt= or messages=")
    if messages is None:
        if not fmt.chat_template:
            head = f"{fmt.system_prompt}\n\n" if fmt.system_prompt else ""
            return Rendered(head + prompt, completion)
        messages = [{"role": "user", "content": prompt}]
        if completion is not None:
            messages.append({"role": "assistant", "content": completion})
    elif completion is not None:
        raise TaskError("a conversation carries its completion as its last assistant turn; do not pass completion=")
    if not fmt.chat_template:
        raise TaskError("'messages' rows need the tokenizer's chat template: use --chat-template auto with a "
                        "model whose tokenizer has one" + ("" if has_chat_template(tokenizer) else
                                                          " (this tokenizer has none)"))
    if not has_chat_template(tokenizer):
        raise TaskError("the chat template is on, but this tokenizer has none; use --chat-template none")
    msgs = check_messages(list(messages), "conversation", need_assistant=False)
    if fmt.system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": fmt.system_prompt}, *msgs]
    eos = getattr(tokenizer, "eos_token", None)
    last = len(msgs) - 1 if msgs[-1]["role"] == "assistant" else None
    text = _apply(tokenizer, msgs[:last] if last is not None else msgs, True)
    spans = []
    for j, m in enumerate(msgs[:last] if last is not None else msgs):
        if m["role"] != "assistant":
            continue
        before, after = _apply(tokenizer, msgs[:j], True), _apply(tokenizer, msgs[:j + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise TaskError("this tokenizer's chat template does not render a conversation prefix by prefix, so "
                            "the assistant turns cannot be located for the loss; give one assistant turn per row")
        turn = _turn_text(after[len(before):], eos)
        spans.append((len(before), len(before) + len(turn)))
    target = None
    if last is not None:
        full = _apply(tokenizer, msgs, False)
        if not full.startswith(text):
            raise TaskError("this tokenizer's chat template does not render the final assistant turn after the "
                            "generation prompt; use --chat-template none")
        target = _turn_text(full[len(text):], eos)
        if eos and target.endswith(eos):
            target = target[:-len(eos)]
    return Rendered(text, target, tuple(spans))


def token_loss_mask(tokenizer: Any, text: str, spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token of ``tokenizer(text, add_special_tokens=False)``: does the loss cover it?

    A token is covered when it starts inside one of ``spans`` (character offsets), so the mask follows
    the very tokenization the model reads, not a re-tokenization of pieces.

    >>> from lopa.models import load_base
    >>> _, tok = load_base("tiny-random-llama")
    >>> token_loss_mask(tok, "ab<|im_end|>cd", [(2, 12)])
    [False, True, False]
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise TaskError("per-turn loss masks need a fast tokenizer (one that reports character offsets)")
    return [any(a <= s < b for a, b in spans) for s, _ in offsets]


__all__ = ["CHAT_TEMPLATE_MODES", "PromptFormat", "ROLES", "Rendered", "build_text", "check_messages",
           "has_chat_template", "resolve_format", "token_loss_mask"]
