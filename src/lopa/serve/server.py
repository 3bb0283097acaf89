"""``lopa serve``: load the model, then answer HTTP (the app is :func:`lopa.serve.app.create_app`).

Every request carries its own soft prompt (:mod:`lopa.serve.wire`); requests of all tasks meet in
one batcher (:mod:`lopa.serve.scheduler`, or :mod:`lopa.serve.batcher` with ``--scheduling static``).
Nothing here knows a generator or an artifact. The rooms:
``config`` (:class:`ServeConfig`, the command line), ``app`` (routes), ``checks`` (request checks),
``schemas`` (request bodies), ``middleware`` (key, body limits), ``metrics``, ``errors``,
``protocol`` (rows and the backend interface), ``batcher`` (static batches), ``scheduler``
(continuous batching), ``wire`` and ``backends/``.

From the command line: ``lopa serve --model smollm2-135m --port 8000``.

>>> ServeConfig(model="tiny-random-llama").port
8000
"""

from __future__ import annotations

import logging
import sys

import torch

from .app import create_app
from .backends import make_backend
from .config import MiB, ServeConfig
from .protocol import BackendError

__all__ = ["ServeConfig", "create_app", "serve"]

log = logging.getLogger("lopa.serve")


def serve(cfg: ServeConfig) -> int:
    """``lopa serve``: load the model, then answer HTTP until interrupted (Ctrl-C / SIGTERM finish
    the requests in flight first)."""
    import uvicorn

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        backend = make_backend(cfg.backend, cfg.model, cfg.dtype, cfg.device, max_batch_size=cfg.max_batch_size,
                               max_model_len=cfg.engine_max_model_len, batch_invariant=cfg.batch_invariant,
                               engine_settings=cfg.vllm_settings() or None,
                               prefix_cache_bytes=cfg.prefix_cache_mib * MiB)
    except BackendError as e:
        print(f"lopa serve: {e}", file=sys.stderr)
        return 2
    app = create_app(backend, cfg)
    if cfg.api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", cfg.host)
    print(f"lopa serve: {backend.model_name} (hidden size {backend.hidden_size}, "
          f"{str(backend.dtype).removeprefix('torch.')}, batch-invariant {'on' if backend.batch_invariant else 'off'}) on http://{cfg.host}:{cfg.port}"
          f"{' (API key required)' if cfg.api_key else ''}", file=sys.stderr, flush=True)
    try:
        # keep-alive well above a batch's time: with uvicorn's 5 s default, a client's pooled connection could
        # be closed by the server just as the client reused it (a ReadError under load)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=30,
                    timeout_keep_alive=75)
    finally:
        backend.close()  # vllm: stop its engine processes
    return 0
