"""The ONNX legalisation as a sequence of named rewrites: which rewrites run for which export, counts per
rewrite name, and a failure that says where in the sequence it happened."""

from __future__ import annotations

import onnx
import pytest

from effcompile.errors import ExportError
from effcompile.export.onnx.legalize import (
    TRAINING_REWRITES,
    CastLikeToCast,
    RedundantCasts,
    Rewrite,
    Sequential,
    legalization,
    legalize_for_training,
)


def _cast_model() -> onnx.ModelProto:
    """x → CastLike(x, like) → Cast(to float) → Cast(to float) → Neg: all three casts keep float32 as it is."""
    nodes = [onnx.helper.make_node("CastLike", ["x", "like"], ["a"]),
             onnx.helper.make_node("Cast", ["a"], ["b"], to=onnx.TensorProto.FLOAT),
             onnx.helper.make_node("Cast", ["b"], ["c"], to=onnx.TensorProto.FLOAT),
             onnx.helper.make_node("Neg", ["c"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2]),
                     onnx.helper.make_tensor_value_info("like", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 11
    return model


def test_rewrites_are_chosen_by_what_they_declare():
    names = lambda sequence: [r.name for r in sequence.rewrites]  # noqa: E731
    full = names(legalization())
    assert full[0] == "opset_converted" and full[-1] == "ir_version_lowered"
    assert full[:-1] == [cls.name for cls in TRAINING_REWRITES]
    no_speed = names(legalization(speed_rewrites=False))
    assert {cls.name for cls in TRAINING_REWRITES if cls.speed} == set(full) - set(no_speed)
    assert "cross_entropy_split" in full and "cross_entropy_split" not in no_speed
    inference = names(legalization(inference=True))
    assert "gradient_outputs_named" not in inference and "layer_norm_bias_added" not in inference
    assert names(legalization(low_precision_in_float32=True))[-3:] == \
        ["low_precision_ops_in_float32", "redundant_casts_dropped", "ir_version_lowered"]


def test_counts_per_rewrite_name_and_a_repeated_rewrite_sums():
    model = _cast_model()
    counts = legalize_for_training(model, low_precision_in_float32=True)
    assert counts["castlike_to_cast"] == 1 and counts["redundant_casts_dropped"] == 3
    assert counts["ir_version_lowered"] == 1 and model.ir_version == 10
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == [("Neg", ["x"])]
    assert legalize_for_training(model, low_precision_in_float32=True)["redundant_casts_dropped"] == 0  # idempotent
    result = Sequential(CastLikeToCast(), RedundantCasts(), RedundantCasts())(_cast_model())
    assert result.counts == {"castlike_to_cast": 1, "redundant_casts_dropped": 3} and result.modified


class _Refuses(Rewrite):
    name = "refuses"

    def call(self, model):
        raise ExportError("onnx export: cannot do this; do that instead")


class _Breaks(Rewrite):
    name = "breaks"

    def call(self, model):
        raise KeyError("bug")


def test_a_failure_names_the_rewrite_and_those_before_it():
    with pytest.raises(ExportError) as error:  # a user error stays one, with where it happened
        Sequential(CastLikeToCast(), _Refuses(), RedundantCasts())(_cast_model())
    assert str(error.value) == ("onnx export: cannot do this; do that instead (when running the 'refuses' "
                                "rewrite after ['castlike_to_cast'])")
    with pytest.raises(RuntimeError, match=r"when running the 'breaks' rewrite after \[\]: KeyError"):
        Sequential(_Breaks())(_cast_model())
