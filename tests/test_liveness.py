"""Peak of intermediate tensors (exporter/liveness.py) on hand-built graphs whose peaks are known by hand."""

from onnx import TensorProto, helper

from progfl.exporter.liveness import GraphLiveness, ort_order


def _model(nodes, inputs, outputs, initializers=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _x(name="X", width=8, batch="batch"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, width])


def _y(name="Y"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def test_peak_by_hand_and_batch_scaling():
    # A=Relu(X), B=Sigmoid(A), C=Add(A,B), Y=Neg(C): at Add, A+B+C are live (3 x 32 bytes per sample)
    m = _model([helper.make_node("Relu", ["X"], ["A"], name="relu"),
                helper.make_node("Sigmoid", ["A"], ["B"], name="sig"),
                helper.make_node("Add", ["A", "B"], ["C"], name="add"),
                helper.make_node("Neg", ["C"], ["Y"], name="neg")], [_x()], [_y()])
    g = GraphLiveness(m)
    p1, p4 = g.peak(1), g.peak(4)
    assert (p1.peak_bytes, p4.peak_bytes) == (96, 384)
    assert p4.peak_node == "add" and p4.fixed_bytes == 0 and p4.per_sample_bytes == 96
    assert p4.fallback_share == 0 and p4.unresolved == ()


def test_tensor_freed_after_last_use():
    # a chain: each tensor dies once the next is made, so at most two are live (not three)
    m = _model([helper.make_node("Relu", ["X"], ["A"]), helper.make_node("Neg", ["A"], ["B"]),
                helper.make_node("Sigmoid", ["B"], ["Y"])], [_x()], [_y()])
    assert GraphLiveness(m).peak(2).peak_bytes == 2 * 32 * 2


def test_inputs_initializers_and_views_not_counted():
    w = helper.make_tensor("W", TensorProto.FLOAT, [8], [0.0] * 8)
    shape = helper.make_tensor("S", TensorProto.INT64, [1], [-1])
    m = _model([helper.make_node("Add", ["X", "W"], ["A"]),  # 32 bytes per sample
                helper.make_node("Reshape", ["A", "S"], ["R"]),  # a view of A: no new bytes
                helper.make_node("Identity", ["X"], ["I"]),  # a view of an input: not an intermediate
                helper.make_node("Relu", ["R"], ["Y"])], [_x()], [_y()], [w, shape])
    p = GraphLiveness(m).peak(3)
    assert p.peak_bytes == 2 * 32 * 3  # A (alive as R until Relu) + Y; X, W, S and I add nothing


def test_symbol_resolved_by_inference_and_other_batch_name():
    # the input's batch symbol is "N"; Reshape to [-1] makes a dim inference resolves as 8 * N
    shape = helper.make_tensor("S", TensorProto.INT64, [1], [-1])
    m = _model([helper.make_node("Reshape", ["X", "S"], ["R"]), helper.make_node("Relu", ["R"], ["Y"])],
               [_x(batch="N")], [_y()], [shape])
    assert GraphLiveness(m).peak(5).peak_bytes == 5 * 32


def test_conv_scratch_is_fixed_bytes():
    # 3->16 channels, 3x3, pad 1 on 8x8: 16 filters <= 64 outputs, so MLAS's segmented path: 128*128 floats/thread
    w = helper.make_tensor("W", TensorProto.FLOAT, [16, 3, 3, 3], [0.0] * 432)
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 3, 8, 8])
    m = _model([helper.make_node("Conv", ["X", "W"], ["Y"], pads=[1, 1, 1, 1])], [x], [_y()], [w])
    p = GraphLiveness(m, threads=1).peak(2)
    assert p.fixed_bytes == 128 * 128 * 4
    assert p.per_sample_bytes == 16 * 8 * 8 * 4
    assert p.peak_bytes == 128 * 128 * 4 + 2 * 16 * 8 * 8 * 4


def test_ort_order_runs_each_leaf_right_after_its_producer():
    # stored a, b, c, d with c reading a and d reading b: ORT runs b, d, a, c (reverse DFS from the last leaf)
    nodes = [helper.make_node("Relu", ["X"], ["P"]), helper.make_node("Neg", ["X"], ["Q"]),
             helper.make_node("Relu", ["P"], ["R"]), helper.make_node("Relu", ["Q"], ["S"])]
    assert ort_order(nodes) == [1, 3, 0, 2]


def test_gradient_naming_fallback():
    # W_grad has no stored or inferable shape (contrib op): it takes W's, and the share of bytes says so
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])
    wv = helper.make_tensor_value_info("W", TensorProto.FLOAT, [1000])
    m = _model([helper.make_node("Relu", ["X"], ["A"]),
                helper.make_node("Mystery", ["A", "W"], ["W_grad"], domain="com.example"),
                helper.make_node("Neg", ["W_grad"], ["Y"])], [x, wv], [_y()])
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    p = GraphLiveness(m).peak(1)
    assert p.peak_bytes == 16 + 4000  # A and W_grad at Mystery; Y has no shape at all: 0 bytes, and named
    assert p.fallback_share == 4000 / 4016 and p.unresolved == ("Y",)
