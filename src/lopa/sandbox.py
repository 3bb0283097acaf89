"""Run untrusted, model-written Python programs and report how they ended.

>>> from lopa.sandbox import run_program, run_many
>>> r = run_program("print(sum(range(10)))", timeout_s=5)
>>> r.status, r.stdout
('passed', '45\\n')
>>> [x.status for x in run_many(["assert 1 == 1", "assert 1 == 2", "while True: pass"], timeout_s=1)]
['passed', 'failed', 'timeout']

A program never raises or hangs the caller: every crash, hang or resource bomb comes back as a
``SandboxResult`` whose ``status`` says why (``passed``, ``failed``, ``timeout``, ``memory``,
``fsize``, ``killed`` or ``error``). A syntax error is ``failed`` (the interpreter exits 1), not
``error``; ``error`` means the sandbox itself could not start the program.

How one run is built (each layer exists because the one inside it cannot be trusted):

    evaluator --Popen--> launcher (this file run as a script, root, own session, wall-clock timer)
                  --fork--> reaper (pid 1 of a fresh pid namespace, root, reaps orphans)
                      --fork+exec--> program (unprivileged uid, rlimits, minimal env, own tmpfs)

* rlimits on CPU, address space, file size, process count and core dumps; a clean environment
  (PATH, HOME, LANG, TMPDIR, PYTHONHASHSEED=0, nothing inherited); ``python -s -P`` so no user
  site-packages or script directory magic. These are always on.
* ``netns``: a new, empty network namespace (loopback down), so no connection to anything.
* ``pidns``: the program cannot see or signal any outside process, and when it exits the kernel
  kills and reaps everything it spawned, even processes that called ``setsid()``.
* ``mountns``: every mount is read-only except private size-capped tmpfs on /tmp, /var/tmp and
  /dev/shm (the work directory lives there), a fresh /proc, and home directories such as /root
  hidden except for the interpreter's own files.
* ``setuid``: the program runs as a fresh uid/gid from a private pool (one per concurrent run, so
  ``RLIMIT_NPROC`` is a per-run fork-bomb cap and sandboxes cannot signal each other), with
  ``PR_SET_NO_NEW_PRIVS``.

The four are probed once per process (``available_protections()``) and each run records the ones
it used in ``SandboxResult.protections``. They need root (CAP_SYS_ADMIN); without it only the
always-on layer is active and a program that calls ``setsid()`` can outlive the run.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, NoReturn, Sequence

__all__ = ["SandboxResult", "available_protections", "run_many", "run_program"]

STATUSES = ("passed", "failed", "timeout", "memory", "fsize", "killed", "error")
FEATURES = ("netns", "pidns", "mountns", "setuid")

PROGRAM_NAME = "main.py"
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
# Far above any login or systemd dynamic uid, so a sandboxed program never shares a uid (and with
# it files, signals or the NPROC count) with a real user or another concurrent run.
UID_POOL = (1_900_000_000, 65_536)
NOBODY = 65534
# How long past its own timeout the launcher may take before the evaluator stops trusting it.
LAUNCHER_GRACE_S = 10.0
PROGRAM_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
               "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str
    """One of ``STATUSES``."""
    reason: str
    """Human-readable why, e.g. ``AssertionError``, ``wall-clock limit 10s``, ``signal SIGSEGV``."""
    returncode: int | None
    """The program's exit code, or minus the signal that ended it; None if it never ran."""
    stdout: str
    stderr: str
    """Each clipped to ``output_limit`` bytes (head and tail kept, a marker in between)."""
    duration_s: float
    protections: tuple[str, ...]


# ---------------------------------------------------------------------------- evaluator side


