"""K deltas of one config on one shared backbone, in one forward: lockstep training and decoding.

The model carries one delta (``delta_modules.attach_delta``). ``StackedDeltas`` holds, for every
delta parameter of that model, one leaf tensor of shape (K, *shape): slice k is run k's parameter.
Inside ``with stacked.rows(runs, sizes)`` the model's delta modules compute with these stacked
tensors instead of their own: the batch is a concatenation of blocks, block j (``sizes[j]`` rows, in
order) belonging to run ``runs[j]``, and each row goes through its own run's delta:

- adapter and LoRA: one batched matmul over the blocks (``torch.matmul`` of (K, rows x tokens, d)
  by (K, d, r)) when the blocks have the same size, else one matmul per block;
- prefix: the K prefix MLPs in one batched matmul, then each row gets its own run's keys and values
  (the per-row (2, B, H, P, d_kv) that ``delta_modules.prefix_attention`` prepends).

Rows of different runs never mix (T5 has no batch statistics), so a run's outputs in a stacked
batch are its outputs alone, up to float rounding where padding to a longer row changes how a
reduction is blocked. Outside the context the model is untouched: its own delta is used (the K = 1
path of the trainer), and serves as a scratch buffer for loading files into a slice
(``load_file`` / ``load_state`` go through ``delta_modules``' checks).

``StackedAdafactor`` is transformers' Adafactor as ``pewe.trainer.make_optimizer`` configures it,
applied to the K slices at once with every statistic per run: the step counts, the factored
second moments, the update-RMS clipping, the learning rate; ``clip_grad_norms`` is
``torch.nn.utils.clip_grad_norm_`` per run. Their state per run is exactly the per-parameter state
of transformers' Adafactor, so a run's resume file is the same whether it ran stacked or alone.
"""
from __future__ import annotations

import contextlib
import math

import torch

from delta_modules import DELTA_TYPES, LoRA, Prefix, delta_named_parameters, load_delta, load_delta_state

# Adafactor's settings in pewe.trainer.make_optimizer (transformers' defaults besides lr and the flags)
ADAFACTOR_EPS = (1e-30, 1e-3)
ADAFACTOR_CLIP = 1.0
ADAFACTOR_DECAY = -0.8


def _per_run_matmul(x, w, sizes):
    """Rows of block j of ``x`` (B, ..., i) times ``w[j]`` (i, o): (B, ..., o)."""
    if len(set(sizes)) == 1:  # equal blocks: one batched matmul over (K, rows x tokens, i)
        y = torch.matmul(x.reshape(len(sizes), -1, x.shape[-1]), w)
        return y.reshape(*x.shape[:-1], w.shape[-1])
    return torch.cat([xb @ w[j] for j, xb in enumerate(x.split(list(sizes)))], dim=0)


def _per_row(t, sizes):
    """``t`` (K, ...) repeated to one entry per row: (B, ...), block j taking ``t[j]``."""
    if len(set(sizes)) == 1:
        return t.unsqueeze(1).expand(t.shape[0], sizes[0], *t.shape[1:]).reshape(-1, *t.shape[1:])
    return torch.repeat_interleave(t, torch.tensor(list(sizes), device=t.device), dim=0)


