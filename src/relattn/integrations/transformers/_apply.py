"""``apply(model)``: point a transformers model's attention layers at relattn.

How it hooks in (transformers 5.24 and 5.25):

- each attention layer's class is swapped for a subclass (same name) whose ``forward`` is the
  one in ``_forwards``, called with the arguments the installed version's ``forward`` declares
  (see :func:`_fit_forward`); parameters, buffers and ``state_dict`` are untouched;
- the model-level method that builds the ALiBi tensor (BLOOM, MPT) is replaced by one that
  builds nothing, and Falcon's model is told not to build one (its layers bring their own);
  Inkling2's text models run with their dense relative-distance grid switched off (``_inkling``);
- every config of the model gets ``_attn_implementation = "relattn"``, a name registered with
  transformers' ``AttentionMaskInterface`` only, whose mask function hands the layers the
  ``(B, Nk)`` key padding mask instead of an N×N mask.

"relattn" is deliberately not registered with ``AttentionInterface``: T5 builds its bias before
that interface is reached and BLOOM, MPT and Falcon never call it, so the name alone cannot run
these models without the N×N bias. Unregistered, ``from_pretrained(attn_implementation=
"relattn")`` is refused by transformers itself instead of running eager layers on a key padding
mask.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import _forwards, _inkling
from ._encodings import (
    SharedT5Bias,
    SlopesALiBi,
    bloom_alibi_slopes,
    falcon_alibi_slopes,
    mpt_alibi_slopes,
)

NAME = "relattn"
#: The transformers versions this integration accepts: [low, high).
TESTED_RANGE = ("5.24", "6")
#: The releases the test suite ran on (``make test`` pins one, ``make test`` also runs the
#: transformers tests on the range's floor, ``make test-latest`` on the newest).
CHECKED_VERSIONS = ("5.24.0", "5.25.0")

# The subclasses made so far, by original class and overrides (so a model applied twice, or
# two models of one family, share one subclass), and the fitted forwards by original forward.
_SWAPPED: dict[tuple, type] = {}
_FITTED: dict[tuple[type, Callable], Callable] = {}


@dataclass(frozen=True)
class _Family:
    module: str  # the transformers modeling module
    attention: str | tuple[str, ...]  # the attention class(es) there
    forward: Callable
    attributes: tuple[str, ...]  # what the forward reads from the layer
    attach: Callable  # (model, modeling module, layers) -> sets each layer's _relattn_pe
    models: dict[str, dict] = field(default_factory=dict)  # model class -> overrides
    check: Callable | None = None  # (config) -> raises on a configuration not supported
    positions_from_mask: bool = False  # ALiBi distance counted over real tokens only
    # Parameters some version's forward declares that the relattn path leaves unused because
    # the model, as apply() leaves it, always passes None there (a value is refused).
    unused: tuple[str, ...] = ()
    needs_mask_tensor: bool = False  # the model calls .to() on the mask
    sliding: bool = False  # some layers slide: the mask hook also gets the sliding mask

    @property
    def attention_names(self) -> tuple[str, ...]:
        return (self.attention,) if isinstance(self.attention, str) else self.attention


# ----------------------------------------------------------------------------- families

_T5_ATTRS = ("q", "k", "v", "o", "key_value_proj_dim", "scaling", "is_causal", "layer_idx")


def _attach_t5(per_layer: bool) -> Callable:
    """T5 / mT5 (``per_layer=False``): layer 0 of each stack owns the bias and every
    self-attention layer of the stack reads it. UMT5 (True): each layer reads its own.
    Cross-attention layers get no position term."""

    def attach(model, modeling, layers) -> None:
        for stack in model.modules():
            blocks = getattr(stack, "block", None)
            if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
                continue
            # transformers' T5Block: .layer[0].SelfAttention, decoders .layer[1].EncDecAttention
            # (untyped to us; nn.Module's stubs would call every attribute Tensor | Module)
            t5_blocks: list[Any] = list(blocks)
            owner = t5_blocks[0].layer[0].SelfAttention
            for block in t5_blocks:
                layer = block.layer[0].SelfAttention
                source = layer if per_layer else owner
                layer.__dict__["_relattn_pe"] = SharedT5Bias(source, not owner.is_decoder)
                if len(block.layer) == 3:  # decoder: self, cross, feed-forward
                    block.layer[1].EncDecAttention.__dict__["_relattn_pe"] = None
        for layer in layers:
            if "_relattn_pe" not in layer.__dict__:
                raise NotImplementedError(
                    f"{type(layer).__name__} (layer_idx={layer.layer_idx}) is not a layer of a "
                    "T5 stack (block[i].layer[0] or layer[1]), the layout this integration knows"
                )

    return attach


def _attach_slopes(slopes_of: Callable) -> Callable:
    def attach(model, modeling, layers) -> None:
        pe = SlopesALiBi(slopes_of(model.config), device_of=layers[0])
        for layer in layers:
            layer.__dict__["_relattn_pe"] = pe

    return attach


def _check_mpt(config) -> None:
    attn = config.attn_config
    if not getattr(attn, "alibi", True):
        raise NotImplementedError(
            "MPT with attn_config.alibi=False: transformers' MPT adds ALiBi regardless, so "
            "relattn will not guess which one the checkpoint means"
        )
    if float(getattr(attn, "alibi_bias_max", 8)) != 8.0:
        raise NotImplementedError(
            f"MPT with attn_config.alibi_bias_max={attn.alibi_bias_max}: transformers' MPT "
            "builds its slopes with 8 whatever the config says, so relattn will not guess which "
            "one the checkpoint means (set it to 8 for transformers' behaviour)"
        )


def _mpt_model_forward(self, *args, **kwargs):
    # MPT's blocks do not hand output_attentions to the attention layers, so it is refused here.
    _forwards.check_call(self, kwargs.get("output_attentions"), 0.0)
    return self._relattn_original.forward(self, *args, **kwargs)


def _check_falcon(config) -> None:
    if not config.alibi:
        raise NotImplementedError(
            "Falcon with alibi=False (rotary embeddings) is not supported by relattn's "
            "transformers integration; only alibi=True Falcon models are"
        )


def _falcon_slopes(config):
    h = config.num_attention_heads
    return falcon_alibi_slopes(h, config.hidden_size // h)


_FAMILIES: dict[str, _Family] = {
    "t5": _Family(
        "transformers.models.t5.modeling_t5", "T5Attention", _forwards.t5_forward,
        (*_T5_ATTRS, "dropout"), _attach_t5(per_layer=False),
    ),
    "mt5": _Family(
        "transformers.models.mt5.modeling_mt5", "MT5Attention", _forwards.t5_forward,
        (*_T5_ATTRS, "dropout"), _attach_t5(per_layer=False),
    ),
    "umt5": _Family(
        "transformers.models.umt5.modeling_umt5", "UMT5Attention", _forwards.umt5_forward,
        (*_T5_ATTRS, "dropout"), _attach_t5(per_layer=True),
    ),
    "bloom": _Family(
        "transformers.models.bloom.modeling_bloom", "BloomAttention", _forwards.bloom_forward,
        ("query_key_value", "_reshape", "dense", "inv_norm_factor", "attention_dropout",
         "hidden_dropout", "pretraining_tp", "slow_but_exact", "hidden_size", "layer_idx"),
        _attach_slopes(lambda c: bloom_alibi_slopes(c.n_head)),
        models={"BloomModel": {"build_alibi_tensor": lambda self, *a, **kw: None}},
        positions_from_mask=True,
    ),
    "mpt": _Family(
        "transformers.models.mpt.modeling_mpt", "MptAttention", _forwards.mpt_forward,
        ("Wqkv", "out_proj", "softmax_scale", "n_heads", "head_dim", "clip_qkv",
         "attn_dropout_p", "layer_idx"),
        _attach_slopes(lambda c: mpt_alibi_slopes(c.n_heads)),
        models={
            "MptModel": {
                "build_mpt_alibi_tensor": lambda self, *a, **kw: None,
                "forward": _mpt_model_forward,
            }
        },
        check=_check_mpt,
        needs_mask_tensor=True,
    ),
    "falcon": _Family(
        "transformers.models.falcon.modeling_falcon", "FalconAttention", _forwards.falcon_forward,
        ("query_key_value", "dense", "inv_norm_factor", "num_heads", "num_kv_heads",
         "new_decoder_architecture", "multi_query", "head_dim", "attention_dropout",
         "layer_idx"),
        _attach_slopes(_falcon_slopes),
        # 5.24 hands each layer an ALiBi tensor, 5.25 folds it into the mask: either way the
        # model builds none once use_alibi is False.
        models={"FalconModel": {"use_alibi": property(lambda self: False)}},
        check=_check_falcon,
        positions_from_mask=True,
        unused=("alibi",),
    ),
}  # fmt: skip


def _attach_inkling(distance: bool) -> Callable:
    """Inkling layers read their band's ``proj`` themselves (``_inkling``); Inkling2's model
    stops building its dense relative distances."""

    def attach(model, modeling, layers) -> None:
        if distance:
            _inkling.install_distance_switch(modeling)

    return attach


_INKLING2_ATTRS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "sink_proj",
    "relative_position_bias",
    "num_heads",
    "sliding_window",
    "scaling",
    "attention_dropout",
    "layer_idx",
)
_FAMILIES["inkling_text"] = _Family(
    "transformers.models.inkling.modeling_inkling",
    "InklingAttention",
    _inkling.inkling_forward,
    (
        "q_proj",
        "k_proj",
        "v_proj",
        "r_proj",
        "o_proj",
        "k_sconv",
        "v_sconv",
        "q_norm",
        "k_norm",
        "rel_logits_proj",
        "head_dim",
        "num_heads",
        "is_sliding",
        "sliding_window",
        "scaling",
        "attention_dropout",
        "layer_idx",
        "config",
    ),
    _attach_inkling(distance=False),
    check=_inkling.check_inkling_config,
    sliding=True,
)
_FAMILIES["inkling2_text"] = _Family(
    "transformers.models.inkling2.modeling_inkling2",
    ("Inkling2SlidingAttention", "Inkling2FullAttention"),
    _inkling.inkling2_forward,
    _INKLING2_ATTRS,
    _attach_inkling(distance=True),
    models={
        "Inkling2BlockAttentionResidual": {"config": _inkling.EAGER_CONFIG},
        "Inkling2TextModel": {"forward": _inkling.without_distance},
    },
    check=_inkling.check_inkling_config,
    sliding=True,
)
_FAMILIES["inkling2_loop_text"] = _Family(
    "transformers.models.inkling2_loop.modeling_inkling2_loop",
    ("Inkling2LoopSlidingAttention", "Inkling2LoopFullAttention"), _inkling.inkling2_forward,
    _INKLING2_ATTRS, _attach_inkling(distance=True),
    models={
        "Inkling2LoopBlockAttentionResidual": {"config": _inkling.EAGER_CONFIG},
        "Inkling2LoopMessageAttentionResidual": {"config": _inkling.EAGER_CONFIG},
        "Inkling2LoopTextModel": {"forward": _inkling.without_distance},
    },
    check=_inkling.check_inkling_config,
    sliding=True,
)  # fmt: skip

#: The ``config.model_type`` values :func:`apply` accepts (Flan-T5 is ``"t5"``).
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)


# ----------------------------------------------------------------------------- apply


def apply(model: nn.Module, *, ignore_attention_dropout: bool = False) -> nn.Module:
    """Run ``model``'s attention through :func:`relattn.attention`, in place.

    The model keeps its own parameters (T5's ``relative_attention_bias.weight`` is read, not
    copied), its ``state_dict``, ``save_pretrained``, caches and ``generate``; no layer builds
    the N×N position bias or an N×N mask. Padding (``attention_mask`` of 0/1) becomes relattn's
    ``key_padding_mask``, a cache's length its ``q_offset``.

    Args:
        model: a transformers ``PreTrainedModel`` whose ``config.model_type`` is one of
            :data:`SUPPORTED_MODEL_TYPES` (T5, mT5, Flan-T5, UMT5, BLOOM, MPT, Falcon with
            ``alibi=True``; the text models of Inkling, Inkling2 and Inkling2-Loop, whose
            query-conditioned band reads each layer's own ``proj``).
        ignore_attention_dropout: relattn has no dropout on the attention weights; by default a
            layer in training mode with such dropout > 0 raises. True trains without it.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a transformers model.
        NotImplementedError: an unsupported family, configuration or transformers version (the
            message names it). At call time: ``output_attentions=True``, custom 4-D masks,
            packed-sequence masks, BLOOM/Falcon padding with holes.
    """
    tf = _transformers()
    if not isinstance(model, tf.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel; got {type(model).__name__}")
    if not isinstance(ignore_attention_dropout, bool):
        raise TypeError(
            "ignore_attention_dropout must be a bool; "
            f"got {type(ignore_attention_dropout).__name__}"
        )
    model_type = getattr(model.config, "model_type", None)
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise NotImplementedError(
            f"relattn's transformers integration supports model_type in {SUPPORTED_MODEL_TYPES}; "
            f"got {model_type!r} ({type(model).__name__})"
        )
    try:
        modeling = importlib.import_module(family.module)
    except ImportError as e:  # a family newer than the installed release (Inkling: 5.25)
        raise NotImplementedError(
            f"transformers {tf.__version__} has no {family.module}, which relattn's integration "
            f"({_range_text()}) hooks for model_type={model_type!r}. {_advice()}"
        ) from e
    classes = [_lookup(modeling, name, tf.__version__) for name in family.attention_names]
    forwards = {cls: _fit_forward(cls, family, tf.__version__) for cls in classes}
    if family.check is not None:
        family.check(model.config)
    if getattr(model.config, "output_attentions", False):
        raise NotImplementedError(
            "model.config.output_attentions=True needs the attention weights, which relattn "
            "never materializes; set it to False before apply()"
        )
    wanted = tuple(c for c in classes if isinstance(c, type))
    layers: list[nn.Module] = [m for m in model.modules() if isinstance(m, wanted)]
    if not layers:
        names = " or ".join(family.attention_names)
        raise ValueError(f"model has no {names} layer to run through relattn")
    for layer in layers:
        missing = [a for a in family.attributes if not hasattr(layer, a)]
        if missing:
            raise NotImplementedError(
                f"{type(layer).__name__} in transformers {tf.__version__} lacks {missing}, "
                f"which relattn's integration ({_range_text()}) reads. {_advice()}"
            )
    family.attach(model, modeling, layers)
    for layer in layers:
        layer.__dict__["_relattn_ignore_dropout"] = ignore_attention_dropout
        _swap(layer, {"forward": forwards[_original_class(layer)]})
    for cls_name, overrides in family.models.items():
        cls = _lookup(modeling, cls_name, tf.__version__)
        for m in model.modules():
            if not isinstance(m, cls):
                continue
            for name in overrides:
                if not hasattr(m, name):
                    raise NotImplementedError(
                        f"{cls_name} in transformers {tf.__version__} has no {name!r}, which "
                        f"relattn's integration ({_range_text()}) replaces. {_advice()}"
                    )
            _swap(m, overrides)
    _register()
    for m in model.modules():
        config = getattr(m, "config", None)
        if isinstance(config, tf.PretrainedConfig):
            config._attn_implementation = NAME
    return model


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` has prepared ``model`` (its attention layers run relattn)."""
    return any(getattr(type(m), "_relattn_original", None) for m in model.modules())


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "relattn.integrations.transformers needs the transformers package: "
            "pip install 'relattn[hf]'"
        ) from e
    check_version(transformers.__version__)
    return transformers


