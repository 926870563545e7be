"""The `bitsearch` console script, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import reference_model

BITSEARCH = Path(sys.executable).parent / "bitsearch"


def run(*args, check=True):
    proc = subprocess.run([str(BITSEARCH), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_inspect_lists_the_resnet20_layer_table():
    out = run("inspect", reference_model("resnet20-fmnist")).stdout
    assert "22 layers" in out and "layers.3.shortcut.0" in out and "fc" in out
    data = json.loads(run("inspect", reference_model("resnet20-fmnist"), "--json").stdout)
    assert data["totals"]["layers"] == 22
    assert data["layers"][9]["name"] == "layers.3.shortcut.0"
    assert data["layers"][9]["params"] == 512 and data["layers"][9]["macs"] == 512 * 14 * 14


def test_eval_reports_accuracy_sqnr_and_cost(tiny_model_path, tiny_model, tmp_path):
    data = json.loads(run("eval", tiny_model_path, "--data", "fashion-mnist", "--uniform", "4/8", "--split", "val",
                          "--json").stdout)
    assert data["split"] == "val" and data["samples"] == 5000
    assert 0.5 < data["top1"] <= data["fp32_top1"] + 0.01 and data["sqnr_db"] > 10
    assert data["cost"]["avg_wbits"] == 4.0 and data["cost"]["weight_bytes"] > 0 and data["cost"]["bitops"] > 0
    from search.config import QuantConfig

    cfg = tmp_path / "cfg.json"
    cfg.write_text(QuantConfig.uniform(tiny_model, 4, 8).to_json())
    again = json.loads(run("eval", tiny_model_path, "--data", "fashion-mnist", "--config", cfg, "--split", "val",
                           "--json").stdout)
    assert again["top1"] == data["top1"] and again["sqnr_db"] == data["sqnr_db"]
    table = run("eval", tiny_model_path, "--data", "fashion-mnist", "--uniform", "8/8", "--split", "val").stdout
    assert "top-1" in table and "output SQNR" in table and "BitOPs" in table


def test_errors_are_clear_and_exit_2(tiny_model_path, tmp_path):
    bad = tmp_path / "cfg.json"
    bad.write_text(json.dumps({"format": "bitsearch.config", "version": 1, "model_sha256": "0" * 64, "layers": {}}))
    proc = run("eval", tiny_model_path, "--data", "fashion-mnist", "--config", bad, check=False)
    assert proc.returncode == 2 and "config is for model sha256" in proc.stderr
    junk = tmp_path / "junk.pt2"
    junk.write_text("nope")
    proc = run("inspect", junk, check=False)
    assert proc.returncode == 2 and "not a torch.export .pt2 archive" in proc.stderr
    proc = run("eval", tiny_model_path, "--data", "imagenet", "--uniform", "4/8", check=False)
    assert proc.returncode == 2 and "unknown data set 'imagenet'" in proc.stderr
