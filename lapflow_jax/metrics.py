"""Metric writing (TensorBoard through tensorboardX, log lines) and throughput / ETA.

clu's metric writers and periodic actions import TensorFlow, which we keep out of training;
tensorboardX writes the same event files without it (as MaxText and MaxDiffusion do). Only the
primary process (index 0) writes.
"""

from __future__ import annotations

import io
import json
import time
from typing import Iterable, Iterator, Mapping, TypeVar

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


class IntervalMean:
    """Means of per-step scalars over a logging interval, so a logged loss is not one step's draw.

    The values are host floats the loop fetches anyway (one device_get per step), summed in
    float64. Only keys starting with one of `prefixes` (the losses and the gradient norm, which
    vary step to step) are averaged; the loop logs the others (learning rate, counters) as of
    the last step.
    """

    def __init__(self, prefixes: tuple[str, ...] = ("loss", "grad_norm")):
        self.prefixes = prefixes
        self._sums: dict[str, float] = {}
        self._count = 0

    def wants(self, key: str) -> bool:
        return key.startswith(self.prefixes)

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            if self.wants(key):
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1

    def pop(self) -> dict[str, float]:
        """The means since the last pop (empty when nothing was added), and a fresh interval."""
        out = {key: total / self._count for key, total in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return out


class Progress:
    """Progress lines, with rate and ETA, of a loop over `total` batches (sampling, evaluation).

    The ETA is training's (Throughput: the rate since the previous line). The first batch's time
    includes compilation, so its line gives that time and no ETA; the rate counts from its end.
    After that a line comes at most every `every_s` seconds, and always for the last batch.
    """

    def __init__(self, label: str, total: int, *, items_per_batch: int, unit: str = "batch",
                 every_s: float = 10.0):
        self.label, self.total, self.unit, self.every_s = label, int(total), unit, every_s
        self._items = int(items_per_batch)
        self._throughput = None
        self._start = self._last_line = time.perf_counter()

    def update(self, done: int, **extra) -> dict[str, float]:
        """Notes that `done` (1..total) batches are finished; logs a line when one is due.

        Returns:
            The line's values, {} when no line was due: {"seconds_first_batch"} after the first
            batch, else {"seconds_per_batch", "images_per_s", "eta_s"}; plus `extra`, which the
            line shows as "| key value".
        """
        now = time.perf_counter()
        if self._throughput is None:
            values = {"seconds_first_batch": now - self._start}
            self._throughput = Throughput(total_steps=self.total, global_batch=self._items,
                                          flops_per_step_per_device=None)
            self._throughput.start(done)
        elif done >= self.total or now - self._last_line >= self.every_s:
            rates = self._throughput.report(done)
            values = {"seconds_per_batch": 1.0 / max(rates["steps_per_s"], 1e-9),
                      "images_per_s": rates["images_per_s"], "eta_s": rates["eta_s"]}
        else:
            return {}
        self._last_line = now
        values.update(extra)
        parts = [f"{self.label}: {self.unit} {done}/{self.total}"]
        if "seconds_first_batch" in values:
            parts.append(f"{values['seconds_first_batch']:.2f} s (with compilation)")
        else:
            parts += [f"{values['seconds_per_batch']:.3g} s/{self.unit}", f"{values['images_per_s']:.3g} images/s",
                      f"ETA {format_eta(values['eta_s'])}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()]
        logging.info(" | ".join(parts))
        return values


T = TypeVar("T")


def with_progress(batches: Iterable[T], label: str, *, total: int, items_per_batch: int,
                  lines: int = 20) -> Iterator[T]:
    """Yields `batches`, logging training-style progress lines with an ETA (metrics.Progress).

    A line follows the first batch, every ~total/lines batches and the last one, so a
    50,000-image pass on a fast chip does not print a thousand lines. Each line is logged after
    the consumer has finished that batch, so its rate covers the consumer's work too.
    """
    progress = Progress(label, total, items_per_batch=items_per_batch)
    every = max(1, -(-int(total) // lines))
    for done, batch in enumerate(batches, 1):
        yield batch
        if done in (1, total) or done % every == 0:
            progress.update(done)


def log_line(step: int, total: int, values: Mapping[str, float]) -> None:
    """One training progress line, e.g. "step 50/2500 | loss 0.412 (scales 0.21/0.94) | grad norm
    0.81 | lr 0.0003 | 4.51 steps/s | 289 images/s | ETA 0:09:03" (losses: interval means)."""
    parts = [f"step {step}/{total}"]
    if "loss" in values:
        scales = [f"{values[k]:.3g}" for k in sorted(values) if k.startswith("loss_scale")]
        parts.append(f"loss {values['loss']:.4g}" + (f" (scales {'/'.join(scales)})" if len(scales) > 1 else ""))
    for key, label, unit in (("grad_norm", "grad norm ", ""), ("learning_rate", "lr ", ""),
                             ("steps_per_s", "", " steps/s"), ("images_per_s", "", " images/s"),
                             ("tflops_per_s_per_device", "", " TFLOP/s/device")):
        if key in values:
            parts.append(f"{label}{values[key]:.3g}{unit}")
    if "eta_s" in values:
        parts.append(f"ETA {format_eta(values['eta_s'])}")
    logging.info(" | ".join(parts))


class StepProfiler:
    """A jax.profiler trace of training steps [start, start + num_steps), written next to the events.

    `logdir` is the TensorBoard folder: the trace lands in `logdir/plugins/profile/<run>/`, where
    TensorBoard's profile plugin (and XProf) looks for it, as `<host>.xplane.pb` plus a Perfetto
    `trace.json.gz`. Steps are counted as the log lines count them (the first step trained is 1).
    jax's profiler writes through its own file layer, which we do not rely on for gs://: on an
    object store the trace is written to a local temporary folder and copied up with etils.epath
    when it stops. `enabled=False` (processes other than 0 unless log.profile_processes='all',
    or start == 0) makes every method a no-op.
    """

    def __init__(self, logdir: str | epath.Path, *, start: int, num_steps: int, enabled: bool = True):
        self.logdir = epath.Path(logdir)
        self.first, self.last = start, start + num_steps - 1
        self.enabled = enabled and start > 0 and num_steps > 0
        self.active = False
        self._local = None  # temporary folder while tracing for a gs:// logdir

    def before_step(self, step: int) -> None:
        """Call before training step `step` (1-based): starts the trace at the first chosen step."""
        if not self.enabled or self.active or step != self.first:
            return
        import jax  # pylint: disable=import-outside-toplevel
        if "://" in str(self.logdir):
            import tempfile  # pylint: disable=import-outside-toplevel
            self._local = epath.Path(tempfile.mkdtemp(prefix="lapflow_profile_"))
            target = self._local
        else:
            self.logdir.mkdir(parents=True, exist_ok=True)
            target = self.logdir
        jax.profiler.start_trace(str(target), create_perfetto_trace=True)
        self.active = True
        logging.info("Profiling steps %d..%d into %s/plugins/profile", self.first, self.last, self.logdir)

    def after_step(self, step: int, outputs=None) -> None:
        """Call after step `step` with its outputs: stops the trace after the last chosen step."""
        if self.active and step >= self.last:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        """Waits for `outputs` (so the traced steps are complete), stops, and copies a remote trace up."""
        if not self.active:
            return
        import jax  # pylint: disable=import-outside-toplevel
        if outputs is not None:
            jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        if self._local is not None:
            for path in self._local.rglob("*"):
                if path.is_file():
                    destination = self.logdir / path.relative_to(self._local)
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(path.read_bytes())
            import shutil  # pylint: disable=import-outside-toplevel
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None
        logging.info("Profile of steps %d..%d written to %s/plugins/profile", self.first, self.last, self.logdir)
