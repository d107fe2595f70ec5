"""Calibration text sources (builtin set, .txt, .jsonl, HF dataset) and seeded sampling into token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CalibrationError, CompressorError
from ..recipe import CalibrationConfig

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "calibration_data"  # in a checkout: a link to calibration_data/


def builtin_dir() -> Path:
    """The shipped calibration_data/ folder (inside the package: a checkout links it to the top-level folder)."""
    if BUILTIN_DIR.is_dir() and any(BUILTIN_DIR.glob("*.txt")):
        return BUILTIN_DIR
    raise CalibrationError(
        "the builtin calibration set (calibration_data/) is missing from this installation",
        fix="reinstall compressor, or set calibration.source to a text file",
    )


def heldout_dir() -> Path:
    """The held-out evaluation split (calibration_data/heldout/): documents never drawn for calibration."""
    return builtin_dir() / "heldout"


HELDOUT_NAME = "builtin held-out split (calibration_data/heldout)"


def read_heldout() -> str:
    """The held-out evaluation split as one text (its documents in a stable order)."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(heldout_dir().glob("*.txt")))


def shared_fraction(text: str, corpus: list[str], probes: int = 64, width: int = 200) -> float:
    """The fraction of `probes` evenly spaced `width`-character snippets of `text` found verbatim in `corpus`: 0 for
    text the corpus does not hold, 1 for a text that is the corpus or a part of it (whitespace-normalized)."""
    flat = " ".join(text.split())
    if len(flat) < width:
        return 0.0
    haystack = "\n".join(" ".join(t.split()) for t in corpus)
    starts = sorted({round(i * (len(flat) - width) / max(probes - 1, 1)) for i in range(probes)})
    return sum(flat[s : s + width] in haystack for s in starts) / len(starts)


def read_texts(cfg: CalibrationConfig) -> list[str]:
    """The documents of the configured source, in a stable order."""
    src = cfg.source
    if src == "builtin":
        return [p.read_text(encoding="utf-8") for p in sorted(builtin_dir().glob("*.txt"))]
    if src.startswith("hf:"):
        return _read_hf(src[3:], cfg)
    path = Path(src).expanduser()
    if not path.is_file():
        raise CalibrationError(
            f"calibration file not found: {src}",
            where="calibration.source",
            fix="use 'builtin', an existing .txt/.jsonl file, or 'hf:<dataset>'",
        )
    text = read_text_file(path, "calibration file", "calibration.source")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(str(row[cfg.text_field]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CalibrationError(
                    f"line {n} is not a JSON object with a '{cfg.text_field}' field",
                    where=str(path),
                    fix="write one JSON object per line, or set calibration.text_field",
                ) from None
        return texts
    return [text]


def read_text_file(path: Path, what: str, where: str, error: type[CompressorError] = CalibrationError) -> str:
    """The UTF-8 text of `path`; an `error` naming `what` when it holds binary data (a NUL byte, or bytes that are
    not UTF-8): calibrating or evaluating on garbage must fail, not produce an artifact."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = f"byte {err.start} is not UTF-8"
    else:
        if "\x00" not in text:
            return text
        bad = f"it holds a NUL byte at {text.index(chr(0))}"
    raise error(f"{what} {path.name} is not text ({bad})", where=where, fix="use a UTF-8 text (.txt) or .jsonl file")


def _read_hf(name: str, cfg: CalibrationConfig) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CalibrationError("HF dataset sources need the 'datasets' package", fix="pip install datasets") from None
    ds_name, _, ds_config = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, ds_config or None, split=cfg.split)
    except (OSError, ValueError) as err:  # missing dataset or file, network (OSError), bad split or config
        raise CalibrationError(
            f"cannot load HF dataset '{name}' ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
            where="calibration.source",
            fix="check the name and split, or use a local .txt/.jsonl file when offline",
        ) from None
    if cfg.text_field not in ds.column_names:
        raise CalibrationError(
            f"dataset has no column '{cfg.text_field}' (columns: {ds.column_names})",
            fix="set calibration.text_field",
        )
    return [t for t in ds[cfg.text_field] if t]


def sample_windows(tokenizer, texts: list[str], cfg: CalibrationConfig, max_len: int | None) -> torch.Tensor:
    """Tokenize the documents as one stream and draw `num_samples` windows of `seq_len` tokens, seeded.

    Returns int64 input ids [num_samples, seq_len].
    """
    if max_len is not None and cfg.seq_len > max_len:
        raise CalibrationError(
            f"seq_len {cfg.seq_len} exceeds the model's maximum of {max_len} positions",
            where="calibration.seq_len",
            fix=f"set calibration.seq_len <= {max_len}",
        )
    joined = "\n\n".join(t for t in texts if t.strip())
    if not joined.strip():
        raise CalibrationError(
            "the calibration source holds no text",
            where=f"calibration.source={cfg.source}",
            fix="use a non-empty file",
        )
    ids = tokenizer(joined, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    stream = torch.tensor(ids, dtype=torch.int64)
    if stream.numel() < cfg.seq_len:
        raise CalibrationError(
            f"the calibration text has {stream.numel()} tokens, fewer than one sequence of {cfg.seq_len}",
            where=f"calibration.source={cfg.source}",
            fix="provide more text or lower calibration.seq_len",
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, stream.numel() - cfg.seq_len + 1, (cfg.num_samples,), generator=gen)
    return torch.stack([stream[s : s + cfg.seq_len] for s in starts.tolist()])
