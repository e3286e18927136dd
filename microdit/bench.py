"""Speed benchmarks of the MicroDiT training step, measured side by side in one run and printed as ratios.

    OMP_NUM_THREADS=1 python -m microdit.bench                 # CPU: masking, MoE dispatch, full step, presets
    python -m microdit.bench --device cuda                     # GPU: MicroDiT_XL_2 at 256 px, mask 0.75, bf16: MFU
    python -m microdit.bench memory --recipe paper --gpu-memory 80   # per-stage peak GPU memory (no GPU needed)

CPU sections (timings here are noisy: variants are interleaved round by round and their best times compared):
  1. training step (forward + backward + AdamW) of a fixed bench configuration at mask 0, 0.5, 0.75, as a ratio
     to mask 0, beside the ratio of FLOPs that `estimate_flops` predicts (target: measured <= 1.15 x predicted);
  2. one MoE layer, forward + backward, gather/scatter dispatch vs one-hot einsum dispatch at 64, 256, 1024 tokens
     (target: >= 1.8x faster at 1024, never slower at 64 and 256);
  3. the full training step of our model vs the same model with the release's style of MoE dispatch (one-hot
     einsums, written here as `OneHotMoE`);
  4. parameter counts of all presets.
CUDA section: samples/s and model FLOPs utilisation = 3 x forward FLOPs (estimate_flops) per second over the
peak dense bf16 FLOP/s of the detected GPU (PEAK_BF16_FLOPS).
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cli import UserError, check_positive, run_cli
from .edm import EDMConfig, edm_loss
from .model import PRESETS, ExpertChoiceMoE, MicroDiT, create_model, estimate_flops

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' data sheets (SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@dataclass
class BenchConfig:
    preset: str = "MicroDiT_Micro_2"   # model of the CPU bench (same design as XL at CPU widths)
    latent_res: int = 32               # 32x32 latents, patch 2: 256 tokens
    in_channels: int = 4
    caption_len: int = 16              # caption tokens (CPU presets use short captions)
    caption_channels: int = 64
    batch: int = 4
    rounds: int = 6                    # interleaved rounds; each round times every variant `steps` times
    steps: int = 1


# --------------------------------------------------------------------------------------------
#                              The release's style of MoE dispatch
# --------------------------------------------------------------------------------------------

class OneHotMoE(ExpertChoiceMoE):
    """Expert choice with one-hot dispatch/combine einsums (O(E*k*T*D) FLOPs to move tokens), same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, idx = self.route(x)                                                # (N, E, k)
        P = F.one_hot(idx, x.shape[1]).to(x.dtype)                            # (N, E, k, T)
        xin = torch.einsum("nekt,ntd->nekd", P, x)
        h = F.gelu(torch.einsum("nekd,edf->nekf", xin, self.w1))
        h = torch.einsum("nekf,efd->nekd", h, self.w2)
        return torch.einsum("nekt,nekd->ntd", P, g.unsqueeze(-1).to(h.dtype) * h)


def with_onehot_moe(model: MicroDiT) -> MicroDiT:
    """A copy of `model` whose MoE layers dispatch with one-hot einsums."""
    other = copy.deepcopy(model)
    for m in other.modules():
        if isinstance(m, ExpertChoiceMoE):
            m.__class__ = OneHotMoE
    return other


# --------------------------------------------------------------------------------------------
#                                          Timing
# --------------------------------------------------------------------------------------------

def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_best(fns: dict, rounds: int, steps: int, device="cpu", warmup: int = 1) -> dict:
    """Best (minimum) seconds per call of each function, timed round-robin so machine noise hits all alike.

    The minimum is what the code costs when no other process interferes (timeit's convention); on a shared
    machine medians drift with the neighbours' load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def training_step(model, opt, x, y, mask_ratio, edm, autocast_dtype=None, forward=None):
    """One step as a function: EDM loss (masked when mask_ratio > 0), backward, AdamW; no host
    synchronisation. forward: what runs the model (e.g. torch.compile(model)); default the model.
    The one training step of every benchmark (dataprep.data_bench times it too)."""
    forward = forward or model

    def step():
        with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = edm_loss(forward, x, y, edm, mask_ratio=mask_ratio, patch_size=model.patch_size)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_model(cfg: BenchConfig, **overrides) -> MicroDiT:
    return create_model(cfg.preset, latent_res=cfg.latent_res, in_channels=cfg.in_channels,
                        caption_channels=cfg.caption_channels, **overrides)


def bench_inputs(cfg: BenchConfig, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.batch, cfg.in_channels, cfg.latent_res, cfg.latent_res, generator=g)
    y = torch.randn(cfg.batch, cfg.caption_len, cfg.caption_channels, generator=g)
    return x.to(device), y.to(device)


# --------------------------------------------------------------------------------------------
#                                        CPU sections
# --------------------------------------------------------------------------------------------

def masking_section(cfg: BenchConfig, ratios=(0.0, 0.5, 0.75)) -> list[dict]:
    torch.manual_seed(0)
    model = bench_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    x, y = bench_inputs(cfg)
    edm = EDMConfig()
    med = interleaved_best({r: training_step(model, opt, x, y, r, edm) for r in ratios}, cfg.rounds, cfg.steps)
    f0 = estimate_flops(model.config, cfg.batch, 0.0, cfg.caption_len)
    rows = []
    for r in ratios:
        flop_ratio = estimate_flops(model.config, cfg.batch, r, cfg.caption_len) / f0
        rows.append({"mask_ratio": r, "step_s": med[r], "time_ratio": med[r] / med[ratios[0]],
                     "flop_ratio": flop_ratio, "time_over_flops": med[r] / med[ratios[0]] / flop_ratio})
    return rows


def moe_section(tokens=(64, 256, 1024), dim: int = 256, hidden: int = 576, batch: int = 4, rounds: int = 4,
                steps: int = 2) -> list[dict]:
    rows = []
    for t in tokens:
        torch.manual_seed(0)
        ours = ExpertChoiceMoE(dim, hidden, num_experts=8, expert_capacity=2.0)
        for p in ours.parameters():
            torch.nn.init.normal_(p, std=0.02)
        onehot = copy.deepcopy(ours)
        onehot.__class__ = OneHotMoE
        x = torch.randn(batch, t, dim, requires_grad=True)

        def run(layer):
            def fn():
                layer(x).square().mean().backward()
            return fn
        med = interleaved_best({"gather": run(ours), "onehot": run(onehot)}, rounds, steps)
        rows.append({"tokens": t, "gather_s": med["gather"], "onehot_s": med["onehot"],
                     "speedup": med["onehot"] / med["gather"]})
    return rows


def release_step_section(cfg: BenchConfig, mask_ratio: float = 0.75) -> dict:
    torch.manual_seed(0)
    ours = bench_model(cfg).train()
    theirs = with_onehot_moe(ours)
    x, y = bench_inputs(cfg)
    edm = EDMConfig()
    steps = {k: training_step(m, torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True), x, y, mask_ratio, edm)
             for k, m in (("ours", ours), ("onehot", theirs))}
    med = interleaved_best(steps, cfg.rounds, cfg.steps)
    return {"mask_ratio": mask_ratio, "ours_s": med["ours"], "onehot_s": med["onehot"],
            "speedup": med["onehot"] / med["ours"]}


def preset_params(latent_res: int = 32, caption_channels: int = 1024, in_channels: int = 4) -> dict:
    out = {}
    for name in PRESETS:
        with torch.device("meta"):
            out[name] = create_model(name, latent_res=latent_res, caption_channels=caption_channels,
                                     in_channels=in_channels).num_params()
    return out


# --------------------------------------------------------------------------------------------
#                                        CUDA section
# --------------------------------------------------------------------------------------------

def peak_bf16_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in device_name.upper():
            return peak
    return None


def train_step_flops(model_cfg, batch: int, mask_ratio: float, caption_len: int) -> float:
    """Model FLOPs of a training step: forward (estimate_flops) + backward (2x forward)."""
    return 3.0 * estimate_flops(model_cfg, batch, mask_ratio, caption_len)


def mfu(step_flops: float, step_seconds: float, peak_flops: float) -> float:
    return step_flops / step_seconds / peak_flops


def cuda_section(batch: int = 256, mask_ratio: float = 0.75, steps: int = 10, compile: bool = False,
                 caption_len: int = 77) -> dict:
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = create_model("MicroDiT_XL_2", latent_res=32, in_channels=4, caption_channels=1024).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compile else model
    x = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randn(batch, caption_len, 1024, device=device)
    step = training_step(model, opt, x, y, mask_ratio, EDMConfig(), torch.bfloat16, forward=fwd)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    name = torch.cuda.get_device_name()
    peak = peak_bf16_flops(name)
    flops = train_step_flops(model.config, batch, mask_ratio, caption_len)
    return {"gpu": name, "batch": batch, "mask_ratio": mask_ratio, "step_s": dt, "samples_per_s": batch / dt,
            "tflops_per_s": flops / dt / 1e12, "peak_tflops": peak / 1e12 if peak else None,
            "mfu": mfu(flops, dt, peak) if peak else None, "max_mem_gb": torch.cuda.max_memory_allocated() / 1e9}


# --------------------------------------------------------------------------------------------
#                                          Report
# --------------------------------------------------------------------------------------------

def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for k, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main(argv=None) -> dict:
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["memory"]:                         # the memory planner (microdit/memory.py)
        from .memory import main as memory_main
        raise SystemExit(memory_main(["plan", *argv[1:]]))
    ap = argparse.ArgumentParser(prog="python -m microdit.bench", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: others share the machine)")
    ap.add_argument("--rounds", type=int, default=6, help="interleaved timing rounds (CPU)")
    ap.add_argument("--batch", type=int, default=None, help="batch (CPU default 4; CUDA default 256)")
    ap.add_argument("--compile", action="store_true", help="CUDA: torch.compile the model")
    ap.add_argument("--steps", type=int, default=None, help="CUDA: timed steps (default 10)")
    ap.add_argument("--skip", default="", help="comma list of CPU sections to skip: mask,moe,release,params")
    args = ap.parse_args(argv)
    check_positive(threads=args.threads, rounds=args.rounds, batch=args.batch, steps=args.steps)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here; run it on a GPU machine or drop --device")
    torch.set_num_threads(args.threads)
    results = {}
    if args.device == "cuda":
        r = cuda_section(batch=args.batch or 256, compile=args.compile, steps=args.steps or 10)
        results["cuda"] = r
        print_table("MicroDiT_XL_2, 256 px (32x32 latents), mask 0.75, bf16 autocast, AdamW",
                    ["gpu", "batch", "step s", "samples/s", "TFLOP/s", "peak", "MFU", "mem GB"],
                    [[r["gpu"], r["batch"], r["step_s"], r["samples_per_s"], r["tflops_per_s"], r["peak_tflops"],
                      r["mfu"], r["max_mem_gb"]]])
        return results
    skip = set(filter(None, args.skip.split(",")))
    cfg = BenchConfig(rounds=args.rounds, batch=args.batch or BenchConfig.batch)
    tokens = (cfg.latent_res // 2) ** 2
    print(f"bench configuration: {cfg.preset}, latent {cfg.latent_res} ({tokens} tokens), batch {cfg.batch}, "
          f"caption {cfg.caption_len}x{cfg.caption_channels}, fused AdamW, {args.threads} thread(s); best of "
          f"{cfg.rounds}x{cfg.steps} interleaved timings per variant")
    if "mask" not in skip:
        rows = results["masking"] = masking_section(cfg)
        print_table("1. training step (fwd + bwd + AdamW) vs mask ratio  [target: time ratio <= 1.15 x FLOP ratio]",
                    ["mask", "step s", "time ratio", "FLOP ratio", "time/FLOP ratio"],
                    [[r["mask_ratio"], r["step_s"], r["time_ratio"], r["flop_ratio"], r["time_over_flops"]]
                     for r in rows])
    if "moe" not in skip:
        rows = results["moe"] = moe_section(rounds=args.rounds)
        print_table("2. MoE layer fwd + bwd (D 256, hidden 576 = XL's mean MoE ratio 2.25, 8 experts, capacity 2, batch 4)  "
                    "[target: >= 1.8x at 1024, >= 1x at 64 and 256]",
                    ["tokens", "gather/scatter s", "one-hot s", "speed-up"],
                    [[r["tokens"], r["gather_s"], r["onehot_s"], r["speedup"]] for r in rows])
    if "release" not in skip:
        rows = results["release"] = [release_step_section(cfg, r) for r in (0.75, 0.0)]
        print_table("3. full training step, ours vs the same model with one-hot MoE dispatch (release style)",
                    ["mask", "ours s", "one-hot s", "speed-up"],
                    [[r["mask_ratio"], r["ours_s"], r["onehot_s"], r["speedup"]] for r in rows])
    if "params" not in skip:
        p = results["params"] = preset_params()
        print_table("4. parameters (4 latent channels, 1024-wide captions)", ["preset", "parameters"],
                    [[k, f"{v:,}"] for k, v in p.items()])
    return results


if __name__ == "__main__":
    run_cli(main)
