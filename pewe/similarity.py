"""Task similarity: how close each source delta is to a target task, scored on the target's dev data.

One engine and a registry of small score functions. The backbone is loaded once with the delta of the
source checkpoints attached; per source only the delta tensors are swapped. For every target (a task
folder of ``task_dir``) every source (a task folder of ``source_checkpoint_path`` holding
``checkpoint-best*.safetensors``) is scored on the target's dev split.

The scores themselves (what each computes, its direction, what it needs, its reduction and
temperature) are declared in ``pewe.scores``. GraNd modes here: ``dev`` (one score), ``block`` /
``layer`` (one score per T5 block / per sublayer site of a block, from the same backward pass,
grouping the delta parameters by module path; per batch the squares of the group norms add up to the
square of the whole). Prefix deltas are one module per stack whose parameters feed every layer at
once, so no parameter split by block exists: block and layer modes refuse prefix deltas. The
``block`` score compares each block's output by default; ``hidden_site="input"`` compares what the
block receives, the original's ``hidden_states[i]`` of transformers 4.10 (block 0 = the embeddings,
identical for every delta, so a constant file, and the last block's output never compared).

Labels: dev rows are tokenised one row per gold answer (``pewe.data.tokenize(one_row_per_answer=True)``),
so every row's label is its own answer; the original paired input i with the i-th *flattened* answer,
which misaligns every row after the first multi-answer example.

Output (the original's layout, comma separated despite .tsv): ``result.tsv`` (or
``{group}_result.tsv`` per block / site) holding, per target, a line with the target name and one
``source,score`` line per source; next to them ``scores.json`` with the metric, its
``higher_is_more_similar`` sign (for the weighting step), the options and the file list.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from delta_modules import METHODS, attach_delta, delta_named_parameters, load_delta, read_delta
from pewe.data import TextOptions, batches, first_prefix, load_split
from pewe.errors import UserError
from pewe.layout import SOURCE_PATTERN, find_checkpoint, source_checkpoints, write_similarity
from pewe.model import autocast
from pewe.scores import TokenOutputs, score_spec
from pewe.trainer import set_seed
from pewe.tuning import select_tasks

log = logging.getLogger("pewe")
GRAND_MODES = ("dev", "block", "layer")
HIDDEN_SITES = ("output", "input")


class SimilarityError(UserError):
    """A similarity request that cannot be met (bad option, missing or mismatched checkpoint)."""


# --------------------------------------------------------------------------- options

@dataclasses.dataclass
class ScoreOptions:
    num_batches: int = 1  # dev batches read by the forward scores (0 = all); the original reads the first
    batch_size: int = 50  # dev batch size (the original's similarity scripts: --predict_batch_size 50)
    grand_mode: str = "dev"  # dev, block or layer
    grand_batches: int = 10  # GraNd dev batches (0 = all); the original: 10 (dev), 5 (block / layer)
    grand_dropout: bool = True  # dropout on while taking GraNd gradients (the original: train mode)
    hidden_site: str = "output"  # block score: compare each block's output (or its input, as the original)
    max_input_length: int = 512
    max_output_length: int = 64
    truncation_side: str = "auto"
    precision: str = "fp32"
    seed: int = 42
    quiet: bool = False

    def __post_init__(self):
        if self.grand_mode not in GRAND_MODES:
            raise SimilarityError(f"--mode must be one of {', '.join(GRAND_MODES)}, not {self.grand_mode!r}")
        if self.hidden_site not in HIDDEN_SITES:
            raise SimilarityError(f"--hidden_site must be output or input, not {self.hidden_site!r}")
        for k in ("num_batches", "grand_batches"):
            if getattr(self, k) < 0:
                raise SimilarityError(f"--{k} must be >= 0 (0 = all dev batches)")
        if self.batch_size < 1:
            raise SimilarityError("--predict_batch_size must be >= 1")

    @classmethod
    def from_args(cls, a, precision, **overrides):
        """The options of an entry script's namespace (absent names keep their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: getattr(a, k) for k in names if getattr(a, k, None) is not None}
        values["batch_size"] = getattr(a, "predict_batch_size", cls.batch_size)
        values["grand_mode"] = getattr(a, "mode", cls.grand_mode)
        if getattr(a, "grand_batches", None) is None:  # the original's count for QA targets
            values["grand_batches"] = 10 if values["grand_mode"] == "dev" else 5
        values["precision"] = precision
        values.update(overrides)
        return cls(**values)


