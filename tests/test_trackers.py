"""--report-to: each tracker gets metrics.jsonl's scalars under the same names at the same steps, and the config,
read back from what it stored (TensorBoard's own reader, W&B's offline transaction log, MLflow's client on a
local file store, trackio's SQLite storage); a resume continues each run without a step twice; unknown or
missing trackers are refused before any model loads. All offline."""

from __future__ import annotations

import importlib
import importlib.util
import json
import struct
import sys
import uuid
from pathlib import Path

import pytest

from conftest import write_jsonl
from dpokit import ConfigError, TrainConfig, train
from dpokit.cli import main
from dpokit.loop.trackers import MetricsSink, open_metrics, scalars

ALL = ("tensorboard", "wandb", "trackio", "mlflow")
# not imported here: trackio fixes its folder when first imported (the fixture sets it first)
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ALL),
                                reason="needs every tracker: pip install -e '.[dev]'")


@pytest.fixture
def offline(tmp_path, monkeypatch) -> dict:
    """Every tracker local, offline and under tmp_path, nothing written to the home folder. trackio fixes its
    folder when first imported: TRACKIO_DIR is set before that (or its modules' copies patched), and a project of
    this test's own keeps its reads apart."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": tmp_path / "wandb-files",
                       "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                       "WANDB_DATA_DIR": tmp_path / "wandb-data", "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
                       "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 keeps its file store for such uses only
                       "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                       "TRACKIO_DIR": tmp_path / "trackio"}.items():
        monkeypatch.setenv(key, str(value))
    for module in [m for name, m in sys.modules.items() if name.split(".")[0] == "trackio"]:
        if hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    project = f"dpokit-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("TRACKIO_PROJECT", project)
    (tmp_path / "wandb-files").mkdir()
    return {"trackio_project": project, "wandb_dir": tmp_path / "wandb-files", "mlruns": f"file:{tmp_path / 'mlruns'}"}


def _run(tiny_model_dir, data, out, **extra):
    return train(model=tiny_model_dir, data=data, eval_data=data, output_dir=str(out), batch_size=2, lr=1e-3,
                 progress=False, log=lambda *a: None, memory_check=False, report_to=",".join(ALL), **extra)


def _jsonl(out: Path) -> dict[tuple[str, int], float]:
    """{(name, step): value} of metrics.jsonl's scalars, each (name, step) once."""
    found = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in scalars(record).items():
            assert (key, record["step"]) not in found
            found[key, record["step"]] = value
    return found


# ---- reading back what each tracker stored ------------------------------------------------------------------

