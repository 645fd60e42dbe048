"""One measured tool per process: ``python bench/tools.py TOOL IN OUT [--external]``.

Each tool imports only what it needs, inside its function, so a process's wall time and
peak RSS are that tool's own: interpreter start, imports, load, transform, save. With
``--external`` the output's weights go to ``OUT.data`` (one file), as bnfold does for an
external-data input.

Helpers for the harness (not measured): ``modules`` (which heavy packages a bnfold CLI
invocation imports) and ``describe`` (BN count and size of a written model).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

EXTERNAL_MIN_BYTES = 1024


def _data_name(out: str) -> str:
    return Path(out).name + ".data"


def _onnx_save(model, out: str, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=_data_name(out), size_threshold=EXTERNAL_MIN_BYTES)
    else:
        onnx.save_model(model, out)


def onnx_floor(src: str, out: str, external: bool) -> None:
    """The Python floor: protobuf parse and serialise, nothing else."""
    import onnx

    _onnx_save(onnx.load(src), out, external)


def ir_floor(src: str, out: str, external: bool) -> None:
    """The onnx_ir floor: what bnfold's load + save would cost with no checks and no folding."""
    import onnx_ir as ir

    ir.save(ir.load(src), out, external_data=_data_name(out) if external else None)


def onnxoptimizer_tool(src: str, out: str, external: bool) -> None:
    import onnx
    import onnxoptimizer

    _onnx_save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), out, external)


def onnxscript_tool(src: str, out: str, external: bool) -> None:
    """onnxscript's BN fusion rules (Conv, ConvTranspose, Gemm) on the onnx_ir model."""
    import onnx_ir as ir
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
        fuse_batchnorm_into_gemm_rule,
    )

    model = ir.load(src)
    rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
    model = rewriter.rewrite(model, pattern_rewrite_rules=rules)
    ir.save(model, out, external_data=_data_name(out) if external else None)


def onnxsim_tool(src: str, out: str, external: bool) -> None:
    """onnxsim's default pipeline (fuse_bn_into_conv among its passes), no random-input check."""
    import onnx
    import onnxsim

    model, _ = onnxsim.simplify(onnx.load(src), check_n=0)
    _onnx_save(model, out, external)


def onnxslim_tool(src: str, out: str, external: bool) -> None:
    import onnxslim

    onnxslim.slim(src, out, save_as_external_data=external)


def ort_tool(src: str, out: str, external: bool) -> None:
    """onnxruntime's offline optimisation: basic level (Conv+BN fusion is a basic transformer)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = out
    if external:
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", _data_name(out))
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(EXTERNAL_MIN_BYTES))
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])


TOOLS = {
    "onnx-floor": onnx_floor,
    "ir-floor": ir_floor,
    "onnxoptimizer": onnxoptimizer_tool,
    "onnxscript": onnxscript_tool,
    "onnxsim": onnxsim_tool,
    "onnxslim": onnxslim_tool,
    "ort": ort_tool,
}

#: ``python -c BARE_VERIFY ORIGINAL CANDIDATE SHAPE [MAPPED]``: what ``bnfold verify`` does, as a bare
#: script: the same three onnxruntime sessions, in the same order, on one random input. Without
#: a 4th argument the sessions get the paths; with one (a pickle of what
#: ``mapped_model`` gives for each path), what verify's worker gets.
BARE_VERIFY = r"""
import gc, pickle, sys, numpy as np, onnxruntime as ort
original, candidate, shape = sys.argv[1], sys.argv[2], [int(d) for d in sys.argv[3].split("x")]
mapped = pickle.loads(open(sys.argv[4], "rb").read()) if len(sys.argv) > 4 else {}
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
kept = []
for path, optimize in ((original, False), (candidate, False), (candidate, True)):
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = path
    if mapped.get(path) is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", mapped[path]["folder"])
        model = mapped[path]["model"]
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    kept.append(session.run(None, {session.get_inputs()[0].name: x}))
    del session
    gc.collect()
"""

#: ``python -c ORT_OFFLINE IN OUT``: onnxruntime's offline optimisation (``ort_tool``) as the
#: shortest script a user would write: bench/startup.py's baseline, where this file's own
#: imports (pathlib, json) would be part of the time.
ORT_OFFLINE = r"""
import sys, onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
options.optimized_model_filepath = sys.argv[2]
ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
"""

HEAVY_MODULES = ("onnxruntime", "torch", "onnxscript", "onnx", "onnx_ir", "numpy", "google.protobuf", "typer", "rich")


def modules(report: str, argv: list[str]) -> None:
    """Run the bnfold CLI in this process with ``argv`` and record which heavy packages it imported."""
    from bnfold.cli import main

    sys.argv = ["bnfold", *argv]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    loaded = {name: name in sys.modules for name in HEAVY_MODULES}
    Path(report).write_text(json.dumps({"argv": argv, "exit_code": code, "imported": loaded}))


def _nodes(nodes):
    """Nodes and, recursively, the nodes of their subgraphs (If/Loop/Scan bodies)."""
    for node in nodes:
        yield node
        for attr in node.attribute:
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _nodes(graph.node)


def describe(path: str, report: str) -> None:
    """BN count, node count and bytes on disk of a written model (the harness stays free of onnx)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    ops = [n.op_type for n in _nodes(proto.graph.node)]
    for function in proto.functions:
        ops += [n.op_type for n in _nodes(function.node)]
    files = [Path(path), Path(path + ".data")]
    Path(report).write_text(json.dumps({
        "bn": ops.count("BatchNormalization"),
        "nodes": len(ops),
        "bytes": sum(f.stat().st_size for f in files if f.exists()),
    }))


def versions(report: str) -> None:
    """Versions of everything measured, for the results header."""
    import importlib.metadata as md

    names = ["bnfold", "onnx", "onnx-ir", "onnxruntime", "numpy", "protobuf", "ml_dtypes", "typer", "rich",
             "onnxoptimizer", "onnxscript", "onnxsim", "onnxslim"]
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    from google.protobuf.internal import api_implementation

    found["protobuf-backend"] = api_implementation.Type()
    Path(report).write_text(json.dumps(found))


def main(argv: list[str]) -> int:
    if argv and argv[0] == "versions":
        versions(argv[1])
        return 0
    if argv and argv[0] == "modules":
        modules(argv[1], argv[2:])
        return 0
    if argv and argv[0] == "describe":
        describe(argv[1], argv[2])
        return 0
    if len(argv) not in (3, 4) or argv[0] not in TOOLS or (len(argv) == 4 and argv[3] != "--external"):
        print(f"usage: tools.py {{{','.join(TOOLS)}}} IN OUT [--external]", file=sys.stderr)
        return 2
    tool, src, out = argv[:3]
    TOOLS[tool](src, out, len(argv) == 4)
    if not os.path.exists(out):
        print(f"{tool}: wrote no {out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
