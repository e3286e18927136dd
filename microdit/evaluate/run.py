"""`evaluate(checkpoint, suites=[...], ...)`: generate (resumably), score, write report.json + manifest.json + grids.

Output folder layout (default `<checkpoint>/eval/`):
    report.json                    every suite's figures (merged across runs) and the config
    manifest.json                  kind "evaluation": wall / CPU / GPU seconds, metrics (for the cost ledger)
    shapes/NNNNN/{metadata.jsonl, samples/NNNNN.png}    GenEval's own folder layout, one folder per prompt
    geneval/NNNNN/{metadata.jsonl, samples/NNNNN.png}
    coco-<N>/{captions.jsonl, images/NNNNNN.png}        shared by the fid30k and clip suites
    results_<suite>.jsonl          per-image verdicts (shapes, geneval)
    grid_<suite>_<task>.png        contact sheets for a person to look at
"""
from __future__ import annotations

import json
from pathlib import Path


from microdit.cli import UserError
from microdit.configs import check_fields
from microdit.manifest import CostMeter, Manifest, folder_bytes, write_json_atomic, write_png_atomic
from microdit.sampling import image_grid

from .config import EvalConfig
from .images import ImageGenerator, Job, generate_missing, load_images, seed_for

SUITE_IDS = {"shapes": 1, "geneval": 2, "coco": 3}    # separate seed streams per suite
GRID_IMAGES = 32


class LazyGenerator:
    """Loads the checkpoint only when an image is actually missing (reruns over finished folders are free)."""

    def __init__(self, cfg: EvalConfig):
        self.cfg, self._gen = cfg, None

    def get(self) -> ImageGenerator:
        if self._gen is None:
            c = self.cfg
            self._gen = ImageGenerator(c.checkpoint, c.device, c.steps, c.guidance, c.image_autoencoder, c.text_encoder)
        return self._gen

    def __call__(self, prompts, seeds):
        return self.get()(prompts, seeds)

    def resolution(self, jobs: list[Job]) -> int:
        done = next((j.path for j in jobs if j.path.exists()), None)
        if done is not None:
            from PIL import Image
            with Image.open(done) as im:
                return im.size[0]
        return self.get().resolution


