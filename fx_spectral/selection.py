"""Which weights ``constrain()`` projects: the selection rules and the :class:`Target` records.

* default selection (:func:`default_names`): the ``weight`` of every default-selected kind
  (:mod:`fx_spectral.kinds`: Linear / Conv / ConvTranspose), no output heads (:data:`HEAD_NAMES`);
* glob patterns (:func:`match`: only ``*`` and ``?`` are wildcards) for ``include`` / ``exclude``,
  per-weight ``w_max`` dicts and ``track_activations``;
* the owner of each parameter's optimizer state (TorchTitan's optimizer containers too);
* ``filter_fn``'s move from the parameter fqn to the module fqn (one release of both spellings);
* :func:`select_targets`: all of the above, checked, as the list of :class:`Target` a
  :class:`~fx_spectral.constraint.Constraint` handle projects.

Nothing here modifies a model or an optimizer.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from fx_spectral.coupling import is_muon_group
from fx_spectral.kinds import default_dim, default_selected, weight_matrix
from fx_spectral.methods import Method, SoftCap

__all__ = [
    "HEAD_NAMES",
    "Target",
    "activation_modules",
    "default_names",
    "is_dtensor",
    "match",
    "matrices",
    "select_targets",
]

HEAD_NAMES = frozenset({"lm_head", "head", "output"})


@dataclass
class Target:
    """One projected parameter of a :class:`Constraint` handle (``handle.targets``).

    ``fqn``: the parameter's name; ``module``: the module owning it; ``dim``: its output dim;
    ``w_max``: its cap per projected piece (key None: the whole weight as one matrix; a string
    key: a sub-view of a split weight); ``group``: its optimizer param group (looked up live);
    ``name(key)``: ``fqn`` or ``fqn[key]``. Read-only by convention: the handle owns it.
    """

    fqn: str
    module: nn.Module
    param: nn.Parameter
    dim: int
    optimizer: torch.optim.Optimizer  # the optimizer that owns the param's state
    group_index: int
    w_max: dict  # sub-view key (None: the whole weight) -> w_max

    @property
    def group(self) -> dict:
        # Looked up at every use: load_state_dict() replaces the param-group dicts, and
        # schedulers change their lr in place.
        return self.optimizer.param_groups[self.group_index]

    def name(self, key: str | None) -> str:
        return self.fqn if key is None else f"{self.fqn}[{key}]"


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern:
    # Only * (any run of characters, dots included) and ? are wildcards; everything else, brackets
    # too, is literal, so "layers.*.wqkv.weight[q]" names a split sub-view.
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def match(name: str, pattern: str) -> bool:
    """Whether parameter or module name ``name`` matches glob ``pattern`` (only ``*``, which also
    crosses dots, and ``?`` are wildcards; brackets are literal: ``"wqkv.weight[q]"``)."""
    return _glob(pattern).fullmatch(name) is not None


def _owners(model: nn.Module) -> dict[int, tuple[str, list[tuple[str, nn.Module]]]]:
    # id(param) -> (fqn as named_parameters spells it, [(module fqn, module) for every owner])
    owners: dict[int, tuple[str, list]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod._parameters.items():
            if p is None:
                continue
            fqn = f"{mod_name}.{pname}" if mod_name else pname
            entry = owners.setdefault(id(p), (fqn, []))
            entry[1].append((mod_name, mod, pname))
    return owners


def _default_selected(owners_of_p: list) -> bool:
    return default_selected(owners_of_p, HEAD_NAMES)


def default_names(model: nn.Module) -> list[str]:
    """The parameter FQNs ``constrain(model, optimizer)`` selects when ``include`` is not given.

    A parameter is selected if every module holding it is of a default-selected kind
    (:mod:`fx_spectral.kinds`: Linear, Conv1-3d, ConvTranspose1-3d and their Lazy variants), holds it
    as ``weight`` and is not named like an output head (:data:`HEAD_NAMES`). In ``named_parameters`` order.

    Example::

        >>> default_names(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))
        ['0.weight', '2.weight']
    """
    owners = _owners(model)
    return [fqn for fqn, p in model.named_parameters() if _default_selected(owners[id(p)][1])]


def _patterns(value: str | Iterable[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"constrain: {what} must be a glob pattern or a list of them, got {value!r}")
    return patterns


def _param_owner(optimizer: torch.optim.Optimizer) -> dict[int, tuple[torch.optim.Optimizer, int]]:
    # id(param) -> (optimizer owning its state, index of its param group). A container with an
    # ``optimizers`` list (TorchTitan's OptimizersContainer) keeps state in its members.
    members = getattr(optimizer, "optimizers", None)
    members = [o for o in members if isinstance(o, torch.optim.Optimizer)] if isinstance(members, (list, tuple)) else []
    out = {}
    for opt in members or [optimizer]:
        for index, group in enumerate(opt.param_groups):
            for p in group["params"]:
                out[id(p)] = (opt, index)
    return out


def _resolve_w_max(w_max, name: str, parent: str) -> float:
    if not isinstance(w_max, Mapping):
        return float(w_max)
    if name in w_max:
        return float(w_max[name])
    for pattern, value in w_max.items():
        if match(name, pattern) or (name != parent and match(parent, pattern)):
            return float(value)
    raise ValueError(f"constrain: no w_max pattern matches {name!r}; patterns: {list(w_max)} (add a '*' entry)")


def _check_w_max(w_max) -> None:
    values = w_max.values() if isinstance(w_max, Mapping) else [w_max]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(
                f"constrain: w_max must be > 0 (a float or a dict of glob pattern -> float), got {w_max!r}"
            )
    if isinstance(w_max, Mapping) and not all(isinstance(k, str) for k in w_max):
        raise TypeError(f"constrain: w_max dict keys must be glob patterns (str), got {list(w_max)}")


def matrices(t: Target, split) -> Iterable[tuple[str | None, Tensor, Callable[[Tensor], None]]]:
    """(key, 2-D matrix, write-back) for each projected piece of a target's parameter."""
    p = t.param
    views = split(t.fqn, p) if split is not None else None
    if views is None:
        if t.dim == 0:
            yield None, weight_matrix(p, 0), lambda Y: p.copy_(Y.view(p.shape))  # NB: in place
        else:
            moved = p.movedim(t.dim, 0).shape
            yield None, weight_matrix(p, t.dim), lambda Y: p.copy_(Y.reshape(moved).movedim(0, t.dim))  # NB: in place
        return
    for key, view in views.items():
        yield (
            key,
            view.reshape(-1, view.shape[-1]),
            (lambda Y, view=view: view.copy_(Y.reshape(view.shape))),
        )  # NB: in place


