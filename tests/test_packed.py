"""Packed training (memnas_jax.template, template_network, packed): one program, many candidates.

The equivalence tests train three different candidates of one round (a grown concat cell, an op
trim, an edge trim) packed and alone, from the same initial variables and keys, and compare
per-epoch losses, final parameters and accuracies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cpu_only  # tests/ is on sys.path (rootdir conftest)

from memnas_jax import data as data_lib
from memnas_jax import network, packed, train, transfers
from memnas_jax.encoding import Architecture, Cell
from memnas_jax.space import cifar_skeleton
from memnas_jax.template import RoundTemplate
from memnas_jax.template_network import (
    TemplateNetwork,
    embed_variables,
    extract_variables,
    flatten_paths,
    mask_to_candidate,
    real_shapes,
    unflatten_paths,
)
from memnas_jax.train.programs import training_setup

# Three blocks (the middle one stride 2, where the block input is read at stride 2 and the cells at
# stride 1), so that the template compiles in seconds.
SKELETON = cifar_skeleton(4).replace(image_size=16, num_classes=4, widths=(4, 4, 4),
                                     strides=(1, 2, 1))
# A base of two add cells per block; the second reads the first, so unlinking cell 1 is a trim.
BASE_CELL1 = Cell(0, 0, 6, 0, linked=True, concat=False)
BASE_CELL2 = Cell(1, 0, 1, 5, linked=True, concat=False)


def _arch(blocks) -> Architecture:
    return Architecture(tuple(tuple(b) for b in blocks))


BASE = [[BASE_CELL1, BASE_CELL2]] * 3
GROW_CONCAT = _arch([b + [Cell(2, 0, 4, 3, linked=True, concat=True)] for b in BASE])
TRIM_OP = _arch([*BASE[:2], [BASE_CELL1, BASE_CELL2._replace(op1=None)]])
TRIM_EDGE = _arch([[BASE_CELL1._replace(linked=False), BASE_CELL2], *BASE[1:]])
THREE = [GROW_CONCAT, TRIM_OP, TRIM_EDGE]


def _config(**overrides):
    config = train.default_config()
    # lr 0.01: at 0.05 these nets train chaotically, and float32 rounding alone (one step
    # agrees to 1e-6) grows to 1e-1 in some BatchNorm biases within four steps.
    config.update(dict(epochs=2, batch_size=32, eval_batch_size=64, learning_rate=0.01,
                       milestones=(), num_devices=1, depthwise_impl="xla", weight_decay=5e-4))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def synthetic():
    return data_lib.synthetic_dataset(num_train=128, num_validation=64, num_test=64,
                                      image_shape=(16, 16, 3), num_classes=4)


@pytest.fixture(scope="module")
def alone(synthetic):
    """The three candidates trained alone, each from key i."""
    return [train.train_candidate(a, _config(), synthetic, jax.random.key(i), skeleton=SKELETON)
            for i, a in enumerate(THREE)]


@pytest.fixture(scope="module")
def programs():
    """Compiled packed programs by (selection, pack size), shared by the module's tests."""
    return {}


def _programs(cache, synthetic, selection, pack):
    if (selection, pack) not in cache:
        template = RoundTemplate.from_architectures(THREE, SKELETON)
        cache[selection, pack] = packed.compile_packed(template, _config(), synthetic, pack,
                                                       selection)
    return cache[selection, pack]


def _standalone_init(arch, config, data, key):
    """The variables `train.train_candidate` starts `arch` from with `key` (its init program,
    without compiling the rest)."""
    setup = training_setup(train.candidate_network(arch, config, data, SKELETON), config, data)
    key = np.asarray(jax.random.key_data(key))
    init = jax.jit(setup.steps.init_fn((1, *data.image_shape))).lower(key).compile(
        compiler_options={"xla_backend_optimization_level": 0})  # as train's (values differ)
    state = init(key)
    return {"params": state.params, "batch_stats": state.batch_stats}


