"""The demo's settings: the defaults, the ``--quick`` preset, and what a resumed run must match."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .trainer import DEFAULT_ENCODINGS, TrainSettings


@dataclass
class DemoSettings:
    """Everything that determines the demo's numbers (plus which encodings to run)."""

    encodings: list[str] = field(default_factory=lambda: list(DEFAULT_ENCODINGS))  # "rope+t5"...
    context: int = 128
    steps: int = 400
    batch_size: int = 16
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    lr: float = 3e-3
    seed: int = 0
    data: str | None = None
    train_bytes: int = 2_000_000
    eval_bytes: int = 32_768
    long: bool = False
    quick: bool = False

    @classmethod
    def preset(cls, quick: bool) -> DemoSettings:
        """The default run (≤ 5 minutes on 2 cores) or the ``--quick`` smoke run (≤ 60 s)."""
        if quick:
            return cls(
                steps=40,
                batch_size=8,
                d_model=32,
                num_layers=2,
                num_heads=2,
                context=64,
                train_bytes=200_000,
                eval_bytes=4096,
                quick=True,
            )
        return cls()

    @property
    def eval_lengths(self) -> list[int]:
        """L, 2L, 4L, 8L (and 16L with ``long``)."""
        factors = (1, 2, 4, 8, 16) if self.long else (1, 2, 4, 8)
        return [self.context * f for f in factors]

    def train_settings(self) -> TrainSettings:
        """The part of the settings that training needs."""
        return TrainSettings(
            context=self.context,
            steps=self.steps,
            minutes=None,
            batch_size=self.batch_size,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            lr=self.lr,
            seed=self.seed,
        )

    def as_dict(self) -> dict:
        """JSON-ready settings, with the evaluation lengths spelled out."""
        d = asdict(self)
        d["eval_lengths"] = self.eval_lengths
        return d

    def comparable(self) -> dict:
        """The settings a resumed run must share with the saved one (all but the encodings)."""
        d = self.as_dict()
        d.pop("encodings")
        return d
