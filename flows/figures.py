"""The figures the docs show, drawn from a finished run's own outputs.

    python -m flows.figures --run runs/local --out docs/img          # after `make demo`
    python -m flows.figures --run runs/local --out /tmp/fig --ledger runs/ledger.duckdb

Writes three PNGs into --out:

    samples.png   the final sample grid of each training stage (train/<stage>-<hash>/samples/final.png),
                  with the stage's resolution and mask ratio
    loss.png      the training loss over the four stages, one after the other (each stage's metrics.jsonl,
                  a running mean of 50 steps), with the held-out validation loss at each stage's start and
                  end where the stage had a validation set (manifest metrics val_loss_start / val_loss_end)
    cost.png      the cost of each pipeline step in dollars (CPU + GPU + storage), from the cost ledger

The stages drawn are the ones the run's summary.json names (its final checkpoints); without a summary,
the newest finished folder of each stage under train/. Nothing here trains or evaluates: it only reads.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from microdit.cli import UserError, run_cli

SMOOTH = 50          # steps in the running mean of the training loss


def stage_folders(run: Path) -> list[Path]:
    """The run's training stage folders (train/<stage>-<hash>), in stage order."""
    summary = run / "summary.json"
    if summary.exists():
        finals = (json.loads(summary.read_text()).get("training") or {}).get("checkpoints") or []
        folders = [Path(f).parent for f in finals if Path(f).name == "final"]
        if folders:
            return folders
    newest: dict[str, Path] = {}
    for manifest in sorted((run / "train").glob("*-*/final/manifest.json"), key=lambda p: p.stat().st_mtime):
        folder = manifest.parent.parent
        newest[folder.name.rsplit("-", 1)[0]] = folder
    return [newest[k] for k in sorted(newest)]


def stage_info(folder: Path) -> dict:
    """Name, resolution, mask ratio, losses and validation losses of one finished stage."""
    manifest = json.loads((folder / "final" / "manifest.json").read_text())
    metrics = manifest.get("metrics") or {}
    losses = []
    log = folder / "metrics.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:          # a line cut by a kill: the rest is still good
                continue
            losses.append((int(rec["step"]), float(rec["loss"])))
    return {"name": manifest.get("name", folder.name), "resolution": metrics.get("resolution"),
            "mask_ratio": metrics.get("mask_ratio"), "losses": sorted(dict(losses).items()),
            "val_start": metrics.get("val_loss_start"), "val_end": metrics.get("val_loss_end"),
            "grid": folder / "samples" / "final.png"}


def running_mean(values: list[float], n: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def samples_figure(stages: list[dict], out: Path) -> Path:
    plt = _plt()
    from PIL import Image
    shown = [s for s in stages if s["grid"].exists()]
    if not shown:
        raise FileNotFoundError("no stage has samples/final.png (num_samples=0, or no image autoencoder here)")
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 3.0), squeeze=False)
    for ax, s in zip(axes[0], shown):
        ax.imshow(Image.open(s["grid"]).convert("RGB"), interpolation="nearest")
        ax.set_title(f"{s['name']}: {s['resolution']} px, mask {s['mask_ratio'] or 0:g}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def loss_figure(stages: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    offset, has_val = 0, False
    for i, s in enumerate(stages):
        if not s["losses"]:
            continue
        steps = [offset + st for st, _ in s["losses"]]
        ax.plot(steps, running_mean([v for _, v in s["losses"]], SMOOTH), lw=1.2, color=f"C{i}",
                label=f"{s['name']} ({s['resolution']} px, mask {s['mask_ratio'] or 0:g})")
        for x, v in ((offset, s["val_start"]), (steps[-1], s["val_end"])):
            if v is not None:
                ax.plot([x], [v], "o", color=f"C{i}", mec="black", ms=5)
                has_val = True
        ax.axvline(offset, color="grey", lw=0.5, ls=":")
        offset = steps[-1]
    ax.set_xlabel("optimizer step (stages one after the other)")
    ax.set_ylabel(f"training loss (mean of {SMOOTH} steps)")
    ax.set_yscale("log")
    ax.set_title("loss over the four stages" + (" (dots: validation loss at stage start/end)" if has_val else ""),
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cost_rows(run: Path, ledger_db: Path | None) -> list[dict]:
    """The ledger's per-step rows for this run (step, cpu_usd, gpu_usd, storage_usd, total_usd, wall_s)."""
    from . import ledger
    db = ledger_db or run.parent / "ledger.duckdb"
    summary = run / "summary.json"
    if ledger_db is None and summary.exists():
        db = Path(json.loads(summary.read_text()).get("ledger") or db)
    if not db.exists():
        raise FileNotFoundError(f"no cost ledger at {db}: pass --ledger PATH (the flows write <root>/ledger.duckdb)")
    rows = ledger.report(run_id=run.name, db=db).rows
    if not rows:
        raise ValueError(f"the ledger {db} holds no assets of run {run.name!r}: pass --ledger or check --run")
    return rows


def cost_figure(rows: list[dict], out: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    names = [r["step"] for r in rows]
    bottom = [0.0] * len(rows)
    for key, label in (("cpu_usd", "CPU"), ("gpu_usd", "GPU"), ("storage_usd", "storage")):
        vals = [float(r[key] or 0) for r in rows]
        if any(vals):
            ax.bar(names, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
    for x, (b, r) in enumerate(zip(bottom, rows)):
        ax.annotate(f"${b:.5f}\n{float(r['wall_s'] or 0):.0f} s", (x, b), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, max(bottom + [1e-9]) * 1.3)
    ax.set_ylabel("US dollars")
    ax.set_title(f"cost per pipeline step (total ${sum(bottom):.4f})", fontsize=10)
    ax.tick_params(axis="x", labelsize=8, rotation=20)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_figures(run: Path, out: Path, ledger_db: Path | None = None) -> list[Path]:
    folders = stage_folders(run)
    if not folders:
        raise FileNotFoundError(f"{run} has no finished training stage (train/<stage>-<hash>/final): "
                                "run the pipeline first (make demo) or pass --run")
    stages = [stage_info(f) for f in folders]
    out.mkdir(parents=True, exist_ok=True)
    return [samples_figure(stages, out / "samples.png"), loss_figure(stages, out / "loss.png"),
            cost_figure(cost_rows(run, ledger_db), out / "cost.png")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.figures", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/local", help="the run folder (default %(default)s)")
    ap.add_argument("--out", default="docs/img", help="where the PNGs go (default %(default)s)")
    ap.add_argument("--ledger", default=None, help="cost ledger (default: the run's summary.json, else "
                                                   "<run>/../ledger.duckdb)")
    a = ap.parse_args(argv)
    run = Path(a.run)
    if not run.is_dir():
        raise UserError(f"--run {run}: no such run folder (make demo writes runs/local)")
    paths = write_figures(run.resolve(), Path(a.out), Path(a.ledger) if a.ledger else None)
    for p in paths:
        print(f"{p}  ({p.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    run_cli(main, extra_user_errors=(ValueError,))       # a run folder without the figures' inputs
