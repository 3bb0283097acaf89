"""What a task is: examples with a prompt, and either a class or a target to generate.

Everything that trains or evaluates (``lopa.train``, ``lopa.cli``, the benchmarks) sees a task only
through this interface, so a new task is one class and one registry entry.

Example::

    >>> from lopa.tasks.base import Example
    >>> Example(prompt="Review: great fun\\nSentiment:", label=1).label
    1
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

TaskKind = Literal["classification", "generation"]


class TaskError(ValueError):
    """Bad task input (missing column, unknown label, empty split, ...): the message says what to fix."""


@dataclass(frozen=True)
class Example:
    """One instance.

    ``prompt`` is the model's whole input with the template filled in (the soft prompt goes in front
    of it, and the instance encoder reads it). Classification sets ``label`` (a class index);
    generation sets ``target`` (the reference completion used as the training target) and puts what
    its checker needs (tests, entry point, task id, ...) in ``meta``.
    """

    prompt: str
    label: int | None = None
    target: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A named task with fixed, seeded splits.

    Subclasses set ``name`` and ``kind``; classification tasks set ``label_words`` (class i is word i,
    leading spaces kept) and generation tasks implement :meth:`program` and may set ``stop``.
    """

    name: str
    kind: ClassVar[TaskKind]
    label_words: list[str] = []
    template: str = ""
    stop: list[str] = []

    @abstractmethod
    def splits(self) -> dict[str, list[Example]]:
        """Return ``{"train": [...], "dev": [...], "test": [...]}`` (a split may be absent, never empty)."""

    def split(self, name: str) -> list[Example]:
        """One split by name, with a clear error when it does not exist or is empty."""
        splits = self.splits()
        if name not in splits:
            raise TaskError(f"task {self.name!r} has no split {name!r}; it has {sorted(splits)}")
        if not splits[name]:
            raise TaskError(f"split {name!r} of task {self.name!r} is empty")
        return splits[name]

    # generation tasks only
    def program(self, example: Example, completion: str) -> str:
        """The Python source that exits 0 iff ``completion`` solves ``example`` (run in the sandbox)."""
        raise NotImplementedError(f"task {self.name!r} is not a generation task")

    def postprocess(self, completion: str) -> str:
        """Cut a raw completion at the first stop string."""
        cut = len(completion)
        for s in self.stop:
            i = completion.find(s)
            if i != -1:
                cut = min(cut, i)
        return completion[:cut]

    def settings(self) -> dict[str, Any]:
        """What must be recorded in an artifact or run so that the task can be rebuilt."""
        return {"name": self.name, "kind": self.kind, "template": self.template,
                "label_words": list(self.label_words)}


TaskFactory = Callable[..., Task]
TASKS: dict[str, TaskFactory] = {}


def register_task(name: str) -> Callable[[TaskFactory], TaskFactory]:
    """Class decorator: make a task constructible by name through :func:`lopa.tasks.get_task`."""

    def deco(factory: TaskFactory) -> TaskFactory:
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        TASKS[name] = factory
        return factory

    return deco
