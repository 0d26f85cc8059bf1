"""The compiled training step on a tiny model: one batched step over N adapters of different kinds
equals N single-adapter steps (losses and gradients within 1e-5 in float32), each slot's optimizer
equals optax run on that adapter alone (own clipping, LoRA+ ratio), gradient accumulation equals
one big batch, idle slots stay bitwise untouched, and the scan over layers equals llama.forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rtpjax.config import ModelConfig
from rtpjax.finetune import step as st
from rtpjax.finetune.adapters import family_tx
from rtpjax.layers.lora import LoraLayout, SlotParams, dora_norm
from rtpjax.weights.loader import load_params
from rtpjax.weights.safetensors_io import SafetensorsCheckpoint

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (kind, rank, scale, targets, lr, b ratio, max grad norm) of the three adapters.
ADAPTERS = [
    ("lora", 4, 2.0, ALL, 1e-2, 1.0, 0.05),
    ("dora", 2, 1.5, ("q_proj", "v_proj", "down_proj"), 5e-3, 1.0, 1e9),
    ("lora_plus", 3, 0.5, ("o_proj", "gate_proj"), 2e-3, 8.0, 1e9),
]
S = 16

lg = jax.jit(st.loss_and_grads, static_argnames=("opts",))
train = jax.jit(st.train_step, static_argnames=("opts",))


@pytest.fixture(scope="module")
def model(fixtures_dir):
    d = fixtures_dir / "models" / "llama3_gqa4"
    cfg = ModelConfig.from_hf(d)
    return cfg, load_params(SafetensorsCheckpoint(d), cfg, jnp.float32)


def layout(cfg, G):
    return LoraLayout(num_slots=G, rank=4, targets=ALL, num_layers=cfg.num_layers, dora=True)


def slot_params(specs):
    return SlotParams(
        scale=jnp.asarray([a[2] for a in specs], jnp.float32),
        rank=jnp.asarray([a[1] for a in specs], jnp.int32),
        dora=jnp.asarray([float(a[0] == "dora") for a in specs], jnp.float32),
        target_mask=jnp.asarray([[float(t in a[3]) for t in ALL] for a in specs]),
    )


def hyper(specs, ready):
    return st.SlotHyper(
        lr=jnp.asarray([a[4] for a in specs], jnp.float32),
        b_lr_ratio=jnp.asarray([a[5] for a in specs], jnp.float32),
        max_grad_norm=jnp.asarray([a[6] for a in specs], jnp.float32),
        family=jnp.zeros(len(specs), jnp.int32),
        ready=jnp.asarray(ready, jnp.float32),
        rank_mask=jnp.asarray([[float(r < a[1]) for r in range(4)] for a in specs]),
    )


def random_weights(cfg, specs, seed=0):
    """f32[G, P]: random A, B (live ranks and targets only), DoRA magnitudes near ‖W‖."""
    lay = layout(cfg, len(specs))
    rng = np.random.default_rng(seed)
    bank = lay.zeros(cfg)
    out = []
    for layer in bank:
        row = {}
        for t, w in layer.items():
            a = 0.1 * rng.standard_normal(w.a.shape)
            b = 0.1 * rng.standard_normal(w.b.shape)
            for g, spec in enumerate(specs):
                live = (np.arange(4) < spec[1]) * float(t in spec[3])
                a[g] *= live[None, :]
                b[g] *= live[:, None]
            m = rng.uniform(0.5, 1.5, w.m.shape)
            row[t] = w.replace(
                a=jnp.asarray(a, jnp.float32),
                b=jnp.asarray(b, jnp.float32),
                m=jnp.asarray(m, jnp.float32),
            )
        out.append(row)
    return lay.flatten(out)


def rows_of(g, n, seed):
    rng = np.random.default_rng(seed + 100 * g)
    out = []
    for _i in range(n):
        k = int(rng.integers(8, S + 1))
        inputs = rng.integers(0, 256, k).astype(np.int32)
        out.append(
            {
                "inputs": inputs,
                "targets": rng.integers(0, 256, k).astype(np.int32),
                "mask": (rng.random(k) < 0.6).astype(np.float32),
                "segments": np.ones(k, np.int32),
                "positions": np.arange(k, dtype=np.int32),
            }
        )
    return out


def batch(parts, B=None):
    """Rows sorted by slot, padded to [B, S]; weights = mask / the slot's target tokens."""
    n = sum(len(r) for _, r in parts)
    B = B or n
    out = {k: np.zeros((B, S), np.int32) for k in ("tokens", "targets", "positions", "segments")}
    weights = np.zeros((B, S), np.float32)
    row_slot = np.full(B, -1, np.int32)
    i = 0
    for slot, rows in parts:
        norm = sum(r["mask"].sum() for r in rows)
        for r in rows:
            k = len(r["inputs"])
            out["tokens"][i, :k], out["targets"][i, :k] = r["inputs"], r["targets"]
            out["positions"][i, :k], out["segments"][i, :k] = r["positions"], r["segments"]
            weights[i, :k] = r["mask"] / norm
            row_slot[i] = slot
            i += 1
    return st.Batch(
        out["tokens"], out["targets"], weights, out["positions"], out["segments"], row_slot
    )


