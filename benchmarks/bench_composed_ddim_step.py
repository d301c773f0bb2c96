"""GPU benchmark of the fused composed-guidance DDIM step (COMBO chapter, nbs/42a_composed_ddim_step.ipynb), issue 20.

Per (latents, K, dtype): the reference eager (`composed_ddim_step_reference`, the stacked form), `torch.compile` of the
reference, and the Triton kernel (`composed_ddim_step`), each checked against float64 math before it is timed (no timing
on a red gate). Reported as the anchor (shared/anchors/ddim_guidance) reports them: GPU time from CUDA-graph replay
(inputs stay in L2 there), host wall time per call over back-to-back calls (what a sampler loop pays), and the memory
floor ((K+3) tensors moved once) at the H200's 4.8 TB/s. Latents: the anchor's B8 C4 64x64 and B8 C12 64x64, and a
planner batch B27 C6 24x24 (a guess: the COMBO chapter's presets did not exist when this was written). Also: a sweep of
launch settings for the kernel, a COMBO-like variant (per-agent masks and weights, a timestep per sample), and the
end to end part: imagined rollouts per second of the planner's sampler, `tinylab.combo.imagine` (its diffusers
UNet2DConditionModel world model at the GPU preset's size, untrained: timing only; 10 DDIM steps, weight 5), eager as
the planner calls it and its loop captured whole in a CUDA graph, with the reference step and with the kernel. That
needs diffusers (carry its wheel); without it, a small torch-only conv net stands in for the denoiser, and the JSON
says so. Triton 3.6 and 3.9.

GPU:  PYTHONPATH=. python3 benchmarks/bench_composed_ddim_step.py --out $OUT/composed_ddim_step_h200.json
CPU:  PYTHONPATH=. TRITON_INTERPRET=1 python3 benchmarks/bench_composed_ddim_step.py --smoke --out /tmp/cds_smoke.json"""
import argparse
import datetime
import json
import math
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # the Triton interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import triton  # noqa: E402

from tinylab.kernels.composed_ddim_step import composed_ddim_step, composed_ddim_step_reference  # noqa: E402

A_T, A_PREV, W = 0.5, 0.6, 3.0           # the anchor's step
PEAK_TBPS = 4.8                          # the H200's HBM3e bandwidth
SHAPES = {"B8 C4 64x64": (8, 4, 64, 64), "B8 C12 64x64": (8, 12, 64, 64), "B27 C3 16x16": (27, 3, 16, 16),
          "B216 C3 16x16": (216, 3, 16, 16)}
SMOKE_SHAPES = {"B2 C3 5x7": (2, 3, 5, 7)}
PLANNER = "B27 C3 16x16"
TUNE = [(256, 4), (256, 8), (512, 4), (512, 8), (1024, 4), (1024, 8), (2048, 8)]   # (BLOCK, num_warps)


def gpu_us(fn, smoke):
    "Median GPU time of one call from CUDA-graph replay (the anchor's measure); wall time of one call on a CPU."
    if smoke:
        t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e6
    from triton.testing import do_bench_cudagraph
    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def host_us(fn, smoke, n=400):
    "Wall time per call over n back-to-back calls, synchronised once at the end (what a sampling loop pays)."
    n = 3 if smoke else n
    for _ in range(2 if smoke else 20):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() and not smoke else (lambda: None)
    sync(); t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e6


