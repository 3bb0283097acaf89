"""The gateway's tasks: each a loaded artifact (generator, encoder, recorded task and prompt format)
under the name clients send as ``model``.

:func:`load_tasks` loads every artifact before the gateway listens, so a missing or corrupt
directory stops the start with a message naming its path; :func:`width_problems` compares each
task with what the upstream serves (its ``/health``: width and the most virtual tokens it takes).

Example::

    >>> import tempfile, torch
    >>> from lopa.artifact import save_artifact
    >>> from lopa.methods import InitContext, build_generator, make_config
    >>> gen = build_generator(make_config("prompt-tuning", num_virtual_tokens=3), InitContext(torch.randn(9, 8)))
    >>> d = save_artifact(tempfile.mkdtemp(), gen, base_name="m8", hidden_size=8,
    ...                   task={"kind": "generation", "prompt_format": {"chat_template": True, "system_prompt": "Hi."}})
    >>> tasks = load_tasks({"greeter": d})
    >>> t = tasks["greeter"]
    >>> t.compute(["any text"]).shape, t.fmt.system_prompt, t.needs_text
    (torch.Size([1, 3, 8]), 'Hi.', False)
    >>> width_problems(tasks, {"model": "m16", "hidden_size": 16, "max_soft_tokens": 64}, "http://up")  # doctest: +ELLIPSIS
    ["task 'greeter' (...) was trained for a base model of width 8 ('m8'), but the upstream at http://up serves 'm16' of width 16"]
    >>> load_tasks({"gone": "/no/such/dir"})
    Traceback (most recent call last):
    ...
    lopa.gateway.registry.GatewayError: task 'gone': artifact directory /no/such/dir does not exist
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..artifact import Artifact, ArtifactError, load_artifact
from ..encoders import Encoder
from ..prompt_format import PromptFormat
from ..soft_prompt import compute, load_instance_encoder
from ..tasks.base import TaskError


class GatewayError(RuntimeError):
    """The gateway cannot start as configured (an artifact it cannot load, an upstream it cannot serve)."""


@dataclass
class Task:
    """One served task: ``compute(texts)`` gives its soft prompts (B × m × d, float32, on the CPU)."""

    name: str
    path: Path
    artifact: Artifact
    encoder: Encoder | None
    fmt: PromptFormat
    problem: str | None = None
    """why the upstream cannot serve this task (a width it does not have); None while it can"""

    @property
    def needs_text(self) -> bool:
        """Whether the soft prompt depends on the text (an instance-dependent method reads it)."""
        return bool(self.artifact.generator.needs_features)

    @property
    def kind(self) -> str:
        return str(self.artifact.task.get("kind") or "")

    @property
    def label_words(self) -> list[str]:
        return list(self.artifact.task.get("label_words") or [])

    def check(self, text: str) -> None:
        """A ValueError when this task's encoder cannot read ``text`` (a field-reading encoder and a text
        its template did not make)."""
        if self.encoder is not None:
            self.encoder.check([text])

    @torch.no_grad()
    def compute(self, texts: Sequence[str]) -> torch.Tensor:
        return compute(self.artifact.generator, self.encoder, list(texts)).cpu()

    def describe(self) -> dict[str, Any]:
        """What ``/health`` says of the task."""
        a = self.artifact
        return {"method": a.config.method, "kind": self.kind or None, "base_model": a.base_model or None,
                "hidden_size": a.hidden_size, "virtual_tokens": a.num_output_tokens,
                "instance_dependent": self.needs_text, "chat_template": self.fmt.chat_template,
                "ready": self.problem is None, "problem": self.problem}


def load_task(name: str, path: str | Path, device: str = "cpu") -> Task:
    """Load one artifact as a task; every failure is a :class:`GatewayError` naming the task and path."""
    path = Path(path)
    try:
        artifact = load_artifact(path)
    except ArtifactError as e:
        raise GatewayError(f"task {name!r}: {e}") from None
    config = artifact.config
    if getattr(config, "encoder", None) == "self":
        raise GatewayError(f"task {name!r} ({path}): its encoder is 'self' (the base model's own embeddings), "
                           f"which needs the base model's weights; the gateway holds none. Serve it with "
                           f"lopa.Client in-process, or train it with another --encoder")
    try:
        encoder = load_instance_encoder(config, path, encoder_dim=artifact.encoder_dim,
                                        task=artifact.task)
        fmt = PromptFormat.from_settings(artifact.task.get("prompt_format"))
    except (ValueError, TaskError, OSError) as e:
        raise GatewayError(f"task {name!r} ({path}): {e}") from None
    artifact.generator.to(device).eval()
    if encoder is not None:
        encoder.to(device).eval()
    return Task(name, path, artifact, encoder, fmt)


def load_tasks(dirs: Mapping[str, str | Path], device: str = "cpu") -> dict[str, Task]:
    """Every task of ``dirs`` (name → artifact directory), in order."""
    out = {}
    for name, path in dirs.items():
        if not Path(path).is_dir():
            raise GatewayError(f"task {name!r}: artifact directory {path} does not exist")
        out[name] = load_task(name, path, device)
    return out


def width_problems(tasks: Mapping[str, Task], health: Mapping[str, Any], url: str) -> list[str]:
    """Why the upstream (its ``/health`` answer) cannot serve some tasks; each task's ``problem`` is set.

    A task fits when its width equals the upstream's and its soft prompts are no longer than the
    upstream takes. An empty list: every task can be served.
    """
    width, model = health.get("hidden_size"), health.get("model")
    most = health.get("max_soft_tokens")
    problems = []
    for t in tasks.values():
        a = t.artifact
        if a.hidden_size != width:
            t.problem = (f"task {t.name!r} ({t.path}) was trained for a base model of width {a.hidden_size} "
                         f"({a.base_model!r}), but the upstream at {url} serves {model!r} of width {width}")
        elif isinstance(most, int) and a.num_output_tokens > most:
            t.problem = (f"task {t.name!r} ({t.path}) has soft prompts of {a.num_output_tokens} tokens, but the "
                         f"upstream at {url} takes at most {most} (its --max-soft-tokens)")
        else:
            t.problem = None
        if t.problem:
            problems.append(t.problem)
    return problems
