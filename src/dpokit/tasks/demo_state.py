"""The demo's record (demo.json) and its stops: what makes `dpokit demo --resume` continue a run.

demo.json holds the options the demo was started with, the measured machine and the plan, the phases
done, the held-out preference metrics after training, and the seconds each phase actually took (summed
over invocations), so the planner's prediction can be checked against them. A resumed demo takes its plan
from there — not a new measurement — so training resumes with exactly the options of its checkpoint.

Ctrl-C / SIGTERM in any phase ends in DemoInterrupted, which `dpokit demo` prints as one line naming the
command that continues (training turns its own stop, TrainingInterrupted, into one after checkpointing).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from dpokit.config import ConfigError

RECORD = "demo.json"


class DemoInterrupted(RuntimeError):
    """A signal stopped the demo; the message says where and how to continue."""

    def __init__(self, signum: int, phase: str, output_dir: Path, checkpoint=None):
        self.signum, self.phase, self.checkpoint = signum, phase, checkpoint
        where = f"stopped during {phase}" + (f" (checkpoint at {checkpoint})" if checkpoint else "")
        super().__init__(f"{where}; continue with: dpokit demo --resume --output-dir {output_dir}")


class _Phase:
    name = "starting"


@contextmanager
def stop_on_signals(output_dir: Path):
    """While inside, SIGINT/SIGTERM raise DemoInterrupted naming the current phase (`.name` of the yielded
    object). Training installs its own handlers for its duration (checkpoint first, then stop)."""
    phase, previous = _Phase(), {}

    def handle(signum, frame):
        raise DemoInterrupted(signum, phase.name, output_dir)

    if threading.current_thread() is threading.main_thread():  # handlers can only live there
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, handle)
    try:
        yield phase
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def flat_options(options: dict) -> dict:
    """{'samples': 4, 'beta': 0.1, 'minutes': 15, …}: the command-line options of a recorded demo."""
    task = {k: v for k, v in options["task"].items() if k not in ("train_count", "eval_count")}
    return {**task, **options["train"], "minutes": options["minutes"]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_options(output_dir: Path, given: dict, defaults: dict) -> dict:
    """For `--resume`: the recorded options, where an option left at its default takes the recorded value;
    one given with another value than recorded is refused, naming it. `given`/`defaults`: flat options."""
    path = Path(output_dir) / RECORD
    if not path.is_file():
        return given
    recorded = flat_options(_read(path)["options"])
    changed = [k for k, v in given.items() if v != defaults.get(k) and v != recorded.get(k, defaults.get(k))]
    _refuse_changed(changed, given, recorded, path)
    return {k: (recorded[k] if k in recorded else v) for k, v in given.items()}


def _refuse_changed(changed: list, asked: dict, recorded: dict, path: Path) -> None:
    if changed:
        raise ConfigError("--resume: " + "; ".join(f"{_flag(k)} {asked.get(k)!r} differs from the {recorded.get(k)!r} "
                          "this demo was started with" for k in changed)
                          + f" ({path}); resume with the same options, or start another --output-dir")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); start another --output-dir") from None


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)  # whole or absent, like the pairs files


class DemoState:
    """demo.json, read or created by `open` (the checks on the output folder live there)."""

    def __init__(self, out: Path, data: dict):
        self.out, self.data, self._started = out, data, None

    @classmethod
    def open(cls, out: Path, options: dict, resume: bool, log=print) -> "DemoState":
        path = out / RECORD
        used = out.is_dir() and any(out.iterdir())
        if resume and path.is_file():
            data = _read(path)
            recorded, asked = flat_options(data["options"]), flat_options(options)
            changed = sorted(k for k in set(recorded) | set(asked) if recorded.get(k) != asked.get(k))
            _refuse_changed(changed, asked, recorded, path)
            return cls(out, data)
        if used and path.is_file():
            raise ConfigError(f"{out} holds a previous demo ({path}): continue it with `dpokit demo --resume "
                              f"--output-dir {out}`, or choose another --output-dir")
        if used:
            raise ConfigError(f"{out} is not empty and holds no {RECORD}: the demo would mix its files with "
                              "what is there; choose another --output-dir")
        if resume:
            log(f"--resume: nothing to resume in {out} yet; starting fresh")
        out.mkdir(parents=True, exist_ok=True)
        state = cls(out, {"version": 1, "options": options, "plan": None, "machine": None, "done": [],
                          "results": {}, "actual_s": {}, "invocations": 0})
        state.save()
        return state

    @property
    def plan(self) -> dict | None:
        return self.data["plan"]

    @property
    def done(self) -> list:
        return self.data["done"]

    @property
    def results(self) -> dict:
        return self.data["results"]

    def save(self) -> None:
        _write(self.out / RECORD, self.data)

    def record_plan(self, plan: dict, machine: dict) -> None:
        self.data["plan"], self.data["machine"] = plan, machine
        self.save()

    def _add(self, key: str, seconds: float) -> None:
        actual = self.data["actual_s"]
        actual[key] = round(actual.get(key, 0.0) + seconds, 3)

    @contextmanager
    def timing(self):
        """This invocation's wall time, added to actual_s.total_s however it ends."""
        self._started = time.perf_counter()
        self.data["invocations"] += 1
        try:
            yield
        finally:
            self._add("total_s", time.perf_counter() - self._started)
            self._started = None
            self.save()

    @contextmanager
    def phase(self, name: str):
        """Time spent in a phase (an interrupted one too: it was spent); marked done when it ends normally."""
        start = time.perf_counter()
        try:
            yield
            if name not in self.done:
                self.done.append(name)
        finally:
            self._add(f"{name}_s", time.perf_counter() - start)
            self.save()

    def timings(self) -> dict:
        """actual_s so far, with the running invocation's time in total_s."""
        actual = dict(self.data["actual_s"])
        if self._started is not None:
            actual["total_s"] = round(actual.get("total_s", 0.0) + time.perf_counter() - self._started, 3)
        return actual

    def read_json(self, name: str) -> dict:
        return _read(self.out / name)

    def write_json(self, name: str, data: dict) -> None:
        _write(self.out / name, data)
