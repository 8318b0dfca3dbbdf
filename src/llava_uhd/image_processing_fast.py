"""`LlavaUHDImageProcessorFast`: the LLaVA-UHD image processor with its resizing done by torch, batched.

The same settings, plan and output as `LlavaUHDImageProcessor` (the PIL one); only the pixels are computed
differently: every image is decoded by the same loader (`load_rgb`, JPEG draft included), becomes a tensor once and
moves to ``device`` once; the crops of the whole batch (slices and overviews) are grouped by box and output size,
each group is resized by one ``torch.nn.functional.interpolate`` call (antialiased, with PIL's filters: uint8 for
8-bit images on the CPU, float32 otherwise), patchified with a reshape and a permute, and rescaled and normalized
by one multiply-add into the output.

    processor = LlavaUHDImageProcessorFast.from_pretrained("out")    # or AutoImageProcessor(..., use_fast=True)
    batch = processor(images, return_tensors="pt", device="cuda")    # pixel_values stay on the GPU

Keys, shapes, dtypes, grids, patch order, layouts and sizes are identical to the PIL processor's. Pixel values
differ slightly (rounding; PIL pre-reduces large downscales by ``reducing_gap``; its box resize reads the pixels
around a slice's box, torch's only the box): measured in normalized units (one grey level is about 0.015), mean
absolute differences up to 0.003 and 99th percentiles up to 0.015 on 8-bit images, 1e-4 at most on float and 16-bit
ones; tests/test_image_processing_fast.py holds them to a mean under 0.01 and a 99th percentile under 0.03.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BatchFeature

from .image_io import rgb_size
from .image_processing import LlavaUHDImageProcessor, flatten_images, packed_batch, patchify

__all__ = ["LlavaUHDImageProcessorFast"]

# PIL filter -> interpolate's mode and arguments (antialiased like PIL's; "nearest-exact" samples PIL's pixel)
_MODES = {
    Image.Resampling.NEAREST: ("nearest-exact", {}),
    Image.Resampling.BILINEAR: ("bilinear", {"antialias": True, "align_corners": False}),
    Image.Resampling.BICUBIC: ("bicubic", {"antialias": True, "align_corners": False}),
}


class LlavaUHDImageProcessorFast(LlavaUHDImageProcessor):
    r"""`LlavaUHDImageProcessor` computed with torch: the same arguments, plan and output, crops resized in batches
    on the CPU or a GPU (``device``).

    Transformers 5's fast processors (``BaseImageProcessorFast``, an alias of ``TorchvisionBackend``) require
    torchvision; this one needs only torch (`torch.nn.functional.interpolate`), so it subclasses the PIL processor
    (itself a `BaseImageProcessor`) and replaces `preprocess`. It is registered as the ``"torchvision"`` backend of
    `AutoImageProcessor`, the key ``use_fast=True`` / ``backend="torchvision"`` asks for::

        AutoImageProcessor.from_pretrained(folder, use_fast=True)   # or LlavaUHDImageProcessorFast.from_pretrained

    (transformers picks that backend by default only where torchvision is installed). The saved configuration is
    the PIL processor's plus ``image_processor_type``: either class loads the other's.

    Differences from the PIL processor:

    - ``resample`` must be bicubic (the default), bilinear or nearest (torch has no Lanczos, box or Hamming filter);
    - ``reducing_gap`` is kept in the configuration but not used: torch resamples from the full decoded resolution
      (large JPEGs are still decoded at a reduced scale, by `load_rgb`'s draft, as in the PIL processor);
    - all images of a call are held (decoded, on ``device``) at once, so crops of different images can share a
      resize; the PIL processor holds one at a time.
    """

    uint8_resize_on_cpu = True
    """Resize 8-bit images in uint8 on the CPU (False: in float32, as on a GPU, where torch has no uint8 kernel)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._interpolation()  # validate now, not at the first image

    def _interpolation(self) -> tuple[str, dict]:
        if self.resample not in _MODES:
            names = ", ".join(Image.Resampling(r).name for r in _MODES)
            raise ValueError(f"{type(self).__name__} resamples with {names}; got resample={self.resample!r} "
                             f"({Image.Resampling(self.resample).name}): use LlavaUHDImageProcessor for it")
        return _MODES[self.resample]

    def preprocess(self, images, max_slices: int | None = None, return_tensors=None,
                   device: str | torch.device | None = None, **kwargs) -> BatchFeature:
        """Process one image or a list (possibly nested per sample: it is flattened in order) of images.

        Args:
            images: paths, encoded bytes, PIL images, numpy arrays or torch tensors (see `load_rgb`).
            max_slices: per-call slice cap, overriding the processor's.
            return_tensors: ``"pt"`` (``pixel_values`` stays on ``device``, the rest on the CPU), ``"np"`` or None
                (numpy).
            device: where the pixels are resized (``"cpu"``, the default, or ``"cuda"``...).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        mode, mode_kwargs = self._interpolation()
        device = torch.device("cpu" if device is None else device)
        # (pixels, eight_bit, crop) of every crop, in output order: each image's slices row-major, then its overview
        jobs, grids, owners, overview, layouts, sizes = [], [], [], [], [], []
        for i, image in enumerate(flatten_images(images)):
            working = self.load_working_image(image, i, max_slices)
            eight_bit = isinstance(working, Image.Image)
            width, height = rgb_size(working)
            plan = self.plan(width, height, max_slices)
            pixels = _to_tensor(working, device)
            if self.image_strategy == "pad":
                pixels = self._pad_tensor(pixels, eight_bit)
            for crop in plan.crops:
                jobs.append((pixels, eight_bit, crop))
                grids.append(crop.grid)
                owners.append(i)
                overview.append(crop is plan.overview)
            layouts.append((plan.rows, plan.cols))
            sizes.append((height, width))

        # crops of one box size, output size and kind (8-bit or float) resize together
        groups = defaultdict(list)
        for k, (_, eight_bit, crop) in enumerate(jobs):
            left, top, right, bottom = crop.box
            groups[(eight_bit, bottom - top, right - left, crop.size[1], crop.size[0])].append(k)
        # rescale and normalize per patch value (a patch is channel-major: p * p values of each channel in turn)
        factors = {}
        for eight_bit in (False, True):
            scale, offset = (np.repeat(v, self.patch_size**2) for v in self.normalization_factors(eight_bit))
            factors[eight_bit] = torch.from_numpy(scale).to(device), torch.from_numpy(-offset).to(device)
        dim = 3 * self.patch_size**2
        starts = np.cumsum([0] + [h_p * w_p for h_p, w_p in grids]).tolist()  # each crop's first row in pixel_values
        pixel_values = torch.empty((starts[-1], dim), dtype=torch.float32, device=device)
        for (eight_bit, box_h, box_w, out_h, out_w), members in groups.items():
            # 8-bit crops on the CPU resize as uint8 (torch's integer kernel, ported from Pillow-SIMD: rounded and
            # clipped like PIL's, and about 10x faster than float32 there); elsewhere in float32
            in_uint8 = eight_bit and device.type == "cpu" and self.uint8_resize_on_cpu
            dtype = torch.uint8 if in_uint8 else torch.float32
            boxes = [_box(jobs[k][0], jobs[k][2]) for k in members]  # views of the images, no copies
            if len(boxes) == 1:  # interpolate reads the view itself (a copy only to convert to float32)
                batch = boxes[0][None].to(dtype)
            else:  # one copy of each box, into the batch
                batch = torch.empty((len(boxes), 3, box_h, box_w), dtype=dtype, device=device,
                                    memory_format=torch.channels_last if in_uint8 else torch.contiguous_format)
                for row, box in zip(batch, boxes):
                    row.copy_(box)
            out = F.interpolate(batch, size=(out_h, out_w), mode=mode, **mode_kwargs)
            del batch, boxes
            if eight_bit and not in_uint8:  # PIL's 8-bit result: rounded and clipped to 0-255
                out.clamp_(0, 255).round_()
            patches = patchify(out, self.patch_size)  # (n, h_p * w_p, 3 * p * p), uint8 or float32
            del out
            scale, neg_offset = factors[eight_bit]
            for crop_patches, k in zip(patches, members):  # rescale and normalize, in float32, into place
                torch.addcmul(neg_offset, crop_patches, scale, out=pixel_values[starts[k]:starts[k + 1]])
        jobs.clear()  # the images can go

        if return_tensors != "pt":
            pixel_values = pixel_values.cpu().numpy()
        return packed_batch(pixel_values, grids, owners, overview, layouts, sizes, return_tensors)

    def _pad_tensor(self, pixels: torch.Tensor, eight_bit: bool) -> torch.Tensor:
        """`pad_to_square` on a ``(3, H, W)`` tensor, on its device."""
        _, h, w = pixels.shape
        side, left, top = self.square_placement(w, h)
        canvas = torch.empty((side, side, 3), dtype=pixels.dtype, device=pixels.device)  # channels last, as images
        canvas[:] = torch.tensor(self.pad_fill(eight_bit), dtype=pixels.dtype, device=pixels.device)
        canvas = canvas.permute(2, 0, 1)
        canvas[:, top:top + h, left:left + w] = pixels
        return canvas


def _box(pixels: torch.Tensor, crop) -> torch.Tensor:
    """The ``(3, h, w)`` view of ``crop``'s box in ``pixels``."""
    left, top, right, bottom = crop.box
    return pixels[:, top:bottom, left:right]


def _to_tensor(working: Image.Image | np.ndarray, device: torch.device) -> torch.Tensor:
    """What `load_rgb` returns as a ``(3, H, W)`` tensor on ``device``: uint8 for a PIL image, float32 in [0, 1]
    for a float array (a channels-last view of one ``(H, W, 3)`` block, moved in one transfer)."""
    array = np.asarray(working)
    with warnings.catch_warnings():  # PIL's buffer is read-only; nothing here writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    return tensor.to(device).permute(2, 0, 1)
