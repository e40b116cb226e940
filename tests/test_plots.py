"""`urlvr plot`: files exist, are PNGs, and carry the right panels (on synthetic run directories)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from urlvr.cli import main
from urlvr.metrics.plots import plot_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_run(root: Path, name: str, *, labels: bool, steps: int = 30) -> Path:
    """A run that rises then falls: proxy saturates while ground truth peaks at step 10."""
    run = root / name
    run.mkdir(parents=True)
    metrics = []
    for step in range(1, steps + 1):
        m = {"step": step, "reward/proxy_mean": 1 - 0.6 * math.exp(-step / 8), "actor/entropy_mean": 2 * math.exp(-step / 10),
             "response/length_mean": 40 - step, "response/truncation_rate": 0.0, "response/repetition_rate": step / 60,
             "dynamics/majority_ratio": 0.4 + step / 60}
        if labels:
            m.update({"reward/ground_truth_mean": 0.3 + 0.3 * math.sin(step / 6),
                      "dynamics/reward_accuracy": max(0.0, 0.9 - step / 25), "dynamics/label_accuracy": 0.5})
        if step % 5 == 0:
            m["actor/kl_to_initial"] = step / 100
        metrics.append(m)
    _write_jsonl(run / "metrics.jsonl", metrics)
    if labels:
        _write_jsonl(run / "eval.jsonl", [{"step": s, "eval/avg@4": 0.3 + s / 100, "eval/maj@4": 0.4, "eval/prompts": 8.0}
                                          for s in (0, 10, 20, 30)])
        _write_jsonl(run / "prompts.jsonl",
                     [{"step": s, "kind": "greedy", "prompt_id": f"p{i}", "answer": "1", "correct": (i + s) % 3 == 0,
                       "confidence": 0.5 + s / 100, "length": 9} for s in (0, 10, 20, 30) for i in range(5)])
    return run


def test_plot_files_and_panels(tmp_path):
    labelled, unlabelled = fake_run(tmp_path, "majority", labels=True), fake_run(tmp_path, "label-free", labels=False)
    figures = plot_runs([labelled, unlabelled], tmp_path / "plots")
    assert [f.path.name for f in figures] == ["dynamics.png", "prompts-majority.png"]
    for figure in figures:
        data = figure.path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    assert figures[0].panels == ("Proxy vs ground-truth reward", "Reward / label accuracy", "Actor entropy",
                                 "Response length", "Repetition / truncation", "KL to initial policy", "Evaluation")
    # the collapse step is recomputed from the log when no summary.json exists: RA < 1% at step 23
    from urlvr.metrics.plots import load_run

    assert load_run(labelled).collapse_step == 23 and load_run(unlabelled).collapse_step is None


def test_label_free_run_has_fewer_panels(tmp_path):
    run = fake_run(tmp_path, "label-free", labels=False)
    (figure,) = plot_runs([run], tmp_path / "plots")
    assert "Evaluation" not in figure.panels and len(figure.panels) == 6


def test_plot_command(tmp_path, capsys):
    run = fake_run(tmp_path, "run", labels=True)
    (run / "summary.json").write_text(json.dumps({"model_collapse_step": 7}))
    assert main(["plot", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{run / 'plots' / 'dynamics.png'}  (7 panels") and len(out) == 2
    assert main(["plot", str(tmp_path / "missing")]) == 2  # one-line error, not a traceback


def test_replotting_other_runs_into_a_folder_drops_the_earlier_runs_heatmaps(tmp_path):
    """A prompts-<run>.png of a run not in this plot must not stay beside this plot's figures
    (it stayed: the folder mixed two plots); files that are not the plot's own are kept."""
    first, second = fake_run(tmp_path, "first", labels=True), fake_run(tmp_path, "second", labels=True)
    out = tmp_path / "plots"
    plot_runs([first, second], out)
    assert sorted(p.name for p in out.glob("*.png")) == ["dynamics.png", "prompts-first.png", "prompts-second.png"]
    (out / "notes.txt").write_text("mine")
    plot_runs([second], out)
    assert sorted(p.name for p in out.iterdir()) == ["dynamics.png", "notes.txt", "prompts-second.png"]
