"""On a CUDA GPU: the server's backend and a training step run there and agree with the CPU.

Marked ``gpu``: skipped without a GPU; ``scripts/device_check.sh`` runs them (``pytest -m gpu``).
"""

from __future__ import annotations

import pytest
import torch

import lopa
from lopa import prefix
from lopa.serve.backends import ClassifyRow, GenerateRow, TransformersBackend

pytestmark = pytest.mark.gpu

TEXTS = ["Review: a gripping, funny film. It was", "Review: dull. It was"]
WORDS = [" terrible", " great"]


def test_backend_on_cuda_matches_cpu_in_float32():
    cpu = TransformersBackend("tiny-random-llama", dtype="float32", device="cpu")
    gpu = TransformersBackend("tiny-random-llama", dtype="float32", device="cuda")
    assert gpu.device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    label_ids = cpu.label_token_ids(WORDS)
    rows = [ClassifyRow(cpu.tokenize(t), 0.02 * torch.randn(3 + i, cpu.hidden_size, generator=g), label_ids)
            for i, t in enumerate(TEXTS)]
    want, got = torch.tensor(cpu.classify(rows)), torch.tensor(gpu.classify(rows))
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    gen = gpu.generate([GenerateRow(r.token_ids, r.soft_prompt, 4) for r in rows])
    assert [c.completion_tokens for c in gen] == [c.completion_tokens for c in
                                                  cpu.generate([GenerateRow(r.token_ids, r.soft_prompt, 4) for r in rows])]


def test_bf16_backend_on_cuda_gives_finite_log_probabilities():
    be = TransformersBackend("tiny-random-llama", dtype="bfloat16", device="cuda")
    assert be.dtype == torch.bfloat16
    row = ClassifyRow(be.tokenize(TEXTS[0]), torch.zeros(4, be.hidden_size), be.label_token_ids(WORDS))
    out = torch.tensor(be.classify([row] * 3))
    assert torch.isfinite(out).all() and (out <= 0).all()
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # batch-invariant on the GPU too


def test_prompt_tuning_step_on_cuda_in_bf16_autocast():
    base, tok = lopa.load_base("tiny-random-llama")
    model = lopa.SoftPromptModel(base, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=4)).to("cuda")
    label_ids = torch.tensor(prefix.label_token_ids(tok, WORDS), device="cuda")[torch.tensor([1, 0], device="cuda")]
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.device.type == "cuda" for p in params)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(TEXTS, label_ids=label_ids)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
