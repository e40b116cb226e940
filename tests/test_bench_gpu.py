"""bench/gpu/check.py's CPU dry run: the one-call GPU check must not rot between GPU loans."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    # a fresh world of one: drop the rendezvous variables an in-process run of this session set
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    done = subprocess.run([sys.executable, "bench/gpu/check.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] and report["tests"]["returncode"] == 0 and report["tests"]["collect_only"]
    assert "test_bf16_training_steps_under_zero[3]" in (tmp_path / "gpu_tests.log").read_text()
    urlvr = report["sides"]["urlvr"]
    assert urlvr["median_step_s"] > 0 and urlvr["response_tokens_per_step"] > 0
    assert "time/update" in urlvr["stages_median_s"] and urlvr["update_mfu"] > 0
    for side in report["sides_skipped"]:  # TRL is in the bench extra only
        assert side == "trl"


def test_async_check_dry_run_validates_the_three_recipes_with_the_vllm_backend(tmp_path):
    """bench/gpu/async_check.py --dry-run: vLLM colocated, then vLLM in the server at k = 0 and
    k = 1, each recipe accepted by urlvr's loader (no vLLM needed, nothing trained); a workload
    the update cannot split is refused in one line."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    command = [sys.executable, "bench/gpu/async_check.py", "--dry-run", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recipes = json.loads((tmp_path / "async_check.json").read_text())["recipes"]
    assert list(recipes) == ["sync", "server-k0", "server-k1"]
    assert recipes["sync"]["rollout"]["engine"]["name"] == "vllm"
    for config, staleness in (("server-k0", 0), ("server-k1", 1)):
        engine = recipes[config]["rollout"]["engine"]
        assert (engine["name"], engine["backend"]["name"], engine["threads"]) == ("server", "vllm", 4)
        assert recipes[config]["trainer"]["max_staleness"] == staleness
    assert len({json.dumps({**r, "rollout": {**r["rollout"], "engine": None}, "trainer": {**r["trainer"], "max_staleness": None},
                            "output_dir": None}, sort_keys=True) for r in recipes.values()}) == 1  # else the same
    refused = subprocess.run([*command, "--micro-batch-size", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and "--micro-batch-size 3 must divide prompts x group size (256)" in refused.stderr
