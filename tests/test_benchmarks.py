"""Benchmarks in smoke mode (tiny config, 2 timed steps): our train step and the PyTorch peer, in-process.

They share one built (and compiled) tiny benchmark; the torch peer runs eager and through torch.compile's
"eager" backend (dynamo tracing without code generation, which keeps the smoke test fast)."""

import importlib.util
import json
import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
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


def test_benchmark_times_the_librarys_step():
    """No copy of the step: the benchmark jits train_lib.make_train_step over the classification loss."""
    from vtfusion_jax import train_lib

    assert bench_lib.make_train_step is train_lib.make_train_step and bench_lib.TrainState is train_lib.TrainState
    source = open(os.path.join(REPO, "benchmarks", "train_step.py")).read()
    assert "value_and_grad" not in source and "apply_updates" not in source


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
    # The same function: our parameters in the port give our loss and gradients (else the run raises).
    check = result["equality_check"]
    assert check["passed"] and check["tolerance_used"] <= 1 and check["max_rel_grad_diff"] < 1e-4
    assert check["loss_torch"] == pytest.approx(check["loss_jax"], rel=1e-4)
    assert result["num_params"]["torch"] == result["num_params"]["jax"]
    assert set(result["step_s_median"]) == {"jax", "torch_eager", "torch_compile"}
    assert all(len(t) == 2 for t in result["step_s_all"].values())
    assert set(result["speedup_vs"]) == {"torch_eager", "torch_compile"}
    assert all(np.isfinite(v) for v in result["final_loss"].values())


def test_torch_peer_refuses_a_port_that_differs(tiny, peer_result):
    """The equality check catches a subtle port bug, tanh-approximated GELU (the loss moves by ~3e-5 relative; the
    gradients give it away), with the jax side compiled once per Bench (the smoke run's)."""
    cfg, bench = tiny
    trainer = torch_peer.TorchTrainer(torch_peer.TorchModel(cfg), cfg, bench_lib.synthetic_batch(cfg), None)
    gelus = [m for m in trainer.model.modules() if isinstance(m, torch_peer.nn.GELU)]
    assert len(gelus) == 5  # the MLPs of ViT, BERT, both fusion streams and the head
    for m in gelus:
        m.approximate = "tanh"
    with pytest.raises(ValueError, match="not our function"):
        torch_peer.equality_check(bench, trainer)


