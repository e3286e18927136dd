"""Generate images from prompts with a MicroDiT checkpoint.

    python -m microdit.generate --checkpoint runs/demo/stage4 --prompt "a red cube left of a blue sphere" \\
        --images-per-prompt 4 --seed 0 --out samples/ --grid
    python -m microdit.generate --checkpoint dit_4_channel_37M_real_and_synthetic_data.pt \\
        --prompt-file prompts.txt --steps 30 --guidance 5 --device cuda --dtype bfloat16 --out samples/

--checkpoint takes our model folder (model.safetensors + config.json), a Hugging Face hub id holding one,
or a released `.pt` state dict (then the SDXL VAE, or Ostris for 16 channels, and the DFN5B text encoder
are used, at 512 px). Writes one PNG per image (pNNN_iNN.png, prompt-major), grid.png with --grid (a row
per prompt), and settings.json (everything needed to repeat the run, seed included).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .cli import run_cli

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m microdit.generate", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="model folder, hub id, or released .pt file")
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    ap.add_argument("--prompt-file", help="text file with one prompt per line (blank lines and # lines skipped)")
    ap.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default 1)")
    ap.add_argument("--steps", type=int, default=30, help="Heun sampler steps (default 30)")
    ap.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0; 1 = off)")
    ap.add_argument("--seed", type=int, default=None, help="seed (default: drawn at random and written to settings.json)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--grid", action="store_true", help="also write grid.png (a row per prompt)")
    ap.add_argument("--batch-size", type=int, default=8, help="images sampled at once (does not change results)")
    ap.add_argument("--image-autoencoder", help="override the checkpoint's image autoencoder (e.g. sdxl, pixel:2)")
    ap.add_argument("--text-encoder", help="override the checkpoint's text encoder")
    ap.add_argument("--preset", help="preset of a released .pt whose width matches none (rarely needed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype (bfloat16 on GPUs)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.prompts = list(args.prompt)
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text().splitlines()
        args.prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not args.prompts:
        ap.error("give at least one --prompt or a --prompt-file with prompts")
    if args.images_per_prompt < 1 or args.steps < 1 or args.batch_size < 1:
        ap.error("--images-per-prompt, --steps and --batch-size must be at least 1")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    from .manifest import write_json_atomic, write_png_atomic
    from .pipeline import MicroDiTPipeline
    from .sampling import image_grid
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    out = Path(args.out)
    t0 = time.time()
    pipe = MicroDiTPipeline.from_pretrained(args.checkpoint, image_autoencoder=args.image_autoencoder,
                                            text_encoder=args.text_encoder, device=args.device,
                                            dtype=DTYPES[args.dtype], preset=args.preset)
    out.mkdir(parents=True, exist_ok=True)             # only once the model and encoders have loaded
    images = pipe.generate(args.prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                           images_per_prompt=args.images_per_prompt, batch_size=args.batch_size,
                           progress=not args.no_progress)
    names = []
    for k, im in enumerate(images):
        names.append(f"p{k // args.images_per_prompt:03d}_i{k % args.images_per_prompt:02d}.png")
        write_png_atomic(out / names[-1], im)
    if args.grid:
        write_png_atomic(out / "grid.png", image_grid(images, args.images_per_prompt))
    settings = {"checkpoint": args.checkpoint, "prompts": args.prompts, "images_per_prompt": args.images_per_prompt,
                "steps": args.steps, "guidance": args.guidance, "seed": pipe.last_seed,
                "image_autoencoder": pipe.image_autoencoder.name, "text_encoder": pipe.text_encoder.name,
                "resolution": pipe.resolution, "preset": pipe.meta.get("preset"), "device": args.device,
                "dtype": args.dtype, "images": names, "grid": "grid.png" if args.grid else None,
                "wall_seconds": round(time.time() - t0, 2)}
    write_json_atomic(out / "settings.json", settings)
    print(f"wrote {len(names)} images{' and grid.png' if args.grid else ''} to {out} (seed {pipe.last_seed})",
          file=sys.stderr)
    return out


if __name__ == "__main__":
    run_cli(main)
