"""Run-folder commands: ``convert-run`` (old checkpoints to the safe format, for folders you
trust) and ``export`` (the weights as safetensors)."""

from __future__ import annotations

from pathlib import Path

from pyro_seqlatent.infer.checkpoint import CheckpointError, convert_checkpoint
from pyro_seqlatent.infer.export import export_weights
from pyro_seqlatent.registry import CommandSpec, register_command


def convert_run(run_dir: str | Path, *, trust: bool = False) -> list[Path]:
    """Rewrite every checkpoint of ``run_dir`` in the safe format (see
    :func:`~pyro_seqlatent.infer.checkpoint.convert_checkpoint`: ``trust=True`` is required,
    since reading an old checkpoint can run code)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a run folder")
    paths = sorted(folder.glob("*.pt"))
    if not paths:
        raise CheckpointError(f"{folder} holds no checkpoint (*.pt)")
    return [convert_checkpoint(path, trust=trust) for path in paths]


def _convert_arguments(parser) -> None:
    parser.add_argument("run_dir", help="the run folder whose checkpoints to convert")
    parser.add_argument("--trust", action="store_true",
                        help="required: reading an old checkpoint runs whatever code it holds, "
                             "so convert only folders whose origin you trust")


def _convert(args) -> int:
    if not args.trust:
        print(f"pyro-seqlatent: error: convert-run reads {args.run_dir}'s checkpoints with "
              "pickle, which runs any code they hold; add --trust only if you know where the "
              "folder comes from")
        return 2
    for path in convert_run(args.run_dir, trust=True):
        print(f"converted {path}")
    return 0


def _export_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run folder (best.pt, else checkpoint.pt) or a .pt file")
    parser.add_argument("--out", default=None,
                        help="output file (default: RUN_DIR/weights.safetensors)")
    parser.add_argument("--last-iterate", action="store_true",
                        help="export the optimizer's own last iterate instead of the "
                             "parameter average (runs trained with ema_decay)")


def _export(args) -> int:
    print(export_weights(args.run_dir, args.out, averaged=not args.last_iterate))
    return 0


register_command(CommandSpec("convert-run", "rewrite an old run folder's checkpoints in the "
                             "safe format (--trust required)", _convert_arguments, _convert))
register_command(CommandSpec("export", "write a run's weights as safetensors",
                             _export_arguments, _export))
