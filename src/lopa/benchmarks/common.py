"""What the benchmarks share: their options and output folders, the machine they ran on, a resumable
store of finished work, a ``lopa serve`` subprocess, and one marked section of ``docs/results.md`` each.

Every benchmark writes into a folder, ``--out DIR`` (its JSON, per-run files, and the plots of the
ones without a markdown report), and the ones with a report put their section into ``--doc FILE``
with their plots beside it. Both are checked while the options are parsed, before any work: a
benchmark that would only fail at its last write must fail at once.

Example::

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "results.md"
    >>> write_section(p, "<!-- a:start -->\\nA\\n<!-- a:end -->\\n", "<!-- a:start -->", "<!-- a:end -->")
    >>> write_section(p, "<!-- a:start -->\\nB\\n<!-- a:end -->\\n", "<!-- a:start -->", "<!-- a:end -->")
    >>> p.read_text()
    '# Results\\n\\n<!-- a:start -->\\nB\\n<!-- a:end -->\\n'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

# --------------------------------------------------------------------------- options

class BenchmarkParser(argparse.ArgumentParser):
    """The parser of ``lopa bench NAME``. Options added with ``quick`` have a second default under
    ``--quick`` (a smoke run on tiny models), said in their help; ``parse`` fills them in, so options
    given explicitly still win.

    >>> p = BenchmarkParser("demo", "A demo.", "lopa bench demo --quick")
    >>> p.add_outputs("results", "demo.json", quick_help="tiny models", doc=False)
    >>> p.add_models(encoder=False)
    >>> p.quick("--steps", 80, 4, "training steps", type=int)
    >>> a = p.parse(["--quick"])
    >>> a.steps, a.model
    (4, 'tiny-random-llama')
    >>> p.parse(["--quick", "--steps", "7"]).steps
    7
    """

    def __init__(self, name: str, description: str, example: str, *, raw: bool = False):
        super().__init__(prog=f"lopa bench {name}", description=description, epilog=f"Example: {example}",
                         formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
        self.name = name
        self.quick_defaults: dict[str, tuple[Any, Any]] = {}

    def quick(self, flag: str, full: Any, quick: Any, help: str, *, shown: str | None = None, **kw: Any) -> None:
        """An option whose default is ``full``, or ``quick`` under --quick; ``shown`` words the first."""
        self.quick_defaults[flag.lstrip("-").replace("-", "_")] = (full, quick)
        self.add_argument(flag, default=None, help=f"{help} (default {shown or full}; --quick: {quick})", **kw)

    def add_outputs(self, out_default: str, out_holds: str, *, quick_help: str, doc: bool = True) -> None:
        """``--quick``, ``--out DIR`` and (with ``doc``) ``--doc FILE``, worded alike for every benchmark."""
        self.out_default = out_default
        self.add_argument("--quick", action="store_true", help=f"smoke run: {quick_help}; writes into a temporary "
                          "folder unless --out" + (" / --doc are" if doc else " is") + " given")
        self.add_argument("--out", default=None, metavar="DIR", help=f"results folder: {out_holds} "
                          f"(default {out_default}; --quick: a temporary folder)")
        if doc:
            self.add_argument("--doc", default=None, metavar="FILE",
                              help="markdown file that gets this benchmark's section, the rest of it kept; plots "
                                   "go beside it (default docs/results.md; --quick: OUT/results.md)")

    def add_resumable(self, rebuilds: str) -> None:
        """``--plan`` and ``--report-only``, for the benchmarks that record finished work and skip it."""
        self.add_argument("--plan", action="store_true",
                          help="print the work still to do and an estimated wall time, then exit")
        self.add_argument("--report-only", action="store_true",
                          help=f"run nothing: rebuild {rebuilds} from the work already recorded in OUT")

    def add_models(self, *, encoder: bool = True) -> None:
        """``--model`` (and ``--encoder``): the real models, or the tiny random ones with --quick."""
        self.quick("--model", "smollm2-135m", "tiny-random-llama", "base causal LM: short name, hub id or local path")
        if encoder:
            self.quick("--encoder", "minilm-l6", "tiny-random-bert", "frozen instance encoder of idpg/lopa")

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        """Parse ``argv`` (this process's arguments when None) and fill in the --quick defaults."""
        args = self.parse_args(list(sys.argv[1:] if argv is None else argv))
        for name, (full, quick) in self.quick_defaults.items():
            if getattr(args, name) is None:
                setattr(args, name, quick if args.quick else full)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return args

    def finish(self, args: argparse.Namespace, writes: Iterable[str] = ()) -> argparse.Namespace:
        """Check ``--out`` and ``--doc`` (see ``check_outputs``) once the other options are checked."""
        check_outputs(self, args, self.name, self.out_default, writes)
        return args


def check_outputs(p: argparse.ArgumentParser, args: argparse.Namespace, name: str, out_default: str,
                  writes: Iterable[str] = ()) -> None:
    """Resolve ``--out`` (and ``--doc`` where the parser has it) and check them before any work:
    ``--out`` must be a folder (or one that can be made), with none of the files it ``writes`` a
    folder already; ``--doc`` a markdown file whose folder can be made. ``--quick`` without ``--out``
    gets a fresh temporary folder."""
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix=f"lopa-{name}-quick-") if args.quick else out_default
    out = Path(args.out)
    writes = list(writes)
    holds = ", ".join(writes) or "its files"
    if out.exists() and not out.is_dir():
        p.error(f"--out takes a folder (this benchmark writes {holds} into it); {out} is a file")
    if not out.exists() and out.suffix in (".json", ".md", ".png"):
        p.error(f"--out takes a folder (this benchmark writes {holds} into it), not a file name like {out}")
    _check_writable(p, "--out", out)
    for f in writes:
        if (out / f).is_dir():
            p.error(f"--out {out}: {out / f} is a folder; the benchmark writes a file there")
    if hasattr(args, "doc"):
        if args.doc is None:
            args.doc = str(out / "results.md") if args.quick else "docs/results.md"
        doc = Path(args.doc)
        if doc.is_dir():
            p.error(f"--doc takes a markdown file (plots go beside it); {doc} is a folder")
        _check_writable(p, "--doc", doc.parent)


