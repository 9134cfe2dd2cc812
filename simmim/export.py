"""Export a run checkpoint (``simmim pretrain``/``finetune``) as safetensors, timm, Hugging Face or ONNX weights.

Every export writes a JSON card beside the weights: the architecture, the geometry the model was trained at (image
size, window, per-stage effective windows, and the ``pretrained_window_sizes`` to fine-tune from it), the input
normalisation, the training recipe, the sha256 of the source checkpoint and copy-pasteable code that loads it.

Formats (default output beside the checkpoint ``<stem>.pt``):

* ``safetensors`` -> ``<stem>.safetensors``: our state dict, which is also timm's layout;
* ``timm`` -> ``<stem>-timm.safetensors`` (or ``.pth`` if ``out`` says so): loads with ``timm.create_model`` and
  ``pretrained_cfg_overlay=dict(file=...)``, the card names the exact call;
* ``hf`` -> ``<stem>-hf/``: ``config.json`` + ``model.safetensors`` + ``preprocessor_config.json`` for
  ``Swinv2Model`` (encoder) / ``Swinv2ForImageClassification`` (classifier) and ``AutoImageProcessor``;
* ``onnx`` -> ``<stem>.onnx``: pooled features (encoder) or logits (classifier) at a fixed input size (the trained
  one, or ``img_size``/``window_size``), dynamic batch, verified against onnxruntime before returning.

timm and HF have no extra main-branch norms, so SwinV2-H/G (``extra_norm_period=6``) export only as safetensors/ONNX.

Writing is staged (:mod:`simmim.export_staging`): everything goes to a hidden ``.<name>.export-<pid>`` folder
beside the target and is moved into place file by file (``os.replace``, atomic) only when complete; a signal, a
full or read-only disk end in one line with nothing written, and the hf format replaces only the files it writes in
an existing folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn

from simmim.errors import RunStopped, UserError
from simmim.export_staging import staged
from simmim.models import VARIANTS, SwinTransformerV2, family_of
from simmim.models.hf import HF_LAYOUTS
from simmim.weights import HF_CARD, model_from_weights, read_run_checkpoint, sha256

log = logging.getLogger(__name__)

FORMATS = ("safetensors", "timm", "hf", "onnx")
ONNX_ATOL = 1e-4  # onnxruntime vs PyTorch, float32: op reordering alone gives ~1e-6 on these models
# timm's own architecture of the same dimensions: its files load with plain timm (no simmim installed); window and
# image size are passed in the call. Other variants (pico, nano) load through our registered simmim_<variant>.
TIMM_ARCH = {
    "swinv2_tiny": "swinv2_tiny_window8_256",
    "swinv2_small": "swinv2_small_window8_256",
    "swinv2_base": "swinv2_base_window8_256",
    "swinv2_large": "swinv2_large_window12_192",
}
LIBRARIES = {"timm": "timm", "hf": "Hugging Face transformers"}  # formats that load into another library's SwinV2


class ExportMismatchError(RunStopped):
    """The exported graph does not reproduce the PyTorch model's outputs."""


# ----------------------------------------------------------------------------------------------------------------
# reading the checkpoint


def load_run(checkpoint: str | Path, fmt: str | None = None) -> tuple[SwinTransformerV2, dict]:
    """The model (eval mode, trained geometry) and metadata of a run checkpoint; one-line errors otherwise.

    With ``fmt``, a variant that format cannot represent is refused before the model is built (SwinV2-G is 12 GB).
    """
    weights = read_run_checkpoint(checkpoint, "export")
    if fmt is not None:
        check_foreign(weights.meta["model"], fmt)
    return model_from_weights(weights), weights.meta


# ----------------------------------------------------------------------------------------------------------------
# load calls written into the card


def _size(pair: tuple[int, int]) -> int | tuple[int, int]:
    """``(6, 6) -> 6`` for readable calls; rectangles stay pairs."""
    return pair[0] if pair[0] == pair[1] else tuple(pair)


