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
* ``onnx`` -> ``<stem>.onnx``: pooled features (encoder) or logits (classifier) at the trained size, dynamic batch,
  verified against onnxruntime before returning.

timm and HF have no extra main-branch norms, so SwinV2-H/G (``extra_norm_period=6``) export only as safetensors/ONNX.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN
from timm.data import IMAGENET_DEFAULT_STD as IMAGENET_STD

from simmim.errors import RunStopped, UserError
from simmim.models import VARIANTS, SwinTransformerV2
from simmim.models.hf import hf_config, ours_to_hf
from simmim.weights import HF_CARD, meta_windows, model_from_weights, read_run_checkpoint, sha256

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

    ``pretrained_cfg_overlay`` points timm at the file and declares its ``num_classes``, input and pool size, so
    timm's loader neither drops the classifier (it does when ``num_classes`` differs from the pretrained cfg) nor
    adapts the stem; timm's ``checkpoint_filter_fn`` leaves our keys as they are (they are timm's native layout).
    """
    h, w = model.img_size
    mean, std = tuple(meta.get("mean") or IMAGENET_MEAN), tuple(meta.get("std") or IMAGENET_STD)
    pool = (h // model.encoder_stride, w // model.encoder_stride)
    overlay = (f"dict(file={str(file.resolve())!r}, num_classes={model.num_classes}, "
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
    """Python that rebuilds ``model`` with this package from a safetensors ``file``."""
    pretrained = [_size(p) for p in model.trained_window_sizes]
    return ("from safetensors.torch import load_file\nfrom simmim.models import create_model\n"
            f"model = create_model({_variant(meta)!r}, img_size={_size(model.img_size)!r}, "
            f"window_size={_size(model.window_size)!r}, pretrained_window_sizes={pretrained!r}, "
            f"num_classes={model.num_classes}, in_chans={model.in_chans})\n"
            f"model.load_state_dict(load_file({str(file.resolve())!r}))\nmodel.eval()")


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
        torch.save(sd, out)
    else:
        _save_safetensors(sd, out, _geometry_metadata(model, meta))
    return [out], {"load": _timm_loads(model, meta, final)}


def write_hf(model: SwinTransformerV2, meta: dict, out: Path, final: Path, opset: int | None
             ) -> tuple[list[Path], dict]:
    """A ``from_pretrained`` directory: config.json, model.safetensors (HF keys), preprocessor_config.json."""
    check_foreign(_variant(meta), "hf")
    names = meta.get("classes")
    id2label = dict(enumerate(names)) if isinstance(names, list) and len(names) == model.num_classes else None
    config = hf_config(model, id2label)  # validates square windows etc. before anything is written
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "config.json", out / "model.safetensors", out / "preprocessor_config.json"]
    files[0].write_text(json.dumps(config, indent=2) + "\n")
    _save_safetensors(ours_to_hf(_state_dict(model)), files[1])
    h, w = model.img_size
    processor = {  # swinv2's AutoImageProcessor is ViTImageProcessor: resize to the trained size, then normalise
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": h, "width": w},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(meta.get("mean") or IMAGENET_MEAN), "image_std": list(meta.get("std") or IMAGENET_STD)}
    files[2].write_text(json.dumps(processor, indent=2) + "\n")
    cls = "Swinv2ForImageClassification" if model.num_classes > 0 else "Swinv2Model"
    return files, {"load": {"transformers": f"transformers.{cls}.from_pretrained({str(final.resolve())!r})",
                            "image_processor": f"transformers.AutoImageProcessor.from_pretrained("
                                               f"{str(final.resolve())!r})"},
                   "outputs": "logits" if model.num_classes > 0 else "pooler_output (= simmim pooled features)"}


def write_onnx(model: SwinTransformerV2, meta: dict, out: Path, final: Path, opset: int | None
               ) -> tuple[list[Path], dict]:
    """pixel_values (batch, C, H, W) -> logits / pooled features (batch, D), dynamic batch, checked in onnxruntime."""
    for blk in model.blocks():
        blk.attn.cache_bias = False  # the inference cache keys on data pointers, which tracing cannot follow
    h, w = model.img_size
    example = torch.randn(2, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    output = "logits" if model.num_classes > 0 else "features"
    # a protobuf file holds at most 2 GiB: larger models keep their weights in <out>.data
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)
        dynamo = True
    except ImportError:
        dynamo = False
        log.warning("onnxscript is not installed: using the legacy TorchScript ONNX exporter")
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(model, (example,), str(out), dynamo=True, input_names=["pixel_values"],
                              output_names=[output], dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
                              opset_version=opset, external_data=external, verbose=False)
        else:
            torch.onnx.export(model, (example,), str(out), dynamo=False, input_names=["pixel_values"],
                              output_names=[output], dynamic_axes={"pixel_values": {0: "batch"}, output: {0: "batch"}},
                              opset_version=opset or 17)
    diff = check_onnx(model, out)
    files = [out] + ([Path(f"{out}.data")] if Path(f"{out}.data").is_file() else [])
    return files, {"onnx": {"input": f"pixel_values float32 (batch, {model.in_chans}, {h}, {w}), normalised",
                            "output": f"{output} float32 (batch, {model.num_classes or model.num_features})",
                            "opset": _opset(out), "exporter": "dynamo" if dynamo else "torchscript",
                            "max_abs_diff_vs_pytorch": diff},
                   "load": {"onnxruntime": f"onnxruntime.InferenceSession({str(final.resolve())!r})"}}


def _opset(path: Path) -> int | None:
    try:
        import onnx
    except ImportError:
        return None
    graph = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)


def check_opset(opset: int) -> None:
    """Refuse an ONNX opset the installed onnx package cannot describe, before anything is exported."""
    try:
        import onnx
    except ImportError as err:
        raise ImportError("the onnx export needs onnx, onnxscript and onnxruntime: pip install -e '.[onnx]'") from err
    newest = onnx.defs.onnx_opset_version()
    if not 7 <= opset <= newest:
        raise UserError(f"--opset {opset} is not an ONNX opset this installation supports (7..{newest}); e.g. 17")


def check_onnx(model: SwinTransformerV2, path: Path, batch: int = 3, atol: float = ONNX_ATOL) -> float:
    """Run the graph in onnxruntime on a random (batch, C, H, W) input; return the max abs difference to PyTorch,
    raising :class:`ExportMismatchError` above ``atol``. ``batch`` differs from the export's 2 to check that the
    batch axis is dynamic."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError("the onnx export verifies its graph with onnxruntime: pip install onnxruntime") from err
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
# card and entry point


