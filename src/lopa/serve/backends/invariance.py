"""Whether this machine's matrix products give a position the same bits whatever the number of rows
beside it: what ``--batch-invariant auto`` decides by.

Batch-invariant serving (:class:`~lopa.serve.backends.transformers.TransformersBackend`) pads each row
by its own length (to a multiple of 16) and runs it only beside rows padded alike, so that no padding or
attention reduction that depends on its neighbours changes its numbers. That buys exactness only where
each product over the padded positions is itself invariant to how many rows of 16, 32, ... positions it
runs, and that is up to the kernels. Measured with torch 2.13 (oneDNN 3.12) on this project's 2-core
machine, whose AMX units are exposed: smollm2-135m's bf16 products differ by one bf16 step between 48
positions and 1,536, so ``on`` left 115 of 128 requests' answers moving with their neighbours (by up to
0.25; ``off``: 128, 0.19) and cost 17% of the throughput; its float32 products, and the tiny test
model's in both dtypes, are exact at those sizes, and there ``on`` holds answers to 5e-6 (float32) or
bit for bit (bf16). (The LM head sees one position per row, unpadded, so no padding rule can change
its rounding; it is not checked.)

:func:`matmuls_batch_invariant` runs the model's own linear layers (one of each distinct shape) on 1,536
rows and on their first 16, 48 and 336, in the model's dtype on its device, and compares: a few
milliseconds.

>>> import lopa, torch
>>> base, _ = lopa.load_base("tiny-random-llama", torch.bfloat16)
>>> matmuls_batch_invariant(base) in (True, False)   # True on this project's machines
True
"""

from __future__ import annotations

from typing import Any

import torch

MANY_ROWS = 1536            # a full batch of positions: 32 rows of 48
FEW_ROWS = (16, 48, 336)    # passes of a row or a few, padded to multiples of 16
MAX_SHAPES = 8


@torch.inference_mode()
def matmuls_batch_invariant(base: Any) -> bool:
    """True when every distinct linear layer of ``base`` but its LM head gives its first 16, 48 or 336 rows
    bit-identical outputs alone as among 1,536."""
    gen = torch.Generator().manual_seed(0)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    seen: set[tuple[int, int]] = set()
    for module in base.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        shape = (module.in_features, module.out_features)
        if shape in seen:
            continue
        seen.add(shape)
        w = module.weight
        x = torch.randn(MANY_ROWS, module.in_features, generator=gen).to(device=w.device, dtype=w.dtype)
        many = module(x)
        if not all(torch.equal(module(x[:k]), many[:k]) for k in FEW_ROWS):
            return False
        if len(seen) >= MAX_SHAPES:
            break
    return True
