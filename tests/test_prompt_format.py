"""lopa.prompt_format: the one function that builds the model's text, plain or through the chat template,
and the per-token loss masks of a conversation's assistant turns."""

from __future__ import annotations

import copy

import pytest

from lopa.prompt_format import (PromptFormat, build_text, check_messages, has_chat_template, resolve_format,
                                token_loss_mask)
from lopa.tasks import TaskError

CHAT = PromptFormat(chat_template=True)
CONV = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]


@pytest.fixture(scope="module")
def tok(tiny_base):
    return tiny_base[1]


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same tokenizer without a chat template (a base model's)."""
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_auto_follows_the_tokenizer(tok, plain_tok):
    assert has_chat_template(tok) and not has_chat_template(plain_tok)
    assert resolve_format("auto", tok) == PromptFormat(chat_template=True)
    assert resolve_format("auto", plain_tok) == PromptFormat(chat_template=False)
    assert resolve_format("none", tok, "Be terse.") == PromptFormat(chat_template=False, system_prompt="Be terse.")
    with pytest.raises(TaskError, match="auto, none"):
        resolve_format("always", tok)


def test_plain_text_with_and_without_system_prompt(tok):
    assert build_text(tok, PromptFormat(), prompt="Q: 1+1\nA:", completion=" 2").prompt == "Q: 1+1\nA:"
    r = build_text(tok, PromptFormat(system_prompt="Answer briefly."), prompt="Q: 1+1\nA:", completion=" 2")
    assert r.prompt == "Answer briefly.\n\nQ: 1+1\nA:" and r.completion == " 2" and r.loss_spans == ()


def test_chat_prompt_is_the_templates_generation_prompt(tok):
    """The prompt is exactly what apply_chat_template gives for the user turn with the generation
    prompt, and prompt + completion + EOS is the template's rendering of the whole exchange."""
    r = build_text(tok, CHAT, prompt="hi", completion="hello")
    msgs = [{"role": "user", "content": "hi"}]
    assert r.prompt == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "hello"}], tokenize=False)
    assert (r.prompt + r.completion + tok.eos_token) == full.rstrip("\n")
    # the template's default system turn is replaced by ours
    r2 = build_text(tok, PromptFormat(chat_template=True, system_prompt="Be terse."), prompt="hi")
    assert r2.prompt.startswith("<|im_start|>system\nBe terse.<|im_end|>") and "SmolLM" not in r2.prompt
    assert r2.completion is None


def test_conversation_system_turn_wins_over_the_flag(tok):
    conv = [{"role": "system", "content": "Own."}, *CONV]
    r = build_text(tok, PromptFormat(chat_template=True, system_prompt="Flag."), messages=conv)
    assert "Own." in r.prompt and "Flag." not in r.prompt


def test_loss_spans_cover_exactly_the_earlier_assistant_turns(tok):
    r = build_text(tok, CHAT, messages=CONV)
    assert r.completion == "Rome."
    assert [r.prompt[a:b] for a, b in r.loss_spans] == ["Paris.<|im_end|>"]
    mask = token_loss_mask(tok, r.prompt, r.loss_spans)
    ids = tok(r.prompt, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Paris.<|im_end|>"
    # a conversation ending with a user turn is an inference prompt: no completion
    ask = build_text(tok, CHAT, messages=CONV[:3])
    assert ask.completion is None and ask.prompt == r.prompt


def test_one_function_for_training_and_inference(tok):
    """A prompt/completion row and the same exchange as messages give the same text."""
    a = build_text(tok, CHAT, prompt="hi", completion="hello")
    b = build_text(tok, CHAT, messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    assert (a.prompt, a.completion) == (b.prompt, b.completion)


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}], "empty assistant turn"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "last message must be the assistant"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": ["x"]}], "content of type list"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
])
def test_bad_messages_are_named(messages, pattern):
    with pytest.raises(TaskError, match=pattern):
        check_messages(messages, "line 7")


def test_messages_need_a_chat_template(tok, plain_tok):
    with pytest.raises(TaskError, match="need the tokenizer's chat template"):
        build_text(tok, PromptFormat(), messages=CONV)
    with pytest.raises(TaskError, match="has none"):
        build_text(plain_tok, CHAT, prompt="hi")


def test_format_round_trips_through_settings():
    fmt = PromptFormat(chat_template=True, system_prompt="Reply in JSON.")
    assert PromptFormat.from_settings(fmt.settings()) == fmt
    assert PromptFormat.from_settings(None) == PromptFormat()  # artifacts from before formats were recorded
