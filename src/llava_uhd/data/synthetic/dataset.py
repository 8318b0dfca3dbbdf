"""Writing a synthetic dataset to disk as LLaVA instruction data, and reading its annotations back.

    path = generate_dataset("out/", 1000, seed=0)  # out/images/*.png + out/synthetic.json
    records = load_records(path)

Sample ``i`` is ``generate_sample(sample_seed(seed, i))``: the same arguments give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from .samples import check_kinds, check_sizes, generate_sample
from .vocabulary import SHORT_ANSWER_PROMPT

__all__ = ["generate_dataset", "load_records", "sample_seed"]


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a dataset generated with ``seed`` (63 bits of SHA-256 of both)."""
    digest = hashlib.sha256(f"llava-uhd-synthetic:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


_IMAGE_FORMATS = {"png": ("PNG", "png"), "jpg": ("JPEG", "jpg"), "jpeg": ("JPEG", "jpg")}


def _save_image(image: Image.Image, path: Path, fmt: str, compress_level: int) -> None:
    if fmt == "PNG":
        image.save(path, format="PNG", compress_level=compress_level)
    else:  # lossy: the colours of small shapes are no longer exact
        image.save(path, format="JPEG", quality=95, subsampling=0)


def generate_dataset(out_dir: str | Path, n: int, seed: int = 0, kinds: Sequence[str] | str | None = None,
                     format: str = "json", image_format: str = "png", min_side: int = 64, max_side: int = 2000,
                     max_aspect: float = 6.0, progress: bool = True, answer_prompt: str | None = SHORT_ANSWER_PROMPT,
                     compress_level: int = 6, workers: int = 1) -> Path:
    """Write ``n`` samples: images to ``out_dir/images/NNNNNN.png`` and the annotations to ``out_dir/synthetic.json``
    (a JSON list, ``format="json"``) or ``out_dir/synthetic.jsonl`` (one record a line); returns that file's path.

    Each record is LLaVA instruction data plus fields for evaluation::

        {"id": "synth-0-000000", "image": "images/000000.png",
         "conversations": [{"from": "human", "value": "<image>\\nQUESTION\\nAnswer the question using a single ..."},
                           {"from": "gpt", "value": "ANSWER"}],
         "kind": "count", "answer": "ANSWER", "question": "QUESTION", "metadata": {...}}

    ``image`` is relative to ``out_dir`` (use ``out_dir`` as LLaVA's image folder). Sample ``i`` is
    ``generate_sample(sample_seed(seed, i), ...)``, so the same arguments give byte-identical annotations and images
    whatever ``workers`` is (threads; PNG encoding releases the GIL). PNGs are written with zlib level
    ``compress_level`` (6, PIL's default; 1 is faster, the pixels are the same at every level);
    ``image_format="jpg"`` is lossy.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if format not in ("json", "jsonl"):
        raise ValueError(f"format must be 'json' or 'jsonl', got {format!r}")
    if image_format.lower() not in _IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(_IMAGE_FORMATS)}, got {image_format!r}")
    kinds = check_kinds(kinds)
    check_sizes(min_side, max_side, max_aspect)
    pil_format, ext = _IMAGE_FORMATS[image_format.lower()]
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    digits = max(6, len(str(max(0, n - 1))))

    def one(i: int) -> dict[str, Any]:
        sample = generate_sample(sample_seed(seed, i), kinds, min_side, max_side, max_aspect)
        rel = f"images/{i:0{digits}d}.{ext}"
        _save_image(sample.image, out_dir / rel, pil_format, compress_level)
        return {"id": f"synth-{seed}-{i:0{digits}d}", "image": rel,
                "conversations": sample.conversations(answer_prompt), "kind": sample.kind,
                "question": sample.question, "answer": sample.answer, "metadata": sample.metadata}

    bar = _progress(n, progress)
    records: list[dict[str, Any]] = []
    try:
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                for record in pool.map(one, range(n)):
                    records.append(record)
                    bar.update(1)
        else:
            for i in range(n):
                records.append(one(i))
                bar.update(1)
    finally:
        bar.close()
    path = out_dir / f"synthetic.{format}"
    if format == "json":
        # one JSON list, one record a line: what LLaVA reads, compact, and easy to diff
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n" if records else "[]\n"
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


class _NoBar:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with transformers; be quiet without it
        return _NoBar()
    return tqdm(total=total, desc="synthetic samples", unit="img")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read back the annotations written by `generate_dataset` (JSON list or JSON lines)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)
