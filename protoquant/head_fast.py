"""The head's logits-only path: the same logits and scores as `ProtoQuantHead.forward`, cheaper.

`forward` materialises the similarity and activation maps (B, K, H, W) that explanations draw.
Accuracy, attribution and serving need only the logits and the pooled scores; this path
- divides the prototypes (not the (B, H*W, K) similarities) by the temperature: the unit
  prototypes are scaled by 1 / tau once, a (K, D) operation, and the matrix product yields the
  softmax input directly;
- keeps the (B, H*W, K) softmax internal (no (B, K, H, W) views are returned);
- inside `ProtoQuantHead.inference()` reuses the scaled prototypes and the effective class
  weights between calls (`DerivedTensors`), recomputing them whenever a source tensor changed;
- can run as one `torch.compile`d function (`compile_logits`), CUDA graphs included.

The two paths agree to float rounding (fp32, tested: scores atol 1e-6 at tau >= 0.1 and 1e-5 at
tau = 0.01, logits rtol 1e-5 / atol 1e-5); they are not bit-identical, since tau is applied
before the product instead of after it.

Shapes: features (B, D, H, W), codebook (K, D), removed (R, D), weight / mask (C, K),
scores (B, K), logits (B, C).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from protoquant.errors import ConfigError

logger = logging.getLogger(__name__)

NORM_EPS = 1e-12  # the same floor on a vector's length as F.normalize's default
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


@dataclass(frozen=True)
class HeadScores:
    """Logits and pooled scores of one batch, without the (B, K, H, W) maps."""

    logits: torch.Tensor  # (B, C)
    scores: torch.Tensor  # (B, K) pooled presence of each prototype


def scaled_unit_codes(codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, D) prototypes of length 1 / temperature: a product with unit features is similarity / tau."""
    length = torch.linalg.vector_norm(codebook, dim=1, keepdim=True).clamp_min(NORM_EPS)  # (N, 1)
    return codebook * ((1.0 / temperature) / length)  # (N, D)


def pooled_scores(features: torch.Tensor, scaled_codes: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep) spatial max of the softmax over all N prototypes of `scaled_codes` (N, D).

    The first `keep` prototypes are the explained ones; the others only enter the normaliser.
    """
    batch, channels, height, width = features.shape
    patches = features.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # (B, HW, D)
    logits = F.normalize(patches, dim=2) @ scaled_codes.t()  # (B, HW, N) = similarity / tau
    scores = torch.softmax(logits, dim=2).amax(dim=1)  # (B, N)
    return scores[:, :keep] if keep < scores.shape[1] else scores


def effective_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(C, K) class weights as the head uses them: ReLU(weight) * mask."""
    return torch.relu(weight) * mask


