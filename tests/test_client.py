"""lopa.Client and the wrapper apply the prompt format an artifact records (plain or chat template,
system prompt) with the function training used, so a trained soft prompt meets the model's text in
the format it was trained in; the client reaches the model through a transport (in-process here)."""

from __future__ import annotations

import lopa
import pytest

from lopa.client import Client, ClientError
from lopa.prompt_format import PromptFormat, build_text

SYSTEM = "Answer in one word."
CHAT_TASK = {"name": "qa", "kind": "generation", "template": "Q: {q}\nA:",
             "prompt_format": {"chat_template": True, "system_prompt": SYSTEM}}
CONV = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def chat_artifact(tiny_base, tmp_path_factory):
    base, tok = tiny_base
    model = lopa.SoftPromptModel(base, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=3, seed=1),
                                 task=CHAT_TASK)
    return model.save_pretrained(tmp_path_factory.mktemp("chat") / "a"), model


def test_client_and_wrapper_build_the_training_text(tiny_base, chat_artifact):
    path, model = chat_artifact
    _, tok = tiny_base
    fmt = PromptFormat(chat_template=True, system_prompt=SYSTEM)
    with Client(path) as client:
        assert client.prompt_format == model.prompt_format == fmt
        want = build_text(tok, fmt, prompt="Q: blue?\nA:").prompt
        assert client.build_prompt("Q: blue?\nA:") == model.build_prompt("Q: blue?\nA:") == want
        assert want.startswith("<|im_start|>system\n" + SYSTEM) and want.endswith("<|im_start|>assistant\n")
        assert client.format(q="blue?") == want  # the recorded template, then the recorded format
        conv_text = build_text(tok, fmt, messages=CONV).prompt
        assert client.build_prompt(messages=CONV) == model.build_prompt(messages=CONV) == conv_text
        # chat() is generate() on that text, in the client and in the wrapper alike
        assert client.chat([CONV], max_new_tokens=4) == client.generate([conv_text], max_new_tokens=4)
        assert model.chat([CONV], max_new_tokens=4) == client.chat([CONV], max_new_tokens=4)


def test_a_plain_artifact_leaves_prompts_as_they_are(tiny_base, tmp_path):
    base, tok = tiny_base
    task = {"template": "{text} It was", "label_words": [" bad", " good"]}  # no recorded format: plain
    path = lopa.SoftPromptModel(base, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=2),
                                task=task).save_pretrained(tmp_path / "a")
    with Client(path) as client:
        assert client.format(text="fine") == "fine It was" and client.build_prompt("x y") == "x y"
        with pytest.raises(ClientError, match="chat template"):
            client.build_prompt(messages=CONV)  # a conversation needs a chat-format artifact


def test_the_client_talks_to_a_transport(chat_artifact):
    from lopa.transport import InProcess, Sampling
    path, _ = chat_artifact
    with Client(path) as client:
        assert isinstance(client.transport, InProcess) and client.transport.hidden_size == 64
        z = client.soft_prompt(["a"])
        assert client.transport.generate(["a"], z, Sampling(max_new_tokens=3)) == \
            client.generate(["a"], max_new_tokens=3)
