"""The training loop shared by fine-tuning and pretraining.

    trainer = Trainer(model, batches, cfg, device, dist, on_best=save, on_eval=save_state)
    result = trainer.run()          # LoopResult: why it stopped, best val loss, tokens/s, history

AdamW from `GPT.configure_optimizers` (fused on CUDA, decay on 2-D weights only), linear warmup then
cosine decay to min_lr, gradient accumulation and clipping, autocast in bf16/fp16 on CUDA, optional
torch.compile, train/val loss every eval_interval steps (iteration 0 included: the base's own val loss),
early stopping after `patience` evaluations without a val-loss decrease of `min_delta`, and `on_best`
whenever the val loss is the lowest so far. Given `known` (fine-tuning: how many taught edits the model
reproduces), checkpoints rank by (known, val loss) instead, and either improving counts for patience. Under torchrun (DDP) every process trains on its own batches,
losses are averaged over processes, and only rank 0 calls `on_best`/`on_eval` and draws the progress bar.
Ctrl-C (or SIGTERM) stops after the current step; a save in progress finishes first.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from tqdm.auto import tqdm

from gpt.device import peak_flops, pick_device, pick_dtype
from gpt.model import GPT
from training.config import ConfigError, TrainConfig

# Dense bf16 tensor-core peaks, for the MFU estimate on known GPUs.


@dataclass
class Distributed:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Distributed, torch.device]:
    """DDP when started by torchrun (RANK/WORLD_SIZE set): NCCL on GPUs, gloo on CPU; else one process."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed(), pick_device(device_name)
    dist = Distributed(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist, device


def cleanup_distributed(dist: Distributed) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_iters, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    span = max(1, cfg.max_iters - cfg.warmup_iters)
    progress = min(1.0, (it - cfg.warmup_iters) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


@dataclass
class LoopState:
    """Everything about a run's progress that --resume needs besides weights and optimizer."""

    iteration: int = 0
    best_val_loss: float = math.inf  # of the kept checkpoint
    best_iter: int = -1
    best_known: int = -1  # taught edits the kept checkpoint reproduces (see Trainer's `known`)
    bad_evals: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # {"iter", "train_loss", "val_loss", "lr"}


@dataclass
class LoopResult:
    state: LoopState
    stopped: str  # "max_iters", "early_stopping" or "interrupted"
    elapsed: float
    tokens_per_s: float  # steady state: training steps only, warm-up steps left out
    mfu: float | None  # model FLOPs utilisation at that speed, on GPUs with a known peak


class Trainer:
    def __init__(self, model: GPT, batches, cfg: TrainConfig, device: torch.device, dist: Distributed | None = None,
                 on_best: Callable[[GPT, LoopState], None] | None = None,
                 on_eval: Callable[[GPT, torch.optim.Optimizer, LoopState], None] | None = None,
                 progress: bool = True, on_step: Callable[[LoopState, float], None] | None = None,
                 known: Callable[[GPT], int] | None = None, anchor=None):
        self.cfg, self.device, self.dist = cfg, device, dist or Distributed()
        self.anchor = anchor  # training.anchor.KLToBase: a penalty for drifting from the base, added to the loss
        # How many of the log's edits the model reproduces now (training.report.reproduces on the taught probes):
        # a checkpoint that knows more of them is kept over one with a lower val loss, which alone would stop
        # a fine-tune an epoch before the last facts land (the held-out chat drifts first).
        self.known = known
        self.batches = batches
        self.on_best, self.on_eval, self.progress = on_best, on_eval, progress
        self.on_step = on_step  # after every step with its loss (progress reports, e.g. the app's status file)
        self.dtype = pick_dtype(cfg.dtype, device)
        if device.type != "cuda" and self.dtype == torch.float16:
            raise ConfigError("dtype fp16 needs a CUDA device: use fp32 or bf16 here.")
        self.model = model.to(device=device, dtype=torch.float32)  # fp32 master weights; autocast does the rest
        set_dropout(self.model, cfg.dropout)
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2),
                                                         device.type)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[device.index] if device.type == "cuda" else None)
        self.state = LoopState()
        self.peak_flops = peak_flops(device) if self.dtype != torch.float32 else None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def load_state(self, saved: dict) -> None:
        """Continue from `save_training_state`'s dict (weights, optimizer, LoopState)."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = LoopState(**saved["loop"])
        self.batches.reseed(self.cfg.seed + self.state.iteration)

    @torch.no_grad()
    def evaluate(self, train_loss: float | None = None) -> dict[str, float]:
        """Mean loss over target tokens of up to eval_iters batches of each split, averaged over processes.
        Given `train_loss` (the mean of the steps since the last evaluation), the train split is not run again:
        on a CPU that halves what an evaluation costs."""
        self.model.eval()
        losses = {}
        splits = [("val", self.batches.val_batches(self.cfg.eval_iters, self.device))]
        if train_loss is None:
            splits.insert(0, ("train", self.batches.train_eval_batches(self.cfg.eval_iters, self.device)))
        else:
            losses["train"] = train_loss
        for name, batches in splits:
            total = torch.zeros(2, dtype=torch.float64, device=self.device)
            for x, y, m in batches:
                with self.autocast():
                    _, loss = self.model(x, y, m, loss_only=True)
                n = ((y != -1) & (m > 0)).sum()
                total += torch.stack([loss.double() * n, n.double()])
            if self.dist.enabled:
                torch_dist.all_reduce(total)
            losses[name] = float(total[0] / total[1].clamp(min=1))
        self.model.train()
        return losses

    def _eval_and_decide(self, lr: float, bar, train_loss: float | None = None) -> bool:
        """Evaluate, keep the best, update patience; True when early stopping fires."""
        s, cfg = self.state, self.cfg
        losses = self.evaluate(train_loss)
        known = 0
        if self.known is not None:
            self.model.eval()
            known = self.known(self.model)
            self.model.train()
        s.history.append({"iter": s.iteration, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr,
                          **({"known": known} if self.known is not None else {})})
        # Ranked by (taught edits reproduced, val loss): without a `known` probe, by val loss alone.
        more, same = known > s.best_known, known == s.best_known
        improved = more or (same and losses["val"] < s.best_val_loss - cfg.min_delta)
        s.bad_evals = 0 if improved else s.bad_evals + 1
        best = more or (same and losses["val"] < s.best_val_loss)
        if best:
            s.best_val_loss, s.best_iter, s.best_known = losses["val"], s.iteration, known
        if self.dist.is_main:
            note = " (best so far, saved)" if best and self.on_best else ""
            edits = f", {known} taught edits reproduced" if self.known is not None else ""
            _log(bar, f"iter {s.iteration}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{edits}"
                      f"{note}")
            with deferred_interrupts():  # a checkpoint is never left half-written by Ctrl-C
                if best and self.on_best:
                    self.on_best(self.model, s)
                if self.on_eval:
                    self.on_eval(self.model, self.optimizer, s)
        if self.dist.enabled:
            torch_dist.barrier()
        return cfg.patience > 0 and s.bad_evals >= cfg.patience

    def _step(self, lr: float, batch) -> tuple[float, tuple]:
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(cfg.grad_accum):
            if self.dist.enabled:  # all-reduce gradients only on the last micro-batch
                self.train_model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            x, y, m = batch
            with self.autocast():
                if self.anchor is not None:
                    picked = self.anchor.positions(y, m)
                    base_lp = self.anchor.base_log_probs(x, picked)
                _, loss = self.train_model(x, y, m, loss_only=True)
                if self.anchor is not None:
                    loss = loss + self.anchor.loss(base_lp, picked, y)
                loss = loss / cfg.grad_accum
            batch = self.batches.train_batch(self.device)  # prepared while the device works
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total, batch

    def _mean_loss(self, losses: list[float]) -> float | None:
        """The mean step loss since the last evaluation (averaged over processes), or None before any step."""
        if not losses:
            return None
        total = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=self.device)
        if self.dist.enabled:
            torch_dist.all_reduce(total)
        return float(total[0] / total[1])

    def run(self) -> LoopResult:
        cfg, s = self.cfg, self.state
        started = time.time()
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * self.dist.world_size
        bar = tqdm(total=cfg.max_iters, initial=s.iteration, disable=not (self.progress and self.dist.is_main),
                   desc="training", unit="step", dynamic_ncols=True)
        stopped, rate = "max_iters", 0.0
        step_seconds: list[float] = []
        recent: list[float] = []  # step losses since the last evaluation (its train loss)
        self.model.train()
        batch = self.batches.train_batch(self.device)
        try:
            with interrupts_as_keyboard_interrupt():
                while True:
                    lr = lr_at(min(s.iteration, cfg.max_iters - 1), cfg)
                    due = s.iteration % cfg.eval_interval == 0 or s.iteration >= cfg.max_iters
                    if due and not (s.history and s.history[-1]["iter"] == s.iteration):
                        mean = self._mean_loss(recent)
                        recent.clear()
                        if self._eval_and_decide(lr, bar, mean):
                            stopped = "early_stopping"
                            break
                    if s.iteration >= cfg.max_iters:
                        break
                    with deferred_interrupts():  # a step is never left half-applied
                        t0 = time.perf_counter()
                        loss, batch = self._step(lr, batch)
                        dt = time.perf_counter() - t0
                        s.iteration += 1
                        s.tokens += tokens_per_step
                        s.train_seconds += dt
                        recent.append(loss)
                        step_seconds.append(dt)
                        rate = tokens_per_step / dt
                        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{rate:,.0f}", "lr": f"{lr:.2e}"}
                        if self.peak_flops and len(step_seconds) > 1:
                            mfu = self.model.estimate_mfu(tokens_per_step // self.dist.world_size, dt, self.peak_flops,
                                                          cfg.block_size)
                            postfix["mfu"] = f"{100 * mfu:.1f}%"
                        bar.set_postfix(postfix, refresh=False)
                        bar.update(1)
                    if self.on_step and self.dist.is_main:
                        self.on_step(s, loss)
        except KeyboardInterrupt:
            stopped = "interrupted"
        finally:
            bar.close()
        # Steady-state speed: the first steps (torch.compile, allocator and kernel warm-up) are left out.
        steady = step_seconds[min(3, len(step_seconds) // 2):]
        avg_rate = tokens_per_step * len(steady) / sum(steady) if steady else 0.0
        mfu = None
        if self.peak_flops and steady:
            mfu = self.model.estimate_mfu(tokens_per_step // self.dist.world_size, sum(steady) / len(steady),
                                          self.peak_flops, cfg.block_size)
        if stopped == "interrupted" and self.on_eval and self.dist.is_main:
            with deferred_interrupts():
                self.on_eval(self.model, self.optimizer, s)
        return LoopResult(s, stopped, time.time() - started, avg_rate, mfu)


def set_dropout(model: GPT, p: float) -> None:
    """Training dropout for a model built with another value (checkpoints are saved with theirs)."""
    model.config.dropout = p  # attention reads it from the config
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p


def save_training_state(path: str | Path, model: GPT, optimizer: torch.optim.Optimizer, state: LoopState) -> None:
    """Weights, optimizer and progress for --resume, written atomically (tensors and plain data only)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": asdict(state)}, tmp)
    os.replace(tmp, path)


def load_training_state(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _log(bar, message: str) -> None:
    if bar.disable:
        print(message, flush=True)
    else:
        bar.write(message)


@contextlib.contextmanager
def interrupts_as_keyboard_interrupt():
    """SIGTERM (what torchrun and schedulers send) stops the run like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts():
    """Hold Ctrl-C/SIGTERM until the block ends (a save finishes), then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt
