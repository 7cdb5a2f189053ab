"""text-bytes: a preprocessor written in Python, built with componentize-py.

Turns a UTF-8 text into one u8 tensor `text` holding its bytes, lowercased
unless the stage's config sets `lowercase = "false"`. A body that is not
UTF-8 is the caller's fault (an invalid-input error, HTTP 400).
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import store, types

KNOWN_KEYS = {"lowercase"}


class Preprocess(exports.Preprocess):
    def preprocess(self, input: types.Message) -> list[types.Tensor]:
        unknown = [key for key, _ in store.get_all() if key not in KNOWN_KEYS]
        if unknown:
            raise Err(types.Error_Internal(f"unknown config key {unknown[0]!r}"))
        try:
            text = bytes(input.body).decode("utf-8")
        except UnicodeDecodeError as error:
            raise Err(types.Error_InvalidInput(f"the body is not UTF-8: {error}"))
        if (store.get("lowercase") or "true") != "false":
            text = text.lower()
        data = text.encode("utf-8")
        return [
            types.Tensor(
                name="text",
                dimensions=[len(data)],
                ty=types.TensorType.U8,
                data=data,
            )
        ]