def test_performance_sections_show_the_benchmarks_numbers(tmp_path, monkeypatch, step_result, peer_result):
    """Real smoke results through scripts/report.py: the rows carry their medians, commands, commit and CPU."""
    spec = importlib.util.spec_from_file_location("report", os.path.join(REPO, "scripts", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    monkeypatch.setattr(report, "PERF", str(tmp_path))
    step = {k: v for k, v in step_result.items() if k != "_donated"}
    (tmp_path / "cpu_fusion_co_attention.json").write_text(json.dumps(step))
    (tmp_path / "cpu_torch_peer.json").write_text(json.dumps(peer_result))
    (row,) = [ln.split(" | ") for ln in report.perf_fusions().splitlines() if ln.startswith("| `co_attention`")]
    assert row[2] == f"{1e3 * step['step_s_median']:,.0f}" and row[-1] == "`python benchmarks/train_step.py --smoke` |"
    assert row[-2] == report.provenance(step) and step["git_commit"][:7] in row[-2]
    speedup = peer_result["speedup_vs"]["torch_eager"]
    verdict = "**met**" if speedup >= 1.25 else "**missed**"
    assert f"faster than torch_eager ({report.provenance(peer_result)}): {verdict} — {speedup:.2f}x" in (
        report.perf_targets()
    )


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
    is recorded as skipped with its reason, "auto" (xla here) is measured once, and the JSON files are written."""
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
    if jax.default_backend() != "gpu":  # "auto" is xla here: measured once, cuDNN skipped with the reason
        assert "CUDA GPU" in runs["cudnn"]["skipped"]
        assert runs["auto"]["resolved_to"] == "xla" and runs["xla"] == {"same_as": "auto"}
        assert summary["auto_speedup_over_xla"] == 1.0
    assert runs["auto"]["step_s_median"] > 0 and runs["auto"]["num_params"] > 0
    assert 0 < runs["auto"]["mfu_measured_peak"] < 1.5
    assert [c["mesh_shape"] for c in loaded] == [(1, 1, 1)]  # the script ran on one device
    written = json.load(open(tmp_path / "gpu_tiny_auto.json"))
    assert len(written["step_s_all"]) == 2 and np.isfinite(written["final_loss"])
    assert json.load(open(tmp_path / "gpu_tiny_summary.json"))["runs"].keys() == {"auto", "cudnn", "xla"}


@pytest.mark.slow  # the switch's gradients are checked in the default tier: test_models.py (weight_grad_switch)
def test_weight_grad_smoke(tmp_path):
    """The whole benchmark on the tiny config: the plain step has an Eigen ``A^T B`` dot (the kernel gradient) and
    the transposed one has none, and both give the same loss."""
    import weight_grad

    out = tmp_path / "wg.json"
    r = weight_grad.main(
        [f"--config={TINY}", "--rounds=2", "--pause=0", f"--out={out}", *map("--config.".__add__, ONE_DEVICE)]
    )
    assert json.load(open(out))["plain_over_transposed"] == pytest.approx(r["plain_over_transposed"])
    assert r["lhs_transposed_dots"]["plain"] > 0 and r["lhs_transposed_dots"]["transposed"] == 0
    assert r["final_loss"]["plain"] == pytest.approx(r["final_loss"]["transposed"], rel=1e-4)
    assert all(len(t) == 2 for t in r["step_s_all"].values())


@pytest.mark.slow  # the per-image paths' equality is checked in the default tier: test_fusion.py
def test_per_image_smoke(tmp_path):
    """The whole benchmark on the tiny config with 2 images for 8 questions (co-attention): both sides train the
    same model (equal losses after the same steps), the gathered side has more work per step (XLA's FLOP count)."""
    import per_image

    extra = [*ONE_DEVICE, "bench.images_per_batch=2", "model.fusion.name=co_attention", "model.fusion.num_layers=2"]
    r = per_image.main([f"--config={TINY}", "--rounds=2", "--pause=0", *map("--config.".__add__, extra)])
    assert r["final_loss"]["gathered"] == pytest.approx(r["final_loss"]["per_image"], rel=1e-4)
    assert r["questions_per_s"].keys() == {"gathered", "per_image"} and r["speedup"] > 0
    assert r["xla_flops_per_step"]["gathered"] > r["xla_flops_per_step"]["per_image"]


@pytest.mark.slow  # the dedup path's equality is checked in the default tier: test_models.py
def test_text_dedup_smoke():
    """The whole benchmark on the tiny config, 8 questions repeating 3 texts: both sides train the same model (equal
    losses after the same steps), and the synthetic batch holds exactly 3 distinct (ids, mask) rows."""
    import text_dedup

    extra = [*ONE_DEVICE, "bench.distinct_texts=3", "model.text_dedup=4"]
    r = text_dedup.main([f"--config={TINY}", "--rounds=2", "--pause=0", *map("--config.".__add__, extra)])
    assert r["final_loss"]["plain"] == pytest.approx(r["final_loss"]["dedup"], rel=1e-4)
    assert r["questions_per_s"].keys() == {"plain", "dedup"} and r["speedup"] > 0
    batch = bench_lib.synthetic_batch(r["config"])
    rows = np.concatenate([batch["text_ids"], batch["text_mask"]], axis=1)
    assert len(np.unique(rows, axis=0)) == 3 and len(rows) == r["config"]["bench"]["batch_size"]


def test_alternate_rotates_the_order_and_returns_each_runners_times():
    """alternate: warm-up calls untimed, then every runner once per round, the order rotated by one each
    round (so no runner always follows the same one), and each runner's own returned times in round order."""
    calls = []

    def runner(name):
        def fn():
            calls.append(name)
            return float(len(calls))  # a distinct "time" per call, so misattribution shows

        return fn

    times = bench_lib.alternate({n: runner(n) for n in "abc"}, rounds=4, pause_s=0.0, warmup=2)
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, untimed
    rounds = [calls[6 + 3 * r : 9 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    for name, ts in times.items():
        assert ts == [float(i + 1) for i, n in enumerate(calls) if n == name and i >= 6]


def test_results_record_commit_cpu_and_command(step_result):
    """Every benchmark result carries the provenance of speed.provenance (convention 10)."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert step_result["git_commit"] == head and isinstance(step_result["git_dirty"], bool)
    assert step_result["host"]["cpu"] and "cpu_isa" in step_result["host"]
    assert step_result["command"] == "python benchmarks/train_step.py --smoke"