def default_out(checkpoint: Path, fmt: str) -> Path:
    """Where ``fmt`` goes when no ``out`` is given: beside the checkpoint, named after its stem."""
    stem = checkpoint.with_suffix("").name
    name = {"safetensors": f"{stem}.safetensors", "timm": f"{stem}-timm.safetensors", "hf": f"{stem}-hf",
            "onnx": f"{stem}.onnx"}[fmt]
    return checkpoint.parent / name


def model_card(model: SwinTransformerV2, meta: dict, checkpoint: Path, fmt: str, files: list[Path],
               extra: dict) -> dict[str, Any]:
    """The JSON card: what the weights are, the geometry and normalisation they expect, where they came from."""
    first = model.blocks()[0]
    effective = [list(w) for w in model.effective_window_sizes]
    return {
        "format": fmt,
        "files": [f.name for f in files],
        "classes": meta.get("classes"),
        "source": {"checkpoint": str(checkpoint.resolve()), "sha256": sha256(checkpoint), "kind": meta["kind"]},
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
        "effective_window_sizes": effective,
        # the windows this model's log-CPB is normalised by now (needed to reproduce its outputs) ...
        "pretrained_window_sizes": [list(p) for p in model.pretrained_window_sizes],
        # ... and what to pass as pretrained_window_sizes when fine-tuning from it: the windows its log-CPB was
        # trained at (pretrained windows where set, else the effective ones)
        "finetune_pretrained_window_sizes": [list(w) for w in meta_windows(meta)],
        "change_geometry": (
            "the log-CPB must stay normalised by the trained windows "
            f"{[_size(w) for w in meta_windows(meta)]}: with simmim, model.set_input_size(img_size=..., "
            "window_size=...) keeps them; in the timm and transformers calls below they are passed as "
            "pretrained_window_sizes, so change only img_size / window_size (image_size for transformers)"),
        "mean": list(meta.get("mean") or IMAGENET_MEAN),
        "std": list(meta.get("std") or IMAGENET_STD),
        "recipe": meta.get("config", {}),
        **extra,
    }


