"""The per-BatchNormalization ledger: what happened to every BN, and why.

Every BN that is not folded gets exactly one reason from ``REASONS``; tests and users
match on these codes, so they are part of the public interface (see docs/ledger.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

LEDGER_SCHEMA_VERSION = 3

#: Why a BN was kept. Keys are stable codes; values explain them to a person.
REASONS: dict[str, str] = {
    "training-mode": "the BN runs in training mode (training_mode=1, is_test=0, or running-stat outputs present); folding would change its meaning",
    "spatial-0": "opset <= 8 BN with spatial=0 normalises per element, not per channel",
    "unsupported-opset": "BatchNormalization version older than 6 (consumed_inputs form)",
    "non-constant-params": "scale, bias, mean or variance is computed in the graph or fed as a graph input",
    "overridable-params": "a parameter is an initializer that is also a graph input (IR >= 4): a caller may override it",
    "non-finite-params": "a parameter holds NaN or infinity",
    "negative-variance": "a variance is negative or var + epsilon <= 0",
    "no-linear-producer": "no Conv, ConvTranspose, Gemm or MatMul(+Add) before the BN (nor one reading its output) to fold into",
    "fan-out": "the producer's output is read by other nodes besides the BN",
    "graph-output": "the producer's output is itself a graph output",
    "non-constant-weights": "the producer's weight or bias is not a constant",
    "channel-axis-mismatch": "the BN's channel axis (1) is not the producer's output-channel axis",
    "unknown-rank": "the rank of the MatMul activation cannot be proven, so neither can its channel axis",
    "non-channel-constant": "the constant (a Mul/Add operand, or a MatMul's bias) varies along more than the channel axis",
    "unproven-layout": "a layout op between the linear op and the site moves, merges or splits the channel axis, or its shapes are unknown",
    "zero-scale": "a BN before a padded Conv has a zero scale, so its shift cannot be kept as an Add before the conv",
    "dtype-overflow": "the folded weights or bias would overflow the model's dtype",
    "padded-consumer": "a constant Add/Sub before a padded Conv: the shift would meet the zero padding, only a pure scale folds there",
    "zero-size": "the site has no channels, or the weight it would fold into has no elements",
    "attribute-reference": "an attribute that decides the fold refers to a function attribute whose call sites disagree (or that is never given)",
    "negative-scale": "the route crosses a max or min (MaxPool, ReduceMax, ...), and a scale <= 0 would turn it around",
    "shift-not-crossing": "the route crosses an op that a shift does not commute with (an average that counts zero padding, a sum over an unknown count)",
    "pad-value": "the route crosses a constant Pad whose value the map would change",
    "branch-mismatch": "parallel branches of one tensor differ in stride, groups or dilation, or one's kernel cannot be placed exactly inside another's",
    "sequential-branch": "a branch applies two convs in a row (1x1 -> BN -> kxk): no single kernel, unless its padding carries the BN-shifted value",
    "avgpool-borders": "an average-pool branch divides its border by fewer elements (count_include_pad=0 with padding, ceil_mode): no conv computes that",
    "unproven-crossing": "an op on the route (a pool, Resize, Slice, Gather, Split, Pad, Concat, ...) works on the channels or has facts that cannot be proven",
    "kept-on-request": "the site was named by --keep (say, because folding it would hurt a --target's precision)",
}


class NoMatch(Exception):
    """The one way a matcher or planning step says no: a reason code and a detail.

    Planning turns it into a kept site; the reason must be one of ``REASONS``.
    """

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown ledger reason {reason!r}")
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail

STATUS_FOLDED = "folded"
STATUS_KEPT = "kept"
#: A BN with no linear neighbour rewritten as Mul + Add (``--decompose-standalone``).
STATUS_DECOMPOSED = "decomposed"
#: A sum whose parallel branches became one conv (``bnfold.merge``).
STATUS_MERGED = "merged"


@dataclass
class LedgerEntry:
    """One affine site (a BN, or a constant Mul/Div/Add/Sub after a linear op) and its fate."""

    op: str
    node: str
    graph: str
    status: str
    #: The node's name, or for an unnamed node its op, position and output ("Conv#3 -> 'y'").
    label: str = ""
    pattern: str | None = None
    into: str | None = None
    #: The op type of ``into``.
    into_op: str | None = None
    #: Folded: what the map crossed or split over on its way ("through MaxPool 'p' (all 64
    #: scales > 0)", "split over Add 'a' into Conv 'x' and Conv 'y'"); "" for a direct fold.
    route: str = ""
    reason: str | None = None
    detail: str = ""
    channels: int | None = None
    #: Folded or decomposed: the axis of the site's input along which its channels lie,
    #: the axis the fold scaled (negative: from the end, the rank being unknown; None for a
    #: one-channel map that needed no axis).
    channel_axis: int | None = None
    max_rel_weight_change: float | None = None
    weight_cloned: bool = False
    converted_from_training: bool = False
    #: Inference-readiness problems of a BN (codes from ``health.PROBLEMS``) and their details.
    problems: list[str] = field(default_factory=list)
    problem_details: list[str] = field(default_factory=list)
    #: With --target: what the fold does to each target's precision (``precision.Precision``:
    #: each written tensor's figures, and problems with codes from ``precision.PROBLEMS``);
    #: None without a target, and for a site that was not folded.
    precision: object | None = None

    @property
    def precision_problems(self) -> list:
        return list(self.precision.problems) if self.precision is not None else []

    @property
    def folded(self) -> bool:
        return self.status == STATUS_FOLDED

    @property
    def gone(self) -> bool:
        """Folded, or a sum merged into one conv: the site is no longer in the output."""
        return self.status in (STATUS_FOLDED, STATUS_MERGED)

    @property
    def is_bn(self) -> bool:
        return self.op == "BatchNormalization"

    def to_dict(self) -> dict:
        return json_safe(dataclasses.asdict(self))


def json_safe(value):
    """JSON has no inf/nan: write them as the strings "inf", "-inf", "nan" (as verify's report)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


@dataclass
class Ledger(Sequence):
    """All entries of one fold run, in graph order: a sequence of ``LedgerEntry``
    (``ledger[0]``, ``ledger[-1]``, slices give lists)."""

    entries: list[LedgerEntry] = field(default_factory=list)
    #: The --target formats the folded tensors were measured for (empty: not measured).
    targets: list[str] = field(default_factory=list)

    def __getitem__(self, index):
        return self.entries[index]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entry: LedgerEntry) -> None:
        if entry.reason is not None and entry.reason not in REASONS:
            raise ValueError(f"unknown ledger reason {entry.reason!r}")
        self.entries.append(entry)

    @property
    def folded(self) -> list[LedgerEntry]:
        return [e for e in self.entries if e.folded]

    @property
    def batch_norms(self) -> list[LedgerEntry]:
        return [e for e in self.entries if e.is_bn]

    def summary(self) -> dict[str, int]:
        bns = self.batch_norms
        others = [e for e in self.entries if not e.is_bn]
        return {
            "bn_total": len(bns),
            "folded": sum(e.status == STATUS_FOLDED for e in bns),
            "kept": sum(e.status == STATUS_KEPT for e in bns),
            "decomposed": sum(e.status == STATUS_DECOMPOSED for e in bns),
            "other_folded": sum(e.status == STATUS_FOLDED for e in others),
            "other_kept": sum(e.status == STATUS_KEPT for e in others),
            "merged": sum(e.status == STATUS_MERGED for e in others),
            "with_problems": sum(bool(e.problems) for e in bns),
            "with_precision_problems": sum(bool(e.precision_problems) for e in self.entries),
        }

    def to_dict(self, **context) -> dict:
        from bnfold import __version__

        return {
            "schema": "bnfold.ledger",
            "schema_version": LEDGER_SCHEMA_VERSION,
            "bnfold_version": __version__,
            **context,
            "targets": list(self.targets),
            "summary": self.summary(),
            "entries": [e.to_dict() for e in self.entries],
        }
