"""``lopa gateway``'s settings: one dataclass that checks itself (the command line is its fields).

Tasks come from ``--task NAME=DIR`` (repeatable) and/or ``--tasks DIR`` (every subfolder an artifact,
named by the subfolder); :meth:`GatewayConfig.task_dirs` joins them.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> cfg = GatewayConfig(task=[f"sentiment={d}"], upstream="http://127.0.0.1:8000/")
>>> cfg.upstream, list(cfg.task_dirs())
('http://127.0.0.1:8000', ['sentiment'])
>>> GatewayConfig(task=["bad name=/x"])
Traceback (most recent call last):
...
ValueError: --task 'bad name=/x': the task name must be 1-64 letters, digits or . _ - : (starting with a letter or digit)
>>> GatewayConfig(task=[f"a={d}"], upstream_timeout=0)
Traceback (most recent call last):
...
ValueError: upstream_timeout must be a number in [0.001, 86400], got 0
>>> GatewayConfig()
Traceback (most recent call last):
...
ValueError: no tasks: give --task NAME=ARTIFACT_DIR (repeatable) or --tasks DIR (one artifact per subfolder)
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..serve.config import MiB

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
WIRE_DTYPES = ("float32", "bfloat16", "float16")
INT_LIMITS = {"port": (0, 65535), "max_connections": (1, 1 << 16), "max_batch_size": (1, 4096),
              "max_body_bytes": (1024, 1 << 34), "threads": (1, 1024)}
NUMBER_LIMITS = {"upstream_timeout": (0.001, 86400), "connect_timeout": (0.001, 3600), "body_timeout_s": (0.01, 3600),
                 "max_wait_ms": (0, 10_000)}
OPTIONAL = {"threads"}
NAME_RULE = "the task name must be 1-64 letters, digits or . _ - : (starting with a letter or digit)"


@dataclass
class GatewayConfig:
    """Serve trained tasks to any OpenAI client, by name. The gateway holds each task's soft-prompt
    generator (and encoder), computes every request's soft prompt, and forwards the request to a
    `lopa serve` upstream (either backend), which holds the one frozen model. Clients send
    model="TASK" to /v1/completions, /v1/chat/completions or /v1/classify; GET /v1/models lists the tasks.

    Example:
      lopa serve --model smollm2-135m --port 8000 --api-key "$SERVER_KEY"
      lopa gateway --task sentiment=runs/sst2-lopa/best --task extract=runs/extract-lopa/best \\
          --upstream http://127.0.0.1:8000 --upstream-key "$SERVER_KEY" --port 8001 --api-key "$KEY"
    """

    task: list[str] | None = field(default=None, metadata={"extend": True})
    """a task as NAME=ARTIFACT_DIR (repeatable: --task a=runs/a --task b=runs/b); clients call it with model=NAME"""
    tasks: str | None = None
    """a directory with one artifact per subfolder; each subfolder's name is its task's name"""
    upstream: str = "http://127.0.0.1:8000"
    """the lopa serve that runs the model (transformers or vllm backend)"""
    upstream_key: str | None = field(default=None, repr=False)
    """the upstream's API key (default $LOPA_UPSTREAM_KEY; unset: none)"""
    host: str = "127.0.0.1"
    """interface to listen on (0.0.0.0 for every interface: set an API key then)"""
    port: int = 8001
    """TCP port to listen on"""
    api_key: str | None = field(default=None, repr=False)
    """require this key on /v1/* (Authorization: Bearer KEY or X-API-Key: KEY); default $LOPA_API_KEY, unset: no key"""
    upstream_timeout: float = 120.0
    """seconds to wait for the upstream's answer (for a stream: for each next piece); past it the client gets 504"""
    connect_timeout: float = 5.0
    """seconds to wait for a connection to the upstream; a refused or failed connection is a 502 at once"""
    max_connections: int = 64
    """the most requests in flight to the upstream at once, for answers in one piece and again for streams (the
    upstream batches them together)"""
    device: str = "cpu"
    """where the generators and encoders run: cpu, cuda, cuda:1, ... or auto (cuda when available)"""
    wire_dtype: str = field(default="float32", metadata={"choices": list(WIRE_DTYPES)})
    """how soft prompts travel to the upstream: float32 (exact, as lopa.Client sends), bfloat16 or float16 (half the bytes)"""
    tokenizer: str | None = None
    """the tokenizer whose chat template renders chat messages for instance-dependent tasks (default: the upstream's model)"""
    max_batch_size: int = 32
    """the most requests of one task whose soft prompts are computed in one call"""
    max_wait_ms: float = 5.0
    """how long a request waits for others of its task to share that call"""
    threads: int | None = None
    """PyTorch CPU threads for the generators (default: PyTorch's choice); 1 suits small generators on busy machines"""
    max_body_bytes: int = 8 * MiB
    """requests with larger bodies are refused (413) before parsing"""
    body_timeout_s: float = 30.0
    """the longest wait for the next piece of a request body (408 after it)"""
    log_level: str = field(default="info", metadata={"choices": ["critical", "error", "warning", "info", "debug"]})
    """log level (info logs every request)"""

    def __post_init__(self) -> None:
        if not self.api_key:  # an empty --api-key means none, like an unset variable
            self.api_key = os.environ.get("LOPA_API_KEY") or None
        if not self.upstream_key:
            self.upstream_key = os.environ.get("LOPA_UPSTREAM_KEY") or None
        if not isinstance(self.upstream, str) or not re.match(r"https?://[^/\s]+", self.upstream):
            raise ValueError(f"--upstream must be an http:// or https:// URL of a lopa serve, got {self.upstream!r}")
        self.upstream = self.upstream.rstrip("/")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        for name, (lo, hi) in {**INT_LIMITS, **NUMBER_LIMITS}.items():
            v, whole = getattr(self, name), name in INT_LIMITS
            if v is None and name in OPTIONAL:
                continue
            if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) \
                    or not (whole or math.isfinite(v)) or not lo <= v <= hi:
                raise ValueError(f"{name} must be {'an integer' if whole else 'a number'} in [{lo}, {hi}], got {v!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N, mps or xpu[:N], got {self.device!r}")
        self.task_dirs()  # names and folders are checked now, before anything is loaded

    def task_dirs(self) -> dict[str, Path]:
        """Task name → artifact directory, from ``--task`` and ``--tasks``; every name once, every folder there."""
        out: dict[str, Path] = {}

        def add(name: str, path: Path, where: str) -> None:
            if not TASK_NAME.fullmatch(name):
                raise ValueError(f"{where}: {NAME_RULE}")
            if name in out:
                raise ValueError(f"task {name!r} is given twice ({out[name]} and {path})")
            if not path.is_dir():
                raise ValueError(f"task {name!r}: artifact directory {path} does not exist")
            out[name] = path

        for spec in self.task or []:
            name, sep, path = spec.partition("=")
            if not sep or not path:
                raise ValueError(f"--task {spec!r}: write NAME=ARTIFACT_DIR, e.g. sentiment=runs/sst2-lopa/best")
            add(name.strip(), Path(path).expanduser(), f"--task {spec!r}")
        if self.tasks:
            root = Path(self.tasks).expanduser()
            if not root.is_dir():
                raise ValueError(f"--tasks {root}: no such directory")
            subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if not subs:
                raise ValueError(f"--tasks {root}: no subfolders; put one artifact in each (its name is the task's)")
            for p in subs:
                add(p.name, p, f"--tasks subfolder {p}")
        if not out:
            raise ValueError("no tasks: give --task NAME=ARTIFACT_DIR (repeatable) or --tasks DIR "
                             "(one artifact per subfolder)")
        return out

    @property
    def torch_device(self) -> str:
        """``--device`` with ``auto`` resolved."""
        if self.device != "auto":
            return self.device
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
