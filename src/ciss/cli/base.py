"""What every command module shares: the group, its error handling, common options."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ciss.errors import CheckFailed, CissError, DiskFull

ENGINE_CHOICE = click.Choice(["torch", "onnx", "int8", "tensorrt"])


def exif_option(f):
    """``--exif apply|ignore``: whether images are read in their EXIF orientation."""
    return click.option("--exif", type=click.Choice(["apply", "ignore"]), default=None,
                        help="Read images in their EXIF orientation (apply, as viewers show "
                             "them) or as stored (ignore: for tools that annotated the raw "
                             "pixels); default: the folder's ciss.json, else apply.")(f)


def device_option(f):
    """``--device`` for commands that run a model (evaluation, gate, diagnosis)."""
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA when present), cpu or cuda[:N]; ONNX engines use ONNX "
                             "Runtime's CUDA provider on a GPU.")(f)


class CissGroup(click.Group):
    """Maps CissError to exit 2 and CheckFailed to exit 1, one line each, no traceback.

    A full disk (``OSError`` ENOSPC/EDQUOT, or safetensors' error wrapping one) raised by a
    writer that did not name its size is also one line and exit 2; other I/O errors keep
    their traceback (a bug or a broken disk must not hide behind a tidy line)."""

    group_class = type  # subgroups (data, memory, store) are CissGroups too

    # the order a user meets the commands in, not the alphabet's (--help lists them so)
    WORKFLOW = ("demo", "data", "train", "import", "add-classes", "steps", "evaluate", "check",
                "diagnose", "export", "deploy", "serve", "collect", "predict", "rollback",
                "report", "memory", "prune", "store", "recipes", "benchmark")

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = super().list_commands(ctx)
        if ctx.parent is not None:  # subgroups (data, memory, store) keep their own order
            return names
        rank = {n: i for i, n in enumerate(self.WORKFLOW)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each command's first sentence whole (click cuts them at ~45 characters)."""
        rows = [(n, c.get_short_help_str(limit=300)) for n in self.list_commands(ctx)
                if (c := self.get_command(ctx, n)) is not None and not c.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return self._invoke_full_disk_as_error(ctx)
        except CissError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except CheckFailed as exc:
            click.echo(f"check failed: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            sys.exit(130)

    def _invoke_full_disk_as_error(self, ctx: click.Context):
        from ciss.store.files import is_no_space

        try:
            return super().invoke(ctx)
        except Exception as exc:  # noqa: BLE001 - re-raised unless a full disk
            if isinstance(exc, CissError | CheckFailed) or not is_no_space(exc):
                raise
            from ciss.store.files import current_write

            path, needed = current_write()
            named = getattr(exc, "filename", None)
            raise DiskFull(named or path, None if named else needed) from exc


def store_option(f):
    return click.option("--store", "store_path", type=click.Path(path_type=Path),
                        envvar="CISS_STORE", default="ciss-store", show_default=True,
                        help="Model store folder (env CISS_STORE).")(f)


def data_option(required: bool = True, help: str = "Dataset folder (ciss or VOC layout)."):
    return click.option("--data", "data_dir", type=click.Path(path_type=Path),
                        required=required, help=help)


def open_store(path: Path, create: bool = False):
    """The store at ``path``. Only commands that write a first step (``create``) may find
    none there: every other command refuses at once, before any heavy import, so a command
    run in the wrong folder says so instead of creating a store or "run 'ciss train'"."""
    from ciss.hints import NO_STORE
    from ciss.store import Store

    if not create and not Path(path).is_dir():
        raise CissError(NO_STORE(path=Path(path).resolve()))
    return Store(path)


def parse_scale(text: str | None, default: tuple[float, float] = (1.0, 1.0)
                ) -> tuple[float, float]:
    if text is None:
        return default
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter("expected MIN,MAX such as 0.5,2.0") from exc
    if not 0 < lo <= hi:
        raise click.BadParameter("need 0 < MIN <= MAX")
    return lo, hi


def loop_options(f):
    opts = [
        click.option("--iterations", type=click.IntRange(min=1), default=None,
                     help="Training budget in optimiser steps of one process's batch "
                          "(under torchrun the ranks share it; default: the family recipe's: "
                          "train, a fixed count whatever the folder's size; add-classes, "
                          "630 but at most 20 passes over the folder and at least 315)."),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="Passes over the training split instead of --iterations."),
        click.option("--batch-size", type=click.IntRange(min=2), default=16, show_default=True,
                     help="Images per optimiser step (per process under torchrun)."),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Peak learning rate."),
        click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default=None,
                     help="Optimiser (default: the model family's recipe; see "
                          "'ciss recipes')."),
        click.option("--encoder-lr", type=click.FloatRange(min=0), default=None,
                     help="The encoder stages' learning rate as a fraction of --lr (default: "
                          "the recipe's; 0.1 for models with an encoder trained elsewhere)."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of initialisation, sampling and augmentation (same seed, "
                          "same data, same machine: same weights)."),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--crop-size", type=click.IntRange(min=16), default=None,
                     help="Training crop side (default: median image side, at most 512)."),
        click.option("--scale", default=None,
                     help="Random rescale range MIN,MAX (default: the recipe's; photos: "
                          "0.5,2.0 as in the literature)."),
        exif_option,
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="DataLoader workers (default: 0 for folders held in memory, "
                          "else up to 4)."),
        click.option("--min-iou", "floor", type=click.FloatRange(min=0, max=100),
                     default=5.0, show_default=True,
                     help="Warn about every trained class whose val IoU ends below this "
                          "(points)."),
        click.option("--checkpoint-every", "checkpoint_every", type=click.FloatRange(min=0),
                     default=None,
                     help="Seconds between resume checkpoints, written at epoch ends "
                          "(default 300; 0: every epoch)."),
        click.option("--sync-bn", is_flag=True,
                     help="Under torchrun on GPUs: BatchNorm statistics over all ranks."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.group(cls=CissGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ciss")
def main() -> None:
    """ciss: learn new segmentation classes without forgetting old ones, and ship each step
    as a checked, compiled engine.

    \b
    Start here:
      ciss demo --out demo-out            # the whole story on synthetic data
      ciss data synthetic --out data/     # make a dataset folder
      ciss train --data data/step-0       # step 0
      ciss add-classes --data new/        # learn new classes, keep the old
    """


def echo_warnings(warnings, advice: bool = True) -> None:
    """One ``warning:`` line per class the step did not learn (on stderr); ``advice`` False
    leaves the per-class advice out (the command gives it once)."""
    for w in warnings:
        click.echo(w.line(advice), err=True)


def memory_option(step: bool):
    """``--memory N``: the opt-in replay memory (``updater.memory``)."""
    more = (" Unset: the parent's budget (none when it keeps none); 0 stops keeping one."
            if step else "")
    return click.option(
        "--memory", type=click.IntRange(min=0), default=None if step else 0,
        show_default=not step,
        help="Keep up to N class-balanced training images (with their masks) beside the step, "
             "replayed by the next add-classes: old training data is then no longer gone, "
             "by your choice (docs/methods.md)." + more)


def echo_memory(card) -> None:
    """One line on the memory a new step keeps, and what it replayed."""
    if card.memory:
        m = card.memory
        click.echo(f"memory: {m['images']} images kept (budget {m['max_images']}; "
                   f"{m['kept_from_parent']} from the parent's, {m['from_this_step']} new)"
                   + (f"; {card.data['replayed_images']} replayed in training"
                      if card.data.get("replayed_images") else ""))


def pick_step(store, step: int | None, engine: str | None) -> tuple[int, str | None, str]:
    """The step a command that serves predictions uses, its engine, and how to say which.

    ``step`` None: the deployed step with its deployed engine (unless ``engine`` is given), or
    the latest step when nothing is deployed; the engine stays None for the caller's default.
    """
    deployed = store.deployed()
    if step is None and deployed is not None:
        return deployed["step"], engine or deployed["engine"], f"step {deployed['step']} (deployed)"
    if step is None:
        step = store.resolve(None)
        return step, engine, f"step {step} (latest; nothing is deployed)"
    step = store.resolve(step)
    return step, engine, f"step {step}"
