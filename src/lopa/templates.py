"""Prompt templates: ``str.format`` strings whose slots are plain field names, nothing more.

A template may come from a file someone else wrote (an artifact's config, a task file), and
``str.format`` does more than fill slots: ``{text:>8000000000}`` pads to 8 GB, ``{text!r}`` changes the
text, ``{a.b}`` and ``{a[0]}`` reach into objects. So a slot is a bare identifier; anything else is refused.

>>> template_slots("{premise} ? {hypothesis} Answer:")
['premise', 'hypothesis']
>>> template_slots("{text:>8000000000} It was")
Traceback (most recent call last):
...
lopa.templates.TemplateError: template slot {text:>8000000000} in '{text:>8000000000} It was' has a format spec; a slot is a plain field name such as {text}
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable

# far above any prompt template; a bound keeps a hostile one from costing anything to inspect
MAX_TEMPLATE_CHARS = 100_000


class TemplateError(ValueError):
    """A template that is not plain text with ``{field}`` slots; the message says what is wrong."""


def template_slots(template: Any) -> list[str]:
    """The ``{slot}`` names of ``template``, in order, each once; a TemplateError unless every slot is a
    bare identifier (no format spec, conversion, attribute or index) and the text is valid Unicode."""
    if not isinstance(template, str):
        raise TemplateError(f"a template must be a string, not {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template of {len(template):,d} characters is longer than {MAX_TEMPLATE_CHARS:,d}")
    try:
        template.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TemplateError(f"template {template[:80]!r} is not valid Unicode ({e.reason} at {e.start})") from None
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"template {template[:200]!r} is malformed ({e}); write literal braces as {{{{ }}}}") from None
    slots: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if not name.isidentifier():
            raise TemplateError(f"template slot {shown} in {template[:200]!r} must be a plain column name "
                                f"(no attribute, index or position)")
        for what, present in (("a conversion", conversion), ("a format spec", spec)):
            if present:
                raise TemplateError(f"template slot {shown[:100]} in {template[:200]!r} has {what}; a slot is a "
                                    f"plain field name such as {{{name}}}")
        if name not in slots:
            slots.append(name)
    return slots


def field_reader(template: str) -> Callable[[str], list[str]]:
    """A function that reads a filled ``template`` back into its slots' texts, in slot order: the inverse
    of ``template.format``. Where a slot's text contains the fixed words that follow it, the earliest
    split is taken. A text the template did not produce is a TemplateError. A slot used twice must hold
    the same text both times. Two slots with nothing but whitespace between them are a TemplateError
    here, not when a text is read: whether ``"{a} {b}"`` holds ``"New York"`` in ``a`` or in ``b`` cannot
    be told from the text, and a reader that guessed would split every text at its first space.

    >>> read = field_reader("{sentence1} ? {sentence2} Answer:")
    >>> read("The cat sat. ? A cat was sitting. Answer:")
    ['The cat sat.', 'A cat was sitting.']
    >>> read("no template here")
    Traceback (most recent call last):
    ...
    lopa.templates.TemplateError: text 'no template here' was not made by the template '{sentence1} ? {sentence2} Answer:'
    >>> field_reader("{question1} {question2} Answer:")
    Traceback (most recent call last):
    ...
    lopa.templates.TemplateError: the template '{question1} {question2} Answer:' has only whitespace between {question1} and {question2}, so a filled-in text cannot be read back into its fields; put words or punctuation between them, e.g. '{question1} ? {question2}'
    """
    slots = template_slots(template)
    parsed = list(string.Formatter().parse(template))
    for (_, before, _, _), (literal, after, _, _) in zip(parsed, parsed[1:]):
        if before is not None and after is not None and not literal.strip():
            raise TemplateError(f"the template {template[:200]!r} has only whitespace between {{{before}}} and "
                                f"{{{after}}}, so a filled-in text cannot be read back into its fields; put words "
                                f"or punctuation between them, e.g. '{{{before}}} ? {{{after}}}'")
    pattern, seen = [], set()
    for literal, name, _, _ in parsed:
        pattern.append(re.escape(literal))
        if name is not None:
            pattern.append(f"(?P={name})" if name in seen else f"(?P<{name}>.*?)")
            seen.add(name)
    regex = re.compile("".join(pattern), re.DOTALL)

    def read(text: str) -> list[str]:
        match = regex.fullmatch(text)
        if match is None:
            raise TemplateError(f"text {text[:200]!r} was not made by the template {template[:200]!r}")
        return [match.group(s) for s in slots]

    return read
