"""What one image costs to encode: ViT patches, LLM visual tokens and FLOPs (pure Python, no torch).

`cost_table` compares LLaVA-UHD (slices + overview, 64-query resampler, spatial schema), LLaVA-1.5 (one padded
336x336 view, 2-layer MLP projector) and LLaVA-NeXT (anyres: base view + tiles, MLP projector, padding removed,
newline tokens) on the same image, with the same vision tower and LLM.

Counting convention
-------------------
A multiply-add counts as 2 FLOPs. Only matrix products are counted: layer norms, GELU, softmax, residual adds,
position-embedding adds/interpolation and the image preprocessing are ignored (well under 1% here). Biases are
ignored. Every count is an exact integer (``*_flops``); ``*_tflops`` is that divided by 1e12.

Vision encoder (ViT of width D, MLP width I, patch p), per crop of ``n_p`` patches and ``n = n_p + 1`` tokens
(``n = n_p`` for towers without a CLS token, e.g. SigLIP)::

    patch embedding   2 * n_p * (3*p*p) * D
    per layer         2 * n * 4*D*D          (q, k, v and output projections)
                    + 2 * n * 2*D*I          (the two MLP matrices)
                    + 2 * 2 * n*n * D        (attention scores Q K^T and the weighted sum A V)

Layers are counted up to the layer whose output is used. LLaVA (1.5, NeXT and UHD alike) takes
``hidden_states[-2]``, the penultimate layer (``feature_layer=-2``, LLaVA's ``mm_vision_select_layer``), so 23 of
CLIP-L's 24 layers are needed: the last layer's output is thrown away, and a deployment that truncates it (as
LLaVA-OneVision does for SigLIP) never runs it. This is the default; ``feature_layer=-1`` counts all layers (what
HF's ``output_hidden_states=True`` actually runs). The choice moves the totals by about 0.1 TFLOPs per 7 crops.

Projector, with LLM hidden size H:

* LLaVA-UHD's resampler (as released: ``kv_proj`` D -> H, ``nn.MultiheadAttention(H)``, ``proj`` H x H), per crop
  of ``n`` patch tokens (CLS dropped) and ``q`` queries (64)::

      kv_proj        2 * n * D * H
      k, v in-proj   2 * 2 * n * H * H
      q in-proj      2 * q * H * H          (the learned queries are re-projected for every crop)
      attention      2 * 2 * q * n * H      (scores and weighted sum)
      out_proj       2 * q * H * H
      proj           2 * q * H * H

* the 2-layer MLP of LLaVA-1.5/NeXT (``mlp2x_gelu``: D -> H -> H) on every patch token: ``2 * n * (D*H + H*H)``.
  LLaVA-NeXT projects all ``576 * crops`` tokens before removing the padding rows/columns.

LLM prefill over ``T`` tokens (visual tokens, plus ``text_tokens``; N parameters, L layers, hidden H)::

    2 * N * T                 (every parameter used once per token; N = the nominal size, e.g. 13e9)
  + 2 * L * T*T * H           (attention, llm_attention="causal", the default)

The attention term is Kaplan et al. (2020)'s ``2 * n_layer * n_ctx * d`` forward FLOPs per token with
``n_ctx = T``; equivalently it is the exact count of Q K^T and A V (``2 * 2 * L * T*T * H``) halved by the causal mask
(each token attends only to the tokens before it). ``llm_attention="full"`` counts the unmasked ``2*2*L*T*T*H``
and ``"none"`` drops the term. ``text_tokens`` defaults to 0: the paper's numbers count the image alone (any
fixed prompt adds the same ``2*N*T_text`` to every model, about 1.7 TFLOPs per 64 tokens for 13B, plus a small
cross term in attention), so leaving it out keeps the comparison about the images; pass e.g. 64 to see a whole
request.

How close this gets to the paper (CLIP-ViT-L/14-336, Vicuna-13B; TFLOPs, paper value in brackets)
--------------------------------------------------------------------------------------------------
Default convention (``llm_params=13e9``, causal attention term, 23 ViT layers, no text)::

    LLaVA-1.5 at 336x336 (576 tokens)                   15.51  [15.5]    +0.1%
    LLaVA-UHD at 672x1008 (7 crops, 4007 patches, 454)  14.97  [14.6]    +2.5%
    LLaVA-UHD with the MLP projector (4013 tokens)      113.73 [113.65]  +0.1%   (mlp_ablation=True)
    (MLP projector, fixed 2x2 grid + overview, 2884)    80.40  [80.10]   +0.4%   (not a table entry)
    LLaVA-NeXT at 672x1008 (5 crops, 2160 tokens)       60.08  [not in the paper]

Other conventions tried (LLaVA-1.5 / LLaVA-UHD / UHD+MLP deviation from the paper):

* ``2*N*T`` only (no attention term): -0.8% / +2.0% / -5.7%; the MLP ablation (4013 tokens, where attention is
  ~6% of the total) needs the attention term.
* full (unmasked) attention ``4*L*T*T*H``: +1.0% / +3.1% / +5.9%.
* ``N*T`` (a multiply-add as one FLOP for the LLM only): about half of every total; rules itself out.
* including any text prompt: every model goes up by ~1.7 TFLOPs per 64 tokens; LLaVA-1.5 at 336x336 already
  sits at 15.5 with none, so the paper counted none.
* N = the exact Vicuna-13B count (13.016e9): +0.2% / +2.6% / +0.2%; non-embedding parameters only (12.69e9):
  -2.2% / +0.6% / -2.1%.
* all 24 CLIP layers: +0.2% / +3.3% / +0.2%.

So one convention reproduces LLaVA-1.5, the MLP ablation and the 2x2 ablation within 0.5%, while LLaVA-UHD comes out
2.5% above the paper's 14.6. Everything the UHD number shares with the others (ViT, LLM) is pinned by them, so the
gap is in the resampler (0.54 TFLOPs here, mostly the k/v in-projections of 4007 tokens at 5120x5120, 0.42 TFLOPs):
the paper's count evidently gave the resampler about 0.17 TFLOPs (e.g. a FLOP counter that skips
``nn.MultiheadAttention``'s internal projections gives less). We keep the full, principled resampler count and accept
the 2.5%.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

from .peers import LLAVA_NEXT_GRID_PINPOINTS, llava15_cost, llava_next_cost
from .slicing import SliceConfig, plan_slices

__all__ = [
    "VisionSpec",
    "LLMSpec",
    "VISION_PRESETS",
    "LLM_PRESETS",
    "vision_spec",
    "llm_spec",
    "vit_layers_used",
    "vit_crop_flops",
    "resampler_flops",
    "mlp_projector_flops",
    "llm_prefill_flops",
    "cost_table",
    "format_cost_table",
    "add_cost_arguments",
    "run_cost",
    "MODELS",
    "PAPER_TFLOPS",
]

MODELS = ("llava-uhd", "llava-1.5", "llava-next")
ATTENTION_MODES = ("causal", "full", "none")

#: The paper's numbers (arXiv Table 1 and Table 2, CLIP-ViT-L/14-336 + Vicuna-13B), in TFLOPs.
PAPER_TFLOPS = {"llava-uhd": 14.6, "llava-1.5": 15.5, "llava-uhd-mlp": 113.65}


@dataclass(frozen=True)
class VisionSpec:
    """A ViT vision tower.

    Attributes:
        name: preset name.
        image_size: native input side in pixels (square).
        patch_size: patch side in pixels.
        hidden: width D.
        intermediate: MLP width I.
        layers: transformer layers.
        has_cls: whether a CLS token is prepended (CLIP, DINOv2: yes; SigLIP: no).
    """

    name: str
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    layers: int
    has_cls: bool = True

    @property
    def grid_side(self) -> int:
        """Patches per side at the native size (27 for SigLIP at 384: the patch conv drops the last 6 pixels)."""
        return self.image_size // self.patch_size

    @property
    def native_patches(self) -> int:
        return self.grid_side**2

    @property
    def slice_size(self) -> int:
        """The native size rounded down to whole patches: what the slicer targets (378 for SigLIP-384)."""
        return self.grid_side * self.patch_size


VISION_PRESETS: dict[str, VisionSpec] = {
    s.name: s
    for s in (
        VisionSpec("clip-l-336", 336, 14, 1024, 4096, 24, True),  # openai/clip-vit-large-patch14-336
        VisionSpec("clip-l-224", 224, 14, 1024, 4096, 24, True),  # openai/clip-vit-large-patch14
        VisionSpec("clip-b-16", 224, 16, 768, 3072, 12, True),  # openai/clip-vit-base-patch16
        VisionSpec("siglip-so400m", 384, 14, 1152, 4304, 27, False),  # google/siglip-so400m-patch14-384
        VisionSpec("dinov2-s14", 224, 14, 384, 1536, 12, True),  # facebook/dinov2-small at 224
        VisionSpec("dinov2-s14-518", 518, 14, 384, 1536, 12, True),  # facebook/dinov2-small at its 518 config size
    )
}


@dataclass(frozen=True)
class LLMSpec:
    """A decoder-only LLM: parameter count N, hidden size H, layers L."""

    params: int
    hidden: int
    layers: int

    @property
    def label(self) -> str:
        return f"{self.params / 1e9:g}B (hidden {self.hidden}, {self.layers} layers)"


#: Default shapes by nominal size: (params, hidden, layers). `llm_spec` picks the entry nearest in log(params).
LLM_PRESETS: tuple[tuple[float, int, int], ...] = (
    (0.5e9, 896, 24),  # Qwen2-0.5B
    (1.5e9, 1536, 28),  # Qwen2-1.5B
    (3e9, 2560, 32),  # Phi-2 / 3B class
    (7e9, 4096, 32),  # LLaMA-2 / Vicuna-7B (LLaMA-3-8B has the same shape)
    (13e9, 5120, 40),  # LLaMA-2 / Vicuna-13B
    (34e9, 7168, 60),  # Yi-34B
    (70e9, 8192, 80),  # LLaMA-2/3-70B
)


def vision_spec(vision: str | VisionSpec) -> VisionSpec:
    """A `VisionSpec` by preset name (or the spec itself)."""
    if isinstance(vision, VisionSpec):
        return vision
    if vision not in VISION_PRESETS:
        raise ValueError(f"unknown vision tower {vision!r}; choose one of {sorted(VISION_PRESETS)}")
    return VISION_PRESETS[vision]


def llm_spec(params: float, hidden: int | None = None, layers: int | None = None) -> LLMSpec:
    """The LLM of ``params`` parameters.

    Missing shapes come from `LLM_PRESETS`, the entry nearest in log(params) (13e9 -> 5120/40, 7e9 -> 4096/32). When
    ``hidden`` is given but not ``layers``: the layers of the nearest preset with that hidden size, or else the
    LLaMA-shaped estimate ``round(params / (12 * hidden**2))`` (12 H^2 parameters per layer).
    """
    if isinstance(params, bool) or not isinstance(params, (int, float)) or not math.isfinite(params) or params <= 0:
        raise ValueError(f"llm params must be a positive number, got {params!r}")
    for name, v in (("hidden", hidden), ("layers", layers)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"llm {name} must be a positive integer, got {v!r}")
    nearest = min(LLM_PRESETS, key=lambda e: abs(math.log(params / e[0])))
    if hidden is None:
        hidden = nearest[1]
        layers = layers or nearest[2]
    elif layers is None:
        same = [e for e in LLM_PRESETS if e[1] == hidden]
        if same:
            layers = min(same, key=lambda e: abs(math.log(params / e[0])))[2]
        else:
            layers = max(1, round(params / (12 * hidden * hidden)))
    return LLMSpec(int(round(params)), hidden, layers)


def vit_layers_used(spec: VisionSpec, feature_layer: int = -2) -> int:
    """Layers that must run to produce ``hidden_states[feature_layer]`` (hidden_states has ``layers + 1`` entries,
    the embeddings first): -2 (LLaVA's default) -> ``layers - 1``; -1 -> all; k >= 1 -> k."""
    if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
        raise ValueError(f"feature_layer must be an integer, got {feature_layer!r}")
    used = feature_layer if feature_layer >= 0 else spec.layers + 1 + feature_layer
    if not 1 <= used <= spec.layers:
        raise ValueError(f"feature_layer {feature_layer} selects no transformer layer of the {spec.layers}-layer "
                         f"{spec.name}; use -{spec.layers}..-1 or 1..{spec.layers}")
    return used


def vit_crop_flops(num_patches: int, spec: VisionSpec, layers: int | None = None) -> int:
    """ViT FLOPs of one crop of ``num_patches`` patches, through ``layers`` layers (default: all)."""
    layers = spec.layers if layers is None else layers
    d, i, p = spec.hidden, spec.intermediate, spec.patch_size
    n = num_patches + (1 if spec.has_cls else 0)
    embed = 2 * num_patches * (3 * p * p) * d
    per_layer = 2 * n * 4 * d * d + 2 * n * 2 * d * i + 2 * 2 * n * n * d
    return embed + layers * per_layer


def resampler_flops(num_patches: int, vision_hidden: int, llm_hidden: int, queries: int = 64) -> int:
    """Resampler FLOPs for one crop: ``num_patches`` keys/values compressed to ``queries`` tokens of width H."""
    n, d, h, q = num_patches, vision_hidden, llm_hidden, queries
    kv_proj = 2 * n * d * h if d != h else 0
    kv_in = 2 * 2 * n * h * h
    q_in = 2 * q * h * h
    attention = 2 * 2 * q * n * h
    out_proj = 2 * q * h * h
    proj = 2 * q * h * h
    return kv_proj + kv_in + q_in + attention + out_proj + proj


def mlp_projector_flops(num_tokens: int, vision_hidden: int, llm_hidden: int) -> int:
    """FLOPs of LLaVA-1.5's 2-layer MLP projector (D -> H -> H) on ``num_tokens`` tokens."""
    return 2 * num_tokens * (vision_hidden * llm_hidden + llm_hidden * llm_hidden)


def llm_prefill_flops(tokens: int, llm: LLMSpec, attention: str = "causal") -> int:
    """LLM prefill FLOPs over ``tokens`` tokens: ``2*N*T`` plus the attention term (see the module docstring)."""
    if attention not in ATTENTION_MODES:
        raise ValueError(f"llm attention must be one of {ATTENTION_MODES}, got {attention!r}")
    dense = 2 * llm.params * tokens
    attn = {"causal": 2, "full": 4, "none": 0}[attention] * llm.layers * tokens * tokens * llm.hidden
    return dense + attn


def _entry(name, crop_patches, visual_tokens, vit, projector, projector_name, text_tokens, llm, attention, detail,
           spec, layers):
    llm_tokens = visual_tokens + text_tokens
    llm_f = llm_prefill_flops(llm_tokens, llm, attention)
    total = vit + projector + llm_f
    return {
        "crops": len(crop_patches),
        "crop_patches": list(crop_patches),
        "vit_patches": sum(crop_patches),
        "visual_tokens": visual_tokens,
        "llm_tokens": llm_tokens,
        "vit_tflops": vit / 1e12,
        "projector_tflops": projector / 1e12,
        "llm_tflops": llm_f / 1e12,
        "total_tflops": total / 1e12,
        "vit_flops": vit,
        "projector_flops": projector,
        "llm_flops": llm_f,
        "total_flops": total,
        "projector": projector_name,
        "vision": spec.name,
        "vit_layers": layers,
        "llm": llm.label,
        "llm_params": llm.params,
        "llm_attention": attention,
        "text_tokens": text_tokens,
        "detail": detail,
    }


def cost_table(
    width: int,
    height: int,
    vision: str | VisionSpec = "clip-l-336",
    llm_params: float = 13e9,
    *,
    llm_hidden: int | None = None,
    llm_layers: int | None = None,
    feature_layer: int = -2,
    queries: int = 64,
    max_slices: int = 6,
    spatial_schema: bool = True,
    text_tokens: int = 0,
    llm_attention: str = "causal",
    mlp_ablation: bool = False,
) -> dict:
    """Cost of one ``width x height`` image in LLaVA-UHD, LLaVA-1.5 and LLaVA-NeXT, side by side.

    Args:
        width, height: the image size in pixels.
        vision: a `VISION_PRESETS` name or a `VisionSpec`; it sets the native size and patch of all three models.
        llm_params: the LLM's parameter count (13e9: Vicuna-13B as in the paper).
        llm_hidden, llm_layers: LLM shape; by default from `LLM_PRESETS` (see `llm_spec`).
        feature_layer: the ViT hidden state used (-2, the penultimate, as in LLaVA); sets the layers counted.
        queries: resampler queries per crop (64 in the paper).
        max_slices: LLaVA-UHD's slice cap (6 in the paper, 7 in the release).
        spatial_schema: count LLaVA-UHD's "," / "\\n" separator tokens.
        text_tokens: text prompt tokens added to every model's LLM input (0: the image alone, as in the paper).
        llm_attention: "causal" (default), "full" or "none": the LLM attention term.
        mlp_ablation: also report "llava-uhd-mlp", LLaVA-UHD's slicing with the MLP projector (paper Table 2).

    Returns:
        ``{"llava-uhd": {...}, "llava-1.5": {...}, "llava-next": {...}}`` (and "llava-uhd-mlp"), each with
        ``crops``, ``crop_patches``, ``vit_patches``, ``visual_tokens``, ``llm_tokens``, ``vit_tflops``,
        ``projector_tflops``, ``llm_tflops``, ``total_tflops``, the exact integer ``*_flops``, and the settings
        (``projector``, ``vision``, ``vit_layers``, ``llm``, ``llm_params``, ``llm_attention``, ``text_tokens``,
        ``detail``). Everything is JSON-serializable.
    """
    spec = vision_spec(vision)
    llm = llm_spec(llm_params, llm_hidden, llm_layers)
    layers = vit_layers_used(spec, feature_layer)
    for name, v, lo in (("queries", queries, 1), ("text_tokens", text_tokens, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if llm_attention not in ATTENTION_MODES:
        raise ValueError(f"llm_attention must be one of {ATTENTION_MODES}, got {llm_attention!r}")
    d, h = spec.hidden, llm.hidden
    common = dict(text_tokens=text_tokens, llm=llm, attention=llm_attention, spec=spec, layers=layers)

    def vit(patches):
        return sum(vit_crop_flops(n, spec, layers) for n in patches)

    # LLaVA-UHD
    side = spec.slice_size
    plan = plan_slices(width, height, SliceConfig(image_size=(side, side), patch_size=spec.patch_size,
                                                  max_slices=max_slices, max_pixels=None))
    uhd_patches = [c.num_patches for c in plan.crops]
    uhd_tokens = plan.num_tokens(queries, spatial_schema)
    uhd_vit = vit(uhd_patches)
    layout = (f"{plan.cols}x{plan.rows} slices + overview" if plan.is_sliced else "one view (not sliced)")
    table = {
        "llava-uhd": _entry(
            "llava-uhd", uhd_patches, uhd_tokens, uhd_vit,
            sum(resampler_flops(n, d, h, queries) for n in uhd_patches), f"resampler ({queries} queries)",
            detail=f"{layout}, {queries}-query resampler" + (", spatial schema" if spatial_schema else ""),
            **common),
    }

    # LLaVA-1.5
    c15 = llava15_cost(width, height, spec.image_size, spec.patch_size)
    table["llava-1.5"] = _entry(
        "llava-1.5", [spec.native_patches], c15.visual_tokens, vit([spec.native_patches]),
        mlp_projector_flops(c15.vit_patches, d, h), "mlp2x", detail=c15.detail, **common)

    # LLaVA-NeXT: its pinpoints are multiples of the native size (336 for CLIP-L).
    s = spec.image_size
    pinpoints = tuple((ph // 336 * s, pw // 336 * s) for ph, pw in LLAVA_NEXT_GRID_PINPOINTS)
    cn = llava_next_cost(width, height, s, spec.patch_size, pinpoints)
    next_patches = [spec.native_patches] * cn.crops
    table["llava-next"] = _entry(
        "llava-next", next_patches, cn.visual_tokens, vit(next_patches),
        mlp_projector_flops(sum(next_patches), d, h), "mlp2x", detail=cn.detail, **common)

    if mlp_ablation:
        seps = plan.num_separators(spatial_schema)
        table["llava-uhd-mlp"] = _entry(
            "llava-uhd-mlp", uhd_patches, sum(uhd_patches) + seps, uhd_vit,
            mlp_projector_flops(sum(uhd_patches), d, h), "mlp2x",
            detail=f"{layout}, MLP projector (paper Table 2 ablation)", **common)
    return table


_ROWS = (
    ("ViT crops", "crops", "{:d}"),
    ("ViT patches", "vit_patches", "{:d}"),
    ("visual tokens", "visual_tokens", "{:d}"),
    ("LLM tokens", "llm_tokens", "{:d}"),
    ("projector", "projector", "{}"),
    ("ViT TFLOPs", "vit_tflops", "{:.3f}"),
    ("projector TFLOPs", "projector_tflops", "{:.3f}"),
    ("LLM TFLOPs", "llm_tflops", "{:.3f}"),
    ("total TFLOPs", "total_tflops", "{:.2f}"),
)


def format_cost_table(table: dict, title: str | None = None) -> str:
    """A readable side-by-side table of `cost_table`'s result (one column per model)."""
    names = list(table)
    if not names:
        return title or ""
    first = table[names[0]]
    cells = [[fmt.format(table[n][key]) for n in names] for _, key, fmt in _ROWS]
    ref = table.get("llava-1.5")
    labels = [label for label, _, _ in _ROWS]
    if ref is not None:
        labels.append("vs LLaVA-1.5")
        cells.append([f"{table[n]['total_flops'] / ref['total_flops']:.2f}x" for n in names])
    lw = max(len(s) for s in labels) + 2
    cw = [max(len(n), *(len(row[j]) for row in cells)) + 2 for j, n in enumerate(names)]
    lines = []
    lines.append(title if title is not None else
                 f"vision {first['vision']} ({first['vit_layers']} layers counted), LLM {first['llm']}, "
                 f"attention {first['llm_attention']}, {first['text_tokens']} text tokens; 1 multiply-add = 2 FLOPs")
    lines.append(" " * lw + "".join(f"{n:>{w}}" for n, w in zip(names, cw)))
    for label, row in zip(labels, cells):
        lines.append(f"{label:<{lw}}" + "".join(f"{c:>{w}}" for c, w in zip(row, cw)))
    for n in names:
        lines.append(f"  {n}: {table[n]['detail']}")
    return "\n".join(lines)


def add_cost_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``llava-uhd cost`` options to ``parser`` (for the CLI)."""
    parser.add_argument("--width", type=int, required=True, help="image width in pixels")
    parser.add_argument("--height", type=int, required=True, help="image height in pixels")
    parser.add_argument("--vision", choices=sorted(VISION_PRESETS), default="clip-l-336",
                        help="vision tower (default clip-l-336)")
    parser.add_argument("--llm-params", type=float, default=13e9, help="LLM parameters (default 13e9)")
    parser.add_argument("--llm-hidden", type=int, default=None, help="LLM hidden size (default: from the size)")
    parser.add_argument("--llm-layers", type=int, default=None, help="LLM layers (default: from the size)")
    parser.add_argument("--feature-layer", type=int, default=-2,
                        help="ViT hidden state used; sets the layers counted (default -2, the penultimate)")
    parser.add_argument("--queries", type=int, default=64, help="resampler queries per crop (default 64)")
    parser.add_argument("--max-slices", type=int, default=6, help="LLaVA-UHD slice cap (default 6, the paper's)")
    parser.add_argument("--text-tokens", type=int, default=0, help="text prompt tokens added to every model (0)")
    parser.add_argument("--llm-attention", choices=ATTENTION_MODES, default="causal",
                        help="LLM attention term (default causal: 2*L*T^2*H)")
    parser.add_argument("--mlp-ablation", action="store_true", help="also show LLaVA-UHD with an MLP projector")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    return parser


def run_cost(args) -> str:
    """Build the table from parsed `add_cost_arguments` options and render it (JSON or text)."""
    table = cost_table(
        args.width, args.height, args.vision, args.llm_params, llm_hidden=args.llm_hidden,
        llm_layers=args.llm_layers, feature_layer=args.feature_layer, queries=args.queries,
        max_slices=args.max_slices, text_tokens=args.text_tokens, llm_attention=args.llm_attention,
        mlp_ablation=args.mlp_ablation)
    if args.json:
        return json.dumps(table)
    return f"image {args.width}x{args.height}\n" + format_cost_table(table)
