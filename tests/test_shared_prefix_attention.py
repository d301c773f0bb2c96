"""Shared-prefix attention (tinylab.kernels.shared_prefix_attention): the Triton kernel vs the reference on odd shapes
(prefix lengths never multiples of the tiles, one query, GQA, one and several prefix pieces), bad inputs, the block-size
rules, and the transformers attention function on a tiny Llama. Triton runs in its interpreter on a CPU (~1 ms per
program), so the shapes are small."""
import math

import pytest
import torch

import tinylab.kernels.shared_prefix_attention as spa
from kernel_asserts import assert_close

TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, Hq, Hkv, S, P, D, dtype=torch.float32, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    return r(B, Hq, S, D), r(Hkv, P, D), r(Hkv, P, D), r(B, Hkv, S, D), r(B, Hkv, S, D)


def fp32_ref(x, scale=None):
    "The reference in fp32 on the same (rounded) inputs."
    return spa.shared_prefix_attention_ref(*(t.float() for t in x), scale=scale)


SHAPES = [
    pytest.param(1, 1, 1, 1, 1, 16, id="B1-H1-S1-P1"),
    pytest.param(2, 6, 2, 5, 37, 16, id="B2-GQA3-S5-P37"),
    pytest.param(1, 4, 1, 1, 50, 16, id="B1-GQA4-S1-P50"),
    pytest.param(3, 4, 4, 3, 17, 24, id="B3-MHA-S3-P17-D24"),
    pytest.param(2, 2, 1, 17, 33, 8, id="B2-GQA2-S17-P33-D8"),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,P,D", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-piece", "three-pieces"])
def test_triton_matches_reference(poison_empty, B, Hq, Hkv, S, P, D, dtype, num_splits):
    x = inputs(B, Hq, Hkv, S, P, D, dtype, seed=P + S)
    out = spa.shared_prefix_attention_triton(*x, num_splits=num_splits)
    assert out.shape == x[0].shape and out.dtype == dtype
    assert_close("out", fp32_ref(x), out, TOL[dtype])
    assert_close("out vs reference in its dtype", spa.shared_prefix_attention_ref(*x), out, 2 * TOL[dtype])


def test_float16_and_scale(poison_empty):
    x = inputs(2, 4, 2, 6, 29, 32, torch.float16, seed=3)
    assert_close("fp16, scale 0.3", fp32_ref(x, scale=0.3), spa.shared_prefix_attention_triton(*x, scale=0.3), TOL[torch.float16])


