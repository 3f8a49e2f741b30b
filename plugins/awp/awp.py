"""``AdversarialWeightPerturbation``: AWP (Wu, Xia & Wang, NeurIPS 2020) as an extension of any method.

After the authors' code, csdongxian/AWP@a7acf5d842fccf1bbb4b91644352ce157d370a26
(``AT_AWP/utils_awp.py`` and ``AT_AWP/train_cifar10.py``; ``trades_AWP/utils_awp.py`` and
``trades_AWP/train_trades_cifar.py``). Every step, once the adversarial examples are made:

1. ``calc_awp`` (hook ``before_loss``): a proxy (a copy of the model, loaded with the model's weights and buffers, in train
   mode) takes one plain SGD step (no momentum, no weight decay) on *minus* the method's own
   training loss (PGD-AT: -CE(adv), TRADES: -(CE(clean) + beta * KL), as the reference's). For
   every weight ``w`` whose name contains "weight" and which has more than one dimension
   (convolutions, linear layers; not BatchNorm, not biases), the step ``d = w_proxy - w`` is
   rescaled to the layer's norm: ``v = ||w|| / (||d|| + 1e-20) * d``;
2. ``perturb`` (trainer hook ``before_loss``): ``w <- w + gamma * v``;
3. the method's loss and its gradients, at the perturbed weights;
4. ``restore`` (hook ``before_step``, after ``backward``, before ``optimizer.step``): ``w`` back.

Where this differs from the reference, and why the update is still the reference's:

* The reference restores *after* ``optimizer.step()``, by subtracting ``gamma * v``; the trainer's
  hook comes before the step. Without weight decay both orders give ``w - lr * update``. SGD's
  (coupled) weight decay, however, decays the weights the step sees: the perturbed ones in the
  reference. ``restore`` therefore adds ``weight_decay * gamma * v`` to the gradient of each
  perturbed weight (torch SGD, with or without momentum), which makes the update, and the momentum
  buffer, the reference's up to rounding.
* ``restore`` copies back the saved weights instead of subtracting ``gamma * v`` (the reference
  leaves ``w + gamma*v - gamma*v``, which is ``w`` only up to rounding): exact, so processes under
  torchrun never drift apart.
* Under torch.distributed the proxy's gradients are averaged over the processes before its step,
  so every process applies the same perturbation, the one of the global batch (the reference's
  ``nn.DataParallel`` proxy also sees the whole batch).
* TRADES: the proxy's clean logits come from one forward pass, not two (the same values unless the
  model has dropout), and the KL term is ``trades_kl`` (finite gradients where a clean probability
  underflows).

The proxy is a plain ``nn.Module`` (``copy.deepcopy`` of the model at first use) kept on the
extension object. It is reloaded from the model at every step and its optimizer keeps no state
(SGD without momentum), so nothing of AWP goes into the checkpoint: a resumed run is exact.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.distributed as dist

from at_memorization.methods import Extension, Hyperparameter, LoggedValue, MethodError

AWP_EPS = 1e-20  # utils_awp.py's EPS


def awp_weight_names(model: torch.nn.Module) -> list[str]:
    """The parameters AWP perturbs: "weight" in the name and more than one dimension (the
    reference's ``diff_in_weights`` filter, applied to the parameters ``add_into_weights`` touches)."""
    return [name for name, p in model.named_parameters() if "weight" in name and p.dim() > 1 and p.requires_grad]


AWP_HYPERPARAMETERS = (
    Hyperparameter("awp_gamma", float, None, "AWP: size of the weight perturbation relative to each layer's weight "
                   "norm, 0 for none (the reference's: 0.01 for pgd-at-awp and pgd-at-te-awp, 0.005 for trades-awp)",
                   minimum=0.0, derived=lambda values: float(getattr(values["method"], "awp_default_gamma", 0.01))),
    Hyperparameter("awp_warmup", int, None, "AWP: epochs trained without it before it starts (the reference's: 0; "
                   "trades-awp: 9 of 200 epochs, 4.5% of other lengths rounded down)", minimum=0,
                   # warm-up epochs of a 200-epoch run; other lengths get the same fraction, rounded down
                   derived=lambda values: getattr(values["method"], "awp_default_warmup", 0) * values["epochs"] // 200),
)


class AdversarialWeightPerturbation(Extension):
    """AWP for the method that lists it in ``extensions``, e.g. ``pgd-at-awp``.

    Settings ``awp_gamma`` and ``awp_warmup`` (None: the method class's reference defaults,
    ``awp_default_gamma`` and ``awp_default_warmup``, and its proxy learning rate ``awp_proxy_lr``).
    AWP is on from epoch ``awp_warmup + 1`` (epochs count from 1) while ``awp_gamma > 0``. What the
    perturbation ascends is the method's own training loss, its other extensions' terms included.
    """

    key = "awp"
    hyperparameters = AWP_HYPERPARAMETERS
    logged = (LoggedValue("awp_gamma_now", "AWP gamma", plot=False),)  # 0 during the warm-up, then awp_gamma

    def __init__(self, method):
        super().__init__(method)
        setup, h, name = method.setup, method.settings, method.name
        # The proxy's SGD learning rate. The rescaling to ||w|| cancels it (up to rounding).
        self.proxy_lr = getattr(method, "awp_proxy_lr", 0.01)
        default_warmup = getattr(method, "awp_default_warmup", 0)
        if "awp_warmup" in method.derived and h["awp_warmup"] != default_warmup:
            method.notes.append(f"AWP: {setup.epochs} epochs, so AWP starts at epoch {h['awp_warmup'] + 1} "
                                f"(the reference's {default_warmup + 1} of 200)")
        gamma, warmup = h["awp_gamma"], h["awp_warmup"]
        if gamma > 0 and warmup >= setup.epochs:
            raise MethodError(f"{name}: AWP starts after {warmup} epochs (--awp-warmup) but the run has "
                              f"{setup.epochs} epochs, so AWP would never switch on; use --awp-warmup < "
                              f"{setup.epochs} (or --awp-gamma 0 to train without AWP)")
        self.gamma, self.warmup = gamma, warmup
        self._model = None  # the model the proxy was copied from
        self._proxy = None
        self._proxy_optimizer = None
        self._saved = None  # [(parameter, its unperturbed value)] between perturb and restore

    # ------------------------------------------------------------------ the schedule
    def active(self, epoch: int) -> bool:
        return self.gamma > 0 and epoch > self.warmup

    def on_epoch_start(self, epoch):
        return {"awp_gamma_now": self.gamma if self.active(epoch) else 0.0}

    # ------------------------------------------------------------------ the reference's AdvWeightPerturb
    def objective(self, proxy, x, x_adv, y, index, epoch) -> torch.Tensor:
        """What the weight perturbation maximizes: the method's own training loss (on the proxy)."""
        return self.method.loss(proxy, x, x_adv, y, index, epoch)[0]

    def _proxy_for(self, model: torch.nn.Module):
        if self._proxy is None or self._model is not model:
            proxy = copy.deepcopy(model)
            for p in proxy.parameters():
                p.grad = None
            names = set(awp_weight_names(model))
            self._names = [name for name, _ in model.named_parameters() if name in names]
            proxy_params = dict(proxy.named_parameters())
            self._proxy_weights = [proxy_params[name] for name in self._names]
            self._proxy, self._model = proxy, model
            # Plain SGD (no momentum: no state). Only the perturbed weights are stepped: the others'
            # steps (the reference takes them) are never read.
            self._proxy_optimizer = torch.optim.SGD(self._proxy_weights, lr=self.proxy_lr)
        return self._proxy

    def calc_awp(self, model, x, x_adv, y, index, epoch) -> "OrderedDict[str, torch.Tensor]":
        """The unscaled perturbation ``v`` by parameter name (``AdvWeightPerturb.calc_awp``)."""
        proxy = self._proxy_for(model)
        proxy.load_state_dict(model.state_dict())
        proxy.train()
        with torch.enable_grad():
            loss = -self.objective(proxy, x, x_adv, y, index, epoch)
            self._proxy_optimizer.zero_grad()
            loss.backward()
        self._average_proxy_gradients()
        self._proxy_optimizer.step()
        model_params = dict(model.named_parameters())
        diff = OrderedDict()
        with torch.no_grad():
            for name, new_w in zip(self._names, self._proxy_weights):
                old_w = model_params[name]
                diff_w = new_w - old_w
                diff[name] = old_w.norm() / (diff_w.norm() + AWP_EPS) * diff_w
        return diff

    def _average_proxy_gradients(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self._proxy_weights if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def perturb(self, model, diff) -> None:
        """``w <- w + gamma * v``, keeping ``w`` for ``restore``."""
        if self._saved is not None:  # a perturbation never restored: undo it first
            self.restore(model, None)
        saved = []
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in diff:
                    saved.append((param, param.detach().clone()))
                    param.add_(1.0 * self.gamma * diff[name])
        self._saved = saved

    def restore(self, model, optimizer) -> None:
        """The saved ``w`` back; for torch SGD with weight decay, the gradient gets the decay of the
        perturbation, ``weight_decay * (w_perturbed - w)``, that the reference's step (taken at the
        perturbed weights) applies."""
        saved, self._saved = self._saved, None
        if not saved:
            return
        decay = {}
        if isinstance(optimizer, torch.optim.SGD):
            for group in optimizer.param_groups:
                wd = group.get("weight_decay", 0.0)
                if wd:
                    # SGD negates the gradient under maximize, but adds the decay after that.
                    sign = -1.0 if group.get("maximize", False) else 1.0
                    for p in group["params"]:
                        decay[id(p)] = sign * wd
        with torch.no_grad():
            for param, original in saved:
                wd = decay.get(id(param), 0.0)
                if wd and param.grad is not None:
                    param.grad.add_(param - original, alpha=wd)
                param.copy_(original)

    # ------------------------------------------------------------------ the trainer's hooks
    def before_loss(self, model, x, x_adv, y, index, epoch):
        if self.active(epoch):
            self.perturb(model, self.calc_awp(model, x, x_adv, y, index, epoch))

    def before_step(self, model, optimizer, epoch):
        self.restore(model, optimizer)