def run_program(source: str | bytes, timeout_s: float = 10.0, memory_mb: int = 512, *,
                argv: Sequence[str] = (), fsize_mb: int = 16, max_procs: int = 64,
                tmp_mb: int = 64, output_limit: int = 4096,
                features: Sequence[str] | None = None) -> SandboxResult:
    """Run ``source`` as ``__main__`` in a sandbox (see the module docstring) and say how it ended.

    ``argv`` becomes ``sys.argv[1:]``. ``timeout_s`` is wall-clock time including interpreter
    start-up (~50 ms); CPU time is capped just above it. ``features`` overrides the probed
    protections (mostly for tests); None uses all of ``available_protections()``.

    Any ``source`` comes back as a result (text that is not valid Python, lone surrogates included,
    is ``failed`` as a syntax error); only an argument out of its bounds (``LIMITS``) raises a
    ValueError, before anything runs.
    """
    if not isinstance(source, (str, bytes)):
        raise ValueError(f"source must be the program's text (str or bytes), not {type(source).__name__}")
    _check_bounds(timeout_s=timeout_s, memory_mb=memory_mb, fsize_mb=fsize_mb, max_procs=max_procs,
                  tmp_mb=tmp_mb, output_limit=output_limit)
    argv = _check_argv(argv)
    feats = tuple(available_protections() if features is None else features)
    unknown = set(feats) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown sandbox features {sorted(unknown)}; known: {FEATURES}")
    protections = ("rlimits", "clean-env", *feats)
    uid = _take_uid() if "setuid" in feats else None
    workdir: str | None = None
    start = time.monotonic()
    try:
        workdir = tempfile.mkdtemp(prefix="lopa-sbx-")
        home = os.path.join(workdir, "home")
        os.mkdir(home)
        with open(os.path.join(workdir, PROGRAM_NAME), "wb") as f:
            # A lone surrogate has no UTF-8 form: written as is, the interpreter rejects the file
            # with a SyntaxError, which is what the text is (not a failure of the sandbox).
            f.write(source if isinstance(source, bytes) else source.encode("utf-8", "surrogatepass"))
        if uid is not None and "mountns" not in feats:
            for path in (workdir, home, os.path.join(workdir, PROGRAM_NAME)):
                os.chown(path, uid, uid)
        cfg = {
            "features": feats, "workdir": workdir, "python": sys.executable, "argv": list(argv),
            "timeout_s": timeout_s, "uid": uid, "parent_pid": os.getpid(),
            "env": {**PROGRAM_ENV, "HOME": home, "TMPDIR": workdir},
            "rlimits": _rlimits(timeout_s, memory_mb, fsize_mb, max_procs, uid),
            "tmp_dirs": _tmp_dirs(), "tmp_mb": tmp_mb, **_interpreter_paths(),
        }
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            report, hung, launcher_rc = _launch(cfg, out, err, timeout_s + LAUNCHER_GRACE_S)
            duration = time.monotonic() - start
            stdout, stderr = _clip(out, output_limit), _clip(err, output_limit)
            # a stream that reached the file-size limit was cut by it, whatever the exit looked like
            full = [name for name, f in (("stdout", out), ("stderr", err))
                    if os.fstat(f.fileno()).st_size >= fsize_mb << 20]
    except OSError as e:  # our own machinery failed (disk full, no fork): still a result
        return SandboxResult(False, "error", f"sandbox: {e}", None, "", "",
                             time.monotonic() - start, protections)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            _give_uid(uid)
    status, reason, rc = _classify(report, hung, launcher_rc, stderr, timeout_s)
    if full and status in ("failed", "killed"):
        status, reason = "fsize", f"file-size limit {fsize_mb} MB ({' and '.join(full)} reached it)"
    return SandboxResult(status == "passed", status, reason, rc, stdout, stderr, duration, protections)


# Upper bounds on the arguments: beyond them a value is a mistake, and some (a timer of 1e12 s)
# would overflow the C types underneath.
LIMITS = {"timeout_s": 86_400.0, "memory_mb": 1 << 24, "fsize_mb": 1 << 24, "max_procs": 1 << 22,
          "tmp_mb": 1 << 24, "output_limit": 1 << 26}


def _check_bounds(**values: float) -> None:
    """Raise a ValueError naming the first argument that is not a number within its bounds.

    >>> _check_bounds(timeout_s=1e12)
    Traceback (most recent call last):
    ...
    ValueError: timeout_s must be a number in (0, 86400], not 1000000000000.0
    """
    for name, value in values.items():
        integral, top = name != "timeout_s", LIMITS[name]
        low = 64 if name == "output_limit" else 0
        number = not isinstance(value, bool) and isinstance(value, int if integral else (int, float))
        inside = number and math.isfinite(value) and (low <= value if low else value > 0) and value <= top
        if not inside:
            span = f"[{low}, {top:g}]" if low else f"(0, {top:g}]"
            raise ValueError(f"{name} must be {'an integer' if integral else 'a number'} in {span}, not {value!r}")