def test_reference_is_the_equation():
    "Reference vs attention over the full sequence of each example, written out in float64."
    q, kp, vp, ks, vs = x = inputs(2, 6, 2, 4, 9, 8, seed=1)
    ref = spa.shared_prefix_attention_ref(*x).double()
    G = 3
    for b in range(2):
        for h in range(6):
            k = torch.cat([kp[h // G], ks[b, h // G]]).double()
            v = torch.cat([vp[h // G], vs[b, h // G]]).double()
            for i in range(4):
                s = k[: 9 + i + 1] @ q[b, h, i].double() / 8 ** 0.5
                assert_close(f"b{b} h{h} i{i}", torch.softmax(s, 0) @ v[: 9 + i + 1], ref[b, h, i], 1e-5)


def test_strided_views_are_read_in_place():
    "q as a transposed (B, S, Hq, D) buffer and the prefix as a slice of a longer cache: no copies needed."
    q0, kp, vp, ks, vs = inputs(2, 4, 2, 5, 40, 16, seed=4)
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)                  # strides of (B, S, Hq, D)
    kp_long = torch.cat([kp, torch.randn(2, 7, 16, device=DEV)], 1)[:, :40]
    out = spa.shared_prefix_attention_triton(q, kp_long, vp, ks, vs)
    assert_close("strided", spa.shared_prefix_attention_ref(q0, kp, vp, ks, vs), out, TOL[torch.float32])


def test_api_copies_a_strided_head_dimension():
    x = list(inputs(1, 2, 1, 3, 20, 16, seed=5))
    x[1] = x[1].transpose(1, 2).contiguous().transpose(1, 2)             # head dimension strided
    with pytest.raises(ValueError, match="k_prefix must be contiguous"):
        spa.shared_prefix_attention_triton(*x)
    assert_close("api", spa.shared_prefix_attention_ref(*x), spa.shared_prefix_attention(*x, use_triton=True), 1e-4)


def test_right_padding_leaves_real_tokens_alone():
    "Suffixes right-padded with junk: the outputs of the real tokens do not change (causality)."
    q, kp, vp, ks, vs = inputs(2, 4, 2, 7, 30, 16, seed=6)
    full = spa.shared_prefix_attention_triton(q, kp, vp, ks, vs)
    short = spa.shared_prefix_attention_triton(q[:, :, :4].contiguous(), kp, vp, ks[:, :, :4].contiguous(), vs[:, :, :4].contiguous())
    assert_close("first 4 tokens", short, full[:, :, :4], 1e-5)


def test_auto_dispatch_on_cpu_is_reference(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU auto means Triton")
    calls = []
    ref = spa.shared_prefix_attention_ref
    monkeypatch.setattr(spa, "shared_prefix_attention_ref", lambda *a, **k: calls.append(1) or ref(*a, **k))
    spa.shared_prefix_attention(*inputs(1, 2, 1, 2, 5, 16))
    assert calls


def test_triton_needs_cuda_or_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel runs natively")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        spa.shared_prefix_attention_triton(*inputs(1, 2, 1, 2, 5, 16))


X = inputs(2, 6, 2, 5, 37, 16, device="cpu")


def _with(**changes):
    names = ("q", "k_prefix", "v_prefix", "k_suffix", "v_suffix")
    return {**dict(zip(names, X)), **changes}


@pytest.mark.parametrize("fn", [spa.shared_prefix_attention_ref, spa.shared_prefix_attention_triton, spa.shared_prefix_attention],
                         ids=["ref", "triton", "api"])
@pytest.mark.parametrize("changes,exc,match", [
    pytest.param(dict(q=X[0][0]), ValueError, "q must have shape", id="q-3d"),
    pytest.param(dict(q=X[0][:, :, :0]), ValueError, "q must have shape", id="q-S0"),
    pytest.param(dict(k_prefix=X[1][..., :8]), ValueError, "k_prefix must have shape", id="k_prefix-D"),
    pytest.param(dict(k_prefix=X[1][:, :0], v_prefix=X[2][:, :0]), ValueError, "k_prefix must have shape", id="P0"),
    pytest.param(dict(k_prefix=X[1].repeat(2, 1, 1)), ValueError, "must divide", id="heads-not-dividing"),
    pytest.param(dict(v_prefix=X[2][:, :30]), ValueError, "v_prefix must have shape", id="v_prefix-P"),
    pytest.param(dict(k_suffix=X[3][:1]), ValueError, "k_suffix must have shape", id="k_suffix-B"),
    pytest.param(dict(v_suffix=X[4][:, :, :4]), ValueError, "v_suffix must have shape", id="v_suffix-S"),
    pytest.param(dict(v_suffix=X[4].bfloat16()), TypeError, "v_suffix must have q's dtype", id="v_suffix-dtype"),
    pytest.param({n: t.double() for n, t in zip(("q", "k_prefix", "v_prefix", "k_suffix", "v_suffix"), X)}, TypeError,
                 "q must be float16, bfloat16 or float32", id="float64"),
    pytest.param(dict(k_suffix=X[3].numpy()), TypeError, "k_suffix must be a torch.Tensor", id="k_suffix-numpy"),
    pytest.param(dict(v_prefix=X[2].to("meta")), ValueError, "v_prefix is on meta", id="device"),
    pytest.param(dict(scale=-1.0), TypeError, "scale must be", id="scale-negative"),
    pytest.param(dict(scale="0.1"), TypeError, "scale must be", id="scale-str"),
])
def test_bad_inputs(fn, changes, exc, match):
    with pytest.raises(exc, match=match):
        fn(**_with(**changes))


def test_head_dim_too_large():
    with pytest.raises(ValueError, match="not supported"):
        spa.shared_prefix_attention(*inputs(1, 2, 1, 2, 3, 320, device="cpu"))


@pytest.mark.parametrize("kwargs,match", [
    pytest.param(dict(config=dict(block_m=48)), "power of two", id="block_m-48"),
    pytest.param(dict(config=dict(block_n=512)), "power of two", id="block_n-512"),
    pytest.param(dict(config=dict(block_m=256, block_n=256, num_stages=4)), "shared memory", id="too-much-smem"),
    pytest.param(dict(num_splits=0), "num_splits", id="splits-0"),
    pytest.param(dict(num_splits=True), "num_splits", id="splits-bool"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spa.shared_prefix_attention_triton(*inputs(2, 6, 2, 5, 37, 16), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("D", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("R", [1, 64, 10_000])
def test_default_configs_fit_an_h200(dtype, D, R):
    cfg = spa.default_config(R, D, dtype, on_gpu=True)
    assert spa.smem_bytes(cfg["block_m"], cfg["block_n"], D, cfg["num_stages"], dtype) <= spa.SMEM_BYTES


def test_num_splits_fills_the_gpu():
    assert spa._num_splits(1024, 256, 132) == 1                          # enough row blocks: one piece
    ns = spa._num_splits(16, 2048, 132)                                  # one example, long prefix: >= 90% of the
    assert 4 <= ns <= 64 and 16 * ns / (math.ceil(16 * ns / 132) * 132) >= 0.9   # GPU busy in every wave
    assert spa._num_splits(16, 8, 132) <= 2                              # short prefix: at least 4 tiles a piece


# the transformers attention function, on a tiny Llama (the reference path on a CPU, and the kernel)

@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(DEV).eval()


@pytest.mark.parametrize("use_triton", [None, False, True], ids=["auto", "reference", "kernel"])
def test_llama_shared_prefix_matches_own_sdpa(llama, use_triton):
    P, B, S = 19, 3, 5
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 97, (P,), generator=g).to(DEV)
    suffix = torch.randint(3, 97, (B, S), generator=g).to(DEV)
    with torch.no_grad():
        full = llama(torch.cat([prefix.expand(B, P), suffix], 1)).logits[:, P:]
    out = spa.shared_prefix_logits(llama, prefix, suffix, use_triton=use_triton)
    assert_close("logits", full, out, 1e-4)
    assert llama.config._attn_implementation == "sdpa"                   # restored


def test_llama_registered_function_without_prefix_is_sdpa(llama):
    "Registered and selected, the function without `shared_prefix` is the model's own SDPA attention."
    ids = torch.randint(3, 97, (2, 7)).to(DEV)
    with torch.no_grad():
        want = llama(ids).logits
        llama.set_attn_implementation(spa.register_shared_prefix_attention())
        try:
            got = llama(ids).logits
        finally:
            llama.set_attn_implementation("sdpa")
    assert_close("logits", want, got, 1e-6)


def test_llama_bad_inputs(llama):
    with pytest.raises(ValueError, match="prefix_ids must be"):
        spa.shared_prefix_logits(llama, torch.zeros(1, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    sp = spa.SharedPrefix()
    llama.set_attn_implementation(spa.register_shared_prefix_attention())
    try:
        with pytest.raises(ValueError, match="batch size 1"):
            llama(torch.zeros(2, 5, dtype=torch.long, device=DEV), shared_prefix=sp, use_cache=False)
    finally:
        llama.set_attn_implementation("sdpa")


@pytest.mark.parametrize("use_triton", [False, True], ids=["reference", "kernel"])
def test_llama_from_a_cropped_cache(llama, use_triton):
    "A prefix the model encoded into its own cache, cropped to fewer positions (views), then a batch of suffixes."
    P, crop, B, S = 20, 13, 2, 4
    prefix = torch.randint(3, 97, (P,)).to(DEV)
    suffix = torch.randint(3, 97, (B, S)).to(DEV)
    with torch.no_grad():
        cache = llama(prefix[None], use_cache=True).past_key_values
        sp = spa.SharedPrefix.from_kv([(layer.keys, layer.values) for layer in cache.layers], length=crop, use_triton=use_triton)
        want = llama(torch.cat([prefix[:crop].expand(B, -1), suffix], 1)).logits[:, crop:]
        llama.set_attn_implementation(spa.register_shared_prefix_attention())
        try:
            pos = torch.arange(crop, crop + S, device=DEV).expand(B, S)
            got = llama(suffix, position_ids=pos, shared_prefix=sp, use_cache=False).logits
        finally:
            llama.set_attn_implementation("sdpa")
    assert sp.length == crop and not sp.recording
    assert_close("logits", want, got, 1e-4)
    with pytest.raises(ValueError, match="length must be in"):
        spa.SharedPrefix.from_kv([(layer.keys, layer.values) for layer in cache.layers], length=P + 1)
