"""Configs: locked, every field commented, ':' arguments, and one-line errors for misspelt overrides."""

import os
import re

import pytest
from train_testutil import REPO, load_config, run_script

CONFIGS = ("easy_vqa", "tiny", "sort_of_clevr", "coco_retrieval", "coco_caption", "clevr", "manifest_vqa")
COMMENTED = (*CONFIGS, "common")  # common.py: the shared blocks, every field described once


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_locked(name):
    config = load_config(name)
    with pytest.raises(AttributeError):
        config.optim.learning_rate = 1.0  # not a field: a locked ConfigDict refuses it
    with pytest.raises(AttributeError):
        config.train.num_step = 3


@pytest.mark.parametrize("name", COMMENTED)
def test_every_field_has_a_comment(name):
    """Each `c.x = ...` assignment and each `key=value,` entry of a dict(...) field carries a # comment."""
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        lines = f.read().splitlines()
    field = re.compile(r"^\s*(c(\.\w+)+\s*=\s*(?!ml_collections\.ConfigDict\(\)$)|\w+=[^=].*,\s*(#.*)?$)")
    missing = [line for line in lines if field.match(line) and "#" not in line]
    assert not missing, f"fields without a comment in configs/{name}.py: {missing}"


def test_sort_of_clevr_arg_picks_the_fusion():
    assert load_config("sort_of_clevr", "fusion=cross").model.fusion.name == "cross"
    assert load_config("sort_of_clevr").model.fusion.name == "co_attention"
    with pytest.raises(ValueError, match="valid"):
        load_config("sort_of_clevr", "fusion=crosss")
    with pytest.raises(ValueError, match="valid"):
        load_config("sort_of_clevr", "fusoin=cross")


def test_every_experiment_config_has_the_accelerator_preset():
    """':accel=1' (configs/common.py: accelerator) sets bfloat16 compute and per-backend attention, nothing else."""
    names = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
    names = [n for n in names if n not in ("common", "perf")]  # perf.py: benchmark sizes, its own presets
    assert len(names) >= 8
    for name in names:
        plain, accel = load_config(name), load_config(name, "accel=1")
        assert (accel.model.dtype, accel.model.attention_impl) == ("bfloat16", "auto"), name
        assert plain.model.dtype == "float32", name
        plain.model.dtype, plain.model.attention_impl = "bfloat16", "auto"
        assert plain.to_dict() == accel.to_dict(), name


def test_misspelt_override_fails_in_one_line_with_valid_keys(tmp_path):
    out = run_script(
        "train.py", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.optim.lrr=0.1", timeout=60
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "optim.lrr" in out.stderr and "Did you mean lr" in out.stderr and "warmup_steps" in out.stderr
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))  # failed before doing anything


def test_readme_names_every_config():
    """README's "Configs: datasets and tasks" table names every file under configs/ (common.py: the shared blocks)."""
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## Configs: datasets and tasks")[1].split("\n## ")[0]
    names = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py") and f != "common.py")
    assert [n for n in names if f"`{n}" not in section] == []
