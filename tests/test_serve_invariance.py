"""``--batch-invariant auto``: on exactly where the model's own matrix products are invariant to the
number of rows (:mod:`lopa.serve.backends.invariance`)."""

from __future__ import annotations

import pytest
import torch

import lopa
from lopa.serve.backends import TransformersBackend
from lopa.serve.backends import transformers as transformers_backend
from lopa.serve.backends.invariance import matmuls_batch_invariant

from batch_invariance import deviation, make_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RowCountLinear(torch.nn.Linear):
    """A linear layer whose rounding depends on how many rows it runs, as some kernels' does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1e-3 * (x.reshape(-1, x.shape[-1]).shape[0] > 400)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_auto_is_on_where_the_tiny_models_products_are_invariant(dtype):
    """Where the check finds the products invariant (the tiny model's, here), auto is on and a row's answer
    alone equals its answer batched: bit for bit in bf16, within float32's LM-head rounding."""
    backend = TransformersBackend("tiny-random-llama", dtype=dtype, device="cpu")
    assert backend.batch_invariant == matmuls_batch_invariant(backend.base)
    if backend.batch_invariant:
        rows, _ = make_rows(backend, 48, seed=2)
        moved = deviation([backend.classify([r])[0] for r in rows], backend.classify(rows))["max"]
        assert moved == 0.0 if dtype == "bfloat16" else moved < 1e-5


def test_a_layer_that_rounds_by_row_count_is_found():
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    assert matmuls_batch_invariant(plain)
    odd = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), RowCountLinear(32, 16))
    assert not matmuls_batch_invariant(odd)


def test_auto_follows_the_check_and_on_off_override_it(monkeypatch):
    monkeypatch.setattr(transformers_backend, "matmuls_batch_invariant", lambda base: False)
    assert not TransformersBackend("tiny-random-llama", dtype="bfloat16", device="cpu").batch_invariant
    assert TransformersBackend("tiny-random-llama", dtype="bfloat16", device="cpu", batch_invariant="on").batch_invariant
    monkeypatch.setattr(transformers_backend, "matmuls_batch_invariant", lambda base: True)
    assert not TransformersBackend("tiny-random-llama", dtype="bfloat16", device="cpu",
                                   batch_invariant="off").batch_invariant


@pytest.mark.real_model
def test_the_check_foretells_smollm2_in_bf16():
    """Where the check finds smollm2-135m's bf16 products invariant, padding by length makes its rows'
    answers bit-identical alone and batched; where it does not (AMX here), they move even with "on"."""
    on = TransformersBackend("smollm2-135m", dtype="bfloat16", device="cpu", batch_invariant="on")
    rows, _ = make_rows(on, 32, seed=4)
    alone = [on.classify([r])[0] for r in rows]
    moved = deviation(alone, on.classify(rows))["max"]
    if matmuls_batch_invariant(on.base):
        assert moved == 0.0
    else:
        assert moved > 0.0
        assert not TransformersBackend("smollm2-135m", dtype="bfloat16", device="cpu").batch_invariant