def _check_argv(argv: Sequence[str]) -> list[str]:
    if (isinstance(argv, (str, bytes)) or not isinstance(argv, (list, tuple))
            or not all(isinstance(a, str) for a in argv)):
        raise ValueError(f"argv must be a sequence of strings, not {argv!r:.200}")
    for a in argv:
        if "\0" in a:
            raise ValueError(f"argv item {a!r:.200} holds a NUL character, which no process argument can")
        try:
            os.fsencode(a)
        except UnicodeEncodeError as e:
            raise ValueError(f"argv item {a!r:.200} cannot be passed to a process: {e.reason}") from None
    return list(argv)


def run_many(sources: Sequence[str], timeout_s: float = 10.0, memory_mb: int = 512,
             workers: int | None = None, **kwargs) -> list[SandboxResult]:
    """``run_program`` over ``sources``, up to ``workers`` (default: CPU count) at once, in order."""
    if not sources:
        return []
    available_protections()  # probe once here rather than racing in every worker
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda s: run_program(s, timeout_s, memory_mb, **kwargs), sources))


_probe_lock = threading.Lock()
_protections: tuple[str, ...] | None = None


def available_protections() -> tuple[str, ...]:
    """The subset of ``FEATURES`` this machine allows, found by running a trivial program with each."""
    global _protections
    with _probe_lock:
        if _protections is None:
            found: list[str] = []
            if os.geteuid() == 0:  # all four need root; skip the cost of failing probes otherwise
                for feat in FEATURES:
                    ok = _probe(found + [feat])
                    if not ok and feat == "setuid":
                        _use_nobody()  # e.g. a user namespace that maps only 65536 uids
                        ok = _probe(found + [feat])
                    if ok:
                        found.append(feat)
            _protections = tuple(found)
        return _protections


def _probe(feats: list[str]) -> bool:
    r = run_program("import os; print(os.getuid())", timeout_s=10, features=feats)
    uid = r.stdout.strip()
    return r.passed and uid.isdigit() and ("setuid" not in feats or uid != "0")


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _take_uid() -> int:
    with _uid_lock:
        base, span = UID_POOL
        if span == 1:
            return base  # nobody: shared by all runs, and so is its NPROC count
        while True:
            uid = base + random.randrange(span)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _give_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _use_nobody() -> None:
    global UID_POOL
    UID_POOL = (NOBODY, 1)


def _rlimits(timeout_s: float, memory_mb: int, fsize_mb: int, max_procs: int,
             uid: int | None) -> list[tuple[int, int, int]]:
    cpu = math.ceil(timeout_s) + 1  # a little above the wall clock, which normally fires first
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_CORE, 0, 0),
              (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
              (resource.RLIMIT_FSIZE, fsize_mb << 20, fsize_mb << 20)]
    # NPROC counts every task of the real uid and root ignores it: it is a real per-run cap only
    # with our own uid; as another non-root user the uid's existing tasks must be added.
    if uid is not None:
        limits.append((resource.RLIMIT_NPROC, max_procs, max_procs))
    elif os.geteuid() != 0:
        n = _tasks_of_uid(os.getuid()) + max_procs
        limits.append((resource.RLIMIT_NPROC, n, n))
    return limits


def _tasks_of_uid(uid: int) -> int:
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _tmp_dirs() -> list[str]:
    dirs = {os.path.realpath(d) for d in TMP_DIRS if os.path.isdir(d)}
    return sorted(dirs)


def _interpreter_paths() -> dict[str, list[str]]:
    """Directories the unprivileged program needs and the untraversable ancestors hiding them."""
    exe = os.path.realpath(sys.executable)
    need = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix,
                                          sys.base_exec_prefix, os.path.dirname(exe))}
    keep = sorted(p for p in need if not any(p != q and p.startswith(q + "/") for q in need))
    blocked = set()
    for path in keep:
        cur = ""
        for part in path.strip("/").split("/"):
            cur += "/" + part
            if cur != path and not os.stat(cur).st_mode & stat.S_IXOTH:  # e.g. /root is 0700
                blocked.add(cur)
                break
    return {"keep": keep, "blocked": sorted(blocked)}


