"""MLServer's side of the OIP benchmark: one ONNX file on onnxruntime.

MLServer ships no ONNX runtime of its own, so this is the custom runtime a
team would write (the pattern MLServer's docs show): one onnxruntime
session per worker process, one intra-op thread (ORT_THREADS), inputs and
outputs through MLServer's NumpyCodec, `outputs` in the request honoured.

The model file is the model settings' `parameters.uri`.
"""

import os

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("ORT_THREADS", "1"))
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            self.settings.parameters.uri, options, providers=["CPUExecutionProvider"]
        )
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        wanted = [o.name for o in payload.outputs] if payload.outputs else self._outputs
        values = self._session.run(wanted, feeds)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(n, v) for n, v in zip(wanted, values)],
        )
