"""`make gpu-check` at toy size on the CPU (so the GPU check cannot rot), and its row bookkeeping."""
import json

from microdit import gpu_check


def test_gpu_check_runs_its_cpu_capable_rows_at_toy_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    rows = {r["check"]: r for r in json.loads(out.read_text())["rows"]}
    assert [rows[f"stage{i} step"]["status"] for i in range(1, 5)] == ["ok"] * 4
    assert rows["stage1 step"]["estimate_gib"] > 0
    assert rows["stage1 MFU"]["status"] == "skipped" and "no GPU" in rows["stage1 MFU"]["why"]
    assert 0 < rows["bf16 vs fp32 loss"]["relative_difference"] <= 0.02       # bf16 really ran
    ckpt = rows["sharded checkpoint"]
    assert ckpt["status"] == "ok" and ckpt["model_equal"] and ckpt["optimizer_equal"] and ckpt["ema_equal"]
    assert ckpt["ema_on_device"] and ckpt["step_equal"]
    assert rows["SDXL-VAE encode bf16"]["status"] == "ok"


def test_a_failing_row_is_reported_and_the_next_rows_still_run():
    check = gpu_check.Check()

    def broken():
        raise RuntimeError("CUDA out of memory")

    def skipped():
        raise gpu_check.Skip("not here")
    check.row("a", broken)
    check.row("b", skipped)
    check.row("c", lambda: {"value": 1.0})
    assert [(r["check"], r["status"]) for r in check.rows] == [("a", "failed"), ("b", "skipped"), ("c", "ok")]
    assert "CUDA out of memory" in check.rows[0]["why"] and check.rows[1]["why"] == "not here"


def test_cuda_without_a_gpu_is_a_one_line_error(capsys):
    import torch
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "--device cpu" in capsys.readouterr().err
