"""MoA (tinylab.moa): scenes and captions, the diffusers prior, the MoA attention processors (forced-prior exactness,
untrained MoA == prior, the fused-kernel path == the reference path), the losses, one training step of MoA and of the
baseline, save/load of the prior, and bad inputs. Everything on tiny random models."""
import numpy as np
import pytest
import torch

import tinylab.moa as moa

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prior():
    unet, te = moa.build_prior(16, (16, 32), 32, 2, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                        # break the symmetry of a fresh init (zero output convs etc.)
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return unet.eval(), te.eval()


@pytest.fixture(scope="module")
def batch(prior):
    unet, te = prior
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        text = te(moa.encode_captions(["red object topleft day", "black circle bottomright snow"])).last_hidden_state
    return x, torch.tensor([5, 800]), text, torch.randn(2, 1, 8, 8, generator=g)


def perturbed_moa(unet, seed=3):
    m = moa.MoA(unet, 32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def test_scenes_and_captions():
    s = moa.random_scenes(12, 16, np.random.default_rng(0))
    assert s.images.shape == (12, 3, 16, 16) and s.ids.shape == (12, 6) and s.masks.shape == (12, 1, 16, 16)
    assert s.images.min() >= -1 and s.images.max() <= 1
    assert (s.masks.sum((1, 2, 3)) == 64).all()
    assert all(c.split()[1] in (*moa.SHAPES, moa.NOUN) for c in s.captions)
    subj = moa.random_scenes(6, 16, np.random.default_rng(0), subjects=np.random.rand(3, 8, 8) * 16)
    assert all(c.split()[1] == moa.NOUN for c in subj.captions) and all("subject" in l for l in subj.labels)
    img, box = moa.render_scene("day", "red", "bottomright", moa.shape_mask("square", 8), 16)
    assert box[0, 8:, 8:].all() and box.sum() == 64
    assert moa.quadrant_box("bottomleft", 16) == (8, 0)


@pytest.mark.parametrize("bad,match", [
    pytest.param(["red circle topleft"], "expected 'color noun position background'", id="three-words"),
    pytest.param(["red dog topleft day"], "from the vocabulary", id="unknown-word"),
])
def test_bad_captions(bad, match):
    with pytest.raises(ValueError, match=match):
        moa.encode_captions(bad)


def test_forced_prior_is_exactly_the_base(prior, batch):
    unet, _ = prior
    x, t, text, refs = batch
    with torch.no_grad():
        base = moa.prior_pred(unet, x, t, text)
        m = perturbed_moa(unet)
        forced = m(x, t, text, refs, force="prior")
        free = m(x, t, text, refs)
    assert torch.equal(forced, base)
    assert (free - base).abs().max() > 1e-3
    # the prior's own UNet keeps diffusers' processors
    assert all(type(p).__name__ != "MoAAttnProcessor" for p in unet.attn_processors.values())


def test_untrained_moa_is_the_prior(prior, batch):
    unet, _ = prior
    x, t, text, refs = batch
    with torch.no_grad():
        m = moa.MoA(unet, 32).eval()
        for r in m.routers.values():            # any router: the experts are equal at the start
            torch.nn.init.normal_(r.net[2].weight)
        out = m(x, t, text, refs)
    assert (out - moa.prior_pred(unet, x, t, text)).abs().max() < 1e-4


def test_kernel_path_matches_reference_path(prior, batch):
    unet, _ = prior
    x, t, text, refs = batch
    m = perturbed_moa(unet)
    with torch.no_grad():
        m.state.kernel = False
        ref = m(x, t, text, refs, record=True)
        maps = dict(m.state.maps)
        m.state.kernel = True                   # the fused Triton kernel (interpreter on a CPU)
        fused = m(x, t, text, refs)
    assert (fused - ref).abs().max() < 1e-4
    assert len(maps) == 8 and all(w.min() >= 0 and w.max() <= 1 for w in maps.values())


def test_router_loss_trains_the_routers(prior, batch):
    unet, _ = prior
    x, t, text, refs = batch
    m = perturbed_moa(unet)
    m(x, t, text, refs, record=True)
    mask = torch.zeros(2, 1, 16, 16); mask[:, :, :8, :8] = 1
    moa.router_loss(m.state.maps, mask).backward()
    assert all(r.net[2].weight.grad is not None and r.net[2].weight.grad.abs().sum() > 0 for r in m.routers.values())
    assert all(p.grad is None for p in m.unet.parameters())


def test_trainable_parameters(prior):
    m = moa.MoA(prior[0], 32)
    names = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert names == {"experts", "routers", "image_encoder", "fusion"}
    assert sum(p.numel() for p in m.trainable_parameters()) == sum(p.numel() for p in m.parameters() if p.requires_grad)


def test_processor_refuses_unsupported_input(prior):
    m = moa.MoA(prior[0], 32)
    name = m.layer_names[0]
    proc = m.unet.attn_processors[name + ".processor"]
    attn = m.unet.get_submodule(name)
    with pytest.raises(ValueError, match="3-D input"):
        proc(attn, torch.randn(1, 32, 8, 8))


def test_losses():
    m = torch.zeros(2, 1, 16, 16); m[:, :, 8:, :8] = 1
    e = torch.randn(2, 3, 16, 16)
    e_hat = e + 3 * (1 - m)
    assert moa.masked_diffusion_loss(e_hat, e, m) == 0
    assert torch.isclose(moa.masked_diffusion_loss(e + 2 * m, e, m), torch.tensor(4.0))
    assert torch.isclose(moa.router_loss({"l": torch.full((2, 64), 0.5)}, m), torch.tensor(0.25))
    assert moa.router_loss({"l": moa.layer_mask(m, 16)}, m) == 0
    with pytest.raises(ValueError, match="mask must be"):
        moa.masked_diffusion_loss(e, e, m[:1])
    with pytest.raises(ValueError, match="square"):
        moa.layer_mask(m, 10)
    with pytest.raises(ValueError, match="record=True"):
        moa.router_loss({}, m)


def test_one_step_of_each_training(prior):
    unet, te = prior
    ddpm, _ = moa.noise_schedulers()
    subjects = np.random.default_rng(0).random((4, 8, 8)) * 16
    data = moa.random_scenes(16, 16, np.random.default_rng(1), subjects=subjects)
    m = moa.MoA(unet, 32)
    frozen = {k: v.clone() for k, v in m.unet.state_dict().items()}
    log = moa.train_moa(m, te, ddpm, data, subjects, steps=2, batch_size=4)
    assert len(log) == 2 and all(np.isfinite([l["masked"], l["router"]]).all() for l in log)
    assert all(torch.equal(frozen[k], v) for k, v in m.unet.state_dict().items())   # the prior stays frozen
    ft = moa.FineTune(unet, 32)
    before = next(ft.unet.parameters()).clone()
    assert len(moa.train_finetune(ft, te, ddpm, data, subjects, steps=2, batch_size=4)) == 2
    assert not torch.equal(before, next(ft.unet.parameters()))
    prior_data = moa.random_scenes(16, 16, np.random.default_rng(2))
    u2, t2 = moa.build_prior(16, (16, 32), 32, 2)
    assert len(moa.train_prior(u2, t2, ddpm, prior_data, steps=2, batch_size=4)) == 2


def test_sample_is_seeded_per_image(prior, batch):
    unet, _ = prior
    _, ddim = moa.noise_schedulers()
    text = batch[2]
    den = lambda x, t: moa.prior_pred(unet, x, t, text[:len(x)])
    a = moa.sample(den, 2, 16, ddim, steps=2, seed=4)
    b = moa.sample(den, 1, 16, ddim, steps=2, seed=4)
    assert a.shape == (2, 3, 16, 16) and torch.allclose(a[0], b[0], atol=1e-5)


def test_save_and_load_prior(prior, batch, tmp_path):
    unet, te = prior
    x, t, text, _ = batch
    ddpm, _ = moa.noise_schedulers()
    moa.save_prior(tmp_path, unet, te, ddpm, {"steps": 1})
    u2, t2, ddpm2, prov = moa.load_prior(tmp_path)
    assert prov == {"steps": 1} and ddpm2.config.prediction_type == "v_prediction"
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted([*moa.PRIOR_FILES, "provenance.json"])  # flat
    with torch.no_grad():
        assert torch.equal(moa.prior_pred(u2, x, t, text), moa.prior_pred(unet, x, t, text))
        assert torch.equal(t2(moa.null_ids(1)).last_hidden_state, te(moa.null_ids(1)).last_hidden_state)
    with pytest.raises(FileNotFoundError, match="expected the files saved by save_prior"):
        moa.load_prior(tmp_path / "missing")


def test_training_target_follows_the_scheduler():
    "v-prediction (the default) trains on v = sqrt(abar) noise - sqrt(1 - abar) x0; epsilon on the noise."
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    for kind in ("v_prediction", "epsilon"):
        ddpm, ddim = moa.noise_schedulers(prediction_type=kind)
        assert ddim.config.prediction_type == kind and ddim.config.timestep_spacing == "trailing"
        xt, target, t = moa.diffusion_batch(ddpm, x0, torch.Generator().manual_seed(0))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        ab = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
        assert torch.allclose(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-5)
        want = noise if kind == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        assert torch.allclose(target, want, atol=1e-5)
    ddim.set_timesteps(4)
    assert int(ddim.timesteps[0]) == 999                      # sampling starts where the input is pure noise
    with pytest.raises(ValueError, match="prediction_type"):
        moa.diffusion_batch(moa.noise_schedulers(prediction_type="sample")[0], x0, torch.Generator())


def test_router_start_and_region(prior, batch):
    "router_init sets every pixel's starting weights; a region of zeros is the forced prior exactly; a full one changes nothing."
    unet, _ = prior
    x, t, text, refs = batch
    r = moa.Router(32, prior_bias=4.0)
    w = r(torch.randn(2, 5, 32))
    assert torch.allclose(w[..., 1], torch.full((2, 5), 1 / (1 + np.exp(4.0)), dtype=torch.float32))
    assert torch.allclose(moa.Router(32)(torch.randn(1, 3, 32)), torch.full((1, 3, 2), 0.5))
    m = perturbed_moa(unet)
    assert all(torch.allclose(rt.net[2].bias, torch.tensor([0.0, 0.0])) for rt in moa.MoA(unet, 32).routers.values())
    assert all(torch.allclose(rt.net[2].bias, torch.tensor([2.0, 0.0])) for rt in moa.MoA(unet, 32, router_init=2.0).routers.values())
    with torch.no_grad():
        forced = m(x, t, text, refs, force="prior")
        free = m(x, t, text, refs)
        zero = m(x, t, text, refs, region=torch.zeros(2, 1, 16, 16))
        full = m(x, t, text, refs, region=torch.ones(2, 1, 16, 16))
    assert (zero - forced).abs().max().item() == 0.0
    assert torch.allclose(full, free, atol=1e-6) and (free - forced).abs().max() > 1e-3
    assert m.state.region is None                                  # reset after the call


def test_subject_refs_and_router_lr(prior):
    "subject_refs (one interpolate call) equals the per-glyph glyph_mask; router_lr trains the routers at its own rate."
    from sklearn.datasets import load_digits
    digits = load_digits().images[:20]
    idx = [3, 7, 7, 19, 0]
    old = torch.stack([moa.glyph_mask(digits[i], 8)[None] * 2 - 1 for i in idx])
    assert (moa.subject_refs(digits, idx, 8) - old).abs().max().item() == 0.0
    unet, te = prior
    ddpm, _ = moa.noise_schedulers()
    data = moa.random_scenes(16, 16, np.random.default_rng(0), subjects=digits)
    moved = {}
    for router_lr in (0.0, None):
        m = moa.MoA(unet, 32)
        before = {n: p.detach().clone() for n, p in m.routers.named_parameters()}
        moa.train_moa(m, te, ddpm, data, digits, steps=1, batch_size=4, lr=1e-2, router_lr=router_lr)
        moved[router_lr] = max((p.detach() - before[n]).abs().max().item() for n, p in m.routers.named_parameters())
    assert moved[0.0] == 0.0 and moved[None] > 0


def test_box_routing_and_paper_router_loss(prior, batch):
    "force='personal' with a region routes by the region itself; the 'layer_mean' router loss squares the layers' mean."
    unet, _ = prior
    x, t, text, refs = batch
    m = perturbed_moa(unet)
    region = torch.zeros(2, 1, 16, 16); region[:, :, :8, 8:] = 1
    with torch.no_grad():
        box = m(x, t, text, refs, force="personal", region=region, record=True)
        assert not torch.allclose(box, m(x, t, text, refs, force="personal"))
    for w in m.state.maps.values():                                  # personalised weight = the region at each layer
        assert torch.equal(w, moa.layer_mask(region, w.shape[1]))
    with torch.no_grad():
        assert torch.equal(m(x, t, text, refs, force="prior", region=region), m(x, t, text, refs, force="prior"))
    mask = torch.zeros(2, 1, 16, 16); mask[:, :, :8, :8] = 1
    a, b = torch.rand(2, 64), torch.rand(2, 64)
    bg = 1 - moa.layer_mask(mask, 64)
    paper = moa.router_loss({"a": a, "b": b}, mask, form="layer_mean")
    assert torch.allclose(paper, (bg * ((a + b) / 2) ** 2).sum() / bg.sum())
    assert paper <= moa.router_loss({"a": a, "b": b}, mask) + 1e-7                # Jensen: ours bounds the paper's
    with pytest.raises(ValueError, match="form"):
        moa.router_loss({"a": a}, mask, form="nope")


def test_train_moa_personalise_box_routed_smoke(tmp_path):
    "The GPU script's diagnosis variants on a CPU: box-routed MoA, the paper's router-loss form, the extra sampling kinds."
    import json, os, subprocess, sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "benchmarks/train_moa_personalise.py", "--smoke", "--no-tar", "--out", str(tmp_path),
                        "--variants", "moa_box_routed,moa_half", "--router-form", "layer_mean"],
                       cwd=root, env={**os.environ, "PYTHONPATH": str(root), "TQDM_DISABLE": "1"},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "moa_personalise_h200.json").read_text())
    by = {row["variant"]: row for row in rec["rows"]}
    assert by["moa_box_routed"]["router_inside"] == 1.0 and by["moa_box_routed"]["router_outside"] == 0.0
    assert {"personal_everywhere", "box_as_router"} <= set(by["moa_half"])
    assert {"prior", "moa_half:personal", "moa_half:box", "moa_box_routed"} <= set(rec["prediction_error"])
    assert rec["args"]["router_form"] == "layer_mean"