def test_batched_equals_separate_single_adapter_steps(model):
    cfg, params = model
    base = st.stack_layers(params)
    G = len(ADAPTERS)
    flat = random_weights(cfg, ADAPTERS)
    rows = {g: rows_of(g, 2, seed=1) for g in range(G)}
    opts = st.StepOptions(cfg=cfg, layout=layout(cfg, G), lora_impl="xla")
    loss, grads = lg(
        flat, base, slot_params(ADAPTERS), batch(list(rows.items()), B=8), None, opts=opts
    )
    single = st.StepOptions(cfg=cfg, layout=layout(cfg, 1), lora_impl="xla")
    for g, spec in enumerate(ADAPTERS):
        loss1, grads1 = lg(
            flat[g : g + 1], base, slot_params([spec]), batch([(0, rows[g])]), None, opts=single
        )
        assert abs(float(loss[g]) - float(loss1[0])) < 1e-5
        np.testing.assert_allclose(np.asarray(grads[g]), np.asarray(grads1[0]), atol=1e-5, rtol=0)
        assert float(jnp.abs(grads1[0]).max()) > 1e-2  # a real gradient, not zeros
    # Each slot's loss is the mean over its own target tokens: check one directly.
    ce, _ = jax.jit(st.per_token, static_argnames=("opts",))(
        base, flat[2:3], slot_params([ADAPTERS[2]]), batch([(0, rows[2])]), None, single
    )
    m = np.concatenate([r["mask"] for r in rows[2]])
    ce = np.asarray(ce).reshape(2, S)
    per_row = [ce[i, : len(r["mask"])] for i, r in enumerate(rows[2])]
    np.testing.assert_allclose(float(loss[2]), np.concatenate(per_row) @ m / m.sum(), rtol=1e-5)


def _reference_update(cfg, w_flat, g_flat, spec):
    """optax on one adapter alone: clip by its own global norm, adamw; LoRA+ gives B its own
    learning rate through optax.multi_transform."""
    lay = layout(cfg, 1)
    w = lay.unflatten(w_flat[None], cfg)
    g = lay.unflatten(g_flat[None], cfg)
    labels = jax.tree.map(lambda _: "a", w)
    labels = [{t: lw.replace(b="b") for t, lw in layer.items()} for layer in labels]
    lr, ratio, clip = spec[4], spec[5], spec[6]
    tx = optax.chain(
        optax.clip_by_global_norm(clip),
        optax.multi_transform(
            {
                "a": optax.adamw(lr, weight_decay=0.0),
                "b": optax.adamw(lr * ratio, weight_decay=0.0),
            },
            labels,
        ),
    )
    updates, _ = tx.update(g, tx.init(w), w)
    return lay.flatten(optax.apply_updates(w, updates))[0]


def test_per_slot_optimizers_match_optax_on_each_adapter_alone(model):
    cfg, params = model
    base = st.stack_layers(params)
    G = len(ADAPTERS)
    lay = layout(cfg, G)
    opts = st.StepOptions(cfg=cfg, layout=lay, lora_impl="xla")
    flat = random_weights(cfg, ADAPTERS)
    state = st.init_state(opts).replace(weights=flat)
    rows = {g: rows_of(g, 2, seed=2) for g in range(G)}
    b = batch(list(rows.items()), B=8)
    slots = slot_params(ADAPTERS)
    _, grads = lg(flat, base, slots, b, None, opts=opts)
    new, metrics = train(
        base, state, b, slots, hyper(ADAPTERS, [1, 1, 1]), jax.random.key(0), opts=opts
    )
    mask = st.trainable_mask(opts, slots, hyper(ADAPTERS, [1, 1, 1]))
    for g, spec in enumerate(ADAPTERS):
        want = _reference_update(cfg, flat[g], grads[g] * mask[g], spec)
        np.testing.assert_allclose(np.asarray(new.weights[g]), np.asarray(want), atol=1e-6)
        norm = float(jnp.linalg.norm(grads[g] * mask[g]))
        assert abs(float(metrics["grad_norm"][g]) - norm) < 1e-4 * norm
    assert float(metrics["grad_norm"][0]) > ADAPTERS[0][6]  # slot 0's clipping was active
    # Frozen parameters stay put: columns past each rank, untargeted projections.
    frozen = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(new.weights)[frozen], np.asarray(flat)[frozen])
    assert np.all(np.asarray(new.grads) == 0) and np.all(np.asarray(new.loss) == 0)


