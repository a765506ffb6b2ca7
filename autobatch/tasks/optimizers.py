"""Which learning-rate rule an optimizer's family follows, from its class name alone.

SGD-like optimizers (plain or momentum SGD, LARS) follow the linear scaling rule (Goyal et al.,
2017); adaptive ones (Adam and its kin, Adagrad, RMSprop, LAMB, Lion, Adafactor) the square-root
rule (Malladi et al., 2022). The name is read from the optimizer a trial built, so a factory, a
``functools.partial`` or a compiled Keras model all give theirs.
"""

from __future__ import annotations

__all__ = ["optimizer_family"]

#: lower-case class names (or their beginnings) of the SGD-like family; everything else is adaptive
_SGD_LIKE = ("sgd", "lars", "momentum", "nesterov", "heavyball")


def optimizer_family(class_name: str) -> str:
    """``"sgd"`` for an SGD-like optimizer class, ``"adam"`` for an adaptive one (the default)."""
    name = class_name.lower()
    return "sgd" if name.startswith(_SGD_LIKE) else "adam"
