"""The serving benchmark's prefix-cache section: a repeated-task stream (every request carries one task's
soft prompt, as when many clients use one prompt-tuning or LoPT artifact) against a ``lopa serve``
without the prefix cache and one with ``--prefix-cache-mib``, otherwise alike.

Both servers get the same requests, ``--repeats`` passes in an order that rotates each pass, each timed
in steady state (:meth:`lopa.benchmarks.serving.Server.timed`); the section reports requests/s of both,
their ratio, the cached server's hits and misses (from its ``/metrics``) and the largest difference
between the two servers' log-probabilities (rounding only: the cached server runs the soft prompt as a
pass of its own). :mod:`lopa.benchmarks.serving` starts the servers; this module times and reports.
"""

from __future__ import annotations

import json
import re
from typing import Any

DEFAULT_MIB = 64


def add_prefix_cache_options(p: Any) -> None:
    p.add_argument("--prefix-cache-mib", type=int, default=DEFAULT_MIB,
                   help="the prefix-cache section: a repeated-task stream against a server with "
                        "--prefix-cache-mib N and one without (otherwise alike); 0 skips the section "
                        f"(default {DEFAULT_MIB})")


def repeated_task_bodies(work: Any, n: int, label_words: list[str]) -> list[bytes]:
    """``n`` classification requests on the workload's texts, all with task 0's soft prompt."""
    wire = work.wire(0)
    return [json.dumps({"token_ids": work.text[i % len(work.text)], "soft_prompt": wire,
                        "label_words": label_words}).encode() for i in range(n)]


def cache_counters(server: Any) -> dict[str, float]:
    """The server's ``lopa_prefix_cache_*`` values from its /metrics (empty without the cache)."""
    text = server.run(server.http.get("/metrics")).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^lopa_prefix_cache_(\w+) (\S+)$", text, re.M)}


def time_both(args: Any, servers: dict[str, Any], bodies: list[bytes], log: Any) -> dict[str, Any]:
    """Both servers on ``bodies``, ``args.repeats`` passes in rotating order; the section's JSON."""
    seconds: dict[str, list[float]] = {name: [] for name in servers}
    answers: dict[str, list[Any]] = {}
    names = list(servers)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = servers[name].timed("/v1/classify", "classify", bodies, args.lead_in, args.batch_size)
            seconds[name].append(t["seconds"])
            answers[name] = t["answers"]
            log(f"  prefix cache pass {r + 1}/{args.repeats}  {name:<8s} {len(bodies) / t['seconds']:8.2f} requests/s")
    rate = {name: len(bodies) * len(ts) / sum(ts) for name, ts in seconds.items()}
    diff = max(abs(a - b) for x, y in zip(answers["cached"], answers["plain"])
               for a, b in zip(x["logprobs"], y["logprobs"]))
    return {"requests": len(bodies), "m": args.m, "text_tokens": args.text_tokens, "mib": args.prefix_cache_mib,
            "contenders": {name: {"requests_per_s": rate[name], "seconds": seconds[name]} for name in servers},
            "ratio_cached_over_plain": rate["cached"] / rate["plain"], "max_logprob_difference": diff,
            "cache": cache_counters(servers["cached"]), "commands": {n: s.process.command for n, s in servers.items()}}


def render_prefix_cache(result: dict[str, Any], target: float) -> list[str]:
    """The section's markdown: the two servers' requests/s and their ratio, and the cached server against PEFT
    LoRA's mixed batches at each K >= 8 (✓ where the ratio is at least ``target``)."""
    pc = result.get("prefix_cache") or {}
    if not pc:
        return []
    c, cache = pc["contenders"], pc["cache"]
    against = pc.get("cached_over_lora") or {}
    lora = ([f"Against PEFT LoRA's mixed batches (the sweep's rows, the same {pc.get('threads', '?')} torch "
             f"thread(s)), the cached server's requests/s on this stream over LoRA's at each K ≥ 8 (target ≥ "
             f"{target:g}): " + ", ".join(f"K = {k}: {r:.2f} {'✓' if r >= target else '✗'}"
                                          for k, r in sorted(against.items(), key=lambda kv: int(kv[0]))) + ".", ""]
            if against else [])
    return [f"Prefix cache: a repeated-task stream, {pc['requests']} classification requests per pass that all "
            f"carry one task's soft prompt (m = {pc['m']}, {pc['text_tokens']} text tokens), on "
            f"{pc.get('threads', '?')} torch thread(s), against the server "
            f"with `--prefix-cache-mib {pc['mib']}` (the soft prompt's keys and values computed once) and without; "
            f"the cached server counted {cache.get('hits_total', 0):.0f} hits and {cache.get('misses_total', 0):.0f} "
            f"misses, and its log-probabilities differ from the other's by at most {pc['max_logprob_difference']:.2g} "
            "(rounding: the soft prompt runs as a pass of its own).", "",
            "| server | requests/s | cached / plain |", "|---|---:|---:|",
            f"| `--prefix-cache-mib {pc['mib']}` | {c['cached']['requests_per_s']:.2f} | "
            f"{pc['ratio_cached_over_plain']:.2f} |",
            f"| no prefix cache | {c['plain']['requests_per_s']:.2f} | |", "", *lora]


def summary_line(result: dict[str, Any]) -> list[str]:
    """The printed summary's line for the row, when it ran."""
    return [_summary(result["prefix_cache"])] if result.get("prefix_cache") else []


def _summary(pc: dict[str, Any]) -> str:
    rate = {k: v["requests_per_s"] for k, v in pc["contenders"].items()}
    return (f"prefix cache (one task's soft prompt on every request) requests/s: cached {rate['cached']:.2f}  "
            f"plain {rate['plain']:.2f}  ratio {pc['ratio_cached_over_plain']:.2f}  "
            f"(hits {pc['cache'].get('hits_total', 0):.0f})")
