"""The TriForce GPU benchmarks still run (their `--smoke` sizes, on the CPU; the end-to-end one on a made-up token stream),
so that a GPU session does not spend its time finding a broken script."""
import json
from pathlib import Path

import numpy as np
from script_runs import ROOT, SCRIPT_ENV, load_script, run_script

BENCH = ROOT / "benchmarks"
INTERPRET = {**SCRIPT_ENV, "TRITON_INTERPRET": "1"}   # the kernel benchmarks' Triton kernels in the interpreter


def made_up_stream(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    tokens = np.random.default_rng(0).integers(1, 300, 20_000).astype(np.uint16)
    np.save(data / "tokens.npy", tokens)
    (data / "meta.json").write_text(json.dumps({"vocab_size": 300, "tokens": len(tokens), "validation_tokens": 2_000, "eos": 0}))
    return data


def test_triforce_e2e_smoke(tmp_path):
    "The end-to-end run: every method at both temperatures on both prompts, greedy outputs equal plain decoding's."
    # in two processes, one context each (as on two GPUs), joined by `merge`: they train the same models
    data, out = made_up_stream(tmp_path), tmp_path / "result.json"
    for ctx in (256, 512):
        run_script(BENCH / "bench_triforce_e2e.py", "run", "--smoke", "--data", data, "--only", ctx, "--out",
                   tmp_path / f"part{ctx}.json", timeout=600)
    run_script(BENCH / "bench_triforce_e2e.py", "merge", "--parts", tmp_path / "part256.json", tmp_path / "part512.json",
               "--out", out)
    result = json.loads(out.read_text())
    assert [p["only"] for p in result["parts"]] == [[256], [512]]
    rows = result["rows"]
    assert {r["method"] for r in rows} == set(result["methods"])   # each method by its stable key, described once
    assert {(r["prompt"], r["temperature"]) for r in rows} == {(p, t) for p in ("held-out text", "far repeat") for t in (0.0, 0.6)}
    for row in rows:
        assert row["new_tokens"] > 0 and row["decode_s"] > 0 and row["setup_s"] >= 0
        assert row.get("same_as_plain", True)              # greedy: every method reproduces plain decoding exactly
        assert (row["temperature"] == 0) == ("same_as_plain" in row) or row["method"] == "plain"
    assert set(result["levels"]) == {str(c) for c in (256, 512)}
    for level in result["levels"].values():
        assert 0 < level["attention_share"]["retrieval cache"] <= level["attention_share"]["best tokens"] + 1e-6 <= 1 + 1e-6
        assert len(level["loss"]) == 2 and "whole context" in level["loss"]
        assert set(level["wall_ms"]) == set(result["passes"])


def test_triforce_e2e_compile_smoke(tmp_path):
    "`run --compile`: decoding with compiled layers, each step also timed with the eager layers; greedy is still lossless."
    out = tmp_path / "compiled.json"
    run_script(BENCH / "bench_triforce_e2e.py", "run", "--smoke", "--data", made_up_stream(tmp_path), "--only", 256,
               "--compile", "--out", out, timeout=900)
    result = json.loads(out.read_text())
    assert result["compiled_layers"] is True
    assert all(row.get("same_as_plain", True) for row in result["rows"])
    level = result["levels"]["256"]
    assert set(level["wall_ms"]) == set(level["wall_ms_eager_layers"]) == set(result["passes"])


def test_profile_triforce_steps_kinds():
    "The step profile (a GPU-only script) imports, and sorts kernel names into the kinds the chapter's table shows."
    prof = load_script(BENCH / "profile_triforce_steps.py")
    assert prof.kind_of("nvjet_sm90_tst_64x8_64x16_4x1_v_bz_TNT") == "matrix products"
    assert prof.kind_of("sparse_decode_attention_kernel") == prof.kind_of("combine_splits_kernel") == "attention (ours)"
    assert prof.kind_of("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled layers (fused)"
    assert prof.kind_of("void at::native::index_elementwise_kernel<128, 4>") == "other"


def test_cema_tiles_sweep_covers_the_landed_launch():
    "The CEMA tiles sweep (a GPU-only script) imports, and sweeps the tiles `TUNING` landed on (16 steps, the saved states')."
    sweep = load_script(BENCH / "cema_tiles_sweep.py")
    from tinylab.kernels.cema import TUNING
    assert (16, TUNING["block_d"], TUNING["num_warps"]) in sweep.TILES


def test_decode_tuning_sweep_grid():
    "The launch-settings sweep (a GPU-only script) imports, and sweeps only settings the every-chunk launch has."
    sweep = load_script(BENCH / "decode_tuning_sweep.py")
    from tinylab.kernels.sparse_decode_attention import TUNING
    assert set(sweep.GRID) <= set(TUNING["dense"]) and all(len(v) > 1 for v in sweep.GRID.values())
    assert all(TUNING["dense"][key] in values for key, values in sweep.GRID.items())   # the landed setting is swept


def test_scan_fwd_sequential_variant_interpreted():
    "The development variant of the scan forward (page 10a's negative result) matches the definition, in the interpreter."
    out = run_script(BENCH / "scan_fwd_sequential_variant.py", env=INTERPRET, timeout=600)
    assert "float32" in out and "bfloat16" in out


def test_triforce_e2e_diagnose_smoke(tmp_path):
    """The diagnose step (issue #21): losses with the whole context and the last 1K, attention shares, a far repeat
    and a needle; trained here with every option (a BOS sink, log-uniform skips, a copy batch after a copy warm-up)."""
    out = tmp_path / "diagnose.json"
    run_script(BENCH / "bench_triforce_e2e.py", "diagnose", "--smoke", "--data", made_up_stream(tmp_path), "--out", out,
               "--sink", "--log-skips", "--copy-batch", "4", "--copy-warmup", "5", "--warmup-lr", "1e-3", timeout=600)
    result = json.loads(out.read_text())
    tr = result["training"]
    assert tr["copy_prob"] > 0 and tr["sink"] and tr["log_skips"] and tr["copy_batch"] == 4 and tr["copy_window_final_loss"] > 0
    assert tr["warmup_lr"] == 1e-3 and tr["lr"] > 0
    assert 1 <= tr["copy_warmup_steps"] <= 5 and tr["copy_warmup_final_loss"] > 0
    assert set(result["contexts"]) == {"256", "512"}
    for row in result["contexts"].values():
        for kind in ("held-out text", "far repeat", "needle"):
            assert len(row[f"loss, {kind}"]) == 2
            assert 0 < row[f"attention share, {kind}"]["retrieval cache"] <= 1 + 1e-6
        greedy = row["needle, greedy"]
        assert greedy["same_as_plain"] and 0 <= greedy["copied"] <= greedy["new_tokens"]


def test_copy_warmup_runs_at_its_own_learning_rate():
    "The copy warm-up's steps use `warmup_lr`, not the stream's `lr` (a wide target needs a smaller one to copy)."
    import torch
    from transformers import LlamaForCausalLM
    e2e = load_script(BENCH / "bench_triforce_e2e.py")
    tokens = torch.randint(1, 100, (500,))
    for warmup_lr, moves in ((0.0, False), (1e-2, True)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(e2e.llama(100, 32, 1, 2, 4096, 0))
        before = [p.detach().clone() for p in model.parameters()]
        hist = e2e.train(model, tokens, 1, 2, 16, 0.0, 4096, 0, torch.device("cpu"), copy_batch=2, copy_window=16,
                         copy_warmup=3, warmup_lr=warmup_lr)            # the stream's one step at lr 0 changes nothing
        assert len(hist["warmup"]) == 3
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before)) == moves


def test_triforce_warmup_sweep_smoke():
    "The warm-up sweep behind triforce_warmup_h200.json runs, at toy size on the CPU, and reports its steps and loss."
    out = run_script(BENCH / "triforce_warmup_sweep.py", 32, 1, 2, 1e-3, 3, 4)
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert len(result) == 1 and "steps 3," in result[0]
    assert 6 < float(result[0].split("last-20 loss ")[1].split(",")[0]) < 9          # near ln 2048 = 7.62 at the start


def test_pose_windows_attend_across_the_cut():
    """Training forward as `train` calls it: with `position_ids` and no attention mask, transformers reads a jump in
    positions as the border of packed sequences unless it builds a cache (`use_cache`, on by default). A PoSE window
    must stay one sequence, or nothing after the cut can learn to read what is before it."""
    import torch
    from transformers import LlamaForCausalLM
    e2e = load_script(BENCH / "bench_triforce_e2e.py")
    torch.manual_seed(0)
    model = LlamaForCausalLM(e2e.llama(100, 32, 1, 2, 4096, 0)).train()
    x = torch.randint(1, 100, (2, 16))
    pos = torch.arange(16).expand(2, -1).clone()
    pos[:, 8:] += 1000                                    # the cut at 8, a skip of 1000
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 100                         # change one token before the cut
    after = lambda ids: model(input_ids=ids, position_ids=pos).logits[:, 8:]
    assert (after(x) - after(y)).abs().max() > 1e-6


def test_triforce_e2e_training_data():
    """The training options' data: blocks of random tokens each written twice in a row, PoSE skips at every scale
    with the first position 0, prompts that start with BOS, and a needle of random tokens repeated at the end."""
    import torch
    e2e = load_script(BENCH / "bench_triforce_e2e.py")
    g = torch.Generator().manual_seed(0)
    x = e2e.repeat_window(torch.zeros(300, dtype=torch.long), 50, g, lengths=(3, 9))
    assert x[0] == 0 and (x[1:] > 0).all()
    i = 1
    while i < len(x):                                     # walk the blocks: each one followed by its copy
        L = next(L for L in range(3, 10) if torch.equal(x[i:i + L][:len(x) - i - L], x[i + L:i + 2 * L]))
        i += 2 * L
    pos, cut = e2e.pose_positions(4000, 64, 100_000, g, log_skips=True)
    skips = pos[:, -1] - 63
    assert (pos[:, 0] == 0).all() and (skips >= 0).all() and skips.max() < 100_000 - 64 + 1
    assert (skips < 100).float().mean() > 0.25 and (skips > 10_000).float().mean() > 0.1   # short and long alike
    tokens = torch.arange(1, 1001)
    prompt = e2e.held_out_prompt(tokens, 200, 300, 0, 1, bos=0)
    assert prompt[0] == 0 and torch.equal(prompt[1:], tokens[-299:])
    p, rest, whole = e2e.repeat_prompt(prompt, passage=40, cue=8, needle=50)
    a = len(prompt) // 20
    assert torch.equal(p[-8:], whole[a:a + 8]) and torch.equal(rest, whole[a + 8:a + 40]) and (whole[a:a + 40] < 50).all()
    assert torch.equal(whole[-40:], whole[a:a + 40]) and len(p) == len(prompt)


def test_long_range_copies_land_after_the_cut():
    "copy_across_cut writes a passage of the first part into the second part, and nothing else changes."
    import torch
    e2e = load_script(BENCH / "bench_triforce_e2e.py")
    g = torch.Generator().manual_seed(0)
    x = torch.arange(8 * 65).view(8, 65)                 # every token distinct: a copy is visible
    _, cut = e2e.pose_positions(8, 64, 10_000, g)
    y = e2e.copy_across_cut(x.clone(), cut, 1.0, (4, 8), g)
    z = e2e.copy_across_cut(x.clone(), cut, 1.0, (4, 8), torch.Generator().manual_seed(1), vocab=50)
    assert ((z != x).sum(1) > 0).sum() >= 4 and (z[z != x] < 50).all()   # random passages: new tokens, copied
    changed = 0
    for row in range(8):
        diff = (y[row] != x[row]).nonzero().flatten()
        if len(diff) == 0:
            assert cut[row] < 4 or 65 - cut[row] < 4   # no room for the shortest passage on one side
            continue
        changed += 1
        assert diff.min() >= cut[row] and 4 <= len(diff) <= 8
        start, n = int(diff.min()), len(diff)
        src = (x[row] == y[row, start]).nonzero().item()  # where the copied passage came from
        assert src + n <= cut[row] and torch.equal(y[row, start:start + n], x[row, src:src + n])
    assert changed >= 4


def test_triforce_kernel_benchmark_smoke(tmp_path):
    "The kernel benchmark's --smoke path: the gate, SDPA with a causal_lower_right mask, the backend it chose."
    out = tmp_path / "kernel.json"
    run_script(BENCH / "bench_triforce.py", "--smoke", "--out", out, env=INTERPRET, timeout=600)
    result = json.loads(out.read_text())
    assert result["sdpa_mask"] == "causal_lower_right" and all(r["sdpa_backend"] for r in result["rows"])


def test_rvq_search_benchmark_smoke(tmp_path):
    "The RVQ search benchmark's --smoke path: every implementation checked against float64 before it is timed, a summary row."
    out = tmp_path / "rvq.json"
    run_script(BENCH / "bench_rvq_search.py", "--smoke", "--out", out, env=INTERPRET, timeout=600)
    result = json.loads(out.read_text())
    assert result["all_checks_passed"] and not result["errors"]
    assert {"kernel tf32", "kernel ieee", "addmm + argmin TF32"} <= {r["impl"] for r in result["rows"]}
    assert all(r["ms"] > 0 for r in result["rows"]) and result["summary"]
