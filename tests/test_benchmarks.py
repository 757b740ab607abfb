"""Benchmarks in smoke mode (tiny config, 2 timed steps): our train step and the PyTorch peer, in-process.

They share one built (and compiled) tiny benchmark; the torch peer runs eager and through torch.compile's
"eager" backend (dynamo tracing without code generation, which keeps the smoke test fast)."""

import json
import os
import sys
from unittest import mock

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import matmul_shapes  # noqa: E402
import torch_peer  # noqa: E402
import train_step as bench_lib  # noqa: E402

TINY = os.path.join(REPO, "configs", "perf.py") + ":preset=tiny"
ONE_DEVICE = ["mesh_shape=(1, 1, 1)"]  # conftest fakes 8 CPU devices; the smoke run uses one


@pytest.fixture(scope="module")
def tiny():
    cfg = bench_lib.load_config(TINY, ONE_DEVICE)
    # Smoke only: the unoptimised XLA backend compiles about twice as fast.
    return cfg, bench_lib.Bench(cfg, compiler_options={"xla_backend_optimization_level": 0})


def test_config_overrides_and_unknown_keys():
    cfg = bench_lib.load_config(TINY, ["model.dtype=bfloat16", "model.scan_layers=true", "bench.steps=7"])
    assert cfg["model"]["dtype"] == "bfloat16" and cfg["model"]["scan_layers"] is True and cfg["bench"]["steps"] == 7
    with pytest.raises(SystemExit, match="Valid keys: .*scan_layers"):
        bench_lib.load_config(TINY, ["model.scan_layer=true"])
    args, overrides = bench_lib.parse_args(["--config=x.py", "--config.bench.steps=3", "--out=o.json"])
    assert args.out == "o.json" and overrides == ["bench.steps=3"]


def test_config_presets_are_the_documented_sizes():
    sys.path.insert(0, REPO)
    from configs import perf

    gpu = perf.plain_config("preset=gpu")
    assert gpu["model"]["dtype"] == "bfloat16" and gpu["model"]["attention_impl"] == "cudnn"
    assert gpu["model"]["image_encoder"]["patch_size"] == 16 and gpu["bench"]["image_size"] == 224
    assert gpu["model"]["fusion"]["num_layers"] == 6 and gpu["bench"]["batch_size"] >= 256
    deep = perf.plain_config("depth=12")
    assert {
        deep["model"][k].get("depth", deep["model"][k].get("num_layers"))
        for k in ("image_encoder", "text_encoder", "fusion")
    } == {12}
    assert perf.get_config("fusion=merged").model.fusion.name == "merged"  # the locked ConfigDict wrapper


def test_step_is_train_lib_train_step(tiny):
    """The benchmark's step traces to exactly the program of train_lib.train_step (which it cannot import on a
    machine without the data stack)."""
    from vtfusion_jax import train_lib

    cfg, bench = tiny
    ours = jax.make_jaxpr(lambda s, b: bench_lib.train_step(s, b, model=bench.model, tx=bench.tx))
    theirs = jax.make_jaxpr(lambda s, b: train_lib.train_step(s, b, model=bench.model, tx=bench.tx))
    assert str(ours(bench.state, bench.batch)) == str(theirs(bench.state, bench.batch))


@pytest.fixture(scope="module")
def step_result(tiny):
    cfg, bench = tiny
    before = jax.tree.leaves(bench.state.params)[0]
    result = bench_lib.run(cfg, bench=bench, command="python benchmarks/train_step.py --smoke")
    result["_donated"] = before.is_deleted()
    return result


@pytest.fixture(scope="module")
def peer_result(tiny):
    cfg, bench = tiny
    return torch_peer.run(cfg, compile_backend="eager", pause_s=0.0, bench=bench, command="peer smoke")


def test_train_step_benchmark_smoke(tiny, step_result):
    cfg, bench = tiny
    result = dict(step_result)
    assert result.pop("_donated")  # the state buffers were donated to the step
    json.dumps(result)  # JSON-able
    assert len(result["step_s_all"]) == cfg["bench"]["steps"] == 2
    assert result["examples_per_s"] > 0 and np.isfinite(result["final_loss"])
    assert 0 < result["mfu_measured_peak"] < 1.5
    assert result["num_params"] == sum(x.size for x in jax.tree.leaves(bench.state.params))
    assert result["flops_per_step_train"] == 3 * result["flops_per_example"]["forward"] * cfg["bench"]["batch_size"]
    assert result["compile"]["total_s"] > 0 and result["compile"]["xla_flops_per_step"] > 0


