"""`dpokit bench` on pairs (the HH table): each tool's line states its share of the floor with its reference pass
counted, since the floor's FLOPs include the reference forward that a cached run computes before its steps."""

import json
import re

from dpokit import bench
from dpokit.data import builtin_path


def test_bench_counts_the_reference_pass_in_the_floor_share(tmp_path, tiny_model_dir, bench_in_process, capsys):
    out = tmp_path / "hh.json"
    bench.main(["--steps", "3", "--batch-size", "2", "--max-length", "128", "--tools", "trl,dpokit",
                "--model", tiny_model_dir, "--data", str(builtin_path("helpful_train")), "--json", str(out)])
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    trl, dpokit = result["results"]
    # TRL runs its reference inside every step; dpokit's pass was timed (0.0 s is possible on the tiny model: the
    # log line has one decimal)
    assert trl["ref_s"] is None and dpokit["ref_s"] is not None
    assert dpokit["s_pair_with_ref"] == dpokit["s_pair"] + dpokit["ref_s"] / 6 and trl["s_pair_with_ref"] == trl["s_pair"]
    line = next(line for line in text.splitlines() if line.startswith("dpokit:"))
    assert "× TRL pairs/s with its reference pass" in line and "steps alone" in line
    floor_share = int(re.search(r"; (\d+)% of the floor with its reference pass", line).group(1))
    assert abs(floor_share - round(100 * result["floor_s_pair"] / dpokit["s_pair_with_ref"])) <= 1
    assert "s for 6 pairs)" in line  # the pass covered the 3 steps × 2 pairs benchmarked