class StackedDeltas:
    """K runs' deltas for the delta carried by ``model``: ``params[name]`` is a (K, *shape) leaf."""

    def __init__(self, model, k: int):
        if k < 1:
            raise ValueError(f"need at least one run, not {k}")
        own = delta_named_parameters(model)
        if not own:
            raise ValueError("the model carries no delta to stack")
        self.model, self.k = model, k
        self.names = [n for n, _ in own]
        self.params = {n: torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device, requires_grad=True)
                       for n, p in own}
        # every delta module, with the stacked tensors of its own parameters by local name
        self.modules = [(module, {local: self.params[f"{path}.{local}"] for local, _ in module.named_parameters()})
                        for path, module in model.named_modules() if isinstance(module, DELTA_TYPES)]
        self._layout = None  # (runs, sizes) while a forward is inside rows()
        self._taken = {}  # id(stacked tensor) -> its slices of the runs in the layout, once per rows()

    # ----------------------------------------------------------------------- per-run state

    def parameters(self) -> list:
        return [self.params[n] for n in self.names]

    def state(self, k) -> dict:
        """Run k's delta tensors (views of the stacked parameters), named as ``delta_state_dict``'s."""
        return {n: self.params[n][k].detach() for n in self.names}

    def load_state(self, k, tensors: dict, where="delta"):
        """Copy a delta state into run k (checked as ``load_delta_state`` checks it)."""
        load_delta_state(self.model, tensors, where=where)
        self.copy_from_model(k)

    def load_file(self, k, path) -> dict:
        """Load a delta checkpoint into run k (checked as ``load_delta`` checks it); its meta."""
        meta = load_delta(self.model, path)
        self.copy_from_model(k)
        return meta

    def copy_from_model(self, k):
        """Run k takes the delta the model itself carries."""
        with torch.no_grad():
            for n, p in delta_named_parameters(self.model):
                self.params[n][k].copy_(p)

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None

    # ----------------------------------------------------------------------- the stacked forward

    @contextlib.contextmanager
    def rows(self, runs, sizes):
        """Forwards inside this context send block j of every batch (``sizes[j]`` rows) through run
        ``runs[j]``'s delta. The model's delta modules are patched for its duration only."""
        runs, sizes = [int(r) for r in runs], [int(s) for s in sizes]
        if len(runs) != len(sizes) or not runs or any(s < 1 for s in sizes) or not all(0 <= r < self.k for r in runs):
            raise ValueError(f"bad row layout: runs {runs}, sizes {sizes} (of {self.k} runs)")
        if self._layout is not None:
            raise RuntimeError("rows() is already active")
        self._layout, self._taken = (runs, sizes), {}
        for module, stacked in self.modules:
            if isinstance(module, Prefix):
                module.compute = _bind(self._prefix_compute, module, stacked)
                module.layer_kv = _bind(self._prefix_layer_kv, module, stacked)
            elif isinstance(module, LoRA):
                module.forward = _bind(self._lora_forward, module, stacked)
            else:
                module.forward = _bind(self._adapter_forward, module, stacked)
        try:
            yield self
        finally:
            for module, _ in self.modules:
                for name in ("compute", "layer_kv", "forward"):
                    if name in module.__dict__:
                        delattr(module, name)  # back to the class's own method
                if isinstance(module, Prefix):
                    module._kv = None
            self._layout, self._taken = None, {}

    def _take(self, t):
        """The layout's runs' slices of a stacked tensor (K, ...) -> (blocks, ...), once per rows()."""
        key = id(t)
        if key not in self._taken:
            runs = self._layout[0]
            if runs == list(range(self.k)):
                self._taken[key] = t
            else:
                self._taken[key] = t.index_select(0, torch.tensor(runs, device=t.device))
        return self._taken[key]

    def _adapter_forward(self, module, stacked, h):
        # as Adapter.forward: act(h @ down) @ up, per block with its run's matrices
        sizes = self._layout[1]
        down, up = self._take(stacked["down"]).to(h.dtype), self._take(stacked["up"]).to(h.dtype)
        return _per_run_matmul(module.act(_per_run_matmul(h, down, sizes)), up, sizes)

    def _lora_forward(self, module, stacked, x):
        # as LoRA.forward: (x A^T B^T) * scale
        sizes = self._layout[1]
        a = self._take(stacked["A"]).to(x.dtype).transpose(1, 2)  # (K, in, r)
        b = self._take(stacked["B"]).to(x.dtype).transpose(1, 2)  # (K, r, out)
        return _per_run_matmul(_per_run_matmul(x, a, sizes), b, sizes) * module.scale

    def _prefix_compute(self, module, stacked):
        # as Prefix.compute, for every block's run: (K, L, 2, H, P, d_kv)
        emb = self._take(stacked["embedding"])  # (K, P, d_model)
        down = self._take(stacked["down.weight"])  # (K, r, d_model)
        up = self._take(stacked["up.weight"])  # (K, L*2*H*d_kv, r)
        dtype = torch.get_autocast_dtype(emb.device.type) if torch.is_autocast_enabled(emb.device.type) else emb.dtype
        hidden = torch.tanh(torch.matmul(emb.to(dtype), down.to(dtype).transpose(1, 2)))
        return torch.matmul(hidden, up.to(dtype).transpose(1, 2)).view(emb.shape[0], *module.shape)

    def _prefix_layer_kv(self, module, stacked, layer_idx):
        kv = module._kv if module._kv is not None else self._prefix_compute(module, stacked)
        per_block = kv[:, layer_idx]  # (K, 2, H, P, d_kv)
        return _per_row(per_block, self._layout[1]).transpose(0, 1)  # (2, B, H, P, d_kv)


def _bind(fn, module, stacked):
    return lambda *args: fn(module, stacked, *args)


# --------------------------------------------------------------------------- per-run optimisation

def _per_run(values, t):
    """A python float when every run has the same value (the scalar ops transformers' Adafactor
    runs), else a float32 tensor shaped to broadcast over ``t`` (K, ...)."""
    if len(set(values)) == 1:
        return float(values[0])
    return torch.tensor(values, dtype=torch.float32, device=t.device).view(-1, *([1] * (t.dim() - 1)))


def _add_scaled_(t, other, factor):
    if isinstance(factor, float):
        return t.add_(other, alpha=factor)
    return t.add_(other * factor)


def _rms(t):
    """Per run: ||t[k]|| / sqrt(numel of t[k]), shape (K,)."""
    return torch.linalg.vector_norm(t.flatten(1), 2, dim=1) / (t[0].numel() ** 0.5)