def _assert_close(packed_result, alone, rtol=1e-4):
    assert packed_result.status == alone.status == "ok", (packed_result.message, alone.message)
    np.testing.assert_allclose(packed_result.loss_curve, alone.loss_curve, rtol=rtol)
    assert packed_result.val_accuracy_curve == alone.val_accuracy_curve
    assert packed_result.test_accuracy == alone.test_accuracy
    assert packed_result.param_count == alone.param_count
    ours, theirs = flatten_paths(packed_result.variables), flatten_paths(alone.variables)
    assert set(ours) == set(theirs)
    # Relative to each array's norm. A conv bias followed by BatchNorm has an exactly zero
    # gradient in exact arithmetic, so it holds float32 rounding noise (~1e-7) that no relative
    # bound fits: those differ by at most 1e-6 per entry.
    for path in theirs:
        a, b = np.asarray(ours[path], np.float64), np.asarray(theirs[path], np.float64)
        bound = rtol * np.linalg.norm(b) + 1e-6 * np.sqrt(b.size)
        assert np.linalg.norm(a - b) <= bound, (path, np.linalg.norm(a - b), bound)


def test_template_covers_the_round():
    template = RoundTemplate.from_architectures(THREE, SKELETON)
    block1 = template.blocks[0]
    assert len(block1.cells) == 3 and block1.cells[2].channels == 8  # the grown concat cell
    assert block1.static_links is None  # links differ in block 1 (edge trim, grown cell)
    assert block1.out_channels == 4 + 4 + 8
    # Block 2 (stride 2): the grown cell reads the block input at stride 2 (op1) and cell 2 at
    # stride 1 (op2), each its own input group.
    assert [g.stride for g in template.blocks[1].cells[2].branches[0].groups] == [1]
    assert [g.stride for g in template.blocks[1].cells[1].branches[1].groups] == [2]
    # Branch 1 of cell 2 in block 3 reads cell 1 (4 channels, stride 1): max pool, or removed
    # (the identity).
    alts = template.blocks[2].cells[1].branches[0].alternatives
    assert [(a.op, a.is_identity) for a in alts] == [(1, False), (None, True)]
    code = template.code(TRIM_EDGE)
    assert list(code["b0_output"][:5]) == [4, 5, 6, 7, 16]  # only cell 2, then the zero channel
    with pytest.raises(ValueError, match="not in this round template"):
        RoundTemplate.from_architectures([GROW_CONCAT], SKELETON).code(TRIM_OP)


def _forward_and_grads(apply):
    """(variables, x, *code) -> eval logits and the gradient of the summed train-mode logits,
    jitted (one compile for every candidate of a template)."""
    @jax.jit
    def run(variables, x, *code):
        def loss(params):
            return apply({"params": params, "batch_stats": variables["batch_stats"]}, x, *code,
                         train=True, mutable=["batch_stats"])[0].sum()
        return apply(variables, x, *code), jax.grad(loss)(variables["params"])
    return run


