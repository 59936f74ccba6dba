"""Run part of an ONNX graph in torch with its conv weights trainable (training only).

PicoDet's neck and head are plain CNN operators; interpreting them node by node in torch lets
training fine-tune them from the shipped weights and write the result back into the same graph
(:func:`write_back`), so the exported model keeps PicoDet's exact structure. Supports the
operators PP-PicoDet's neck and head use. Reshape targets whose first dim is 1 are taken as the
batch dim (Paddle exported with batch 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F  # noqa: N812 -- torch's own convention
from onnx import helper, numpy_helper
from torch import nn

__all__ = ["GraphModule", "write_back"]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _key(name: str) -> str:
    return "p_" + "".join(c if c.isalnum() else "_" for c in name)


class GraphModule(nn.Module):  # type: ignore[misc]  # torch is not type-checked (training only)
    """The nodes between ``inputs`` and ``outputs`` of an ONNX graph; Conv weights trainable."""

    def __init__(self, model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        graph = model.graph
        producer = {out: node for node in graph.node for out in node.output}
        needed: set[int] = set()
        order = {id(node): i for i, node in enumerate(graph.node)}
        stack = list(outputs)
        seen: set[str] = set(inputs)
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor not in producer:
                continue
            seen.add(tensor)
            node = producer[tensor]
            needed.add(order[id(node)])
            stack.extend(node.input)
        self.nodes = [graph.node[i] for i in sorted(needed)]
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.params = nn.ParameterDict()
        self.names: dict[str, str] = {}
        self.consts: dict[str, torch.Tensor] = {}
        for node in self.nodes:
            if node.op_type == "Conv":
                for name in node.input[1:]:
                    self.names[name] = _key(name)
                    self.params[_key(name)] = nn.Parameter(
                        torch.from_numpy(values[name].astype(np.float32).copy())
                    )
            else:
                for name in node.input:
                    if name in values and name not in self.consts:
                        self.consts[name] = torch.from_numpy(np.array(values[name]))

    def _value(self, env: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        if name in self.names:
            return self.params[self.names[name]]
        if name in env:
            return env[name]
        return self.consts[name]

    def forward(self, feeds: Sequence[torch.Tensor]) -> list[torch.Tensor]:  # noqa: PLR0915 -- one branch per operator
        env: dict[str, torch.Tensor] = dict(zip(self.inputs, feeds, strict=True))
        batch = feeds[0].shape[0]
        for node in self.nodes:
            op = node.op_type
            if op == "Constant":
                continue
            x: list[Any] = [self._value(env, n) if n else None for n in node.input]
            a: dict[str, Any] = _attrs(node)
            out: torch.Tensor | list[torch.Tensor]
            if op == "Conv":
                pads = list(a.get("pads", [0, 0, 0, 0]))
                out = F.conv2d(
                    x[0],
                    x[1],
                    x[2] if len(x) > 2 else None,
                    stride=tuple(a.get("strides", [1, 1])),
                    padding=(pads[0], pads[1]),
                    dilation=tuple(a.get("dilations", [1, 1])),
                    groups=int(a.get("group", 1)),
                )
            elif op == "Add":
                out = x[0] + x[1]
            elif op == "Sub":
                out = x[0] - x[1]
            elif op == "Mul":
                out = x[0] * x[1]
            elif op == "Div":
                out = x[0] / x[1]
            elif op == "Clip":
                out = torch.clamp(x[0], float(x[1]), float(x[2]))
            elif op == "Relu":
                out = F.relu(x[0])
            elif op == "Sigmoid":
                out = torch.sigmoid(x[0])
            elif op == "HardSigmoid":
                alpha = float(a.get("alpha", 0.2))
                beta = float(a.get("beta", 0.5))
                out = torch.clamp(alpha * x[0] + beta, 0.0, 1.0)
            elif op == "GlobalAveragePool":
                out = x[0].mean(dim=(2, 3), keepdim=True)
            elif op == "Concat":
                out = torch.cat([t for t in x if t is not None], dim=int(a["axis"]))
            elif op == "Reshape":
                shape = [int(v) for v in x[1].tolist()]
                if shape and shape[0] == 1:
                    shape[0] = batch
                out = x[0].reshape(shape)
            elif op == "Transpose":
                out = x[0].permute(*a["perm"])
            elif op == "Split":
                sizes: Any = a.get("split")
                if sizes is None and len(x) > 1 and x[1] is not None:
                    sizes = [int(v) for v in x[1].tolist()]
                out = list(torch.split(x[0], list(sizes), dim=int(a.get("axis", 0))))
            elif op == "Resize":
                scales = x[2] if len(x) > 2 and x[2] is not None and x[2].numel() else None
                if scales is None:
                    raise ValueError(f"Resize {node.name}: only scales are supported")
                out = F.interpolate(
                    x[0], scale_factor=(float(scales[2]), float(scales[3])), mode="nearest"
                )
            elif op == "MaxPool":
                pads = list(a.get("pads", [0, 0, 0, 0]))
                out = F.max_pool2d(
                    x[0],
                    kernel_size=tuple(a["kernel_shape"]),
                    stride=tuple(a.get("strides", [1, 1])),
                    padding=(pads[0], pads[1]),
                )
            else:
                raise ValueError(f"unsupported operator {op} ({node.name})")
            if isinstance(out, list):
                for name, value in zip(node.output, out, strict=True):
                    env[name] = value
            else:
                env[node.output[0]] = out
        return [env[name] for name in self.outputs]


def write_back(module: GraphModule, graph: onnx.GraphProto) -> None:
    """Copy the (trained) conv weights into the graph's initializers of the same names."""
    by_name = {init.name: i for i, init in enumerate(graph.initializer)}
    for name, key in module.names.items():
        value = module.params[key].detach().numpy().astype(np.float32)
        if name in by_name:
            graph.initializer[by_name[name]].CopyFrom(numpy_helper.from_array(value, name))
            continue
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] == name:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(value, name))
                break
        else:
            raise KeyError(name)
