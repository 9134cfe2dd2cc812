"""SimMIM random masking (arXiv 2111.09886, section 3.1).

The mask is drawn on a coarse grid of ``mask_patch_size`` pixel cells (32 px: 6x6 cells at 192 px) and then
upsampled to the model's token grid (4 px patches: 48x48 tokens), so every masked cell hides a whole 8x8 block of
tokens. Exactly ``ceil(cells * mask_ratio)`` cells are masked (22 of 36 at 0.6), never a random count.

Letters: ``gh, gw`` mask-cell grid, ``h, w`` token grid (``input_size // model_patch_size``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from simmim.errors import UserError

logger = logging.getLogger(__name__)

RngLike = np.random.Generator | int | None
_U64 = (1 << 64) - 1


def sample_seed(base_seed: int, epoch: int, index: int) -> int:
    """Mix ``(base_seed, epoch, index)`` into one 63-bit seed (fits ``torch.manual_seed`` and numpy).

    Uses numpy's ``SeedSequence`` hashing, so nearby triples give unrelated seeds. Negative values are allowed
    (read as 64-bit two's complement, e.g. index -1 for a per-epoch draw such as a sampler's shuffle order).
    """
    words = tuple(int(v) & _U64 for v in (base_seed, epoch, index))
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)
    return int(state[0]) >> 1


def _as_generator(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)  # int: a seed; None: fresh OS entropy


class MaskGenerator:
    """Draws SimMIM masks: bool (h, w) on the token grid, True = masked.

    Args:
        input_size: image side in pixels, or (H, W).
        mask_patch_size: side of a masked cell in pixels (32 in the paper).
        model_patch_size: the backbone's patch size in pixels (4 for Swin); one token per patch.
        mask_ratio: fraction of cells masked, in (0, 1) (0.6 in the paper).
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        if isinstance(input_size, (int, np.integer)):
            input_size = (int(input_size), int(input_size))
        if len(input_size) != 2:
            raise UserError(f"input_size must be an int or (H, W), got {input_size!r} (model.img_size)")
        H, W = (int(s) for s in input_size)
        if model_patch_size <= 0 or mask_patch_size <= 0 or H <= 0 or W <= 0:
            raise UserError(
                f"input_size {input_size}, mask_patch_size {mask_patch_size} and model_patch_size "
                f"{model_patch_size} must all be positive (model.img_size, data.mask_patch_size; model_patch_size is "
                f"the backbone's patch size, 4 for every SwinV2 variant)"
            )
        if mask_patch_size % model_patch_size:
            raise UserError(
                f"mask_patch_size {mask_patch_size} is not a multiple of model_patch_size {model_patch_size} "
                f"(data.mask_patch_size)"
            )
        for side in (H, W):
            if side % mask_patch_size:
                raise UserError(
                    f"input_size {side} is not a multiple of mask_patch_size {mask_patch_size} (model.img_size)"
                )
        if not 0.0 < mask_ratio < 1.0:
            raise UserError(f"mask_ratio {mask_ratio} must be in (0, 1), e.g. 0.6 (data.mask_ratio)")
        self.input_size = (H, W)
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.cell_grid = (H // mask_patch_size, W // mask_patch_size)  # (gh, gw)
        self.scale = mask_patch_size // model_patch_size  # tokens per cell side
        self.token_grid = (H // model_patch_size, W // model_patch_size)  # (h, w)
        self.num_cells = self.cell_grid[0] * self.cell_grid[1]
        # ceil, as the official code: 36 cells * 0.6 = 21.6 -> 22 masked
        self.num_masked_cells = math.ceil(self.num_cells * mask_ratio)

    def __call__(self, rng: RngLike = None) -> torch.Tensor:
        """Draw one mask: bool tensor (h, w), True = masked, constant on each (scale x scale) token block.

        ``rng`` is a numpy Generator (used, and advanced), an int seed, or None for an unseeded draw.
        """
        gen = _as_generator(rng)
        gh, gw = self.cell_grid
        cells = np.zeros(self.num_cells, dtype=bool)
        cells[gen.choice(self.num_cells, size=self.num_masked_cells, replace=False)] = True
        cells = cells.reshape(gh, gw)  # (gh, gw)
        tokens = cells.repeat(self.scale, axis=0).repeat(self.scale, axis=1)  # (h, w)
        return torch.from_numpy(tokens)

    def __repr__(self) -> str:
        return (
            f"MaskGenerator(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio}, "
            f"masked {self.num_masked_cells}/{self.num_cells} cells -> token grid {self.token_grid})"
        )
