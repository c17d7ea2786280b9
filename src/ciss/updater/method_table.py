"""The incremental methods, one row each: what a method needs and its default weights.

Every list of method names (the CLI's choices, the benchmark's, the default kd weights, the
checks of add-classes) derives from ``METHODS``; a method's losses live in
``updater.methods.LOSSES`` under the same name. Adding a method is one row here and one loss
function there. No torch here: the command line reads this table to build its options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ciss.errors import CissError


@dataclass(frozen=True)
class Method:
    """One incremental method.

    Attributes:
        name: what ``--method`` takes.
        summary: one line for ``--help`` and ``ciss recipes``.
        teacher: needs the parent's outputs on every batch (all but ft).
        thresholds: needs per-old-class entropy thresholds of the parent (pseudo-labels).
        stage_maps: needs each trainable stage's output, student and parent (Local POD).
        classifier_inputs: needs the classifier's input features, student and parent.
        sigmoid_form: scores each class with a sigmoid against a constant background logit
            of 0. The parent is rewritten to that form before the step (exact: every
            prediction is unchanged, see ``models.surgery.sigmoid_form``).
        kd_weight: default weight of its distillation terms (0: none).
        init: default init of the new classifier rows (``models.surgery.INITS``; random was
            measured best for mib, BENCHMARKS.md §2; PLOP's code uses MiB's init).
        pretune: NeST's classifier pre-tuning runs by default, for the share of the step
            that the family's recipe gives (``updater.pretune``; measured with mib only).
        source: the publication the losses follow.
    """

    name: str
    summary: str
    teacher: bool = True
    thresholds: bool = False
    stage_maps: bool = False
    classifier_inputs: bool = False
    sigmoid_form: bool = False
    kd_weight: float = 0.0
    init: str = "random"
    pretune: bool = False
    source: str = ""

    def to_json(self) -> dict:
        return asdict(self)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("mib", "unbiased cross-entropy + unbiased distillation (the default)",
           kd_weight=10.0, pretune=True, source="Cermelli et al., CVPR 2020 (MiB)"),
    Method("ft", "plain cross-entropy, no parent: the forgetting baseline", teacher=False),
    Method("lwf", "cross-entropy + distillation on the old channels", kd_weight=100.0,
           source="Li & Hoiem, TPAMI 2017 (LwF); weight as in MiB's tables"),
    Method("ilt", "LwF + mean squared error on the encoder's features", kd_weight=100.0,
           source="Michieli & Zanuttigh, ICCVW 2019 (ILT)"),
    Method("plop", "CE on entropy pseudo-labels + Local POD on encoder stages and logits",
           thresholds=True, stage_maps=True, init="mib",
           source="Douillard et al., CVPR 2021 (PLOP); options of its released VOC scripts"),
    Method("dkd", "sigmoid BCE on new classes + BCE distillation of old logits and of their "
           "positive and negative parts", classifier_inputs=True, sigmoid_form=True,
           kd_weight=1.0, source="Baek et al., NeurIPS 2022 (DKD); its VOC config weighs the "
           "three distillation terms 5: measured here, 1 (BENCHMARKS.md §11)"),
)}

# ``ciss benchmark`` also runs these: mib with pseudo-labels, and joint training (upper bound)
BENCHMARK_METHODS = (*METHODS, "mib+pseudo", "joint")


def method_row(name: str) -> Method:
    """The row of ``name``.

    Raises:
        CissError: unknown name, naming the choices.
    """
    row = METHODS.get(name)
    if row is None:
        raise CissError(f"--method {name}: unknown; choose from {', '.join(METHODS)}")
    return row
