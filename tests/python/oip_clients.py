"""The reference Open Inference Protocol client, tritonclient, against a live
Cascade host, unchanged: health, readiness, metadata and inference on
`embed`, `orientation` and the model-only `minilm`, in binary and JSON form,
each answer compared with what `/v1` answers; mistakes must raise with the
server's precise message.

Every check runs over HTTP and over gRPC (tritonclient.grpc).

Usage: oip_clients.py URL GRPC PNG   (URL: http://127.0.0.1:PORT; GRPC: 127.0.0.1:PORT;
PNG: a text line image)
       oip_clients.py tokens GRPC TOKEN   (a host started with --token TOKEN --token-read)
Run by tests/tests/oip_clients.rs with the venv `cargo xtask test` prepares.
"""

import sys
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
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


def modes(kind):
    """(binary?) modes a transport has: HTTP sends JSON or binary, gRPC raw bytes."""
    return (True, False) if kind is httpclient else (True,)


def tensor_input(kind, name, values, datatype, binary):
    tensor = kind.InferInput(name, list(values.shape), datatype)
    if kind is httpclient:
        tensor.set_data_from_numpy(values, binary_data=binary)
    else:
        tensor.set_data_from_numpy(values)
    return tensor


def requested(kind, name, binary):
    if kind is httpclient:
        return kind.InferRequestedOutput(name, binary_data=binary)
    return kind.InferRequestedOutput(name)


def message_function(kind, client, url, function, body, content_type):
    """A function that takes a message answers OIP with /v1's exact bytes."""
    expected = v1(url, function, body, content_type)
    for binary in modes(kind):
        # JSON carries text only: an image goes as binary data either way.
        as_binary = binary or not content_type.startswith("text/")
        message = tensor_input(kind, "message", np.array([body], dtype=np.object_), "BYTES", as_binary)
        wanted = requested(kind, "message", binary)
        result = client.infer(function, [message], outputs=[wanted], request_id="r1")
        got = result.as_numpy("message")[0]
        got = got if isinstance(got, bytes) else str(got).encode()
        check(got == expected, f"{function} (binary={binary}): {got[:80]!r} != {expected[:80]!r}")
        response = result.get_response()
        response_id = response["id"] if isinstance(response, dict) else response.id
        check(response_id == "r1", "the request id is echoed")


TOKENS = np.array([[101, 7592, 2088, 102]], dtype=np.int64)  # [CLS] hello world [SEP]


def input_names(kind, client):
    metadata = client.get_model_metadata("minilm", as_json=True) if kind is grpcclient \
        else client.get_model_metadata("minilm")
    return [spec["name"] for spec in metadata["inputs"]]


def minilm_inputs(kind, client, binary, datatype="INT64", shape=(1, 4)):
    inputs = []
    for name in input_names(kind, client):
        values = np.ones_like(TOKENS) if "mask" in name else (
            np.zeros_like(TOKENS) if "type" in name else TOKENS)
        if name == "input_ids":
            values = values.astype(np.int32 if datatype == "INT32" else np.int64).reshape(shape)
        inputs.append(tensor_input(kind, name, values,
                                   datatype if name == "input_ids" else "INT64", binary))
    return inputs


ANSWERS = []


def model_function(kind, client, url):
    """MiniLM alone: every mode carries the same bits; pooled, /v1's embedding."""
    answers = []
    for binary in modes(kind):
        output = requested(kind, "onnx::Shape_422", binary)
        result = client.infer("minilm", minilm_inputs(kind, client, binary), outputs=[output])
        answers.append(result.as_numpy("onnx::Shape_422"))
    ANSWERS.extend(answers)
    check(answers[0].shape == (1, 4, 384), f"shape {answers[0].shape}")
    check(all(np.array_equal(ANSWERS[0], a) for a in ANSWERS), "every mode's answer is equal")
    pooled = answers[0][0].mean(axis=0)
    pooled = pooled / np.linalg.norm(pooled)
    import json
    embedding = np.array(json.loads(v1(url, "embed", b"hello world", "text/plain"))["embeddings"][0])
    check(np.abs(pooled - embedding).max() < 1e-4, "pooled token embeddings equal embed's answer")


