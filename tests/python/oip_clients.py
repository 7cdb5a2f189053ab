"""The reference Open Inference Protocol client, tritonclient, against a live
Cascade host, unchanged: health, readiness, metadata and inference on
`embed`, `orientation` and the model-only `minilm`, in binary and JSON form,
each answer compared with what `/v1` answers; mistakes must raise with the
server's precise message.

Usage: oip_clients.py URL PNG   (URL: http://127.0.0.1:PORT; PNG: a text line image)
Run by tests/tests/oip_clients.rs with the venv `cargo xtask test` prepares.
"""

import sys
import urllib.request

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

CHECKS = 0


def check(condition, what):
    global CHECKS
    if not condition:
        raise AssertionError(what)
    CHECKS += 1


def v1(url, function, body, content_type):
    request = urllib.request.Request(
        f"{url}/v1/functions/{function}/invoke",
        data=body,
        headers={"content-type": content_type},
        method="POST",
    )
    with urllib.request.urlopen(request) as response:
        return response.read()


def message_function(client, url, function, body, content_type):
    """A function that takes a message answers OIP with /v1's exact bytes."""
    expected = v1(url, function, body, content_type)
    for binary in (True, False):
        message = httpclient.InferInput("message", [1], "BYTES")
        # JSON carries text only: an image goes as binary data either way.
        as_binary = binary or not content_type.startswith("text/")
        message.set_data_from_numpy(np.array([body], dtype=np.object_), binary_data=as_binary)
        wanted = httpclient.InferRequestedOutput("message", binary_data=binary)
        result = client.infer(function, [message], outputs=[wanted], request_id="r1")
        got = result.as_numpy("message")[0]
        got = got if isinstance(got, bytes) else str(got).encode()
        check(got == expected, f"{function} (binary={binary}): {got[:80]!r} != {expected[:80]!r}")
        check(result.get_response()["id"] == "r1", "the request id is echoed")


TOKENS = np.array([[101, 7592, 2088, 102]], dtype=np.int64)  # [CLS] hello world [SEP]


def minilm_inputs(client, binary, datatype="INT64", shape=(1, 4)):
    inputs = []
    for spec in client.get_model_metadata("minilm")["inputs"]:
        name = spec["name"]
        values = np.ones_like(TOKENS) if "mask" in name else (
            np.zeros_like(TOKENS) if "type" in name else TOKENS)
        if name == "input_ids":
            values = values.astype(np.int32 if datatype == "INT32" else np.int64).reshape(shape)
        tensor = httpclient.InferInput(name, list(values.shape),
                                       datatype if name == "input_ids" else "INT64")
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)
    return inputs


def model_function(client, url):
    """MiniLM alone: JSON and binary carry the same bits; pooled, /v1's embedding."""
    answers = []
    for binary in (True, False):
        output = httpclient.InferRequestedOutput("onnx::Shape_422", binary_data=binary)
        result = client.infer("minilm", minilm_inputs(client, binary), outputs=[output])
        answers.append(result.as_numpy("onnx::Shape_422"))
    check(answers[0].shape == (1, 4, 384), f"shape {answers[0].shape}")
    check(np.array_equal(answers[0], answers[1]), "binary and JSON answers are equal")
    pooled = answers[0][0].mean(axis=0)
    pooled = pooled / np.linalg.norm(pooled)
    import json
    embedding = np.array(json.loads(v1(url, "embed", b"hello world", "text/plain"))["embeddings"][0])
    check(np.abs(pooled - embedding).max() < 1e-4, "pooled token embeddings equal embed's answer")


def raises(call, expected):
    try:
        call()
    except InferenceServerException as e:
        check(expected in str(e), f"expected {expected!r} in {e}")
        return
    raise AssertionError(f"no error; expected {expected!r}")


def mistakes(client):
    raises(lambda: client.infer("minilm", minilm_inputs(client, True, "INT32")),
           "input \"input_ids\" is INT32; model minilm takes INT64")
    raises(lambda: client.infer("minilm", minilm_inputs(client, True, shape=(4,))),
           "input \"input_ids\" has shape [4]; model minilm takes [-1, -1]")
    raises(lambda: client.infer("minilm", minilm_inputs(client, True)[1:]), "model minilm needs input")
    raises(lambda: client.infer("nope", minilm_inputs(client, True)), "function nope is not published")
    raises(lambda: client.infer("minilm", minilm_inputs(client, True), model_version="9"),
           "model minilm has no version 9")
    raises(lambda: client.get_model_metadata("nope"), "function nope is not published")


def main(url, png):
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    check(client.is_server_live(), "live")
    check(client.is_server_ready(), "ready")
    check(client.is_model_ready("embed"), "embed ready")
    check(client.is_model_ready("minilm", "1"), "minilm version 1 ready")
    check(not client.is_model_ready("minilm", "2"), "minilm version 2 is not")
    check("binary_tensor_data" in client.get_server_metadata()["extensions"], "extension advertised")
    check(client.get_model_metadata("minilm")["platform"] == "cascade", "metadata")
    message_function(client, url, "embed", b"tritonclient speaks to Cascade unchanged", "text/plain")
    with open(png, "rb") as image:
        message_function(client, url, "orientation", image.read(), "image/png")
    model_function(client, url)
    mistakes(client)
    print(f"ok: {CHECKS} checks")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
