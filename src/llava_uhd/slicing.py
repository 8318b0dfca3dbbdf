"""Image modularization: how LLaVA-UHD cuts an image into slices (pure geometry, no torch).

The partition strategy of the paper (Sec. 3.1):

* ideal slice count ``N = ceil(W_I * H_I / (W_v * H_v))``, capped at ``max_slices``;
* candidate grids ``(m, n)`` (m columns, n rows) with ``m * n`` in ``{N-1, N, N+1}`` (1 and counts above the
  cap excluded);
* score (Eq. 1) ``S(m, n) = -|log(W_I * n / (H_I * m)) - log(W_v / H_v)|``: the slice aspect ratio should be
  close to the ViT's; the grid with the highest score wins (Eq. 2).

Everything here is computed exactly with integers and fractions, so the choice never depends on floating-point
rounding. Ties (equal scores) are broken, in this order, by:

1. the slice count closest to the ideal ``N``;
2. the larger slice count (more resolution);
3. slices oriented like the image (for a landscape image prefer landscape slices, for a portrait image portrait
   ones), then square slices, then the others; a square image prefers landscape slices, i.e. at most as many
   columns as rows (a square image with 6 slices becomes 2 columns x 3 rows);
4. slices closer to square.

Rules 3 and 4 only matter for a non-square ViT (with a square one, equal scores at equal counts are transposed
grids). Rules 1-4 are symmetric under transposition, so the plan of a (H, W) image is the transpose of the plan of
the (W, H) image whenever the image is not square (with a non-square ViT: the plan for the ViT turned too).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SliceConfig",
    "Slice",
    "SlicePlan",
    "plan_slices",
    "plan_fixed_grid",
    "choose_grid",
    "fit_to_patches",
    "partition",
]


DEFAULT_MAX_PIXELS = 178_956_970
"""Pillow's decompression-bomb error threshold (``2 * PIL.Image.MAX_IMAGE_PIXELS``), about 179 megapixels."""