def _variant(meta: dict) -> str:
    return meta["model"]


def check_foreign(variant: str, fmt: str) -> None:
    """timm/HF have no extra main-branch norm: refuse SwinV2-H/G rather than write weights that compute otherwise."""
    if fmt not in LIBRARIES:
        return
    if VARIANTS.get(variant, {}).get("extra_norm_period"):
        raise UserError(
            f"{variant} cannot be exported to {LIBRARIES[fmt]}: it adds a LayerNorm on the main branch every 6 blocks "
            f"(extra_norm_period=6, SwinV2 paper §3.2), which {LIBRARIES[fmt]}'s SwinV2 does not have, so its "
            "outputs would differ; export it as safetensors or onnx instead")


def timm_architecture(variant: str) -> tuple[str, bool]:
    """The ``timm.create_model`` name for ``variant`` and whether it needs ``import simmim.models`` (which registers
    ``simmim_<variant>`` with timm): timm's own architecture where one has the same dimensions, else ours."""
    return (TIMM_ARCH[variant], False) if variant in TIMM_ARCH else (f"simmim_{variant}", True)


def timm_call(model: SwinTransformerV2, meta: dict, file: Path, registered: bool = False) -> str:
    """The ``timm.create_model(...)`` expression that rebuilds ``model`` from ``file`` (needs ``import timm``, and
    ``import simmim.models`` for ``simmim_*`` names): timm's own architecture where there is one (see
    :func:`timm_architecture`), or with ``registered`` always our ``simmim_<variant>`` (timm's model API on our
    class: ``features_only``, ``forward_intermediates``, any input size).

    ``pretrained_cfg_overlay`` points timm at the file (its name: the card sits beside it, so the call runs from that
    folder; a card holds no absolute path) and declares its ``num_classes``, input and pool size, so timm's loader
    neither drops the classifier (it does when ``num_classes`` differs from the pretrained cfg) nor adapts the stem;
    timm's ``checkpoint_filter_fn`` leaves our keys as they are (they are timm's native layout).
    """
    h, w = model.img_size
    mean, std = tuple(meta.get("mean") or IMAGENET_MEAN), tuple(meta.get("std") or IMAGENET_STD)
    pool = (h // model.encoder_stride, w // model.encoder_stride)
    overlay = (f"dict(file={file.name!r}, num_classes={model.num_classes}, "
               f"input_size={(model.in_chans, h, w)!r}, pool_size={pool!r}, mean={mean!r}, std={std!r})")
    # the trained windows, not (0, 0, 0, 0): the same outputs at this size, and still right when a user changes
    # img_size/window_size in this call
    pretrained = tuple(_size(p) for p in model.trained_window_sizes)
    arch = f"simmim_{_variant(meta)}" if registered else timm_architecture(_variant(meta))[0]
    args = [f"{arch!r}", "pretrained=True", f"pretrained_cfg_overlay={overlay}",
            f"img_size={_size(model.img_size)!r}", f"window_size={_size(model.window_size)!r}",
            f"pretrained_window_sizes={pretrained!r}", f"num_classes={model.num_classes}",
            f"in_chans={model.in_chans}"]
    return f"timm.create_model({', '.join(args)})"


def simmim_code(model: SwinTransformerV2, meta: dict, file: Path) -> str:
    """Python that rebuilds ``model`` with this package from a safetensors ``file`` (by name, beside the card)."""
    pretrained = [_size(p) for p in model.trained_window_sizes]
    return ("from safetensors.torch import load_file\nfrom simmim.models import create_model\n"
            f"model = create_model({_variant(meta)!r}, img_size={_size(model.img_size)!r}, "
            f"window_size={_size(model.window_size)!r}, pretrained_window_sizes={pretrained!r}, "
            f"num_classes={model.num_classes}, in_chans={model.in_chans})\n"
            f"model.load_state_dict(load_file({file.name!r}))\nmodel.eval()")


# ----------------------------------------------------------------------------------------------------------------
# writers: each returns the files it wrote (main file first) and format-specific card entries


def _state_dict(model: SwinTransformerV2) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", **(metadata or {})})  # "format" is what HF/timm check


def _geometry_metadata(model: SwinTransformerV2, meta: dict) -> dict[str, str]:
    """String metadata stored in the safetensors header (readable without the card)."""
    return {"simmim.variant": _variant(meta), "simmim.img_size": json.dumps(list(model.img_size)),
            "simmim.window_size": json.dumps(list(model.window_size)),
            "simmim.pretrained_window_sizes": json.dumps([list(p) for p in model.pretrained_window_sizes]),
            "simmim.num_classes": str(model.num_classes)}


def write_safetensors(model: SwinTransformerV2, meta: dict, out: Path, final: Path, opset: int | None
                      ) -> tuple[list[Path], dict]:
    """Our state dict (= timm's keys) with the geometry in the safetensors header."""
    _save_safetensors(_state_dict(model), out, _geometry_metadata(model, meta))
    load = {"simmim": simmim_code(model, meta, final)}
    if not VARIANTS[_variant(meta)].get("extra_norm_period"):
        load.update(_timm_loads(model, meta, final))
    return [out], {"load": load}


def _timm_loads(model: SwinTransformerV2, meta: dict, final: Path) -> dict[str, str]:
    """The card's timm calls: ``timm`` (timm's own architecture where there is one) and ``timm_simmim`` (our class
    through timm, for features_only and any input size); ``requires`` says what each needs imported."""
    arch, needs_simmim = timm_architecture(_variant(meta))
    return {"timm": timm_call(model, meta, final), "timm_simmim": timm_call(model, meta, final, registered=True),
            "requires": "import timm" + ("; import simmim.models  # registers simmim_* with timm" if needs_simmim
                                         else "  (timm_simmim: also import simmim.models)")}


def write_timm(model: SwinTransformerV2, meta: dict, out: Path, final: Path, opset: int | None
               ) -> tuple[list[Path], dict]:
    """The state dict for ``timm.create_model(..., pretrained_cfg_overlay=dict(file=out))``; .pth if ``out`` says."""
    check_foreign(_variant(meta), "timm")
    sd = _state_dict(model)  # our keys are timm's; its checkpoint_filter_fn keeps them as they are
    if out.suffix in (".pth", ".pt", ".bin"):
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:  # a Python file: a full disk surfaces as OSError(ENOSPC), not a bare C++ error
            torch.save(sd, f)
    else:
        _save_safetensors(sd, out, _geometry_metadata(model, meta))
    return [out], {"load": _timm_loads(model, meta, final)}


HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md", HF_CARD)  # all hf writes


def write_hf(model: nn.Module, meta: dict, out: Path, final: Path, opset: int | None) -> tuple[list[Path], dict]:
    """A ``from_pretrained`` directory: config.json, model.safetensors (HF keys), preprocessor_config.json and a
    README.md model card (written with the JSON card, see :func:`hf_readme`), for the transformers model of the
    encoder's family (:data:`~simmim.models.hf.HF_LAYOUTS`: Swinv2, Swin or Beit)."""
    check_foreign(_variant(meta), "hf")
    layout = HF_LAYOUTS[family_of(_variant(meta)).name]
    names = meta.get("classes")
    id2label = dict(enumerate(names)) if isinstance(names, list) and len(names) == model.num_classes else None
    config = layout.config(model, id2label)  # validates what HF cannot represent before anything is written
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "config.json", out / "model.safetensors", out / "preprocessor_config.json"]
    files[0].write_text(json.dumps(config, indent=2) + "\n")
    _save_safetensors(layout.to_hf(_state_dict(model)), files[1])
    h, w = model.img_size
    processor = {  # written as ViTImageProcessor for every family: resize to the trained size, then normalise
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(meta.get("mean") or IMAGENET_MEAN), "image_std": list(meta.get("std") or IMAGENET_STD)}
    files[2].write_text(json.dumps(processor, indent=2) + "\n")
    cls = config["architectures"][0]
    outputs = "logits" if model.num_classes > 0 else f"{layout.pooled(config)} (= simmim pooled features)"
    return files, {"load": {"transformers": f"transformers.{cls}.from_pretrained({final.name!r})",
                            "image_processor": f"transformers.AutoImageProcessor.from_pretrained({final.name!r})"},
                   "outputs": outputs}


ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the [onnx] extra: graph, torch.export-based exporter, check