def _launch(cfg: dict, out: IO[bytes], err: IO[bytes],
            backstop_s: float) -> tuple[list[str], bool, int]:
    """Run the launcher; return its report lines, whether it hung, and its exit status."""
    r, w = os.pipe()
    try:
        try:
            cfg["status_fd"] = w
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", os.path.abspath(__file__), json.dumps(cfg)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(w,),
                cwd=cfg["workdir"], env={"PATH": PROGRAM_ENV["PATH"]}, start_new_session=True)
        finally:
            os.close(w)  # else the report pipe would never see EOF
        try:
            hung = not _wait_unreaped(proc, backstop_s)
        finally:
            # The launcher's pid is not reaped yet, so its group id cannot have been reused:
            # this kills exactly what is left of the run, whatever happened above.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        os.set_blocking(r, False)
        chunks = []
        while True:
            try:
                chunk = os.read(r, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace").splitlines(), hung, proc.returncode
    finally:
        os.close(r)


def _wait_unreaped(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for ``proc`` to exit without reaping it; True if it exited in time."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # kernel < 5.3: reap, accepting a tiny pid-reuse window
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _clip(f: IO[bytes], limit: int) -> str:
    size = os.fstat(f.fileno()).st_size
    f.seek(0)
    if size <= limit:
        return f.read().decode(errors="replace")
    half = limit // 2
    head = f.read(half)
    f.seek(size - half)
    tail = f.read(half)
    marker = f"\n...[{size - 2 * half} bytes truncated]...\n".encode()
    return (head + marker + tail).decode(errors="replace")


_MEMORY = re.compile(r"\bMemoryError\b|Cannot allocate memory|out of memory")
_FSIZE = re.compile(r"File too large|\[Errno 27\]")


def _classify(report: list[str], hung: bool, launcher_rc: int, stderr: str,
              timeout_s: float) -> tuple[str, str, int | None]:
    for line in report:
        if line.startswith("error "):
            return "error", line[6:], None
    if hung:
        return "timeout", f"wall-clock limit {timeout_s:g}s (launcher killed)", -signal.SIGKILL
    if "timeout" in report:
        return "timeout", f"wall-clock limit {timeout_s:g}s", -signal.SIGKILL
    ended = [line.split() for line in report if line.startswith(("exit ", "signal "))]
    if not ended:
        return "error", f"launcher ended without a report (exit status {launcher_rc})", None
    kind, num = ended[-1][0], int(ended[-1][1])
    if kind == "signal":
        sig = signal.Signals(num).name if num in signal.valid_signals() else str(num)
        if num == signal.SIGXCPU:
            return "timeout", "cpu time limit", -num
        if num == signal.SIGXFSZ:
            return "fsize", "file-size limit", -num
        if _MEMORY.search(stderr):
            return "memory", f"memory limit (signal {sig})", -num
        return "killed", f"signal {sig}", -num
    if num == 0:
        return "passed", "exit 0", 0
    if _MEMORY.search(stderr):
        return "memory", "memory limit", num
    if _FSIZE.search(stderr):
        return "fsize", "file-size limit", num
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return "failed", last[:200] or f"exit {num}", num


# ----------------------------------------------------------------------------- launcher side
# Everything below runs in the launcher process (this file executed with ``python -I -S``), as
# root, and must never return into evaluator code: every path ends in os._exit or exec.


def _launcher_main(cfg: dict) -> NoReturn:
    fd = cfg["status_fd"]
    os.set_inheritable(fd, False)  # the program must not be able to forge its own report

    def report(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    feats = set(cfg["features"])
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)  # evaluator dies -> the run dies
        if os.getppid() != cfg["parent_pid"]:
            os._exit(1)
        flags = ((CLONE_NEWNET if "netns" in feats else 0) | (CLONE_NEWPID if "pidns" in feats else 0)
                 | (CLONE_NEWNS if "mountns" in feats else 0))
        if flags:
            _check(libc.unshare(flags), "unshare")
        child = os.fork()
    except BaseException as e:
        report(f"error launcher: {e!r}")
        os._exit(125)
    if child == 0:
        _reaper(cfg, libc, report)
    timed_out = False

    def on_alarm(*_: object) -> None:
        nonlocal timed_out
        try:
            os.kill(child, signal.SIGKILL)  # with pidns, the kernel then kills everything inside
            timed_out = True
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
    _, st = os.waitpid(child, 0)
    signal.setitimer(signal.ITIMER_REAL, 0)
    if timed_out:
        report("timeout")
    elif "pidns" not in feats:
        report(_describe(st))  # without pidns the child exec'd the program itself
    os._exit(0)


def _reaper(cfg: dict, libc: ctypes.CDLL, report) -> NoReturn:
    try:
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)
        if "mountns" in cfg["features"]:
            _setup_mounts(cfg, libc)
        os.chdir(cfg["workdir"])
        if "pidns" not in cfg["features"]:
            _exec_program(cfg, libc)
        program = os.fork()
        if program == 0:
            _exec_program(cfg, libc)
        # pid 1 of the namespace: reap orphans until the program ends; our exit then makes the
        # kernel kill and reap whatever the program left behind.
        while True:
            pid, st = os.wait()
            if pid == program:
                report(_describe(st))
                os._exit(0)
    except BaseException as e:
        report(f"error setup: {e!r}")
        os._exit(125)


def _exec_program(cfg: dict, libc: ctypes.CDLL) -> NoReturn:
    for res, soft, hard in cfg["rlimits"]:
        resource.setrlimit(res, (soft, hard))
    uid = cfg["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    _prctl(libc, PR_SET_NO_NEW_PRIVS, 1)
    if "pidns" not in cfg["features"]:
        _prctl(libc, PR_SET_PDEATHSIG, signal.SIGKILL)  # changing uid cleared the earlier one
    python = cfg["python"]
    os.execve(python, [python, "-s", "-P", PROGRAM_NAME, *cfg["argv"]], cfg["env"])


def _setup_mounts(cfg: dict, libc: ctypes.CDLL) -> None:
    def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
        enc = (lambda s: None if s is None else s.encode())
        _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
               f"mount {target}")

    # Without this, every mount below would propagate back into the host's namespace.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    workdir, uid = cfg["workdir"], cfg["uid"]
    with open(os.path.join(workdir, PROGRAM_NAME), "rb") as f:
        source = f.read()
    keep = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["keep"]}
    workdir_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)  # reachable even once covered
    for target in _mount_points():
        try:
            keep_flags = os.statvfs(target).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep_flags)
        except OSError:
            if target == "/":
                raise
    tmp_dirs = cfg["tmp_dirs"]
    covers = [(d, 0o1777, cfg["tmp_mb"]) for d in tmp_dirs] + [(d, 0o755, 1) for d in cfg["blocked"]]
    for cover, mode, size_mb in sorted(covers, key=lambda c: len(c[0])):
        mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode={mode:o}")
        for path, fd in keep.items():
            if _under(path, cover):
                _makedirs(path, 0o755)
                mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
    home = os.path.join(workdir, "home")
    if any(_under(workdir, d) for d in tmp_dirs):
        _makedirs(workdir, 0o700)  # a fresh copy on the private tmpfs: size-capped, gone at exit
        with open(os.path.join(workdir, PROGRAM_NAME), "wb") as f:
            f.write(source)
        _makedirs(home, 0o755)
    else:  # TMPDIR elsewhere: bind the real directory back, writable, over the read-only root
        if not os.path.isdir(workdir):  # it was under a covered home such as /root
            _makedirs(workdir, 0o700)
        mount(f"/proc/self/fd/{workdir_fd}", workdir, None, MS_BIND)
        mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    if uid is not None:
        for path in (workdir, home, os.path.join(workdir, PROGRAM_NAME)):
            os.chown(path, uid, uid)
    if "pidns" in cfg["features"]:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for fd in (*keep.values(), workdir_fd):
        os.close(fd)


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    # mountinfo escapes space, tab, newline and backslash as octal
    return list(dict.fromkeys(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), p) for p in points))


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _makedirs(path: str, mode: int) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)  # not subject to the inherited umask


def _prctl(libc: ctypes.CDLL, option: int, arg: int) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("this file is lopa's sandbox launcher; call lopa.sandbox.run_program instead")
    _launcher_main(json.loads(sys.argv[1]))