@dataclass(frozen=True)
class SliceConfig:
    """Settings of the partition strategy.

    Args:
        image_size: the ViT's native input size ``(W_v, H_v)`` in pixels.
        patch_size: the ViT's patch size in pixels.
        max_slices: cap on the number of slices (the paper uses 6, the authors' release 7).
        max_pixels: images with more pixels are refused with a `ValueError` (None: no limit). The plan itself is
            cheap for any size; the limit protects the image processor from decoding huge images (a
            decompression bomb: a 100 KB PNG can claim 32000x32000 pixels, 3 GB decoded). The default,
            `DEFAULT_MAX_PIXELS`, is Pillow's own refusal threshold: a 150-megapixel photo passes.
    """

    image_size: tuple[int, int] = (336, 336)
    patch_size: int = 14
    max_slices: int = 6
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        w, h = self.image_size
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise ValueError(f"image_size must be two positive integers, got {self.image_size!r}")
        if not isinstance(self.patch_size, int) or self.patch_size <= 0:
            raise ValueError(f"patch_size must be a positive integer, got {self.patch_size!r}")
        if w % self.patch_size or h % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if not isinstance(self.max_slices, int) or self.max_slices < 1:
            raise ValueError(f"max_slices must be an integer >= 1, got {self.max_slices!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive or None, got {self.max_pixels!r}")

    @classmethod
    def paper(cls, **overrides) -> "SliceConfig":
        """The paper's setting: CLIP-ViT-L/14-336, at most 6 slices (672x1008 max resolution)."""
        return cls(**{"image_size": (336, 336), "patch_size": 14, "max_slices": 6, **overrides})

    @classmethod
    def release(cls, **overrides) -> "SliceConfig":
        """The authors' released code (thunlp/LLaVA-UHD v1): like the paper but at most 7 slices."""
        return cls(**{"image_size": (336, 336), "patch_size": 14, "max_slices": 7, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "SliceConfig":
        """A preset by name: ``"paper"`` or ``"release"``."""
        presets = {"paper": cls.paper, "release": cls.release}
        if name not in presets:
            raise ValueError(f"unknown slicing preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)

    @property
    def native_patches(self) -> int:
        """Patches of the native grid (576 for 336/14): no slice ever gets more."""
        w, h = self.image_size
        return (w // self.patch_size) * (h // self.patch_size)


@dataclass(frozen=True)
class Slice:
    """One crop of the source image and the size it is resized to.

    Attributes:
        box: ``(left, top, right, bottom)`` in source pixels (right/bottom exclusive).
        size: ``(width, height)`` after resizing; both multiples of the patch size.
        patch_size: the ViT patch size the size is a multiple of.
    """

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid ``(h_p, w_p)`` the ViT sees for this slice."""
        return self.size[1] // self.patch_size, self.size[0] // self.patch_size

    @property
    def num_patches(self) -> int:
        h_p, w_p = self.grid
        return h_p * w_p


@dataclass(frozen=True)
class SlicePlan:
    """How one image is encoded.

    Attributes:
        width, height: the source image size.
        cols, rows: the slice grid (``1 x 1`` when the image is not sliced).
        slices: the slices in row-major order (one slice, the whole image, when not sliced).
        overview: the low-resolution view of the whole image, or None when the image is not sliced (the single
            slice already is the whole image).
    """

    width: int
    height: int
    cols: int
    rows: int
    slices: tuple[Slice, ...]
    overview: Slice | None = None
    config: SliceConfig = field(default_factory=SliceConfig, repr=False, compare=False)

    @property
    def is_sliced(self) -> bool:
        return self.overview is not None

    @property
    def crops(self) -> tuple[Slice, ...]:
        """Everything the ViT encodes, in encoding order: the slices, then the overview."""
        return self.slices + ((self.overview,) if self.overview is not None else ())

    @property
    def patch_grids(self) -> list[tuple[int, int]]:
        """``(h_p, w_p)`` of every crop, slices first, then the overview."""
        return [c.grid for c in self.crops]

    @property
    def num_patches(self) -> int:
        """ViT patches over all crops (CLS tokens not counted)."""
        return sum(c.num_patches for c in self.crops)

    def num_separators(self, spatial_schema: bool = True) -> int:
        """Spatial-schema tokens: "," between slices of a row and "\\n" after each row, ``cols * rows`` in all.

        An image that is not sliced has no layout to describe and gets none.
        """
        return self.cols * self.rows if (spatial_schema and self.is_sliced) else 0

    def num_tokens(self, queries: int = 64, spatial_schema: bool = True) -> int:
        """LLM tokens this image costs: ``queries`` per crop plus the separators (454 for 672x1008)."""
        return queries * len(self.crops) + self.num_separators(spatial_schema)

    def to_dict(self, queries: int = 64, spatial_schema: bool = True) -> dict:
        """A JSON-friendly description (keys: cols, rows, slices[{box, size, grid}], overview, tokens)."""

        def crop(c: Slice) -> dict:
            return {"box": list(c.box), "size": list(c.size), "grid": list(c.grid)}

        return {
            "width": self.width,
            "height": self.height,
            "cols": self.cols,
            "rows": self.rows,
            "slices": [crop(s) for s in self.slices],
            "overview": crop(self.overview) if self.overview is not None else None,
            "patches": self.num_patches,
            "tokens": self.num_tokens(queries, spatial_schema),
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.config).items()},
        }


def _check_size(width: int, height: int, config: SliceConfig) -> None:
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"image {name} must be a positive integer, got {v!r}")
    if config.max_pixels is not None and width * height > config.max_pixels:
        raise ValueError(
            f"image of {width}x{height} = {width * height} pixels exceeds max_pixels={config.max_pixels}; "
            "downscale it first or raise SliceConfig.max_pixels"
        )


def _round_sqrt(x: Fraction) -> int:
    """``floor(sqrt(x) + 1/2)`` for a non-negative rational, exactly."""
    return (math.isqrt(math.floor(4 * x)) + 1) // 2


def _aspect_error(a: Fraction) -> Fraction:
    """A value ordered like ``|log(a)|`` for ``a > 0``: ``max(a, 1/a)``."""
    return a if a >= 1 else 1 / a


def fit_to_patches(width: int, height: int, config: SliceConfig) -> tuple[int, int]:
    """Resize target ``(w, h)`` for a ``width x height`` region: about the native area, same aspect ratio.

    Both sides are multiples of the patch size, at least one patch each, and the patch count never exceeds the
    native grid's. Each side moves by at most about half a patch from the exact area-preserving size, except where
    a side would fall below one patch or the patch cap binds (extreme aspect ratios), where the aspect ratio gives
    way.
    """
    cap = config.native_patches
    aspect = Fraction(width, height)
    # Exact patch counts that keep the aspect ratio and fill the native area: w_i * h_i = cap, w_i / h_i = aspect.
    w_sq, h_sq = cap * aspect, cap / aspect  # squares of w_i, h_i
    if h_sq < 1:  # too wide for even one patch row
        h_p, w_p = 1, min(cap, max(1, round(aspect)))
    elif w_sq < 1:  # too tall for even one patch column
        w_p, h_p = 1, min(cap, max(1, round(1 / aspect)))
    else:
        w_p, h_p = max(1, _round_sqrt(w_sq)), max(1, _round_sqrt(h_sq))
        if w_p * h_p > cap:  # both sides rounded up: take the best fit among the ones that round one side down
            fw, fh = math.isqrt(math.floor(w_sq)), math.isqrt(math.floor(h_sq))
            options = [(a, b) for a, b in ((fw, h_p), (w_p, fh), (fw, fh)) if a >= 1 and b >= 1 and a * b <= cap]
            # smallest aspect distortion, then most patches; symmetric in w/h so transposition is preserved
            w_p, h_p = min(options, key=lambda o: (_aspect_error(Fraction(o[0], o[1]) / aspect), -o[0] * o[1]))
    p = config.patch_size
    return w_p * p, h_p * p


def choose_grid(width: int, height: int, config: SliceConfig) -> tuple[int, int]:
    """The ``(cols, rows)`` of Eq. 1/2 (``(1, 1)``: do not slice). See the module docstring for the tie rule."""
    _check_size(width, height, config)
    vw, vh = config.image_size
    ideal = -(-width * height // (vw * vh))  # ceil, exact
    n = min(ideal, config.max_slices)
    if n <= 1:
        return 1, 1
    counts = [k for k in (n - 1, n, n + 1) if 1 < k <= config.max_slices]
    image_orientation = 1 if width >= height else -1  # a square image counts as landscape
    best, best_key = (1, 1), None
    for k in counts:
        for m in range(1, k + 1):
            if k % m:
                continue
            rows = k // m
            if m > width or rows > height:  # a slice must be at least one pixel wide and tall
                continue
            # slice aspect relative to the ViT's: (W/m)/(H/n) / (vw/vh)
            rel = Fraction(width * rows * vh, height * m * vw)
            # +1: landscape slices, 0: square, -1: portrait (a slice is (width / m) x (height / rows))
            slice_orientation = (width * rows > height * m) - (width * rows < height * m)
            key = (
                -_aspect_error(rel),  # Eq. 1, exact
                -abs(k - ideal),  # tie 1: count closest to the ideal N
                k,  # tie 2: more slices
                slice_orientation * image_orientation,  # tie 3: slices oriented like the image, then square
                -_aspect_error(Fraction(width * rows, height * m)),  # tie 4: slices closer to square
            )
            if best_key is None or key > best_key:
                best, best_key = (m, rows), key
    return best


def partition(length: int, parts: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` into ``parts`` contiguous integer intervals that differ in length by at most one."""
    edges = [i * length // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def plan_slices(width: int, height: int, config: SliceConfig | None = None, **overrides) -> SlicePlan:
    """Plan how a ``width x height`` image is cut, resized and encoded.

    Args:
        width, height: the source image size in pixels.
        config: the slicing settings (default: the paper's).
        **overrides: fields of `SliceConfig` to change for this call, e.g. ``max_slices=9``.

    Example:
        >>> plan = plan_slices(672, 1008)
        >>> (plan.cols, plan.rows), plan.slices[0].size, plan.num_tokens()
        ((2, 3), (336, 336), 454)
    """
    config = config or SliceConfig()
    if overrides:
        config = SliceConfig(**{**asdict(config), **overrides})
    return _plan_from_grid(width, height, *choose_grid(width, height, config), config)


def plan_fixed_grid(width: int, height: int, cols: int, rows: int, config: SliceConfig | None = None) -> SlicePlan:
    """A plan with a fixed ``cols x rows`` grid whatever the image (the paper's "fixed 2x2 grid" ablation).

    Slices still keep their own aspect ratio when resized; an overview is added unless the grid is ``1 x 1``.
    """
    config = config or SliceConfig()
    _check_size(width, height, config)
    if cols < 1 or rows < 1 or cols > width or rows > height:
        raise ValueError(f"a {cols}x{rows} grid does not fit a {width}x{height} image")
    return _plan_from_grid(width, height, cols, rows, config)


def _plan_from_grid(width: int, height: int, cols: int, rows: int, config: SliceConfig) -> SlicePlan:
    p = config.patch_size
    whole = Slice((0, 0, width, height), fit_to_patches(width, height, config), p)
    if cols * rows == 1:
        return SlicePlan(width, height, 1, 1, (whole,), None, config)
    slices = []
    for top, bottom in partition(height, rows):
        for left, right in partition(width, cols):
            slices.append(Slice((left, top, right, bottom), fit_to_patches(right - left, bottom - top, config), p))
    return SlicePlan(width, height, cols, rows, tuple(slices), whole, config)
