"""CUDA's bf16 autocast rules on a CPU: the emulation against CUDA's own kernels, and a bf16 MoE training step."""
import torch

from microdit.cuda_rules import cpu_autocast_like_cuda, cuda_autocast, fake_cuda, fake_tensors, to_fake
from microdit.edm import EDMConfig, edm_loss
from microdit.model import ExpertChoiceMoE, create_model

KW = dict(latent_res=8, in_channels=4, caption_channels=32)


def output_dtypes(model, run) -> dict:
    """Dtype of every module's (first) output during `run()`."""
    seen = {}

    def hook(name):
        def fn(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(out):
                seen[name] = out.dtype
        return fn
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def fake_forward_dtypes(device: str, autocast) -> dict:
    with torch.device("meta"):
        model = create_model("MicroDiT_Nano_2", **KW)
    with fake_tensors(device):
        model = to_fake(model, device)
        x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 32)

        def run():
            with autocast(torch.bfloat16):
                model(x, t, y, mask_ratio=0.5)
        return output_dtypes(model, run)


def test_cpu_emulation_gives_cuda_autocast_dtypes_for_every_module():
    cuda = fake_forward_dtypes("cuda", cuda_autocast)           # CUDA's own autocast kernels decide
    cpu = fake_forward_dtypes("cpu", cpu_autocast_like_cuda)
    assert cuda["blocks.0.norm1"] == torch.float32 and cuda["blocks.0.attn.qkv"] == torch.bfloat16
    assert cpu == cuda
    # Plain CPU autocast differs (layer_norm in bf16): the reason the emulation exists.
    plain = fake_forward_dtypes("cpu", lambda dt: torch.autocast("cpu", dtype=dt))
    assert plain["blocks.0.norm1"] == torch.bfloat16


def test_bf16_moe_training_step_under_cuda_rules_matches_fp32():
    torch.manual_seed(0)
    model = create_model("MicroDiT_Nano_2", **KW).train()
    with torch.no_grad():                        # no weight left at its zero init: every gradient flows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    moe = [m for m in model.modules() if isinstance(m, ExpertChoiceMoE)]
    assert moe, "the test model must have MoE layers"
    x, y = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)

    def step(autocast):
        model.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(3)
        with autocast:
            loss = edm_loss(model, x, y, EDMConfig(), mask_ratio=0.5, generator=g, patch_size=2)
        loss.backward()
        return loss.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    seen = {}
    handle = moe[0].register_forward_hook(lambda m, a, out: seen.update(x=a[0].dtype, out=out.dtype))
    loss16, grads16 = step(cpu_autocast_like_cuda(torch.bfloat16))
    handle.remove()
    assert seen["x"] == torch.float32            # the MoE input comes from layer_norm: fp32 on CUDA
    loss32, grads32 = step(torch.autocast("cpu", enabled=False))
    assert torch.isclose(loss16, loss32, rtol=0.03), (loss16, loss32)
    assert grads16.keys() == grads32.keys()
    for name in model.moe_parameter_names():
        g16, g32 = grads16[name], grads32[name]
        assert g16.dtype == torch.float32 and torch.isfinite(g16).all()
        cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
        assert cos > 0.98, (name, cos)


def test_bf16_training_step_on_fake_tensors_runs_backward():
    """The planner's path: a bf16 step of fake tensors under the emulated CUDA rules reaches every gradient."""
    with torch.device("meta"):
        model = create_model("MicroDiT_Nano_2", **KW)
    with fake_tensors("cpu"):
        model = to_fake(model, "cpu", torch.bfloat16)
        x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
        with cpu_autocast_like_cuda(torch.bfloat16):
            loss = edm_loss(model, x, y, EDMConfig(), mask_ratio=0.5, patch_size=2)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())


def test_xl_loss_forward_of_the_cuda_bench_runs_under_cuda_autocast():
    """`python -m microdit.bench --device cuda`: XL, 256 px, mask 0.75, EDM loss under torch.autocast("cuda")."""
    with torch.device("meta"):
        model = create_model("MicroDiT_XL_2", latent_res=32, in_channels=4, caption_channels=1024)
    with fake_cuda():
        model = to_fake(model, "cuda")
        x, y = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 1024)
        with cuda_autocast(torch.bfloat16):
            loss = edm_loss(model, x, y, EDMConfig(), mask_ratio=0.75, patch_size=model.patch_size)
        assert loss.device.type == "cuda" and loss.dtype == torch.float32 and loss.shape == ()


OPS = {
    "layer_norm": lambda x, w: torch.nn.functional.layer_norm(x.bfloat16(), (8,)),
    "linear": lambda x, w: torch.nn.functional.linear(x, w),
    "bmm": lambda x, w: torch.bmm(x[None], w[None]),
    "softmax": lambda x, w: torch.softmax(x.bfloat16(), -1),
    "pow": lambda x, w: x.bfloat16() ** 2,
    "sum": lambda x, w: x.bfloat16().sum(),
    "exp": lambda x, w: x.bfloat16().exp(),
    "einsum": lambda x, w: torch.einsum("ij->ji", x),
    "gelu": lambda x, w: torch.nn.functional.gelu(x.bfloat16()),
    "add": lambda x, w: x + x.bfloat16(),
}


def test_cpu_emulation_matches_cuda_autocast_op_by_op():
    def dtypes(device, autocast):
        with fake_tensors(device):
            x, w = torch.randn(4, 8), torch.randn(8, 8)
            with autocast(torch.bfloat16):
                return {name: op(x, w).dtype for name, op in OPS.items()}
    cuda = dtypes("cuda", cuda_autocast)
    assert cuda["layer_norm"] == cuda["softmax"] == cuda["pow"] == torch.float32 and cuda["linear"] == torch.bfloat16
    assert dtypes("cpu", cpu_autocast_like_cuda) == cuda