def truth(x, eps, a_t, a_p, w, masks=None):
    "float64 math: eps_c = eps_0 + sum_i w_i m_i (eps_i - eps_0), then DDIM (eta = 0)."
    e = eps.double()
    d = e[1:] - e[0]
    if isinstance(w, torch.Tensor):
        d = d * w.double().view(-1, 1, 1, 1, 1)
    if masks is not None:
        d = d * masks.double()
    d = d.sum(0) if isinstance(w, torch.Tensor) else float(w) * d.sum(0)
    e_c = e[0] + d
    sq = lambda a: (a.double().sqrt().view(-1, 1, 1, 1), (1 - a.double()).sqrt().view(-1, 1, 1, 1)) \
        if isinstance(a, torch.Tensor) else (math.sqrt(a), math.sqrt(1 - a))
    (s_t, s1_t), (s_p, s1_p) = sq(a_t), sq(a_p)
    return s_p * (x.double() - s1_t * e_c) / s_t + s1_p * e_c


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Denoiser(nn.Module):
    """A small stand-in for the world model's denoiser (torch only): the latent repeated K+1 times, a learned
    embedding per condition (base + K agents) and a sinusoidal timestep embedding, four 3x3 convolutions.
    Returns the stacked predictions (K+1, B, C, H, W), as one batched call of a real denoiser does."""

    def __init__(self, C, K, hidden=64):
        super().__init__()
        self.K, self.hidden = K, hidden
        self.cond = nn.Parameter(torch.randn(K + 1, hidden) * 0.1)
        self.time = nn.Linear(hidden, hidden)
        self.inp = nn.Conv2d(C, hidden, 3, padding=1)
        self.mid = nn.Sequential(nn.GroupNorm(8, hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
                                 nn.GroupNorm(8, hidden), nn.SiLU(), nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU())
        self.out = nn.Conv2d(hidden, C, 3, padding=1)

    def temb(self, t):
        "Sinusoidal embedding of the timestep t (an int), (hidden,)."
        f = torch.exp(-math.log(10000.0) * torch.arange(self.hidden // 2) / (self.hidden // 2))
        return torch.cat([torch.sin(t * f), torch.cos(t * f)])

    def forward(self, x, temb):                                   # x (B, C, H, W); temb (hidden,) on the device
        B = x.shape[0]
        h = self.inp(x)                                            # (B, hidden, H, W): the same for every condition
        c = (self.cond + self.time(temb)).repeat_interleave(B, 0)  # ((K+1) B, hidden)
        h = h.repeat(self.K + 1, 1, 1, 1) + c[:, :, None, None]   # ((K+1) B, hidden, H, W)
        return self.out(self.mid(h)).view(self.K + 1, *x.shape)   # (K+1, B, C, H, W)


def capture(loop, x_T, step):
    """Warm `loop(x, step)` up on a side stream, then capture one call in a CUDA graph. Returns the graph, its static
    input (kept alive: the graph reads it on every replay) and its static output."""
    static_x = x_T.clone()
    side = torch.cuda.Stream(); side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            loop(static_x, step)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop(static_x, step)
    return graph, static_x, static_out


def sampling_loop(label, shape, K, steps, dev, smoke, reps):
    """Imagined rollouts per second: `steps` DDIM steps of the stand-in denoiser with the composed step (per-agent masks
    and weights, as COMBO composes agents), eager and captured whole in one CUDA graph, with the reference or the kernel."""
    B, C, H, Wd = shape
    torch.manual_seed(0)
    net = Denoiser(C, K).to(dev).eval()
    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)  # SD's schedule
    ts = list(range(999, -1, -1000 // steps))[:steps]
    sched = [(ac[t].item(), ac[t - 1000 // steps].item() if t - 1000 // steps >= 0 else ac[0].item()) for t in ts]
    tembs = torch.stack([net.temb(t) for t in ts]).to(dev)
    masks = (torch.rand(K, B, 1, H, Wd, device=dev) > 0.3).float()
    w = torch.linspace(1.0, 3.0, K, device=dev)
    x_T = torch.randn(B, C, H, Wd, device=dev)
    steps_fn = {"reference": lambda *a: composed_ddim_step_reference(*a, check_values=False),
                "kernel": lambda *a: composed_ddim_step(*a, backend="triton", check_values=False)}

    def loop(x, step):
        for i, (a_t, a_p) in enumerate(sched):
            x = step(x, net(x, tembs[i]), a_t, a_p, w, masks)
        return x

    rows, outs = [], {}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.no_grad():
        for name, step in steps_fn.items():
            outs[name] = loop(x_T, step)                                   # warm-up (compiles the kernel)
            sync(); t = time.perf_counter()
            for _ in range(reps):
                loop(x_T, step)
            sync(); sec = (time.perf_counter() - t) / reps
            rows.append(dict(step=name, mode="eager", ms_per_loop=sec * 1e3, us_per_step=sec / steps * 1e6,
                             rollouts_per_s=B / sec))
            if dev != "cuda":
                continue
            g, static_x, static_out = capture(loop, x_T, step)
            g.replay(); sync()
            outs[name + " graph"] = static_out.clone()
            t = time.perf_counter()
            for _ in range(reps):
                g.replay()
            sync(); sec = (time.perf_counter() - t) / reps
            rows.append(dict(step=name, mode="CUDA graph", ms_per_loop=sec * 1e3, us_per_step=sec / steps * 1e6,
                             rollouts_per_s=B / sec))
        # the denoiser alone and the step alone, GPU time per call, for the step's share of sampling
        eps = net(x_T, tembs[0])
        den_us = gpu_us(lambda: net(x_T, tembs[0]), smoke)
        step_us = gpu_us(lambda: steps_fn["kernel"](x_T, eps, *sched[0], w, masks), smoke)
        ref_step_us = gpu_us(lambda: steps_fn["reference"](x_T, eps, *sched[0], w, masks), smoke)
    checks = [dict(name=f"loop {label}: {k} vs the reference loop", rel_err=rel_err(v, outs["reference"].double()),
                   ok=rel_err(v, outs["reference"].double()) < 1e-4) for k, v in outs.items() if k != "reference"]
    return dict(latents=label, K=K, steps=steps, B=B,
                denoiser=f"stand-in denoiser (torch-only conv net, 4 convs of 64 channels, {sum(p.numel() for p in net.parameters()):,} "
                         "parameters, in place of the COMBO world model: tinylab.combo's sampler was not available)",
                denoiser_gpu_us=den_us, step_gpu_us_kernel=step_us, step_gpu_us_reference=ref_step_us,
                rows=rows), checks


def combo_loop(M, K, steps, dev, smoke, reps):
    """The planner's sampler, tinylab.combo.imagine: eager (as the planner calls it: the kernel on CUDA, or the reference
    step patched in), and its loop body (the UNet on K+1 stacked conditions, then the composed step; every per-step
    input put on the device first) captured in one CUDA graph and checked against the same loop run eagerly."""
    import tinylab.combo as combo
    S = combo.SIZE
    torch.manual_seed(0)
    wm = combo.WorldModel(channels=(16, 32) if smoke else (32, 64)).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    cur = (torch.rand(M, 3, S, S, generator=g) * 2 - 1).to(dev)
    colors = torch.stack([torch.randperm(combo.N_COLORS, generator=g)[:K] for _ in range(M)])
    actions = torch.randint(0, len(combo.ACTIONS), (M, K), generator=g)
    weight = 5.0
    ref_step = lambda *a: composed_ddim_step_reference(*a, check_values=False)
    ker_step = lambda *a: composed_ddim_step(*a, backend="triton", check_values=False)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    rows, outs = [], {}

    def timed(fn, n):
        fn(); sync(); t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t) / n

    original = combo.composed_ddim_step
    for name, step in (("reference", ref_step), ("kernel", ker_step)):
        combo.composed_ddim_step = step
        try:
            outs[name] = combo.imagine(wm, cur, colors, actions, weight, steps, seed=0)
            sec = timed(lambda: combo.imagine(wm, cur, colors, actions, weight, steps, seed=0), reps)
        finally:
            combo.composed_ddim_step = original
        rows.append(dict(step=name, mode="eager", ms_per_loop=sec * 1e3, us_per_step=sec / steps * 1e6, rollouts_per_s=M / sec))
    # the loop body of imagine, with every per-step input on the device first (a graph cannot copy from the host)
    ddim = wm.ddim
    ddim.set_timesteps(steps)
    col = torch.cat([torch.full((M, 1), combo.NULL_COLOR), colors.T.reshape(-1, 1)]).to(dev)
    act = torch.cat([torch.full((M, 1), combo.NULL_ACTION), actions.T.reshape(-1, 1)]).to(dev)
    with torch.no_grad():
        tokens = wm.tokens(col, act)
        cur_rep = cur.repeat(K + 1, 1, 1, 1)
        t_dev = [t.to(dev) for t in ddim.timesteps]
        sched = [combo._alpha_bars(ddim, int(t), steps) for t in ddim.timesteps]

        def loop(x, step):
            for t, (a_t, a_p) in zip(t_dev, sched):
                inp = combo.with_coords(torch.cat([x.repeat(K + 1, 1, 1, 1), cur_rep], 1))
                eps = wm.unet(inp, t, tokens).sample.view(K + 1, M, 3, S, S)
                x = step(x, eps, a_t, a_p, weight, None)
            return x

        x_T = combo._noise(M, 0, dev)
        outs["loop reference"] = loop(x_T, ref_step)             # the captured loops are checked against this
        if dev == "cuda":
            for name, step in (("reference", ref_step), ("kernel", ker_step)):
                graph, static_x, static_out = capture(loop, x_T, step)
                graph.replay(); sync()
                outs["loop " + name + " graph"] = static_out.clone()
                sec = timed(graph.replay, reps)
                rows.append(dict(step=name, mode="CUDA graph", ms_per_loop=sec * 1e3, us_per_step=sec / steps * 1e6,
                                 rollouts_per_s=M / sec))
        else:
            outs["loop kernel"] = loop(x_T, ker_step)
        inp = combo.with_coords(torch.cat([x_T.repeat(K + 1, 1, 1, 1), cur_rep], 1))
        eps = wm.unet(inp, t_dev[0], tokens).sample.view(K + 1, M, 3, S, S)
        den_us = gpu_us(lambda: wm.unet(inp, t_dev[0], tokens), smoke)
        step_us = gpu_us(lambda: ker_step(x_T, eps, *sched[0], weight, None), smoke)
        ref_step_us = gpu_us(lambda: ref_step(x_T, eps, *sched[0], weight, None), smoke)
    checks = []
    for k, v in outs.items():   # imagine with the kernel vs with the reference; each loop vs the eager reference loop
        if k in ("reference", "loop reference"):
            continue
        ref = outs["loop reference" if k.startswith("loop") else "reference"].double()
        checks.append(dict(name=f"combo.imagine M={M} K={K}: {k} vs its eager reference", rel_err=rel_err(v, ref),
                           ok=rel_err(v, ref) < 1e-3))
    n_par = sum(p.numel() for p in wm.unet.parameters())
    return dict(latents=f"B{M} C3 {S}x{S}", K=K, steps=steps, B=M, weight=weight,
                denoiser=f"tinylab.combo.imagine: the COMBO world model (diffusers UNet2DConditionModel, {n_par:,} parameters, "
                         f"untrained), K+1 = {K + 1} conditions stacked per UNet call, {steps} DDIM steps",
                denoiser_gpu_us=den_us, step_gpu_us_kernel=step_us, step_gpu_us_reference=ref_step_us, rows=rows), checks


def tf32_check(out, dev, smoke):
    """combo.imagine with the kernel vs with the reference step, with cuDNN/cuBLAS TF32 on and then off: does TF32 in the
    UNet's convolutions explain a difference between the two after 10 DDIM steps?"""
    results = {}
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        _, checks = combo_loop(4 if smoke else 27, 3, 2 if smoke else 10, dev, smoke, 1 if smoke else 2)
        results[f"tf32={tf32}"] = checks
        print("tf32", tf32, [(c["name"], f"{c['rel_err']:.2e}") for c in checks], flush=True)
    info = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), commit=os.environ.get("TINYLAB_COMMIT"), results=results)
    with open(out, "w") as f:
        json.dump(info, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny shapes through the Triton interpreter on a CPU")
    p.add_argument("--tf32-check", action="store_true",
                   help="only rerun the planner-sampler comparison (kernel vs reference step) with TF32 on and off")
    args = p.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU path")
    dev = "cpu" if smoke else "cuda"
    if args.tf32_check:
        return tf32_check(args.out, dev, smoke)
    torch._dynamo.config.cache_size_limit = 128
    compiled = torch.compile(composed_ddim_step_reference, dynamic=False, backend="eager" if smoke else "inductor")
    impls = {"eager": lambda *a: composed_ddim_step_reference(*a),
             "torch.compile": lambda *a: compiled(*a),
             "kernel": lambda *a: composed_ddim_step(*a, backend="triton")}
    copy_tbps = None
    if not smoke:
        from triton.testing import do_bench
        a = torch.empty(1 << 29, device="cuda"); b = torch.empty_like(a)
        copy_tbps = 2 * a.numel() * 4 / (do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3) / 1e12
        del a, b
        print(f"copy bandwidth {copy_tbps:.2f} TB/s", flush=True)
    shapes = SMOKE_SHAPES if smoke else SHAPES
    Ks = (1, 3) if smoke else range(1, 9)
    rows, checks, tuning, variants = [], [], [], []
    print(f"{'latents':14} {'K':>2} {'dtype':8} {'impl':14} {'GPU us':>7} {'host us':>7} {'floor us':>8} {'relerr':>8}")
    for label, shape in shapes.items():
        for K in Ks:
            dts = (torch.float32, torch.bfloat16) if (K in (1, 4, 8) and not smoke) else (torch.float32,)
            for dt in dts:
                torch.manual_seed(0)
                x = torch.randn(shape, device=dev, dtype=dt)
                eps = torch.randn((K + 1, *shape), device=dev, dtype=dt)
                ref = truth(x, eps, A_T, A_PREV, W)
                floor = (K + 3) * x.numel() * x.element_size() / (PEAK_TBPS * 1e12) * 1e6
                for name, impl in impls.items():
                    fn = lambda: impl(x, eps, A_T, A_PREV, W)
                    err = rel_err(fn(), ref)
                    ok = err < (1e-5 if dt == torch.float32 else 5e-3)
                    checks.append(dict(name=f"{label} K={K} {str(dt)[6:]} {name}", rel_err=err, ok=ok))
                    if not ok:
                        print(f"FAILED gate: {label} K={K} {dt} {name}: rel err {err:.1e}", flush=True)
                        continue
                    g, h = gpu_us(fn, smoke), host_us(fn, smoke)
                    rows.append(dict(latents=label, B=shape[0], C=shape[1], H=shape[2], W=shape[3], K=K,
                                     dtype=str(dt)[6:], impl=name, gpu_us=g, host_us=h, floor_us=floor, rel_err=err))
                    print(f"{label:14} {K:2d} {str(dt)[6:]:8} {name:14} {g:7.2f} {h:7.0f} {floor:8.2f} {err:8.1e}", flush=True)
                if dt == torch.float32 and K in ((1, 4, 8) if not smoke else (1,)):     # launch settings for the kernel
                    for blk, nw in (TUNE if not smoke else [(64, 1)]):
                        t = gpu_us(lambda: composed_ddim_step(x, eps, A_T, A_PREV, W, backend="triton", block=blk,
                                                              num_warps=nw), smoke)
                        tuning.append(dict(latents=label, K=K, block=blk, num_warps=nw, gpu_us=t))
                    best = min((r for r in tuning if r["latents"] == label and r["K"] == K), key=lambda r: r["gpu_us"])
                    print(f"   tuned: best block {best['block']} warps {best['num_warps']}: {best['gpu_us']:.2f} us", flush=True)
    # a COMBO-like step: per-agent masks (K, B, 1, H, W) and weights, a timestep per sample
    for label, shape in shapes.items():
        K = 3 if smoke else 4
        B, C, H, Wd = shape
        torch.manual_seed(1)
        x = torch.randn(shape, device=dev); eps = torch.randn((K + 1, *shape), device=dev)
        masks = (torch.rand(K, B, 1, H, Wd, device=dev) > 0.3).float()
        w = torch.linspace(1.0, 3.0, K, device=dev)
        a_t = torch.rand(B, device=dev) * 0.9 + 0.05; a_p = torch.clamp(a_t + 0.05, max=1.0)
        ref = truth(x, eps, a_t, a_p, w, masks)
        for name, impl in {"eager": lambda: composed_ddim_step_reference(x, eps, a_t, a_p, w, masks, check_values=False),
                           "torch.compile": lambda: compiled(x, eps, a_t, a_p, w, masks, check_values=False),
                           "kernel": lambda: composed_ddim_step(x, eps, a_t, a_p, w, masks, backend="triton",
                                                                check_values=False)}.items():
            err = rel_err(impl(), ref)
            checks.append(dict(name=f"{label} K={K} masks+weights+per-sample alpha {name}", rel_err=err, ok=err < 1e-5))
            if err < 1e-5:
                variants.append(dict(latents=label, K=K, impl=name, gpu_us=gpu_us(impl, smoke), host_us=host_us(impl, smoke),
                                     floor_us=(K + 3) * x.numel() * 4 / (PEAK_TBPS * 1e12) * 1e6 + K * B * H * Wd * 4 / (PEAK_TBPS * 1e6)))
                print(f"variant {label} K={K} {name}: {variants[-1]['gpu_us']:.2f} us GPU, {variants[-1]['host_us']:.0f} us host", flush=True)
    # end to end: imagined rollouts per second of the sampling loop
    loops = []
    try:
        import tinylab.combo  # noqa: F401  (needs diffusers)
        have_combo = True
    except ImportError as e:
        have_combo = False
        print(f"tinylab.combo not importable ({e}): the stand-in denoiser's loop instead", flush=True)
    combo_error = None
    if have_combo:
        try:
            for M in ((3,) if smoke else (27, 216)):
                loop, c = combo_loop(M, 3, 2 if smoke else 10, dev, smoke, 1 if smoke else 20)
                loops.append(loop); checks += c
        except Exception as e:   # the chapter's API moved under us: record why, and time the stand-in instead
            combo_error = f"{type(e).__name__}: {e}"
            print(f"tinylab.combo's sampler failed ({combo_error}): the stand-in denoiser's loop instead", flush=True)
            loops = []
    if not loops:
        for label in ([next(iter(shapes))] if smoke else [PLANNER, "B8 C4 64x64"]):
            loop, c = sampling_loop(label, shapes[label], 3 if smoke else 4, 3 if smoke else 50, dev, smoke, 1 if smoke else 10)
            loops.append(loop); checks += c
    for loop in loops:
        label = loop["latents"]
        for r in loop["rows"]:
            print(f"loop {label} K={loop['K']} {r['step']:9} {r['mode']:10}: {r['ms_per_loop']:.2f} ms per {loop['steps']} steps, "
                  f"{r['rollouts_per_s']:,.0f} rollouts/s", flush=True)
        print(f"   denoiser {loop['denoiser_gpu_us']:.1f} us GPU per call; step {loop['step_gpu_us_kernel']:.2f} us (kernel), "
              f"{loop['step_gpu_us_reference']:.2f} us (reference)", flush=True)
    result = dict(device=torch.cuda.get_device_name() if not smoke else "CPU (smoke, Triton interpreter)",
                  torch=torch.__version__, triton=triton.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=os.environ.get("TINYLAB_COMMIT"), peak_TBps=PEAK_TBPS, copy_TBps=copy_tbps,
                  anchor_step=dict(alpha_bar_t=A_T, alpha_bar_prev=A_PREV, weight=W),
                  kernel_version="folded step coefficients (two multiply-adds), 32-bit offsets, 8 warps",
                  planner_shape_source="the COMBO chapter's frames (3, 16, 16); batch 27 = one world of 3 agents x 3 "
                                       "proposals x beam 3, 216 = 8 such worlds",
                  rows=rows, tuning=tuning, variants=variants, loop=loops[0], loops=loops, combo_error=combo_error, checks=checks)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    bad = [c for c in checks if not c["ok"]]
    print(f"wrote {args.out}: {len(rows)} rows, {len(checks) - len(bad)}/{len(checks)} checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
