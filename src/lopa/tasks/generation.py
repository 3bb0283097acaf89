"""Generation user tasks: the model learns to write a completion, from the user's own data.

Sources:

* a ``.jsonl`` or ``.csv`` file with ``prompt`` and ``completion`` columns, or any columns named by
  ``template=`` (the prompt) and ``target_template=`` (the completion), e.g. ``"{question}"`` and
  ``"{answer}"``;
* a ``.jsonl`` file whose rows hold ``messages`` (a list of ``{"role", "content"}``, the OpenAI/TRL
  chat format): the tokenizer's chat template builds the text and the loss covers the assistant
  turns only (the last turn is the completion; earlier assistant turns are masked in);
* ``hf:OWNER/NAME`` (``hf:OWNER/NAME:CONFIG`` for a configuration): a Hugging Face dataset, loaded
  through ``datasets.load_dataset`` (``pip install 'lopa[hub]'``); ``hf:`` followed by a local folder
  reads a dataset saved with ``save_to_disk`` or a folder of data files, the same way.

Splits: the dataset's own (``train``, ``validation``/``dev``, ``test``), renamed with ``split_map``
(``"train=train,dev=validation,test=test"``, ours=theirs); else a file's ``split`` column; else a
seeded 80/10/10 split. Rows are read and checked at construction (missing columns, empty
completions, bad ``messages``, undecodable files), before any model is loaded.

The prompt format needs the tokenizer, so :meth:`GenerationTask.prepare` renders every row through
:func:`lopa.prompt_format.build_text` once the model is known; rows longer than ``max_length``
tokens lose the start of their prompt (the completion is always kept whole, and the count of cut
rows is reported); a row whose completion alone does not fit is an error.

Example::

    >>> import json, pathlib, tempfile
    >>> from lopa.models import load_base
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "sums.jsonl"
    >>> rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}"} for i in range(20)]
    >>> _ = path.write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> task = GenerationTask(path, chat_template="none")
    >>> _, tok = load_base("tiny-random-llama")
    >>> task.prepare(tok).truncated, {k: len(v) for k, v in task.splits().items()}
    (0, {'train': 16, 'dev': 2, 'test': 2})
    >>> ex = task.split("test")[0]
    >>> ex.prompt, ex.target
    ('14 + 14 =', ' 28')
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import prompt_format as pf
from ._util import seeded_partition
from .base import Example, Task, TaskError
from .classification import jsonl_records, template_slots

HUB_PREFIX = "hf:"
_SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev",
                "test": "test"}
DEFAULT_MAX_LENGTH = 1024


def is_generation_source(source: str | Path, *, target_template: str | None = None) -> bool:
    """Whether a user task source is generation data: a Hub dataset, a target template, or a file
    whose first row has a ``prompt``, ``completion`` or ``messages`` column.

    >>> is_generation_source("hf:openai/gsm8k"), is_generation_source("x.csv", target_template="{y}")
    (True, True)
    """
    text = str(source)
    if text.startswith(HUB_PREFIX) or target_template is not None:
        return True
    path = Path(text).expanduser()
    if not path.is_file():
        return False
    return bool({"prompt", "completion", "messages"} & set(_first_columns(path)))


def _first_columns(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".csv":
                return next(csv.reader(f), [])
            for line in f:
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        return []  # the full read names the bad line
                    return list(rec) if isinstance(rec, dict) else []
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    return []


def _not_utf8(path: Path, e: UnicodeDecodeError) -> TaskError:
    return TaskError(f"{path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                     f"save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def parse_split_map(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"train=train,dev=validation"`` -> ``{"train": "train", "dev": "validation"}`` (ours = theirs).

    >>> parse_split_map("train=train, dev=validation,test=test")
    {'train': 'train', 'dev': 'validation', 'test': 'test'}
    >>> parse_split_map("dev")
    Traceback (most recent call last):
    ...
    lopa.tasks.base.TaskError: --split-map entry 'dev' must read OURS=THEIRS, e.g. dev=validation (ours: train, dev, test)
    """
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in text.split(","):
            if "=" not in part:
                raise TaskError(f"--split-map entry {part.strip()!r} must read OURS=THEIRS, e.g. dev=validation "
                                f"(ours: train, dev, test)")
            a, b = part.split("=", 1)
            items.append((a.strip(), b.strip()))
    out = {}
    for ours, theirs in items:
        if ours not in ("train", "dev", "test") or not theirs:
            raise TaskError(f"--split-map entry {ours}={theirs}: ours must be train, dev or test and theirs a "
                            f"split name of the dataset")
        out[ours] = theirs
    return out


