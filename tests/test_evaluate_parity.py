"""Our evaluation numbers against the implementations the field reports with, on the same inputs, offline:
clean-fid (FID: its "clean" resize and its Fréchet distance), torchmetrics' CLIPScore, and GenEval's own
folder layout and `summary_scores.py` rules. Feature networks are seeded stand-ins built here (no downloads)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from microdit.evaluate.frechet import RandomConvFeatures, clean_resize, extract_features, feature_stats, frechet_distance


# --------------------------------------------------------------------------------------------
#                                       FID vs clean-fid
# --------------------------------------------------------------------------------------------

def _random_images(rng, n, sizes, high=256):
    return [Image.fromarray(rng.integers(0, high, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


def test_clean_resize_equals_clean_fid_clean_resizer():
    from cleanfid.resize import build_resizer
    theirs = build_resizer("clean")                       # PIL bicubic per float channel to 299, clipped
    rng = np.random.default_rng(0)
    for im in _random_images(rng, 5, [(32, 32), (64, 48), (299, 299), (512, 512), (17, 301)]):
        ours = clean_resize(im, 299)
        ref = theirs(np.asarray(im))
        assert ours.dtype == ref.dtype == np.float32 and ours.shape == ref.shape == (299, 299, 3)
        assert np.array_equal(ours, ref)


def test_frechet_distance_equals_clean_fid_on_the_same_features():
    from cleanfid.fid import fid_from_feats
    rng = np.random.default_rng(1)
    for d, n in ((8, 50), (64, 200)):
        a = rng.normal(size=(n, d))
        b = rng.normal(0.3, 1.2, size=(n, d)) + 0.1 * a
        ours = frechet_distance(*feature_stats(a), *feature_stats(b))
        assert ours == pytest.approx(float(fid_from_feats(a, b)), rel=1e-9)


def test_fid_of_two_image_folders_equals_clean_fid(tmp_path):
    """Whole path: PNG folders -> resize -> the same (stand-in) feature network -> statistics -> distance."""
    from cleanfid import fid as cleanfid
    rng = np.random.default_rng(2)
    folders = {}
    for name, sizes, high in (("generated", [(64, 64)], 256), ("reference", [(80, 80), (64, 96)], 160)):
        folders[name] = tmp_path / name
        folders[name].mkdir()
        for i, im in enumerate(_random_images(rng, 48, sizes, high)):
            im.save(folders[name] / f"{i:06d}.png")
    features = RandomConvFeatures(dim=16, input_size=299, seed=0)
    theirs = cleanfid.compute_fid(str(folders["generated"]), str(folders["reference"]), mode="clean",
                                  custom_feat_extractor=features, device=torch.device("cpu"), num_workers=0,
                                  batch_size=16, verbose=False, use_dataparallel=False)

    def stats(folder):
        images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]
        return feature_stats(extract_features(images, features, batch_size=16))
    ours = frechet_distance(*stats(folders["generated"]), *stats(folders["reference"]))
    assert ours > 0 and abs(ours - float(theirs)) <= 1e-3 * abs(float(theirs))


# --------------------------------------------------------------------------------------------
#                        GenEval: the benchmark's folder layout and summary rules
# --------------------------------------------------------------------------------------------

def geneval_reference_walk(imagedir):
    """How GenEval's `evaluate_images.py` finds its work: numeric sub-folders, each with metadata.jsonl (one
    JSON object) and samples/<digits>.png."""
    import os
    import re
    pairs = []
    for sub in sorted(os.listdir(imagedir)):
        folder = os.path.join(imagedir, sub)
        if not os.path.isdir(folder) or not sub.isdigit():
            continue
        with open(os.path.join(folder, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for name in sorted(os.listdir(os.path.join(folder, "samples"))):
            if re.match(r"\d+\.png", name):
                pairs.append((os.path.join(folder, "samples", name), metadata))
    return pairs


def geneval_reference_summary(results_file) -> dict:
    """GenEval's `summary_scores.py` rules over its results file: pandas group-bys as that script does them."""
    import pandas as pd
    df = pd.read_json(results_file, orient="records", lines=True)
    task_scores = {tag: task["correct"].mean() for tag, task in df.groupby("tag", sort=False)}
    return {"images": len(df), "prompts": len(df.groupby("metadata")), "correct_images": df["correct"].mean(),
            "correct_prompts": df.groupby("metadata")["correct"].any().mean(), "tasks": task_scores,
            "overall": float(np.mean(list(task_scores.values())))}


def test_geneval_folders_are_in_the_benchmark_layout(tmp_path):
    from microdit.evaluate.images import generate_missing
    from microdit.evaluate.geneval import load_prompts
    from microdit.evaluate.run import _prompt_jobs
    prompts = load_prompts()[::50]
    jobs = _prompt_jobs(tmp_path / "geneval", prompts, 4, seed=0, suite_id=2)
    shade = {p["prompt"]: i for i, p in enumerate(prompts)}
    generate_missing(lambda texts, seeds: [Image.new("RGB", (8, 8), (shade[t], 0, 0)) for t in texts], jobs, 5)
    found = geneval_reference_walk(tmp_path / "geneval")
    assert len(found) == 4 * len(prompts)
    for path, metadata in found:                 # every image sits beside the metadata of its own prompt
        assert Image.open(path).getpixel((0, 0))[0] == shade[metadata["prompt"]] and metadata in prompts
    assert sorted(p for p, _ in found)[:4] == [str(tmp_path / "geneval" / "00000" / "samples" / f"{j:05d}.png")
                                               for j in range(4)]