def test_torch_peer_smoke(peer_result):
    result = peer_result
    json.dumps(result)
    # The same architecture: parameter for parameter.
    assert result["num_params"]["torch"] == result["num_params"]["jax"]
    assert set(result["step_s_median"]) == {"jax", "torch_eager", "torch_compile"}
    assert all(len(t) == 2 for t in result["step_s_all"].values())
    assert set(result["speedup_vs"]) == {"torch_eager", "torch_compile"}
    assert all(np.isfinite(v) for v in result["final_loss"].values())


def test_performance_doc_is_generated_from_results(step_result, peer_result):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    step = {k: v for k, v in step_result.items() if k != "_donated"}
    doc = perf_table.build({"cpu_torch_peer": peer_result, "cpu_fusion_co_attention": step})
    assert "| `co_attention` |" in doc and "python benchmarks/train_step.py --smoke" in doc  # rows name commands
    assert "than torch eager (CPU): **" in doc and "than torch compile (CPU): **" in doc  # verdicts
    assert "GPU" in doc and "not measured" in doc
    assert "CPU runs: " in doc and "more than one host" not in doc  # one host: one line

    # Runs from two hosts: each host is named with the runs it measured (no figure read against another machine's).
    other = json.loads(json.dumps(step))
    other["host"] = {**other.get("host", {}), "cpu": "Other CPU 9000"}
    doc2 = perf_table.build({"cpu_torch_peer": peer_result, "cpu_fusion_co_attention": step, "cpu_fusion_cross": other})
    assert "more than one host" in doc2
    host_lines = [ln for ln in doc2.splitlines() if ln.startswith("- ") and "cores, backend" in ln]
    assert len(host_lines) == 2
    assert any("Other CPU 9000" in ln and "`cpu_fusion_cross`" in ln and "co_attention" not in ln for ln in host_lines)

    # A torch-peer run per host: one subsection and one pair of verdicts per host, each with its own ratio.
    peer2 = json.loads(json.dumps(peer_result))
    peer2["host"] = {**peer2.get("host", {}), "cpu": "Other CPU 9000"}
    peer2["speedup_vs"] = {k: 2.0 for k in peer2["speedup_vs"]}
    doc3 = perf_table.build({"cpu_torch_peer": peer_result, "cpu_torch_peer_other": peer2})
    assert "### Other CPU 9000" in doc3 and doc3.count("### ") == 2
    verdicts = [ln for ln in doc3.splitlines() if ln.startswith("- Ours >= ")]
    assert len(verdicts) == 4
    other_verdicts = [ln for ln in verdicts if "on Other CPU 9000" in ln]
    assert len(other_verdicts) == 2 and all("**met** — measured 2.00x" in ln for ln in other_verdicts)

    # Same masked model name, different CPUs (family / SIMD width recorded): two hosts, not one.
    zen5 = json.loads(json.dumps(peer_result))
    zen5["host"] = {
        **zen5.get("host", {}),
        "cpu": "AMD EPYC",
        "cpu_family": "26",
        "cpu_model": "2",
        "cpu_isa": "AVX-512",
    }
    old = json.loads(json.dumps(peer_result))
    old["host"] = {k: v for k, v in old.get("host", {}).items() if not k.startswith("cpu_")} | {"cpu": "AMD EPYC"}
    doc4 = perf_table.build({"cpu_torch_peer": zen5, "cpu_torch_peer_earlier": old})
    assert "### AMD EPYC (family 26 model 2, AVX-512)" in doc4
    assert "### AMD EPYC (earlier host, family not recorded)" in doc4
    assert "more than one host" in doc4


