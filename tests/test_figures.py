"""python -m flows.figures: the docs' pictures from a finished run's stage folders and its cost ledger."""
import json
from pathlib import Path

import pytest
from PIL import Image

from flows import ledger
from flows.figures import main, stage_folders
from microdit.manifest import Manifest

STAGES = [("stage1", 16, 0.75), ("stage2", 16, 0.0), ("stage3", 32, 0.75), ("stage4", 32, 0.0)]


def finished_run(root: Path) -> Path:
    """runs/<run>/ as the flows leave it: four stage folders (metrics.jsonl, samples/final.png, final/ with
    its manifest) recorded in <root>/ledger.duckdb, plus an older unfinished stage1 folder."""
    run = root / "local"
    (run / "train" / "stage1-0000000000").mkdir(parents=True)           # unfinished: no final/
    for i, (name, res, mask) in enumerate(STAGES):
        folder = run / "train" / f"{name}-{i:010d}"
        (folder / "samples").mkdir(parents=True)
        Image.new("RGB", (68, 68), (40 * i, 120, 200)).save(folder / "samples" / "final.png")
        (folder / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "loss": 1.0 / (s + i), "lr": 1e-3}) + "\n" for s in range(1, 121))
            + '{"step": 121, "lo')                                        # a line cut by a kill
        Manifest(kind="checkpoint", name=name, config={"stage": name}, samples=120 * 64, wall_seconds=10.0 * (i + 1),
                 cpu_seconds=20.0 * (i + 1), metrics={"resolution": res, "mask_ratio": mask, "steps": 120,
                                                      "val_loss_start": 0.9 - i / 10, "val_loss_end": 0.5 - i / 10}
                 ).write(folder / "final")
        ledger.ingest([folder / "final"], profile="local", run_id="local", step=f"train:{name}",
                      db=root / "ledger.duckdb")
    return run


def test_figures_from_a_finished_run(tmp_path, capsys):
    run = finished_run(tmp_path / "runs")
    assert [f.name for f in stage_folders(run)] == [f"{n}-{i:010d}" for i, (n, _, _) in enumerate(STAGES)]
    out = tmp_path / "img"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    for name in ("samples.png", "loss.png", "cost.png"):
        png = out / name
        assert png.stat().st_size < 200_000, name                        # small enough to commit
        w, h = Image.open(png).size
        assert w >= 600 and h >= 250
    assert "samples.png" in capsys.readouterr().out


def test_summary_names_the_stages_drawn(tmp_path):
    run = finished_run(tmp_path / "runs")
    chosen = [run / "train" / f"{n}-{i:010d}" / "final" for i, (n, _, _) in enumerate(STAGES[:2])]
    (run / "summary.json").write_text(json.dumps({"training": {"checkpoints": [str(c) for c in chosen]},
                                                  "ledger": str(tmp_path / "runs" / "ledger.duckdb")}))
    assert stage_folders(run) == [c.parent for c in chosen]


def _exit_code(argv) -> int:
    """What `python -m flows.figures ARGV` exits with (microdit.cli.run_cli, as its __main__ runs it)."""
    from microdit.cli import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(main, argv, extra_user_errors=(ValueError,))
    return e.value.code


def test_missing_run_or_ledger_is_one_line_and_exit_2(tmp_path, capsys):
    assert _exit_code(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "img")]) == 2
    assert capsys.readouterr().err.startswith("error: --run")
    run = finished_run(tmp_path / "runs")
    (tmp_path / "runs" / "ledger.duckdb").unlink()
    assert _exit_code(["--run", str(run), "--out", str(tmp_path / "img")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no cost ledger") and "--ledger" in err and len(err.splitlines()) == 1