def _results_file(path, rng):
    """A results file in the benchmark's record format, uneven over tasks and prompts."""
    from microdit.evaluate.geneval import load_prompts
    records = []
    for i, p in enumerate(load_prompts()[::7]):
        for j in range(int(rng.integers(1, 5))):
            records.append({"filename": f"out/{i:05d}/samples/{j:05d}.png", "tag": p["tag"], "prompt": p["prompt"],
                            "correct": bool(rng.random() < 0.4), "reason": "", "metadata": json.dumps(p),
                            "details": "{}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_geneval_summary_equals_the_benchmark_rules_on_its_results_file(tmp_path, capsys):
    from microdit.evaluate.rules import summarize, summarize_file
    for seed in range(3):
        path = _results_file(tmp_path / f"results{seed}.jsonl", np.random.default_rng(seed))
        ours, theirs = summarize_file(path), geneval_reference_summary(path)
        assert ours["overall"] == pytest.approx(theirs["overall"], abs=1e-12)
        assert {t: v["score"] for t, v in ours["tasks"].items()} == pytest.approx(theirs["tasks"], abs=1e-12)
        for key in ("images", "prompts", "correct_images", "correct_prompts"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-12)
        assert ours["overall"] != pytest.approx(ours["correct_images"])      # the task mean, not the image mean
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert summarize(records) == summarize_file(path)
    from microdit.evaluate.summary import main
    main([str(path)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"Total images: {theirs['images']}" and printed[-1].endswith(f"{theirs['overall']:.5f}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"tag": "colors"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl line 1"):
        summarize_file(bad)


def test_our_geneval_records_read_by_the_benchmark_summary(tmp_path):
    """evaluate_image writes the benchmark's fields; its summary over our results file equals ours."""
    from microdit.evaluate.geneval import evaluate_image, load_prompts
    from microdit.evaluate.rules import Detection, summarize
    prompts = [p for p in load_prompts() if p["tag"] in ("single_object", "colors", "counting")][::9]
    box = Detection((0, 0, 4, 4), 0.95)
    records = []
    for i, p in enumerate(prompts):
        name = p["include"][0]["class"]
        for j in range(3):          # image j of prompt i finds (i + j) % 3 objects of the asked class
            found = {name: [box] * ((i + j) % 3)}
            records.append(evaluate_image(Image.new("RGB", (8, 8)), p, lambda im, f=found: f,
                                          lambda im, dets, cls, c=p["include"][0].get("color"): [c] * len(dets),
                                          filename=f"{i:05d}/samples/{j:05d}.png"))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ours, theirs = summarize(records), geneval_reference_summary(path)
    assert 0 < ours["overall"] < 1 and ours["overall"] == pytest.approx(theirs["overall"], abs=1e-12)
    assert ours["prompts"] == theirs["prompts"] == len(prompts)


# --------------------------------------------------------------------------------------------
#                                CLIP score vs torchmetrics' CLIPScore
# --------------------------------------------------------------------------------------------

def _clip_tokenizer_files(folder):
    """vocab.json + merges.txt of the CLIP BPE, made from the vocabulary open_clip ships (same tokens, same ids)."""
    import gzip
    from importlib import resources

    from open_clip.tokenizer import bytes_to_unicode
    bpe = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(str(bpe)).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A random transformers CLIPModel + CLIPProcessor (32-px images), saved like a hub folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    folder = tmp_path_factory.mktemp("hf-clip")
    _clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=49408, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(3)                 # a random model whose scores on the test images have both signs
    CLIPModel(cfg).save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_clip_score_equals_torchmetrics_clipscore(tiny_hf_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    from microdit.evaluate.clip_models import clip_score, clip_scores, load_clip
    rng = np.random.default_rng(0)
    images = _random_images(rng, 12, [(32, 32), (48, 40), (64, 64)])
    captions = [f"a photo of {n} red cubes left of a blue sphere" for n in range(12)]
    ours = load_clip(f"hf:{tiny_hf_clip}")
    metric = CLIPScore(model_name_or_path=lambda: (CLIPModel.from_pretrained(tiny_hf_clip),
                                                   CLIPProcessor.from_pretrained(tiny_hf_clip)))
    tensors = [torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    per_image, _ = _clip_score_update(tensors, captions, metric.model, metric.processor)
    mine = clip_scores(ours, images, captions)
    assert torch.allclose(mine, per_image.float(), rtol=1e-4, atol=1e-4)
    assert (mine < 0).any() and (mine > 0).any()          # both signs: the floor applies to the mean only
    metric.update(tensors[:5], captions[:5])              # torchmetrics accumulates over batches
    metric.update(tensors[5:], captions[5:])
    theirs = float(metric.compute())
    assert clip_score(ours, images, captions) == pytest.approx(theirs, rel=1e-4, abs=1e-4)
    assert clip_score(ours, images, captions) == pytest.approx(max(float(mine.double().mean()), 0.0))
    assert theirs > 0 and theirs != pytest.approx(float(mine.clamp(min=0).mean()), rel=1e-3)   # not a per-image floor
    neg = [i for i in range(12) if mine[i] < 0]                               # a set whose mean is negative: 0
    metric.reset()
    metric.update([tensors[i] for i in neg], [captions[i] for i in neg])
    assert clip_score(ours, [images[i] for i in neg], [captions[i] for i in neg]) == float(metric.compute()) == 0.0
