"""benchmarks/scaling.py on the tiny config: a subprocess without XLA_FLAGS (the script fakes the 8 CPU devices
itself) compiles the step per mesh layout; parameters sharded over fsdp shrink the per-device arguments, and fsdp /
tensor parallelism insert collectives that data parallelism does not."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import scaling  # noqa: E402


@pytest.mark.slow
def test_layouts_compile_with_sharded_memory_and_collectives(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "benchmarks/scaling.py", "--config=configs/perf.py:preset=tiny", "--large=0"]
    cmd += ["--layouts=data,fsdp,tensor", "--remat=none", f"--out_dir={tmp_path}"]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=300, capture_output=True)
    r = {n: json.load(open(tmp_path / f"{n}.json")) for n in ("data", "fsdp", "tensor")}
    assert {n: x["host"]["num_devices"] for n, x in r.items()} == {"data": 8, "fsdp": 8, "tensor": 8}
    assert len({x["num_params"] for x in r.values()}) == 1
    arg = {n: x["memory_per_device"]["argument_size"] for n, x in r.items()}
    assert arg["fsdp"] < arg["data"] / 2 and arg["tensor"] < arg["data"]  # the state is sharded, not replicated
    # the data layout's arguments are the whole replicated state (+ its batch shard)
    assert r["data"]["state_bytes_per_device"] <= arg["data"] < 1.1 * r["data"]["state_bytes_per_device"]
    coll = {n: x["collectives"] for n, x in r.items()}
    assert coll["data"]["all-gather"] == 0 and coll["fsdp"]["all-gather"] > 0  # parameters gathered on use
    assert sum(coll["tensor"].values()) > sum(coll["data"].values())
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- scaling-table:begin -->\nold\n<!-- scaling-table:end -->\nrest\n")
    scaling.render(str(tmp_path), str(doc))
    text = doc.read_text()
    assert "old" not in text and text.startswith("intro") and text.endswith("rest\n")
    assert text.count("| fsdp | 1x8x1 | none |") == 1 and "--layouts=data,fsdp,tensor" in text