def _check_checkpoint(checkpoint: str) -> None:
    """A missing local checkpoint is named; a hub id must be in the cache or downloadable now."""
    from microdit.checkpoint import _hub_snapshot
    from microdit.encoders import is_hub_id
    if Path(checkpoint).exists():
        return
    if not is_hub_id(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such folder or file (a MicroDiT folder, a released "
                                ".pt file, or a hub id owner/name)")
    _hub_snapshot(checkpoint)


def default_out_dir(checkpoint: str) -> Path:
    p = Path(checkpoint)
    if p.is_dir():
        return p / "eval"
    if p.is_file():
        return p.with_name(p.stem + "-eval")
    return Path("eval") / checkpoint.replace("/", "--")


def generation_settings(cfg: EvalConfig) -> dict:
    """What the images of a folder depend on; a rerun with other settings must not reuse them."""
    folder = Path(cfg.checkpoint)
    weights = next((w for w in (folder / "model.safetensors",                                  # our folder
                                folder / "transformer" / "diffusion_pytorch_model.safetensors")  # diffusers folder
                    if w.is_file()), folder)
    stamp = [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None
    return {"checkpoint": str(Path(cfg.checkpoint).resolve()) if stamp else cfg.checkpoint, "weights": stamp,
            "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
            "image_autoencoder": cfg.image_autoencoder, "text_encoder": cfg.text_encoder}


def check_image_folder(folder: Path, cfg: EvalConfig) -> None:
    """Record the generation settings in folder/generation.json; refuse to mix images made with others."""
    folder.mkdir(parents=True, exist_ok=True)
    want, path = generation_settings(cfg), folder / "generation.json"
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            raise UserError(f"{folder} holds images generated with other settings {diff} (old, new): pass "
                             "another --out-dir or delete the folder to regenerate")
    else:
        write_json_atomic(path, want)


def _prompt_jobs(folder: Path, prompts: list[dict], per_prompt: int, seed: int, suite_id: int) -> list[Job]:
    """GenEval's layout: folder/<prompt index>/metadata.jsonl + samples/<image index>.png."""
    jobs = []
    for i, p in enumerate(prompts):
        pdir = folder / f"{i:05d}"
        meta = pdir / "metadata.jsonl"
        if meta.exists() and json.loads(meta.read_text()) != p:      # the prompt list changed (other counts)
            for stale in (pdir / "samples").glob("*.png"):
                stale.unlink()
            meta.unlink()
        if not meta.exists():
            pdir.mkdir(parents=True, exist_ok=True)
            _write_results(meta, [p])                               # one JSON line, as GenEval writes it
        jobs += [Job(pdir / "samples" / f"{j:05d}.png", p["prompt"], seed_for(seed, suite_id, i, j))
                 for j in range(per_prompt)]
    return jobs


def _write_results(path: Path, results: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
    tmp.replace(path)


def _task_grids(out: Path, suite: str, images, results) -> list[str]:
    names = []
    for tag in dict.fromkeys(r["tag"] for r in results):
        idx = [i for i, r in enumerate(results) if r["tag"] == tag][:GRID_IMAGES]
        marks = [("ok " if results[i]["correct"] else "x ") + results[i]["prompt"] for i in idx]
        name = f"grid_{suite}_{tag}.png"
        write_png_atomic(out / name, image_grid([images[i] for i in idx], 8, marks, cell=96))
        names.append(name)
    return names


def real_shapes_images(n: int, resolution: int, seed: int):
    """The real side of the shapes FD: the source drawn directly at `resolution` (held-out seed)."""
    from microdit.shapes import generate_shapes
    for s in generate_shapes(n, resolution, seed):
        yield s.image


def run_shapes(cfg: EvalConfig, gen: LazyGenerator, out: Path) -> dict:
    from microdit.shapes import shapes_prompts

    from . import shapes_eval
    from .frechet import extract_features, feature_stats, frechet_distance, load_feature_extractor
    prompts = shapes_prompts(cfg.shapes_prompts_per_task, cfg.seed)
    check_image_folder(out / "shapes", cfg)
    jobs = _prompt_jobs(out / "shapes", prompts, cfg.images_per_prompt, cfg.seed, SUITE_IDS["shapes"])
    metas = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    generated = generate_missing(gen, jobs, cfg.batch_size, "generate shapes")
    images = load_images(jobs)
    summary, results = shapes_eval.score_images(images, metas)
    _write_results(out / "results_shapes.jsonl", results)
    resolution = images[0].size[0]
    extractor = load_feature_extractor(cfg.fd_features, cfg.device)
    gen_stats = feature_stats(extract_features(images, extractor, cfg.batch_size, cfg.device))
    real_stats = feature_stats(extract_features(real_shapes_images(cfg.shapes_real_images, resolution,
                                                                   cfg.shapes_real_seed), extractor, cfg.batch_size,
                                                cfg.device, progress="real shapes features"))
    summary.update(fd=frechet_distance(*gen_stats, *real_stats), fd_features=extractor.name,
                   fd_real_images=cfg.shapes_real_images, resolution=resolution, generated_now=generated,
                   grids=_task_grids(out, "shapes", images, results))
    return summary


def run_geneval(cfg: EvalConfig, gen: LazyGenerator, out: Path) -> dict:
    from . import geneval
    prompts = geneval.load_prompts(cfg.geneval_prompts)[: cfg.geneval_limit]
    detector, colors = geneval.load_scorers(cfg.detector, cfg.color_clip, cfg.device)   # fail fast on weights
    check_image_folder(out / "geneval", cfg)
    jobs = _prompt_jobs(out / "geneval", prompts, cfg.images_per_prompt, cfg.seed, SUITE_IDS["geneval"])
    metas = [p for p in prompts for _ in range(cfg.images_per_prompt)]
    generated = generate_missing(gen, jobs, cfg.batch_size, "generate geneval")
    images = load_images(jobs)
    summary, results = geneval.score_images(images, metas, detector, colors, filenames=[str(j.path) for j in jobs])
    _write_results(out / "results_geneval.jsonl", results)
    summary.update(detector=detector.name, color_clip=colors.clip.name, generated_now=generated,
                   grids=_task_grids(out, "geneval", images, results))
    return summary


def _coco_jobs(cfg: EvalConfig, out: Path) -> tuple[list[dict], list[Job], Path]:
    from .coco import coco_paths, sample_captions
    cap, imgdir = coco_paths(cfg.coco_root, cfg.coco_captions, cfg.coco_images)
    entries = sample_captions(cap, imgdir, cfg.num_samples, cfg.seed)
    folder = out / f"coco-{cfg.num_samples}"
    check_image_folder(folder, cfg)
    if not (folder / "captions.jsonl").exists():
        _write_results(folder / "captions.jsonl", entries)
    jobs = [Job(folder / "images" / f"{i:06d}.png", e["caption"], seed_for(cfg.seed, SUITE_IDS["coco"], i))
            for i, e in enumerate(entries)]
    return entries, jobs, cap


def _iter_images(jobs):
    from PIL import Image
    for j in jobs:
        with Image.open(j.path) as im:
            yield im.convert("RGB")


def run_fid(cfg: EvalConfig, gen: LazyGenerator, out: Path) -> dict:
    from .coco import fid_protocol, reference_stats
    from .frechet import extract_features, feature_stats, frechet_distance, load_feature_extractor
    entries, jobs, cap = _coco_jobs(cfg, out)
    extractor = load_feature_extractor(cfg.inception, cfg.device)                  # fail fast on weights
    generated = generate_missing(gen, jobs, cfg.batch_size, f"generate coco-{cfg.num_samples}")
    resolution = gen.resolution(jobs)
    mu_r, sigma_r, cache = reference_stats(entries, resolution, extractor, cap, cfg.seed, cfg.cache_dir,
                                           cfg.batch_size, cfg.device)
    mu_g, sigma_g = feature_stats(extract_features(_iter_images(jobs), extractor, cfg.batch_size, cfg.device,
                                                   progress="generated features"))
    write_png_atomic(out / "grid_coco.png", image_grid(load_images(jobs[:GRID_IMAGES]), 8,
                                                     [e["caption"] for e in entries[:GRID_IMAGES]], cell=96))
    return {"fid": frechet_distance(mu_g, sigma_g, mu_r, sigma_r), "num_samples": cfg.num_samples,
            "resolution": resolution, "feature_extractor": extractor.name, "resize": "clean-fid float bicubic",
            "reference_cache": str(cache), "generated_now": generated, "grids": ["grid_coco.png"],
            "protocol": fid_protocol(cfg.num_samples, resolution, extractor.name, cfg.seed, cache)}


def run_clip(cfg: EvalConfig, gen: LazyGenerator, out: Path) -> dict:
    from .clip_models import clip_scores, load_clip
    entries, jobs, _ = _coco_jobs(cfg, out)
    clip = load_clip(cfg.clip_model, cfg.device)                                   # fail fast on weights
    generated = generate_missing(gen, jobs, cfg.batch_size, f"generate coco-{cfg.num_samples}")
    total, chunk = 0.0, 256
    for i in range(0, len(jobs), chunk):
        total += float(clip_scores(clip, load_images(jobs[i:i + chunk]), [e["caption"] for e in entries[i:i + chunk]],
                                   cfg.batch_size).double().sum())
    return {"clip_score": max(total / len(jobs), 0.0), "num_samples": len(jobs), "model": clip.name,
            "generated_now": generated,
            "protocol": f"max(mean of 100 x cos(image, caption), 0) over the {len(jobs)} generated COCO images and "
                        f"their captions (torchmetrics CLIPScore), {clip.name}"}


RUNNERS = {"shapes": run_shapes, "geneval": run_geneval, "fid30k": run_fid, "clip": run_clip}


def _metrics(report: dict) -> dict:
    m = {}
    for suite, r in report.get("suites", {}).items():
        for key in ("overall", "fd", "fid", "clip_score"):
            if key in r:
                m[f"{suite}/{key}"] = r[key]
        if "fid" in r and "protocol" in r:                  # an FID travels with its protocol (ledger included)
            from .coco import protocol_line
            m[f"{suite}/protocol"] = protocol_line(r["protocol"])
        for tag, t in r.get("tasks", {}).items():
            m[f"{suite}/{tag}"] = t["score"]
    return m


def evaluate(checkpoint: str, suites=("shapes",), out_dir: str | None = None, **options) -> dict:
    """Run the suites on a checkpoint; returns the report (also written to <out_dir>/report.json)."""
    import torch
    check_fields(EvalConfig, options, "EvalConfig")
    cfg = EvalConfig(checkpoint=str(checkpoint), suites=tuple(suites), out_dir=out_dir, **options)
    _check_checkpoint(cfg.checkpoint)                  # before any output folder exists
    out = Path(cfg.out_dir) if cfg.out_dir else default_out_dir(cfg.checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report.update(checkpoint=cfg.checkpoint, out_dir=str(out))
    report.setdefault("suites", {})
    gen = LazyGenerator(cfg)
    with CostMeter() as meter:
        for suite in cfg.suites:
            result = RUNNERS[suite](cfg, gen, out)
            result["config"] = cfg.to_dict()
            report["suites"][suite] = result
            write_json_atomic(report_path, report)
    gpu = cfg.device.startswith("cuda") and torch.cuda.is_available()
    prior = Manifest.read(out) if (out / "manifest.json").exists() else None
    manifest = Manifest(kind="evaluation", name=f"eval-{Path(cfg.checkpoint).name}", config=cfg.to_dict(),
                        parents=[cfg.checkpoint], samples=sum(int(r.get("images", r.get("num_samples", 0)))
                                                              for r in report["suites"].values()),
                        bytes=folder_bytes(out), metrics=_metrics(report),
                        wall_seconds=meter.wall_seconds + (prior.wall_seconds if prior else 0.0),
                        cpu_seconds=meter.cpu_seconds + (prior.cpu_seconds if prior else 0.0),
                        gpu_seconds=(meter.wall_seconds if gpu else 0.0) + (prior.gpu_seconds if prior else 0.0),
                        gpu_type=torch.cuda.get_device_name() if gpu else (prior.gpu_type if prior else ""),
                        num_gpus=1 if gpu else (prior.num_gpus if prior else 0))
    manifest.write(out)
    return report


def format_report(report: dict) -> str:
    lines = [f"evaluation of {report['checkpoint']} -> {report['out_dir']}"]
    for suite, r in report["suites"].items():
        if "tasks" in r:
            lines.append(f"{suite}: overall {r['overall']:.3f} over {r['images']} images")
            lines += [f"  {tag:14s} {t['score']:.3f}  ({t['images']} images)" for tag, t in r["tasks"].items()]
        if "fd" in r:
            lines.append(f"  Fréchet distance ({r['fd_features']}, {r['fd_real_images']} real images): {r['fd']:.4f}")
        if "fid" in r:
            from .coco import protocol_line
            lines.append(f"{suite}: FID {r['fid']:.3f} ({r['num_samples']} samples, {r['resolution']} px, "
                         f"{r['feature_extractor']})")
            if "protocol" in r:
                lines.append(f"  protocol: {protocol_line(r['protocol'])}")
        if "clip_score" in r:
            lines.append(f"{suite}: CLIP score {r['clip_score']:.3f} ({r['num_samples']} samples, {r['model']})")
    return "\n".join(lines)
