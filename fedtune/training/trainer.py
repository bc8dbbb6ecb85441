"""Local fine-tuning of the LoRA adapter: Opacus DP-SGD, or plain clipped AdamW with privacy off.

One ``LocalTrainer`` serves one training call (one federated round, or a whole
``train-local`` run). The privacy accountant's history comes in and goes out, so that epsilon
composes over repeated calls exactly as over one long run.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fedtune.adapters import trainable_parameters, unwrap
from fedtune.config import PrivacyConfig, TrainConfig
from fedtune.privacy.accounting import AccountantHistory
from fedtune.training.auto import AUTO, dp_sample_rate, steps_per_epoch  # noqa: F401 (re-exported)
from fedtune.training.losses import batch_loss, causal_lm_loss, class_weights, logit_adjustment
from fedtune.training.precision import PerSampleLossScaler, autocast
from fedtune.training.schedule import warmup_cosine

log = logging.getLogger(__name__)

# Expected with a frozen base: the first hooked module's inputs need no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
# fedtune seeds Opacus's noise generator from a secret (a site's key or the OS's secure random
# source), not from the run's public seed; Opacus's secure_mode (a CSPRNG per draw) is slower.
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)


@dataclass
class TrainResult:
    steps: int
    train_loss: float
    history: Optional[AccountantHistory]  # None with privacy off
    noise_multiplier: float
    sample_rate: float
    losses: list[float] = field(default_factory=list)

    def epsilon(self, delta: float) -> float:
        return self.history.epsilon(delta) if self.history is not None else math.inf


class LocalTrainer:
    """Trains the trainable tensors of a peft model on one site's dataset."""

    def __init__(
        self,
        model: torch.nn.Module,
        dataset: Dataset,
        collate_fn: Callable,
        task: str,
        train_cfg: TrainConfig,
        privacy_cfg: PrivacyConfig,
        device: torch.device,
        precision: str,
        noise_multiplier: float = 0.0,
        history: Optional[AccountantHistory] = None,
        sample_seed: Optional[int] = None,
        proximal_mu: float = 0.0,
        noise_seed: Optional[int] = None,
    ):
        if len(dataset) == 0:
            raise ValueError("cannot train on an empty dataset")
        if AUTO in (train_cfg.batch_size, train_cfg.learning_rate):
            raise ValueError("train.batch_size / learning_rate = 'auto' must be resolved for the site first "
                             "(fedtune.training.auto.resolve_train)")
        self.task = task
        self.cfg = train_cfg
        # train.class_balance: "logit-adjusted" adds log(prior) to the logits in the loss only;
        # "reweighted" weights each example's gradient by its class (after DP clipping, see step)
        self.adjustment: Optional[torch.Tensor] = None
        self.class_weights: Optional[torch.Tensor] = None
        if task == "sequence-classification" and train_cfg.class_balance in ("logit-adjusted", "reweighted"):
            if not train_cfg.class_prior:
                raise ValueError(f"train.class_balance = {train_cfg.class_balance!r} needs train.class_prior (the "
                                 "coordinator or train-local sets it from evaluation rows)")
            labels = getattr(getattr(model, "config", None), "num_labels", len(train_cfg.class_prior))
            if train_cfg.class_balance == "logit-adjusted":
                self.adjustment = logit_adjustment(train_cfg.class_prior, labels).to(device)
            else:
                self.class_weights = class_weights(train_cfg.class_prior, labels).to(device)
        self._batch_weights: Optional[torch.Tensor] = None  # this batch's class weights (ghost clipping)
        self.privacy = privacy_cfg
        self.device = device
        self.precision = precision
        self.noise_multiplier = noise_multiplier
        self.num_examples = len(dataset)
        self.sample_rate = dp_sample_rate(self.num_examples, train_cfg.batch_size)
        self.scaler = PerSampleLossScaler() if precision == "fp16" else None
        if precision == "fp16" and not privacy_cfg.enabled:
            raise ValueError("train.precision = 'fp16' is offered for DP training only; use bf16 or fp32")
        if privacy_cfg.enabled and privacy_cfg.grad_sample_mode == "ghost" and (
            task != "sequence-classification" or precision == "fp16"
        ):
            raise ValueError(
                "privacy.grad_sample_mode = 'ghost' supports sequence-classification in fp32/bf16 only; use 'hooks'"
            )
        # The Poisson sample and the DP noise must be unpredictable to whoever sees the result
        # and independent of each other (the accountant assumes both): each has its own seed,
        # from the OS's secure random source unless the caller passes secrets it keeps (a site's
        # key, client/secret.py). Never the config's public train.seed.
        if privacy_cfg.enabled and sample_seed is not None and sample_seed == noise_seed:
            raise ValueError("the Poisson sampler and the DP noise need independent seeds, got the same one twice")
        self._generator = torch.Generator().manual_seed(
            sample_seed if sample_seed is not None else secrets.randbits(63))
        self._noise_seed = noise_seed if noise_seed is not None else secrets.randbits(63)
        self._noise_generator: Optional[torch.Generator] = None
        self.params = list(trainable_parameters(model).values())
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        optimizer = torch.optim.AdamW(self.params, lr=train_cfg.learning_rate, weight_decay=train_cfg.weight_decay)
        loader = DataLoader(
            dataset, batch_size=train_cfg.batch_size, shuffle=True, collate_fn=collate_fn, generator=self._generator
        )
        self.engine: Optional[PrivacyEngine] = None
        self.criterion = None
        if privacy_cfg.enabled:
            self._make_private(model, optimizer, loader, history)
        else:
            self.model, self.optimizer, self.loader = model, optimizer, loader
        if proximal_mu > 0:
            self._add_proximal_term(optimizer, proximal_mu)

    def _add_proximal_term(self, optimizer: torch.optim.Optimizer, mu: float) -> None:
        """FedProx: pull towards the round's global adapter by adding mu * (w - w_global) to the
        gradient. Added after DP clipping and noise: it depends on no example, so costs no privacy."""
        anchors = [p.detach().clone() for p in self.params]

        def hook(opt, args, kwargs):
            for p, anchor in zip(self.params, anchors):
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

        optimizer.register_step_pre_hook(hook)

    def _make_private(self, model, optimizer, loader, history: Optional[AccountantHistory]) -> None:
        mechanism = history.mechanism if history is not None else self.privacy.accountant
        self.engine = PrivacyEngine(accountant=mechanism)
        if history is not None:
            self.engine.accountant.history = [tuple(h) for h in history.history]
        out = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.privacy.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=self.privacy.grad_sample_mode,
            criterion=torch.nn.CrossEntropyLoss(),
            noise_generator=self._noise_gen(),
        )
        if self.privacy.grad_sample_mode == "ghost":
            self.model, self.optimizer, self.criterion, self.loader = out
            if self.class_weights is not None:
                self._weight_ghost_clipping()
        else:
            self.model, self.optimizer, self.loader = out

    def _weight_ghost_clipping(self) -> None:
        """Ghost clipping scales each example's loss by its clipping factor in a second backward
        (Opacus's ``get_clipping_coef``): "reweighted" multiplies that factor by the example's class
        weight (at most 1), as the hooks path does to the clipped per-sample gradients."""
        clipping_coef = self.model.get_clipping_coef

        def weighted_coef() -> torch.Tensor:
            coef = clipping_coef()
            return coef * self._batch_weights.to(coef.device) if self._batch_weights is not None else coef

        self.model.get_clipping_coef = weighted_coef

    def _noise_gen(self) -> torch.Generator:
        self._noise_generator = torch.Generator(device=self.device).manual_seed(self._noise_seed)
        return self._noise_generator

    # -- one step -------------------------------------------------------------------------

    def step(self, batch) -> Optional[float]:
        """Forward/backward on one (physical) batch, then an optimizer step unless Opacus is
        still accumulating a logical batch. Returns the batch loss, or None for an empty batch."""
        input_ids, attention_mask, labels = (t.to(self.device) for t in batch)
        if input_ids.shape[0] == 0:
            self._empty_batch_step()
            return None
        if self.criterion is not None:  # ghost clipping: its criterion does the double backward
            with autocast(self.precision, self.device):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss = self.criterion(self._adjusted(logits.float()), labels)
            self._batch_weights = self.class_weights[labels] if self.class_weights is not None else None
            loss.backward()
            value = float(loss.detach())
        else:
            loss = self.loss(input_ids, attention_mask, labels)
            (self.scaler.scale_loss(loss) if self.scaler else loss).backward()
            value = float(loss.detach())
        if self.engine is not None:
            self._prepare_per_sample_grads(labels)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.privacy.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The batch's loss: the mean of each example's own loss (causal LM: logits only where
        a token is supervised)."""
        with autocast(self.precision, self.device):
            if self.task == "causal-lm":
                return causal_lm_loss(self.model, input_ids, attention_mask, labels).mean()
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.class_weights is not None and self.engine is None:  # without DP: a class-weighted loss
            per_example = F.cross_entropy(logits.float(), labels, reduction="none")
            return (per_example * self.class_weights[labels]).mean()
        return batch_loss(self._adjusted(logits.float()), labels, self.task)

    def _adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.adjustment is None else logits + self.adjustment

    def _prepare_per_sample_grads(self, labels: Optional[torch.Tensor] = None) -> None:
        # Concatenate accumulated pieces and keep per-sample gradients in fp32 so that the
        # clipping norms and the sum are computed at full precision.
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if isinstance(gs, list):
                gs = torch.cat(gs, dim=0)
            if gs is not None:
                p.grad_sample = gs.float()
        if self.scaler is not None:
            self.scaler.unscale_(self.params)
        if self.privacy.grad_sample_mode == "hooks":
            missing = [i for i, p in enumerate(self.params) if getattr(p, "grad_sample", None) is None]
            if missing:
                raise RuntimeError(
                    f"{len(missing)} trainable tensors got no per-sample gradient: Opacus hooks are not "
                    "attached to them, DP-SGD would be wrong"
                )
            if self.class_weights is not None:
                if labels is None:
                    raise ValueError("train.class_balance = 'reweighted' needs the batch's labels")
                self._clip_and_weight(self.class_weights[labels])

    def _clip_and_weight(self, weights: torch.Tensor) -> None:
        """Clip each example's gradient to privacy.max_grad_norm exactly as Opacus does, then multiply
        it by its class weight (at most 1). Opacus's own clipping that follows then finds every norm
        within the bound and leaves the gradients as they are: the sensitivity stays max_grad_norm."""
        norms = torch.stack([p.grad_sample.reshape(p.grad_sample.shape[0], -1).norm(2, dim=1)
                             for p in self.params], dim=1).norm(2, dim=1)
        factor = (self.privacy.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * weights.to(norms.device)
        for p in self.params:
            p.grad_sample = p.grad_sample * factor.view(-1, *([1] * (p.grad_sample.dim() - 1)))

    def _empty_batch_step(self) -> None:
        # Poisson sampling drew no example: take a noise-only step, which the accountant counts.
        # (Ghost clipping's optimizer sums p.grad, the hooks' optimizer the per-sample gradients.)
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=torch.float32)
            if self.criterion is not None:
                p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def _last_step_skipped(self) -> bool:
        return bool(getattr(self.optimizer, "_is_last_step_skipped", False))

    # -- a whole training call ------------------------------------------------------------

    def history(self) -> Optional[AccountantHistory]:
        if self.engine is None:
            return None
        acc = self.engine.accountant
        return AccountantHistory(mechanism=acc.mechanism(), history=[tuple(h) for h in acc.history])

    def epsilon(self, delta: float) -> float:
        hist = self.history()
        return hist.epsilon(delta) if hist is not None else math.inf

    def train(
        self,
        num_steps: int,
        lr_step_offset: int = 0,
        lr_total_steps: Optional[int] = None,
        desc: str = "train",
    ) -> TrainResult:
        """Run ``num_steps`` logical (optimizer) steps. The learning rate follows warmup then
        cosine decay over ``lr_total_steps`` (the whole planned training), starting at
        ``lr_step_offset`` (the steps earlier rounds already took)."""
        total = lr_total_steps or num_steps
        schedule = warmup_cosine(self.cfg.learning_rate, total, self.cfg.warmup_ratio)
        self.model.train()
        losses: list[float] = []
        done = 0
        bar = tqdm(total=num_steps, desc=desc, disable=not self.cfg.progress, leave=False, dynamic_ncols=True)
        eps_every = max(1, num_steps // 10)
        try:
            while done < num_steps:
                for batch in self._batches():
                    self._set_lr(schedule(lr_step_offset + done))
                    loss = self.step(batch)
                    if loss is not None:
                        losses.append(loss)
                    if self.engine is not None and self._last_step_skipped:
                        continue  # Opacus is accumulating physical batches of one logical batch
                    done += 1
                    bar.update(1)
                    if self.cfg.progress and (done % eps_every == 0 or done == num_steps):
                        bar.set_postfix(self._postfix(losses))  # an accountant call: only when shown
                    if done >= num_steps:
                        break
        finally:
            bar.close()
        return TrainResult(
            steps=done,
            train_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
            history=self.history(),
            noise_multiplier=self.noise_multiplier if self.engine is not None else 0.0,
            sample_rate=self.sample_rate,
            losses=losses,
        )

    def _batches(self):
        if self.engine is None:
            yield from self.loader
            return
        with BatchMemoryManager(
            data_loader=self.loader,
            max_physical_batch_size=self.cfg.physical_batch_size,
            optimizer=self.optimizer,
        ) as loader:
            yield from loader

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _postfix(self, losses: list[float]) -> dict:
        recent = losses[-20:]
        post = {"loss": f"{sum(recent) / len(recent):.4f}" if recent else "-"}
        if self.engine is not None:
            post["eps"] = f"{self.epsilon(self.privacy.target_delta):.2f}"
        return post

    def close(self) -> torch.nn.Module:
        """Remove Opacus hooks and return the plain peft model (it can be wrapped again later)."""
        model = self.model
        if self.engine is not None and hasattr(model, "_close"):
            model._close()
        for p in self.params:
            for attr in ("grad_sample", "summed_grad", "_current_grad_sample"):
                if hasattr(p, attr):
                    try:
                        delattr(p, attr)
                    except AttributeError:
                        setattr(p, attr, None)
        return unwrap(model)
