"""The synthetic shapes source: seeded, resolution-free scenes, GenEval-format ground truth, short captions."""
import json

import numpy as np
import pytest

from microdit.shapes import (BACKGROUND, COLORS, PALETTE, SHAPES, TASKS, all_prompts, draw_scene, generate_shapes,
                             scene_for_prompt, shapes_prompts)


def test_same_seed_same_images_other_seed_differs():
    a = [np.asarray(s.image) for s in generate_shapes(12, 32, seed=3)]
    b = [np.asarray(s.image) for s in generate_shapes(12, 32, seed=3)]
    c = [np.asarray(s.image) for s in generate_shapes(12, 32, seed=4)]
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))


def test_scene_is_the_same_at_every_resolution():
    for r in (16, 32, 64):
        for s16, sr in zip(generate_shapes(6, 16, seed=1), generate_shapes(6, r, seed=1)):
            assert s16.caption == sr.caption and s16.meta == sr.meta
            assert sr.image.size == (r, r) and sr.image.mode == "RGB"


def test_tasks_cycle_and_meta_is_geneval_format():
    samples = list(generate_shapes(30, 16, seed=0))
    assert [s.meta["tag"] for s in samples[:6]] == list(TASKS)
    for s in samples:
        json.dumps(s.meta)
        assert s.caption.startswith("a photo of ")
        for req in s.meta["include"]:
            assert req["class"] in SHAPES and req["count"] >= 1
            assert req.get("color", "red") in COLORS
        for obj in s.meta["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        # every include rule is satisfied by the listed objects
        for req in s.meta["include"]:
            match = [o for o in s.meta["objects"] if o["shape"] == req["class"]
                     and o["color"] == req.get("color", o["color"])]
            assert len(match) >= req["count"]
    with pytest.raises(ValueError, match="unknown task"):
        next(generate_shapes(1, tasks=["nope"]))


def test_objects_do_not_touch_and_pixels_follow_the_boxes():
    for s in generate_shapes(60, 64, seed=2):
        objs = s.meta["objects"]
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                gap = max(b["bbox"][0] - a["bbox"][2], a["bbox"][0] - b["bbox"][2],
                          b["bbox"][1] - a["bbox"][3], a["bbox"][1] - b["bbox"][3])
                assert gap >= 0.1
        img = np.asarray(s.image).astype(int)
        for o in objs:   # the box centre pixel has the object's colour
            cx, cy = (o["bbox"][0] + o["bbox"][2]) / 2, (o["bbox"][1] + o["bbox"][3]) * 0.5
            if o["shape"] == "triangle":
                cy = o["bbox"][1] + 0.7 * (o["bbox"][3] - o["bbox"][1])
            assert tuple(img[int(cy * 64), int(cx * 64)]) == PALETTE[o["color"]]
        # outside every box only background
        mask = np.ones((64, 64), bool)
        for o in objs:
            x0, y0 = (int(np.floor(v * 64)) for v in o["bbox"][:2])
            x1, y1 = (int(np.ceil(v * 64)) for v in o["bbox"][2:])
            mask[y0:y1 + 1, x0:x1 + 1] = False
        assert (img[mask] == BACKGROUND).all()


def test_captions_fit_sixteen_tokens():
    import open_clip
    tok = open_clip.get_tokenizer("ViT-B-32")
    prompts = [p["prompt"] for t in TASKS for p in all_prompts(t)]
    ids = tok(prompts)
    assert int((ids > 0).sum(1).max()) <= 14


def test_shapes_prompts_balanced_seeded_and_drawable():
    p = shapes_prompts(10, seed=0)
    assert len(p) == 60 and [x["tag"] for x in p[::10]] == list(TASKS)
    assert p == shapes_prompts(10, seed=0) and p != shapes_prompts(10, seed=1)
    assert len({x["prompt"] for x in p if x["tag"] == "color_attr"}) == 10    # no repeats while the pool lasts
    for meta in p:
        assert set(meta) <= {"tag", "include", "exclude", "prompt"}
        objs = scene_for_prompt(meta, seed=0)
        draw_scene(objs, 16)
        for req in meta["include"]:
            assert sum(o["shape"] == req["class"] and o["color"] == req.get("color", o["color"]) for o in objs) \
                >= req["count"]