# The status each transport gives a caller's mistake and an unknown model.
STATUS = {
    httpclient: {"invalid": "400", "missing": "404"},
    grpcclient: {"invalid": "StatusCode.INVALID_ARGUMENT", "missing": "StatusCode.NOT_FOUND"},
}


def raises(call, expected, status=None):
    try:
        call()
    except InferenceServerException as e:
        check(expected in str(e), f"expected {expected!r} in {e}")
        if status is not None:
            check(str(e.status()) == status, f"status {e.status()} for {expected!r}, not {status}")
        return
    raise AssertionError(f"no error; expected {expected!r}")


def mistakes(kind, client):
    inputs = lambda **how: minilm_inputs(kind, client, True, **how)
    invalid, missing = STATUS[kind]["invalid"], STATUS[kind]["missing"]
    raises(lambda: client.infer("minilm", inputs(datatype="INT32")),
           "input \"input_ids\" is INT32; model minilm takes INT64", invalid)
    raises(lambda: client.infer("minilm", inputs(shape=(4,))),
           "input \"input_ids\" has shape [4]; model minilm takes [-1, -1]", invalid)
    raises(lambda: client.infer("minilm", inputs()[1:]), "model minilm needs input", invalid)
    raises(lambda: client.infer("nope", inputs()), "function nope is not published", missing)
    raises(lambda: client.infer("minilm", inputs(), model_version="9"),
           "model minilm has no version 9", missing)
    raises(lambda: client.get_model_metadata("nope"), "function nope is not published", missing)


def transport(kind, client, url, png):
    check(client.is_server_live(), "live")
    check(client.is_server_ready(), "ready")
    check(client.is_model_ready("embed"), "embed ready")
    check(client.is_model_ready("minilm", "1"), "minilm version 1 ready")
    if kind is httpclient:
        check(not client.is_model_ready("minilm", "2"), "minilm version 2 is not")
        server = client.get_server_metadata()
    else:
        raises(lambda: client.is_model_ready("minilm", "2"), "model minilm has no version 2")
        server = client.get_server_metadata(as_json=True)
    check("binary_tensor_data" in server["extensions"], "extension advertised")
    message_function(kind, client, url, "embed", b"tritonclient speaks to Cascade unchanged",
                     "text/plain")
    with open(png, "rb") as image:
        message_function(kind, client, url, "orientation", image.read(), "image/png")
    model_function(kind, client, url)
    mistakes(kind, client)


def main(url, grpc_url, png):
    transport(httpclient, httpclient.InferenceServerClient(url.removeprefix("http://")), url, png)
    transport(grpcclient, grpcclient.InferenceServerClient(grpc_url), url, png)
    print(f"ok: {CHECKS} checks over HTTP and gRPC")


def tokens(grpc_url, token):
    """gRPC calls need the token a REST call needs, in `authorization` metadata."""
    client = grpcclient.InferenceServerClient(grpc_url)
    check(client.is_server_live(), "live without a token")
    raises(lambda: client.is_model_ready("embed"), "needs `Authorization: Bearer",
           "StatusCode.UNAUTHENTICATED")
    raises(lambda: client.is_model_ready("embed", headers={"authorization": "Bearer wrong"}),
           "wrong token", "StatusCode.UNAUTHENTICATED")
    check(client.is_model_ready("embed", headers={"authorization": f"Bearer {token}"}),
          "ready with the token")
    message = grpcclient.InferInput("message", [1], "BYTES")
    message.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    raises(lambda: client.infer("embed", [message]), "with the invoke scope",
           "StatusCode.UNAUTHENTICATED")
    result = client.infer("embed", [message], headers={"authorization": f"Bearer {token}"})
    check(result.as_numpy("message")[0].startswith(b'{"embeddings"'), "infer with the token")
    print(f"ok: {CHECKS} token checks over gRPC")


if __name__ == "__main__":
    if sys.argv[1] == "tokens":
        tokens(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3])