def check_onnx_installed() -> None:
    """Refuse an onnx export up front, before any checkpoint is read, when the ``[onnx]`` extra is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the onnx export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                        'not installed: pip install "simmim[onnx]" (or pip install -e ".[onnx]" in a checkout)')


def fixed_size_note(model: SwinTransformerV2) -> str:
    """What the card and the graph's doc string say about the input size: the graph is traced at one size."""
    h, w = model.img_size
    again = {"swin": "--img-size N --window-size W (the position-bias tables resized bicubically)",
             "vit": "--img-size N (the relative position tables resized as for fine-tuning)"}.get(
        model.geometry()["family"], "--img-size N --window-size W (the log-CPB keeps its trained windows)")
    return (f"fixed input size {h}x{w} (only the batch axis is dynamic): resize images to {h}x{w}, or export "
            f"again at another size with simmim export CKPT --format onnx {again}; onnxruntime refuses other sizes "
            "with 'invalid dimensions'")


def write_onnx(model: SwinTransformerV2, meta: dict, out: Path, final: Path, opset: int | None
               ) -> tuple[list[Path], dict]:
    """pixel_values (batch, C, H, W) -> logits / pooled features (batch, D), dynamic batch, checked in onnxruntime.

    H and W are fixed: torch.export specialises them (the shifted-window mask and the built-size fast path are
    computed from Python ints), so the graph runs at ``model.img_size`` only, and says so in its doc string.
    """
    for module in model.modules():
        if hasattr(module, "cache_bias"):
            module.cache_bias = False  # the inference cache keys on data pointers, which tracing cannot follow
    h, w = model.img_size
    example = torch.randn(2, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    output = "logits" if model.num_classes > 0 else "features"
    # a protobuf file holds at most 2 GiB: larger models keep their weights in <out>.data
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(model, (example,), None, dynamo=True, input_names=["pixel_values"],
                                    output_names=[output], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                                    opset_version=opset, verbose=False)
    note = fixed_size_note(model)
    program.model.doc_string = f"simmim {_variant(meta)} {meta['kind']}: {note}"
    program.model.metadata_props.update({"simmim.variant": _variant(meta), "simmim.img_size": f"{h}x{w}",
                                         "simmim.input_size": note})
    program.save(str(out), external_data=external)
    diff = check_onnx(model, out)
    files = [out] + ([Path(f"{out}.data")] if Path(f"{out}.data").is_file() else [])
    return files, {"onnx": {"input": f"pixel_values float32 (batch, {model.in_chans}, {h}, {w}), normalised",
                            "output": f"{output} float32 (batch, {model.num_classes or model.num_features})",
                            "input_size": note, "opset": _opset(out), "exporter": "dynamo",
                            "max_abs_diff_vs_pytorch": diff},
                   "load": {"onnxruntime": f"onnxruntime.InferenceSession({final.name!r})"}}


def _opset(path: Path) -> int | None:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)


