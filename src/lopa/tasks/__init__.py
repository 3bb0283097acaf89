"""Tasks by name: built-in classification and code tasks, and user tasks from JSONL/CSV files.

Example::

    >>> from lopa.tasks import get_task, list_tasks
    >>> "sst2" in list_tasks() and "mbpp" in list_tasks()
    True
    >>> task = get_task("cruxeval-o", data_dir="/work/shared/data")   # doctest: +SKIP
    >>> len(task.split("test"))                                      # doctest: +SKIP
    400
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import classification, code  # noqa: F401  (importing registers the built-in tasks)
from ._util import DATA_DIR_ENV, resolve_data_dir
from .base import TASKS, Example, Task, TaskError, register_task
from .classification import UserTask
from .generation import HUB_PREFIX, GenerationTask, describe_task, generation_inputs, is_generation_source

USER_TASK_SUFFIXES = (".jsonl", ".csv")


def list_tasks() -> list[str]:
    """Names of the built-in tasks, sorted.

    >>> list_tasks()[:3]
    ['cruxeval-i', 'cruxeval-o', 'humaneval']
    """
    return sorted(TASKS)


def get_task(name_or_path: str | Path, *, data_dir: str | Path | None = None,
             template: str | None = None, label_words: Sequence[str] | str | None = None,
             seed: int = 0, target_template: str | None = None, chat_template: str | None = None,
             system_prompt: str | None = None, split_map: str | None = None, max_length: int | None = None,
             **kw: Any) -> Task:
    """Build a task from a built-in name, a ``.jsonl``/``.csv`` file or ``hf:OWNER/NAME`` (user tasks).

    A user task is generation (:class:`~lopa.tasks.generation.GenerationTask`) when it comes from the
    Hub, has a ``target_template``, or its file has ``prompt``, ``completion`` or ``messages`` columns, and no
    ``label_words`` are given; otherwise classification. ``target_template``, ``chat_template``
    (``auto``/``none``), ``system_prompt``, ``split_map`` and ``max_length`` apply to generation user
    tasks only.

    ``data_dir`` (where ``mbpp/``, ``cruxeval/`` and ``glue/`` live) defaults to ``$LOPA_DATA_DIR``,
    else ``../shared/data`` relative to the current directory. ``template`` and ``label_words``
    override a classification task's defaults and are required for a user task; ``label_words``
    may be a comma-separated string whose leading spaces are kept (``" terrible, great"``).
    ``seed`` fixes the splits. Names are matched ignoring case, ``_`` and ``-`` (``SST-2`` = ``sst2``).

    >>> get_task("sst2", data_dir="/nonexistent").label_words  # doctest: +SKIP
    [' terrible', ' great']
    >>> get_task("no-such-task")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lopa.tasks.base.TaskError: unknown task 'no-such-task'; built-in tasks: ...
    """
    text = str(name_or_path)
    gen = dict(target_template=target_template, chat_template=chat_template, system_prompt=system_prompt,
               split_map=split_map, max_length=max_length)
    is_user = text.startswith(HUB_PREFIX) or text.lower().endswith(USER_TASK_SUFFIXES)
    if is_user and label_words is None and is_generation_source(text, target_template=target_template):
        return GenerationTask(text, template=template, seed=seed, **gen, **kw)
    given = [k for k, v in gen.items() if v is not None and not (k == "chat_template" and v == "auto")]
    if given:
        raise TaskError(f"{', '.join(given)} apply to generation user tasks only (a file with prompt/completion "
                        f"or messages rows, or hf:OWNER/NAME); task {text!r} is not one")
    if is_user:
        return UserTask(text, template=template, label_words=label_words, seed=seed, **kw)

    def key(s: str) -> str:
        return s.strip().lower().replace("_", "").replace("-", "")

    matches = [n for n in TASKS if key(n) == key(text)]
    if not matches:
        raise TaskError(f"unknown task {text!r}; built-in tasks: {', '.join(list_tasks())}; or give the "
                        f"path of a {'/'.join(USER_TASK_SUFFIXES)} file with template= and label_words=")
    return TASKS[matches[0]](data_dir=data_dir, template=template, label_words=label_words, seed=seed, **kw)


# a generation user task's settings: recorded by its settings() and given back to get_task by name
GENERATION_SETTINGS = ("target_template", "chat_template", "system_prompt", "split_map", "max_length")


def task_from_settings(record: dict[str, Any], *, task: str | None = None, data_dir: str | Path | None = None,
                       template: str | None = None, label_words: Sequence[str] | str | None = None) -> Task:
    """Rebuild the task an artifact records (``Task.settings()``, kept under ``"task"`` in every artifact
    and in a run's ``best/``), with what the caller overrides. This is the only reader of that record.

    Another ``task`` than the recorded one keeps the recorded template and label words (unless
    overridden) but not the recorded splits' seed or a generation task's format settings.

    >>> t = get_task("sst2", data_dir="/nonexistent", template="{sentence} So it was")
    >>> task_from_settings(t.settings()).template
    '{sentence} So it was'
    >>> task_from_settings({})
    Traceback (most recent call last):
    ...
    lopa.tasks.base.TaskError: the artifact records no task: pass --task (and --template, --label-words)
    """
    recorded = record.get("path") or record.get("name")
    name = task or recorded
    if not name:
        raise TaskError("the artifact records no task: pass --task (and --template, --label-words)")
    # a file or hf: task is named by its path; its name (the file's stem) may be a built-in's, as a user's
    # mbpp.jsonl is named "mbpp": --task mbpp then means the built-in task, not the recorded file
    same = task is None or task == recorded or (task == record.get("name") and not record.get("path"))
    gen = {k: record[k] for k in GENERATION_SETTINGS if same and record.get(k) not in (None, "", {})}
    return get_task(name, data_dir=data_dir or record.get("data_dir"), template=template or record.get("template") or None,
                    label_words=label_words or record.get("label_words") or None,
                    seed=int(record.get("seed", 0)) if same else 0, **gen)


__all__ = ["DATA_DIR_ENV", "GENERATION_SETTINGS", "Example", "GenerationTask", "TASKS", "Task", "TaskError", "describe_task",
           "generation_inputs", "get_task", "list_tasks", "register_task", "resolve_data_dir", "task_from_settings"]
