"""The benchmark's results ledger: a finished run's results stand in for its folder only for the same recipe."""

from __future__ import annotations

import json
from pathlib import Path

from steptitan.experiments import spec
from steptitan.experiments.ledger import Ledger


def _sweep(tmp_path: Path, lr: float) -> spec.Sweep:
    f = tmp_path / "s.toml"
    f.write_text(f'recipe = "recipes/step.toml"\n[axes]\ntraining.seed = [0, 1]\n[set]\ntraining.lr = {lr}\n')
    return spec.load_sweep(f, output_dir=str(tmp_path / "out"))


def test_ledger_round_trip_and_refusal_of_another_recipe(tmp_path):
    path = tmp_path / "ledger.json"
    sw = _sweep(tmp_path, 0.5)
    led = Ledger(path)
    result = {"final_val_loss": 3.25, "stages": [{"steps": 4}], "curve": [[1.0, 4.0], [2.0, 3.25]]}
    led.record(sw, sw.runs[0], result)
    led.save()
    again = Ledger(path)
    assert again.lookup(sw, sw.runs[0]) == result
    assert again.lookup(sw, sw.runs[1]) is None  # never recorded
    assert len(again.used) == 1 and sw.runs[0].name in again.used[0]
    other = _sweep(tmp_path, 0.25)  # same run names, another resolved recipe
    assert [r.name for r in other.runs] == [r.name for r in sw.runs]
    assert Ledger(path).lookup(other, other.runs[0]) is None
    _sweep(tmp_path, 0.5)  # the first recipe again, run in another folder: the folder is not part of the key
    moved = spec.load_sweep(tmp_path / "s.toml", output_dir=str(tmp_path / "elsewhere"))
    assert Ledger(path).lookup(moved, moved.runs[0]) == result
    data = json.loads(path.read_text())
    assert data["format"] == 1 and list(data["runs"]) == [f"{sw.name}/{sw.runs[0].name}"]


def test_workers_sharing_a_ledger_keep_each_others_entries(tmp_path):
    """Two bench workers load the ledger, each records a different run and saves: the file has both (a save
    merges with what is on disk under a lock; before, the second save dropped the first's entry)."""
    path = tmp_path / "ledger.json"
    sw = _sweep(tmp_path, 0.5)
    a, b = Ledger(path), Ledger(path)
    a.record(sw, sw.runs[0], {"final_val_loss": 3.0})
    b.record(sw, sw.runs[1], {"final_val_loss": 3.1})
    a.save()
    b.save()
    both = Ledger(path)
    assert both.lookup(sw, sw.runs[0]) == {"final_val_loss": 3.0}
    assert both.lookup(sw, sw.runs[1]) == {"final_val_loss": 3.1}
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind
