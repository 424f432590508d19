"""Metrics: a JSONL file always, TensorBoard event files (tensorboardX: no TensorFlow needed),
wandb when it is installed and `WANDB_PROJECT` is set, and a tqdm progress bar with the rate."""

from __future__ import annotations

import json
import os

from tqdm import tqdm


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class MetricWriter:
    def __init__(self, workdir: str, *, enabled: bool = True, config=None):
        self.enabled = enabled
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        try:
            from tensorboardX import SummaryWriter  # local: about 2 s to import, for a writing process only

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None
        if os.environ.get("WANDB_PROJECT"):
            try:
                import wandb  # local: optional, used when WANDB_PROJECT is set

                self._wandb = wandb.init(config=json.loads(config.to_json()) if config is not None else None,
                                         dir=workdir, resume="allow")
            except ImportError:
                self._wandb = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def progress(self, start: int, total: int):
        if not self.enabled:
            return _NoBar()
        return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, mininterval=1.0)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
    return rows
