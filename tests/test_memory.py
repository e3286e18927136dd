"""Memory planner (microdit.memory) and activation checkpointing."""
import pytest
import torch

from microdit import memory
from microdit.edm import EDMConfig, edm_loss
from microdit.model import create_model
from microdit.training.config import PAPER_STAGES

NANO = dict(preset="MicroDiT_Nano_2", resolution=64, caption_len=8, caption_channels=32, micro_batch=4)


def test_live_bytes_after_forward_equals_what_autograd_saves_on_real_tensors():
    """The tracker's count at the end of forward is the saved activations (+ the loss), found independently."""
    w = memory.Workload(**NANO, mask_ratio=0.5, bf16=True)
    real = memory.saved_activation_bytes(w)
    planned = memory.measure_step(w)["after_forward"]
    assert real > 0 and 0.95 < planned / real < 1.1, (planned, real)


def test_activation_checkpointing_cuts_the_estimate_and_masking_too():
    base = memory.Workload(**NANO, mask_ratio=0.0)
    full = memory.measure_step(base)
    ckpt = memory.measure_step(memory.Workload(**{**NANO, "activation_checkpointing": True}, mask_ratio=0.0))
    masked = memory.measure_step(memory.Workload(**NANO, mask_ratio=0.75))
    assert ckpt["after_forward"] < 0.5 * full["after_forward"]
    assert masked["after_forward"] < full["after_forward"]
    double = memory.measure_step(memory.Workload(**{**NANO, "micro_batch": 8}, mask_ratio=0.0))
    assert 1.8 < double["peak"] / full["peak"] < 2.2            # activations grow with the micro-batch


@pytest.mark.slow
def test_paper_stage4_fits_80gb_at_its_micro_batch_and_not_at_256():
    s4 = PAPER_STAGES[3]
    rows = memory.plan([s4], world_size=8, gpu_memory_gib=80)
    assert rows[0]["fits"] and rows[0]["estimate_gib"] <= 72
    rows = memory.plan([s4.replace(micro_batch_size=256)], world_size=8, gpu_memory_gib=80)
    assert not rows[0]["fits"] and rows[0]["estimate_gib"] > 300   # every sample on one GPU at once


def test_planner_cli_exits_nonzero_when_a_stage_does_not_fit(capsys):
    assert memory.main(["plan", "--recipe", "cpu", "--gpu-memory", "80"]) == 0
    assert "stage4" in capsys.readouterr().out
    assert memory.main(["plan", "--recipe", "cpu", "--gpu-memory", "0.01"]) == 1
    assert "does not fit: stage1" in capsys.readouterr().err
    assert memory.main(["plan", "--recipe", "nope"]) == 2


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = create_model("MicroDiT_Nano_2", latent_res=8, in_channels=4, caption_channels=32).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, y = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)

    def step(on: bool):
        model.activation_checkpointing = on
        model.zero_grad(set_to_none=True)
        loss = edm_loss(model, x, y, EDMConfig(), mask_ratio=0.5, generator=torch.Generator().manual_seed(1),
                        patch_size=2)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    (l0, g0), (l1, g1) = step(False), step(True)
    assert l0 == l1
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("recompute", [False, True])
def test_bf16_step_with_checkpointed_blocks_keeps_cuda_rules(recompute):
    """Recomputed blocks in backward must see CUDA's dtype choices again (else checkpoint refuses)."""
    w = memory.Workload(**NANO, mask_ratio=0.5, activation_checkpointing=recompute)
    assert memory.measure_step(w)["peak"] > 0
