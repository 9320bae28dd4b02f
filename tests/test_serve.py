"""The `pomona serve` API on a real server process: answers, bad inputs (4xx with a message, the server keeps
serving), concurrency, Grad-CAM, and the Grad-CAM arithmetic itself."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pomona.cli.commands import run
from pomona.models.model import AppleNet
from pomona.reporting.explain import grad_cam

from conftest import SERVE_CLASSES, SERVER_LIMITS, held_out_photo


def post_photo(url, data: bytes, name="photo.jpg", content_type="image/jpeg", path="/predict"):
    return requests.post(url + path, files={"file": (name, data, content_type)}, timeout=60)


def assert_still_serving(url):
    r = post_photo(url, held_out_photo("Granny-Smith").read_bytes())
    assert r.status_code == 200 and r.json()["label"] == "Granny-Smith"


def test_health_and_page(server):
    health = requests.get(server + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["classes"] == SERVE_CLASSES and health["engine"] == "onnx"
    page = requests.get(server + "/", timeout=10)
    assert page.status_code == 200 and 'type="file"' in page.text and "Grad-CAM" in page.text


def test_predict_returns_the_variety(server):
    for variety in SERVE_CLASSES:
        r = post_photo(server, held_out_photo(variety).read_bytes())
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["label"] == variety
        assert [t["label"] for t in body["top"]][0] == variety and len(body["top"]) == 2
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert body["sure"] == (body["probability"] >= 0.6)  # the default --min-confidence
        assert body["verdict"] == (variety if body["sure"] else f"not sure: {variety} or {body['top'][1]['label']}")
    raw = requests.post(server + "/predict", data=held_out_photo("Pink-Lady").read_bytes(),
                        headers={"Content-Type": "image/jpeg"}, timeout=60)  # the raw body works too
    assert raw.status_code == 200 and raw.json()["label"] == "Pink-Lady"


def _png_of_size(w, h) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (w, h)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD_UPLOADS = {
    # name: (make bytes, expected status, words expected in the message)
    "not_an_image": (lambda photo: b"name,variety\nx,Fuji\n", 415, "not an image"),
    "empty": (lambda photo: b"", 422, "empty"),
    "truncated": (lambda photo: photo[: len(photo) // 3], 422, "cannot decode"),
    "pixel_bomb": (lambda photo: _png_of_size(4000, 3000), 413, "too many pixels"),
    "oversize": (lambda photo: photo + b"\0" * int(SERVER_LIMITS["max_upload_mb"] * 1e6), 413, "too large"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_get_4xx_with_a_message_and_the_server_keeps_serving(server, case):
    make, status, words = BAD_UPLOADS[case]
    r = post_photo(server, make(held_out_photo("Pink-Lady").read_bytes()))
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert_still_serving(server)


def test_other_bad_requests(server):
    def chunks():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(12):
            yield b"\0" * 50_000

    r = requests.post(server + "/predict", data=chunks(), headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 413 and "too large" in r.json()["detail"]
    r = requests.post(server + "/predict", files={"photo": ("a.jpg", b"xx", "image/jpeg")}, timeout=60)
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = requests.post(server + "/predict", json={"url": "http://example.com/apple.jpg"}, timeout=60)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    assert_still_serving(server)


def test_concurrent_requests_are_all_answered_alike(server):
    photos = [held_out_photo(c, i) for c in SERVE_CLASSES for i in range(3)] * 2
    sequential = [post_photo(server, p.read_bytes()).json()["probabilities"] for p in photos[:6]]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda p: post_photo(server, p.read_bytes()), photos))
    assert all(a.status_code == 200 for a in answers)
    for a, p in zip(answers, photos):
        assert a.json()["label"] == p.parent.name
    for a, s in zip(answers[:6], sequential):  # batched together or alone: the same probabilities
        assert a.json()["probabilities"] == pytest.approx(s, abs=1e-4)


def test_explain_endpoint_returns_an_overlay(server):
    r = post_photo(server, held_out_photo("Granny-Smith").read_bytes(), path="/explain")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-pomona-class"] == "Granny-Smith"
    assert Image.open(io.BytesIO(r.content)).size == (448, 448)
    r = requests.post(server + "/explain?class_name=Fuji", files={"file": ("a.jpg", b"x", "image/jpeg")}, timeout=30)
    assert r.status_code == 422 and "unknown class" in r.json()["detail"]


def test_explain_cli_writes_a_png(apple_run, tmp_path, capsys):
    out = tmp_path / "cam.png"
    assert run(["explain", str(apple_run), str(held_out_photo("Pink-Lady")), "--out", str(out), "--size", "300"]) == 0
    assert Image.open(out).size == (300, 300)
    assert "Grad-CAM for Pink-Lady" in capsys.readouterr().out
    assert run(["explain", str(apple_run), str(held_out_photo("Pink-Lady")), "--class", "Fuji"]) != 0


def test_explain_agrees_with_predict_and_draws_a_legend(apple_run, tmp_path, capsys):
    from pomona.data.images import load_image
    from pomona.inference.loaded import load_run
    from pomona.reporting.explain import explain_image, render_overlay

    for i, photo in enumerate([held_out_photo(c, i) for c in SERVE_CLASSES for i in range(2)]):
        capsys.readouterr()
        assert run(["predict", str(apple_run), str(photo), "--engine", "onnx"]) == 0
        predicted = capsys.readouterr().out.split(": ", 1)[1].split()[:2]
        assert run(["explain", str(apple_run), str(photo), "--engine", "onnx", "--out", str(tmp_path / f"{i}.png")]) == 0
        explained = capsys.readouterr().out.splitlines()[0].split(": ", 1)[1].split()[:2]
        assert explained == predicted  # the same class with the same probability: one prediction path
    run_, image = load_run(apple_run, "cpu"), load_image(held_out_photo("Pink-Lady"))
    result = explain_image(run_, image)
    assert result.probs == pytest.approx(run_.predict([held_out_photo("Pink-Lady")]).probs[0], abs=1e-5)
    plain = np.asarray(render_overlay(image, result.cam, run_.preprocessing, 300, caption=None, legend=False))
    drawn = np.asarray(render_overlay(image, result.cam, run_.preprocessing, 300, caption="Pink-Lady 97%"))
    band = 300 - 300 // 9
    assert np.array_equal(plain[:band], drawn[:band])  # the legend is a band at the bottom ...
    assert np.abs(plain[band:].astype(int) - drawn[band:]).mean() > 10  # ... with the colour bar and the caption


class _Features(torch.nn.Module):
    """A stand-in backbone whose last conv stage is the input itself and whose head pools it."""

    def forward_features(self, x):
        return x * 1.0

    def forward_head(self, x):
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def test_grad_cam_is_the_gradient_weighted_feature_map():
    head = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 0.0]]))
    model = AppleNet(_Features(), head)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cam, index, probs = grad_cam(model, x, class_index=0)
    # d logit_0 / d A_k = w_0k / (H W) everywhere, so Grad-CAM = ReLU(sum_k w_0k A_k) / max
    expected = torch.relu(1.0 * x[0, 0] - 2.0 * x[0, 1] + 0.5 * x[0, 2])
    assert index == 0 and probs.shape == (2,)
    assert np.allclose(cam, (expected / expected.max()).numpy(), atol=1e-5)
