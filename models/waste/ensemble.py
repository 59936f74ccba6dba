"""Several exported waste classifiers as one ONNX file that averages their logits.

No torch, no I/O beyond reading the members and writing the result: the training script
(:mod:`models.waste.train`, ``--members``) merges, then quantises the merged file like any other.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from models.waste.preprocess import LABELS

__all__ = ["merge_members"]


def merge_members(members: list[Path], size: int, out: Path) -> None:
    """One fp32 ONNX file that runs every member on ``image`` [batch, 3, size, size] and
    returns the mean of their logits as ``logits``.

    MobileNetV2 ends in a global average pool, so a member exported at another input size runs
    unchanged at ``size``. With one member this only re-declares the input size.
    """
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outs: list[str] = []
    for index, path in enumerate(members):
        graph = onnx.load(str(path)).graph
        prefix = f"m{index}_"

        def rename(name: str, prefix: str = prefix) -> str:
            return name if name in ("image", "") else prefix + name

        for node in graph.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = prefix + (node.name or f"{node.op_type}_{len(nodes)}")
            copy.input[:] = [rename(n) for n in node.input]
            copy.output[:] = [rename(n) for n in node.output]
            nodes.append(copy)
        for init in graph.initializer:
            copy = onnx.TensorProto()
            copy.CopyFrom(init)
            copy.name = prefix + init.name
            inits.append(copy)
        outs.append(rename(graph.output[0].name))
    if len(outs) == 1:
        nodes[-1].output[:] = ["logits" if n == outs[0] else n for n in nodes[-1].output]
    else:
        inits.append(numpy_helper.from_array(np.array(1 / len(outs), np.float32), "ensemble_w"))
        nodes.append(onnx.helper.make_node("Sum", outs, ["ensemble_sum"], name="ensemble_sum"))
        nodes.append(
            onnx.helper.make_node("Mul", ["ensemble_sum", "ensemble_w"], ["logits"], name="mean")
        )
    graph = onnx.helper.make_graph(
        nodes,
        "waste_classifier",
        [onnx.helper.make_tensor_value_info("image", 1, ["batch", 3, size, size])],
        [onnx.helper.make_tensor_value_info("logits", 1, ["batch", len(LABELS)])],
        inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