def test_performance_doc_names_the_command_and_a_renamed_file(tmp_path, peer_result):
    """A run renamed after the fact (a host suffix) keeps the command that wrote it, and the doc says the file's
    present name; a run still under the name its command wrote gets the command alone."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    cmd = "python benchmarks/torch_peer.py --config=configs/perf.py --out=results/perf/cpu_torch_peer.json"
    for name in ("cpu_torch_peer", "cpu_torch_peer_old_host"):
        other_host = {**peer_result.get("host", {}), "cpu": name}  # two hosts: two subsections
        (tmp_path / f"{name}.json").write_text(json.dumps({**peer_result, "command": cmd, "host": other_host}))
    doc = perf_table.build(perf_table._load(str(tmp_path)))
    commands = [ln for ln in doc.splitlines() if ln.startswith("Command: `python benchmarks/torch_peer.py")]
    assert len(commands) == 2
    assert commands.count(f"Command: `{cmd}`") == 1
    assert f"Command: `{cmd}` (the file was renamed since: cpu_torch_peer_old_host.json)" in commands


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 avx fma avx2 avx512f avx512bw

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: Something else
"""


def test_cpu_identity_reads_family_model_and_widest_simd():
    from vtfusion_jax import speed

    got = speed.cpu_identity(CPUINFO)
    assert got == {
        "cpu": "AMD EPYC",
        "cpu_vendor": "AuthenticAMD",
        "cpu_family": "26",
        "cpu_model": "2",
        "cpu_isa": "AVX-512",
    }
    assert speed.cpu_identity(CPUINFO.replace(" avx512f avx512bw", ""))["cpu_isa"] == "AVX2"
    assert speed.cpu_identity("")["cpu_isa"] == ""


def test_gpu_bench_tiny_smoke(tmp_path, monkeypatch):
    """benchmarks/gpu_bench.py --tiny (the GPU script's code path on a tiny bf16 model): without a GPU the cuDNN run
    is recorded as skipped with its reason, the XLA run is measured, and the JSON files are written."""
    import gpu_bench  # noqa: PLC0415  (benchmarks/gpu_bench.py)

    # On one device, as on the one-GPU machine it is written for (conftest's 8 fake CPU devices would partition the
    # bf16 program 8 ways: several times the compile time, no code path of the script's own).
    load_config, loaded = bench_lib.load_config, []

    def one_device(spec, overrides):
        loaded.append(load_config(spec, [*overrides, *ONE_DEVICE]))
        return loaded[-1]

    monkeypatch.setattr(bench_lib, "load_config", one_device)
    summary = gpu_bench.main(["--tiny", "--steps=2", f"--out_dir={tmp_path}"])
    runs = summary["runs"]
    if jax.default_backend() != "gpu":
        assert "CUDA GPU" in runs["cudnn"]["skipped"]
    assert runs["xla"]["step_s_median"] > 0 and runs["xla"]["num_params"] > 0
    assert 0 < runs["xla"]["mfu_measured_peak"] < 1.5
    assert [c["mesh_shape"] for c in loaded] == [(1, 1, 1)]  # the script ran on one device
    written = json.load(open(tmp_path / "gpu_tiny_xla.json"))
    assert len(written["step_s_all"]) == 2 and np.isfinite(written["final_loss"])
    assert json.load(open(tmp_path / "gpu_tiny_summary.json"))["runs"].keys() == {"cudnn", "xla"}


