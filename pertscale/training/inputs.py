"""Module inputs prepared off the training thread: loader batch -> `make_inputs` (tokenisation,
masking, gene sampling) -> pinned host tensors, in a background thread `depth` batches ahead,
so the step that consumes them only copies them to its device (non_blocking from pinned
memory: the copy overlaps the step before it) and never waits on Python-side tokenisation.

Exact resume with a thread that runs ahead:
- Every batch's random draws come from a generator seeded by (seed, rank, epoch, batch index)
  (`batch_generator`): what a batch's inputs are depends on its position only, not on how
  many batches the thread prepared before the step that consumes it.
- Every prepared batch carries the loader's position after it (`Prepared.position`): a
  checkpoint saves the position of the last batch the step consumed, not the loader's own
  (which the thread has moved ahead).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["InputStream", "Prepared", "batch_generator"]


@dataclasses.dataclass
class Prepared:
    """One batch ready for a step."""

    batch: dict[str, Any]
    """The loader's batch (cell indices and what the loader read)."""
    inputs: dict[str, Any]
    """The module's inputs, on the host (pinned when the stream pins)."""
    position: dict[str, Any]
    """The loader's state_dict right after this batch: where a resume continues."""
    epoch: int
    at_epoch_end: bool
    """This batch is the last of its epoch."""
    tokens: int = 0
    """Real tokens (attention models; 0 otherwise)."""
    sum_sq_len: int = 0
    """Sum over the batch's sequences of length^2 (the MFU's attention term)."""


def batch_generator(seed: int, rank: int, epoch: int, index: int) -> torch.Generator:
    """The generator of batch `index` of `epoch` on `rank`: independent streams per position."""
    key = np.random.SeedSequence([seed, rank, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(key))


_END = object()


class InputStream:
    """`epoch_items()` iterates the rest of the loader's current epoch as `Prepared` batches,
    made by `make_inputs(batch, generator=...)` in a background thread (module docstring).

    `work`: inputs -> (real tokens, sum of len^2), counted on the host before any copy.
    `pin_memory`: page-lock the input tensors (for a CUDA device)."""

    def __init__(self, loader: Any, make_inputs: Callable[..., dict[str, Any]], *, seed: int,
                 rank: int, pin_memory: bool = False,
                 work: Callable[[dict[str, Any]], tuple[int, int]] | None = None,
                 depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.loader, self.make_inputs = loader, make_inputs
        self.seed, self.rank = int(seed), int(rank)
        self.pin_memory, self.work, self.depth = pin_memory, work, depth

    def prepare(self, batch: dict[str, Any], position: dict[str, Any]) -> Prepared:
        """The inputs of `batch`, which the loader handed out just before reaching `position`."""
        epoch, index = int(position["epoch"]), int(position["batches_emitted"]) - 1
        inputs = self.make_inputs(batch, generator=batch_generator(self.seed, self.rank, epoch,
                                                                   index))
        tokens, sum_sq = self.work(inputs) if self.work is not None else (0, 0)
        if self.pin_memory:
            inputs = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
        return Prepared(batch, inputs, position, epoch,
                        index + 1 >= self.loader.num_batches, tokens, sum_sq)

    def epoch_items(self) -> Iterator[Prepared]:
        """The rest of the current epoch; closing the iterator (or leaving a `for` over it with
        contextlib.closing) stops the thread and the loader's own."""
        out: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            batches = iter(self.loader)
            try:
                for batch in batches:
                    if not put(self.prepare(batch, self.loader.state_dict())):
                        return
                put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                put(e)
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()  # the loader's own thread ends with its iterator

        thread = threading.Thread(target=produce, daemon=True,
                                  name=f"InputStream-rank{self.rank}")
        thread.start()
        try:
            while True:
                try:
                    item = out.get(timeout=0.1)
                except queue.Empty:
                    if not thread.is_alive() and out.empty():
                        raise RuntimeError("the input thread ended without a result") from None
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()