@pytest.mark.parametrize("selection", ["select", "switch"])
def test_template_network_computes_each_candidate(selection):
    template = RoundTemplate.from_architectures(THREE, SKELETON)
    module = TemplateNetwork(template, selection=selection)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    run = _forward_and_grads(module.apply)
    for arch in THREE:
        model, variables = network.init_network(jax.random.key(2), arch, SKELETON)
        ours = embed_variables(module, arch, variables)
        code = {k: jnp.asarray(v) for k, v in template.code(arch).items()}
        logits, grads = run(ours, x, code)
        own_logits, own = _forward_and_grads(model.apply)(variables, x)
        np.testing.assert_allclose(logits, own_logits, rtol=1e-5, atol=1e-5)
        back = {"params": grads, "batch_stats": ours["batch_stats"]}
        extracted = extract_variables(module, arch, back)["params"]
        for a, b in zip(jax.tree.leaves(extracted), jax.tree.leaves(own)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        # Everything outside the candidate's own parameters gets exactly zero gradient.
        reembedded = embed_variables(module, arch, {"params": extracted,
                                                    "batch_stats": variables["batch_stats"]})
        for a, b in zip(jax.tree.leaves(reembedded["params"]), jax.tree.leaves(grads)):
            assert np.array_equal(a, np.asarray(b))


def test_a_nan_in_an_unused_alternative_does_not_leak():
    template = RoundTemplate.from_architectures(THREE, SKELETON)
    module = TemplateNetwork(template, selection="select")
    arch = TRIM_OP
    model, variables = network.init_network(jax.random.key(2), arch, SKELETON)
    ours = flatten_paths(embed_variables(module, arch, variables))
    planted = 0
    for path in ours:  # the grown cell's alternatives: TRIM_OP does not run them
        if "cell3_op1" in path and path.startswith("params"):
            ours[path] = np.full_like(ours[path], np.nan)
            planted += 1
    assert planted
    ours = unflatten_paths(ours)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    code = {k: jnp.asarray(v) for k, v in template.code(arch).items()}
    out, grads = _forward_and_grads(module.apply)(ours, x, code)
    own_out, own_grads = _forward_and_grads(model.apply)(variables, x)
    np.testing.assert_allclose(out, own_out, rtol=1e-5, atol=1e-5)
    # The candidate's own gradients are finite and its standalone ones (the NaNs stay in the
    # unused alternative's own, which never reach an output).
    extracted = extract_variables(module, arch, {"params": grads,
                                                 "batch_stats": ours["batch_stats"]})["params"]
    for a, b in zip(jax.tree.leaves(extracted), jax.tree.leaves(own_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_initialisation_follows_each_candidates_initialisers():
    template = RoundTemplate.from_architectures(THREE, SKELETON)
    module = TemplateNetwork(template)
    arch = GROW_CONCAT
    shapes = {p: jnp.asarray(s) for p, s in real_shapes(module, arch).items()}
    code = {k: jnp.asarray(v) for k, v in template.code(arch).items()}
    fresh = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), code)
    # "switch" makes the same variables with the same values (the same draws on any backend).
    switched = TemplateNetwork(template, selection="switch").init(
        jax.random.key(0), jnp.zeros((1, 16, 16, 3)), code)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), fresh, switched))
    ours = extract_variables(module, arch, mask_to_candidate(fresh, unflatten_paths(shapes)))
    own = network.init_network(jax.random.key(0), arch, SKELETON)[1]
    flat_ours, flat_own = flatten_paths(ours), flatten_paths(own)
    assert {p: np.shape(v) for p, v in flat_ours.items()} == {
        p: np.shape(v) for p, v in flat_own.items()}
    # Kernels: lecun normal at the candidate's own fan-in, not the template's wider one.
    kernels = [p for p in flat_own if p.endswith("kernel") and np.size(flat_own[p]) > 200]
    for path in kernels:
        ratio = np.std(flat_ours[path]) / np.std(flat_own[path])
        assert 0.75 < ratio < 1.33, (path, ratio)
    for path in flat_own:
        if path.endswith(("scale", "var")):
            assert np.all(np.asarray(flat_ours[path]) == 1.0), path
    # Outside the candidate: zeros (TRIM_OP has no third cell).
    shapes = {p: jnp.asarray(s) for p, s in real_shapes(module, TRIM_OP).items()}
    masked = flatten_paths(mask_to_candidate(fresh, unflatten_paths(shapes)))
    unused = [p for p in masked if "/cell3_" in p]
    assert unused and not any(np.any(masked[p]) for p in unused)


@cpu_only  # bit-level equivalence: GPU kernels may flip a prediction
@pytest.mark.parametrize("selection, pack", [("select", 3), ("switch", 1)])
def test_packed_training_matches_training_alone(synthetic, alone, programs, selection, pack):
    config = _config()
    keys = [jax.random.key(i) for i in range(3)]
    inits = [_standalone_init(a, config, synthetic, k) for a, k in zip(THREE, keys)]
    compiled = _programs(programs, synthetic, selection, pack)
    results = []
    for start in range(0, 3, pack):
        results += packed.train_packed(THREE[start:start + pack], config, synthetic,
                                       keys[start:start + pack], programs=compiled,
                                       initial_variables=inits[start:start + pack])
    for result, own in zip(results, alone):
        _assert_close(result, own)


