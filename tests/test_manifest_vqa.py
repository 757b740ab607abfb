"""configs/manifest_vqa.py: VQA on a user manifest in one command, image-grouped by image path (a local fixture of
generated PNGs and train / validation / test .jsonl files; no network)."""

import json
import math

import pytest
from PIL import Image

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _write_dataset(folder):
    """3 images per colour; each image gets a colour and a yes/no question (several rows share an image)."""
    (folder / "images").mkdir(parents=True)
    rows = {"train": [], "validation": [], "test": []}
    for k, (name, rgb) in enumerate(sorted(COLOURS.items()) * 3):
        Image.new("RGB", (40 + k, 30), rgb).save(folder / "images" / f"{k}.png")
        split = ("train", "train", "validation", "test")[k % 4] if k >= 3 else "train"  # every colour in train
        path = f"images/{k}.png" if k % 2 else f"./images/{k}.png"
        rows[split] += [
            {"image": path, "text": "what colour is it?", "label": name, "question_type": "colour"},
            {"image": path, "text": "is it red?", "label": "yes" if name == "red" else "no", "question_type": "yes_no"},
        ]
    for split, items in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


@pytest.mark.slow  # ~40 s on 2 shared CPU cores
def test_manifest_vqa_trains_3_steps_grouped_and_evaluates(tmp_path):
    from train_testutil import load_config, train_losses

    from vtfusion_jax import train_lib

    _write_dataset(tmp_path / "my data")
    config = load_config("manifest_vqa", f"manifest={tmp_path / 'my data'}", dataset__builder_kwargs__image_size=32,
                         train__global_batch_size=16, train__images_per_batch=8, train__num_steps=3,
                         train__log_every_steps=1, train__eval_every_steps=0, train__eval_batch_size=16,
                         eval__num_attention_maps=1, mesh_shape=(8, 1, 1))  # fmt: skip
    assert train_lib.train_and_evaluate(config, str(tmp_path / "run"))["step"] == 3
    losses = train_losses(str(tmp_path / "run"))
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
    task, params, _ = train_lib.restore(config, str(tmp_path / "run"), "latest")
    plan = task.group_plan()  # grouped by image path: 2 questions per image
    assert len(plan.groups) == 6 and all(len(g) == 2 for g in plan.groups)
    (tmp_path / "out").mkdir()
    out = task.evaluate(params, "test", str(tmp_path / "out"))
    assert out["num_examples"] == 4 and set(out["per_type"]) == {"colour", "yes_no"}
    assert task.meta["label_names"] == ["blue", "green", "no", "red", "yes"]
