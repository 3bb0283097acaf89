"""``python -m lopa.serve.vllm_backend``: the vLLM throughput command under its first name.

The backend itself lives in :mod:`lopa.serve.backends.vllm`; this name stays so that scripts and
recorded benchmark commands that call it keep working.
"""

from __future__ import annotations

from .backends.vllm import DirectSubmitter, VLLMBackend, _main, load_input_embeddings, throughput

__all__ = ["DirectSubmitter", "VLLMBackend", "load_input_embeddings", "throughput"]

if __name__ == "__main__":  # vLLM spawns its engine process, which imports this module again
    raise SystemExit(_main())
