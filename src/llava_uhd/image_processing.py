"""The LLaVA-UHD image processor: any image in, every slice and overview as ViT patches out.

A batch of images whose slices all differ in size is returned packed, as Qwen2-VL does: the patches of every crop
(slices and overviews of all images) are flattened and concatenated along one axis, and the patch grid of each crop
says where one crop ends and the next begins. A model can then run the patch embedding over the whole batch at
once and encode the crops without padding any of them to the largest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .commandline import free_cores
from .image_io import describe_image, load_rgb, rgb_size
from .slicing import DEFAULT_MAX_PIXELS, SliceConfig, SlicePlan, plan_fixed_grid, plan_slices

__all__ = ["LlavaUHDImageProcessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "load_rgb",
           "vision_image_stats", "packed_batch", "patchify", "unpatchify", "flatten_images"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

def _resize_crop(image: Image.Image | np.ndarray, box, size, resample, reducing_gap: float | None = None
                 ) -> np.ndarray:
    """Resize the ``box`` region to ``size``: float32 (h, w, 3), 0-255 for PIL sources, 0-1 for float ones. PIL
    images resize straight from the region (``resize(box=...)``, no cropped copy), first reduced by an integer
    factor while the region stays ``reducing_gap`` times larger than ``size`` (PIL's ``reducing_gap``)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.resize(size, resample, box=box, reducing_gap=reducing_gap), dtype=np.float32)
    left, top, right, bottom = box
    region = image[top:bottom, left:right]
    # PIL's "F" mode resizes one float channel at full precision with the same antialiased filters.
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(region[:, :, c])).resize(size, resample))
                     for c in range(3)], axis=-1)


# Below this many source pixels a resize takes about a millisecond: threads would cost more than they save.
_PARALLEL_RESIZE_PIXELS = 2_000_000


def _resize_workers(plan: SlicePlan) -> int:
    """Threads for resizing ``plan``'s crops: one per crop up to the cores other processes leave idle (a thread
    that waits for a busy core slows the whole image down), one for small images."""
    source = sum((c.box[2] - c.box[0]) * (c.box[3] - c.box[1]) for c in plan.crops)
    if source < _PARALLEL_RESIZE_PIXELS or len(plan.crops) < 2:
        return 1
    return min(len(plan.crops), free_cores())


