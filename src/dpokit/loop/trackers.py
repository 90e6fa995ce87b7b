"""--report-to: metrics.jsonl, and the same lines sent to experiment trackers (TensorBoard, Weights & Biases,
trackio, MLflow).

`open_metrics` gives the loops one MetricsSink (rank 0 only; other ranks get None): each record becomes a
metrics.jsonl line, and its numeric scalars go to every tracker under the same names at the record's "step";
the resolved config (cfg.to_dict()) goes to each as hyperparameters. Strings, lists and "step" itself are not
sent. config_checks.report_problems has already refused unknown names and missing packages, so the packages
are imported here, late (`import dpokit` and `--help` never load them).

A resumed run (start_step > 0) continues the same tracker run and step axis:
  * tensorboard: one log dir, <output_dir>/tensorboard; the writer opens with purge_step = start_step + 1, so
    TensorBoard's reader drops what an earlier process logged at the steps this one redoes (a fresh start
    removes the old event files instead, as metrics.jsonl is rewritten);
  * wandb, mlflow, trackio: the run's id (trackio: its name) is kept in <output_dir>/trackers.json with the
    last step sent and its keys; a key is sent at most once per step, so the steps redone after the checkpoint
    keep the values first sent (on CPU, and on GPU with --deterministic, the same bits) rather than appearing
    twice (W&B also refuses a step below its last; MLflow and trackio would keep both).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from dpokit.config_checks import tracker_names

STATE = "trackers.json"


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, "step" and booleans left out."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _hparam(value):
    """A config value as trackers take hyperparameters: numbers, strings and booleans as they are, else JSON."""
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value)


class TensorBoard:
    def __init__(self, out: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        log_dir = out / "tensorboard"
        if not start_step and log_dir.is_dir():  # a fresh run rewrites metrics.jsonl: its old events go too
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        fresh = not any(log_dir.glob("events.out.tfevents.*"))
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)
        if fresh:  # once per log dir: a resume would add a second hparams session
            for summary in hparams({k: _hparam(v) for k, v in config.items()}, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in config.items()), 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Appending:
    """A tracker whose history only grows (wandb, mlflow, trackio): its run's id and what it was sent last are in
    trackers.json, so a resume continues the run and sends each key at most once per step."""
    name = ""

    def __init__(self, out: Path, start_step: int):
        self.path = out / STATE
        state = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        mine = state.get(self.name) if start_step else None  # a fresh start is a new run
        self.run_id = mine["run"] if mine else None
        self.step, self.keys = (mine["step"], set(mine["keys"])) if mine else (-1, set())

    def log(self, values: dict[str, float], step: int) -> None:
        if step < self.step:
            return
        new = {k: v for k, v in values.items() if step > self.step or k not in self.keys}
        if not new:
            return
        self.send(new, step)
        self.keys = (self.keys if step == self.step else set()) | set(new)
        self.step = step
        self.save()

    def save(self) -> None:
        state = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        state[self.name] = {"run": self.run_id, "step": self.step, "keys": sorted(self.keys)}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1), encoding="utf-8")
        tmp.replace(self.path)  # whole or not at all: a kill mid-write keeps the previous state

    def send(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass


class WandB(_Appending):
    """W&B: project $WANDB_PROJECT (default dpokit), files under --output-dir unless $WANDB_DIR says; offline
    with WANDB_MODE=offline (`wandb sync` uploads later)."""
    name = "wandb"

    def __init__(self, out: Path, config: dict, start_step: int):
        super().__init__(out, start_step)
        import wandb
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dpokit"), name=str(out), id=self.run_id,
                              resume="allow", dir=os.environ.get("WANDB_DIR", str(out)), config=config,
                              allow_val_change=True)
        self.save()

    def send(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio(_Appending):
    """trackio: project $TRACKIO_PROJECT (default dpokit), stored where trackio keeps it ($TRACKIO_DIR, else
    $HF_HOME/trackio); the run is named after --output-dir and the start time, and resumed by that name."""
    name = "trackio"

    def __init__(self, out: Path, config: dict, start_step: int):
        super().__init__(out, start_step)
        import trackio
        self.run_id = self.run_id or f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "dpokit"), name=self.run_id,
                                config=config, resume="allow" if start_step else "never")
        self.save()

    def send(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(_Appending):
    """MLflow: $MLFLOW_TRACKING_URI (default MLflow's, sqlite:///mlflow.db in the working directory), experiment
    $MLFLOW_EXPERIMENT_NAME (default dpokit); the config as the run's params."""
    name = "mlflow"

    def __init__(self, out: Path, config: dict, start_step: int):
        super().__init__(out, start_step)
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.client = MlflowClient()
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dpokit")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=out.name,
                                                 tags={"dpokit.output_dir": str(out)}).info.run_id
            params = [Param(k, str(_hparam(v))) for k, v in config.items()]
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                self.client.log_batch(self.run_id, params=params[i:i + 100])
        else:  # params are immutable in MLflow: a resume keeps the first run's (a resume changes bookkeeping only)
            self.client.update_run(self.run_id, status="RUNNING")
        self.save()

    def send(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


KINDS = {"tensorboard": TensorBoard, "wandb": WandB, "trackio": Trackio, "mlflow": MLflow}


class MetricsSink:
    """metrics.jsonl and the trackers, with a text file's write/flush/close besides write_record (a loop that
    writes JSON lines to it reaches the trackers too). close() finishes each tracker's run; twice is harmless."""

    def __init__(self, path: Path, append: bool, trackers: list):
        self.file = open(path, "a" if append else "w", encoding="utf-8")
        self.trackers = trackers

    def write_record(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self._send(record)

    def write(self, text: str) -> None:
        self.file.write(text)
        for line in text.splitlines():
            if line.strip():
                self._send(json.loads(line))

    def _send(self, record: dict) -> None:
        values = scalars(record)
        if values and isinstance(record.get("step"), int):
            for tracker in self.trackers:
                tracker.log(values, record["step"])

    def flush(self) -> None:
        self.file.flush()
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        if self.file.closed:
            return
        self.file.close()
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> "MetricsSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_metrics(cfg, out: Path, start_step: int, is_main: bool = True) -> MetricsSink | None:
    """<out>/metrics.jsonl (appended to when resuming at start_step > 0) and cfg.report_to's trackers; None on
    every rank but the first (only rank 0 reports under torchrun)."""
    if not is_main:
        return None
    out = Path(out)
    config = cfg.to_dict()
    trackers = []
    try:
        for name in tracker_names(cfg):
            trackers.append(KINDS[name](out, config, start_step))
    except BaseException:
        for tracker in trackers:  # those already open end their runs
            tracker.close()
        raise
    return MetricsSink(out / "metrics.jsonl", start_step > 0, trackers)
