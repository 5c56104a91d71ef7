"""The vLLM captioning backend on CPU (vllm is not installed here, and never by `make test`): prompt building per
model family, the engine choice from config and CLI, the one-line error naming the fix, the quarantine contract,
and the GPU worker image that installs the extra."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from extractors.captioner import Captioner
from extractors.registry import caption_spec, config_spec, preflight
from extractors.vllm_captioner import (
    DEFAULT_CHAT_PROMPT,
    FAMILIES,
    VLLM_FIX,
    VllmCaptioner,
    chat_prompt,
    family_of,
    untrained_qwen2_vl,
)
from recipes.config import ConfigError, parse_config
from stores.errors import TerminalError

REPO = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_no_vllm = pytest.mark.skipif(
    HAS_VLLM, reason="vllm is installed here: the missing-extra path cannot run"
)


def _png(seed: int, side: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side + 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _config(caption_engine: str | None = None, kind: str = "caption") -> dict:
    entry = {"feature": "caption" if kind == "caption" else "title_vec", "kind": kind}
    entry |= {"model": "tiny-test"} if kind == "caption" else {}
    entry |= {"caption_engine": caption_engine} if caption_engine else {}
    return {"name": "t", "sources": [{"kind": "demo"}], "extract": [entry]}


def test_prompts_follow_each_family_format():
    """Each family's prompt holds exactly one image placeholder of that family, before the question, and ends where
    the assistant's reply starts; every known model type maps to a family with a prompt."""
    q = "What is shown?"
    qwen = chat_prompt("qwen2_vl", q)
    assert qwen.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert qwen.index("<|image_pad|>") < qwen.index(q) and qwen.endswith("<|im_start|>assistant\n")
    smol = chat_prompt("smolvlm", q)
    assert smol.count("<image>") == 1 and smol.index("<image>") < smol.index(q)
    assert smol.startswith("<|im_start|>User:") and smol.endswith("<end_of_utterance>\nAssistant:")
    llava = chat_prompt("llava", q)
    assert llava == f"USER: <image>\n{q} ASSISTANT:"
    for model_type in FAMILIES:
        assert q in chat_prompt(family_of(model_type), q)
    assert family_of("qwen2_5_vl") == "qwen2_vl" and family_of("idefics3") == "smolvlm"


def test_unknown_family_is_one_line_naming_the_supported_ones():
    """A model type vLLM captioning has no prompt for stops with one line naming the choices and the fallback."""
    with pytest.raises(TerminalError) as err:
        family_of("blip")
    message = str(err.value)
    assert "\n" not in message and "'blip'" in message and "qwen2_vl" in message
    assert "--caption-engine transformers" in message


def test_qwen_prompt_is_the_one_transformers_renders_and_its_placeholder_expands(tmp_path):
    """The untrained Qwen2-VL folder (the GPU benchmark's model) gives transformers' Captioner the same prompt
    text vLLM is sent, and the Qwen2-VL processor expands its one <|image_pad|> into the image's patch tokens:
    both engines caption from the same prompt and token budget."""
    folder = untrained_qwen2_vl(str(tmp_path / "qwen2-vl"))
    captioner = Captioner(folder, max_new_tokens=3, min_new_tokens=3, device="cpu")
    assert captioner._text == chat_prompt("qwen2_vl", DEFAULT_CHAT_PROMPT)
    image = Image.open(io.BytesIO(_png(1, side=56)))
    inputs = captioner.processor(images=[image], text=[captioner._text], return_tensors="pt")
    pad = captioner.processor.image_token_id
    expected = int(inputs["image_grid_thw"][0].prod()) // captioner.processor.image_processor.merge_size**2
    assert int((inputs["input_ids"][0] == pad).sum()) == expected > 1
    out = captioner({"image": _objects([_png(2), b"not an image", None])})
    assert isinstance(out["caption"][0], str) and out["error"][0] is None
    assert out["error"][1].startswith("unsupported_format") and out["error"][2].startswith("missing_image")


def test_engine_choice_reaches_the_vllm_class_from_cli_spec_and_config():
    """`caption_spec(engine="vllm")` and a config entry with `caption_engine: vllm` (what recipes/refresh.py passes
    to config_spec) both give a VllmCaptioner spec; the default stays the transformers Captioner."""
    assert caption_spec("tiny-test").resolve() is Captioner
    assert caption_spec("Qwen/Qwen2-VL-2B-Instruct", engine="vllm").cls is VllmCaptioner
    entry = parse_config(_config("vllm")).extract[0]
    spec = config_spec(
        entry.kind, entry.model, entry.pretrained, entry.prompt, entry.max_new_tokens, entry.caption_engine
    )
    assert spec.cls is VllmCaptioner and spec.kwargs["model"] == "test:tiny-captioner"
    default = parse_config(_config()).extract[0]
    assert default.caption_engine == "transformers"
    assert config_spec("caption", default.model, caption_engine=default.caption_engine).resolve() is Captioner
    with pytest.raises(TerminalError, match="transformers or vllm"):
        caption_spec("x", engine="onnx")


