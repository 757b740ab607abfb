"""Bad input (`pytest -m faults`), partly hypothesis-generated: each class has one documented outcome.

| input                                   | manifest builder                  | predict.py                 |
|-----------------------------------------|-----------------------------------|----------------------------|
| random bytes / truncated PNG or JPEG    | bad row (error names file:line)   | one-line error, exit 2     |
| 0 x 0, or > MAX_IMAGE_PIXELS (20000^2)  | bad row, refused from the header  | one-line error, exit 2     |
| 16-bit, CMYK image                      | decoded (16-bit scaled to 8 bits) | decoded                    |
| line not UTF-8 / not JSON               | bad row                           | -                          |
| empty / whitespace-only text            | bad row                           | one-line error, exit 2     |
| 100,000-character / invalid-UTF-8 text  | truncated to max_len tokens       | truncated; U+FFFD dropped  |
| label not in the train split            | bad row                           | -                          |

"Bad row": ManifestError naming the manifest file and line, or a counted skip with skip_bad_rows=True.
A truncated file is either refused or, when every pixel was already present (a PNG cut after its image data),
decoded to exactly the original pixels: never a silently different image.
"""

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from train_testutil import REPO, subprocess_env

from vtfusion_jax import eval_lib
from vtfusion_jax.data import datasets, manifest, pipeline
from vtfusion_jax.data.manifest import ManifestError
from vtfusion_jax.data.tokenizer import Tokenizer

