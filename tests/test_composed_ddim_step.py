"""Composed-guidance DDIM step (tinylab.kernels.composed_ddim_step): the fused Triton kernel vs the PyTorch reference
(the composed noise prediction, then one DDIM step with eta = 0), odd sizes, K = 1..8, every mask broadcast form, one
weight or one per agent, one timestep or one per sample, fp32/bf16/fp16, bad inputs, and the reference against diffusers'
DDIMScheduler.step. Triton runs in its interpreter on a CPU (CUDA is used when there is one); shapes are small but never
multiples of the blocks."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tinylab.kernels.composed_ddim_step as cds
from kernel_asserts import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parent.parent
# max error / max |reference|; the interpreter truncates fp32 -> bf16 (DESIGN.md), so bf16 gets two output ulps
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def inputs(K, B, C, H, W, dtype, form=None, per_agent=False, per_sample=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).to(DEV, dtype)
    eps = torch.randn(K + 1, B, C, H, W, generator=g).to(DEV, dtype)
    shape = {None: None, "B1HW": (K, B, 1, H, W), "BCHW": (K, B, C, H, W), "1CHW": (K, 1, C, H, W),
             "11HW": (K, 1, 1, H, W), "bool": (K, B, 1, H, W)}[form]
    masks = None if shape is None else torch.rand(*shape, generator=g).to(DEV)
    if form == "bool":
        masks = masks > 0.5
    w = (torch.rand(K, generator=g) * 4 - 1).to(DEV) if per_agent else 2.5
    if per_sample:
        a_t = (torch.rand(B, generator=g) * 0.95 + 0.004).to(DEV)
        a_p = torch.clamp(a_t + 0.2, max=1.0)
    else:
        a_t, a_p = 0.0047, 0.0099          # the first two steps of a 50-step SD schedule: 1/sqrt(ab_t) ~ 15
    return x, eps, a_t, a_p, w, masks


@pytest.mark.parametrize("K,B,C,H,W,form,per_agent,per_sample", [
    pytest.param(1, 1, 1, 1, 1, None, False, False, id="K1-one-element"),
    pytest.param(1, 2, 4, 9, 11, "B1HW", False, True, id="K1-mask-per-sample-alpha"),
    pytest.param(2, 3, 3, 7, 13, "BCHW", True, False, id="K2-full-mask-per-agent-w"),
    pytest.param(3, 1, 5, 17, 6, "1CHW", True, True, id="K3-batch-broadcast-mask"),
    pytest.param(4, 5, 6, 3, 3, "11HW", False, False, id="K4-one-mask-for-all"),
    pytest.param(5, 2, 4, 10, 9, "bool", True, True, id="K5-bool-mask"),
    pytest.param(8, 2, 4, 15, 17, None, False, False, id="K8-no-mask"),
    pytest.param(8, 3, 6, 24, 24, "B1HW", True, True, id="K8-planner-like"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_triton_matches_reference(poison_empty, K, B, C, H, W, form, per_agent, per_sample, dtype):
    x, eps, a_t, a_p, w, masks = inputs(K, B, C, H, W, dtype, form, per_agent, per_sample, seed=K * 100 + H)
    ref_prev, ref_x0 = cds.composed_ddim_step_reference(x.float(), eps.float(), a_t, a_p, w, masks, return_x0=True)
    tri_prev, tri_x0 = cds.composed_ddim_step(x, eps, a_t, a_p, w, masks, return_x0=True, backend="triton")
    assert tri_prev.dtype == dtype and tri_prev.shape == (B, C, H, W) and tri_x0.shape == (B, C, H, W)
    assert_close("x_prev", ref_prev, tri_prev, TOL[dtype])
    assert_close("x0", ref_x0, tri_x0, TOL[dtype])
    alone = cds.composed_ddim_step(x, eps, a_t, a_p, w, masks, backend="triton")       # without x0: the same x_prev
    assert torch.equal(alone, tri_prev)


def test_reference_is_the_formula_in_float64():
    x, eps, _, _, w, masks = inputs(3, 2, 3, 5, 7, torch.float32, "B1HW", per_agent=True)
    a_t, a_p = 0.3, 0.55
    e = eps.double()
    e_c = e[0] + sum(w[i].double() * masks[i].double() * (e[i + 1] - e[0]) for i in range(3))
    x0 = (x.double() - math.sqrt(1 - a_t) * e_c) / math.sqrt(a_t)
    x_prev = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * e_c
    out, out_x0 = cds.composed_ddim_step_reference(x, eps, a_t, a_p, w, masks, return_x0=True)
    assert_close("x_prev", x_prev, out, 1e-6)
    assert_close("x0", x0, out_x0, 1e-6)
    # one weight for all agents is the anchor's eps_0 + w * sum_i (eps_i - eps_0); one agent at w = 1 is that agent
    assert_close("uniform w", e[0] + 2.0 * (e[1:] - e[0]).sum(0), cds.composed_eps_reference(eps, 2.0), 1e-6)
    assert_close("w = 1", eps[1], cds.composed_eps_reference(eps[:2], 1.0), 1e-7)


def test_reference_equals_diffusers_ddim_step():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1)
    sched.set_timesteps(25)
    ac = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    w, masks = torch.tensor([1.5, 3.0]), (torch.rand(2, 2, 1, 8, 8, generator=g) > 0.3).float()
    for t in sched.timesteps:
        prev = int(t) - 1000 // 25
        a_t, a_p = ac[int(t)].item(), (ac[prev].item() if prev >= 0 else sched.final_alpha_cumprod.item())
        eps = torch.randn(3, 2, 4, 8, 8, generator=g)
        theirs = sched.step(cds.composed_eps_reference(eps, w, masks), t, x, eta=0.0).prev_sample
        assert_close(f"t={int(t)}", theirs, cds.composed_ddim_step_reference(x, eps, a_t, a_p, w, masks), 1e-5)
        x = theirs


def test_dispatch_non_contiguous_and_cpu_weights_as_floats():
    x, eps, a_t, a_p, w, masks = inputs(2, 2, 3, 6, 5, torch.float32, "B1HW")
    ref = cds.composed_ddim_step_reference(x, eps, a_t, a_p, w, masks)
    if DEV == "cpu":   # None is the reference on CPU tensors; "torch" always is
        assert torch.equal(cds.composed_ddim_step(x, eps, a_t, a_p, w, masks), ref)
    assert torch.equal(cds.composed_ddim_step(x, eps, a_t, a_p, w, masks, backend="torch"), ref)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)            # same values, other strides
    et = eps.transpose(3, 4).contiguous().transpose(3, 4)
    mt = masks.transpose(3, 4).contiguous().transpose(3, 4)
    assert_close("non-contiguous", ref, cds.composed_ddim_step(xt, et, a_t, a_p, w, mt, backend="triton"), 1e-5)
    # a 0-d weight is one weight for all agents; a 0-d alpha is one timestep for all samples
    assert_close("0-d tensors", ref, cds.composed_ddim_step(x, eps, torch.tensor(a_t, device=DEV),
                                                            torch.tensor(a_p, device=DEV), torch.tensor(w, device=DEV),
                                                            masks, backend="triton"), 1e-5)


def test_final_step_to_alpha_one_returns_x0():
    x, eps, _, _, w, _ = inputs(2, 2, 3, 5, 5, torch.float32)
    x_prev, x0 = cds.composed_ddim_step(x, eps, 0.4, 1.0, w, return_x0=True, backend="triton")
    assert_close("x_prev = x0", x0, x_prev, 1e-6)


def bad(**kw):
    x, eps, a_t, a_p, w, masks = inputs(2, 2, 3, 4, 5, torch.float32, "B1HW")
    args = dict(x_t=x, eps=eps, alpha_bar_t=a_t, alpha_bar_prev=a_p, weight=w, masks=masks)
    args.update({k: (v(args[k]) if callable(v) else v) for k, v in kw.items()})
    return args


@pytest.mark.parametrize("kw,err,match", [
    pytest.param(dict(eps=lambda e: e[:1]), ValueError, r"at least one agent's \(K\+1 >= 2\)", id="K0"),
    pytest.param(dict(eps=lambda e: e[:, :1]), ValueError, r"eps must have shape \(K\+1, B, C, H, W\)", id="eps-batch"),
    pytest.param(dict(eps=lambda e: e[..., :4]), ValueError, r"eps must have shape", id="eps-width"),
    pytest.param(dict(x_t=lambda x: x[0]), ValueError, r"x_t must have shape \(B, C, H, W\)", id="x-ndim"),
    pytest.param(dict(masks=lambda m: m[:1]), ValueError, r"masks must have shape \(K, B or 1, C or 1, H, W\)", id="masks-K"),
    pytest.param(dict(masks=lambda m: m.expand(2, 2, 2, 4, 5)), ValueError, "masks must have shape", id="masks-C2-of-3"),
    pytest.param(dict(masks=lambda m: m[..., :3]), ValueError, "masks must have shape", id="masks-W"),
    pytest.param(dict(masks=lambda m: m.long()), TypeError, "masks must be floating-point or bool", id="masks-int"),
    pytest.param(dict(masks=[1.0]), TypeError, "masks must be a torch.Tensor or None", id="masks-list"),
    pytest.param(dict(eps=lambda e: e.double()), TypeError, "eps must have x_t's dtype", id="eps-dtype"),
    pytest.param(dict(x_t=lambda x: x.long(), eps=lambda e: e.long()), TypeError, "x_t must be float16, bfloat16 or float32", id="x-int"),
    pytest.param(dict(x_t="x"), TypeError, "x_t must be a torch.Tensor", id="x-str"),
    pytest.param(dict(alpha_bar_t=0.0), ValueError, r"alpha_bar_t must lie in \(0, 1\]", id="alpha-t-zero"),
    pytest.param(dict(alpha_bar_prev=1.5), ValueError, r"alpha_bar_prev must lie in \(0, 1\]", id="alpha-prev-above-1"),
    pytest.param(dict(alpha_bar_t=float("nan")), ValueError, r"alpha_bar_t must lie in \(0, 1\]", id="alpha-nan"),
    pytest.param(dict(alpha_bar_t=lambda a: torch.tensor([0.5, -0.2], device=DEV)), ValueError, r"alpha_bar_t must lie in \(0, 1\]", id="alpha-tensor-value"),
    pytest.param(dict(alpha_bar_t=lambda a: torch.tensor([0.5, 0.4, 0.3], device=DEV)), ValueError, r"must be a float or have shape \(B,\)", id="alpha-shape"),
    pytest.param(dict(alpha_bar_t=lambda a: torch.tensor([1, 1], device=DEV)), TypeError, "alpha_bar_t must be a floating-point tensor", id="alpha-int-tensor"),
    pytest.param(dict(alpha_bar_prev="0.5"), TypeError, "alpha_bar_prev must be a python float or a", id="alpha-str"),
    pytest.param(dict(weight=lambda w: torch.ones(3, device=DEV)), ValueError, r"weight must be a float or have shape \(K,\)", id="weight-shape"),
    pytest.param(dict(weight=lambda w: torch.ones(2, dtype=torch.long, device=DEV)), TypeError, "weight must be a floating-point tensor", id="weight-int"),
    pytest.param(dict(weight=True), TypeError, r"weight must be a float or a \(K,\) tensor", id="weight-bool"),
    pytest.param(dict(eps=lambda e: e.to("meta")), ValueError, "eps is on meta", id="eps-device"),
    pytest.param(dict(masks=lambda m: m.to("meta")), ValueError, "masks is on meta", id="masks-device"),
    pytest.param(dict(weight=lambda w: torch.ones(2, device="meta")), ValueError, "weight is on meta", id="weight-device"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs(kw, err, match, backend):
    with pytest.raises(err, match=match):
        cds.composed_ddim_step(**bad(**kw), backend=backend)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be None, 'triton' or 'torch'"):
        cds.composed_ddim_step(**bad(), backend="cuda")


def test_alpha_check_can_be_skipped():
    "check_values=False skips the (0, 1] check of alpha tensors (it waits for the GPU); floats are always checked."
    args = bad(alpha_bar_t=lambda a: torch.tensor([0.5, 0.4], device=DEV))
    out = cds.composed_ddim_step(**args, backend="triton", check_values=False)
    assert_close("unchecked", cds.composed_ddim_step_reference(**args), out, 1e-5)


def test_benchmark_smoke(tmp_path):
    "benchmarks/bench_composed_ddim_step.py --smoke: its gate, timers and JSON on tiny sizes (interpreter on a CPU)."
    out = tmp_path / "cds.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "benchmarks/bench_composed_ddim_step.py", "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"device", "date", "torch", "triton", "rows", "loop", "checks"} <= set(result)
    assert {r["impl"] for r in result["rows"]} == {"eager", "torch.compile", "kernel"}
    assert all(c["ok"] for c in result["checks"])
    assert {(r["step"], r["mode"]) for r in result["loop"]["rows"]} >= {("kernel", "eager"), ("reference", "eager")}