def logits_and_scores(
    features: torch.Tensor,
    codebook: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    removed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, C), scores (B, K)) straight from the head's tensors; what `compile_logits` compiles.

    `removed` (R, D) are normaliser-only prototypes (a pruned head), None for a plain head.
    """
    codes = codebook if removed is None else torch.cat([codebook, removed])  # (K + R, D)
    scores = pooled_scores(features, scaled_unit_codes(codes, temperature), codebook.shape[0])
    return scores @ effective_weight(weight, mask).t(), scores


def _fingerprint(tensor: torch.Tensor) -> tuple:
    """What changes when a tensor is replaced, moved, cast, reassigned through `.data` or edited in place."""
    return (
        id(tensor),
        tensor.data_ptr(),
        tensor._version,
        tensor.device,
        tensor.dtype,
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


class DerivedTensors:
    """Tensors derived from a head's buffers and parameters, reused while their sources are unchanged.

    Active only between `enter()` and `exit()` (the head's `inference()` scope); outside it every
    call recomputes. A source counts as changed when its object, storage address, version
    counter (every in-place operation, `load_state_dict`, the edits), device, dtype, shape or
    strides differ. The source storages are held, so a freed address cannot be reused by a new
    tensor and look unchanged. Not seen: writing in place through a `.data` alias
    (`p.data.copy_(x)` bypasses the version counter), which is why nothing is reused outside
    the scope. Never reused: inference tensors (no version counter) and sources that take
    gradients while autograd records.
    """

    def __init__(self) -> None:
        self.depth = 0
        self._key: tuple | None = None
        self._held: tuple = ()
        self._value: tuple[torch.Tensor, ...] = ()

    def enter(self) -> None:
        self.depth += 1

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.clear()

    def clear(self) -> None:
        self._key, self._held, self._value = None, (), ()

    def get(
        self, sources: tuple[torch.Tensor, ...], extra: tuple, build: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        """`build()`'s tensors, reused while `sources` and `extra` (plain values) are unchanged."""
        if not self._reusable(sources):
            return build()
        key = (tuple(_fingerprint(t) for t in sources), extra)
        if key != self._key:
            with torch.inference_mode(False), torch.no_grad():  # normal tensors, usable outside the mode
                value = build()
            self._key, self._value = key, value
            self._held = tuple(t.untyped_storage() for t in sources)
        return self._value

    def _reusable(self, sources: tuple[torch.Tensor, ...]) -> bool:
        if self.depth == 0 or any(t.is_inference() for t in sources):
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in sources))


class FastPathState:
    """A head's runtime state for the logits path: the reuse scope and the compiled functions.

    Not part of the model: copies (deepcopy, as the edits make; pickle) start fresh, eager and
    outside any scope. The compiled function is built per device type on first use.
    """

    def __init__(self) -> None:
        self.derived = DerivedTensors()
        self.mode: str | None = None
        self._compiled: dict[str, Callable | None] = {}

    def set_mode(self, mode: str | None) -> None:
        if mode is not None and mode not in COMPILE_MODES:
            raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)} or None, got {mode!r}")
        self.mode, self._compiled = mode, {}

    def compiled(self, device: torch.device) -> Callable | None:
        """The compiled `logits_and_scores` for `device`, or None (eager)."""
        if self.mode is None:
            return None
        if device.type not in self._compiled:
            self._compiled[device.type] = compile_logits(self.mode, device)
        return self._compiled[device.type]

    def __deepcopy__(self, memo: dict) -> FastPathState:
        return FastPathState()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def compile_logits(mode: str, device: torch.device) -> Callable | None:
    """`logits_and_scores` compiled for `device` with torch.compile `mode`, or None where it cannot be.

    Returns None (with a warning saying why) when torch.compile lacks what it needs: a C++
    compiler on the CPU, Triton on CUDA. CUDA-graph modes return outputs copied out of the
    graph's memory, so they stay valid after the next call.

    Raises:
        ConfigError: `mode` is not one of COMPILE_MODES.
    """
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    missing = compile_prerequisite_missing(device)
    if missing:
        logger.warning("head not compiled on %s: %s; the eager logits path is used", device, missing)
        return None
    compiled = torch.compile(logits_and_scores, mode=mode)
    if device.type != "cuda" or mode not in CUDA_GRAPH_MODES:
        return compiled

    def graph_safe(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        logits, scores = compiled(*args)
        return logits.clone(), scores.clone()  # the graph overwrites its outputs at the next replay

    return graph_safe


def compile_prerequisite_missing(device: torch.device) -> str:
    """Why torch.compile cannot build kernels for `device` here ("" when it can)."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's CUDA kernels are Triton kernels)
        except ImportError:
            return "torch.compile on CUDA needs the 'triton' package, which is not installed"
        return ""
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        names = [name or os.environ.get("CXX", "g++") for name in inductor_config.cpp.cxx]
        if not any(shutil.which(name) for name in names):
            return f"torch.compile on the CPU needs a C++ compiler ({' or '.join(names)} on PATH); none found"
        return ""
    return f"no torch.compile support is set up for device type {device.type!r}"
