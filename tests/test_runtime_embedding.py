"""The embedding table read in place from embed.onnx equals running the graph, value for value."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgemoe.runtime.embedding import MappedEmbedding
from test_runtime_fixtures import tiny  # noqa: F401 (fixture)


@pytest.mark.parametrize("family,precision", [("stablelm", "int4"), ("qwen", "fp32"), ("deepseek-vl2-tiny", "int4")])
def test_mapped_rows_equal_the_embed_graph(tiny, family: str, precision: str) -> None:
    path = tiny.bundle(family, precision) / "graphs" / "embed.onnx"
    table = MappedEmbedding.open(path)
    assert table is not None
    ids = np.array([0, 1, table.table.shape[0] - 1, 7, 7, 3], np.int64)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    got = table.rows(ids)
    assert got.dtype == want.dtype == np.float32 and np.array_equal(got, want)


def test_any_other_graph_keeps_its_session(tmp_path) -> None:
    weight = helper.make_tensor("w", TensorProto.FLOAT16, [4, 3], np.arange(12, dtype=np.float16).tobytes(), raw=True)
    nodes = [helper.make_node("Gather", ["w", "ids"], ["rows"]), helper.make_node("Cast", ["rows"], ["embeds"], to=1)]
    for extra, expect in (([], True), ([helper.make_node("Neg", ["embeds"], ["out"])], False)):
        out = "out" if extra else "embeds"
        graph = helper.make_graph(nodes + extra, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["S"])],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["S", 3])], [weight])
        path = tmp_path / f"embed{len(extra)}.onnx"
        onnx.save(helper.make_model(graph), str(path))
        table = MappedEmbedding.open(path)
        assert (table is not None) is expect
        if table is not None:
            assert np.array_equal(table.rows(np.array([3, 0])), np.array([[9, 10, 11], [0, 1, 2]], np.float32))