def check_version(version: str) -> None:
    """Raise NotImplementedError unless ``version`` is in :data:`TESTED_RANGE`."""
    from packaging.version import Version

    low, high = TESTED_RANGE
    if not Version(low) <= Version(version) < Version(high):
        raise NotImplementedError(
            f"relattn's transformers integration supports {_range_text()}; installed "
            f"transformers is {version}. {_advice()}"
        )


def _range_text() -> str:
    low, high = TESTED_RANGE
    return f"transformers >= {low}, < {high}; checked on {', '.join(CHECKED_VERSIONS)}"


def _lookup(modeling, name: str, version: str) -> type[nn.Module]:
    cls = getattr(modeling, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise NotImplementedError(
            f"{modeling.__name__} in transformers {version} has no class {name}, which "
            f"relattn's integration ({_range_text()}) hooks. {_advice()}"
        )
    return cls


def _fit_forward(cls: type[nn.Module], family: _Family, version: str) -> Callable:
    """``family.forward`` as a replacement for ``cls.forward`` of this transformers version.

    Where the two signatures agree, ``family.forward`` itself. Where they differ (a parameter
    added, dropped or moved between releases), a wrapper with the installed signature that
    binds each call's arguments by name, provided every parameter of the installed version is
    one relattn reads or one the family knows the model passes as None (``family.unused``),
    and every parameter relattn needs is there. Anything else is refused: relattn would not
    know what the new parameter means."""
    fitted = _FITTED.get((cls, cls.forward))
    if fitted is None:
        fitted = _FITTED[cls, cls.forward] = _fit(cls, family, version)
    return fitted


def _fit(cls: type[nn.Module], family: _Family, version: str) -> Callable:
    theirs = inspect.signature(cls.forward)
    ours = inspect.signature(family.forward)
    if list(theirs.parameters) == list(ours.parameters):
        return family.forward
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    reads = [n for n, p in ours.parameters.items() if p.kind not in variadic]
    unknown = [
        n
        for n, p in theirs.parameters.items()
        if p.kind not in variadic and n not in reads and n not in family.unused
    ]
    missing = [
        n
        for n, p in ours.parameters.items()
        if p.kind not in variadic and p.default is p.empty and n not in theirs.parameters
    ]
    if unknown or missing or not _has_var_keyword(ours):
        what = [f"takes {unknown}, which relattn does not know"] if unknown else []
        what += [f"lacks {missing}, which relattn reads"] if missing else []
        raise NotImplementedError(
            f"{cls.__name__}.forward in transformers {version} {' and '.join(what)}; "
            f"relattn's integration ({_range_text()}) replaces a forward taking {reads}. "
            f"{_advice()}"
        )
    var_keyword = next((n for n, p in theirs.parameters.items() if p.kind is p.VAR_KEYWORD), None)
    impl, name = family.forward, cls.__name__

    def forward(*args, **kwargs):
        arguments = theirs.bind(*args, **kwargs).arguments
        extra = arguments.pop(var_keyword, {}) if var_keyword else {}
        for unused in family.unused:
            if arguments.pop(unused, None) is not None:
                raise NotImplementedError(
                    f"{name}.forward was given {unused}=<a value>; the model relattn prepared "
                    "passes None there, so this call comes from elsewhere and relattn cannot "
                    "honour it"
                )
        return impl(**arguments, **extra)

    forward.__signature__ = theirs  # type: ignore[attr-defined]
    forward.__doc__, forward.__name__ = impl.__doc__, impl.__name__
    return forward


def _original_class(module: nn.Module) -> type:
    cls = type(module)
    return cls.__dict__.get("_relattn_original", cls)


def _has_var_keyword(signature: inspect.Signature) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


def _advice() -> str:
    checked = ", ".join(CHECKED_VERSIONS)
    return (
        f"Install a transformers release relattn was checked on ({checked}), e.g. "
        f"pip install 'transformers=={CHECKED_VERSIONS[-1]}', or run the model without apply()"
    )


def _swap(module: nn.Module, overrides: dict) -> None:
    """Give ``module`` a subclass of its class (same name, so ``save_pretrained`` records the
    original architecture) with ``overrides``; idempotent."""
    cls = type(module)
    if "_relattn_original" in cls.__dict__:
        return
    key = (cls, *sorted((name, id(value)) for name, value in overrides.items()))
    new = _SWAPPED.get(key)
    if new is None:
        namespace = {**overrides, "_relattn_original": cls, "__module__": cls.__module__}
        new = type(cls.__name__, (cls,), namespace)
        new.__qualname__ = cls.__qualname__
        _SWAPPED[key] = new
    module.__class__ = new


# ----------------------------------------------------------------------------- masks


def _register() -> None:
    """Register ``"relattn"`` with transformers' mask interface (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register(NAME, _relattn_mask)


def _relattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    config=None,
    device=None,
    **kwargs,
):
    """transformers' mask hook for ``"relattn"``: returns the ``(B, kv_length)`` bool key
    padding mask, or None (an empty tensor for models that call ``.to`` on it) without padding.
    """
    from transformers import masking_utils as mu

    model_type = getattr(config, "model_type", None)
    family = _FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        raise NotImplementedError(
            f"attn_implementation={NAME!r} is set by relattn.integrations.transformers.apply() "
            f"for model_type in {SUPPORTED_MODEL_TYPES}; got {model_type!r}"
        )
    plain = mask_function in (mu.causal_mask_function, mu.bidirectional_mask_function)
    sliding_ok = (
        family.sliding
        and mask_function is not None
        and _inkling.sliding_mask_ok(mask_function, config)
    )
    if not plain and not sliding_ok:
        raise NotImplementedError(
            "relattn's transformers integration supports plain causal or bidirectional masks "
            "with padding; this call combines another mask function (packed sequences given "
            "by position_ids, or a custom or_mask/and_mask)"
        )
    if attention_mask is None:
        if family.needs_mask_tensor:
            return torch.ones(0, dtype=torch.bool, device=device)
        return None
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    assert padding is not None  # None only for a None attention_mask, handled above
    padding = padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)
    if family.positions_from_mask:  # data-dependent: a graph break under torch.compile
        _check_contiguous(padding, config.model_type)
    return padding


def _check_contiguous(padding: torch.Tensor, model_type: str) -> None:
    """BLOOM and Falcon count ALiBi distances over real tokens only (a cumulative sum of the
    mask); relattn counts positions. They agree when each row's real tokens are one run."""
    starts = padding[:, :1].sum(1) + (padding[:, 1:] & ~padding[:, :-1]).sum(1)
    bad = (starts > 1).nonzero()
    if bad.numel():
        raise NotImplementedError(
            f"{model_type}: attention_mask row {int(bad[0, 0])} has padding between real tokens; "
            f"{model_type} measures ALiBi distance over real tokens only, relattn over positions, "
            "so only left or right padding is supported"
        )
