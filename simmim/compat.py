"""Every private API of torch, accelerate and timm that simmim relies on, in one file.

After upgrading one of these libraries, this is the file to read: each entry below says what the private name is used
for and what happens without it. Each is checked once, cheaply: torch's and timm's when this module is imported (the
backbone imports it, and needs the answers before its first forward), accelerate's at first use (the model does not
need accelerate). A check that fails either falls back to public API, logging a warning that names the installed
version, or, where no fallback keeps the behaviour, raises a ``RuntimeError`` naming the version at the call.
:func:`problems` lists every check that fails here; the test suite asserts it is empty on the versions
``pyproject.toml`` allows, so an upgrade that breaks one fails CI even where a fallback would hide it.

==================================================  ==========  ==============================================
private API                                         used in     without it
==================================================  ==========  ==============================================
``torch.ops.mkldnn._linear_pointwise``              models/     ``F.linear`` (float32 CPU products in the BLAS,
(positional ``"none", [], ""``: no fused            onednn_     ~2x slower there); probed with a tiny call
epilogue)                                           linear.py
``torch.ops.aten._softmax_backward_data.out``       models/     the same formula in public ops (one more
                                                    recompute   temporary the size of the attention maps)
``Tensor._version`` (in-place change counter)       backbone    no inference cache of the position bias
``torch.fx._symbolic_trace.is_fx_symbolic_tracing`` models/     ``is_fx_tracing`` from the same module, then
                                                    tracing.py  "never tracing" (fx tracing of the model fails)
``Optimizer.found_inf`` read by the fused AdamW     engine.py   the step is skipped after a host sync (one per
(GradScaler's hook; set to skip a step)                         step) instead of on the device
``AcceleratorState._shared_state/_reset_state``     run_dir.py  RuntimeError: a second run in one process with
                                                                other settings cannot be opened
``timm.models._features.feature_take_indices``      backbone    RuntimeError at ``forward_intermediates``
``timm.models._input.update_model_input_size``      backbone    ``set_input_size`` leaves timm's recorded input
                                                                size unchanged (a warning)
==================================================  ==========  ==============================================
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# name -> why it cannot be used here (None: it works). Filled by the checks below; accelerate's on first use.
_PROBLEMS: dict[str, str | None] = {}


def _record(name: str, problem: str | None, consequence: str = "") -> bool:
    """Keep a check's outcome; warn once, naming the library version, when it fails and a fallback takes over."""
    _PROBLEMS[name] = problem
    if problem is not None and consequence:
        log.warning("%s cannot be used (%s): %s", name, problem, consequence)
    return problem is None


def _torch() -> str:
    return f"torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------------------------
# torch


def mkldnn_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ b.T (+ bias)`` in oneDNN: a (M, K), b (N, K) -> (M, N). The op inductor emits for CPU linears; its
    positional ``attr="none"``, ``scalars=[]``, ``algorithm=""`` ask for no fused epilogue."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _check_mkldnn_linear() -> str | None:
    """Why :func:`mkldnn_linear` cannot be used here, or None. A tiny call against ``F.linear``, with and without
    bias: a renamed op, a changed signature or wrong numbers all show up here, not in every float32 CPU forward."""
    if not torch.backends.mkldnn.is_available():
        return f"{_torch()} is built without oneDNN"
    a = torch.arange(6, dtype=torch.float32).view(2, 3)  # small integers: the products are exact
    b = torch.arange(12, dtype=torch.float32).view(4, 3)
    bias = torch.arange(4, dtype=torch.float32)
    try:
        for c in (bias, None):
            out = mkldnn_linear(a, b, c)
            if out.shape != (2, 4) or not torch.equal(out, F.linear(a, b, c)):
                return f"{_torch()}: its output (shape {tuple(out.shape)}) differs from F.linear's"
    except Exception as err:  # a probe: whatever the op raises means it is not the op this code was written for
        return f"{_torch()}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


MKLDNN_LINEAR = _record("torch.ops.mkldnn._linear_pointwise", _check_mkldnn_linear(),
                        "float32 Linear products on CPUs use F.linear (same results, about 2x slower there)")