def is_dtensor(p: Tensor) -> bool:
    """Whether ``p`` is a DTensor (FSDP2 / tensor parallel); False where torch has no distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(p, DTensor)


def select_targets(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Method,
    *,
    w_max: float | Mapping[str, float],
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
    filter_fn: Callable[[nn.Module, str], bool] | None,
    split: Callable[[str, Tensor], Mapping[str, Tensor] | None] | None,
    active: Mapping,
) -> list[Target]:
    """The weights :func:`~fx_spectral.constraint.constrain` projects, checked (its arguments' meaning).

    ``active`` maps an optimizer to ``{id(param): weakref to the live handle projecting it}``: a
    weight a live handle already projects for the same optimizer is refused.

    Raises:
        ValueError / TypeError (nothing is registered yet): ``w_max <= 0``, a pattern that matches
        nothing, a selected weight that is not a matrix or is uninitialized, a soft cap without a
        way to get the max update norm, nothing selected, a weight already constrained.
    """
    _check_w_max(w_max)
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"constrain: filter_fn must be callable(module, fqn) -> bool, got {filter_fn!r}")
    if split is not None and not callable(split):
        raise TypeError(f"constrain: split must be callable(fqn, param) -> dict | None, got {split!r}")
    includes, excludes = _patterns(include, "include"), _patterns(exclude, "exclude")

    owners = _owners(model)
    all_fqns = [fqn for fqn, _ in owners.values()]
    for what, pats in (("include", includes), ("exclude", excludes)):
        for pat in pats:
            if not any(match(f, pat) for f in all_fqns):
                raise ValueError(f"constrain: {what} pattern {pat!r} matches no parameter of the model")
    in_optimizer = _param_owner(optimizer)

    targets: list[Target] = []
    filter_changes: list[str] = []  # parameters whose filter_fn answer depends on the fqn's spelling
    for mod_name_params in model.named_parameters():
        fqn, p = mod_name_params
        _, owner_list = owners[id(p)]
        selected = any(match(fqn, pat) for pat in includes) if includes else _default_selected(owner_list)
        if not selected or any(match(fqn, pat) for pat in excludes):
            continue
        module_fqn, module = owner_list[0][0], owner_list[0][1]
        if filter_fn is not None and not _filter_keeps(filter_fn, module, module_fqn, fqn, filter_changes):
            continue
        if id(p) not in in_optimizer:
            continue  # not updated by this optimizer
        if is_lazy(p):
            raise ValueError(
                f"constrain: {fqn!r} is an uninitialized (Lazy module) parameter; run one forward pass first"
            )
        if p.ndim < 2:
            raise ValueError(
                f"constrain: selected parameter {fqn!r} has shape {tuple(p.shape)}, not a matrix; "
                "select weights only (e.g. include='*.weight' or exclude='*.bias')"
            )
        if p.numel() == 0:
            continue  # an empty matrix: nothing to cap (plain torch steps it as a no-op too)
        opt, group_index = in_optimizer[id(p)]
        other = active.get(opt, {}).get(id(p))
        if other is not None and other() is not None:
            raise ValueError(
                f"constrain: {fqn!r} is already constrained for this optimizer ({type(opt).__name__}) by "
                f"{other()!r}; a second constrain() would project it twice after every step. Call "
                "remove() on that handle first, or select disjoint weights (include=/exclude=)"
            )
        t = Target(fqn, module, p, default_dim(module), opt, group_index, {})
        group = t.group
        # A DTensor is split as a meta tensor of its global shape (views of shards are not needed here).
        probe = torch.empty(p.shape, dtype=p.dtype, device="meta") if is_dtensor(p) else p
        views = split(fqn, probe) if split is not None else None
        if views is not None:
            if not isinstance(views, Mapping) or not views:
                raise TypeError(
                    f"constrain: split({fqn!r}, param) must return a non-empty dict of views or None, "
                    f"got {type(views).__name__}"
                )
            for key, view in views.items():
                if not isinstance(view, Tensor) or view.ndim < 2:
                    raise ValueError(f"constrain: split({fqn!r}) view {key!r} must be a tensor with >= 2 dims")
        for key in views if views is not None else [None]:
            t.w_max[key] = _resolve_w_max(w_max, t.name(key), fqn)
        if isinstance(cfg, SoftCap) and cfg.alpha is None and cfg.max_update_norm is None and not is_muon_group(group):
            raise ValueError(
                f"constrain: soft_cap with alpha=None couples alpha to the optimizer's max update norm, known "
                f"for torch.optim.Muon only; {type(opt).__name__} updates {fqn!r}: pass max_update_norm= "
                "(RMS→RMS units) or alpha="
            )
        targets.append(t)
    if filter_changes:
        _warn_filter_changes(filter_changes)
    if not targets:
        raise ValueError(
            "constrain: no weight selected (default: Linear/Conv weights the optimizer updates, no heads; "
            "zero-size weights are skipped); check include/exclude/filter_fn and that the optimizer holds the weights"
        )
    if isinstance(w_max, Mapping):
        names = [t.name(k) for t in targets for k in t.w_max]
        for pat in w_max:
            if not any(n == pat or match(n, pat) for n in names + [t.fqn for t in targets]):
                raise ValueError(f"constrain: w_max pattern {pat!r} matches no selected weight; selected: {names[:8]}…")
    return targets


def _filter_keeps(filter_fn: Callable, module: nn.Module, module_fqn: str, param_fqn: str, changes: list) -> bool:
    """``filter_fn``'s answer for one parameter, during the move of its second argument to the module fqn.

    The answer for the parameter fqn (the old meaning) is the one used; the module-fqn answer is
    only compared with it. Where they differ, or the module spelling raises (a filter that parses
    parameter paths), ``param_fqn`` (with both answers) is appended to ``changes`` (NB: mutated in
    place) for :func:`_warn_filter_changes`.
    """
    keep = bool(filter_fn(module, param_fqn))
    try:
        new = repr(bool(filter_fn(module, module_fqn)))
    except Exception as e:  # only the old spelling's answer counts this release
        new = f"raises {type(e).__name__}"
    if new != repr(keep):
        changes.append(f"{param_fqn!r} (with {param_fqn!r}: {keep}, with module {module_fqn!r}: {new})")
    return keep


def _warn_filter_changes(changes: list[str]) -> None:
    shown = "; ".join(changes[:5]) + (f"; … ({len(changes)} in all)" if len(changes) > 5 else "")
    warnings.warn(
        "constrain: filter_fn's second argument becomes the owning module's fqn, as in apply_spectral_norm, "
        f"transform and the backend (it was the parameter's fqn); your filter_fn answers differently for: {shown}. "
        "The parameter-fqn answer is used in this release. Make filter_fn give the same answer for both "
        "spellings (test the module path), or select parameters by name with include= / exclude=",
        DeprecationWarning,
        stacklevel=4,  # the caller of constrain() (via select_targets)
    )


def activation_modules(model: nn.Module, targets: list[Target], track) -> list[tuple[str, nn.Module]]:
    """The ``(fqn, module)`` pairs whose outputs ``track_activations`` records: none (False), every
    element of every ``nn.ModuleList`` (True; else the owners of the targets), or the modules whose
    names match the given glob patterns."""
    if track is False or track is None:
        return []
    named = list(model.named_modules())
    if track is True:
        blocks = [
            (f"{name}.{i}" if name else str(i), child)
            for name, mod in named
            if isinstance(mod, nn.ModuleList)
            for i, child in enumerate(mod)
        ]
        if blocks:
            return blocks
        seen, out = set(), []
        for t in targets:
            for mod_name, mod in named:
                if mod is t.module and id(mod) not in seen:
                    seen.add(id(mod))
                    out.append((mod_name, mod))
        return out
    patterns = _patterns(track, "track_activations")
    out = [(n, m) for n, m in named if n and any(match(n, p) for p in patterns)]
    if not out:
        raise ValueError(f"constrain: track_activations patterns {list(patterns)} match no module")
    return out


# The former private names in fx_spectral.constrain (not deprecated).
_match, _matrices, _is_dtensor, _activation_modules = match, matrices, is_dtensor, activation_modules
