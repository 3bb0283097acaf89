"""What every benchmark shares: ``lopa bench`` finds them inside the package (no source checkout
needed), and one output convention, ``--out DIR`` (plus ``--doc FILE`` where there is a report),
checked while the options are parsed, before any work."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lopa
from lopa.bench import BenchArgs, available, bench_cli
from lopa.cli import main

# benchmark -> the file it writes into --out
WRITES = {"accuracy": "summary.json", "code": "summary.json", "serving": "serving.json",
          "train-speed": "train_speed.json"}


def test_every_benchmark_is_listed():
    assert available() == sorted(WRITES)


def test_unknown_benchmark_names_the_ones_there_are(capsys):
    assert bench_cli(BenchArgs("nope", [])) == 2
    err = capsys.readouterr().err
    assert "no benchmark 'nope'" in err and "train-speed" in err


@pytest.mark.parametrize("name", sorted(WRITES))
@pytest.mark.parametrize("bad", ["a-file", "a-file/below", "name.json"])
def test_out_must_be_a_folder(tmp_path, capsys, name, bad):
    (tmp_path / "a-file").write_text("not a folder")
    started = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--out", str(tmp_path / bad)])
    assert e.value.code == 2 and time.perf_counter() - started < 5
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing written


@pytest.mark.parametrize("name", sorted(WRITES))
def test_out_whose_result_file_is_a_folder_is_refused(tmp_path, capsys, name):
    (tmp_path / WRITES[name]).mkdir()
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--out", str(tmp_path)])
    assert e.value.code == 2 and WRITES[name] in capsys.readouterr().err


@pytest.mark.parametrize("name", ["accuracy", "code", "serving"])
def test_doc_must_be_a_file(tmp_path, capsys, name):
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--out", str(tmp_path / "out"), "--doc", str(tmp_path)])
    assert e.value.code == 2 and "--doc" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bench_runs_from_a_copy_of_the_package_alone(tmp_path):
    """An installed lopa has no benchmarks/ folder beside it: a copy of the package elsewhere must still
    find every benchmark (here: its --help, and a wrong --out refused by the benchmark itself)."""
    shutil.copytree(Path(lopa.__file__).parent, tmp_path / "site" / "lopa",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}

    def bench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lopa", "bench", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    where = subprocess.run([sys.executable, "-c", "import lopa; print(lopa.__file__)"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(str(tmp_path / "site")), where  # the copy, not the checkout
    shown = bench("serving", "--help")
    assert shown.returncode == 0 and "--out DIR" in shown.stdout and "--doc FILE" in shown.stdout, shown.stderr
    (tmp_path / "x.json").write_text("{}")
    refused = bench("train-speed", "--out", "x.json")
    assert refused.returncode == 2 and "--out takes a folder" in refused.stderr, refused.stderr
    assert "lopa" in bench("code", "--help").stdout
