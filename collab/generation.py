"""Decoding helpers shared by experts: stop strings, per-row limits of a padded
batch, and the streamer that hands tokens from ``model.generate`` to a consumer
thread."""

from __future__ import annotations

import queue
from typing import TYPE_CHECKING, Any, Iterator, Sequence

if TYPE_CHECKING:
    import torch


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def stopping(criteria: list[Any]) -> Any:
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList(criteria)


class StopStrings:
    """Stop a single sequence once its generated text contains a stop string."""

    def __init__(self, tokenizer: Any, stops: Sequence[str], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.prompt_len = prompt_len
        # a token is at least one character, so this many tokens cover the longest stop
        self.window = max(len(s) for s in stops) + 8

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> "torch.Tensor":
        import torch

        done = []
        for row in input_ids:
            tail = row[max(self.prompt_len, row.shape[0] - self.window) :].tolist()
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            done.append(any(s in text for s in self.stops))
        return torch.tensor(done, device=input_ids.device)


class RowLimits:
    """Per-row stop strings and max_tokens for a padded batch."""

    def __init__(self, tokenizer: Any, stops: list[list[str]], max_news: list[int], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.max_news = max_news
        self.prompt_len = prompt_len

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> "torch.Tensor":
        import torch

        n = input_ids.shape[1] - self.prompt_len
        done = []
        for row, stops, mx in zip(input_ids, self.stops, self.max_news):
            if n >= mx:
                done.append(True)
                continue
            if stops:
                window = max(len(s) for s in stops) + 8
                text = self.tokenizer.decode(row[max(self.prompt_len, row.shape[0] - window) :].tolist(), skip_special_tokens=True)
                done.append(any(s in text for s in stops))
            else:
                done.append(False)
        return torch.tensor(done, device=input_ids.device)


class QueueStreamer:
    """A transformers streamer that hands generated token ids to another thread."""

    _END = object()

    def __init__(self) -> None:
        self.q: queue.Queue[Any] = queue.Queue()
        self.prompt_seen = False
        self.stop_requested = False
        self.error: BaseException | None = None

    def put(self, value: "torch.Tensor") -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.q.put(int(t))

    def end(self) -> None:
        self.q.put(self._END)

    def fail(self, e: BaseException) -> None:
        self.error = e
        self.q.put(self._END)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def __iter__(self) -> Iterator[int]:
        while True:
            item = self.q.get()
            if item is self._END:
                return
            yield item


class StopFlag:
    """Lets the consumer of a stream stop generation early (client went away, stop string)."""

    def __init__(self, streamer: QueueStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> "torch.Tensor":
        import torch

        return torch.full((input_ids.shape[0],), self.streamer.stop_requested, dtype=torch.bool, device=input_ids.device)
