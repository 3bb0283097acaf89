"""``lopa gateway``: load every task's artifact, check them against the upstream, then answer HTTP.

A task that cannot be loaded, or that the upstream cannot serve (another width, soft prompts longer
than it takes), stops the start with a message naming it. An upstream that is not reachable yet does
not: the gateway starts, says so, and checks the tasks when the upstream first answers.

From the command line::

    $ lopa gateway --task sentiment=runs/sst2-lopa/best --upstream http://127.0.0.1:8000 --port 8001
"""

from __future__ import annotations

import logging
import sys

from ..serve.errors import APIError
from .config import GatewayConfig
from .registry import GatewayError, load_tasks, width_problems
from .upstream import probe

log = logging.getLogger("lopa.gateway")


def gateway(cfg: GatewayConfig) -> int:
    """``lopa gateway``: 0 after a clean stop (Ctrl-C / SIGTERM), 2 when it cannot start."""
    import torch
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        tasks = load_tasks(cfg.task_dirs(), cfg.torch_device)
    except (GatewayError, ValueError) as e:
        print(f"lopa gateway: {e}", file=sys.stderr)
        return 2
    try:
        health = probe(cfg.upstream, cfg.upstream_key, cfg.connect_timeout)
    except APIError as e:
        health = None
        log.warning("%s; starting anyway: the tasks are checked against it when it first answers", e.message)
    if health is not None:
        problems = width_problems(tasks, health, cfg.upstream)
        if problems:
            print("lopa gateway: the upstream cannot serve " + ("this task" if len(problems) == 1 else "these tasks")
                  + ":\n  " + "\n  ".join(problems), file=sys.stderr)
            return 2
    app = create_app(cfg, tasks, health)
    if cfg.api_key is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who can reach it can use it", cfg.host)
    served = f"{health.get('model')!r} (width {health.get('hidden_size')})" if health else "(not reachable yet)"
    print(f"lopa gateway: {len(tasks)} task(s) ({', '.join(tasks)}) on http://{cfg.host}:{cfg.port}"
          f"{' (API key required)' if cfg.api_key else ''}, upstream {cfg.upstream} serving {served}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=30,
                timeout_keep_alive=75)
    return 0
