"""What a run shows and keeps of each logged step: ``metrics.jsonl`` (one JSON record a line),
the history handed back, the callbacks and a tqdm progress bar with loss and throughput."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pyro_seqlatent.infer.run_files import read_jsonl

METRICS = "metrics.jsonl"


def read_metrics_upto(path: Path, upto_step: int) -> list[dict]:
    """The records of ``path`` up to ``upto_step`` (a resumed run drops the later ones)."""
    if not path.exists():
        return []
    return [row for row in read_jsonl(path) if row.get("step", 0) <= upto_step]


def rewrite_metrics(path: Path, rows: list[dict]) -> None:
    """Replace ``path`` by ``rows`` through a temporary file."""
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """The history, ``metrics.jsonl`` (when ``folder`` is given), callbacks and progress bar.

    :param folder: the run folder of this process (None: nothing is written).
    :param history: the records of earlier sessions (kept, and rewritten to the file).
    :param callbacks: ``cb(record, model, guide)`` after each logged step (main process only).
    :param progress: ``(total_steps, start_step)`` for a progress bar, or None for none.
    """

    def __init__(self, folder: Path | None, history: list[dict],
                 callbacks: Sequence[Callable] = (), progress: tuple[int, int] | None = None):
        self.history = list(history)
        self.callbacks = list(callbacks)
        self.file = None
        if folder is not None:
            rewrite_metrics(folder / METRICS, self.history)
            self.file = open(folder / METRICS, "a")  # noqa: SIM115 (closed by close())
        self.bar = None
        if progress is not None:
            from tqdm.auto import tqdm

            total, initial = progress
            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def log(self, record: dict, model, guide) -> None:
        self.history.append(record)
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for callback in self.callbacks:
            callback(record, model, guide)

    def tick(self, record: dict) -> None:
        """Advance the progress bar by one step."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}",
                                 ex_s=f"{record['examples_per_s']:.0f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
