"""Price list: dollars for the machine time, GPU time and storage an asset used (`infra/prices.toml`).

    from flows.prices import load_prices
    prices = load_prices()                  # infra/prices.toml, or $MICRO_BUDGET_PRICES
    prices.price(cpu_seconds=..., gpu_seconds=..., gpu_type="H100-80GB", bytes=...)
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from microdit.manifest import config_hash

DEFAULT_PRICES = Path(__file__).resolve().parent.parent / "infra" / "prices.toml"


@dataclass
class PriceList:
    cpu_usd_per_core_hour: float = 0.048      # one vCPU-hour
    charge_cpu_on_gpu_steps: bool = False     # False: a GPU node's host CPUs are in its GPU-hour price
    gpu_usd_per_hour: dict = field(default_factory=lambda: {"default": 3.78})  # gpu_type -> $ per GPU-hour
    storage_usd_per_gb_month: float = 0.023   # $ per 1e9 bytes per month
    storage_months: float = 1.0               # months of storage charged to each asset
    paper_reference_usd: float = 1890.0       # the paper's cost of the full recipe (its steps and batch: the
                                              # recipe itself, microdit.training.config.PAPER_STAGES)
    source: str = ""                          # file the prices came from

    @property
    def id(self) -> str:
        """Short hash naming this price list in the ledger (prices change; stored costs keep theirs)."""
        d = {k: v for k, v in self.__dict__.items() if k != "source"}
        return config_hash(d)

    def gpu_price(self, gpu_type: str) -> float:
        table = self.gpu_usd_per_hour
        if gpu_type in table:
            return float(table[gpu_type])
        # torch reports names like "NVIDIA H100 80GB HBM3": take the most specific key it contains
        norm = lambda x: "".join(ch for ch in x.lower() if ch.isalnum())  # noqa: E731
        hits = [k for k in table if k != "default" and norm(k) in norm(gpu_type)]
        if hits:
            return float(table[max(hits, key=lambda k: len(norm(k)))])
        if "default" in table:
            return float(table["default"])
        raise KeyError(f"no price for GPU type {gpu_type!r} in {self.source or 'the price list'}: "
                       f"add it under [gpu] (known: {sorted(table)})")

    def price(self, *, cpu_seconds: float, gpu_seconds: float, gpu_type: str, bytes: int) -> dict:
        """Dollars for one asset: cpu_usd + gpu_usd + storage_usd = total_usd. The one place seconds become
        dollars: the ledger prices assets with it, the budget guard its rate (`usd_per_second`)."""
        charge_cpu = gpu_seconds <= 0 or self.charge_cpu_on_gpu_steps
        cpu_usd = cpu_seconds / 3600 * self.cpu_usd_per_core_hour if charge_cpu else 0.0
        gpu_usd = gpu_seconds / 3600 * self.gpu_price(gpu_type) if gpu_seconds > 0 else 0.0
        storage_usd = bytes / 1e9 * self.storage_usd_per_gb_month * self.storage_months
        return {"cpu_usd": cpu_usd, "gpu_usd": gpu_usd, "storage_usd": storage_usd,
                "total_usd": cpu_usd + gpu_usd + storage_usd}

    def usd_per_second(self, *, num_gpus: int, gpu_type: str, cpu_cores: int) -> float:
        """What one second of a run holding `num_gpus` GPUs (or, with none, `cpu_cores` cores) costs, as the
        ledger will price it: a GPU run's seconds are GPU-seconds, a CPU run's are core-seconds."""
        one = self.price(cpu_seconds=0.0 if num_gpus else float(max(cpu_cores, 1)), gpu_seconds=float(num_gpus),
                         gpu_type=gpu_type, bytes=0)
        return one["total_usd"]

    def rows(self) -> list[tuple[str, float, str]]:
        """(resource, usd, unit) rows for the ledger's `prices` table."""
        out = [("cpu", self.cpu_usd_per_core_hour, "usd per core-hour"),
               ("storage", self.storage_usd_per_gb_month * self.storage_months, "usd per GB per asset")]
        out += [(f"gpu:{k}", float(v), "usd per GPU-hour") for k, v in sorted(self.gpu_usd_per_hour.items())]
        return out


def load_prices(path: str | os.PathLike | None = None) -> PriceList:
    """Read a price list (TOML, the layout of infra/prices.toml)."""
    path = Path(path or os.environ.get("MICRO_BUDGET_PRICES") or DEFAULT_PRICES)
    if not path.exists():
        raise FileNotFoundError(f"price list {path} not found: copy infra/prices.toml there or pass --prices")
    d = tomllib.loads(path.read_text())
    cpu, gpu, storage, paper = (d.get(k, {}) for k in ("cpu", "gpu", "storage", "paper"))
    pl = PriceList(source=str(path))
    pl.cpu_usd_per_core_hour = float(cpu.get("usd_per_core_hour", pl.cpu_usd_per_core_hour))
    pl.charge_cpu_on_gpu_steps = bool(cpu.get("charge_on_gpu_steps", pl.charge_cpu_on_gpu_steps))
    pl.gpu_usd_per_hour = {str(k): float(v) for k, v in gpu.items()} or pl.gpu_usd_per_hour
    pl.storage_usd_per_gb_month = float(storage.get("usd_per_gb_month", pl.storage_usd_per_gb_month))
    pl.storage_months = float(storage.get("months", pl.storage_months))
    pl.paper_reference_usd = float(paper.get("reference_usd", pl.paper_reference_usd))
    copied = sorted(set(paper) & {"batch_size", "stage_steps"})
    if copied:
        raise ValueError(f"{path}: [paper] {', '.join(copied)}: the recipe's steps and batch come from "
                         "microdit/training/config.py (PAPER_STAGES); remove them from the price list")
    return pl