@dataclass(frozen=True)
class _Row:
    where: str
    split: str | None
    prompt: str | None
    completion: str | None
    messages: list[dict[str, str]] | None


class GenerationTask(Task):
    """A generation task from a JSONL/CSV file or a Hugging Face dataset (see the module docstring).

    Args:
        source: the file, or ``hf:OWNER/NAME[:CONFIG]``, or ``hf:`` + a local dataset folder.
        template: the prompt, with ``{slots}`` naming columns (default: the ``prompt`` column).
        target_template: the completion, with ``{slots}`` (default: the ``completion`` column).
        chat_template: ``auto`` (the tokenizer's chat template where it has one) or ``none``.
        system_prompt: put first, as a system turn (chat) or a paragraph (plain).
        split_map: our split names to the dataset's, ``"dev=validation"``.
        max_length: tokens per row (prompt + completion + EOS, the soft prompt not counted).
        seed: fixes the 80/10/10 split when the data has none.
    """

    kind = "generation"

    def __init__(self, source: str | Path, *, template: str | None = None, target_template: str | None = None,
                 chat_template: str | None = "auto", system_prompt: str | None = None,
                 split_map: str | Mapping[str, str] | None = None, max_length: int | None = None, seed: int = 0,
                 label_words: Any = None, data_dir: Any = None) -> None:
        if label_words is not None:
            raise TaskError("label words make a classification task; a generation task learns a completion "
                            "(drop --label-words, or give a file with a 'label' column and no completion)")
        self.chat_mode = chat_template or "auto"
        if self.chat_mode not in pf.CHAT_TEMPLATE_MODES:
            raise TaskError(f"--chat-template must be one of {', '.join(pf.CHAT_TEMPLATE_MODES)}, got {self.chat_mode!r}")
        self.max_length = DEFAULT_MAX_LENGTH if max_length is None else int(max_length)
        if self.max_length < 2:
            raise TaskError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        self.system_prompt = system_prompt or None
        self.template = template or ""
        self.target_template = target_template or ""
        self.seed = seed
        self.split_map = parse_split_map(split_map)
        text = str(source)
        if text.startswith(HUB_PREFIX):
            self.source = text
            self.name = text[len(HUB_PREFIX):].rstrip("/").split("/")[-1].split(":")[0] or "hub"
            columns, records = _read_hub(text[len(HUB_PREFIX):], self.split_map)
        else:
            path = Path(text).expanduser().resolve()
            if not path.is_file():
                raise TaskError(f"task file {path} not found; pass the path of an existing .jsonl or .csv file")
            if self.split_map:
                raise TaskError("--split-map names the splits of a Hugging Face dataset; a file gives its "
                                "splits in a 'split' column")
            self.source, self.name = str(path), path.stem
            columns, records = _read_file(path)
        if not records:
            raise TaskError(f"{self.source} has no rows")
        self.data_format = self._choose_format(columns)
        rows = [self._row(where, split, rec) for where, split, rec in records]
        self._raw = self._split(rows)
        self.format: pf.PromptFormat | None = None
        self.truncated = 0
        self._cache: dict[str, list[Example]] | None = None

    # -- reading -------------------------------------------------------------------------------
    def _choose_format(self, columns: list[str]) -> str:
        where = self.source
        if "messages" in columns and not (self.template or self.target_template):
            if self.chat_mode == "none":
                raise TaskError(f"{where} holds 'messages' conversations, which need the chat template; "
                                f"drop --chat-template none")
            return "messages"
        for tmpl, column, flag in ((self.template, "prompt", "--template"),
                                   (self.target_template, "completion", "--target-template")):
            if tmpl:
                for s in template_slots(tmpl):
                    if s not in columns:
                        raise TaskError(f"{flag} slot {{{s}}} names no column of {where}; its columns are: "
                                        f"{', '.join(columns)}")
            elif column not in columns:
                raise TaskError(f"{where} has no {column!r} column (columns: {', '.join(columns)}); a generation "
                                f"task needs 'prompt' and 'completion' columns, 'messages' conversations, or "
                                f"{flag} naming columns")
        return "prompt-completion"

    def _row(self, where: str, split: str | None, rec: Mapping[str, Any]) -> _Row:
        if self.data_format == "messages":
            if "messages" not in rec:
                raise TaskError(f"{self.source} {where} has no 'messages'")
            msgs = pf.check_messages(rec["messages"], f"{self.source} {where}")
            return _Row(where, split, None, None, msgs)
        prompt = _fill(self.template, rec, f"{self.source} {where}", "prompt")
        completion = _fill(self.target_template, rec, f"{self.source} {where}", "completion")
        if not completion.strip():
            raise TaskError(f"{self.source} {where} has an empty completion; every row needs text to learn")
        return _Row(where, split, prompt, completion, None)

    def _split(self, rows: list[_Row]) -> dict[str, list[_Row]]:
        if any(r.split is not None for r in rows):
            out: dict[str, list[_Row]] = {"train": [], "dev": [], "test": []}
            for r in rows:
                if r.split is None:
                    raise TaskError(f"{self.source} {r.where} has no split while other rows do")
                out[r.split].append(r)
            if not out["train"] and not out["test"]:
                raise TaskError(f"{self.source} has neither a train nor a test split")
            return {k: v for k, v in out.items() if v}
        n = len(rows)
        if n < 10:
            raise TaskError(f"{self.source} has {n} rows, too few for the seeded 80/10/10 split; add rows "
                            f"(10 or more) or a 'split' column")
        parts = seeded_partition(n, {"dev": n // 10, "test": n // 10}, self.seed)
        return {k: [rows[i] for i in parts[k]] for k in ("train", "dev", "test")}

    # -- the model's text ------------------------------------------------------------------------
    def prepare(self, tokenizer: Any) -> "GenerationTask":
        """Render every row in the model's prompt format and apply the length limit (once per tokenizer)."""
        fmt = pf.resolve_format(self.chat_mode, tokenizer, self.system_prompt)
        if self.data_format == "messages" and not fmt.chat_template:
            raise TaskError(f"{self.source} holds 'messages' conversations, but this tokenizer has no chat "
                            f"template; use a chat model or prompt/completion rows")
        out: dict[str, list[Example]] = {}
        truncated, too_long = 0, []
        eos = tokenizer.eos_token_id
        if eos is None:
            raise TaskError("the tokenizer has no EOS token, so a completion's end cannot be learned")
        for split, rows in self._raw.items():
            examples = []
            for i, r in enumerate(rows):
                if r.messages is not None:
                    rendered = pf.build_text(tokenizer, fmt, messages=r.messages)
                else:
                    rendered = pf.build_text(tokenizer, fmt, prompt=r.prompt, completion=r.completion)
                rendered, cut = _fit(tokenizer, rendered, self.max_length)
                if cut is None:
                    too_long.append(r.where)
                    continue
                truncated += cut > 0
                meta: dict[str, Any] = {"index": i, "row": r.where, "prompt_tokens_cut": cut}
                if rendered.loss_spans:
                    meta["loss_spans"] = [list(s) for s in rendered.loss_spans]
                examples.append(Example(prompt=rendered.prompt, target=rendered.completion, meta=meta))
            out[split] = examples
        if too_long:
            raise TaskError(f"{len(too_long)} row(s) of {self.source} have a completion longer than --max-length "
                            f"{self.max_length} tokens on its own (first: {too_long[0]}); raise --max-length or "
                            f"shorten those completions")
        self.format, self.truncated, self._cache = fmt, truncated, out
        return self

    def splits(self) -> dict[str, list[Example]]:
        """Examples in the model's text; needs :meth:`prepare` first (the format depends on the tokenizer)."""
        if self._cache is None:
            raise TaskError(f"generation task {self.name!r} must be prepared with the model's tokenizer first: "
                            f"task.prepare(tokenizer)")
        return dict(self._cache)

    def describe(self) -> str:
        """One line for the start of a run: kind, data format, prompt format, truncation.

        >>> "generation" in GenerationTask.describe.__doc__
        True
        """
        fmt = self.format
        how = ("chat template" if fmt and fmt.chat_template else "plain text") if fmt else f"chat template {self.chat_mode}"
        sys_p = f", system prompt {self.system_prompt!r}" if self.system_prompt else ""
        n = sum(len(v) for v in self._raw.values())
        cut = (f"; {self.truncated} of {n} rows cut to --max-length {self.max_length} (the prompt's start dropped)"
               if self.truncated else f"; {n} rows, none longer than --max-length {self.max_length}")
        return f"task {self.name!r}: generation ({self.data_format} rows, {how}{sys_p}){cut}"

    def settings(self) -> dict[str, Any]:
        """Everything needed to rebuild the task and the model's text (the prompt format included)."""
        return {**super().settings(), "path": self.source, "target_template": self.target_template,
                "chat_template": self.chat_mode, "system_prompt": self.system_prompt,
                "split_map": dict(self.split_map), "max_length": self.max_length, "seed": self.seed,
                "data_format": self.data_format,
                "prompt_format": self.format.settings() if self.format else None}


def _fill(template: str, rec: Mapping[str, Any], where: str, column: str) -> str:
    if template:
        missing = [s for s in template_slots(template) if rec.get(s) is None]
        if missing:
            raise TaskError(f"{where} has no value for column {missing[0]!r} (used by the template)")
        return template.format_map({k: "" if v is None else str(v) for k, v in rec.items()})
    value = rec.get(column)
    if value is None:
        raise TaskError(f"{where} has no {column!r}")
    if not isinstance(value, str):
        raise TaskError(f"{where}: {column!r} must be a string, got {type(value).__name__}")
    return value


def _fit(tokenizer: Any, r: pf.Rendered, max_length: int) -> tuple[pf.Rendered, int | None]:
    """Cut the prompt's start so that prompt + completion + EOS fit in ``max_length`` tokens.

    Returns the row and how many prompt tokens were dropped, or ``None`` when the completion alone
    does not fit (with at least one prompt token before it).
    """
    n_target = len(tokenizer(r.completion or "", add_special_tokens=False)["input_ids"]) + 1
    enc = tokenizer(r.prompt, add_special_tokens=False, return_offsets_mapping=True)
    n_prompt = len(enc["input_ids"])
    if n_prompt + n_target <= max_length:
        return r, 0
    keep = max_length - n_target
    if keep < 1:
        return r, None
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise TaskError("cutting long rows needs a fast tokenizer (one that reports character offsets)")
    start = offsets[n_prompt - keep][0]
    spans = tuple((max(a - start, 0), b - start) for a, b in r.loss_spans if b > start)
    return pf.Rendered(r.prompt[start:], r.completion, spans), n_prompt - keep


def _read_file(path: Path) -> tuple[list[str], list[tuple[str, str | None, dict[str, Any]]]]:
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise TaskError(f"{path}: a user task file must end in .jsonl or .csv")
    records: list[tuple[str, dict[str, Any]]] = []
    try:
        if suffix == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                records = [(f"row {i}", dict(r)) for i, r in enumerate(reader, start=1)]
                columns = list(reader.fieldnames or [])
        else:
            lines = jsonl_records(path)
            columns = list(dict.fromkeys(k for _, rec in lines for k in rec))
            records = [(f"line {lineno}", rec) for lineno, rec in lines]
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from e
    out = []
    for where, rec in records:
        raw = rec.get("split")
        split = None
        if raw is not None:
            split = _SPLIT_NAMES.get(str(raw).strip().lower())
            if split is None:
                raise TaskError(f"{path} {where}: split {raw!r} is not one of train, dev, test")
        out.append((where, split, rec))
    return columns, out


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _read_hub(spec: str, split_map: dict[str, str]) -> tuple[list[str], list[tuple[str, str | None, dict[str, Any]]]]:
    """Rows of a Hugging Face dataset: ``OWNER/NAME[:CONFIG]``, or a local folder (saved by
    ``save_to_disk``, or holding data files) read by the same loader."""
    try:
        import datasets
    except ImportError as e:
        raise TaskError("hf: datasets need the 'datasets' package: pip install 'lopa[hub]'") from e
    local = Path(spec).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file()
                               and (local / "state.json").is_file()):
            ds = datasets.load_from_disk(str(local))
        elif local.is_dir():
            ds = datasets.load_dataset(str(local))
        else:
            name, _, config = spec.partition(":")
            if not _HUB_NAME.match(name):
                raise TaskError(f"hf:{spec} is neither a dataset id (OWNER/NAME[:CONFIG]) nor a local folder")
            ds = datasets.load_dataset(name, config or None)
    except TaskError:
        raise
    except Exception as e:  # no network, unknown dataset, gated repository: the same advice for all
        raise TaskError(f"could not load the Hugging Face dataset {spec!r} ({type(e).__name__}: {e}); check the "
                        f"name and your network, or save it with datasets' save_to_disk and pass hf:<folder>") from e
    if isinstance(ds, datasets.Dataset):
        ds = datasets.DatasetDict({"train": ds})
    if split_map:
        missing = [theirs for theirs in split_map.values() if theirs not in ds]
        if missing:
            raise TaskError(f"--split-map names split(s) {missing} that dataset {spec!r} lacks; it has {list(ds)}")
        chosen = {ours: theirs for ours, theirs in split_map.items()}
    else:
        chosen = {}
        for theirs in ds:
            ours = _SPLIT_NAMES.get(theirs.lower())
            if ours and ours not in chosen:
                chosen[ours] = theirs
        if not chosen:
            raise TaskError(f"dataset {spec!r} has splits {list(ds)}, none named train/validation/test; "
                            f"map them with --split-map train=NAME,test=NAME")
    single = list(chosen) == ["train"]  # one split only: leave the seeded 80/10/10 to the task
    columns: list[str] = []
    rows = []
    for ours, theirs in chosen.items():
        d = ds[theirs]
        columns += [c for c in d.column_names if c not in columns]
        for i, rec in enumerate(d):
            rows.append((f"{theirs} row {i}", None if single else ours, dict(rec)))
    return columns, rows


def generation_inputs(rows: list[Example]) -> dict[str, Any]:
    """Keyword arguments of ``model(texts, **...)`` for generation rows: the targets, and the per-row
    character spans of earlier assistant turns where a conversation has any.

    >>> generation_inputs([Example(prompt="a", target=" b")])
    {'targets': [' b']}
    """
    out: dict[str, Any] = {"targets": [r.target for r in rows]}
    if any(r.meta.get("loss_spans") for r in rows):
        out["prompt_loss_spans"] = [r.meta.get("loss_spans") or [] for r in rows]
    return out


def describe_task(task: Task) -> str:
    """The line a run prints first: which kind of task this is and how its text is built."""
    if isinstance(task, GenerationTask):
        return task.describe()
    if task.kind == "classification":
        return f"task {task.name!r}: classification ({len(task.label_words)} classes, template {task.template!r})"
    return f"task {task.name!r}: generation (built-in, checked by running its tests)"


__all__ = ["GenerationTask", "HUB_PREFIX", "describe_task", "generation_inputs", "is_generation_source",
           "parse_split_map"]
