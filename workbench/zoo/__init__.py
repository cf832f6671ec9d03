"""The model zoo: small causal models trained by the project itself, loadable offline.

``ZOO`` holds every recipe; ``load(name)`` reads committed weights; ``train(ZOO[name])``
retrains one (deterministic seed). See ``workbench zoo list`` / ``workbench zoo train NAME``.
"""

from workbench.zoo.data import Mixture
from workbench.zoo.planted import ROLES as PLANTED_ROLES
from workbench.zoo.planted import planted
from workbench.zoo.train import WEIGHTS_DIR, Stage, ZooSpec, build, load, train

#: Stage 1, 256-token samples, many repeats with periods up to 96: induction forms (after
#: about 2000 steps). Stage 2, 2048-token samples, periods up to 1024, many needles at any
#: depth, and loss on the unpredictable first period of repeats: copying reaches across the
#: context, and a copying head learns to park its attention on <bos> when there is nothing to
#: copy (docs/zoo.md has the recipes that failed).
_SHORT = Mixture(text=0.2, repeat=0.6, needle=0.2, min_period=8, max_period=96)
_LONG = Mixture(text=0.2, repeat=0.4, needle=0.4, min_period=8, max_period=1024, first_period_loss=True)

#: zoo-long: mostly natural text (sinks need about 100M training tokens of it, Gu et al. 2025),
#: 1024-token samples first, then 4608-token ones so that 4K needles fit with their answers.
_TEXT_SHORT = Mixture(text=0.7, repeat=0.2, needle=0.1, min_period=8, max_period=256)
_TEXT_LONG = Mixture(text=0.35, repeat=0.15, needle=0.5, min_period=8, max_period=2048, first_period_loss=True)

ZOO: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        ZooSpec(
            "tiny",
            "1 layer, for CI: proves the training code runs",
            n_layers=1,
            d_model=32,
            n_heads=2,
            d_mlp=None,
            n_ctx=128,
            stages=(Stage(40, 128, 8),),
            lr=3e-3,
        ),
        ZooSpec(
            "zoo-2l",
            "2 attention-only layers x 4 heads: induction, previous-token, sink and needle heads",
            n_layers=2,
            d_model=128,
            n_heads=4,
            d_mlp=None,
            n_ctx=2048,
            stages=(Stage(3000, 256, 32, _SHORT), Stage(2000, 2048, 4, _LONG)),
        ),
        ZooSpec(
            "zoo-long",
            "6 layers x 8 heads with MLPs, 385M training tokens (installed documentation, repeats, needles): "
            "sinks, induction, retrieval to 4K tokens",
            n_layers=6,
            d_model=256,
            n_heads=8,
            d_mlp=192,
            n_ctx=8192,
            stages=(Stage(2500, 1024, 64, _TEXT_SHORT), Stage(3000, 4608, 16, _TEXT_LONG)),
            lr=2e-3,
            weight_decay=0.1,
            corpus="installed",
            checkpoints=(250, 1000, 2500),
        ),
    )
}

#: The model that commands use when none is named.
DEFAULT_MODEL = "zoo-2l"

__all__ = [
    "DEFAULT_MODEL",
    "PLANTED_ROLES",
    "WEIGHTS_DIR",
    "ZOO",
    "Mixture",
    "Stage",
    "ZooSpec",
    "build",
    "load",
    "planted",
    "train",
]
