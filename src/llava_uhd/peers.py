"""What the same image costs in the peers LLaVA-UHD is compared with (pure geometry, no torch).

* LLaVA-1.5: pad to a square with the mean colour, resize to 336x336: always 576 tokens.
* LLaVA-NeXT "anyres" (as transformers' ``LlavaNextProcessor`` counts it): pick the best of five fixed grids of
  336 tiles (``select_best_resolution``), encode the tiles and a 336 base view, remove the padding rows/columns
  from the tiles' feature map, and add one ``image_newline`` token per feature row.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LLAVA_NEXT_GRID_PINPOINTS", "PeerCost", "llava15_cost", "llava_next_cost", "select_best_resolution"]

# (height, width) as in LLaVA-NeXT's config `image_grid_pinpoints`.
LLAVA_NEXT_GRID_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass(frozen=True)
class PeerCost:
    """Cost of one image: ViT crops and patches, and LLM visual tokens."""

    name: str
    crops: int
    vit_patches: int
    visual_tokens: int
    detail: str


def llava15_cost(width: int, height: int, image_size: int = 336, patch_size: int = 14) -> PeerCost:
    """LLaVA-1.5: one padded square at the native size, every patch token kept (MLP projector)."""
    patches = (image_size // patch_size) ** 2
    return PeerCost("llava-1.5", 1, patches, patches, f"pad {width}x{height} to a square, resize to {image_size}")


def select_best_resolution(width: int, height: int, pinpoints=LLAVA_NEXT_GRID_PINPOINTS) -> tuple[int, int]:
    """LLaVA-NeXT's choice of canvas ``(height, width)``: most effective resolution, then least waste."""
    best, best_key = None, None
    for ph, pw in pinpoints:
        # scale = min(pw / width, ph / height), compared exactly
        if pw * height <= ph * width:
            down_w, down_h = pw, (height * pw) // width
        else:
            down_w, down_h = (width * ph) // height, ph
        effective = min(down_w * down_h, width * height)
        wasted = pw * ph - effective
        key = (effective, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (ph, pw), key
    return best


def llava_next_cost(
    width: int, height: int, image_size: int = 336, patch_size: int = 14, pinpoints=LLAVA_NEXT_GRID_PINPOINTS
) -> PeerCost:
    """LLaVA-NeXT anyres: base view + tiles, padding removed, one newline token per feature row (2160 for
    672x1008)."""
    ph, pw = select_best_resolution(width, height, pinpoints)
    tiles_h, tiles_w = ph // image_size, pw // image_size
    side = image_size // patch_size
    cur_h, cur_w = tiles_h * side, tiles_w * side
    # Remove the rows/columns that only saw padding (transformers' `_get_unpadded_features`).
    if width * cur_h > cur_w * height:  # image wider than the canvas: padding top and bottom
        new_h = (height * cur_w) // width
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = (width * cur_h) // height
        cur_w -= 2 * ((cur_w - new_w) // 2)
    tokens = side * side + cur_h * cur_w + cur_h
    crops = 1 + tiles_h * tiles_w
    detail = f"base view + {tiles_w}x{tiles_h} tiles of {image_size} ({cur_w}x{cur_h} features kept + newlines)"
    return PeerCost("llava-next", crops, crops * side * side, tokens, detail)
