"""What users would run instead of Cascade: FastAPI + uvicorn + onnxruntime.

Serves the same two functions as Cascade's examples, the same way a careful
team would write them, so the benchmark compares like with like:

- POST /embed        text/plain body -> {"embeddings": [[384 floats]]}
  (tokenizers, truncation at 128, paraphrase-MiniLM-L3-v2 token embeddings,
  mean pooling over the attention mask, L2 normalisation)
- POST /orientation  PNG/JPEG body -> {"predictions": [[{"label", "score"}, ...]]}
  (PP-OCR recipe: height 48 keeping the aspect ratio, at most 192 wide, zero
  padding on the right, (v/255 - 0.5) / 0.5, BGR, ch_ppocr_mobile_v2.0_cls)

The work runs inline in the handlers: with one worker process per core and
one onnxruntime thread per session this is the fastest arrangement for
CPU-bound requests (a thread-pool hop only adds latency).

Environment: CASCADE_MODELS (the models cache), ORT_THREADS (default 1).
"""

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request, Response
from PIL import Image
from tokenizers import Tokenizer

MODELS = os.environ["CASCADE_MODELS"]
THREADS = int(os.environ.get("ORT_THREADS", "1"))
EMBED_OUTPUT = "onnx::Shape_422"  # token embeddings, as Cascade's embed selects


def session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(
        os.path.join(MODELS, name), options, providers=["CPUExecutionProvider"]
    )


tokenizer = Tokenizer.from_file(os.path.join(MODELS, "tokenizer.json"))
tokenizer.enable_truncation(max_length=128)
tokenizer.enable_padding()
embedder = session("paraphrase-MiniLM-L3-v2.onnx")
embed_inputs = {i.name for i in embedder.get_inputs()}
classifier = session("ch_ppocr_mobile_v2.0_cls_infer.onnx")
classifier_input = classifier.get_inputs()[0].name
LABELS = ["0", "180"]

app = FastAPI()


def json_response(value) -> Response:
    return Response(json.dumps(value), media_type="application/json")


@app.post("/embed")
async def embed(request: Request) -> Response:
    text = (await request.body()).decode("utf-8")
    encodings = tokenizer.encode_batch([text])
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in embed_inputs:
        feeds["token_type_ids"] = np.zeros_like(ids)
    (tokens,) = embedder.run([EMBED_OUTPUT], feeds)
    weights = mask[..., None].astype(np.float32)
    pooled = (tokens * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return json_response({"embeddings": pooled.tolist()})


@app.post("/orientation")
async def orientation(request: Request) -> Response:
    image = Image.open(io.BytesIO(await request.body())).convert("RGB")
    width = min(192, max(1, round(image.width * 48 / image.height)))
    pixels = np.asarray(image.resize((width, 48), Image.BILINEAR), dtype=np.float32)
    pixels = (pixels / 255.0 - 0.5) / 0.5
    batch = np.zeros((1, 3, 48, 192), dtype=np.float32)
    batch[0, :, :, :width] = pixels[:, :, ::-1].transpose(2, 0, 1)
    (scores,) = classifier.run(None, {classifier_input: batch})
    order = np.argsort(-scores[0])
    return json_response(
        {"predictions": [[{"label": LABELS[i], "score": float(scores[0][i])} for i in order]]}
    )
