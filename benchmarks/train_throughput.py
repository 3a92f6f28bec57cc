"""Training throughput of MemNAS candidates: JAX settings against a PyTorch reference.

    python benchmarks/train_throughput.py [--widths=32,64] [--devices=1,2] [--batch=128]

For the authors' round-0 winner net53 (fac_conv_7(in) + sep_conv_3x3(in), add) and the six-cell
searched block (docs/method.md §1), at each width, it runs `train_candidate` (the real training
step: on-device gather + augmentation + forward/backward + SGD) for a few epochs of synthetic data
and reports images/s after compile (the first epoch is warm-up), compile seconds, model FLOPs per
image (3x the XLA cost_analysis of the forward pass, the usual training estimate), XLA's own count
for the whole step, and the achieved model FLOP/s as a fraction of this CPU's fp32 peak
(--peak_gflops, about 234 on the 2-core AMD EPYC here).

Settings: 1 vs 2 XLA host devices x XLA:CPU's YNNPACK fusions off (what the mains run) / on
(`--ynn_fusions=off,on`; each in its own subprocess, as XLA_FLAGS must be set before JAX starts)
x depthwise_impl "xla" vs "shifted". The reference is the same network in
PyTorch (CPU, channels_last, same batch, same thread count, SGD momentum step, no augmentation),
checked equal by parameter count and by logits with the Flax weights copied in. Timings on a
shared machine are noisy: the load column is the 1-minute load average when each row started.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags

from memnas_jax import (
    xla_flags,
)

_WIDTHS = flags.DEFINE_list("widths", ["32", "64"], "Block widths w (uniform schedule).")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "XLA host device counts to compare.")
_IMPLS = flags.DEFINE_list("impls", ["shifted", "xla"], "depthwise_impl settings.")
_NETS = flags.DEFINE_list("nets", ["net53", "six_cell"], "Networks to time.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps_per_epoch", 2, "Train steps per epoch (JAX).")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs; the first is warm-up.")
_TORCH_STEPS = flags.DEFINE_integer("torch_steps", 5, "Timed PyTorch steps (after 2 warm-up).")
_PEAK = flags.DEFINE_float("peak_gflops", 234.0, "fp32 peak of this CPU in GFLOP/s.")
_SKIP = flags.DEFINE_list("skip", [], "Settings to leave out, as net:width:impl (e.g. "
                          "six_cell:64:xla, minutes per step on 2 cores).")
_YNN = flags.DEFINE_list("ynn_fusions", ["off"], "XLA:CPU YNNPACK fusions to compare: off "
                         "(what the mains set, xla_flags.disable_cpu_ynn_fusions) and/or on.")
_WORKER = flags.DEFINE_integer("worker_devices", 0, "Internal: run the JAX settings here.")
_WORKER_YNN = flags.DEFINE_string("worker_ynn", "off", "Internal: the worker's YNN setting.")
_OUT = flags.DEFINE_string("out", "", "Also write the rows as JSON to this file.")


def networks() -> dict:
    from memnas_jax.encoding import Cell, uniform_architecture
    sep3, sep5, fac7, maxp, avgp = 5, 4, 3, 1, 0
    return {
        "net53": uniform_architecture([Cell(0, 0, fac7, sep3)]),
        # README "Searched result on CIFAR-10": C1 feeds only later cells.
        "six_cell": uniform_architecture([
            Cell(0, 0, sep3, fac7, linked=False), Cell(1, 0, fac7, maxp),
            Cell(0, 1, sep3, avgp), Cell(2, 2, sep3, sep5), Cell(3, 3, maxp, avgp),
            Cell(1, 1, fac7, fac7)]),
    }


# ---------------------------------------------------------------------------------------------
# JAX (runs in a subprocess per device count)


def forward_flops_per_image(arch, skeleton, batch: int) -> float:
    """XLA's FLOP count of the inference forward pass (plain depthwise conv), per image."""
    import jax
    import jax.numpy as jnp

    from memnas_jax.network import abstract_variables
    module, variables = abstract_variables(arch, skeleton, depthwise_impl="xla")
    x = jax.ShapeDtypeStruct((batch, skeleton.image_size, skeleton.image_size, 3), jnp.float32)
    compiled = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"]) / batch