def _check_writable(p: argparse.ArgumentParser, option: str, folder: Path) -> None:
    """The folder, or its nearest existing ancestor, is a folder this process may write into."""
    here = folder.resolve()
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        p.error(f"{option} {folder}: {here} is a file, so the folder cannot be made")
    if not os.access(here, os.W_OK | os.X_OK):
        p.error(f"{option} {folder}: {here} is not writable")


def require_positive(p: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str],
                     *, optional: bool = False) -> None:
    """Each named count must be at least 1 (``optional``: or unset)."""
    for name in names:
        value = getattr(args, name)
        if (value is not None or not optional) and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``: the comma-separated options."""
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_assignments(p: argparse.ArgumentParser, option: str, items: Iterable[str], allowed: Iterable[str],
                      *, many: bool = False) -> dict[str, Any]:
    """Repeated ``NAME=VALUE`` options (``--lr lopa=1e-3``); ``many``: ``NAME=V,V`` gives a list of floats."""
    allowed = list(allowed)
    out: dict[str, Any] = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in allowed or not value:
            p.error(f"{option} {item!r}: expected NAME={'V[,V...]' if many else 'V'} with NAME one of "
                    f"{', '.join(allowed)}")
        try:
            out[name] = [float(x) for x in value.split(",")] if many else float(value)
        except ValueError:
            p.error(f"{option} {item!r}: {value!r} is not a number{' list' if many else ''}")
    return out


def command_line(name: str, argv: Iterable[str], drop: Iterable[str] = ()) -> str:
    """The command as a user would type it again, without the flags in ``drop``.

    >>> command_line("code", ["--quick", "--report-only"], drop=["--report-only"])
    'lopa bench code --quick'
    """
    kept = [a for a in argv if a not in set(drop)]
    return f"lopa bench {name}" + (" " + shlex.join(kept) if kept else "")


# --------------------------------------------------------------------------- the process and the machine

def quiet_transformers() -> None:
    """No download or loading progress bars and only errors from transformers: a benchmark's own
    lines are its output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def prepare_benchmark(threads: int | None = None) -> None:
    """What every benchmark's ``main`` does first: quiet transformers and tokenizers, and pin torch to
    ``threads`` threads when given (on a small shared machine, the same count for every contender)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    if threads:
        import torch
        torch.set_num_threads(threads)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine() -> dict[str, Any]:
    """Where a benchmark ran: CPU, cores, torch threads now, bf16 support, GPU, library versions, memory,
    load average. One description for every benchmark's JSON and report.

    >>> m = machine()
    >>> m["cores"] >= 1 and m["torch_threads"] >= 1 and bool(m["torch"])
    True
    """
    import torch
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ",".join(f for f in ("avx512_bf16", "amx_bf16") if f in text)
    except OSError:
        flags = ""
    versions = {}
    for lib in ("transformers", "peft"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            versions[lib] = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_flags": flags, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, **versions, "python": platform.python_version(),
            "platform": platform.platform(), "memory_gib": memory, "load_avg_at_start": load_average()}


def rss_mib(pid: int | str = "self") -> dict[str, float]:
    """Resident memory (now and peak) of a process, MiB, from /proc (Linux; empty elsewhere)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out["rss_mib" if line.startswith("VmRSS") else "peak_rss_mib"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command's name (which may hold spaces): field 3 of proc(5) first."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc (0 where unreadable)."""
    try:
        fields = _stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def minor_faults(pid: int | str = "self") -> int:
    """Minor page faults of a process so far, all its threads, from /proc (0 where unreadable): memory the
    process touched afresh, such as activations the allocator gave back to the kernel and took again.

    >>> before = minor_faults(); _ = bytearray(8 * 2 ** 20); minor_faults() >= before
    True
    """
    try:
        return int(_stat_fields(pid)[7])
    except (OSError, ValueError, IndexError):
        return 0


def repo_root() -> Path:
    """The source checkout this lopa runs from, or the working folder for an installed package (where
    the optional ``.venv-vllm`` is looked for)."""
    here = Path(__file__).resolve().parents[3]  # src/lopa/benchmarks/common.py -> the checkout
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def lopa_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python (this one, or another venv's) that must import this very lopa,
    without tokenizers' threads. Run from a checkout, its ``src`` goes first on the child's path; an
    installed lopa adds nothing (its site-packages would bring this venv's torch into the other's)."""
    import lopa
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **extra}
    src = Path(lopa.__file__).resolve().parents[1]
    if src.name == "src":
        env["PYTHONPATH"] = str(src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class ServerProcess:
    """A real ``lopa serve`` (or, with ``verb="gateway"``, a ``lopa gateway``) on a free loopback port,
    started with ``serve_args``, its output in ``log_path``; ready once ``/health`` answers (``health``
    holds that answer).

    Stop it with ``stop()``; a server that exits or stays silent raises ``RuntimeError`` with the
    log's tail."""

    def __init__(self, serve_args: list[str], log_path: Path, ready_s: float = 180.0, verb: str = "serve"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.verb = verb
        self.cmd = [sys.executable, "-m", "lopa", verb, *serve_args, "--host", "127.0.0.1",
                    "--port", str(self.port)]
        self.log_path = log_path
        self._log = open(log_path, "wb")
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=lopa_env(LOPA_API_KEY=""))
        try:
            self.health = self._wait_ready(ready_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.perf_counter() - started

    @property
    def command(self) -> str:
        """As a user would type it: ``lopa serve ...`` (``lopa gateway ...``)."""
        return "lopa " + shlex.join(self.cmd[3:])

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        import httpx
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lopa {self.verb} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                answer = httpx.get(self.url + "/health", timeout=2.0)
                if answer.status_code == 200:
                    return answer.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"lopa {self.verb} did not answer /health within {timeout_s:.0f}s:\n{self.log_tail()}")

    def rss(self) -> dict[str, float]:
        return rss_mib(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def minor_faults(self) -> int:
        return minor_faults(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# --------------------------------------------------------------------------- results

def settings_hash(settings: dict[str, Any]) -> str:
    """A short hash of a settings dict: the same settings, the same hash, whatever the key order.

    >>> settings_hash({"a": 1, "b": 2}) == settings_hash({"b": 2, "a": 1}) != settings_hash({"a": 2, "b": 2})
    True
    """
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


class ResultStore:
    """A JSON file whose ``section`` holds finished entries by key, each with the ``hash`` of its
    settings; rewritten atomically after each entry, so that rerunning a benchmark skips what is done
    and an interrupted one resumes. Other top-level fields (``data``) are the benchmark's own.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "runs.json"
    >>> ResultStore(path).add("rt__lopa", {"hash": settings_hash({"lr": 1e-3}), "accuracy": 0.8})
    >>> again = ResultStore(path)
    >>> again.done("rt__lopa", settings_hash({"lr": 1e-3})), again.done("rt__lopa", settings_hash({"lr": 1e-2}))
    (True, False)
    >>> again.by_hash(settings_hash({"lr": 1e-3}))["accuracy"]
    0.8
    """

    def __init__(self, path: Path, section: str = "runs"):
        self.path, self.section = Path(path), section
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault(section, {})

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        return self.data[self.section]

    def by_hash(self, h: str) -> dict[str, Any] | None:
        """The first entry recorded with these settings, under any key."""
        return next((e for e in self.entries.values() if e.get("hash") == h), None)

    def done(self, key: str, h: str) -> bool:
        """``key`` is recorded, with these settings."""
        entry = self.entries.get(key)
        return entry is not None and entry.get("hash") == h

    def add(self, key: str, entry: dict[str, Any]) -> None:
        self.entries[key] = entry
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


def train_or_resume(settings: dict[str, Any], out: Path) -> tuple[dict[str, Any], str]:
    """One ``lopa train`` run into ``out`` with ``settings`` (TrainArgs fields), picking up what is
    there: a finished run's results are read back, an interrupted one resumes from its last
    checkpoint, anything else in ``out`` is overwritten. (its results, "trained" | "resumed" |
    "finished earlier")."""
    from lopa.train import TrainArgs, train
    if (out / "results.json").exists() and (out / "run_config.json").exists():
        return json.loads((out / "results.json").read_text()), "finished earlier"
    kw = dict(settings, out=str(out))
    state = "trained"
    if (out / "run_config.json").exists():
        kw["resume"], state = True, "resumed"
    elif out.exists():
        kw["overwrite"] = True
    return train(TrainArgs.from_flat(**kw)), state


def method_settings(method: str, **candidates: Any) -> dict[str, Any]:
    """The ``candidates`` that ``method``'s config has as fields (a benchmark sets m, r, h, ... once for
    every method; each method takes the ones it knows).

    >>> method_settings("prompt-tuning", num_virtual_tokens=10, rank=4)
    {'num_virtual_tokens': 10}
    """
    import dataclasses
    from lopa.methods import get_method
    fields = {f.name for f in dataclasses.fields(get_method(method)[0])}
    return {k: v for k, v in candidates.items() if k in fields}


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into the markdown file at
    ``path``, replacing the previous one and keeping every other benchmark's section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        text = path.read_text()
        i, j = text.find(start), text.find(end)
        if i != -1 and j != -1 and j > i:
            text = text[:i] + section.rstrip("\n") + text[j + len(end):]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    else:
        text = "# Results\n\n" + section
    path.write_text(text)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def interval_verdict(a: str, a_ci: Iterable[float | None], b: str, b_ci: Iterable[float | None]) -> str:
    """Which of two scores is higher, claimed only where their 95% intervals do not overlap.

    >>> interval_verdict("lopa", (0.8, 0.9), "pt", (0.6, 0.7)), interval_verdict("lopa", (0.6, 0.8), "pt", (0.7, 0.9))
    ('lopa > pt', 'intervals overlap: no difference claimed')
    """
    (alo, ahi), (blo, bhi) = a_ci, b_ci
    if any(x is None or math.isnan(x) for x in (alo, ahi, blo, bhi)):
        return "no interval"
    if alo > bhi:
        return f"{a} > {b}"
    if blo > ahi:
        return f"{b} > {a}"
    return "intervals overlap: no difference claimed"


def pct(x: float | None, spec: str = ".1f") -> str:
    """A proportion as a percentage, or a dash for a missing one."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(100 * x, spec)