def first_batches(items, n) -> list:
    """The first ``n`` items (0 = all), as the forward scores and GraNd read dev batches."""
    return list(items) if n == 0 else list(items)[:n]


# --------------------------------------------------------------------------- grouping and hooks

_SITE = re.compile(r"^(encoder|decoder)\.block\.(\d+)\.layer\.(\d+)\.")
def grand_group(name: str, mode: str) -> str:
    """The GraNd group of a delta parameter (module path inside the stock T5): ``""`` in dev mode,
    ``encoder_block_3`` in block mode, ``decoder_block_3_layer_1`` (cross-attention) in layer mode.
    T5 layer sites: encoder 0 self-attention, 1 FFN; decoder 0 self-attention, 1 cross-attention, 2 FFN."""
    if mode == "dev":
        return ""
    m = _SITE.match(name)
    if m is None:
        raise SimilarityError(f"GraNd --mode {mode} groups delta parameters by T5 block, but {name} belongs to "
                              "no block (a prefix delta is one module per stack feeding every layer); "
                              "block and layer modes are for adapter and LoRA deltas: use --mode dev")
    stack, block, layer = m.groups()
    return f"{stack}_block_{block}" if mode == "block" else f"{stack}_block_{block}_layer_{layer}"


@contextlib.contextmanager
def capture_blocks(model, site="output"):
    """Collect every T5 block's hidden states during a forward: {"encoder_block_i": (B, T, d)}.
    ``output``: what the block returns; ``input``: what it receives (the original's hidden_states[i])."""
    store, handles = {}, []
    for stack_name, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, block in enumerate(stack.block):
            key = f"{stack_name}_block_{i}"
            if site == "output":
                hook = (lambda key: lambda mod, args, out: store.__setitem__(key, out[0]))(key)
                handles.append(block.register_forward_hook(hook))
            else:
                hook = (lambda key: lambda mod, args, kwargs: store.__setitem__(
                    key, args[0] if args else kwargs["hidden_states"]))(key)
                handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- tasks and checkpoints

def list_sources(source_path, names=()) -> dict:
    """{task: checkpoint} of ``--source_checkpoint_path`` (``pewe.layout.source_checkpoints``)."""
    if not source_path:
        raise SimilarityError(f"--source_checkpoint_path is required (a folder of {{task}}/{SOURCE_PATTERN})")
    return source_checkpoints(source_path, names)


def reference_checkpoints(path, targets) -> dict:
    """{target: checkpoint} of the deltas tuned on each target from random init (KL, block)."""
    if not path:
        raise SimilarityError("--random_tuned_ckpt_path is required for this score "
                              "(a folder of {target}/checkpoint-best*.safetensors tuned from random init)")
    return {t: find_checkpoint(Path(path) / t, SOURCE_PATTERN) for t in targets}


def check_delta_flags(config, a):
    """The original's tuning flags, where given, must describe the checkpoints' delta (catches a
    script pointed at another method's runs); the checkpoints' config is what is attached."""
    method = getattr(a, "tune_method", None)
    if method and method != config.method:
        raise SimilarityError(f"--tune_method {method}, but the source checkpoints hold {config.method} deltas")
    applied = [m for m in METHODS if getattr(a, f"apply_{m}", False)]
    if applied and applied != [config.method]:
        raise SimilarityError(f"--apply_{' --apply_'.join(applied)}, but the source checkpoints hold "
                              f"{config.method} deltas")
    for key, want in config.fields().items():
        given = getattr(a, key, None)
        if key != "method" and given is not None and given != want:
            raise SimilarityError(f"--{key} {given}, but the source checkpoints have {key} {want}")


def attach_from_sources(model, sources: dict, a=None):
    """Attach the delta described by the first source checkpoint's config; returns that config."""
    _, config, _ = read_delta(next(iter(sources.values())))
    if a is not None:
        check_delta_flags(config, a)
    attach_delta(model, config)
    return config