def run_jax(devices: int) -> list[dict]:
    import jax

    from memnas_jax import data as data_lib
    from memnas_jax import train
    assert jax.device_count() == devices, jax.devices()
    batch = _BATCH.value
    data = data_lib.synthetic_dataset(num_train=batch * _STEPS.value, num_validation=0,
                                      num_test=0)
    rows = []
    for net_name in _NETS.value:
        arch = networks()[net_name]
        for width in map(int, _WIDTHS.value):
            config = train.default_config()
            config.update(dict(epochs=_EPOCHS.value, batch_size=batch, num_devices=devices,
                               milestones=()))
            config.skeleton.width = width
            skeleton = train.skeleton_from_config(config, data)
            fwd = forward_flops_per_image(arch, skeleton, batch)
            for impl in _IMPLS.value:
                if f"{net_name}:{width}:{impl}" in _SKIP.value:
                    continue
                config.depthwise_impl = impl
                load, start = os.getloadavg()[0], time.perf_counter()
                result = train.train_candidate(arch, config, data, jax.random.PRNGKey(0))
                if not result.ok:
                    rows.append(dict(framework="jax", net=net_name, width=width, impl=impl,
                                     devices=devices, error=result.message))
                    continue
                timed = result.epoch_seconds[1:] or result.epoch_seconds
                images_per_s = batch * _STEPS.value * len(timed) / sum(timed)
                rows.append(dict(
                    framework="jax", net=net_name, width=width,
                    impl=impl if _WORKER_YNN.value == "off" else f"{impl}+ynn", devices=devices,
                    params=result.param_count, images_per_s=images_per_s,
                    compile_s=result.compile_seconds, model_flops=3 * fwd,
                    xla_step_flops=result.train_flops_per_image,
                    peak_fraction=3 * fwd * images_per_s / (_PEAK.value * 1e9), load=load,
                    wall_s=time.perf_counter() - start))
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# PyTorch reference


def torch_network(arch, skeleton):
    """The same network in PyTorch: the ops of memnas_jax.ops with PyTorch's own layers."""
    import torch
    from torch import nn
    bias = skeleton.conv_bias

    def conv_bn(cin, cout, kernel, stride=1, dilation=1, relu=True, groups=1):
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        padding = tuple(dilation * (k - 1) // 2 for k in kernel)
        layers = [nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias),
                  nn.BatchNorm2d(cout)]
        return layers + [nn.ReLU()] if relu else layers

    def make_op(op, cin, width, stride):
        if op is None:
            if skeleton.removed_op == "identity" and cin == width and stride == 1:
                return nn.Identity()
            return nn.Conv2d(cin, width, 1, stride, 0, bias=bias)
        if op in (0, 1):
            pool = (nn.AvgPool2d(3, stride, 1) if op == 0 else nn.MaxPool2d(3, stride, 1))
            return nn.Sequential(*conv_bn(cin, width, 1, relu=False), pool)
        if op in (2, 6):
            return nn.Sequential(*conv_bn(cin, width, 3, stride, 2 if op == 2 else 1))
        if op == 3:
            return nn.Sequential(*conv_bn(cin, width, 1, stride), *conv_bn(width, width, (1, 7)),
                                 *conv_bn(width, width, (7, 1)))
        k = 5 if op == 4 else 3
        return nn.Sequential(*conv_bn(cin, cin, k, stride, relu=False, groups=cin),
                             *conv_bn(cin, width, 1))

    class Block(nn.Module):
        def __init__(self, cells, cin, width, stride):
            super().__init__()
            self.cells = cells
            channels = [cin]
            ops = []
            for cell in cells:
                for node, op in ((cell.input1, cell.op1), (cell.input2, cell.op2)):
                    ops.append(make_op(op, channels[node], width, stride if node == 0 else 1))
                channels.append(2 * width if cell.concat else width)
            self.ops = nn.ModuleList(ops)
            self.out_channels = sum(c for c, cell in zip(channels[1:], cells) if cell.linked)

        def forward(self, x):
            nodes = [x]
            for j, cell in enumerate(self.cells):
                a = self.ops[2 * j](nodes[cell.input1])
                b = self.ops[2 * j + 1](nodes[cell.input2])
                nodes.append(torch.cat([a, b], 1) if cell.concat else a + b)
            return torch.cat([n for n, c in zip(nodes[1:], self.cells) if c.linked], 1)

    blocks, cin = [], skeleton.in_channels
    for cells, width, stride in zip(arch, skeleton.widths, skeleton.strides):
        blocks.append(Block(cells, cin, width, stride))
        cin = blocks[-1].out_channels
    side = skeleton.spatial_sizes()[-1] // skeleton.head_pool
    return nn.Sequential(*blocks, nn.MaxPool2d(skeleton.head_pool), nn.Flatten(),
                         nn.Linear(cin * side * side, skeleton.num_classes))


