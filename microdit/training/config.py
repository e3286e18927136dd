"""Training configuration: `TrainConfig` (one stage) and the stage presets (paper and CPU scale).

The paper's recipe (SPEC "Training recipe", batch 2048, AdamW (0.9, 0.999), weight decay 0.1, bf16):

    stage  resolution  mask  steps                    learning rate                        other
    1      256         0.75  250K                     2.4e-4, 2.5K warm-up, cosine to 0.33x  clip 0.25
    2      256         0     to 280K (30K more)       8e-5 constant                          clip 0.25
    3      512         0.75  50K (counter restarts)   8e-5, 500 warm-up                      clip 0.5, EMA 0.99975
    4      512         0     to 55K (5K more)         8e-5 constant                          clip 0.5, EMA 0.9975

`steps` here is always the number of optimizer steps of the stage itself (the release counts
cumulatively within a resolution: stage 2 "to 280K" = 30K steps here).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..cli import UserError
from ..configs import check_fields
from ..edm import EDMConfig


# What a run writes beside its TrainConfig in train_config.json: values resolved when it ran, not settings.
RESOLVED_FIELDS = ("world_size", "micro_batch", "accumulation", "schema")


@dataclass
class TrainConfig:
    # ---- what to train ----
    name: str = "stage"                    # stage name (folder names, logs, manifest)
    preset: str = "MicroDiT_Nano_2"        # microdit.model.PRESETS key
    model_overrides: dict = field(default_factory=dict)  # MicroDiTConfig fields to override (e.g. patch_mixer=False)
    init_from: str = ""                    # previous stage's checkpoint folder to start from ("" = fresh weights)
    # ---- data ----
    data: list = field(default_factory=list)          # latent set folders (MDS shards + schema.json)
    data_proportions: list = field(default_factory=list)  # mixing proportion per set (empty = by size)
    resolution: int = 16                   # image resolution in pixels: reads the latents_<resolution> column
    caption_dropout: float = 0.1           # probability of a zeroed caption embedding (the unconditional branch)
    shuffle: bool = True                   # shuffle the stream (deterministic per seed)
    val_data: str = ""                     # held-out latent set for validation loss and sample captions
    data_cache: str = ""                   # local folder caching sets given as URLs ("" = <out_dir>/cache)
    cache_limit: str = ""                  # bound on that cache, e.g. "200gb" ("" = none; shards are evicted LRU)
    num_canonical_nodes: int = 1           # streaming's shuffle is defined for this many nodes: keep it fixed
                                           # across resumes and cluster sizes (a multiple of the node count)
    loader_workers: int = 0                # DataLoader worker processes per rank (decode and stack batches)
    # ---- diffusion ----
    mask_ratio: float = 0.0                # fraction of patch tokens dropped after the patch mixer
    P_mean: float = -0.6                   # ln(sigma) ~ N(P_mean, P_std^2): (-0.6, 1.2) at 256 px, (0, 0.6) at 512
    P_std: float = 1.2                     # spread of ln(sigma) in training
    sigma_data: float = 0.9                # EDM data standard deviation
    data_mean: float | str = 0.0           # value the latents are centred on by the EDM preconditioning; "auto" =
                                           # init_from's, or the mean of the first 1024 samples of each set
    pos_interp_scale: float = 1.0          # position coordinates / this (1 at 256 px, 2 at 512 px)
    # ---- optimisation ----
    steps: int = 1000                      # optimizer steps of this stage
    batch_size: int = 64                   # global batch (all ranks, after gradient accumulation)
    micro_batch_size: int = 0              # largest per-rank forward batch (0 = batch_size / world size, no accumulation)
    lr: float = 1e-3                       # peak learning rate (MoE experts and routers get lr * moe_lr_scale)
    moe_lr_scale: float = 0.5              # learning-rate factor of the expert and router parameters
    schedule: str = "cosine"               # "cosine" (warm-up, then cosine to final_lr_fraction) or "constant"
    warmup_steps: int = 0                  # linear warm-up from 0 to lr
    final_lr_fraction: float = 0.33        # cosine schedule ends at lr * this
    betas: tuple = (0.9, 0.999)            # AdamW betas
    weight_decay: float = 0.1              # AdamW decoupled weight decay
    grad_clip: float = 0.25                # max global gradient norm (0 = no clipping)
    ema_decay: float = 0.0                 # EMA of the weights (0 = none); exported weights are the EMA when kept
    precision: str = "bf16"                # "bf16" autocast on CUDA; "fp32" everywhere (CPU always fp32)
    compile: bool = False                  # torch.compile the model (~15% on H100; no gain on a small CPU model)
    activation_checkpointing: bool = False  # recompute each transformer block in backward (less memory, ~1/3 more compute)
    seed: int = 0                          # model init, data order, sigma/noise/mask draws, caption dropout
    # ---- distributed ----
    strategy: str = "ddp"                  # "ddp" or "fsdp" (FSDP2; parameters whole between forward and backward)
    # ---- outputs ----
    out_dir: str = "runs/stage"            # checkpoints/, final/, tensorboard/, samples/, metrics.jsonl
    checkpoint_every: int = 100            # steps between resumable checkpoints (0 = only the final one)
    keep_checkpoints: int = 2              # how many resumable checkpoints to keep
    log_every: int = 10                    # steps between TensorBoard scalars
    sample_every: int = 0                  # steps between sample image grids (0 = only at the end)
    sample_prompts: list = field(default_factory=list)  # captions of the sample grids (empty = val set captions)
    num_samples: int = 16                  # images per sample grid
    sample_steps: int = 30                 # Heun steps for sample grids
    guidance_scale: float = 5.0            # classifier-free guidance for sample grids
    progress: bool = True                  # tqdm progress bar
    # ---- stopping ----
    max_wall_seconds: float = 0.0          # stop cleanly with a checkpoint after this long (0 = no limit)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_fields(cls, d, "TrainConfig")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    @classmethod
    def load(cls, path) -> "TrainConfig":
        """A TrainConfig JSON file, or a run's train_config.json (its resolved values are left out)."""
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e}): fix the TrainConfig file") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: a TrainConfig file holds a JSON object of fields")
        return cls.from_dict({k: v for k, v in d.items() if k not in RESOLVED_FIELDS})

    def replace(self, **changes) -> "TrainConfig":
        check_fields(TrainConfig, changes, "TrainConfig")
        return replace(self, **changes)

    def cache_dir(self) -> Path:
        """Local cache of the latent sets given as URLs (the stage's loader and its validation views)."""
        return Path(self.data_cache) if self.data_cache else Path(self.out_dir) / "cache"

    def loader_options(self) -> dict:
        """microdit.data.latent_loader's storage and worker arguments from this config."""
        return {"cache_dir": self.cache_dir(), "cache_limit": self.cache_limit or None,
                "num_canonical_nodes": self.num_canonical_nodes, "num_workers": self.loader_workers}

    def validate(self) -> None:
        """Refuse a config that cannot train, naming the field and what to give instead (before any output)."""
        from ..model import PRESETS
        if self.preset not in PRESETS:
            raise UserError(f"TrainConfig.preset {self.preset!r} is not a model preset: choose one of "
                            f"{', '.join(sorted(PRESETS))}")
        for name in ("steps", "batch_size", "resolution", "keep_checkpoints", "log_every", "sample_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"TrainConfig.{name} is {getattr(self, name)!r}: give a positive whole number "
                                f"(--set {name}=N)")
        for name in ("micro_batch_size", "warmup_steps", "checkpoint_every", "sample_every", "num_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise UserError(f"TrainConfig.{name} is {getattr(self, name)!r}: give 0 or a positive whole number")
        for name in ("lr", "moe_lr_scale"):
            if not getattr(self, name) > 0:
                raise UserError(f"TrainConfig.{name} is {getattr(self, name)!r}: give a positive number "
                                f"(--set {name}=1e-3)")
        for name in ("weight_decay", "grad_clip", "final_lr_fraction", "max_wall_seconds", "P_std", "sigma_data"):
            if not getattr(self, name) >= 0:
                raise UserError(f"TrainConfig.{name} is {getattr(self, name)!r}: give 0 or more")
        if self.data_mean != "auto" and (isinstance(self.data_mean, bool) or
                                         not isinstance(self.data_mean, (int, float)) or not math.isfinite(self.data_mean)):
            raise UserError(f"TrainConfig.data_mean is {self.data_mean!r}: give a number or \"auto\" "
                            "(--set data_mean=auto)")
        for name in ("caption_dropout", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"TrainConfig.{name} is {getattr(self, name)!r}: give a value in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"TrainConfig.betas is {list(self.betas)}: give two values in [0, 1), e.g. [0.9, 0.999]")
        if self.schedule not in ("cosine", "constant"):
            raise UserError(f"TrainConfig.schedule is {self.schedule!r}: use 'cosine' or 'constant'")
        if self.strategy not in ("ddp", "fsdp"):
            raise UserError(f"TrainConfig.strategy is {self.strategy!r}: use 'ddp' or 'fsdp'")
        if self.precision not in ("bf16", "fp32"):
            raise UserError(f"TrainConfig.precision is {self.precision!r}: use 'bf16' or 'fp32'")
        if not 0 <= self.mask_ratio < 1:
            raise UserError(f"TrainConfig.mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not self.data:
            raise UserError("TrainConfig.data is empty: give at least one latent set folder (--data DIR)")
        for folder in [*self.data, *([self.val_data] if self.val_data else [])]:
            if "://" not in str(folder) and not (Path(folder) / "schema.json").is_file():
                what = "no such folder" if not Path(folder).exists() else "not a latent set (no schema.json)"
                raise UserError(f"latent set {folder}: {what}: make it with dataprep.precompute (or "
                                "dataprep.synthetic) and pass its folder")
        if self.data_proportions and len(self.data_proportions) != len(self.data):
            raise UserError(f"TrainConfig.data_proportions has {len(self.data_proportions)} entries for "
                            f"{len(self.data)} data sets")

    def identity(self) -> dict:
        """The fields that decide what a stage trains: a rerun into the same out_dir must agree on them."""
        d = self.to_dict()
        for name in RUN_ONLY_FIELDS:
            d.pop(name, None)
        d["data"] = [_resolved(x) for x in self.data]
        d["val_data"] = _resolved(self.val_data) if self.val_data else ""
        d["init_from"] = _resolved(self.init_from) if self.init_from else ""
        return d


# Fields that change how a run is carried out or reported, not what it trains (they may differ on a rerun).
RUN_ONLY_FIELDS = ("out_dir", "progress", "max_wall_seconds", "log_every", "checkpoint_every", "keep_checkpoints",
                   "sample_every", "sample_prompts", "num_samples", "sample_steps", "guidance_scale", "compile",
                   "strategy", "micro_batch_size")


def _resolved(path: str) -> str:
    return str(path) if "://" in str(path) else str(Path(path).resolve())


def check_same_run(cfg: TrainConfig, saved: dict, where) -> None:
    """Refuse to continue (or reuse) a stage folder whose saved config trains something else."""
    try:
        old = TrainConfig.from_dict({k: v for k, v in saved.items() if k in {f.name for f in fields(TrainConfig)}})
    except (UserError, TypeError, ValueError):
        raise UserError(f"{where} holds a config this version cannot read: use a new --out folder, or remove "
                        f"{Path(cfg.out_dir)} to start over") from None
    a, b = old.identity(), cfg.identity()
    diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    if diff:
        shown = "; ".join(f"{k}: {o!r} -> {n!r}" for k, (o, n) in list(diff.items())[:5])
        raise UserError(f"{cfg.out_dir} was trained with another config ({shown}): use a new --out folder, or "
                        f"remove {cfg.out_dir} to start over")


def batch_split(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(per-rank micro-batch, accumulation steps) with micro * steps * world = global batch."""
    per_rank, rem = divmod(cfg.batch_size, world_size)
    if rem:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size {world_size}")
    micro = min(cfg.micro_batch_size, per_rank) if cfg.micro_batch_size else per_rank   # an upper bound
    if per_rank % micro:
        raise ValueError(f"per-rank batch {per_rank} (batch_size / world size) is not a multiple of "
                         f"micro_batch_size {micro}")
    return micro, per_rank // micro


def edm_config(cfg: TrainConfig, data_mean: float | None = None) -> EDMConfig:
    """The stage's EDM settings (sigma_data, data_mean and the training noise distribution); `data_mean`
    is the resolved value when cfg.data_mean is "auto" (`resolve_data_mean`)."""
    mean = cfg.data_mean if data_mean is None else data_mean
    if mean == "auto":
        raise ValueError("edm_config: resolve data_mean='auto' first (resolve_data_mean)")
    return EDMConfig(sigma_data=cfg.sigma_data, data_mean=float(mean), P_mean=cfg.P_mean, P_std=cfg.P_std)


MEAN_SAMPLES = 1024      # samples per latent set that data_mean="auto" averages


def resolve_data_mean(cfg: TrainConfig) -> float:
    """cfg.data_mean as a number. "auto": the value the init_from model was trained with (so that every stage
    of a recipe shares stage 1's; 0 for a model saved before the setting existed), else the mean latent value
    of the first MEAN_SAMPLES samples of each training set at the stage's resolution (the same on every rank
    and on every rerun)."""
    if cfg.data_mean != "auto":
        return float(cfg.data_mean)
    if cfg.init_from:
        from ..checkpoint import CONFIG_NAME, read_meta
        try:
            meta, _ = read_meta(cfg.init_from)
        except FileNotFoundError:
            raise UserError(f"init_from {cfg.init_from}: no {CONFIG_NAME} (a finished stage's final/ folder)") from None
        return EDMConfig.from_dict(meta.get("edm") or {}).data_mean
    from ..data import LatentSet
    means = []
    for folder in cfg.data:
        ds = LatentSet(folder, cfg.resolution, cache_dir=cfg.cache_dir())
        n = min(MEAN_SAMPLES, len(ds))
        if n == 0:
            raise UserError(f"latent set {folder} is empty: data_mean='auto' has nothing to average")
        means.append(sum(float(ds[i]["latents"].float().mean()) for i in range(n)) / n)
    return round(sum(means) / len(means), 4)


# --------------------------------------------------------------------------------------------
#                                        Stage presets
# --------------------------------------------------------------------------------------------

_PAPER_COMMON = dict(preset="MicroDiT_XL_2", batch_size=2048, betas=(0.9, 0.999), weight_decay=0.1,
                     precision="bf16", caption_dropout=0.1, strategy="fsdp", checkpoint_every=1000,
                     keep_checkpoints=3, log_every=50, sample_every=5000)
_LOW, _HIGH = dict(resolution=256, P_mean=-0.6, P_std=1.2, pos_interp_scale=1.0), \
    dict(resolution=512, P_mean=0.0, P_std=0.6, pos_interp_scale=2.0)

# Per-GPU micro-batches (8 GPUs: 256 samples per GPU per step) chosen with the memory planner
# (`python -m microdit.bench memory --recipe paper --gpu-memory 80`, docs/training.md): each stage's
# estimate stays <= 72 GiB. The release used 256/64/32/16; stage 1 at 256 is estimated above 72 GiB, so it
# accumulates 2 x 128 (cheaper than recomputing every block with activation checkpointing).
PAPER_STAGES: list[TrainConfig] = [
    TrainConfig(name="stage1", **_PAPER_COMMON, **_LOW, mask_ratio=0.75, steps=250_000, lr=2.4e-4,
                schedule="cosine", warmup_steps=2_500, final_lr_fraction=0.33, grad_clip=0.25,
                micro_batch_size=128),
    TrainConfig(name="stage2", **_PAPER_COMMON, **_LOW, mask_ratio=0.0, steps=30_000, lr=8e-5,
                schedule="constant", grad_clip=0.25, micro_batch_size=64),
    TrainConfig(name="stage3", **_PAPER_COMMON, **_HIGH, mask_ratio=0.75, steps=50_000, lr=8e-5,
                schedule="constant", warmup_steps=500, grad_clip=0.5, ema_decay=0.99975, micro_batch_size=32),
    TrainConfig(name="stage4", **_PAPER_COMMON, **_HIGH, mask_ratio=0.0, steps=5_000, lr=8e-5,
                schedule="constant", grad_clip=0.5, ema_decay=0.9975, micro_batch_size=16),
]

# The same four stages at CPU scale: MicroDiT_Mini_2 on pixel:2 latents of 16 px then 32 px images
# (12x8x8 and 12x16x16 latents) with tiny-clip:16 captions, on 2 CPU threads. Masked steps come first at
# each resolution, as in the paper, but the unmasked stages are longer than the paper's: this tiny model
# draws scattered specks until its unmasked loss is ~0.07 at 16 px (measured; docs/training.md).
# The 32 px stages keep the 16 px token grid (4 x 4 tokens): their patches are 4 latent cells, not 2, and
# stage 2's weights are carried over exactly (`grow_patches`: the 32 px model starts by drawing stage 2's
# images upsampled), with a patch skip that lets a token of 8 x 8 pixels remove per-pixel noise. With the
# paper's hand-over (patch 2, 8 x 8 tokens, positions interpolated) the 32 px stages lost most of what
# stage 2 had learned of object counts and layout in the steps a demo affords, and each step cost 3x more
# (docs/training.md, "The 32 px hand-over"); a 32 px step now costs what a 16 px one does, so most steps go
# to the final resolution (800 / 400 / 800 / 1500). The learning rate
# is higher than the paper's because the model is ~180x smaller and the run ~100x shorter; stages 2-4
# continue at stage 1's final rate (1e-3 x 0.33), as the paper's 8e-5 continues 2.4e-4 x 0.33. The width
# (192, not Nano's 128) and the step counts fit `make demo` in 15 minutes on 2 cores (docs/training.md).
_CPU_COMMON = dict(preset="MicroDiT_Mini_2", batch_size=64, betas=(0.9, 0.999), weight_decay=0.1,
                   precision="fp32", caption_dropout=0.1, strategy="ddp", checkpoint_every=100,
                   keep_checkpoints=2, log_every=10, sample_every=0, num_samples=16, sample_steps=20)
# EDM as the data asks for: pixels of white-background images have mean ~0.83 and standard deviation
# ~0.45, so the preconditioning is centred on the data's mean (data_mean="auto": measured from stage 1's
# data, kept by later stages) with sigma_data 0.5. ln(sigma) is centred higher than the paper's latents
# need (0 at 16 px, 0.5 at 32 px, spread 1.2 at both): the colour and the shape of an object are decided at
# high noise, and with the paper's -0.6 the 16 px model never learned the colour words (docs/training.md).
_CPU_EDM = dict(sigma_data=0.5, data_mean="auto", P_std=1.2)
_CPU_LOW, _CPU_HIGH = dict(resolution=16, P_mean=0.0, pos_interp_scale=1.0, **_CPU_EDM), \
    dict(resolution=32, P_mean=0.5, pos_interp_scale=1.0, model_overrides={"patch_size": 4, "patch_skip": True},
         **_CPU_EDM)

CPU_STAGES: list[TrainConfig] = [
    TrainConfig(name="stage1", **_CPU_COMMON, **_CPU_LOW, mask_ratio=0.75, steps=800, lr=1e-3,
                schedule="cosine", warmup_steps=100, final_lr_fraction=0.33, grad_clip=1.0),
    TrainConfig(name="stage2", **_CPU_COMMON, **_CPU_LOW, mask_ratio=0.0, steps=400, lr=3.3e-4,
                schedule="constant", grad_clip=1.0),
    TrainConfig(name="stage3", **_CPU_COMMON, **_CPU_HIGH, mask_ratio=0.75, steps=800, lr=3.3e-4,
                schedule="constant", warmup_steps=10, grad_clip=1.0, ema_decay=0.95),
    TrainConfig(name="stage4", **_CPU_COMMON, **_CPU_HIGH, mask_ratio=0.0, steps=1500, lr=3.3e-4,
                schedule="constant", grad_clip=1.0, ema_decay=0.99),
]

# A quick run for a small set of your own (docs/your-data.md): one unmasked stage at 16 px, no masking and
# no 32 px hand-over, the narrower Nano model. 1,000 steps drew readable 16 px digits from 1,797 scans in
# minutes on 2 cores.
QUICK_STAGES: list[TrainConfig] = [
    TrainConfig(name="quick", **{**_CPU_COMMON, "preset": "MicroDiT_Nano_2"}, resolution=16, P_mean=-0.6, P_std=1.2,
                pos_interp_scale=1.0, mask_ratio=0.0,
                steps=1000, lr=1e-3, schedule="cosine", warmup_steps=50, final_lr_fraction=0.33, grad_clip=1.0),
]

STAGES: dict[str, list[TrainConfig]] = {"paper": PAPER_STAGES, "cpu": CPU_STAGES, "quick": QUICK_STAGES}


def stage_configs(recipe: str, data: list, out_dir: str, val_data: str = "", **overrides) -> list[TrainConfig]:
    """The stages of `recipe` ("paper" or "cpu": four; "quick": one) on `data`, each in out_dir/<stage name>.

    Stage i+1 starts from stage i's final weights (`init_from` is filled in by `run_stages`).
    """
    if recipe not in STAGES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(STAGES)}")
    return [s.replace(data=list(data), val_data=val_data, out_dir=str(Path(out_dir) / s.name), **overrides)
            for s in STAGES[recipe]]