def test_config_rejects_caption_engine_off_caption_and_unknown_engines():
    """caption_engine belongs to caption entries and takes transformers or vllm only: anything else is an error
    naming the key."""
    with pytest.raises(ConfigError, match="caption_engine"):
        parse_config(_config("vllm", kind="text"))
    with pytest.raises(ConfigError, match="caption_engine"):
        parse_config(_config("tensorrt"))


@needs_no_vllm
def test_missing_vllm_is_one_terminal_line_naming_the_fix():
    """Without the extra, preflight and building the extractor both raise one TerminalError line that names the
    extra and the GPU worker image."""
    spec = caption_spec("Qwen/Qwen2-VL-2B-Instruct", engine="vllm")
    for attempt in (lambda: preflight(spec), spec.build):
        with pytest.raises(TerminalError) as err:
            attempt()
        assert str(err.value) == VLLM_FIX
        assert "pip install 'mmfeat[vllm]'" in VLLM_FIX and "infra/docker/Dockerfile.gpu-vllm" in VLLM_FIX


@needs_no_vllm
def test_mmfeat_caption_with_vllm_missing_exits_with_one_line(tmp_path):
    """`mmfeat caption --caption-engine vllm` without the extra exits non-zero before any work with the fix on
    one stderr line and no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    mmfeat = Path(sys.executable).with_name("mmfeat")
    done = subprocess.run(
        [
            str(mmfeat),
            "--workspace",
            str(tmp_path / "ws"),
            "caption",
            "--caption-engine",
            "vllm",
            "--model",
            "tiny-test",
            "--engine",
            "local",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and VLLM_FIX in lines[0], done.stderr
    assert "Traceback" not in done.stderr + done.stdout


class _EchoEngine:
    """Stands in for vllm.LLM (not installable here): echoes each image's width; raises on a 1x1 image, as a
    processor refusing an image would, so the per-row fallback is exercised."""

    def generate(self, requests, sampling, use_tqdm=False):
        for r in requests:
            if r["multi_modal_data"]["image"].size == (1, 1):
                raise ValueError("image too small for the processor")
        return [
            SimpleNamespace(outputs=[SimpleNamespace(text=f" w{r['multi_modal_data']['image'].width} ")])
            for r in requests
        ]


def test_bad_rows_get_captioner_reasons_and_a_refused_image_spares_the_batch():
    """Undecodable and missing images get the same reasons as the transformers Captioner; an image the engine
    refuses becomes "preprocess_error" for that row only, the other rows keep their captions in order."""
    captioner = VllmCaptioner.__new__(VllmCaptioner)  # no engine start: vllm is not installable on CPU
    captioner._text, captioner._llm, captioner._sampling = chat_prompt("qwen2_vl", "q"), _EchoEngine(), None
    captioner.output_column, captioner.error_column = "caption", "error"
    batch = {"image": _objects([_png(1), b"\xff\xd8garbage", None, _png_1x1(), _png(3, side=40)])}
    out = captioner(batch)
    reference = Captioner("test:tiny-captioner", max_new_tokens=2, device="cpu")(
        {"image": _objects([b"\xff\xd8garbage", None])}
    )
    assert list(out["error"][1:3]) == list(reference["error"])
    assert out["caption"][0] == "w56" and out["caption"][4] == "w48"
    assert out["caption"][3] is None and out["error"][3].startswith("preprocess_error: ValueError")
    assert out["caption"][1] is None and out["caption"][2] is None
    with pytest.raises(ValueError, match="too small"):  # every row refused: the engine's failure, not data
        captioner({"image": _objects([_png_1x1(), _png_1x1()])})


def _png_1x1() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    return buf.getvalue()


def test_gpu_vllm_image_extends_the_gpu_worker_image_with_the_extra():
    """infra/docker/Dockerfile.gpu-vllm starts from the -gpu tag the main Dockerfile builds, installs the `vllm`
    extra that pyproject.toml declares, and pins the same Ray as the main image; `make test`'s extras do not
    include vllm."""
    main = (REPO / "infra" / "docker" / "Dockerfile").read_text()
    vllm_file = (REPO / "infra" / "docker" / "Dockerfile.gpu-vllm").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu_tag = next(t for t in re.findall(r"-t (\S+)", main) if t.endswith("-gpu"))
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(gpu_tag)}$", vllm_file, re.M)
    assert '".[vllm]"' in vllm_file and project["optional-dependencies"]["vllm"] == ["vllm"]
    ray_pin = re.compile(r"ray\[[a-z,]+\]==([\d.]+)")
    assert ray_pin.search(vllm_file).group(1) == ray_pin.search(main).group(1)
    assert not any("vllm" in d for d in project["optional-dependencies"]["test"] + project["dependencies"])


@pytest.mark.parametrize("script", ["gpu_caption.py", "gpu_all.sh"])  # gpu_caption imports gpu_encode
def test_gpu_benchmarks_stop_with_one_line_without_cuda(script):
    """Where CUDA is absent, each GPU benchmark exits 2 with one stderr line saying so, never a traceback."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    path = REPO / "bench" / script
    cmd = ["bash", str(path)] if script.endswith(".sh") else [sys.executable, str(path)]
    env["PYTHON"] = sys.executable
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "no CUDA device" in lines[0], done.stderr