class StackedAdafactor:
    """Adafactor(lr, scale_parameter=False, relative_step=False, warmup_init=False) on every slice
    k of the stacked parameters as if each run had its own optimizer (transformers' ``step``,
    computed for the K runs at once): per run its step count, its factored second moments (or the
    full one for a 1-D parameter), its update RMS clipping and its learning rate."""

    def __init__(self, params: list, lrs):
        self.params = list(params)
        self.lrs = [float(x) for x in lrs]
        self.k = len(self.lrs)
        self.state = []
        for p in self.params:
            shape = p.shape[1:]
            st = {"step": [0] * self.k, "RMS": torch.zeros(self.k, dtype=torch.float32, device=p.device)}
            if len(shape) >= 2:
                st["exp_avg_sq_row"] = torch.zeros((self.k, *shape[:-1]), dtype=torch.float32, device=p.device)
                st["exp_avg_sq_col"] = torch.zeros((self.k, *shape[:-2], shape[-1]), dtype=torch.float32,
                                                   device=p.device)
            else:
                st["exp_avg_sq"] = torch.zeros((self.k, *shape), dtype=torch.float32, device=p.device)
            self.state.append(st)

    @torch.no_grad()
    def step(self, runs):
        """One update of the runs ``runs`` (indices); the other slices and their state stay as they are."""
        runs = sorted(int(r) for r in runs)
        if not runs:
            return
        every = runs == list(range(self.k))
        idx = None if every else torch.tensor(runs, device=self.params[0].device)
        lrs = [self.lrs[r] for r in runs]
        for p, st in zip(self.params, self.state):
            if p.grad is None:
                continue
            moments = [k for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq") if k in st]
            grad = p.grad if every else p.grad.index_select(0, idx)
            grad = grad.float()
            data = p.data if every else p.data.index_select(0, idx)
            mom = {k: (st[k] if every else st[k].index_select(0, idx)) for k in moments}
            for r in runs:
                st["step"][r] += 1
            steps = [st["step"][r] for r in runs]
            rms = _rms(data.float())
            betas = [1.0 - math.pow(s, ADAFACTOR_DECAY) for s in steps]
            rest = [1.0 - b for b in betas]
            update = grad ** 2 + ADAFACTOR_EPS[0]
            if "exp_avg_sq_row" in mom:
                row, col = mom["exp_avg_sq_row"], mom["exp_avg_sq_col"]
                _add_scaled_(row.mul_(_per_run(betas, row)), update.mean(dim=-1), _per_run(rest, row))
                _add_scaled_(col.mul_(_per_run(betas, col)), update.mean(dim=-2), _per_run(rest, col))
                r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
                c_factor = col.unsqueeze(-2).rsqrt()
                update = torch.mul(r_factor, c_factor)
                update.mul_(grad)
            else:
                sq = mom["exp_avg_sq"]
                _add_scaled_(sq.mul_(_per_run(betas, sq)), update, _per_run(rest, sq))
                update = sq.rsqrt().mul_(grad)
            clip = (_rms(update) / ADAFACTOR_CLIP).clamp_(min=1.0)
            update.div_(clip.view(-1, *([1] * (update.dim() - 1))))
            update.mul_(_per_run(lrs, update))
            data.add_(-update)
            if every:
                st["RMS"].copy_(rms)
            else:
                p.data.index_copy_(0, idx, data)
                st["RMS"].index_copy_(0, idx, rms)
                for k in moments:
                    st[k].index_copy_(0, idx, mom[k])

    # ----------------------------------------------------------------------- per-run state, in transformers' format

    def run_state(self, k) -> list:
        """Run k's state as transformers' Adafactor keeps it: one dict per parameter (``{}`` before
        the first update), ``step`` an int, ``RMS`` a 0-d tensor, the moments tensors."""
        out = []
        for st in self.state:
            if st["step"][k] == 0:
                out.append({})
                continue
            d = {"step": st["step"][k]}
            for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                if key in st:
                    d[key] = st[key][k]
            d["RMS"] = st["RMS"][k]
            out.append(d)
        return out

    def load_run_state(self, k, states: list):
        """Set run k's state from transformers' per-parameter format (``run_state``'s)."""
        with torch.no_grad():
            for st, d in zip(self.state, states):
                st["step"][k] = int(d.get("step", 0))
                for key, v in d.items():
                    if key == "step":
                        continue
                    if key not in st:
                        raise ValueError(f"optimizer state {key} does not fit this parameter")
                    st[key][k].copy_(torch.as_tensor(v, dtype=torch.float32))


@torch.no_grad()
def clip_grad_norms(params: list, max_norm: float, runs) -> list:
    """``torch.nn.utils.clip_grad_norm_`` for each run on its own slices: run k's gradients are scaled
    by min(1, max_norm / (||g_k|| + 1e-6)), ||g_k|| the 2-norm over all of run k's parameters.
    Returns the norms of ``runs``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return [0.0 for _ in runs]
    per_param = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads])  # (params, K)
    total = torch.linalg.vector_norm(per_param, 2, dim=0)  # (K,)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return total[list(runs)].tolist()