# Flax stores submodules sorted by name; this is their order in the forward pass.
_LAYER_ORDER = ("conv_bn", "reduce", "conv_1xk", "conv_kx1", "depthwise", "depthwise_bn",
                "pointwise", "conv", "bn")


def _forward_order(name: str) -> tuple:
    """block2 < block10, cell2_op1 < cell10_op1, then the op layers in `_LAYER_ORDER`."""
    if name in _LAYER_ORDER:
        return (_LAYER_ORDER.index(name),)
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _flax_layers(params: dict, stats: dict) -> list[tuple]:
    """(kind, arrays) of the conv / BatchNorm layers of a Flax subtree, in forward order."""
    if "kernel" in params:
        return [("conv", params["kernel"], params.get("bias"))]
    if "scale" in params:
        return [("bn", params["scale"], params["bias"], stats["mean"], stats["var"])]
    return [layer for name in sorted(params, key=_forward_order)
            for layer in _flax_layers(params[name], stats.get(name, {}))]


def copy_flax_to_torch(variables: dict, model, skeleton) -> None:
    """Loads Flax MemNASNetwork variables into `torch_network` (same layer order)."""
    import numpy as np
    import torch
    params, stats = variables["params"], variables.get("batch_stats", {})
    blocks = {name: params[name] for name in params if name.startswith("block")}
    flax_layers = _flax_layers(blocks, stats)
    torch_layers = [m for m in model.modules()
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    assert len(flax_layers) == len(torch_layers), (len(flax_layers), len(torch_layers))
    t = lambda a: torch.from_numpy(np.array(a, np.float32))
    with torch.no_grad():
        for layer, module in zip(flax_layers, torch_layers):
            if layer[0] == "conv":
                module.weight.copy_(t(layer[1]).permute(3, 2, 0, 1))  # HWIO -> OIHW
                if layer[2] is not None:
                    module.bias.copy_(t(layer[2]))
            else:
                for dst, src in zip((module.weight, module.bias, module.running_mean,
                                     module.running_var), layer[1:]):
                    dst.copy_(t(src))
        # Flax flattens (h, w, c), PyTorch (c, h, w): permute the Dense rows.
        linear = model[-1]
        channels = model[skeleton.num_blocks - 1].out_channels
        side = skeleton.spatial_sizes()[-1] // skeleton.head_pool
        kernel = np.asarray(params["head"]["kernel"]).reshape(side, side, channels, -1)
        linear.weight.copy_(t(kernel.transpose(2, 0, 1, 3).reshape(linear.in_features, -1).T))
        linear.bias.copy_(t(params["head"]["bias"]))


def check_equal_logits(arch, skeleton) -> float:
    """Max |logit difference| of the Flax and PyTorch networks with the same weights."""
    import jax
    import numpy as np
    import torch

    from memnas_jax.network import init_network
    module, variables = init_network(jax.random.PRNGKey(1), arch, skeleton)
    model = torch_network(arch, skeleton).eval()
    copy_flax_to_torch(jax.device_get(variables), model, skeleton)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))
    with torch.no_grad():
        theirs = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    return float(np.max(np.abs(ours - theirs)))