def test_accumulation_and_idle_slots(model):
    cfg, params = model
    base = st.stack_layers(params)
    G = len(ADAPTERS)
    opts = st.StepOptions(cfg=cfg, layout=layout(cfg, G), lora_impl="xla")
    flat = random_weights(cfg, ADAPTERS, seed=3)
    slots = slot_params(ADAPTERS)
    state = st.init_state(opts).replace(weights=flat)
    rows = rows_of(0, 4, seed=3)
    key = jax.random.key(0)
    # One step over 4 rows of slot 0, against two micro-steps of 2 rows (weights normalised by
    # the whole optimizer step's target tokens, as the trainer does).
    full, _ = train(
        base, state, batch([(0, rows)], B=8), slots, hyper(ADAPTERS, [1, 0, 0]), key, opts=opts
    )
    norm = sum(r["mask"].sum() for r in rows)
    halves = []
    for part in (rows[:2], rows[2:]):
        bt = batch([(0, part)], B=8)
        scale = sum(r["mask"].sum() for r in part) / norm
        halves.append(bt._replace(weights=bt.weights * scale))
    mid, _m1 = train(base, state, halves[0], slots, hyper(ADAPTERS, [0, 0, 0]), key, opts=opts)
    np.testing.assert_array_equal(np.asarray(mid.weights), np.asarray(flat))  # nothing applied
    end, _m2 = train(base, mid, halves[1], slots, hyper(ADAPTERS, [1, 0, 0]), key, opts=opts)
    np.testing.assert_allclose(np.asarray(end.weights), np.asarray(full.weights), atol=1e-6)
    # Slots 1 and 2 had no rows and were not ready: bitwise untouched, optimizer states too.
    np.testing.assert_array_equal(np.asarray(end.weights[1:]), np.asarray(flat[1:]))
    for leaf_end, leaf_start in zip(jax.tree.leaves(end.opt), jax.tree.leaves(state.opt)):
        np.testing.assert_array_equal(np.asarray(leaf_end[1:]), np.asarray(leaf_start[1:]))
    assert int(end.opt["adamw"].count[0]) == 1


def test_scan_and_remat_equal_llama_forward(model):
    cfg, params = model
    G = len(ADAPTERS)
    flat = random_weights(cfg, ADAPTERS, seed=4)
    b = batch([(g, rows_of(g, 2, seed=4)) for g in range(G)], B=8)
    slots = slot_params(ADAPTERS)
    f = jax.jit(st.per_token, static_argnames=("opts",))
    opts = st.StepOptions(cfg=cfg, layout=layout(cfg, G), lora_impl="xla")
    ref, _ = f(params, flat, slots, b, None, opts)  # list of layers: llama.forward
    scan, _ = f(st.stack_layers(params), flat, slots, b, None, opts)
    remat = st.StepOptions(cfg=cfg, layout=layout(cfg, G), lora_impl="xla", remat=True)
    scan_remat, _ = f(st.stack_layers(params), flat, slots, b, None, remat)
    np.testing.assert_allclose(np.asarray(scan), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(scan_remat), np.asarray(ref), atol=1e-5)


def test_dora_norm_without_materialising():
    rng = np.random.default_rng(5)
    G, n_in, R, n_out = 3, 12, 4, 7
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    a = rng.standard_normal((G, n_in, R)).astype(np.float32)
    b = rng.standard_normal((G, R, n_out)).astype(np.float32)
    s = np.array([0.5, 2.0, 0.0], np.float32)
    want = np.stack([np.linalg.norm(w + s[g] * (a[g] @ b[g]).T, axis=1) for g in range(G)])
    np.testing.assert_allclose(np.asarray(dora_norm(w, a, b, s)), want, rtol=1e-5)


def test_optimizer_families_shape():
    flat = jnp.zeros((5,))
    for name in ("adamw", "sgd", "lion"):
        s = family_tx(name).init(flat)
        assert "learning_rate" in s.hyperparams
