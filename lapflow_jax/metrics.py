"""Metric writing (TensorBoard through tensorboardX, log lines) and throughput / ETA.

clu's metric writers and periodic actions import TensorFlow, which we keep out of training;
tensorboardX writes the same event files without it (as MaxText and MaxDiffusion do). Only the
primary process (index 0) writes.
"""

from __future__ import annotations

import io
import json
import time
from typing import Mapping

import numpy as np
from absl import logging
from etils import epath


class MetricWriter:
    """Scalars and images to TensorBoard event files under `logdir`, from process 0 only.

    Scalars also go, one JSON object per logged step, to `jsonl_path` (if given): easy to read
    back without TensorBoard, and exact (floats are written with full precision).

    Object stores (gs://) cannot append: there the JSONL file is rewritten whole (the lines it
    held when the writer opened, then the new ones) at most every `remote_flush_secs` and at
    flush() / close(), and TensorBoard event files go through `_RemoteRecordFile`.
    """

    def __init__(self, logdir: str | epath.Path, *, enabled: bool = True, jsonl_path: str | epath.Path | None = None,
                 remote_flush_secs: float = 60.0):
        self.enabled = enabled
        self._writer = None
        self._jsonl = epath.Path(jsonl_path) if (jsonl_path and enabled) else None
        self._remote_lines = None  # list of lines when the JSONL file is on an object store
        self._remote_flush_secs = remote_flush_secs
        self._last_remote_write = time.monotonic()
        if self._jsonl is not None and "://" in str(self._jsonl):
            self._remote_lines = self._jsonl.read_text().splitlines(keepends=True) if self._jsonl.exists() else []
        if enabled:
            from tensorboardX import SummaryWriter, record_writer  # heavy import, only where used
            record_writer.register_writer_factory("gs", _RemoteRecordFactory())
            epath.Path(logdir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(logdir))

    def _write_remote_jsonl(self) -> None:
        if self._remote_lines is not None:
            self._jsonl.write_text("".join(self._remote_lines))
            self._last_remote_write = time.monotonic()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._jsonl:
            line = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"
            if self._remote_lines is None:
                with self._jsonl.open("a") as f:
                    f.write(line)
            else:
                self._remote_lines.append(line)
                if time.monotonic() - self._last_remote_write >= self._remote_flush_secs:
                    self._write_remote_jsonl()
        if self._writer:
            for name, value in values.items():
                self._writer.add_scalar(name, float(value), step)

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image: uint8 [H, W, C]."""
        if self._writer:
            self._writer.add_image(name, image, step, dataformats="HWC")

    def text(self, step: int, name: str, text: str) -> None:
        if self._writer:
            self._writer.add_text(name, text, step)

    def flush(self) -> None:
        self._write_remote_jsonl()
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        self._write_remote_jsonl()
        if self._writer:
            self._writer.close()


class _RemoteRecordFile:
    """A TensorBoard event file on gs:// through etils.epath (the layer the rest of the workdir uses).

    Objects cannot be appended to: every flush rewrites the object with all records so far, as
    tensorboardX's own GCS writer does. That writer also uploads again from __del__ after
    close(), which hangs in retries once the storage endpoint is gone; this one stops at close().
    """

    def __init__(self, path: str):
        self._path = epath.Path(path)
        self._buffer = io.BytesIO()
        self._closed = False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if not self._closed:
            self._path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()
        self._closed = True


class _RemoteRecordFactory:
    """tensorboardX's writer-factory interface (record_writer.register_writer_factory)."""

    def open(self, path: str) -> _RemoteRecordFile:
        return _RemoteRecordFile(path)

    def directory_check(self, path: str) -> None:
        del path  # object stores have no directories to create


class Throughput:
    """Steps/s, images/s, TFLOP/s per device and ETA between two reports."""

    def __init__(self, *, total_steps: int, global_batch: int, flops_per_step_per_device: float | None):
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.flops = flops_per_step_per_device
        self._last_time = None
        self._last_step = None

    def start(self, step: int) -> None:
        self._last_time, self._last_step = time.perf_counter(), step

    def report(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_s = (step - self._last_step) / elapsed
        out = {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.global_batch,
               "eta_s": (self.total_steps - step) / max(steps_per_s, 1e-9)}
        if self.flops:
            out["tflops_per_s_per_device"] = steps_per_s * self.flops / 1e12
        self._last_time, self._last_step = now, step
        return out


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def log_line(step: int, total: int, values: Mapping[str, float]) -> None:
    parts = [f"step {step}/{total}"]
    for key in ("loss", "grad_norm", "learning_rate", "steps_per_s", "images_per_s", "tflops_per_s_per_device"):
        if key in values:
            parts.append(f"{key} {values[key]:.4g}")
    if "eta_s" in values:
        parts.append(f"ETA {format_eta(values['eta_s'])}")
    scales = [f"{values[k]:.3g}" for k in sorted(values) if k.startswith("loss_scale")]
    if len(scales) > 1:
        parts.append("per-scale loss " + "/".join(scales))
    logging.info(" | ".join(parts))
