"""Calibration text -> token windows ``[num_samples, seq_len]`` with the checkpoint's tokenizer.

The file is plain UTF-8 text, or JSON Lines whose objects carry a ``"text"`` field
(``.jsonl``). All text is tokenized as one stream, and ``num_samples`` windows of
``seq_len`` tokens start at random offsets drawn from ``seed``; a stream shorter than the
windows need is repeated (with a warning: calibration on repeated text is weaker).
Without a file, a small built-in English text is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILTIN_TEXT = """\
The history of science is a story of careful measurement. Astronomers charted the motion of
the planets for centuries before anyone could explain it, and the explanation, when it came,
rested on numbers that had been written down night after night. A good instrument, a patient
observer and an honest record of what was seen are worth more than any clever guess.
In the kitchen, bread is made from flour, water, salt and yeast. The dough rises because the
yeast eats sugar and breathes out gas, which the gluten traps in small bubbles. Bakers knead
the dough to build that network, let it rest, shape it, and bake it in a hot oven until the
crust turns brown and sounds hollow when tapped.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
Question: A train leaves the station at 9:00 and travels at 80 kilometres per hour. How far
has it gone by 11:30? Answer: two and a half hours at 80 km/h is 200 kilometres.
The robot reads its sensors, plans a path around the obstacles, and sends commands to its
motors forty times a second. When a message arrives from the operator, it replies with its
position, its battery level and the state of its current task, formatted as JSON.
Dear team, thank you for the quick review. I have updated the report with the new figures,
fixed the typo in the second table, and added a short summary at the top. Best regards.
"""


def read_calibration_text(path: Path | None) -> str:
    """The calibration text: the file's (``.jsonl``: its ``"text"`` fields) or the built-in."""
    if path is None:
        return BUILTIN_TEXT
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--calibration {path}: no such file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        text = raw
    else:
        parts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f'{path}:{number}: expected an object with a "text" string')
            parts.append(obj["text"])
        text = "\n\n".join(parts)
    if not text.strip():
        raise ValueError(f"--calibration {path}: the file holds no text")
    return text


def calibration_tokens(
    tokenizer_path: Path,
    text_file: Path | None,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
) -> torch.Tensor:
    """``[num_samples, seq_len]`` int64 token ids from the calibration text."""
    from transformers import AutoTokenizer

    text = read_calibration_text(text_file)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the calibration text tokenizes to nothing")
    stream = torch.tensor(ids, dtype=torch.int64)
    needed = num_samples * seq_len
    if stream.numel() < seq_len + num_samples:
        log.warning(
            "calibration text has %d tokens for %d windows of %d: repeating it; pass a longer "
            "--calibration file for better quality",
            stream.numel(),
            num_samples,
            seq_len,
        )
        stream = stream.repeat(-(-(needed + seq_len) // stream.numel()))
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len + 1, (num_samples,), generator=gen)
    windows = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
    log.info(
        "calibration: %d samples of %d tokens (%d tokens of text)", num_samples, seq_len, len(ids)
    )
    return windows
