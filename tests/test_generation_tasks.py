"""Generation user tasks (lopa.tasks.generation): files, chat conversations, Hub datasets through a local
folder, the prompt format, truncation, the loss masks, bad input, and `lopa train` / `lopa eval` end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lopa import prefix
from lopa.cli import main
from lopa.tasks import GenerationTask, TaskError, get_task
from lopa.tasks.classification import UserTask
from lopa.tasks.generation import generation_inputs

TINY = ["--model", "tiny-random-llama", "--no-progress", "--no-zero-shot"]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pairs(n: int = 20) -> list[dict]:
    return [{"prompt": f"Double {i}:", "completion": f" {2 * i}"} for i in range(n)]


def _chats(n: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."},
                          {"role": "user", "content": "Again."}, {"role": "assistant", "content": f"{i} again."}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def tok(tiny_base):
    return tiny_base[1]


# -- sources and formats -------------------------------------------------------------------------

def test_prompt_completion_jsonl_plain(tmp_path, tok):
    task = get_task(_jsonl(tmp_path / "d.jsonl", _pairs()), chat_template="none")
    assert isinstance(task, GenerationTask) and task.kind == "generation"
    task.prepare(tok)
    sizes = {k: len(v) for k, v in task.splits().items()}
    assert sizes == {"train": 16, "dev": 2, "test": 2}
    every = [e for v in task.splits().values() for e in v]
    assert sorted(e.prompt for e in every) == sorted(r["prompt"] for r in _pairs())
    assert all(e.target == f" {2 * int(e.prompt.split()[1][:-1])}" for e in every)
    # the split is seeded: the same seed gives the same split, another seed another one
    again = get_task(tmp_path / "d.jsonl", chat_template="none").prepare(tok)
    other = get_task(tmp_path / "d.jsonl", chat_template="none", seed=1).prepare(tok)
    assert [e.prompt for e in again.split("test")] == [e.prompt for e in task.split("test")]
    assert [e.prompt for e in other.split("test")] != [e.prompt for e in task.split("test")]


def test_csv_with_templates_and_split_column(tmp_path, tok):
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer", "split"])
        w.writeheader()
        for i in range(6):
            w.writerow({"question": f"q{i}", "answer": f"a{i}", "split": ["train", "validation", "test"][i % 3]})
    task = get_task(path, template="Question: {question}\nAnswer:", target_template=" {answer}",
                    chat_template="none").prepare(tok)
    assert {k: len(v) for k, v in task.splits().items()} == {"train": 2, "dev": 2, "test": 2}
    ex = task.split("dev")[0]
    assert (ex.prompt, ex.target) == ("Question: q1\nAnswer:", " a1")
    s = task.settings()
    assert s["kind"] == "generation" and s["target_template"] == " {answer}"
    assert s["prompt_format"] == {"chat_template": False, "system_prompt": None}


def test_chat_template_auto_and_system_prompt(tmp_path, tok):
    task = get_task(_jsonl(tmp_path / "d.jsonl", _pairs()), system_prompt="Reply with a number.").prepare(tok)
    ex = task.split("test")[0]
    assert ex.prompt.startswith("<|im_start|>system\nReply with a number.<|im_end|>\n<|im_start|>user\nDouble ")
    assert ex.prompt.endswith("<|im_start|>assistant\n") and ex.target.startswith(" ")
    assert task.settings()["prompt_format"] == {"chat_template": True, "system_prompt": "Reply with a number."}
    assert "chat template" in task.describe() and "generation" in task.describe()


def test_messages_rows_mask_earlier_assistant_turns(tmp_path, tok):
    task = get_task(_jsonl(tmp_path / "chat.jsonl", _chats())).prepare(tok)
    assert task.data_format == "messages"
    ex = task.split("train")[0]
    i = ex.target.split()[0]
    assert ex.target == f"{i} again."
    assert [ex.prompt[a:b] for a, b in ex.meta["loss_spans"]] == [f"{i}.<|im_end|>"]
    assert generation_inputs([ex])["prompt_loss_spans"] == [ex.meta["loss_spans"]]


def test_hub_path_through_a_saved_dataset(tmp_path, tok):
    """hf:<folder> goes through the same loader as hf:OWNER/NAME: splits renamed, columns checked."""
    datasets = pytest.importorskip("datasets")
    rows = {s: datasets.Dataset.from_list(_pairs(n)) for s, n in (("train", 8), ("validation", 3), ("test", 4))}
    datasets.DatasetDict(rows).save_to_disk(str(tmp_path / "saved"))
    task = get_task(f"hf:{tmp_path / 'saved'}", chat_template="none").prepare(tok)
    assert {k: len(v) for k, v in task.splits().items()} == {"train": 8, "dev": 3, "test": 4}
    # a folder of data files, as a Hub repository holds them, with --split-map
    (tmp_path / "files").mkdir()
    rows["train"].to_json(str(tmp_path / "files" / "train.jsonl"))
    rows["test"].to_json(str(tmp_path / "files" / "test.jsonl"))
    mapped = get_task(f"hf:{tmp_path / 'files'}", split_map="train=test,test=train", chat_template="none").prepare(tok)
    assert {k: len(v) for k, v in mapped.splits().items()} == {"train": 4, "test": 8}
    with pytest.raises(TaskError, match="lacks"):
        get_task(f"hf:{tmp_path / 'files'}", split_map="dev=validation")


def test_hub_dataset_with_one_split_gets_the_seeded_split(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(_pairs(20)).save_to_disk(str(tmp_path / "one"))
    task = get_task(f"hf:{tmp_path / 'one'}", chat_template="none").prepare(tok)
    assert {k: len(v) for k, v in task.splits().items()} == {"train": 16, "dev": 2, "test": 2}
    assert task.settings()["path"] == f"hf:{tmp_path / 'one'}"


def test_unreachable_hub_dataset_is_a_task_error(tmp_path):
    pytest.importorskip("datasets")
    code = ("from lopa.tasks import get_task, TaskError\n"
            "try:\n    get_task('hf:no-such-owner/no-such-dataset')\n"
            "except TaskError as e:\n    print('TaskError:', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "TaskError: could not load the Hugging Face dataset 'no-such-owner/no-such-dataset'" in out.stdout, out.stderr


def test_routing_by_columns_and_options(tmp_path):
    labelled = _jsonl(tmp_path / "labels.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(10)])
    assert isinstance(get_task(labelled, template="{text} It was", label_words=" no, yes"), UserTask)
    assert isinstance(get_task(labelled, template="{text}", target_template=" {label}"), GenerationTask)
    with pytest.raises(TaskError, match="generation user tasks only"):
        get_task("mbpp", data_dir=".", system_prompt="x")
    with pytest.raises(TaskError, match="generation user tasks only"):
        get_task(labelled, template="{text} It was", label_words=" no, yes", chat_template="none")


# -- truncation -----------------------------------------------------------------------------------

def test_long_prompts_lose_their_start_and_are_counted(tmp_path, tok):
    rows = _pairs()
    rows[3]["prompt"] = "word " * 300 + "Double 3:"
    task = get_task(_jsonl(tmp_path / "d.jsonl", rows), chat_template="none", max_length=64).prepare(tok)
    assert task.truncated == 1 and "1 of 20 rows cut" in task.describe()
    cut = next(e for v in task.splits().values() for e in v if e.meta["prompt_tokens_cut"])
    assert cut.prompt.endswith("Double 3:") and cut.target == " 6"
    n = len(tok(cut.prompt, add_special_tokens=False)["input_ids"]) + len(tok(cut.target, add_special_tokens=False)["input_ids"]) + 1
    assert n <= 64


def test_truncated_conversation_keeps_its_masks_aligned(tmp_path, tok):
    rows = _chats()
    rows[0]["messages"][0]["content"] = "blah " * 200
    task = get_task(_jsonl(tmp_path / "c.jsonl", rows), max_length=48).prepare(tok)
    ex = next(e for v in task.splits().values() for e in v if e.meta["prompt_tokens_cut"])
    assert [ex.prompt[a:b] for a, b in ex.meta["loss_spans"]] == ["0.<|im_end|>"]


# -- bad input, before any training ---------------------------------------------------------------

@pytest.mark.parametrize("rows, kwargs, pattern", [
    ([{"prompt": "a", "answer": "b"}] * 12, {}, "no 'completion' column"),
    ([{"question": "a", "completion": "b"}] * 12, {}, "no 'prompt' column"),
    ([{"q": "a", "completion": "b"}] * 12, {"template": "{question}"}, r"--template slot \{question\}"),
    ([*_pairs(11), {"prompt": "x", "completion": "  "}], {}, "line 12 has an empty completion"),
    ([{"messages": [{"role": "user", "content": "hi"}]}] * 12, {}, "line 1: the conversation has no assistant turn"),
    ([{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 12, {},
     "role 'human'"),
    (_chats(), {"chat_template": "none"}, "need the chat template"),
    (_pairs(5), {}, "too few"),
    ([*_pairs(11), {"prompt": 3, "completion": "x"}], {}, "'prompt' must be a string"),
])
def test_bad_rows_are_refused_at_construction(tmp_path, rows, kwargs, pattern):
    with pytest.raises(TaskError, match=pattern):
        get_task(_jsonl(tmp_path / "bad.jsonl", rows), **kwargs)


def test_completion_longer_than_the_limit_is_an_error(tmp_path, tok):
    rows = _pairs()
    rows[5]["completion"] = " ok" * 100
    task = get_task(_jsonl(tmp_path / "d.jsonl", rows), chat_template="none", max_length=32)
    with pytest.raises(TaskError, match=r"1 row\(s\) .* completion longer than --max-length 32 .*line 6"):
        task.prepare(tok)


def test_non_utf8_file_is_named(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(TaskError, match="not UTF-8"):
        get_task(path)
    csv_path = tmp_path / "latin.csv"
    csv_path.write_bytes(b"text,label\ncaf\xe9,1\n")
    with pytest.raises(TaskError, match="not UTF-8"):
        get_task(csv_path, template="{text}", label_words=" a, b")


def test_splits_need_prepare(tmp_path):
    task = get_task(_jsonl(tmp_path / "d.jsonl", _pairs()))
    with pytest.raises(TaskError, match=r"prepare\(tokenizer\)"):
        task.split("train")


# -- the loss -------------------------------------------------------------------------------------

def test_conversation_loss_covers_assistant_tokens_only(make_model, tmp_path):
    """The masked loss equals the cross-entropy over exactly the assistant tokens (earlier turn, last
    turn, EOS) of a full forward pass."""
    model = make_model("prompt-tuning", num_virtual_tokens=3).eval()
    tok = model.tokenizer
    task = get_task(_jsonl(tmp_path / "c.jsonl", _chats())).prepare(tok)
    rows = task.split("train")[:2]
    loss = model([e.prompt for e in rows], **generation_inputs(rows))
    from lopa.prompt_format import token_loss_mask
    logps, n = [], 0
    for e in rows:
        tgt = tok(e.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        p_ids = tok(e.prompt, add_special_tokens=False)["input_ids"]
        ids = p_ids + tgt
        mask = token_loss_mask(tok, e.prompt, e.meta["loss_spans"]) + [True] * len(tgt)
        batch = prefix.assemble(model.base, model.soft_prompts([e.prompt]), [ids])
        with torch.no_grad():
            logits = model.base(**batch.model_inputs()).logits[0, -len(ids) - 1:-1].float()
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids), reduction="none")
        logps.append(ce[torch.tensor(mask)].sum())
        n += sum(mask)
        assert sum(mask) > len(tgt)  # the earlier assistant turn is in the loss
    assert torch.allclose(loss, torch.stack(logps).sum() / n, atol=1e-5)


# -- end to end through the CLI -------------------------------------------------------------------

def test_train_then_eval_a_generation_task(tmp_path, capsys):
    data = _jsonl(tmp_path / "pairs.jsonl", _pairs(30))
    out = tmp_path / "run"
    rc = main(["train", "--method", "prompt-tuning", "--task", str(data), "--out", str(out), "--max-steps", "4",
               "--eval-every", "2", "--batch-size", "4", "--dev-metric", "rouge_l", "--system-prompt", "Numbers only.",
               *TINY])
    assert rc == 0
    captured = capsys.readouterr()
    assert "task 'pairs': generation (prompt-completion rows, chat template" in captured.err
    assert captured.err.count("  reference ") >= 3  # samples beside their references at each evaluation
    results = json.loads((out / "results.json").read_text())
    assert results["test"]["n"] == 3 and {"rouge_l", "exact_match", "perplexity", "mean_log_likelihood"} <= set(results["test"])
    assert "best_dev_rouge_l" in results
    meta = json.loads((out / "best" / "soft_prompt_config.json").read_text())
    assert meta["task"]["prompt_format"] == {"chat_template": True, "system_prompt": "Numbers only."}

    assert main(["eval", str(out), "--split", "test", "--max-new-tokens", "8"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n"] == 3 and 0 <= line["rouge_l"] <= 1 and line["perplexity"] > 1
    assert line["mean_log_likelihood"] == pytest.approx(results["test"]["mean_log_likelihood"], abs=1e-4)
    rows = [json.loads(x) for x in (out / "eval-test.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"completion", "reference", "rouge_l", "exact_match"} <= set(rows[0])


def test_bad_generation_input_stops_train_before_training(tmp_path, capsys):
    data = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 12)
    out = tmp_path / "run"
    assert main(["train", "--method", "prompt-tuning", "--task", str(data), "--out", str(out), *TINY]) == 2
    assert "no assistant turn" in capsys.readouterr().err and not out.exists()


def test_the_recorded_settings_rebuild_the_same_task(tmp_path, tok):
    """An artifact's task record (``settings()``) is the one record lopa eval rebuilds a task from."""
    from lopa.tasks import task_from_settings
    path = tmp_path / "qa.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["question", "answer"])
        w.writeheader()
        w.writerows({"question": f"q{i}", "answer": f"a{i}"} for i in range(30))
    task = get_task(path, template="Q: {question}\nA:", target_template=" {answer}", system_prompt="Be brief.",
                    max_length=64, seed=3).prepare(tok)
    again = task_from_settings(json.loads(json.dumps(task.settings()))).prepare(tok)  # as read from JSON
    assert again.settings() == task.settings()
    for split in ("train", "dev", "test"):
        assert [(e.prompt, e.target) for e in again.split(split)] == [(e.prompt, e.target) for e in task.split(split)]


