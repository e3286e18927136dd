"""GenEval's rules on synthetic detections: known boxes, scores and colours -> known verdicts."""
import pytest

from microdit.evaluate.geneval import _norm, load_prompts, object_names
from microdit.evaluate.rules import (COUNTING_THRESHOLD, THRESHOLD, Detection, check_image, keep_detections,
                                     relative_position, summarize)


def test_relative_position_with_the_size_shrink():
    a, b = (0, 40, 20, 60), (60, 40, 80, 60)               # A 60 px left of B, same row
    assert relative_position(a, b) == {"left of"}
    assert relative_position(b, a) == {"right of"}
    assert relative_position((40, 0, 60, 20), (40, 60, 60, 80)) == {"above"}
    assert relative_position((40, 60, 60, 80), (40, 0, 60, 20)) == {"below"}
    # diagonal at 45 degrees: both components of the unit offset exceed 0.5
    assert relative_position((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}
    # centres 3 px apart, boxes 20 px: the shrink (0.1 x 40 px = 4 px) removes the offset entirely
    assert relative_position((0, 0, 20, 20), (3, 0, 23, 20)) == set()
    # offset of 10 px shrunk by 4 px to 6 px along x, 0 along y -> still "left of"
    assert relative_position((0, 0, 20, 20), (10, 0, 30, 20)) == {"left of"}
    # large vertical offset dominates a small horizontal one
    assert relative_position((0, 0, 10, 10), (5, 50, 15, 60)) == {"above"}


def test_thresholds_per_task_and_order():
    dets = {"dog": [Detection((0, 0, 1, 1), 0.5), Detection((0, 0, 1, 1), 0.95), Detection((0, 0, 1, 1), 0.2)]}
    kept = keep_detections(dets, "single_object")
    assert [d.score for d in kept["dog"]] == [0.95, 0.5]                     # > 0.3, most confident first
    assert [d.score for d in keep_detections(dets, "counting")["dog"]] == [0.95]   # > 0.9
    assert THRESHOLD == 0.3 and COUNTING_THRESHOLD == 0.9
    assert keep_detections({"cat": [Detection((0, 0, 1, 1), 0.1)]}, "colors") == {}
    many = {"cup": [Detection((0, 0, 1, 1), 0.5 + i / 100) for i in range(20)]}
    assert len(keep_detections(many, "two_object")["cup"]) == 16


def _d(box, color=None, score=1.0):
    return Detection(box, score, color)


def test_include_count_colour_position_and_exclude():
    two = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
           "prompt": "a photo of two clocks"}
    assert check_image({"clock": [_d((0, 0, 1, 1))] * 2}, two)[0]
    assert not check_image({"clock": [_d((0, 0, 1, 1))]}, two)[0]
    ok, reason = check_image({"clock": [_d((0, 0, 1, 1))] * 3}, two)
    assert not ok and "clock<3" in reason

    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"}
    assert check_image({"car": [_d((0, 0, 1, 1), "red")]}, red_car)[0]
    assert not check_image({"car": [_d((0, 0, 1, 1), "blue")]}, red_car)[0]
    # only the most confident car's colour counts
    assert not check_image({"car": [_d((0, 0, 1, 1), "blue"), _d((0, 0, 1, 1), "red")]}, red_car)[0]
    # a colour function (CLIP in the benchmark) is called on the kept objects of the class
    seen = []
    assert check_image({"car": [_d((0, 0, 1, 1))]}, red_car, lambda ds, name: seen.append(name) or ["red"])[0]
    assert seen == ["car"]

    pos = {"tag": "position", "include": [{"class": "dog", "count": 1},
                                          {"class": "cat", "count": 1, "position": ["left of", 0]}],
           "prompt": "a photo of a cat left of a dog"}
    assert check_image({"dog": [_d((60, 0, 80, 20))], "cat": [_d((0, 0, 20, 20))]}, pos)[0]
    ok, reason = check_image({"dog": [_d((0, 0, 20, 20))], "cat": [_d((60, 0, 80, 20))]}, pos)
    assert not ok and "right of" in reason
    ok, reason = check_image({"cat": [_d((0, 0, 20, 20))]}, pos)           # target missing
    assert not ok and "no target" in reason

    binding = {"tag": "color_attr", "include": [{"class": "bench", "count": 1, "color": "red"},
                                                {"class": "cup", "count": 1, "color": "blue"}], "prompt": "p"}
    assert check_image({"bench": [_d((0, 0, 1, 1), "red")], "cup": [_d((0, 0, 1, 1), "blue")]}, binding)[0]
    assert not check_image({"bench": [_d((0, 0, 1, 1), "blue")], "cup": [_d((0, 0, 1, 1), "red")]}, binding)[0]


def test_summary_is_mean_of_task_means():
    res = ([{"tag": "counting", "prompt": "a", "correct": c} for c in (True, False, False, False)]
           + [{"tag": "colors", "prompt": "b", "correct": True}] * 2)
    s = summarize(res)
    assert s["tasks"]["counting"]["score"] == 0.25 and s["tasks"]["colors"]["score"] == 1.0
    assert s["overall"] == pytest.approx(0.625)          # not the image mean (4/6)
    assert list(s["tasks"]) == ["counting", "colors"] and s["images"] == 6


def test_packaged_geneval_prompts():
    prompts = load_prompts()
    assert len(prompts) == 553
    counts = {}
    for p in prompts:
        counts[p["tag"]] = counts.get(p["tag"], 0) + 1
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    names = object_names()
    assert len(names) == 80 and {r["class"] for p in prompts for r in p["include"]} <= set(names)
    assert _norm("Computer-Mouse") == "computer mouse" and _norm("mouse") == "computer mouse"
