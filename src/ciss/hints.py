"""Every piece of advice the command line prints, in one place.

Advice that names an option the command does not have is worse than none: the user runs it
and gets "no such option". So each hint says which commands print it, and
``tests/test_cli_advice.py`` walks ``HINTS`` and checks, through click's own tables, that every
``--option`` a hint names exists: on the command a ``ciss <command> ...`` part of the text
names, and otherwise on each command that prints it. Plain data (no click, no numpy): any
layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hint:
    """One piece of advice.

    Attributes:
        text: a ``str.format`` template; ``ciss <command> --opt ...`` names a command to run,
            a bare ``--opt`` is an option of the commands in ``printed_by``.
        printed_by: the commands that print it ("add-classes", "data check", ...).
    """

    text: str
    printed_by: tuple[str, ...]

    def __call__(self, **values) -> str:
        return self.text.format(**values)


# -- learning warnings (analysis.learning): one line per class a step did not learn ----------
FEW_PIXELS = Hint("very few labelled pixels: add images that show it, or use a larger "
                  "--crop-size so it is not cropped away", ("train", "add-classes"))
STILL_RISING = Hint("validation was still improving at the end: raise --iterations (e.g. 2x)",
                    ("train", "add-classes"))
SMALL_CLASS_TRAIN = Hint("a small class drowned by background: retry with --loss wce "
                         "(class-weighted) and check its masks with 'ciss data check'",
                         ("train",))
SMALL_CLASS_STEP = Hint("a small class drowned by background: retry with --new-dice (a Dice "
                        "term over the new classes) and check its masks with 'ciss data "
                        "check'", ("add-classes",))
CHECK_MASKS = Hint("retry with more --iterations once its masks are right (wrong ids, missing "
                   "pixels: see 'ciss data check')", ("train", "add-classes"))
# an import trains nothing: a weak class there is a mismatch between model and folder
IMPORT_WEAK = Hint("an imported model that does not score its own classes usually has the "
                   "class order wrong (line i of --classes must be output channel i), other "
                   "preprocessing than it was trained with, or not the trained --weights",
                   ("import",))
IMPORT_LOW = Hint("warning: the imported model scores mIoU {miou} on the val split of "
                  "{data}; " + IMPORT_WEAK.text, ("import",))

# -- next commands -------------------------------------------------------------------------
CHECK_FAILED = Hint("next: ciss diagnose --step {step} --out diagnose-step-{step}   (why it "
                    "forgot)", ("check", "deploy"))
DEPLOYED = Hint("next: ciss serve   (a running server hot-swaps to it)", ("deploy",))
DEPLOYED_FORCED = Hint("next: ciss serve --accept-forced   (a server refuses a forced "
                       "deployment without it)", ("deploy",))
REFUSED = Hint("use --force to deploy anyway (it is recorded)", ("deploy",))
AFTER_STEP = Hint("next: ciss check --step {step}   then   ciss deploy --step {step}",
                  ("add-classes",))
AFTER_TRAIN = Hint("next: ciss evaluate --data {data}   or   ciss add-classes --data NEW_FOLDER",
                   ("train",))
AFTER_IMPORT = Hint("next: ciss data check --data NEW_FOLDER   then   ciss add-classes --data "
                    "NEW_FOLDER", ("import",))
NO_STEPS = Hint("next: ciss train --data DIR   or   ciss import --weights FILE --data VAL_DIR",
                ("steps",))
EXPORT_TRT = Hint("ciss check --engine tensorrt   then   ciss deploy --engine tensorrt",
                  ("export",))
EXPORT_GPU = Hint("ciss export --format tensorrt (needs pip install 'ciss[tensorrt]')   or   "
                  "ciss check   then   ciss deploy --engine onnx   (ONNX Runtime on the GPU "
                  "with 'pip install ciss[gpu]')", ("export",))
EXPORT_CPU = Hint("ciss check   then   ciss deploy --engine onnx", ("export",))
DATA_SYNTHETIC = Hint("next: ciss data split --data {out} --scenario 15-5 --out {out}-15-5",
                      ("data synthetic",))
DATA_SPLIT = Hint("next: ciss train --data {step0}", ("data split",))
DATA_OK = Hint("no problems; next: ciss data convert --data {folder} --out FOLDER, or use it "
               "directly with --data", ("data check",))
DEMO_DONE = Hint("next: ciss steps --store {store}   or   ciss serve --store {store}", ("demo",))
DATA_CONVERTED = Hint("next: ciss add-classes --data {dest}", ("data convert",))

# -- class names (data.classes.match_names): where folder classes meet a step's --------------
CLASS_IS_KNOWN = Hint("class '{name}' is the known class '{known}' (names match ignoring case, "
                      "spaces, '-' and '_')", ("add-classes", "data check"))
CLASS_NEAR_MISS = Hint("{where}: class '{name}' is not known but is close to the known "
                       "'{known}'; rename it to '{known}' if it is that class, or pass "
                       "--new-class-ok '{name}' if it is a new one", ("add-classes", "data check"))

# -- the store ------------------------------------------------------------------------------
STORE_COMMANDS = ("steps", "evaluate", "export", "check", "deploy", "rollback", "serve",
                  "predict", "diagnose", "report", "memory show", "memory clear", "prune",
                  "data check")
NO_STORE = Hint("no store at {path}; pass --store or CISS_STORE", STORE_COMMANDS)

# -- diagnose's verdict (analysis.verdict): what to run next, as add-classes options ---------
TRY_MIB = Hint("ciss add-classes --data DIR --from {parent} --method mib (its unbiased "
               "cross-entropy and distillation use what the old model knows about the "
               "background)", ("diagnose",))
TRY_KD = Hint("ciss add-classes --data DIR --from {parent} --kd-weight {kd} (more "
              "distillation), or more --iterations at a lower --lr", ("diagnose",))
TRY_INIT = Hint("ciss add-classes --data DIR --from {parent} --init mib (against the "
                "new-class bias)", ("diagnose",))
TRY_FREEZE = Hint("ciss add-classes --data DIR --from {parent} --freeze {stage} (freeze more "
                  "of the network)", ("diagnose",))

# -- add-classes: a folder whose val split cannot become the step's retention set ------------
NO_VAL_SHOWS = Hint("{data}: the val split ({n} image(s)) shows none of the folder's classes; "
                    "the step needs a retention set: add val images showing them{how}",
                    ("add-classes",))
NO_VAL_SPLIT = Hint(" (this export names no val split, so the 90/10 rule chose them: copy it "
                    "with 'ciss data convert --data {data} --out NEW' and list val images "
                    "showing the new classes in NEW/val.txt)", ("add-classes",))

# -- the production loop (ciss collect export): how each tool takes the tasks ---------------
EXPORTED_LABEL_STUDIO = Hint(
    "next: start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and "
    "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={out}, create a project with "
    "{out}/label_config.xml, add a Local Storage on {out}/images, import {out}/tasks.json; "
    "annotate; export JSON beside the images; then ciss add-classes --data EXPORT/",
    ("collect export",))
EXPORTED_CVAT = Hint(
    "next: in CVAT create a task from {out}/JPEGImages with the labels of labelmap.txt, upload "
    "{out}/annotations.zip as 'Segmentation mask 1.1'; annotate; export the dataset with "
    "images; then ciss add-classes --data EXPORT/", ("collect export",))
EXPORTED_COCO = Hint(
    "next: import {out}/annotations/instances_default.json with {out}/images as COCO 1.0; "
    "annotate; export; then ciss add-classes --data EXPORT/", ("collect export",))

HINTS: dict[str, Hint] = {k: v for k, v in dict(globals()).items() if isinstance(v, Hint)}