def tensorboard_scalars(out: Path) -> list[tuple[str, int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]


def wandb_records(wandb_dir: Path):
    """The records of every offline run's transaction log (.wandb: LevelDB's log format after a 7-byte header
    ':W&B', 0xBEE1, version; 32 KiB blocks of chunks: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, chunk = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if left < 7 or (length == 0 and kind == 0):  # the block's zero-filled end
                pos += left
                continue
            chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # FULL or LAST: a whole record
                record = pb.Record()
                record.ParseFromString(chunk)
                chunk = b""
                yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # a name with "/" comes as a nested key


def wandb_history(wandb_dir: Path) -> tuple[list[tuple[str, int, float]], dict, set]:
    """(scalars, config, run ids) of the offline runs."""
    logged, config, ids = [], {}, set()
    for record in wandb_records(wandb_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
            config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "history":
            row = {_key(i): json.loads(i.value_json) for i in record.history.item}
            logged += [(k, record.history.step.num, v) for k, v in row.items() if not k.startswith("_")]
    return logged, config, ids


def mlflow_history(uri: str, run_id: str) -> tuple[list[tuple[str, int, float]], dict]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    logged = [(key, m.step, m.value) for key in run.data.metrics for m in client.get_metric_history(run_id, key)]
    return logged, run.data.params


def trackio_history(project: str, run: str) -> tuple[list[tuple[str, int, float]], dict]:
    from trackio.sqlite_storage import SQLiteStorage
    rows = SQLiteStorage.get_logs(project, run)
    logged = [(k, row["step"], v) for row in rows for k, v in row.items() if k not in ("step", "timestamp")]
    return logged, SQLiteStorage.get_run_config(project, run) or {}


def _once(logged: list[tuple[str, int, float]]) -> dict[tuple[str, int], float]:
    steps = [(k, s) for k, s, _ in logged]
    assert len(steps) == len(set(steps)), sorted(s for s in steps if steps.count(s) > 1)
    return {(k, s): v for k, s, v in logged}


# ---- tests ---------------------------------------------------------------------------------------------------

def test_every_tracker_stores_the_metrics_and_the_config(tmp_path, tiny_model_dir, explicit_rows, offline):
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    out = tmp_path / "run"
    _run(tiny_model_dir, data, out, max_steps=3, eval_every=2)
    expected = _jsonl(out)
    assert ("loss", 3) in expected and ("eval/rewards/accuracies", 2) in expected \
        and ("eval/rewards/accuracies", 3) in expected  # training, every --eval-every and the final held-out line
    state = json.loads((out / "trackers.json").read_text())

    assert _once(tensorboard_scalars(out)) == pytest.approx(expected, rel=1e-6)  # float32 events
    logged, config, ids = wandb_history(offline["wandb_dir"])
    assert _once(logged) == pytest.approx(expected) and ids == {state["wandb"]["run"]}
    assert config["beta"] == 0.1 and config["report_to"] == ",".join(ALL) and config["max_steps"] == 3
    logged, params = mlflow_history(offline["mlruns"], state["mlflow"]["run"])
    assert _once(logged) == pytest.approx(expected)
    assert params["beta"] == "0.1" and params["loss"] == "sigmoid" and params["ref_model"] == "null"
    logged, config = trackio_history(offline["trackio_project"], state["trackio"]["run"])
    assert _once(logged) == pytest.approx(expected) and config["beta"] == 0.1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert "_hparams_/session_start_info" in acc.summary_metadata  # the config, in the HPARAMS tab
    assert "beta" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def test_a_resumed_run_continues_each_tracker_with_every_step_once(tmp_path, tiny_model_dir, explicit_rows,
                                                                   offline, monkeypatch):
    """A run that dies in step 4 after its step-2 checkpoint, then --resume auto: step 3 is redone, 4 is new.
    TensorBoard holds the redone values (metrics.jsonl's), the others those sent first (on CPU the same bits);
    every tracker has each step once, in the same run."""
    loop = importlib.import_module("dpokit.loop.train")  # (dpokit.loop.train is also the function)

    def dies_in_step_4(run, step, take=loop.optimizer_step):
        if step == 3:
            raise RuntimeError("killed")
        return take(run, step)
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows)
    out = tmp_path / "run"
    with monkeypatch.context() as patch, pytest.raises(RuntimeError, match="killed"):
        patch.setattr(loop, "optimizer_step", dies_in_step_4)
        _run(tiny_model_dir, data, out, max_steps=4, save_every=2)
    first = json.loads((out / "trackers.json").read_text())
    assert {v["step"] for v in first.values()} == {3}
    _run(tiny_model_dir, data, out, max_steps=4, save_every=2, resume="auto")
    state = json.loads((out / "trackers.json").read_text())
    assert {k: v["run"] for k, v in state.items()} == {k: v["run"] for k, v in first.items()}
    assert state["mlflow"]["step"] == 4

    expected = _jsonl(out)
    assert sorted(s for k, s in expected if k == "loss") == [1, 2, 3, 4]
    assert _once(tensorboard_scalars(out)) == pytest.approx(expected, rel=1e-6)  # step 2 kept, 3 replaced
    logged, _, ids = wandb_history(offline["wandb_dir"])
    assert ids == {first["wandb"]["run"]}  # two offline files of one W&B run, which `wandb sync` joins
    histories = {"wandb": logged, "mlflow": mlflow_history(offline["mlruns"], state["mlflow"]["run"])[0],
                 "trackio": trackio_history(offline["trackio_project"], state["trackio"]["run"])[0]}
    for name, logged in histories.items():
        got = _once(logged)
        assert sorted(s for k, s in got if k == "loss") == [1, 2, 3, 4], name
        assert got["loss", 4] == pytest.approx(expected["loss", 4]), name  # the resumed process's step
        assert got["loss", 3] == pytest.approx(expected["loss", 3]), name  # CPU: the redone step repeats it
        assert ("eval/rewards/accuracies", 4) in got, name


def test_train_rm_reports_too(tmp_path, tiny_model_dir, explicit_rows):
    """`dpokit train-rm` writes through the same sink: TensorBoard holds metrics.jsonl, held-out line included."""
    from dpokit.loop.reward_model import train_reward_model
    data = write_jsonl(tmp_path / "d.jsonl", explicit_rows[:6])
    out = tmp_path / "rm"
    train_reward_model(TrainConfig.from_dict(dict(
        stage="reward_model", model=tiny_model_dir, data=data, eval_data=data, output_dir=str(out), batch_size=2,
        max_steps=2, progress=False, memory_check=False, device="cpu", report_to="tensorboard")), log=lambda *a: None)
    expected = _jsonl(out)
    assert ("accuracy", 2) in expected and ("eval/accuracy", 2) in expected
    assert _once(tensorboard_scalars(out)) == pytest.approx(expected, rel=1e-6)


def test_the_sink_sends_numbers_of_text_lines_and_records(tmp_path):
    """What the online loop writes (JSON text) reaches the trackers as records do; strings, lists, booleans and
    "step" are not sent; only rank 0 opens anything."""
    sent = []

    class Fake:
        def log(self, values, step):
            sent.append((step, values))
        flush = close = lambda self: None

    with MetricsSink(tmp_path / "metrics.jsonl", False, [Fake()]) as sink:
        sink.write_record({"step": 1, "loss": 0.5, "note": "x", "done": True, "lens": [1, 2], "pairs": 3})
        sink.write(json.dumps({"step": 2, "eval/reward": 0.25}) + "\n")
        sink.flush()
    assert sent == [(1, {"loss": 0.5, "pairs": 3}), (2, {"eval/reward": 0.25})]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    cfg = TrainConfig.from_dict({"report_to": "tensorboard"})
    assert open_metrics(cfg, tmp_path / "r", 0, is_main=False) is None and not (tmp_path / "r").exists()


def test_an_online_run_reports_rewards_and_held_out_metrics(tmp_path, tiny_model_dir, prompts_file):
    out = tmp_path / "grpo"
    train(model=tiny_model_dir, prompts=prompts_file, eval_prompts=prompts_file, reward="conftest:letter_reward",
          loss="grpo", max_steps=2, eval_every=1, max_new_tokens=6, batch_size=2, lr=1e-2, warmup_steps=0,
          output_dir=str(out), progress=False, log=lambda *a: None, report_to="tensorboard")
    expected = _jsonl(out)
    assert ("reward", 2) in expected and ("eval/reward", 2) in expected
    assert _once(tensorboard_scalars(out)) == pytest.approx(expected, rel=1e-6)


def test_unknown_and_missing_trackers_are_refused_before_loading(monkeypatch, capsys):
    missing = "/no/such/model"  # a model load would fail naming it: the refusal comes first
    with pytest.raises(ConfigError, match=r"unknown tracker tensorbord; choose 'none' or one or more of "
                                          r"tensorboard, wandb, trackio, mlflow"):
        train(model=missing, report_to="tensorbord")
    with pytest.raises(ConfigError, match="name each tracker once, or 'none' alone"):
        TrainConfig.from_dict({"report_to": ["none", "wandb"]})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"wandb needs wandb, not installed: pip install 'dpokit\[wandb\]'"):
        train(model=missing, report_to="tensorboard,wandb")
    assert main(["train", "--model", missing, "--report-to", "wandb"]) == 2
    assert "pip install 'dpokit[wandb]'" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(ConfigError, match=r"mlflow needs sqlalchemy.* sqlite:///mlflow.db.*dpokit\[mlflow\].*"
                                          "MLFLOW_TRACKING_URI"):
        TrainConfig.from_dict({"report_to": "mlflow"})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")  # a server needs no SQL
    assert TrainConfig.from_dict({"report_to": "mlflow"}).report_to == "mlflow"


def test_train_help_lists_report_to(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--report-to" in text and "tensorboard" in text and "(default: none)" in text
