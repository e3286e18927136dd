"""What a person watching a run sees: each step as it starts and ends, and one live line for a training stage.

    python -m flows.progress runs/local          # follow a run from another terminal (Ctrl-C to stop)

The flows append an event to runs/<run>/progress.jsonl as each step starts, ends, or is skipped as finished;
a training stage's own metrics.jsonl (one line per optimizer step) gives step, loss and samples/s. `make
demo` follows both while it waits for the deployment run: one updating line on a terminal, a plain line every
30 s when the output is a file. The flows turn the same numbers into Prefect progress artifacts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EVENTS = "progress.jsonl"


# ----------------------------------------------------------------------------------------------------
# Writing events (the flows)
# ----------------------------------------------------------------------------------------------------

def record(run_dir, step: str, event: str, **detail) -> None:
    """Append one event (start | end | skip | failed) of a pipeline step to runs/<run>/progress.jsonl."""
    line = json.dumps({"t": time.time(), "step": step, "event": event, **detail}, default=str)
    with open(Path(run_dir) / EVENTS, "a") as f:
        f.write(line + "\n")


@contextmanager
def step_events(run_dir, step: str, **detail):
    """start on entry; end with its seconds, or failed with the error, on exit."""
    t0 = time.time()
    record(run_dir, step, "start", **detail)
    try:
        yield
    except BaseException as e:
        record(run_dir, step, "failed", seconds=time.time() - t0, error=str(e).splitlines()[0][:200] if str(e) else
               type(e).__name__)
        raise
    record(run_dir, step, "end", seconds=time.time() - t0)


# ----------------------------------------------------------------------------------------------------
# Reading them (the demo, `python -m flows.progress`)
# ----------------------------------------------------------------------------------------------------

@dataclass
class StageProgress:
    name: str
    step: int
    total: int
    loss: float
    samples_per_s: float
    seconds_per_step: float

    @property
    def eta_seconds(self) -> float:
        return max(0, self.total - self.step) * self.seconds_per_step

    def line(self) -> str:
        pct = 100.0 * self.step / max(1, self.total)
        return (f"{self.name}  step {self.step}/{self.total} ({pct:.0f}%)  loss {self.loss:.4f}  "
                f"{self.samples_per_s:.0f} samples/s  ETA {duration(self.eta_seconds)}")


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def last_json_line(path: Path, tail_bytes: int = 8192) -> dict | None:
    """The last complete JSON line of a file being appended to (None if there is none yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for ln in reversed(lines):
        try:
            return json.loads(ln)
        except json.JSONDecodeError:
            continue              # a line still being written
    return None


def stage_progress(out_dir, name: str, total: int, batch_size: int = 0) -> StageProgress | None:
    """Where a running stage stands, from its metrics.jsonl (batch_size turns samples/s into an ETA)."""
    rec = last_json_line(Path(out_dir) / "metrics.jsonl")
    if not rec or "step" not in rec or "loss" not in rec:
        return None
    sps = float(rec.get("samples_per_s") or 0.0)
    batch = float(batch_size or rec.get("batch_size") or 0.0)
    per_step = batch / sps if sps > 0 and batch > 0 else 0.0
    return StageProgress(name, int(rec["step"]), int(total), float(rec["loss"]), sps, per_step)


class Follower:
    """Follows a run folder: prints each new event as a line and the running stage as one live line."""

    def __init__(self, run_dir, out=None, tty: bool | None = None, plain_every: float = 30.0):
        self.path = Path(run_dir) / EVENTS
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.plain_every, self._offset, self._live, self._last_plain = plain_every, 0, "", 0.0
        self.running: dict[str, dict] = {}        # step -> its start event

    def _emit(self, text: str) -> None:
        if self._live and self.tty:
            self.out.write("\r" + " " * len(self._live) + "\r")
        self._live = ""
        self.out.write(text + "\n")
        self.out.flush()

    def _new_events(self) -> list[dict]:
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return []
        complete = chunk[:chunk.rfind("\n") + 1]
        self._offset += len(complete.encode())
        return [json.loads(ln) for ln in complete.splitlines() if ln.strip()]

    def poll(self) -> None:
        for ev in self._new_events():
            name, kind = ev["step"], ev["event"]
            if kind == "start":
                self.running[name] = ev
                what = f" ({ev['steps']} steps)" if ev.get("steps") else ""
                self._emit(f"[run] > {name}{what} started")
            else:
                self.running.pop(name, None)
                secs = f" in {duration(ev['seconds'])}" if ev.get("seconds") is not None else ""
                extra = f": {ev['error']}" if ev.get("error") else ""
                word = {"end": "done", "skip": "skipped (finished before)", "failed": "FAILED"}.get(kind, kind)
                self._emit(f"[run] {'x' if kind == 'failed' else '='} {name} {word}{secs}{extra}")
        self._render_live()

    def _render_live(self) -> None:
        parts = []
        for name, ev in self.running.items():
            sp = stage_progress(ev["out_dir"], name, ev.get("steps") or 0, ev.get("batch_size") or 0) if ev.get("out_dir") else None
            parts.append(sp.line() if sp else f"{name}  {duration(time.time() - ev['t'])} so far")
        if not parts:
            return
        line = "[run]   " + " | ".join(parts)
        if self.tty:
            pad = " " * max(0, len(self._live) - len(line))
            self.out.write("\r" + line + pad)
            self.out.flush()
            self._live = line
        elif time.time() - self._last_plain >= self.plain_every:
            self._last_plain = time.time()
            self.out.write(line + "\n")
            self.out.flush()

    def close(self) -> None:
        self.poll()
        if self._live and self.tty:
            self.out.write("\n")
            self.out.flush()
        self._live = ""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.progress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run folder, e.g. runs/local")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between looks (default %(default)s)")
    a = ap.parse_args(argv)
    if not Path(a.run_dir).is_dir():
        from microdit.cli import UserError
        raise UserError(f"{a.run_dir} is not a run folder: give the folder a flow writes, e.g. runs/local")
    f = Follower(a.run_dir)
    try:
        while True:
            f.poll()
            time.sleep(a.every)
    finally:
        f.close()


if __name__ == "__main__":
    from microdit.cli import run_cli
    run_cli(main)