def test_a_generation_run_is_compared_with_zero_shot_item_by_item(tmp_path, capsys):
    """Exact match and ROUGE-L get a paired 95% interval against the bare model on the same test rows."""
    data = _jsonl(tmp_path / "pairs.jsonl", _pairs(30))
    out = tmp_path / "run"
    assert main(["train", "--method", "prompt-tuning", "--task", str(data), "--out", str(out), "--max-steps", "2",
                 "--eval-every", "2", "--batch-size", "4", "--chat-template", "none", "--model", "tiny-random-llama",
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    by_metric = results["vs_zero_shot_by_metric"]
    assert set(by_metric) == {"exact_match", "rouge_l"} and results["vs_zero_shot"]["metric"] == "rouge_l"
    preds = json.loads((out / "predictions.json").read_text())
    for m, d in by_metric.items():
        a, b = preds["test_items"][m], preds["zero_shot_items"][m]
        assert len(a) == len(b) == results["test"]["n"] == 3
        assert d["difference"] == pytest.approx(sum(a) / 3 - sum(b) / 3)
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
        assert results["test"][m] == pytest.approx(sum(a) / 3) and results["zero_shot"][m] == pytest.approx(sum(b) / 3)
    assert not any(k.endswith("_items") for k in results["test"])  # kept apart, in predictions.json
    assert "over zero-shot (paired 95% CI" in capsys.readouterr().out


def test_the_headline_follows_the_dev_metric_the_user_chose(tmp_path, capsys):
    """--dev-metric exact_match picks checkpoints by exact match, so the last line compares exact match too."""
    data = _jsonl(tmp_path / "pairs.jsonl", _pairs(30))
    out = tmp_path / "run"
    assert main(["train", "--method", "prompt-tuning", "--task", str(data), "--out", str(out), "--max-steps", "2",
                 "--eval-every", "2", "--batch-size", "4", "--chat-template", "none", "--model", "tiny-random-llama",
                 "--dev-metric", "exact_match", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["vs_zero_shot"] == results["vs_zero_shot_by_metric"]["exact_match"]
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("test "))
    assert line.startswith("test exact_match:") and "zero-shot exact_match:" in line


def test_eval_of_a_user_file_named_like_a_builtin_task_on_that_builtin(tmp_path, capsys):
    """A user's mbpp.jsonl is recorded by its path; `lopa eval RUN --task mbpp` means the built-in MBPP
    (its own fixed format), not the file's chat and length settings; a task that cannot be built is one
    clear line, not a traceback."""
    from lopa.tasks import task_from_settings
    data = _jsonl(tmp_path / "mbpp.jsonl", _pairs(30))
    record = get_task(data, chat_template="none", max_length=64).settings()
    assert record["name"] == "mbpp" and record["path"] == str(data)
    assert task_from_settings(record, task="mbpp", data_dir=tmp_path).name == "mbpp"  # no generation settings passed
    assert task_from_settings(record).settings()["max_length"] == 64  # the recorded file, as recorded

    out = tmp_path / "run"
    assert main(["train", "--method", "prompt-tuning", "--task", str(data), "--out", str(out), "--max-steps", "2",
                 "--eval-every", "2", "--batch-size", "4", "--chat-template", "none", "--no-test", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--task", "rotten-tomatoes", "--template", "{nope}", "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lopa eval: error:") and "Traceback" not in err
