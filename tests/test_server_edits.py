"""POST /v1/images/edits on a real 2-rank server (torchrun, Ulysses 2): multipart and JSON bodies give the
image a one-process engine gives for the same references; bad uploads are 400s and the server keeps serving."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import uuid

import numpy as np
from PIL import Image
from server_utils import SMALL, Server, call

from flux_dist.config import load_config
from flux_dist.engine import Engine


def _png(w: int, h: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _multipart(fields: dict, files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    for i, (name, data) in enumerate(files):
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="r{i}.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{b}--\r\n".encode(), {"Content-Type": f"multipart/form-data; boundary={b}"}


def _image(body: bytes) -> np.ndarray:
    png = base64.b64decode(json.loads(body)["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def test_edits_endpoint_multipart_and_json(tmp_path):
    refs = [_png(96, 64, 1), _png(64, 64, 2)]
    s = Server(["--config", "configs/tiny.yaml", *SMALL], log_path=tmp_path / "server.log")
    try:
        s.wait_ready()
        fields = {"prompt": "make it red", "seed": "5", "num_inference_steps": "2"}
        body, headers = _multipart(fields, [("image", refs[0])])
        status, _, one = call(s.port, "POST", "/v1/images/edits", body, headers=headers)
        assert status == 200, one
        body, headers = _multipart(fields, [("image[]", refs[0]), ("image[]", refs[1])])
        status, _, two_mp = call(s.port, "POST", "/v1/images/edits", body, headers=headers)
        assert status == 200, two_mp
        js = {"prompt": "make it red", "seed": 5, "num_inference_steps": 2,
              "image": [base64.b64encode(r).decode() for r in refs]}
        status, _, two_js = call(s.port, "POST", "/v1/images/edits", js, headers={"Content-Type": "application/json"})
        assert status == 200, two_js
        bad = [({"prompt": "x", "image": base64.b64encode(b"not an image").decode()}, "cannot read image 1"),
               ({"prompt": "x", "image": base64.b64encode(refs[0][:200]).decode()}, "image 1"),
               ({"prompt": "x", "image": base64.b64encode(_png(32, 32, 3)).decode()}, "64"),
               ({"prompt": "x", "image": [base64.b64encode(refs[1]).decode()] * 5}, "over the limit of 4"),
               ({"prompt": "x"}, "at least one 'image'"), ({"prompt": "x", "image": "%%%"}, "base64")]
        for b, match in bad:
            status, _, out = call(s.port, "POST", "/v1/images/edits", b, headers={"Content-Type": "application/json"})
            assert status == 400 and match in out.decode(), (match, status, out)
        status, _, _ = call(s.port, "POST", "/v1/images/edits", b"x", headers={"Content-Type": "text/plain"})
        assert status == 415
        status, _, after = call(s.port, "POST", "/v1/images/edits", js, headers={"Content-Type": "application/json"})
        assert status == 200 and np.array_equal(_image(after), _image(two_js))  # still serving, same image
    finally:
        s.stop()
    cfg = load_config("configs/tiny.yaml", {"parallel.ulysses": 1, "request.max_sequence_length": 16})
    eng = Engine(cfg)
    req = dataclasses.replace(cfg.request, prompt="make it red", seed=5, steps=2, height=None, width=None)
    pil = [Image.open(io.BytesIO(r)) for r in refs]
    for got, images in ((one, pil[:1]), (two_mp, pil), (two_js, pil)):
        fresh = np.asarray(eng.generate(dataclasses.replace(req, images=images)).image, dtype=np.int16)
        assert _image(got).shape == fresh.shape == (64, 96, 3)
        assert np.abs(_image(got) - fresh).max() <= 1