def _check_softmax_backward() -> str | None:
    try:
        op = torch.ops.aten._softmax_backward_data.out
        probs = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
        grad = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
        expected = _softmax_backward_public(grad.clone(), probs)
        got = op(grad, probs, -1, probs.dtype, grad_input=grad)  # in place, as the caller uses it
        if not torch.allclose(got, expected):
            return f"{_torch()}: the op's values differ from the softmax gradient"
    except Exception as err:  # a probe, as above
        return f"{_torch()}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _softmax_backward_public(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """softmax's backward along the last dim in public ops, in place in ``grad``: p * (g - sum(g * p))."""
    return grad.sub_((grad * probs).sum(-1, keepdim=True)).mul_(probs)


SOFTMAX_BACKWARD_OUT = _record("torch.ops.aten._softmax_backward_data.out", _check_softmax_backward(),
                               "recomputed attention uses public ops for softmax's backward (one more temporary "
                               "the size of the attention maps)")


def softmax_backward_(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Turn ``grad`` (the gradient w.r.t. ``probs = softmax(x, -1)``) into the gradient w.r.t. ``x``, in place:
    both (..., N). aten's kernel goes row by row without a temporary of the maps' size."""
    if SOFTMAX_BACKWARD_OUT:
        return torch.ops.aten._softmax_backward_data.out(grad, probs, -1, probs.dtype, grad_input=grad)
    return _softmax_backward_public(grad, probs)


VERSION_COUNTER = _record(
    "Tensor._version",
    None if isinstance(getattr(torch.zeros(1), "_version", None), int) else f"{_torch()} has no Tensor._version",
    "the position bias is computed at every inference forward (no cache)")


def version_of(t: torch.Tensor) -> int:
    """The counter torch bumps at every in-place change of ``t`` (optimizer step, ``copy_``, ``load_state_dict``);
    only call it where :data:`VERSION_COUNTER` is True."""
    return t._version


def _fx_symbolic_tracing() -> Callable[[], bool]:
    from torch.fx import _symbolic_trace as fx

    for name in ("is_fx_symbolic_tracing", "is_fx_tracing"):  # the first excludes torch.compile's own fx tracing
        fn = getattr(fx, name, None)
        if callable(fn):
            _record("torch.fx._symbolic_trace.is_fx_symbolic_tracing",
                    None if name == "is_fx_symbolic_tracing" else f"{_torch()} has only {name}")
            return fn
    _record("torch.fx._symbolic_trace.is_fx_symbolic_tracing", f"{_torch()} has neither is_fx_symbolic_tracing "
            "nor is_fx_tracing", "torch.fx.symbolic_trace of the model will fail (size branches see proxies)")
    return lambda: False


is_fx_symbolic_tracing: Callable[[], bool] = _fx_symbolic_tracing()
"""True inside ``torch.fx.symbolic_trace`` (shapes are proxies there, not ints); False under torch.compile."""

# public since torch 2.6 (pyproject allows 2.5): before it, any compile counts as exporting
is_exporting: Callable[[], bool] = getattr(torch.compiler, "is_exporting", torch.compiler.is_compiling)


@functools.cache
def _check_fused_found_inf() -> str | None:
    """Why a fused AdamW cannot skip a step on the device through ``found_inf``, or None: one tiny step with
    ``found_inf`` set must leave the parameter alone, one with it cleared must move it."""
    p = torch.nn.Parameter(torch.ones(2))
    try:
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
        for flag, moves in ((1.0, False), (0.0, True)):
            p.grad = torch.ones(2)
            before = p.detach().clone()
            opt.found_inf = torch.tensor(flag)  # type: ignore[attr-defined]
            opt.step()
            if (not torch.equal(before, p.detach())) != moves:
                return f"{_torch()}: the fused AdamW ignores found_inf={flag:g}"
    except (RuntimeError, TypeError) as err:
        return f"{_torch()}: fused AdamW with found_inf fails ({str(err).splitlines()[0][:120]})"
    return None


def can_skip_on_device(optimizer: Any) -> bool:
    """Whether ``optimizer`` (the torch one, unwrapped) can skip a step on the device: torch's fused Adam/AdamW,
    where :func:`skip_step_on_device` is known to work (checked once; else the engine decides on the host)."""
    if not (isinstance(optimizer, torch.optim.Optimizer) and optimizer.defaults.get("fused") is True):
        return False
    return _record("torch.optim.AdamW(fused=True).found_inf", _check_fused_found_inf(),
                   "a non-finite step is skipped after a host sync instead of on the device")


def skip_step_on_device(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """Make the next ``optimizer.step()`` a no-op on the device where ``ok`` is False, with no host sync.

    This relies on a torch internal that GradScaler uses: the fused Adam/AdamW set ``_step_supports_amp_scaling``
    and their ``step()`` passes ``getattr(self, "found_inf", None)`` to the fused kernel, which leaves parameters
    and moments unchanged where ``found_inf`` is non-zero (tests/test_pretrain.py's non-finite tests fail if a
    skipped step moves the weights).
    """
    optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------------------------
# timm


def _timm() -> str:
    import timm

    return f"timm {timm.__version__}"


def _missing(name: str, problem: str) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{name} is needed here but cannot be used ({problem}); install a timm version "
                           "pyproject.toml allows, or update simmim/compat.py")
    return fail


try:
    from timm.models._features import feature_take_indices as _feature_take_indices
    _record("timm.models._features.feature_take_indices", None)
except ImportError as err:
    _record("timm.models._features.feature_take_indices", f"{_timm()}: {err}")
    _feature_take_indices = _missing("timm.models._features.feature_take_indices", f"{_timm()}: {err}")


def feature_take_indices(num_stages: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's reading of ``indices`` for ``forward_intermediates``: None = all stages, n = the last n, a sequence =
    those (negative from the end). Returns (stage indices, the largest)."""
    return _feature_take_indices(num_stages, indices)


try:
    from timm.models._input import update_model_input_size as _update_model_input_size
    _record("timm.models._input.update_model_input_size", None)
except ImportError as err:
    _update_model_input_size = None
    _record("timm.models._input.update_model_input_size", f"{_timm()}: {err}",
            "set_input_size leaves timm's recorded input size (model args) at the built size")


def record_input_size(model: torch.nn.Module, img_size: tuple[int, int], window_size: tuple[int, int]) -> None:
    """Tell timm a model now runs at ``img_size``/``window_size``, apart from its source checkpoint's
    ``pretrained_cfg`` (what timm's own ``set_input_size`` does)."""
    if _update_model_input_size is not None:
        _update_model_input_size(model, img_size, window_size=window_size)


# ----------------------------------------------------------------------------------------------------------------
# accelerate (checked at first use)


@functools.cache
def _check_accelerator_reset() -> str | None:
    import accelerate
    from accelerate.state import AcceleratorState

    reset = getattr(AcceleratorState, "_reset_state", None)
    if not isinstance(getattr(AcceleratorState, "_shared_state", None), dict) or reset is None:
        problem = f"accelerate {accelerate.__version__} has no AcceleratorState._shared_state / _reset_state"
    elif "reset_partial_state" not in inspect.signature(reset).parameters:
        problem = f"accelerate {accelerate.__version__}: _reset_state takes no reset_partial_state"
    else:
        problem = None
    _record("accelerate.state.AcceleratorState._reset_state", problem)
    return problem


def reset_accelerator_state() -> None:
    """Forget the process-wide state an earlier ``Accelerator`` left (its precision, for one), so a second run in
    one process (tests, the demo) can open its own; the process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    problem = _check_accelerator_reset()
    if problem is not None:
        raise RuntimeError(f"cannot open a second run in this process: {problem}; install an accelerate version "
                           "pyproject.toml allows, or update simmim/compat.py")
    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)


# ----------------------------------------------------------------------------------------------------------------


def problems() -> dict[str, str]:
    """Every private API above that cannot be used with the installed libraries: name -> why (empty: all work)."""
    _check_accelerator_reset()
    can_skip_on_device(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True))
    return {name: problem for name, problem in _PROBLEMS.items() if problem is not None}