def test_profile_step_smoke(tmp_path):
    """benchmarks/profile_step.py on the tiny config (a subprocess: it pins itself to one core): every bucket is
    reported for both sides, the dot thunks it found carry the model's matmul FLOPs, and the doc section renders."""
    import subprocess

    out = tmp_path / "profile.json"
    cmd = [
        sys.executable,
        os.path.join(REPO, "benchmarks", "profile_step.py"),
        f"--config={TINY}",
        "--steps=2",
        f"--out={out}",
        "--config.mesh_shape=(1, 1, 1)",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.load(open(out))
    ours, torch_side = r["ours"], r["torch_eager"]
    for side in (ours, torch_side):
        assert set(side["bucket_ms"]) == {
            "matmul",
            "attention",
            "mlp",
            "layernorm",
            "embeddings",
            "optimizer+loss",
            "other model",
        }
        assert side["bucket_ms"]["matmul"] > 0 and side["step_ms"] > 0
        assert side["total_ms"] == pytest.approx(sum(side["bucket_ms"].values()))
    # The classified dots are the model's matmuls: their FLOPs match the analytic count (the patch convolution,
    # not a dot, is the only matmul work outside them).
    assert 0.6 * r["flops_per_step_train"] / 1e9 < ours["matmul_gflop"] <= 1.05 * r["flops_per_step_train"] / 1e9
    assert ours["top_dots"] and all(d["gflop_per_s"] > 0 for d in ours["top_dots"])
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    doc = "\n".join(perf_table._profile_section(r))
    assert "## Where the time goes" in doc and "| matmul |" in doc and "python benchmarks/profile_step.py" in doc


def test_matmul_shapes_reads_every_dot_and_replays_it_in_torch():
    """benchmarks/matmul_shapes.py finds each dot of a compiled program (shapes, dimension numbers, count, FLOPs), and
    the torch call it replays for each (mm on transposed views, einsum for batched dots) computes the same product."""
    import torch

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((64, 32), np.float32), rng.standard_normal((32, 48), np.float32)
    dy = rng.standard_normal((64, 48), np.float32)
    q, k = rng.standard_normal((2, 3, 16, 8), np.float32), rng.standard_normal((2, 3, 16, 8), np.float32)

    def f(x, w, dy, q, k):
        return x @ w, x.T @ dy, dy @ w.T, jax.numpy.einsum("bhqd,bhkd->bhqk", q, k), (2 * x) @ w

    dots = matmul_shapes.step_dots(jax.jit(f).lower(x, w, dy, q, k).compile().as_text())
    by_flops = sorted((d["flops"], d["count"]) for d in dots)
    # x @ w twice (one group, count 2); x^T dy; dy w^T; the batched score product.
    assert by_flops == sorted(
        [(2 * 64 * 32 * 48, 2), (2 * 32 * 48 * 64, 1), (2 * 64 * 48 * 32, 1), (2 * 6 * 16 * 16 * 8, 1)]
    )
    for d in dots:
        a = rng.standard_normal(d["lhs"], np.float32)
        b = rng.standard_normal(d["rhs"], np.float32)
        dims = d["dims"]
        dn = (
            (dims["lhs_contracting_dims"], dims["rhs_contracting_dims"]),
            (dims["lhs_batch_dims"], dims["rhs_batch_dims"]),
        )
        want = np.asarray(jax.lax.dot_general(a, b, dn))
        got = matmul_shapes.torch_fn(d)(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        assert got.shape == tuple(d["out"])


def test_matmul_shapes_smoke(tmp_path):
    """The whole benchmark on the tiny config: the replayed dots carry the model's matmul FLOPs, the step totals are
    the count-weighted sums, both libraries agree, and the doc section renders."""
    out = tmp_path / "mm.json"
    r = matmul_shapes.main(
        [f"--config={TINY}", "--rounds=1", "--reps=1", "--pause=0", f"--out={out}", "--config.mesh_shape=(1, 1, 1)"]
    )
    assert json.load(open(out))["step_dot_gflop"] == pytest.approx(r["step_dot_gflop"])
    assert 0.6 * r["flops_per_step_train"] / 1e9 < r["step_dot_gflop"] <= 1.05 * r["flops_per_step_train"] / 1e9
    for side in ("xla", "torch"):
        assert r["step_dot_ms"][side] == pytest.approx(sum(d["count"] * d["ms"][side] for d in r["dots"]))
    assert max(d["max_abs_diff_over_scale"] for d in r["dots"]) < 1e-4
    assert {d["engine"] for d in r["dots"]} <= {"ynn/xnn", "eigen"}
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    doc = "\n".join(perf_table._matmul_section(r))
    assert "XLA's kernels vs PyTorch's" in doc and "python benchmarks/matmul_shapes.py" in doc


def test_performance_doc_states_what_the_speed_target_needs_of_the_kernels(peer_result):
    """With a torch-peer run and a matmul_shapes run from the same CPU, the doc derives the step time the 1.25x target
    allows (faster torch step / 1.25) and estimates our step with PyTorch's kernels (our step x the torch / XLA time
    ratio on the step's dots); the sentence that the target needs faster GEMMs than PyTorch's appears only when that
    estimate exceeds the allowed step. Runs from another CPU are not paired."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    peer = json.loads(json.dumps(peer_result))
    peer["host"] = {k: v for k, v in peer.get("host", {}).items() if not k.startswith("cpu_")} | {"cpu": "Test CPU"}
    peer["step_s_median"] = {"jax": 0.9, "torch_eager": 1.0, "torch_compile": 0.8}
    peer["flops_per_step_train"] = 128e9
    peer["peak_flops_per_s"] = {"jax": 200e9, "torch": 200e9}
    dot = {
        "name": "eigen A^T B [8, 4] x [8, 4] -> [4, 4]",
        "count": 2,
        "ms": {"xla": 1.0, "torch": 0.5},
        "gflop_per_s": {"xla": 1.0, "torch": 2.0},
        "max_abs_diff_over_scale": 0.0,
    }
    mm = {
        "host": {"cpu": "Test CPU"},
        "threads": {"torch": 2},
        "rounds": 3,
        "dots": [dot],
        "step_dot_gflop": 117.0,
        "step_dot_ms": {"xla": 800.0, "torch": 600.0},
        "step_dot_gflop_per_s": {"xla": 146.0, "torch": 195.0},
        "torch_over_xla_time": 0.75,
        "by_xla_engine": {"eigen": {"gflop": 1.0, "xla_ms": 2.0, "torch_ms": 1.0}},
        "command": "python benchmarks/matmul_shapes.py --test",
    }

    doc = perf_table.build({"cpu_torch_peer": peer, "cpu_matmul_shapes": mm})
    head = "**What the 1.25x target needs here (Test CPU (earlier host"
    needs = [ln for ln in doc.splitlines() if ln.startswith(head)][0]
    assert "torch compile at 800 ms" in needs and "at most 640 ms" in needs  # 0.8 s / 1.25
    assert "200 GFLOP/s, 100.0 %" in needs  # 128 GFLOP in 0.64 s against a 200 GFLOP/s peak
    assert "800 ms with XLA's kernels and 600 ms with PyTorch's" in needs and "time ratio 0.75" in needs
    assert "kernels at 675 ms" in needs  # 900 ms x 0.75
    assert "still above the allowed step" in needs  # 675 > 640

    mm_fast = {**mm, "step_dot_ms": {"xla": 800.0, "torch": 560.0}, "torch_over_xla_time": 0.7}  # 630 <= 640 ms
    doc2 = perf_table.build({"cpu_torch_peer": peer, "cpu_matmul_shapes": mm_fast})
    assert "kernels at 630 ms" in doc2 and "still above" not in doc2

    fast_peer = {**peer, "step_s_median": {**peer["step_s_median"], "jax": 0.6}}  # 600 <= 640 ms: already met
    doc3 = perf_table.build({"cpu_torch_peer": fast_peer, "cpu_matmul_shapes": mm})
    assert "Our step, 600 ms, is within the allowed step" in doc3 and "still above" not in doc3

    other = {**mm, "host": {"cpu": "Other CPU"}}
    assert "What the 1.25x target needs" not in perf_table.build({"cpu_torch_peer": peer, "cpu_matmul_shapes": other})


def test_step_ceiling_standins_keep_shapes_and_drop_the_multiply_adds():
    """benchmarks/step_ceiling.py's stand-ins: the same output and gradient shapes as the Dense matmul they replace
    (jax: vtfusion_jax.linear; torch: nn.Linear), no dot / mm left (XLA's HLO; torch's FLOP counter), every operand
    still read (the gradients depend on it), and the real layers back after the context."""
    import step_ceiling
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vtfusion_jax import linear

    x, w = jax.random.normal(jax.random.key(0), (3, 5, 8)), jax.random.normal(jax.random.key(1), (8, 6))

    def loss(x, w):
        return (linear.linear(x, w) ** 2).sum()

    real = jax.grad(loss, argnums=(0, 1))(x, w)
    real_matmul = linear._matmul
    with step_ceiling.jax_dense_ablated():
        y = linear.linear(x, w)
        grads = jax.grad(loss, argnums=(0, 1))(x, w)
        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
        x_other = x.at[0, 0, 0].add(1.0)
        dw_other = jax.grad(loss, argnums=1)(x_other, w)
    assert linear._matmul is real_matmul
    assert y.shape == (3, 5, 6) and [g.shape for g in grads] == [g.shape for g in real]
    assert " dot(" not in hlo and " dot(" in jax.jit(jax.grad(loss)).lower(x, w).compile().as_text()
    assert not np.allclose(dw_other, grads[1])  # the weight gradient still reads x

    real_forward = torch.nn.Linear.forward
    layer = torch.nn.Linear(8, 6)
    xt = torch.randn(3, 5, 8, requires_grad=True)
    with step_ceiling.torch_dense_ablated(), FlopCounterMode(display=False) as counter:
        out = layer(xt)
        out.pow(2).sum().backward()
    assert torch.nn.Linear.forward is real_forward
    assert counter.get_total_flops() == 0
    assert out.shape == (3, 5, 6) and xt.grad.shape == xt.shape
    assert layer.weight.grad.shape == layer.weight.shape and layer.bias.grad.shape == layer.bias.shape


def test_step_ceiling_smoke(tiny):
    """The whole benchmark on the tiny config (reusing the shared tiny step): four steps timed, the ablated step keeps
    no unbatched dot while the real one has them, the Dense FLOPs read from the HLO equal 3x the forward pass's Dense
    products counted while tracing the model, and the doc section renders with the run's own figures."""
    import step_ceiling

    cfg, bench = tiny
    r = step_ceiling.run(cfg, rounds=2, pause_s=0.0, bench=bench, command="python benchmarks/step_ceiling.py --smoke")
    json.dumps(r)
    assert set(r["step_s_median"]) == {"jax", "jax_no_dense", "torch_eager", "torch_eager_no_dense"}
    assert all(len(t) == 2 for t in r["step_s_all"].values())
    assert r["unbatched_dots"]["ablated_step"] == 0 < r["unbatched_dots"]["step"]
    assert 0 < r["other_dot_gflop"] < r["dense_gflop"]
    assert r["dense_gflop"] + r["other_dot_gflop"] == pytest.approx(r["step_dot_gflop"])
    # Reference for the Dense FLOPs read from the HLO: every vtfusion_jax.linear product of the forward pass, counted
    # while tracing the model, x 3 (forward, input gradient, weight gradient; the patch embedding is a convolution,
    # so every Dense input is an activation that needs its gradient).
    from vtfusion_jax import linear

    forward_macs = []
    real_matmul = linear._matmul

    def counting(x2, w2):
        forward_macs.append(x2.shape[0] * x2.shape[1] * w2.shape[1])
        return real_matmul(x2, w2)

    with mock.patch.object(linear, "_matmul", counting):
        jax.eval_shape(lambda p: bench.model.apply({"params": p}, bench.batch, train=False), bench.state.params)
    assert r["dense_gflop"] == pytest.approx(3 * 2 * sum(forward_macs) / 1e9, rel=1e-9)
    for name, side in r["sides"].items():
        assert side["dense_ms"] == pytest.approx(side["step_ms"] - side["no_dense_ms"])
        assert side["step_ms"] == pytest.approx(1e3 * r["step_s_median"][name])
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    doc = "\n".join(perf_table._ceiling_section(r))
    assert "python benchmarks/step_ceiling.py --smoke" in doc and "Dense GEMMs vs the rest of the step" in doc


def test_performance_doc_states_the_step_ceiling_against_the_target():
    """From a step_ceiling run: the step the 1.25x target allows (this run's torch eager step / 1.25), our ceiling
    (no-Dense step + Dense FLOPs at the measured peak), and, when the ceiling is above the allowed step, the Dense
    GEMM rate and the rest-of-step time the target would need."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    def run(jax_no_dense_ms, jax_step_ms=900.0):
        side = {"step_ms": jax_step_ms, "no_dense_ms": jax_no_dense_ms, "dense_ms": jax_step_ms - jax_no_dense_ms}
        ours = {
            **side,
            "dense_gflop_per_s": 150.0,
            "dense_fraction_of_peak": 0.75,
            "ceiling_ms": jax_no_dense_ms + 500.0,
        }  # 100 GFLOP at 200 GFLOP/s
        torch_side = {
            "step_ms": 1000.0,
            "no_dense_ms": 300.0,
            "dense_ms": 700.0,
            "dense_gflop_per_s": None,
            "dense_fraction_of_peak": None,
            "ceiling_ms": 800.0,
        }
        return {
            "host": {"cpu": "Test CPU"},
            "rounds": 3,
            "pause_between_steps_s": 0.05,
            "dense_gflop": 100.0,
            "step_dot_gflop": 104.0,
            "peak_flops_per_s": {"jax": 200e9, "torch": 200e9},
            "sides": {"jax": ours, "torch_eager": torch_side},
            "command": "python benchmarks/step_ceiling.py -t",
        }

    doc = perf_table.build({"cpu_step_ceiling": run(400.0)})
    assert "| ours (peak 200 GFLOP/s) | 900 | 400 | 500 | 150 | 75.0 % | 900 |" in doc
    assert "| torch eager (peak 200 GFLOP/s) | 1,000 | 300 | 700 | n/a | n/a | 800 |" in doc
    line = [ln for ln in doc.splitlines() if ln.startswith("Against this run's torch eager step")][0]
    assert "allows our step 800 ms" in line and "**900 ms: above it**" in line  # 1000 / 1.25; 400 + 500
    assert "Dense GEMMs would have 400 ms: 250 GFLOP/s, 125.0 %" in line  # 100 GFLOP in 800 - 400 ms
    assert "shrink to 300 ms" in line  # 800 - 500 ms for the GEMMs at the peak

    def verdict(no_dense_ms):
        return [
            ln
            for ln in perf_table.build({"cpu_step_ceiling": run(no_dense_ms)}).splitlines()
            if ln.startswith("Against")
        ][0]

    below = verdict(250.0)
    assert "750 ms, below it" in below and "above it" not in below
    rest_too_slow = verdict(850.0)  # the rest alone exceeds the 800 ms allowed
    assert "The rest of our step alone takes 850 ms" in rest_too_slow and "GFLOP/s" not in rest_too_slow
    assert "shrink to 300 ms" in rest_too_slow
    met = [ln for ln in perf_table.build({"cpu_step_ceiling": run(200.0, 700.0)}).splitlines() if "Against" in ln][0]
    assert "Our step in this run, 700 ms, is within it." in met and "ceiling" not in met  # 700 <= 800: met as is


def test_weight_grad_smoke(tmp_path):
    """The whole benchmark on the tiny config: the plain step has an Eigen ``A^T B`` dot (the kernel gradient) and
    the transposed one has none, with the same total dot FLOPs and the same loss; the doc section renders."""
    import weight_grad

    out = tmp_path / "wg.json"
    r = weight_grad.main(
        [f"--config={TINY}", "--rounds=2", "--pause=0", f"--out={out}", *map("--config.".__add__, ONE_DEVICE)]
    )
    assert json.load(open(out))["plain_over_transposed"] == pytest.approx(r["plain_over_transposed"])
    forms = r["dot_gflop_by_form"]
    assert forms["plain"].get("eigen A^T B", 0) > 0 and not any("A^T B" in f for f in forms["transposed"])
    assert sum(forms["plain"].values()) == pytest.approx(sum(forms["transposed"].values()))
    assert r["final_loss"]["plain"] == pytest.approx(r["final_loss"]["transposed"], rel=1e-4)
    assert all(len(t) == 2 for t in r["step_s_all"].values())
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import perf_table

    doc = perf_table.build({"cpu_weight_grad": r})
    assert "### The Dense kernel gradient's dot form" in doc and "python benchmarks/weight_grad.py" in doc
    assert f"plain / transposed: **{r['plain_over_transposed']:.2f}x**" in doc


def test_alternate_rotates_the_order_and_returns_each_runners_times():
    """bench_args.alternate: warm-up calls untimed, then every runner once per round, the order rotated by one each
    round (so no runner always follows the same one), and each runner's own returned times in round order."""
    import bench_args

    calls = []

    def runner(name):
        def fn():
            calls.append(name)
            return float(len(calls))  # a distinct "time" per call, so misattribution shows

        return fn

    times = bench_args.alternate({n: runner(n) for n in "abc"}, rounds=4, pause_s=0.0, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    rounds = [calls[6 + 3 * r : 9 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    for name, ts in times.items():
        assert ts == [float(i + 1) for i, n in enumerate(calls) if n == name and i >= 6]