def load_dev_rows(task_dir, task, tokenizer, options: ScoreOptions):
    """The target's dev split, one row per gold answer (each row's label is its own answer)."""
    text = TextOptions(options.max_input_length, options.max_output_length, options.truncation_side)
    return load_split(task_dir, task, first_prefix(task_dir, task, warn=True), "dev", tokenizer, text, True)


# --------------------------------------------------------------------------- engine

@dataclasses.dataclass
class Reference:
    """The random-init-tuned target delta's outputs on one dev batch."""
    logits: torch.Tensor | None  # (N, V) float32 at the label tokens
    hidden: dict  # {block: (B, T, d) float32}


class SimilarityEngine:
    """Scores source deltas on dev batches with the delta-carrying model it is given."""

    def __init__(self, model, tokenizer, device, options: ScoreOptions, batch_sources: int = 1):
        self.model, self.tokenizer, self.device, self.options = model, tokenizer, device, options
        self.params = delta_named_parameters(model)
        if not self.params:
            raise SimilarityError("the model carries no delta to score")
        self.batch_sources = max(1, int(batch_sources))  # sources whose forward scores share one forward
        self._stacked = None

    def dev_batches(self, task_dir, task) -> list:
        rows = load_dev_rows(task_dir, task, self.tokenizer, self.options)
        return list(batches(rows, self.options.batch_size, self.tokenizer.pad_token_id))

    def _inputs(self, batch):
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}

    @staticmethod
    def _masks(inputs) -> dict:
        # encoder: real input tokens; decoder: positions with a label (decoder inputs = shifted labels)
        return {"encoder": inputs["attention_mask"].bool(), "decoder": inputs["labels"] != -100}

    @torch.no_grad()
    def forward(self, batch, capture_hidden=False):
        """One eval forward: (label-token logits (N, V) float32, labels (N,), {block: (B, T, d)}, masks)."""
        self.model.eval()
        inputs = self._inputs(batch)
        hooks = capture_blocks(self.model, self.options.hidden_site) if capture_hidden else contextlib.nullcontext({})
        with hooks as hidden, autocast(self.device, self.options.precision):
            out = self.model(**inputs, use_cache=False)
        mask = inputs["labels"] != -100
        hidden = {k: v.float() for k, v in hidden.items()}
        return out.logits.float()[mask], inputs["labels"][mask], hidden, self._masks(inputs)

    def reference(self, checkpoint, batch_list, need_logits, need_hidden) -> list:
        """The reference delta's outputs on each batch (computed once per target)."""
        load_delta(self.model, checkpoint)
        refs = []
        for batch in batch_list:
            logits, _, hidden, _ = self.forward(batch, capture_hidden=need_hidden)
            refs.append(Reference(logits if need_logits else None, hidden))
        return refs

    def forward_scores(self, batch_list, names, refs=None) -> dict:
        """Every "logits" and "hidden" score in ``names`` from ONE forward per batch of the loaded delta:
        {name: {group: value}}."""
        return self._forward_scores(batch_list, names, refs, 1)[0]

    def _forward_scores(self, batch_list, names, refs, k) -> list:
        """``forward_scores`` of k deltas at once: with k > 1 each batch is repeated k times, block j
        going through run j of the stacked deltas (``pewe.stacked``); one {name: {group: value}} per run."""
        specs = [score_spec(n) for n in names]
        if any(s.needs_reference for s in specs) and refs is None:
            raise SimilarityError(f"{', '.join(s.name for s in specs if s.needs_reference)} need the reference outputs")
        capture = any(s.kind == "hidden" for s in specs)
        totals = [{s.name: {} for s in specs} for _ in range(k)]
        n_tokens = 0
        for i, batch in enumerate(batch_list):
            if k == 1:
                outputs = [self.forward(batch, capture_hidden=capture)]
            else:
                rows = len(batch["input_ids"])
                big = {key: batch[key].repeat(k, 1) for key in ("input_ids", "attention_mask", "labels")}
                with self._stacked.rows(range(k), [rows] * k):
                    logits, labels, hidden, masks = self.forward(big, capture_hidden=capture)
                n = len(labels) // k  # the label tokens of one copy of the batch (rows come block by block)
                outputs = [(logits[j * n:(j + 1) * n], labels[j * n:(j + 1) * n],
                            {b: h[j * rows:(j + 1) * rows] for b, h in hidden.items()},
                            {m: v[j * rows:(j + 1) * rows] for m, v in masks.items()}) for j in range(k)]
            n_tokens += len(outputs[0][1])
            ref = refs[i] if refs is not None else None
            for out, (logits, labels, hidden, masks) in zip(totals, outputs):
                tokens = TokenOutputs(logits, labels, ref.logits if ref is not None else None)
                for s in specs:
                    if s.kind == "logits":
                        _add(out[s.name], "", float(s.fn(tokens)))
                    elif s.kind == "hidden":
                        for block, h in hidden.items():
                            mask = masks[block.split("_", 1)[0]]
                            _add(out[s.name], block, float(s.fn(h, ref.hidden[block], mask)))
                    else:
                        raise SimilarityError(f"{s.name} is a {s.kind} score, not a forward score")
        for out in totals:
            for s in specs:
                if s.reduction == "mean":
                    out[s.name] = {g: v / max(n_tokens, 1) for g, v in out[s.name].items()}
        return totals

    def group_sq_norms(self, batch, mode) -> dict:
        """Backward of one batch's loss; {group: squared L2 norm of the group's delta gradient}."""
        for _, p in self.params:
            p.grad = None
        with autocast(self.device, self.options.precision):
            loss = self.model(**self._inputs(batch), use_cache=False).loss  # token mean over the batch
        loss.backward()
        zero = torch.zeros((), device=self.device)
        sq = torch.stack([p.grad.double().pow(2).sum() if p.grad is not None else zero.double()
                          for _, p in self.params]).tolist()  # one device sync for all parameters
        out = {}
        for (name, _), v in zip(self.params, sq):
            _add(out, grand_group(name, mode), v)
        for _, p in self.params:
            p.grad = None
        return out

    def grand_scores(self, batch_list, mode, spec_name="GraNd") -> dict:
        """{group: GraNd} of the loaded delta over ``batch_list``."""
        self.model.train(self.options.grand_dropout)
        torch.manual_seed(self.options.seed)  # the same dropout masks for every source: repeatable
        try:
            per_batch = [self.group_sq_norms(b, mode) for b in batch_list]
        finally:
            self.model.eval()
        return score_spec(spec_name).fn(per_batch)

    def score_source(self, checkpoint, metrics, fwd_batches, grad_batches, refs=None) -> dict:
        """Load a source delta and compute every requested score: {metric: {group: value}}."""
        return self.score_sources([checkpoint], metrics, fwd_batches, grad_batches, refs)[0]

    def score_sources(self, checkpoints, metrics, fwd_batches, grad_batches, refs=None) -> list:
        """``score_source`` for several source deltas: their forward scores from one stacked forward
        per batch (``pewe.stacked``); GraNd one source at a time, since every source must see the same
        dropout masks (one forward of stacked copies would draw other masks for each)."""
        specs = [score_spec(m) for m in metrics]
        forward = [s.name for s in specs if s.kind != "grad"]
        k = len(checkpoints)
        if k == 1:
            load_delta(self.model, checkpoints[0])
        elif forward:
            if self._stacked is None or self._stacked.k < k:
                from pewe.stacked import StackedDeltas  # noqa: PLC0415 (only batched sources need it)

                self._stacked = StackedDeltas(self.model, k)
            for j, ckpt in enumerate(checkpoints):
                self._stacked.load_file(j, ckpt)
        outs = self._forward_scores(fwd_batches, forward, refs, k) if forward else [{} for _ in checkpoints]
        for ckpt, out in zip(checkpoints, outs):
            for s in specs:
                if s.kind == "grad":
                    if k > 1:
                        load_delta(self.model, ckpt)
                    out[s.name] = self.grand_scores(grad_batches, self.options.grand_mode, s.name)
        return outs

    def score_tasks(self, targets, task_dir, sources: dict, metrics, references=None, on_target=None) -> dict:
        """Score every source on every target: {metric: {group: {target: {source: value}}}}.
        ``references``: {target: checkpoint} for scores that need one; ``on_target(results)`` is called
        after each target (to write files as the run goes)."""
        specs = [score_spec(m) for m in metrics]
        needs_ref = [s for s in specs if s.needs_reference]
        if needs_ref and references is None:
            raise SimilarityError(f"{', '.join(s.name for s in needs_ref)} need --random_tuned_ckpt_path")
        if any(s.kind == "grad" for s in specs) and self.options.grand_mode != "dev":
            for name, _ in self.params:  # refuse an impossible grouping before any work
                grand_group(name, self.options.grand_mode)
        results = {s.name: {} for s in specs}
        bar = tqdm(total=len(targets) * len(sources), desc="similarity", disable=self.options.quiet,
                   dynamic_ncols=True)
        for target in targets:
            all_batches = self.dev_batches(task_dir, target)
            fwd = first_batches(all_batches, self.options.num_batches)
            grad = first_batches(all_batches, self.options.grand_batches)
            refs = None
            if needs_ref:
                refs = self.reference(references[target], fwd, any(s.kind == "logits" for s in needs_ref),
                                      any(s.kind == "hidden" for s in needs_ref))
            names = list(sources)
            for start in range(0, len(names), self.batch_sources):
                chunk = names[start:start + self.batch_sources]
                bar.set_postfix_str(f"{target} <- {chunk[0]}" + (f" (+{len(chunk) - 1})" if len(chunk) > 1 else ""))
                scored = self.score_sources([sources[s] for s in chunk], metrics, fwd, grad, refs)
                for source, got in zip(chunk, scored):
                    for name, groups in got.items():
                        for group, value in groups.items():
                            results[name].setdefault(group, {}).setdefault(target, {})[source] = value
                bar.update(len(chunk))
            log.info("%s: scored %d sources (%s)", target, len(sources), ", ".join(metrics))
            if on_target is not None:
                on_target(results)
        bar.close()
        return results


