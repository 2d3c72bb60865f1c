"""Feature networks, Fréchet distance and SWD for the eval mode (lapflow_jax/evaluate.py)."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def with_progress(batches: Iterable[T], label: str, *, total: int, items_per_batch: int,
                  lines: int = 20) -> Iterator[T]:
    """Yields `batches`, logging training-style progress lines with an ETA (metrics.Progress).

    A line follows the first batch, every ~total/lines batches and the last one, so a
    50,000-image pass on a fast chip does not print a thousand lines. Each line is logged after
    the consumer has finished that batch, so its rate covers the consumer's work too.
    """
    from lapflow_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

    progress = metrics_lib.Progress(label, total, items_per_batch=items_per_batch)
    every = max(1, -(-int(total) // lines))
    for done, batch in enumerate(batches, 1):
        yield batch
        if done in (1, total) or done % every == 0:
            progress.update(done)
