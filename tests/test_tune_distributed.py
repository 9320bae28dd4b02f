"""Three `pomona tune` workers on one study in a real PostgreSQL server: exactly the asked number of trials, none
run twice, none lost. The server runs from Debian's postgresql package (installed by .ci/run) on a temporary data
directory and a free localhost port, as the `postgres` user when the tests run as root."""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["--model", "test_efficientnet", "--weights", "none", "--img-size", "64", "--batch-size", "8",
        "--device", "cpu", "--val-fraction", "0.34"]


def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg2")
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = Path(tempfile.mkdtemp(prefix="pomona-pg-"))
    if prefix:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "pomona", "--auth=trust",
                    "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
    server = subprocess.Popen([*prefix, str(bindir / "postgres"), "-D", str(data / "db"), "-p", str(port),
                               "-h", "127.0.0.1", "-k", str(data), "-c", "fsync=off", "-c", "max_connections=50"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail("PostgreSQL did not start")
            time.sleep(0.2)
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "pomona", "studies"],
                       check=True, capture_output=True)
        yield f"postgresql+psycopg2://pomona@127.0.0.1:{port}/studies"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)


def test_three_workers_share_one_study_exactly(grocery_small, tmp_path, postgres_url):
    n = 9
    env = dict(os.environ, PYTHONPATH=str(SRC), POMONA_NO_REEXEC="1")
    workers = [subprocess.Popen(
        [sys.executable, "-m", "pomona", "tune", "--data", str(grocery_small), "--out", str(tmp_path / f"w{i}"),
         "--storage", postgres_url, "--study", "apples", "--trials", str(n), "--epochs", "2", "--tracker", "none",
         "--feature-cache", str(tmp_path / "features"), *TINY],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    outputs = [w.communicate(timeout=240)[0] for w in workers]
    for w, out in zip(workers, outputs):
        assert w.returncode == 0, out[-3000:]

    study = optuna.load_study(study_name="apples", storage=postgres_url)
    states = [t.state for t in study.trials]
    assert len(study.trials) == n
    assert all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states)
    assert sorted(t.number for t in study.trials) == list(range(n))
    assert all(len(t.params) == 6 for t in study.trials)
    settings = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(settings)) == n, settings  # every worker drew its own settings (distinct sampler seeds)
    # each trial ran in exactly one worker: the workers' trial folders partition the study
    ran = [sorted(int(p.name) for p in (tmp_path / f"w{i}" / "trials").iterdir())
           if (tmp_path / f"w{i}" / "trials").is_dir() else [] for i in range(3)]
    assert sorted(sum(ran, [])) == list(range(n)), ran
    assert len(list((tmp_path / "features").glob("*.npz"))) == 1  # features computed once, shared
    assert (tmp_path / "w0" / "best.json").is_file()