def _outputs(target: Path, fmt: str) -> list[Path]:
    """Every path an export to ``target`` creates (card included), before it is written."""
    if fmt == "hf":
        return [target]
    extra = [Path(f"{target}.data")] if fmt == "onnx" else []
    return [target, Path(f"{target}.json"), *extra]


def _check_target(source: Path, target: Path, fmt: str, overwrite: bool) -> None:
    """Never write onto (or, for a directory, around) the source; an existing output needs ``overwrite``."""
    src = source.resolve()
    for path in _outputs(target, fmt):
        if path.resolve() == src or (path.is_dir() and src.is_relative_to(path.resolve())):
            raise UserError(f"--out {target} would overwrite the source checkpoint {source}; choose another --out")
    if fmt != "hf" and target.is_dir():
        raise UserError(f"--out {target} is a directory; pass a file name")
    if fmt == "hf" and target.exists() and not target.is_dir():
        raise UserError(f"hf export writes a directory, but {target} is a file; pass --out DIR")
    existing = [p for p in _outputs(target, fmt) if p.exists() and (fmt != "hf" or any(p.iterdir()))]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it, or choose another --out")


def _move_into_place(staged: Path, final: Path) -> None:
    """Atomically put ``staged`` where ``final`` is (a directory is swapped: the old one goes only afterwards)."""
    if staged.is_dir() and final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staged, final)
    for f in [final, *final.rglob("*")] if final.is_dir() else [final]:
        os.chmod(f, 0o755 if f.is_dir() else 0o644)  # weights others may read, as any downloaded model


def export(checkpoint: str | Path, fmt: str = "safetensors", out: str | Path | None = None,
           opset: int | None = None, overwrite: bool = False) -> list[Path]:
    """Export a run checkpoint to ``fmt`` (one of :data:`FORMATS`); returns the written files, card last.

    ``out`` defaults to a name beside the checkpoint (:func:`default_out`); an existing directory receives that
    default name inside it (for ``hf``, ``out`` is the directory itself). ``opset`` applies to ``onnx`` only.
    Everything is written to a hidden staging folder beside the target and moved into place at the end, so an
    interrupted export leaves no partial file; an existing output is replaced only with ``overwrite``, and the
    source checkpoint never.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise UserError(f"opset applies to the onnx format only, not {fmt!r}")
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
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.parent / f".{target.name}.export-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        files, extra = WRITERS[fmt](model, meta, stage / target.name, target, opset)
        final_files = [target.parent / f.relative_to(stage) if f.is_relative_to(stage) else f for f in files]
        card = model_card(model, meta, path, fmt, final_files, extra)
        card_name = f"{target.name}/{HF_CARD}" if fmt == "hf" else f"{target.name}.json"
        (stage / card_name).write_text(json.dumps(card, indent=2, default=str) + "\n")
        for name in dict.fromkeys([*(f.relative_to(stage).parts[0] for f in files), card_name.split("/")[0]]):
            _move_into_place(stage / name, target.parent / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    card_path = target / HF_CARD if fmt == "hf" else Path(f"{target}.json")
    log.info("exported %s (%s) to %s", path, fmt, ", ".join(str(f) for f in final_files))
    return [*final_files, card_path]
