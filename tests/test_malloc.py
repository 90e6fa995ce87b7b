"""malloc.py: the training commands restart once with glibc tunables that return freed memory to the system."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dpokit import malloc

glibc = pytest.mark.skipif(not malloc.applies({}), reason="glibc on Linux only")


@glibc
def test_tuned_env_adds_to_what_the_user_set():
    env = malloc.tuned_env({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:" + malloc.TUNABLES
    assert malloc.tuned_env({})["GLIBC_TUNABLES"] == malloc.TUNABLES


def test_opt_out_and_the_users_own_threshold_are_respected():
    assert "GLIBC_TUNABLES" not in malloc.tuned_env({"DPOKIT_MALLOC": "system"})
    mine = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"}
    assert malloc.tuned_env(mine) == mine


class Restarted(Exception):
    pass


@glibc
def test_train_restarts_itself_once_with_the_tunables(monkeypatch):
    from dpokit.cli import main
    seen = {}

    def execve(path, argv, env):
        seen.update(path=path, argv=argv, env=env)
        raise Restarted
    monkeypatch.setattr(os, "execve", execve)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("DPOKIT_MALLOC", raising=False)
    monkeypatch.setattr(sys, "argv", ["dpokit", "train", "--data", "pairs.jsonl", "--beta", "0.2"])
    with pytest.raises(Restarted):
        main()
    assert seen["argv"] == [sys.executable, "-m", "dpokit", "train", "--data", "pairs.jsonl", "--beta", "0.2"]
    assert seen["env"]["GLIBC_TUNABLES"] == malloc.TUNABLES
    # a command that does not train, main(argv) from Python, and the restarted process itself: no restart
    monkeypatch.setattr(sys, "argv", ["dpokit", "losses"])
    assert main() == 0
    assert main(["losses"]) == 0
    monkeypatch.setenv("GLIBC_TUNABLES", malloc.TUNABLES)
    monkeypatch.setattr(sys, "argv", ["dpokit", "train", "--data", "/nonexistent/pairs.jsonl"])
    assert main() == 2  # ran here: the missing file is reported as usual


@glibc
def test_the_restarted_process_runs_and_reports_as_usual(tmp_path):
    """End to end through the real execve: the error comes from the restarted process, exit code intact."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DPOKIT_MALLOC")}
    proc = subprocess.run([sys.executable, "-m", "dpokit", "train", "--data", str(tmp_path / "missing.jsonl"),
                           "--output-dir", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing.jsonl" in proc.stderr