def run_torch(threads: int) -> list[dict]:
    import torch

    from memnas_jax.network import param_count
    from memnas_jax.space import cifar_skeleton
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, rows, widths = _BATCH.value, [], [int(w) for w in _WIDTHS.value]
    for net_name in _NETS.value:
        arch = networks()[net_name]
        for width in widths:
            skeleton = cifar_skeleton(width)
            model = torch_network(arch, skeleton).to(memory_format=torch.channels_last)
            params = sum(p.numel() for p in model.parameters())
            assert params == param_count(arch, skeleton), (params, param_count(arch, skeleton))
            logit_diff = check_equal_logits(arch, skeleton) if width == min(widths) else None
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,))
            loss_fn = torch.nn.CrossEntropyLoss()

            def step():
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()

            load = os.getloadavg()[0]
            for _ in range(2):
                step()
            times = []
            for _ in range(_TORCH_STEPS.value):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            rows.append(dict(framework="torch", net=net_name, width=width, impl="channels_last",
                             devices=1, params=params, threads=threads, logit_diff=logit_diff,
                             images_per_s=batch / statistics.median(times), load=load,
                             torch=torch.__version__))
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
    torch_rate = {(r["net"], r["width"]): r["images_per_s"] for r in rows
                  if r["framework"] == "torch"}
    model_flops = {(r["net"], r["width"]): r["model_flops"] for r in rows if "model_flops" in r}
    for r in rows:  # the PyTorch model is the same network: same model FLOPs
        if r["framework"] == "torch" and (r["net"], r["width"]) in model_flops:
            r["model_flops"] = model_flops[(r["net"], r["width"])]
            r["peak_fraction"] = r["model_flops"] * r["images_per_s"] / (_PEAK.value * 1e9)
    header = ("| net | w | framework | impl | devices | params | img/s | vs torch | compile s | "
              "model MFLOP/img | XLA step MFLOP/img | % of peak | load |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["net"], r["width"], r["framework"] != "torch",
                                         r.get("impl", ""), r["devices"])):
        if "error" in r:
            lines.append(f"| {r['net']} | {r['width']} | {r['framework']} | {r['impl']} | "
                         f"{r['devices']} | failed: {r['error'][:60]} |")
            continue
        ref = torch_rate.get((r["net"], r["width"]))
        ratio = f"{r['images_per_s'] / ref:.2f}" if ref and r["framework"] == "jax" else "-"
        fmt = lambda v, f: "-" if v is None else format(v, f)
        lines.append(
            f"| {r['net']} | {r['width']} | {r['framework']} | {r['impl']} | {r['devices']} | "
            f"{r['params']:,} | {r['images_per_s']:.1f} | {ratio} | "
            f"{fmt(r.get('compile_s'), '.1f')} | "
            f"{fmt(r.get('model_flops') and r['model_flops'] / 1e6, '.1f')} | "
            f"{fmt(r.get('xla_step_flops') and r['xla_step_flops'] / 1e6, '.1f')} | "
            f"{fmt(r.get('peak_fraction') and 100 * r['peak_fraction'], '.1f')} | "
            f"{r['load']:.1f} |")
    lines += [f"PyTorch vs Flax logits, same weights, {r['net']} w={r['width']}: max |diff| "
              f"{r['logit_diff']:.1e}" for r in rows if r.get("logit_diff") is not None]
    return "\n".join(lines)


def main(argv):
    del argv
    if _WORKER.value:
        run_jax(_WORKER.value)
        return
    rows = []
    args = [f"--{f.name}={f.value if not isinstance(f.value, list) else ','.join(f.value)}"
            for f in (_WIDTHS, _IMPLS, _NETS, _BATCH, _STEPS, _EPOCHS, _PEAK, _SKIP)]
    base_flags = os.environ.get("XLA_FLAGS", "")
    for devices, ynn in [(d, y) for d in map(int, _DEVICES.value) for y in _YNN.value]:
        os.environ["XLA_FLAGS"] = (f"{base_flags} --xla_force_host_platform_device_count="
                                   f"{devices}").strip()
        if ynn == "off":
            xla_flags.disable_cpu_ynn_fusions()  # XLA_FLAGS for the worker, as the mains do
        env = dict(os.environ)
        os.environ["XLA_FLAGS"] = base_flags
        # Rows stream back as the worker prints them, so a long run shows progress.
        with subprocess.Popen([sys.executable, __file__, f"--worker_devices={devices}",
                               f"--worker_ynn={ynn}", *args],
                              env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    print(line.strip(), flush=True)
        if proc.returncode:
            print(f"worker with {devices} devices exited with {proc.returncode}", file=sys.stderr)
    rows += run_torch(threads=os.cpu_count() or 1)
    print(_table(rows))
    if _OUT.value:
        pathlib.Path(_OUT.value).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    app.run(main)