def patchify(pixels, patch_size: int):
    """``(..., 3, h, w)`` to ``(..., h/p * w/p, 3*p*p)``: patches row-major, each patch channel-major like a conv
    weight. A numpy array or a torch tensor (any leading batch dimensions), returned as the same kind."""
    *lead, c, h, w = pixels.shape
    p, n = patch_size, len(lead)
    x = pixels.reshape(*lead, c, h // p, p, w // p, p)
    order = (*range(n), n + 1, n + 3, n, n + 2, n + 4)
    x = x.permute(*order) if hasattr(x, "permute") else x.transpose(order)  # torch's transpose swaps two dims
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


def unpatchify(patches: np.ndarray, grid: tuple[int, int], patch_size: int) -> np.ndarray:
    """Inverse of `patchify`: ``(h_p*w_p, 3*p*p)`` to ``(3, h_p*p, w_p*p)``."""
    h_p, w_p = grid
    p = patch_size
    c = patches.shape[-1] // (p * p)
    x = patches.reshape(h_p, w_p, c, p, p).transpose(2, 0, 3, 1, 4)
    return x.reshape(c, h_p * p, w_p * p)


class LlavaUHDImageProcessor(BaseImageProcessor):
    r"""Cuts each image into LLaVA-UHD slices plus an overview and returns their patches, packed.

    Args:
        size (`dict`, defaults to ``{"height": 336, "width": 336}``): the ViT's native input size.
        patch_size (`int`, defaults to 14): the ViT's patch size.
        max_slices (`int`, defaults to 6): slice cap (the paper: 6; the authors' release: 7). Can be overridden per
            call.
        max_pixels (`int`, defaults to `DEFAULT_MAX_PIXELS`, Pillow's bomb threshold, about 179 megapixels):
            larger images are refused with a `ValueError`, from the file's header, before decoding.
        resample (`int`, defaults to ``PIL.Image.BICUBIC``): resampling filter (PIL filters are antialiased).
        reducing_gap (`float`, defaults to 3.0): a large downscale of an 8-bit image first reduces it by an integer
            factor (a box filter) while it stays this many times larger than the target, then resamples (PIL's
            ``reducing_gap``: faster, and at 3 indistinguishable from a full resample in most cases); None resamples
            from the full resolution.
        do_rescale, rescale_factor: scale 8-bit pixel values by ``1/255`` (float inputs must already be in [0, 1]).
        do_normalize, image_mean, image_std: normalization (CLIP's mean and std by default).
        image_strategy (`str`, defaults to ``"uhd"``): ``"uhd"`` (the LLaVA-UHD plan), ``"pad"`` (LLaVA-1.5: pad to a
            square with the mean colour, resize to the native size: one crop) or ``"fixed_grid"`` (a fixed
            ``fixed_grid = (cols, rows)`` grid of aspect-keeping slices plus the overview), for the paper's ablations.

    Returns from `preprocess` / `__call__` a `BatchFeature` with, for ``B`` images cut into ``K`` crops in all (each
    image's slices row-major, then its overview) holding ``P`` patches in all:

    - ``pixel_values``: ``(P, 3 * patch_size**2)`` float32, the normalized patches of every crop, concatenated;
      within a crop patches are row-major and each patch is ``(3, p, p)`` flattened (the layout of a conv patch
      embedding's weight, so the embedding is one matmul).
    - ``patch_grid_hw``: ``(K, 2)`` int64, each crop's patch grid ``(h_p, w_p)``; crop ``k`` owns
      ``h_p * w_p`` rows of ``pixel_values`` after those of crops ``0 .. k-1``.
    - ``crop_image_ids``: ``(K,)`` int64, the index of the image each crop belongs to.
    - ``crop_is_overview``: ``(K,)`` bool, True for the overview crops.
    - ``image_layout``: ``(B, 2)`` int64, each image's slice grid ``(rows, cols)`` (``(1, 1)``: not sliced).
    - ``image_sizes``: ``(B, 2)`` int64, each image's ``(height, width)`` as decoded, after EXIF orientation.

    A JPEG file with more than four times the pixels its crops can use (``4 * (max_slices + 1)`` native areas:
    twice each crop's resolution on each side) decodes at 1/2, 1/4 or 1/8 scale, keeping at least that many
    (`load_rgb`'s ``keep_pixels``): a 48-megapixel photo costs the memory of a 12-megapixel one, and the plan and
    ``image_sizes`` follow the decoded size. Other formats decode in full.
    """

    model_input_names = ["pixel_values", "patch_grid_hw", "crop_image_ids", "crop_is_overview", "image_layout",
                         "image_sizes"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        patch_size: int = 14,
        max_slices: int = 6,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        resample: int = Image.Resampling.BICUBIC,
        reducing_gap: float | None = 3.0,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: tuple[float, float, float] | list[float] = OPENAI_CLIP_MEAN,
        image_std: tuple[float, float, float] | list[float] = OPENAI_CLIP_STD,
        image_strategy: str = "uhd",
        fixed_grid: tuple[int, int] | list[int] = (2, 2),
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = dict(size) if size is not None else {"height": 336, "width": 336}
        self.patch_size = int(patch_size)
        self.max_slices = int(max_slices)
        self.max_pixels = max_pixels
        self.resample = int(resample)
        if reducing_gap is not None and not reducing_gap >= 1:
            raise ValueError(f"reducing_gap must be >= 1 or None, got {reducing_gap!r}")
        self.reducing_gap = None if reducing_gap is None else float(reducing_gap)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        if any(float(v) == 0 for v in self.image_std):
            raise ValueError(f"image_std must not hold a 0 (normalizing divides by it), got {self.image_std}")
        if image_strategy not in ("uhd", "pad", "fixed_grid"):
            raise ValueError(f"image_strategy must be 'uhd', 'pad' or 'fixed_grid', got {image_strategy!r}")
        self.image_strategy = image_strategy
        self.fixed_grid = [int(v) for v in fixed_grid]
        self.slice_config  # validate now, not at the first image

    @property
    def slice_config(self) -> SliceConfig:
        return SliceConfig(
            image_size=(int(self.size["width"]), int(self.size["height"])),
            patch_size=self.patch_size,
            max_slices=self.max_slices,
            max_pixels=self.max_pixels,
        )

    @classmethod
    def from_slice_config(cls, config: SliceConfig, **kwargs) -> "LlavaUHDImageProcessor":
        w, h = config.image_size
        return cls(size={"height": h, "width": w}, patch_size=config.patch_size, max_slices=config.max_slices,
                   max_pixels=config.max_pixels, **kwargs)

    def plan(self, width: int, height: int, max_slices: int | None = None) -> SlicePlan:
        """The slicing plan this processor follows for a ``width x height`` image."""
        config = self.slice_config
        if max_slices is not None:
            config = SliceConfig(**{**asdict(config), "max_slices": max_slices})
        if self.image_strategy == "pad":
            side = max(width, height)  # the padded square, one view at the native size
            return plan_slices(side, side, config, max_slices=1)
        if self.image_strategy == "fixed_grid":
            cols, rows = self.fixed_grid
            return plan_fixed_grid(width, height, min(cols, width), min(rows, height), config)
        return plan_slices(width, height, config)

    def keep_pixels(self, max_slices: int | None = None) -> int:
        """How many pixels of an image its crops can use, four times over (see the class docstring)."""
        if self.image_strategy == "pad":
            crops = 1
        elif self.image_strategy == "fixed_grid":
            crops = self.fixed_grid[0] * self.fixed_grid[1] + 1
        else:
            crops = (max_slices if max_slices is not None else self.max_slices) + 1
        return 4 * crops * int(self.size["width"]) * int(self.size["height"])

    @staticmethod
    def square_placement(width: int, height: int) -> tuple[int, int, int]:
        """``(side, left, top)``: the square `pad_to_square` makes of a ``width x height`` image, and where the
        image sits in it (centred)."""
        side = max(width, height)
        return side, (side - width) // 2, (side - height) // 2

    def pad_fill(self, eight_bit: bool) -> tuple[int, int, int] | tuple[float, float, float]:
        """The colour `pad_to_square` fills with: the mean colour, as 0-255 integers (truncated, as LLaVA-1.5
        does) for 8-bit images, as float32 values in [0, 1] for float ones."""
        mean = np.asarray(self.image_mean, dtype=np.float32)
        return tuple(int(v * 255) for v in mean) if eight_bit else tuple(float(v) for v in mean)

    def pad_to_square(self, image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
        """LLaVA-1.5's `expand2square`: centre the image on a square filled with the mean colour."""
        eight_bit = isinstance(image, Image.Image)
        side, left, top = self.square_placement(*rgb_size(image))
        if eight_bit:
            canvas = Image.new("RGB", (side, side), self.pad_fill(True))
            canvas.paste(image, (left, top))
            return canvas
        h, w = image.shape[:2]
        canvas = np.empty((side, side, 3), np.float32)
        canvas[:] = self.pad_fill(False)
        canvas[top:top + h, left:left + w] = image
        return canvas

    def load_working_image(self, image, index: int = 0, max_slices: int | None = None) -> Image.Image | np.ndarray:
        """`load_rgb` as `preprocess` calls it (``max_pixels``, and the JPEG draft of `keep_pixels`): a PIL RGB
        image for 8-bit sources, else a float32 ``(H, W, 3)`` array in [0, 1]. A `ValueError` names the image by
        its position ``index`` in the batch and `describe_image`."""
        try:
            return load_rgb(image, self.max_pixels, keep_pixels=self.keep_pixels(max_slices))
        except ValueError as e:
            raise ValueError(f"image {index} ({describe_image(image)}): {e}") from e

    def normalization_factors(self, eight_bit: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, offset)``, float32 per channel: rescale and normalize are ``pixels * scale - offset``, i.e.
        ``x * (r / std) - mean / std`` with ``r`` the rescale factor for 8-bit images (1 for float ones)."""
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        r = self.rescale_factor if eight_bit and self.do_rescale else 1.0
        scale = (r / std if self.do_normalize else np.full(3, r)).astype(np.float32)
        offset = (mean / std if self.do_normalize else np.zeros(3)).astype(np.float32)
        return scale, offset

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        return out

    def preprocess(self, images, max_slices: int | None = None, return_tensors=None, **kwargs) -> BatchFeature:
        """Process one image or a list (possibly nested per sample: it is flattened in order) of images.

        Args:
            images: paths, encoded bytes, PIL images, numpy arrays or torch tensors (see `load_rgb`).
            max_slices: per-call slice cap, overriding the processor's.
            return_tensors: ``"pt"``, ``"np"`` or None (numpy).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        flat = flatten_images(images)
        patches, grids, owners, overview, layouts, sizes = [], [], [], [], [], []
        for i, image in enumerate(flat):
            working = self.load_working_image(image, i, max_slices)
            eight_bit = isinstance(working, Image.Image)
            width, height = rgb_size(working)
            plan = self.plan(width, height, max_slices)
            if self.image_strategy == "pad":
                working = self.pad_to_square(working)
            # rescale and normalize as one multiply-add, in place: x * (r / std) - mean / std
            scale, offset = self.normalization_factors(eight_bit)

            def crop_patches(crop, working=working, scale=scale, offset=offset):
                pixels = _resize_crop(working, crop.box, crop.size, self.resample, self.reducing_gap)
                pixels *= scale
                pixels -= offset
                return patchify(pixels.transpose(2, 0, 1), self.patch_size)

            workers = _resize_workers(plan)
            if workers > 1:  # PIL and numpy release the GIL: the crops of a large image resize side by side
                with ThreadPoolExecutor(workers) as pool:
                    patches += pool.map(crop_patches, plan.crops)
            else:
                patches += map(crop_patches, plan.crops)
            for crop in plan.crops:
                grids.append(crop.grid)
                owners.append(i)
                overview.append(crop is plan.overview)
            layouts.append((plan.rows, plan.cols))
            sizes.append((height, width))
        dim = 3 * self.patch_size**2
        pixel_values = np.concatenate(patches) if patches else np.zeros((0, dim), np.float32)
        return packed_batch(pixel_values, grids, owners, overview, layouts, sizes, return_tensors)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


def packed_batch(pixel_values, grids, owners, overview, layouts, sizes, return_tensors=None) -> BatchFeature:
    """The processors' output: ``pixel_values`` and each crop's grid, image and overview flag, each image's layout
    and size, as the arrays the model reads (see the class docstring)."""
    data = {
        "pixel_values": pixel_values,
        "patch_grid_hw": np.asarray(grids, dtype=np.int64).reshape(-1, 2),
        "crop_image_ids": np.asarray(owners, dtype=np.int64),
        "crop_is_overview": np.asarray(overview, dtype=bool),
        "image_layout": np.asarray(layouts, dtype=np.int64).reshape(-1, 2),
        "image_sizes": np.asarray(sizes, dtype=np.int64).reshape(-1, 2),
    }
    return BatchFeature(data=data, tensor_type=return_tensors)


def vision_image_stats(name_or_path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a vision checkpoint expects: from its preprocessor config where it has one, else the
    family's standard values (CLIP's; ImageNet's for DINOv2; 0.5 for SigLIP)."""
    import json

    from transformers import AutoConfig
    from transformers.utils import cached_file

    try:
        path = cached_file(name_or_path, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    except OSError:
        path = None
    if path:
        with open(path) as f:
            cfg = json.load(f)
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    if model_type.startswith("dinov2"):
        return IMAGENET_MEAN, IMAGENET_STD
    if model_type.startswith("siglip"):
        return SIGLIP_MEAN, SIGLIP_STD
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def flatten_images(images) -> list:
    """One image or a list (possibly nested per sample) of images, as a flat list in order."""
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:
            out.extend(flatten_images(item) if isinstance(item, (list, tuple)) else [item])
        return out
    return [images]