pytestmark = pytest.mark.faults
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _encoded(fmt: str, mode: str = "RGB", size=(24, 16)) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (its pixel data is that of a 4 x 4 image)."""
    b = bytearray(_encoded("PNG", size=(4, 4)))
    b[16:24] = struct.pack(">II", width, height)
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(b[12:29])) & 0xFFFFFFFF)
    return bytes(b)


def _outcome(data: bytes):
    try:
        return np.asarray(manifest.decode_image(io.BytesIO(data)))
    except Exception as e:  # noqa: BLE001 (any refusal is fine; a silent wrong image is not)
        return e


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(data):
    assert isinstance(_outcome(data), Exception)


@FAST
@given(fmt=st.sampled_from(["PNG", "JPEG"]), cut=st.floats(0.0, 0.999))
def test_truncated_images_are_refused_or_exact(fmt, cut):
    full = _encoded(fmt)
    whole = np.asarray(manifest.decode_image(io.BytesIO(full)))
    got = _outcome(full[: int(len(full) * cut)])
    assert isinstance(got, Exception) or np.array_equal(got, whole)


def test_empty_and_huge_images_are_refused_from_the_header():
    assert "cannot identify" in str(_outcome(png_header_only(0, 0)))
    started = time.time()
    err = _outcome(png_header_only(20000, 20000))  # 1.2 GB of RGB if it were decoded
    assert isinstance(err, ValueError) and "pixel limit (Image size (400000000 pixels)" in str(err)
    err = _outcome(png_header_only(10000, 9000))  # over the limit, but under PIL's 2x refusal
    assert isinstance(err, ValueError) and "10000 x 9000 pixels is over the 89,478,485-pixel limit" in str(err)
    assert time.time() - started < 2.0


@FAST
@given(st.integers(0, 65535))
def test_16_bit_images_are_scaled_to_8_bits(value):
    buf = io.BytesIO()
    Image.fromarray(np.full((3, 5), value, np.uint16)).save(buf, "PNG")
    out = manifest.decode_image(io.BytesIO(buf.getvalue()))
    assert out.mode == "RGB" and (np.asarray(out) == round(value / 257)).all()


def test_cmyk_jpeg_becomes_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)  # pure red in CMYK
    out = np.asarray(manifest.decode_image(io.BytesIO(buf.getvalue())), np.int32)
    assert out.shape == (8, 8, 3) and np.abs(out - [255, 0, 0]).max() <= 8


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.text(st.characters(exclude_categories=())), st.binary(max_size=200)))
def test_tokenizer_takes_any_text(text):
    tok = _tokenizer()
    ids = tok.encode(text)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and 2 <= len(ids) <= tok.max_len
    batch = tok([text, "   ", ""])
    assert batch["text_ids"].shape == (3, tok.max_len) and batch["text_mask"][:, :2].all()


def test_tokenizer_truncates_100k_characters_quickly():
    tok = _tokenizer()
    started = time.time()
    ids = tok.encode("what colour is the shape " * 4000)  # 100,000 characters
    assert len(ids) == tok.max_len and ids[-1] == tok.sep_id and time.time() - started < 5.0


_TOK = []


def _tokenizer() -> Tokenizer:
    if not _TOK:
        _TOK.append(Tokenizer(max_len=12))
    return _TOK[0]


@FAST
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=6))
def test_manifest_parser_names_every_bad_line(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("m")
    Image.new("RGB", (4, 4)).save(folder / "ok.png")
    good = json.dumps({"image": "ok.png", "text": "q", "label": "a"}).encode()
    path = folder / "train.jsonl"
    path.write_bytes(b"\n".join([good, *(x.replace(b"\n", b" ") for x in lines)]) + b"\n")
    rows = manifest.parse_rows(str(path), str(folder))
    assert rows[0][1] is not None
    for lineno, row, error in rows:
        assert (row is None) != (error is None)
        if error is not None:
            assert error.startswith(f"{path}:{lineno}: ")


BAD_ROWS = {  # image file bytes (None: no file), row overrides, expected message
    "random_bytes": (os.urandom(300), {}, "cannot decode image"),
    "truncated_png": (_encoded("PNG")[:60], {}, "cannot decode image"),
    "truncated_jpeg": (_encoded("JPEG")[:200], {}, "cannot decode image"),
    "zero_size": (png_header_only(0, 0), {}, "cannot decode image"),
    "huge": (png_header_only(20000, 20000), {}, "pixel limit"),
    "empty_text": (None, {"text": ""}, "empty text"),
    "blank_text": (None, {"text": " \t "}, "empty text"),
}
UNSEEN = {"image": "red.png", "text": "unseen label", "label": "never_in_train"}  # kept (label -1), not a bad row


def _bad_folder(root):
    d = root / "bad data"
    d.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "red.png")
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(buf, "PNG")
    (d / "white16.png").write_bytes(buf.getvalue())
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    train = [
        {"image": "red.png", "text": "what colour?", "label": "red"},
        {"image": "white16.png", "text": "x" * 100_000, "label": "white"},
        {"image": "cmyk.jpg", "text": "cmyk", "label": "red"},
    ]
    test = []
    for name, (data, extra, _) in BAD_ROWS.items():
        if data is not None:
            (d / f"{name}.img").write_bytes(data)
        image = f"{name}.img" if data is not None else "red.png"
        test.append(dict({"image": image, "text": name, "label": "red"}, **extra))
    lines = [json.dumps(r) for r in train]
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    (d / "test.jsonl").write_bytes(
        b"\n".join(
            [json.dumps(train[0]).encode(), b"\xff\xfe not utf-8", *(json.dumps(r).encode() for r in [*test, UNSEEN])]
        )
        + b"\n"
    )
    return d


def test_manifest_build_and_pipeline_with_every_bad_row_class(tmp_path):
    folder = _bad_folder(tmp_path)
    kwargs = dict(path=str(folder), image_size=8)
    with pytest.raises(ManifestError, match=r"test.jsonl:2: line is not valid UTF-8"):
        datasets.dataset_meta("manifest", data_dir=str(tmp_path / "strict"), builder_kwargs=kwargs)
    kwargs["skip_bad_rows"] = True
    meta = datasets.dataset_meta("manifest", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    assert meta["num_examples"] == {"train": 3, "test": 2}  # the good row and the unseen-label row
    assert meta["skipped_rows"] == {"train": 0, "test": 1 + len(BAD_ROWS)}
    test_src = datasets.get_data_source("manifest", "test", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    assert sorted(ex["label"] for ex in test_src.__getitems__([0, 1])) == [-1, 0]  # unseen -> -1; "red" -> 0
    src = datasets.get_data_source("manifest", "train", data_dir=str(tmp_path / "tfds"), builder_kwargs=kwargs)
    rows = {ex["line"]: ex for ex in src.__getitems__([0, 1, 2])}
    assert (rows[2]["image"] == 255).all()  # 16-bit white -> 8-bit white
    assert np.abs(rows[3]["image"].astype(int) - [255, 0, 0]).max() <= 8  # CMYK red -> RGB red
    # The pipeline feeds the 100,000-character question as max_len tokens, in fixed-shape batches.
    import jax

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    batches = pipeline.make_eval_iterator(
        dataset="manifest",
        split="train",
        global_batch_size=4,
        mesh=mesh,
        tokenizer=_tokenizer(),
        data_dir=str(tmp_path / "tfds"),
        builder_kwargs=kwargs,
    )
    (batch,) = list(batches)
    assert batch["text_ids"].shape == (4, 12) and int(np.asarray(batch["valid"]).sum()) == 3


@pytest.mark.parametrize("name", ["random_bytes", "truncated_png", "truncated_jpeg", "zero_size", "huge"])
def test_predict_refuses_bad_images_in_one_line(tmp_path, name):
    path = tmp_path / f"{name}.img"
    path.write_bytes(BAD_ROWS[name][0])
    with pytest.raises(eval_lib.PredictError, match=f"cannot read image .*{name}.img"):
        eval_lib.predict(str(tmp_path / "no_workdir"), str(path), question="what colour?")
    for question in ("", "  \n"):
        with pytest.raises(eval_lib.PredictError, match="the question is empty"):
            eval_lib.predict(str(tmp_path / "no_workdir"), str(path), question=question)


def test_predict_py_bad_image_exits_2_with_one_line(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(20000, 20000))
    out = subprocess.run(
        [sys.executable, "predict.py", f"--workdir={tmp_path}", f"--image={path}", "--question=what?"],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert "error: cannot read image" in out.stderr and "pixel limit" in out.stderr
