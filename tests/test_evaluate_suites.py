"""Whole evaluation paths on tiny stand-ins: a tiny MicroDiT checkpoint, a tiny COCO folder, a random conv
net in place of Inception, a tiny random Mask2Former and a tiny random CLIP."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from microdit.encoders import MissingWeightsError
from microdit.evaluate import evaluate
from microdit.evaluate.run import format_report
from microdit.evaluate.__main__ import main
from microdit.evaluate.clip_models import ColorClassifier, clip_score, load_clip
from microdit.evaluate.coco import coco_paths, sample_captions
from microdit.evaluate.frechet import RandomConvFeatures, extract_features, feature_stats, frechet_distance
from microdit.evaluate.geneval import Mask2FormerDetector, load_prompts, object_names
from microdit.evaluate.rules import GENEVAL_COLORS, Detection
from microdit.manifest import Manifest

FAST = dict(steps=2, guidance=2.0, batch_size=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from microdit import create_model
    from microdit.checkpoint import save_model
    folder = tmp_path_factory.mktemp("ckpt") / "nano16"
    torch.manual_seed(0)
    model = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=12, caption_channels=64)
    save_model(folder, model, preset="MicroDiT_Nano_2", image_autoencoder="pixel:2", text_encoder="tiny-clip:16",
               resolution=16)
    return str(folder)


def test_shapes_suite_cli_resumes_without_regenerating(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--checkpoint", checkpoint, "--suite", "shapes", "--out-dir", str(out), "--shapes-prompts-per-task", "1",
            "--images-per-prompt", "2", "--shapes-real-images", "64", "--steps", "2", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "single_object" in printed and "color_attr" in printed and "Fréchet distance" in printed
    report = json.loads((out / "report.json").read_text())
    shapes = report["suites"]["shapes"]
    assert len(shapes["tasks"]) == 6 and shapes["images"] == 12 and np.isfinite(shapes["fd"]) and shapes["fd"] > 0
    assert shapes["generated_now"] == 12 and shapes["resolution"] == 16
    assert all((out / g).is_file() for g in shapes["grids"]) and len(shapes["grids"]) == 6
    man = Manifest.read(out)
    assert man.kind == "evaluation" and man.wall_seconds > 0 and "shapes/overall" in man.metrics
    pngs = sorted((out / "shapes").rglob("*.png"))
    assert len(pngs) == 12 and (out / "shapes" / "00000" / "metadata.jsonl").is_file()
    first = pngs[3].read_bytes()
    pngs[3].unlink()                                     # a run killed before this image was written
    again = evaluate(checkpoint, ["shapes"], str(out), shapes_prompts_per_task=1, images_per_prompt=2,
                     shapes_real_images=64, **{**FAST, "guidance": 5.0})["suites"]["shapes"]
    assert again["generated_now"] == 1 and pngs[3].read_bytes() == first   # per-image seeds: same image again
    assert again["fd"] == pytest.approx(shapes["fd"]) and again["overall"] == shapes["overall"]
    assert Manifest.read(out).wall_seconds > man.wall_seconds
    with pytest.raises(ValueError, match="other settings"):       # never mixes images of other settings
        evaluate(checkpoint, ["shapes"], str(out), shapes_prompts_per_task=1, images_per_prompt=2, **FAST)
    # more prompts per task: folders whose prompt changed are regenerated, the others kept
    more = evaluate(checkpoint, ["shapes"], str(out), shapes_prompts_per_task=2, images_per_prompt=2,
                    shapes_real_images=64, **{**FAST, "guidance": 5.0})["suites"]["shapes"]
    from microdit.shapes import shapes_prompts
    assert more["images"] == 24 and 12 <= more["generated_now"] < 24
    for i, p in enumerate(shapes_prompts(2, 0)):
        assert json.loads((out / "shapes" / f"{i:05d}" / "metadata.jsonl").read_text()) == p


def _tiny_coco(root, n_images=12):
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(n_images):
        name = f"COCO_val2014_{i:012d}.jpg"
        w, h = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": 1000 + i, "file_name": name, "width": w, "height": h})
        anns += [{"id": 2 * i + k, "image_id": 1000 + i, "caption": f"a photo number {i} variant {k} "} for k in (0, 1)]
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_an_unknown_option_is_named_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"unknown EvalConfig fields \['stepz'\]"):
        evaluate(str(tmp_path / "ckpt"), ["shapes"], str(tmp_path / "out"), stepz=3)
    assert not (tmp_path / "out").exists()


def test_caption_sampling_is_seeded_and_distinct(tmp_path):
    root = _tiny_coco(tmp_path / "coco")
    cap, img = root / "annotations" / "captions_val2014.json", root / "val2014"
    a, b, c = sample_captions(cap, img, 8, 0), sample_captions(cap, img, 8, 0), sample_captions(cap, img, 8, 1)
    assert a == b and a != c and len({e["image_id"] for e in a}) == 8
    assert all(e["caption"] == e["caption"].strip() and e["caption"].startswith("a photo number") for e in a)
    with pytest.raises(ValueError, match="fewer"):
        sample_captions(cap, img, 13, 0)
    assert coco_paths(str(root)) == (cap, img)
    # the layout `dataprep.download coco2014-val` leaves: annotations and images unpacked deeper
    nested = tmp_path / "raw"
    (nested / "_input" / "annotations_trainval2014-extracted").mkdir(parents=True)
    (nested / "images" / "val2014").mkdir(parents=True)
    (root / "annotations").rename(nested / "_input" / "annotations_trainval2014-extracted" / "annotations")
    (root / "val2014").rename(nested / "images" / "val2014" / "val2014")
    cap2, img2 = coco_paths(str(nested))
    assert cap2.name == "captions_val2014.json" and img2 == nested / "images" / "val2014" / "val2014"
    assert sample_captions(cap2, img2, 8, 0)[0]["caption"] == a[0]["caption"]
    with pytest.raises(FileNotFoundError, match="coco-root"):
        coco_paths(str(tmp_path / "empty"))


def test_fid_and_clip_suites_on_a_tiny_coco(checkpoint, tmp_path):
    root = _tiny_coco(tmp_path / "coco")
    opts = dict(num_samples=8, coco_root=str(root), inception="randconv:16:32", clip_model="tiny-clip",
                cache_dir=str(tmp_path / "cache"), **FAST)
    report = evaluate(checkpoint, ["fid30k", "clip"], str(tmp_path / "eval"), **opts)
    fid, clip = report["suites"]["fid30k"], report["suites"]["clip"]
    assert np.isfinite(fid["fid"]) and fid["fid"] > 0 and fid["num_samples"] == 8 and fid["resolution"] == 16
    assert fid["generated_now"] == 8 and clip["generated_now"] == 0          # the clip suite reuses the images
    assert 0 <= clip["clip_score"] <= 100 and clip["num_samples"] == 8
    cache = tmp_path / "cache"
    files = list(cache.glob("coco-ref-16px-8-randconv-d16-s32-seed0-*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again = evaluate(checkpoint, ["fid30k"], str(tmp_path / "eval"), **opts)["suites"]["fid30k"]
    assert again["fid"] == pytest.approx(fid["fid"]) and again["generated_now"] == 0
    assert files[0].stat().st_mtime_ns == stamp                               # reference statistics from the cache
    # the cached reference statistics are those of the sampled val images at 16 px: FID(reference, itself) ~ 0
    from microdit.evaluate.coco import center_crop_resize
    entries = [json.loads(x) for x in (tmp_path / "eval" / "coco-8" / "captions.jsonl").read_text().splitlines()]
    ref = [center_crop_resize(Image.open(e["file"]), 16) for e in entries]
    with np.load(files[0]) as z:
        assert abs(frechet_distance(*feature_stats(extract_features(ref, RandomConvFeatures(16, 32))), z["mu"], z["sigma"])) < 1e-6
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["suites"]) == {"fid30k", "clip"}
    # the COCO protocol stands beside the number, in the report and in the printed line
    protocol = report["suites"]["fid30k"]["protocol"]
    assert protocol["num_images"] == 8 and protocol["resolution"] == 16 and protocol["mode"].startswith("clean")
    assert protocol["reference_statistics"] == str(files[0]) and "default_rng(0)" in protocol["captions"]
    printed = format_report(report).splitlines()
    at = next(i for i, line in enumerate(printed) if "FID" in line)
    assert printed[at + 1].strip().startswith("protocol: COCO-2014 val FID") and str(files[0]) in printed[at + 1]
    assert "16 px" in printed[at + 1] and "8 images" in printed[at + 1]
    metrics = Manifest.read(tmp_path / "eval").metrics                    # what the cost ledger records
    assert metrics["fid30k/fid"] == report["suites"]["fid30k"]["fid"]
    assert printed[at + 1].strip() == "protocol: " + metrics["fid30k/protocol"]


def test_clip_score_range_and_errors():
    clip = load_clip("tiny-clip")
    im = Image.new("RGB", (32, 32), (200, 10, 10))
    s = clip_score(clip, [im, im], ["a red square", "a red square"])
    assert 0 <= s <= 100
    with pytest.raises(ValueError, match="as many captions"):
        clip_score(clip, [im], [])
    with pytest.raises(MissingWeightsError):
        load_clip("local-dir:/nonexistent/clip")


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig
    names = object_names()
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, mask_feature_size=32, feature_size=32,
                            encoder_layers=1, decoder_layers=2, num_attention_heads=2, encoder_feedforward_dim=64,
                            dim_feedforward=64, num_queries=10, common_stride=4, init_std=1.0, init_xavier_std=10.0,
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("m2f")
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"height": 64, "width": 64}, size_divisor=32).save_pretrained(folder)
    return str(folder)


def test_detector_and_colour_classifier_on_stand_ins(tiny_detector):
    from microdit.shapes import generate_shapes
    det = Mask2FormerDetector(tiny_detector)
    found = {}
    for s in generate_shapes(4, 32, seed=0):
        for name, ds in det(s.image, min_score=0.0).items():
            found.setdefault(name, []).extend(ds)
    assert found and set(found) <= set(object_names())
    for d in (d for ds in found.values() for d in ds):
        x0, y0, x1, y1 = d.box
        ys, xs = np.nonzero(d.mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) and 0 <= d.score <= 1
    colors = ColorClassifier(load_clip("tiny-clip"), GENEVAL_COLORS)
    im = Image.new("RGB", (32, 32), (0, 0, 255))
    mask = np.zeros((32, 32), bool)
    mask[4:12, 4:12] = True
    dets = [Detection((4, 4, 12, 12), 0.9, mask=mask), Detection((0, 0, 32, 32), 0.8)]
    crops = colors.crops(im, dets)
    assert crops[0].size == (8, 8) and crops[1].size == (32, 32)
    full = Image.new("RGB", (32, 32), (0, 0, 255))
    partial = mask.copy()
    partial[4:8] = False                                   # outside the mask becomes grey (#999) before the crop
    grey = np.asarray(colors.crops(full, [Detection((4, 4, 12, 12), 0.9, mask=partial)])[0])
    assert tuple(grey[0, 0]) == (0x99, 0x99, 0x99) and tuple(grey[-1, -1]) == (0, 0, 255)
    assert all(c in GENEVAL_COLORS for c in colors(im, dets, "car")) and len(colors(im, dets, "car")) == 2
    with pytest.raises(MissingWeightsError, match="detector"):
        Mask2FormerDetector("no-such-org/no-such-detector")


def test_geneval_suite_full_path(checkpoint, tiny_detector, tmp_path):
    prompts = load_prompts()
    one_per_task = [next(p for p in prompts if p["tag"] == t) for t in dict.fromkeys(p["tag"] for p in prompts)]
    pfile = tmp_path / "prompts.jsonl"
    pfile.write_text("".join(json.dumps(p) + "\n" for p in one_per_task))
    out = tmp_path / "eval"
    report = evaluate(checkpoint, ["geneval"], str(out), geneval_prompts=str(pfile), images_per_prompt=2,
                      detector=tiny_detector, color_clip="tiny-clip", **FAST)
    g = report["suites"]["geneval"]
    assert len(g["tasks"]) == 6 and g["images"] == 12 and 0 <= g["overall"] <= 1
    results = [json.loads(x) for x in (out / "results_geneval.jsonl").read_text().splitlines()]
    assert len(results) == 12 and all({"filename", "metadata", "details"} <= set(r) for r in results)
    assert results[3]["filename"] == str(out / "geneval" / "00001" / "samples" / "00001.png")
    assert json.loads(results[3]["metadata"]) == one_per_task[1]
    assert (out / "geneval" / "00005" / "samples" / "00001.png").is_file()
    assert len(list(out.glob("grid_geneval_*.png"))) == 6
