"""tinylab.combo (nbs/42_combo.ipynb): the grid world's rules, partial views, the scripted stand-ins, the composition
rule and the composed DDIM step against diffusers' DDIMScheduler, the composed loss with agent-dependent scaling, the
tree search's shape, checkpoints, bad inputs, and benchmarks/train_combo.py on its CPU --smoke path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tinylab.combo as C

ROOT = Path(__file__).resolve().parents[1]
UP, DOWN, LEFT, RIGHT, STAY = 1, 2, 3, 4, 0


def world(agents, boxes, colors=None):
    agents = np.array(agents, dtype=np.int64).reshape(-1, 2)
    colors = np.arange(len(agents)) if colors is None else np.array(colors)
    return C.World(agents, colors, np.array(boxes, dtype=np.int64).reshape(-1, 2))


# ---- the world's rules
@pytest.mark.parametrize("agents,boxes,actions,agents_after,boxes_after,delivered", [
    pytest.param([[3, 2]], [], [LEFT], [[3, 1]], [], 0, id="move"),
    pytest.param([[3, 1]], [], [LEFT], [[3, 1]], [], 0, id="wall"),
    pytest.param([[1, 3]], [], [UP], [[1, 3]], [], 0, id="wall-above-goal-row"),
    pytest.param([[4, 3]], [[3, 3]], [UP], [[3, 3]], [[2, 3]], 0, id="push"),
    pytest.param([[3, 3]], [[2, 3]], [UP], [[2, 3]], [], 1, id="push-into-goal-delivers"),
    pytest.param([[4, 3]], [[3, 3], [2, 3]], [UP], [[4, 3]], [[3, 3], [2, 3]], 0, id="push-into-box-fails"),
    pytest.param([[6, 3]], [[5, 3]], [DOWN], [[6, 3]], [[5, 3]], 0, id="stay"),
    pytest.param([[3, 2], [3, 4]], [], [RIGHT, LEFT], [[3, 2], [3, 4]], [], 0, id="two-claim-one-cell"),
    pytest.param([[3, 2], [3, 3]], [], [RIGHT, RIGHT], [[3, 2], [3, 4]], [], 0, id="no-following-into-a-held-cell"),
    pytest.param([[4, 3], [3, 2]], [[3, 3]], [UP, RIGHT], [[4, 3], [3, 2]], [[3, 3]], 0, id="two-push-one-box"),
    pytest.param([[4, 3], [2, 2]], [[3, 3]], [UP, RIGHT], [[4, 3], [2, 2]], [[3, 3]], 0, id="box-and-agent-claim-one-cell"),
])
def test_step_rules(agents, boxes, actions, agents_after, boxes_after, delivered):
    w = C.step(world(agents, boxes), actions)
    assert w.agents.tolist() == agents_after
    assert w.boxes.reshape(-1, 2).tolist() == boxes_after
    assert w.delivered == delivered and w.t == 1


def test_step_bad_actions():
    w = world([[3, 2], [4, 4]], [])
    for bad in ([UP], [UP, 5], [UP, -1]):
        with pytest.raises(ValueError, match="actions: expected 2"):
            C.step(w, bad)


def test_random_world_and_render_roundtrip():
    rng = np.random.default_rng(0)
    for k in (1, 2, 3, 4):
        w = C.random_world(k, k, rng)
        cells = [tuple(p) for p in np.concatenate([w.agents, w.boxes])]
        assert len(set(cells)) == 2 * k
        assert all(2 <= r <= 5 for r, _ in w.boxes)
        assert not any((r + 1, c) in set(map(tuple, w.boxes)) for r, c in w.boxes)   # no box above another
        f = C.render(w)
        assert f.shape == (3, C.SIZE, C.SIZE) and f.min() >= -1 and f.max() <= 1
        assert (C.parse(f[None])[0] == w.grid()).all()
        r = C.read_world(f, w.colors)
        assert (r.agents == w.agents).all() and sorted(map(tuple, r.boxes)) == sorted(map(tuple, w.boxes))
    with pytest.raises(ValueError, match="n_agents"):
        C.random_world(0, 1, rng)
    with pytest.raises(ValueError, match="frames: expected"):
        C.parse(torch.zeros(3, C.SIZE, C.SIZE))


def test_partial_view():
    w = world([[1, 1], [6, 6]], [[4, 4]])
    v, m = C.observe(w, 0, radius=2)
    cells = torch.nn.functional.avg_pool2d(m, C.CELL)[0]
    assert cells[:4, :4].eq(1).all() and cells[4:, :].eq(0).all() and cells[:, 4:].eq(0).all()   # rows and columns 0..3: clipped at the border
    assert v[:, m[0] == 0].abs().sum() == 0
    assert torch.equal(v[:, m[0] == 1], C.render(w)[:, m[0] == 1])
    # the other agent and the box are out of agent 0's view
    assert C.parse(v[None])[0][6, 6] != C.AGENT0 + 1 and C.parse(v[None])[0][4, 4] != C.BOX


def test_expert_solves_episodes():
    solved = 0
    for s in range(6):
        w = C.random_world(2, 2, np.random.default_rng(s))
        for _ in range(25):
            w = C.step(w, C.expert_actions(w))
        solved += w.done
    assert solved >= 5


def test_stand_ins_read_a_world():
    w = world([[3, 2], [5, 5]], [[2, 2], [4, 5]])
    assert C.assignment(w).tolist() == [0, 1]
    assert C.propose(w, 0, 3)[0] == UP and len(set(C.propose(w, 0, 3))) == 3
    assert C.intents(w, 0).tolist() == [0, UP]
    assert C.cost(C.step(w, [UP, UP])) < C.cost(w)
    # path lengths go around boxes: an agent right above its box must walk round it
    w2 = world([[2, 3]], [[3, 3]])
    assert C.distances(w2)[0, 0] == 4


# ---- composition and the DDIM step
def test_compose_eps_hand_case():
    e = torch.zeros(3, 1, 1, 1, 2)
    e[0] = 1.0; e[1, ..., 0] = 2.0; e[1, ..., 1] = 1.0; e[2, ..., 0] = 1.0; e[2, ..., 1] = 4.0
    torch.testing.assert_close(C.compose_eps(e, 5.0).flatten(), torch.tensor([6.0, 16.0]))
    torch.testing.assert_close(C.compose_eps(e, torch.tensor([1.0, 2.0])).flatten(), torch.tensor([2.0, 7.0]))
    m = C.presence_masks(torch.tensor([1]), 2, (1, 2))
    assert m.shape == (2, 1, 1, 1, 2) and m[0].eq(1).all() and m[1].eq(0).all()
    torch.testing.assert_close(C.compose_eps(e, 1.0, m).flatten(), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match="eps: expected"):
        C.compose_eps(e[0], 1.0)
    with pytest.raises(ValueError, match="masks: expected"):
        C.compose_eps(e, 1.0, torch.ones(1, 1, 1, 1, 2))


@pytest.mark.parametrize("K,B", [(1, 1), (3, 5)])
def test_composed_step_equals_ddim_scheduler(K, B):
    _, ddim = C.noise_schedulers(100)
    ddim.set_timesteps(10)
    g = torch.Generator().manual_seed(K)
    eps, x = torch.randn(K + 1, B, 3, C.SIZE, C.SIZE, generator=g), torch.randn(B, 3, C.SIZE, C.SIZE, generator=g)
    masks = C.presence_masks(torch.randint(1, K + 1, (B,), generator=g), K, (C.SIZE, C.SIZE))
    for t in ddim.timesteps:
        ab_t, ab_prev = C._alpha_bars(ddim, int(t), 10)
        ours = C.composed_ddim_step(x, eps, ab_t, ab_prev, 5.0, masks)
        ref = ddim.step(C.compose_eps(eps, 5.0, masks), t, x).prev_sample
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


# ---- training losses
def test_influence_scale():
    sc = C.influence_scale(torch.tensor([[[3, 3], [6, 6]]]), radius=2, factor=2.0)
    assert sc.shape == (2, 1, 1, C.SIZE, C.SIZE)
    cell = lambda i, r, c: sc[i, 0, 0, r * C.CELL, c * C.CELL].item()
    assert cell(0, 3, 3) == 2 and cell(0, 5, 5) == 2 and cell(0, 6, 6) == 1 and cell(1, 6, 6) == 2 and cell(1, 3, 3) == 1


def test_composed_loss_with_scaling():
    noise = torch.zeros(1, 3, 2, 2)
    eps_i = torch.stack([torch.ones(1, 3, 2, 2), -torch.ones(1, 3, 2, 2)])
    assert C.composed_loss(eps_i, noise).item() == pytest.approx(2.0)
    scale = torch.ones(2, 1, 1, 2, 2); scale[0, ..., 0, 0] = 2.0
    assert C.composed_loss(eps_i, noise, scale).item() == pytest.approx(2.25)
    # the composed term sees the average: predictions off in opposite directions cancel there only
    eps_same = torch.stack([torch.ones(1, 3, 2, 2)] * 2)
    assert C.composed_loss(eps_same, noise).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="eps_i: expected"):
        C.composed_loss(eps_i[0], noise)


def test_every_transition_of_every_team_size_can_be_drawn():
    rng = np.random.default_rng(0)
    data = [C.rollouts(2, 1, rng), C.rollouts(3, 2, rng), C.rollouts(2, 3, rng), C.rollouts(1, 4, rng)]
    assert len(set(map(len, data))) == len(data)              # different lengths, so a shared index range would miss some
    seen = [set() for _ in data]
    for s, (d, idx) in enumerate(C._team_batches(data, 400, 16, torch.Generator().manual_seed(0))):
        assert d is data[s % len(data)] and int(idx.max()) < len(d)
        seen[s % len(data)].update(idx.tolist())
    assert [len(x) for x in seen] == [len(d) for d in data]


def test_training_steps_run():
    rng = np.random.default_rng(0)
    d1, d2 = C.rollouts(2, 1, rng), C.rollouts(2, 2, rng)
    wm = C.WorldModel((16, 32))
    assert len(C.train_single(wm, [d1, d2], 2, 4)) == 2
    assert len(C.finetune_composed(wm, d2, 1, 4, scaled=True)) == 1
    assert len(C.train_joint(C.WorldModel((16, 32)), [d1, d2], 1, 4)) == 1
    with pytest.raises(ValueError, match="at most 4 agents"):
        C.joint_tokens(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))


# ---- planning
def test_tree_search_shape():
    w = world([[3, 2], [5, 5]], [[2, 2], [4, 5]])
    sim = lambda nodes, joint, pids: [C.step(n, a) for n, a in zip(nodes, joint)]
    calls = []
    def counting(nodes, joint, pids):
        calls.append(len(nodes)); return sim(nodes, joint, pids)
    acts, ex = C.tree_search([C.Problem(w, 0, w.colors), C.Problem(w, 1, w.colors)], counting, lambda n, c: n)
    assert ex == [3, 9, 9] and calls == [6, 18, 18]          # 3 x 3 x 3: all of a level in one call
    assert acts.tolist() == [UP, UP]
    assert C.tree_search([C.Problem(w, 0, w.colors)], sim, lambda n, c: n, 2, 1, 3)[1] == [2, 2, 2]
    with pytest.raises(ValueError, match="n_propose"):
        C.tree_search([C.Problem(w, 0, w.colors)], sim, lambda n, c: n, 0)


def test_planners_and_episodes():
    r = C.run_episodes(C.Planner("oracle"), 2, 2, max_steps=20, seed=5)
    assert r["success"].tolist() == [1.0, 1.0] and (r["steps"] < 20).all()
    rr = C.run_episodes(C.Planner("random", seed=0), 2, 2, max_steps=3, seed=5)
    assert rr["steps"].tolist() == [3.0, 3.0]
    wm, est = C.WorldModel((16, 32)), C.StateEstimator((16, 32))
    p = C.Planner("combo", wm=wm, est=est, ddim_steps=1, n_propose=2, beam=1, horizon=2)
    out = C.run_episodes(p, 2, 1, max_steps=1, seed=0)
    assert out["steps"].tolist() == [1.0] and p.stats["expansions"] == [[2.0, 2.0]]
    with pytest.raises(ValueError, match="kind must be"):
        C.Planner("psychic")
    with pytest.raises(ValueError, match="needs a state estimator"):
        C.Planner("greedy")
    with pytest.raises(ValueError, match="needs a world model"):
        C.Planner("combo", est=est)
    se = C.Planner("search-est", est=est, ddim_steps=1, n_propose=2, beam=2, horizon=2)
    out = C.run_episodes(se, 2, 1, max_steps=1, seed=0)
    assert out["steps"].tolist() == [1.0] and se.stats["expansions"] == [[2.0, 4.0]]
    with pytest.raises(ValueError, match="needs a state estimator"):
        C.Planner("search-est")


def test_episode_ids_and_bootstrap():
    d = C.rollouts(3, 2, np.random.default_rng(0))
    assert d.episode.tolist() == sorted(d.episode.tolist()) and d.episode.max().item() == 2
    short = C.rollouts(3, 2, np.random.default_rng(0), max_transitions=1)
    assert torch.equal(short.cur, d.cur[:len(short)]) and short.episode.max().item() == 0
    iv = C.episode_bootstrap([1, 1, 1, 0, 0, 0], [0] * 6, [0, 0, 0, 1, 1, 1])
    assert (iv.estimate, iv.low, iv.high) == (0.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="one length"):
        C.episode_bootstrap([1, 0], [0, 0], [0])


def test_estimator_keeps_what_is_seen_and_checkpoint_roundtrip(tmp_path):
    wm, est = C.WorldModel((16, 32)), C.StateEstimator((16, 32))
    w = C.random_world(3, 3, np.random.default_rng(1))
    v, m, who = C.views([w])
    out = est.estimate(v, m, steps=2)
    assert torch.equal(out[m.expand_as(out) > 0], v[m.expand_as(v) > 0]) and who == [(0, 0), (0, 1), (0, 2)]
    C.save_models(tmp_path, wm, est, {"script": "test"})
    wm2, est2, prov = C.load_models(tmp_path)
    assert prov["script"] == "test"
    x, cur = torch.randn(2, 3, C.SIZE, C.SIZE), torch.randn(2, 3, C.SIZE, C.SIZE)
    args = (x, torch.tensor([3, 50]), cur, torch.tensor([[0], [4]]), torch.tensor([[1], [5]]))
    with torch.no_grad():
        assert torch.equal(wm(*args), wm2(*args))
        torch.testing.assert_close(est(x, torch.tensor([3, 50]), cur, torch.ones(2, 1, C.SIZE, C.SIZE)),
                                   est2(x, torch.tensor([3, 50]), cur, torch.ones(2, 1, C.SIZE, C.SIZE)), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["estimator.json", "estimator.safetensors", "provenance.json",
                                                          "tokens.safetensors", "unet.json", "unet.safetensors"]   # flat
    with pytest.raises(FileNotFoundError, match="expected unet.json"):
        C.load_models(tmp_path / "nothing")


def test_train_combo_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_combo.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    rec = json.loads((tmp_path / "combo_h200.json").read_text())
    for key in ("device", "date", "torch", "commit", "args", "prediction", "planning"):
        assert key in rec
    assert set(rec["planning"]["2"]) == {"random", "greedy", "search-est", "COMBO", "oracle"}
    assert rec["sampler"] == "per-team indices" and set(rec["estimation"]) == {"1", "2", "3", "4"}
    assert "1/K" in rec["training"]["weight_sweep"]
    assert all(len(rec["test_episodes"][k]) == len(rec["prediction"]["joint (baseline)"][k]["exact"]) for k in ("1", "2", "3", "4"))
    assert "joint (baseline)" in rec["prediction"] and set(rec["prediction"]["joint (baseline)"]) == {"1", "2", "3", "4"}
    wm, est, prov = C.load_models(tmp_path)
    for key in ("commit", "script", "args", "steps", "device", "date"):
        assert key in prov