def test_a_diverging_candidate_stops_and_the_others_train_on(synthetic, alone, programs):
    config = _config()
    keys = [jax.random.key(i) for i in range(3)]
    inits = [_standalone_init(a, config, synthetic, k) for a, k in zip(THREE, keys)]
    poisoned = flatten_paths(inits[1])
    poisoned["params/head/kernel"] = np.full_like(poisoned["params/head/kernel"], np.nan)
    inits[1] = unflatten_paths(poisoned)
    results = packed.train_packed(THREE, config, synthetic, keys,
                                  programs=_programs(programs, synthetic, "select", 3),
                                  initial_variables=inits)
    assert results[1].status == "diverged" and "epoch 1" in results[1].message
    assert results[1].epochs_done == 0 and len(results[1].loss_curve) == 1
    for i in (0, 2):
        _assert_close(results[i], alone[i])


def test_packed_default_initialisation_trains(synthetic, programs):
    config = _config()
    keys = [jax.random.key(i) for i in range(3)]
    compiled = _programs(programs, synthetic, "select", 3)
    results = packed.train_packed(THREE, config, synthetic, keys, programs=compiled)
    assert [r.status for r in results] == ["ok"] * 3
    for r in results:
        assert r.loss_curve[-1] < r.loss_curve[0]
        assert r.best_val_accuracy is not None and r.images_per_second > 0
    # Two candidates in the pack of three (padded), the same results for them, and nothing
    # compiled: one program per round shape, whatever the pack holds.
    compiles = []
    listener = lambda event, seconds, **kw: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        again = packed.train_packed(THREE[:2], config, synthetic, keys[:2], programs=compiled)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "/jax/core/compile/backend_compile_duration" not in compiles
    assert [r.loss_curve for r in again] == [r.loss_curve for r in results[:2]]
    again = packed.train_packed(THREE, config, synthetic, keys, programs=compiled)
    assert [r.loss_curve for r in again] == [r.loss_curve for r in results]
    # The packed loop under jax.transfer_guard("disallow_explicit"): its steps move nothing
    # between host and device; its other transfers are the ones it names.
    transfers.SEEN.clear()
    with jax.transfer_guard("disallow_explicit"):
        guarded = packed.train_packed(THREE, _config(nan_check_every_steps=2), synthetic, keys,
                                      programs=compiled)
    assert [r.loss_curve for r in guarded] == [r.loss_curve for r in results]
    assert set(transfers.SEEN) == {"initial state", "training data", "epoch order",
                                   "pack activity", "epoch metrics", "nan check",
                                   "epoch counter", "evaluation", "final variables"}


def test_streamed_data_is_refused_with_a_clear_failure(synthetic):
    records = [{"image": im, "label": int(y)} for im, y in zip(synthetic.train.images,
                                                               synthetic.train.labels)]
    streamed = data_lib.Dataset("stream", 4, (16, 16, 3), data_lib.StreamingSplit(records, 32),
                                None, None, synthetic.mean, synthetic.std)
    results = packed.train_packed(THREE, _config(), streamed, [jax.random.key(0)] * 3,
                                  skeleton=SKELETON)
    assert [r.status for r in results] == ["failed"] * 3
    assert "device-resident data" in results[0].message


@cpu_only
def test_pack_size_is_halved_until_the_step_fits_device_memory(synthetic, monkeypatch):
    """compile_fitting_pack on a device that reports little memory: K 2 -> 1 while XLA's
    memory analysis of the step exceeds 60 % of it (a CPU reports none: K as asked)."""
    template = RoundTemplate.from_architectures(THREE, SKELETON)
    config = _config(epochs=1)
    assert packed.device_memory_bytes() is None  # XLA:CPU: no limit, no sizing
    sizes = []
    real_compile = packed.compile_packed

    def compile_and_record(template, config, data, pack_size, selection="auto"):
        sizes.append(pack_size)
        return real_compile(template, config, data, pack_size, selection)
    monkeypatch.setattr(packed, "compile_packed", compile_and_record)
    monkeypatch.setattr(packed, "program_bytes", lambda programs: programs.pack_size * 1000)
    monkeypatch.setattr(packed, "device_memory_bytes", lambda: 3000)  # 60 %: 1,800 bytes
    programs = packed.compile_fitting_pack(template, config, synthetic, 3, "select")
    assert sizes == [3, 1] and programs.pack_size == 1