def check_opset(opset: int) -> None:
    """Refuse an ONNX opset the installed onnx package cannot describe, before anything is exported."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not 7 <= opset <= newest:
        raise UserError(f"--opset {opset} is not an ONNX opset this installation supports (7..{newest}); e.g. 17")


def check_onnx(model: SwinTransformerV2, path: Path, batch: int = 3, atol: float = ONNX_ATOL) -> float:
    """Run the graph in onnxruntime on a random (batch, C, H, W) input; return the max abs difference to PyTorch,
    raising :class:`ExportMismatchError` above ``atol``. ``batch`` differs from the export's 2 to check that the
    batch axis is dynamic."""
    import onnxruntime as ort

    x = torch.randn(batch, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(1))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's InvalidGraph, NotImplemented, ... when it cannot run the graph
        raise ExportMismatchError(f"onnxruntime cannot load the exported graph: {str(err).splitlines()[0][:300]}; "
                                  "try another opset (simmim export --opset N) or report it") from err
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    diff = float(abs(got - expected).max())
    if not diff <= atol:  # also catches NaN
        raise ExportMismatchError(f"{path}: onnxruntime output differs from PyTorch by {diff:.3g} (> {atol}); "
                                  "try another opset (simmim export --opset N) or report it")
    log.info("onnxruntime check of %s: max abs diff %.3g", path, diff)
    return diff


WRITERS: dict[str, Callable[[SwinTransformerV2, dict, Path, Path, int | None], tuple[list[Path], dict]]] = {
    "safetensors": write_safetensors, "timm": write_timm, "hf": write_hf, "onnx": write_onnx,
}


# ----------------------------------------------------------------------------------------------------------------
# other encoder families (Swin V1, ViT): timm layout already, geometry from the contract


def other_timm_call(model: nn.Module, file: Path) -> str | None:
    """``timm.create_model(...)`` rebuilding ``model`` from ``file`` in plain timm (None if the family has no
    ``timm_spec``): our keys are timm's, so timm's own checkpoint filter keeps them."""
    if not hasattr(model, "timm_spec"):
        return None
    name, kwargs = model.timm_spec()
    args = [repr(name), "pretrained=True", f"pretrained_cfg_overlay=dict(file={file.name!r}, "
            f"num_classes={model.num_classes})", *(f"{k}={v!r}" for k, v in kwargs.items())]
    return f"timm.create_model({', '.join(args)})"


def write_other(model: nn.Module, meta: dict, out: Path, final: Path, opset: int | None
                ) -> tuple[list[Path], dict]:
    """A Swin V1 / ViT state dict (timm's keys) as safetensors, with the contract's geometry in its header (or
    .pth if ``out`` says), and the timm call that loads it."""
    sd = _state_dict(model)
    if out.suffix in (".pth", ".pt", ".bin"):
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as f:
            torch.save(sd, f)
    else:
        _save_safetensors(sd, out, {"simmim.variant": _variant(meta), "simmim.num_classes": str(model.num_classes),
                                    "simmim.encoder": json.dumps(model.geometry())})
    call = other_timm_call(model, final)
    return [out], {"load": {"timm": call, "requires": "import timm"} if call else {}}


OTHER_WRITERS: dict[str, Callable[[nn.Module, dict, Path, Path, int | None], tuple[list[Path], dict]]] = {
    "safetensors": write_other, "timm": write_other, "hf": write_hf, "onnx": write_onnx,
}


def encoder_card(model: nn.Module, meta: dict, checkpoint: Path, fmt: str, files: list[Path], extra: dict
                 ) -> dict[str, Any]:
    """The JSON card of a Swin V1 / ViT export: what the weights are (the contract's geometry), the geometry and
    normalisation they expect, where they came from; :func:`simmim.weights.read_weights` reads it back."""
    return {
        "format": fmt,
        "files": [f.name for f in files],
        "classes": meta.get("classes"),
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256(checkpoint), "kind": meta["kind"]},
        "architecture": {**model.geometry(), "num_classes": model.num_classes},
        **{k: meta[k] for k in ("img_size", "window_size", "effective_window_sizes", "pretrained_window_sizes")},
        "mean": meta.get("mean"), "std": meta.get("std"),
        "crop_pct": meta.get("crop_pct"), "interpolation": meta.get("interpolation"),
        **extra,
    }


# ----------------------------------------------------------------------------------------------------------------
# cards


def default_out(checkpoint: Path, fmt: str) -> Path:
    """Where ``fmt`` goes when no ``out`` is given: beside the checkpoint, named after its stem."""
    stem = checkpoint.with_suffix("").name
    name = {"safetensors": f"{stem}.safetensors", "timm": f"{stem}-timm.safetensors", "hf": f"{stem}-hf",
            "onnx": f"{stem}.onnx"}[fmt]
    return checkpoint.parent / name


WINDOWS_NOTE = (
    "effective_window_sizes: the window each stage attends in at img_size (window_size, clamped to the stage's map "
    "where the map is smaller). pretrained_window_sizes: the windows each stage's log-spaced CPB MLP was trained at "
    "(for an encoder pretrained from scratch, its own effective windows); its relative coordinates are normalised "
    "by them. Pass them as pretrained_window_sizes whenever this model is built at another img_size/window_size or "
    "fine-tuned: the calls below already do.")


def model_card(model: SwinTransformerV2, meta: dict, checkpoint: Path, fmt: str, files: list[Path],
               extra: dict) -> dict[str, Any]:
    """The JSON card: what the weights are, the geometry and normalisation they expect, where they came from.

    Paths in ``load`` are file names relative to the card's folder (for hf: the folder's name, relative to the
    folder holding it), so a card stays right when the files are moved or published together.
    """
    first = model.blocks()[0]
    trained = model.trained_window_sizes
    return {
        "format": fmt,
        "files": [f.name for f in files],
        "classes": meta.get("classes"),
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256(checkpoint), "kind": meta["kind"],
                   "img_size": meta.get("img_size"), "window_size": meta.get("window_size")},
        "architecture": {
            "variant": _variant(meta), "embed_dim": model.embed_dim, "depths": list(model.depths),
            "num_heads": list(model.num_heads), "num_classes": model.num_classes,
            "timm_architecture": timm_architecture(_variant(meta))[0],
            "num_features": model.num_features, "in_chans": model.in_chans, "patch_size": model.patch_size,
            "mlp_ratio": first.mlp.fc1.out_features / first.mlp.fc1.in_features,
            "extra_norm_period": VARIANTS[_variant(meta)].get("extra_norm_period", 0),
        },
        "img_size": list(model.img_size),
        "window_size": list(model.window_size),
        "effective_window_sizes": [list(w) for w in model.effective_window_sizes],
        # resolved, never the (0, 0) "use the effective window" placeholder a from-scratch model is built with: a
        # reader rebuilding from these values computes the same outputs, and nobody reads [0, 0] as "not trained"
        "pretrained_window_sizes": [list(w) for w in trained],
        "windows": WINDOWS_NOTE,
        "change_geometry": (
            f"the log-CPB must stay normalised by the trained windows {[_size(w) for w in trained]}: with simmim, "
            "model.set_input_size(img_size=..., window_size=...) keeps them; in the timm and transformers calls "
            "below they are passed as pretrained_window_sizes, so change only img_size / window_size (image_size "
            "for transformers)"),
        "mean": list(meta.get("mean") or IMAGENET_MEAN),
        "std": list(meta.get("std") or IMAGENET_STD),
        "recipe": meta.get("config", {}),
        "paths": ("'load' names this folder, relative to the folder that holds it: run the calls there" if fmt == "hf"
                  else "'load' names the files relative to the folder that holds this card: run the calls there"),
        **extra,
    }


def hf_readme(card: dict, folder: str) -> str:
    """README.md for the hf folder: the YAML block the hub and transformers read (huggingface_hub writes it), then
    what the model is, its geometry and how to load it (for any family of :data:`~simmim.models.hf.HF_LAYOUTS`)."""
    from huggingface_hub import ModelCardData

    arch = card["architecture"]
    family = arch.get("family", "swinv2")  # SwinV2 cards predate the family field
    layout = HF_LAYOUTS[family]
    classifier = arch["num_classes"] > 0
    task = "image-classification" if classifier else "image-feature-extraction"
    recipe = card.get("recipe") or {}
    license_ = recipe.get("license") if isinstance(recipe.get("license"), str) else None  # seldom recorded
    data = ModelCardData(library_name="transformers", pipeline_tag=task, license=license_,
                         tags=["simmim", layout.model_type, "vision", task, "masked-image-modeling"])
    h, w = card["img_size"]
    what = (f"a {arch['num_classes']}-class image classifier fine-tuned from a SimMIM-pretrained encoder"
            if classifier else "an image encoder pretrained with SimMIM (masked image modeling), without a head")
    cls = card["load"]["transformers"].split(".from_pretrained")[0].removeprefix("transformers.")
    classes = card.get("classes")
    norm = f"normalised with mean {card['mean']} and std {card['std']}"
    if family == "swinv2":
        shape = f"embed_dim {arch['embed_dim']}, depths {arch['depths']}, heads {arch['num_heads']}"
        inputs = [
            f"- {arch['in_chans']} channels at {h}x{w} px (other sizes work: images are padded to the windows), "
            f"window {card['window_size'][0]}, {norm}.",
            f"- Per-stage windows: {[v[0] for v in card['effective_window_sizes']]}; the log-CPB was trained at "
            f"pretrained_window_sizes {[v[0] for v in card['pretrained_window_sizes']]} (config.json holds them)."]
        size_note = ("At another size keep the trained windows: `from_pretrained(..., image_size=N, window_size=W)` "
                     "(config.json carries pretrained_window_sizes). ")
    else:
        shape = f"{arch['num_features']} features, patch {arch['patch_size']}, stride {arch['encoder_stride']}"
        window = f", window {arch['window_size'][0]}" if arch.get("window_size") else ""
        inputs = [f"- {arch['in_chans']} channels at {h}x{w} px{window}, {norm}."]
        size_note = (f"The position bias tables are sized for {h}x{w}: use that size (the image processor resizes "
                     "to it); `simmim finetune` moves the model to another size with the official table resize. ")
    lines = [
        "---", data.to_yaml().strip(), "---", "",
        f"# {folder}", "",
        f"{layout.title} ({arch['variant']}: {shape}), {what}, exported by simmim from a "
        f"`{card['source']['kind']}` checkpoint (sha256 `{card['source']['sha256'][:16]}...`).", "",
        "## Input", "", *inputs,
    ]
    if classes:
        lines.append(f"- Classes: {', '.join(map(str, classes))}.")
    lines += [
        "", "## Load", "", "```python", "import transformers", "",
        f'model = transformers.{cls}.from_pretrained("{folder}")  # this folder (or its hub id once uploaded)',
        f'processor = transformers.AutoImageProcessor.from_pretrained("{folder}")',
        "outputs = model(**processor(images=image, return_tensors=\"pt\"))  # ." + card["outputs"],
        "```", "",
        size_note + "`simmim_card.json` holds the full record: architecture, training recipe, source checkpoint, "
        "and the timm/simmim calls.", "",
        "## Training data and license", "",
        "Not recorded by the export" + (f" (license: {license_})" if license_ else "") + ": add the datasets and a "
        "license to the metadata above before publishing.", "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# entry point


def _outputs(target: Path, fmt: str) -> list[Path]:
    """Every path an export to ``target`` writes (card included), before it is written."""
    if fmt == "hf":
        return [target / name for name in HF_FILES]
    extra = [Path(f"{target}.data")] if fmt == "onnx" else []
    return [target, Path(f"{target}.json"), *extra]


def _check_target(source: Path, target: Path, fmt: str, overwrite: bool) -> None:
    """Never write onto (or, for a directory, around) the source; an existing output needs ``overwrite``."""
    src = source.resolve()
    for path in [target, *_outputs(target, fmt)]:
        if path.resolve() == src or (path.is_dir() and src.is_relative_to(path.resolve())):
            raise UserError(f"--out {target} would overwrite the source checkpoint {source}; choose another --out")
    if fmt != "hf" and target.is_dir():
        raise UserError(f"--out {target} is a directory; pass a file name")
    if fmt == "hf" and target.exists() and not target.is_dir():
        raise UserError(f"hf export writes a directory, but {target} is a file; pass --out DIR")
    existing = [p for p in _outputs(target, fmt) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --out")
    if any(p.is_dir() and not p.is_symlink() for p in existing):
        raise UserError(f"{next(p for p in existing if p.is_dir())} is a directory, which the export would replace "
                        "by a file; move it away or choose another --out")


def export(checkpoint: str | Path, fmt: str = "safetensors", out: str | Path | None = None,
           opset: int | None = None, overwrite: bool = False, img_size: int | None = None,
           window_size: int | None = None) -> list[Path]:
    """Export a run checkpoint to ``fmt`` (one of :data:`FORMATS`); returns the written files, card last.

    ``out`` defaults to a name beside the checkpoint (:func:`default_out`); an existing directory receives that
    default name inside it (for ``hf``, ``out`` is the directory itself). ``opset`` applies to ``onnx`` only.
    ``img_size``/``window_size`` export the model moved to another geometry (its log-CPB keeps the trained
    windows), e.g. an ONNX graph for another input size. Everything is staged and moved into place when complete
    (see the module docstring); an existing output is replaced only with ``overwrite``, and the source checkpoint
    never.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserError(f"opset applies to the onnx format only, not {fmt!r}")
    if fmt == "onnx":
        check_onnx_installed()
    if opset is not None:
        check_opset(opset)
    path = Path(checkpoint)
    if out is None:
        target = default_out(path, fmt)
    else:
        target = Path(out).expanduser()
        if fmt != "hf" and target.is_dir():
            target = target / default_out(path, fmt).name
    _check_target(path, target, fmt, overwrite)
    model, meta = load_run(path, fmt)
    if img_size is not None or window_size is not None:
        model.set_input_size(img_size=img_size, window_size=window_size)  # keeps the trained windows; validates
    replacing = overwrite and any(p.exists() for p in _outputs(target, fmt))
    other = family_of(meta["model"]).name != "swinv2"  # Swin V1, ViT: the contract's facts, no log-CPB windows
    with staged(target, path, replacing) as stage:
        writer = OTHER_WRITERS[fmt] if other else WRITERS[fmt]
        files, extra = writer(model, meta, stage.path / target.name, target, opset)
        stage.check_signal()  # a library may have caught the signal's exception and gone on
        final_files = [target.parent / f.relative_to(stage.path) for f in files]
        if fmt == "hf":
            final_files.append(target / "README.md")
        card = (encoder_card if other else model_card)(model, meta, path, fmt, final_files, extra)
        card_name = f"{target.name}/{HF_CARD}" if fmt == "hf" else f"{target.name}.json"
        if fmt == "hf":
            (stage.path / target.name / "README.md").write_text(hf_readme(card, target.name))
        (stage.path / card_name).write_text(json.dumps(card, indent=2, default=str) + "\n")
        stage.commit(list(dict.fromkeys([*(f.relative_to(stage.path).parts[0] for f in files),
                                         card_name.split("/")[0]])))
    card_path = target / HF_CARD if fmt == "hf" else Path(f"{target}.json")
    log.info("exported %s (%s) to %s", path, fmt, ", ".join(str(f) for f in final_files))
    return [*final_files, card_path]