def _add(d, key, value):
    d[key] = d.get(key, 0.0) + value


def write_results(out_dir, metric, groups: dict, options: ScoreOptions, extra=None) -> list:
    """The similarity folder of one score (``pewe.layout.write_similarity``) with the options used."""
    spec = score_spec(metric)
    return write_similarity(out_dir, metric, groups, higher_is_more_similar=spec.higher_is_more_similar,
                            reduction=spec.reduction, options=dataclasses.asdict(options), **(extra or {}))


# --------------------------------------------------------------------------- entry glue

def run_similarity(a, model, tokenizer, device, precision, metrics, **option_overrides) -> dict:
    """What every ``get_similarity/get_*.py`` runs: score and write. One metric writes into
    ``a.output_dir``; several write into ``a.output_dir/{metric}`` from the same forward passes.
    Returns {metric: output folder}."""
    specs = [score_spec(m) for m in metrics]
    options = ScoreOptions.from_args(a, precision, **option_overrides)
    set_seed(options.seed)
    sources = list_sources(a.source_checkpoint_path, getattr(a, "source_tasks", ()))
    targets = select_tasks(a.task_dir, getattr(a, "tasks", ()))
    config = attach_from_sources(model, sources, a)
    references = None
    if any(s.needs_reference for s in specs):
        references = reference_checkpoints(getattr(a, "random_tuned_ckpt_path", None), targets)
    engine = SimilarityEngine(model, tokenizer, device, options)
    out = Path(a.output_dir)
    out_dirs = {m: out if len(metrics) == 1 else out / m for m in metrics}
    extra = {"delta": config.fields(), "model": str(a.model), "task_dir": str(a.task_dir),
             "source_checkpoint_path": str(a.source_checkpoint_path), "sources": list(sources)}
    if references is not None:
        extra["random_tuned_ckpt_path"] = str(a.random_tuned_ckpt_path)
    log.info("%s delta; %d targets x %d sources; scores %s", config.method, len(targets), len(sources),
             ", ".join(metrics))

    def write(results):
        for m, groups in results.items():
            write_results(out_dirs[m], m, groups, options, extra)

    engine.score_tasks(targets, a.task_dir, sources, metrics, references, on_target=write)
    for m, d in out_dirs.items():
        print(f"{m}: {d / 'scores.json'}")
    return out_dirs
