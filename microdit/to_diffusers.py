"""Convert a MicroDiT checkpoint into a diffusers pipeline folder (`MicroDiTPipeline.save_pretrained`).

    python -m microdit.to_diffusers dit_4_channel_37M_real_and_synthetic_data.pt diffusers/microdit-xl-37m
    python -m microdit.to_diffusers VSehwag24/MicroDiT/ckpts/dit_4_channel_37M_real_and_synthetic_data.pt out/
    python -m microdit.to_diffusers runs/local/train/stage4-<hash>/final runs/local/diffusers
    python -m microdit.to_diffusers runs/local/train/stage4-<hash>/final out/ --embed-vae      # VAE weights inside

SOURCE is a released `.pt` (a path, or `<hub repo id>/<file>`), our checkpoint folder (config.json +
model.safetensors) or a hub id holding one. The result loads with
`MicroDiTPipeline.from_pretrained(OUT)` (or a hub id after uploading OUT as it is):

    OUT/model_index.json                        pipeline class, components, encoder names, EDM settings
    OUT/transformer/config.json                 MicroDiTTransformer2DModel config (the MicroDiTConfig fields)
    OUT/transformer/diffusion_pytorch_model.safetensors   the DiT weights, released parameter names
    OUT/vae/...                                 with --embed-vae: the AutoencoderKL (else named, loaded by name)

The text encoder (an OpenCLIP tower or T5) is always referenced by name (`text_encoder_name`), as is the
image autoencoder unless embedded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli import UserError, run_cli


def convert(source: str, out, preset: str | None = None, image_autoencoder: str | None = None,
            text_encoder: str | None = None, embed_vae: bool = False) -> Path:
    """Write the diffusers folder of `source` to `out`; returns `out`."""
    from .checkpoint import load_model
    from .pipeline import MicroDiTPipeline
    out = Path(out)
    if (out / "model_index.json").exists():
        raise UserError(f"{out} already holds a diffusers pipeline (model_index.json): choose another folder")
    model, meta = load_model(str(source), preset=preset, image_autoencoder=image_autoencoder,
                             text_encoder=text_encoder)
    vae = None
    if embed_vae:
        from .encoders import DiffusersAutoencoder, load_image_autoencoder
        ae = load_image_autoencoder(meta["image_autoencoder"])
        if not isinstance(ae, DiffusersAutoencoder):
            raise UserError(f"--embed-vae: image autoencoder {meta['image_autoencoder']!r} is not a diffusers "
                            "AutoencoderKL (it has no weights to embed); leave the flag out")
        vae = ae.vae
    pipe = MicroDiTPipeline(model, vae=vae, image_autoencoder_name=meta["image_autoencoder"],
                            text_encoder_name=meta["text_encoder"], edm=meta["edm"], preset=meta.get("preset"))
    pipe.save_pretrained(out)
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m microdit.to_diffusers", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="released .pt (path or <hub repo id>/<file>), our checkpoint folder, or a hub id")
    ap.add_argument("out", help="folder to write the diffusers pipeline to")
    ap.add_argument("--preset", help="preset of a released .pt whose width matches none (rarely needed)")
    ap.add_argument("--image-autoencoder", help="override the image autoencoder name recorded for the model")
    ap.add_argument("--text-encoder", help="override the text encoder name recorded for the model")
    ap.add_argument("--embed-vae", action="store_true", help="save the AutoencoderKL weights in OUT/vae")
    a = ap.parse_args(argv)
    out = convert(a.source, a.out, a.preset, a.image_autoencoder, a.text_encoder, a.embed_vae)
    print(f"wrote diffusers pipeline folder {out}")
    return out


def cli(argv=None) -> None:
    """The command line: user mistakes and missing weights end with one line and exit code 2."""
    from .encoders import MissingWeightsError
    run_cli(main, argv, extra_user_errors=(MissingWeightsError,))


if __name__ == "__main__":
    cli()
