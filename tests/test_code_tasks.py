"""Code tasks end to end: `lopa train` → `lopa eval` with pass@k on the tiny model, the generation loss,
and the task programs + sandbox pipeline scored with an oracle "model" that returns the references."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lopa
from lopa.cli import main
from lopa.evaluate import evaluate_generation, score
from lopa.tasks import get_task

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
STATUSES = {"passed", "failed", "timeout", "memory", "fsize", "killed", "error"}




pytestmark = pytest.mark.usefixtures("one_torch_thread")

def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_then_eval_pass_at_k_through_the_cli(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--method", "prompt-tuning", "--task", "cruxeval-o", "--data-dir", str(DATA),
               "--model", "tiny-random-llama", "--out", str(run), "--max-steps", "4", "--eval-every", "2",
               "--batch-size", "4", "--eval-limit", "8", "--test-limit", "8", "--num-virtual-tokens", "4",
               "--no-zero-shot", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test pass@1:" in printed
    results = json.loads((run / "results.json").read_text())
    assert results["test"]["n"] == 8 and 0.0 <= results["test"]["pass@1"] <= 1.0
    assert results["best_dev_neg_loss"] < 0  # the dev metric of generation tasks is minus the target loss
    assert [m["step"] for m in _rows(run / "metrics.jsonl")] == [2, 4]
    assert (run / "best" / "soft_prompt.safetensors").exists()

    # sampled: pass@1 and pass@2, two completions and two statuses per problem
    assert main(["eval", str(run), "--limit", "8", "--n-samples", "2", "--temperature", "0.8",
                 "--max-new-tokens", "16"]) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["task"] == "cruxeval-o" and res["split"] == "test" and res["n"] == 8
    assert res["samples_per_problem"] == 2 and 0.0 <= res["pass@1"] <= res["pass@2"] <= 1.0
    rows = _rows(run / "eval-test.jsonl")
    test_ids = [e.meta["id"] for e in get_task("cruxeval-o", data_dir=DATA).split("test")[:8]]
    assert [r["id"] for r in rows] == test_ids
    for r in rows:
        assert r["n"] == 2 and len(r["completions"]) == 2 and len(r["status"]) == 2
        assert set(r["status"]) <= STATUSES and r["passed"] == r["status"].count("passed")
        assert all("\n" not in c for c in r["completions"])  # cut at cruxeval-o's stop string
    assert res["pass@1"] == pytest.approx(sum(r["passed"] for r in rows) / 16)

    # greedy, results to a chosen file: one sample, a Wilson interval around pass@1
    greedy = tmp_path / "greedy.jsonl"
    assert main(["eval", str(run), "--limit", "8", "--max-new-tokens", "16", "--batch-size", "3",
                 "--results", str(greedy)]) == 0
    res = _last_json(capsys.readouterr().out)
    assert res["samples_per_problem"] == 1 and "pass@2" not in res
    lo, hi = res["pass@1_ci95"]
    assert 0.0 <= lo <= res["pass@1"] <= hi <= 1.0
    rows = _rows(greedy)
    assert len(rows) == 8 and all(r["n"] == 1 and len(r["status"]) == 1 for r in rows)


def test_generation_loss_covers_target_tokens_only(make_model, tiny_base):
    base, tok = tiny_base
    model = make_model("prompt-tuning", num_virtual_tokens=3)
    model.eval()
    texts = ["def f(x):\n    return x + 1\nassert f(2) == ", "x = 1\nassert x == "]
    targets = ["3", "[1, 2, 'three']"]
    loss = model(texts, targets=targets)

    # the same loss by hand: full logits, cross-entropy at the target (+ EOS) positions only
    tgt = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in targets]
    prompt = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = lopa.prefix.assemble(base, model.soft_prompts(texts), [p + t for p, t in zip(prompt, tgt)])
    with torch.no_grad():
        logits = base(**batch.model_inputs(), use_cache=False).logits.float()
    L = logits.shape[1]
    nll, count = 0.0, 0
    for i, t in enumerate(tgt):
        pred = logits[i, L - len(t) - 1:L - 1]  # position p predicts token p + 1
        nll += F.cross_entropy(pred, torch.tensor(t), reduction="sum")
        count += len(t)
    assert float(loss.detach()) == pytest.approx(float(nll / count), rel=1e-5)

    # prompt tokens are not scored: a loss over the whole sequence is a different number
    everything = [p + t for p, t in zip(prompt, tgt)]
    nll_all = sum(F.cross_entropy(logits[i, L - len(s):L - 1], torch.tensor(s[1:]), reduction="sum")
                  for i, s in enumerate(everything))
    assert float(loss.detach()) != pytest.approx(float(nll_all / sum(len(s) - 1 for s in everything)), rel=1e-3)
    loss.backward()  # and gradients reach the soft prompt
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())


class Oracle:
    """A stand-in model whose completion is a function of the example: checks tasks + sandbox alone."""

    def __init__(self, examples, answer):
        self.answers = {e.prompt: answer(e) for e in examples}
        self.training = True
        self.calls: list[int] = []

    def eval(self):
        self.training = False
        return self

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def generate(self, texts, **kw):
        self.calls.append(len(texts))
        # a raw completion runs on past the answer; postprocess must cut it at the stop string
        return [self.answers[t] + kw["stop"][0] + "junk" if kw.get("stop") else self.answers[t] for t in texts]


WRONG = {"mbpp": lambda e: "def _unrelated():\n    pass\n",
         "cruxeval-o": lambda e: f"({e.target}, 'wrong')",
         "cruxeval-i": lambda e: "(_ for _ in ()).throw(ValueError('wrong'))"}


@pytest.mark.parametrize("name", ["mbpp", "cruxeval-o", "cruxeval-i"])
def test_reference_answers_pass_and_wrong_ones_fail(name, tmp_path):
    task = get_task(name, data_dir=DATA)
    examples = task.split("test")[:10]
    oracle = Oracle(examples, lambda e: e.target)
    res = evaluate_generation(oracle, task, examples, batch_size=4, results_path=tmp_path / "ok.jsonl")
    assert res["n"] == 10 and res["pass@1"] == 1.0, _rows(tmp_path / "ok.jsonl")
    assert oracle.training  # put back in the mode it came in
    assert res["generate_s_per_problem"] >= 0 and res["sandbox_s_per_problem"] > 0
    assert all(r["status"] == ["passed"] for r in _rows(tmp_path / "ok.jsonl"))

    wrong = Oracle(examples, WRONG[name])
    res = evaluate_generation(wrong, task, examples, batch_size=4, results_path=tmp_path / "bad.jsonl")
    assert res["pass@1"] == 0.0 and res["pass@1_ci95"][0] == 0.0
    assert all(r["passed"] == 0 for r in _rows(tmp_path / "bad.jsonl"))


def test_greedy_decodes_once_and_score_uses_batch_size():
    task = get_task("cruxeval-o", data_dir=DATA)
    examples = task.split("test")[:5]
    oracle = Oracle(examples, lambda e: e.target)
    res = score(oracle, task, "test", limit=5, batch_size=2, progress=False, n_samples=3, ks=(1, 2, 3))
    assert oracle.calls == [2, 2, 1]  # one greedy pass in batches of 2, not three passes
    assert res["pass@1"] == res["pass@3"] == 1.0 and res["samples_per_problem"] == 3
    assert "pass@1_ci95" not in res
