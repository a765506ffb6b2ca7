"""``autobatch export``: a stored study's recommendation, written the way a training tool reads it.

``json`` and ``yaml`` hold the recommendation itself; ``lightning`` is a LightningCLI config
fragment (``fit --config base.yaml --config autobatch.yaml``), ``keras`` the ``fit`` batch size
and optimizer settings, ``hf`` ``transformers.TrainingArguments`` fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from autobatch.cli._common import add_storage_arguments

#: each format, and what it is for (``--help``)
FORMATS = {
    "json": "the recommendation as JSON",
    "yaml": "the recommendation as YAML",
    "lightning": "a LightningCLI config fragment (YAML)",
    "keras": "model.fit's batch_size and the optimizer's settings (JSON)",
    "hf": "transformers.TrainingArguments fields (JSON)",
}


def add_command(commands) -> None:
    export = commands.add_parser(
        "export", help="write a stored study's recommendation for Lightning, Keras, Hugging Face or as JSON/YAML"
    )
    add_storage_arguments(export)
    export.add_argument("--format", required=True, help="; ".join(f"{name}: {what}" for name, what in FORMATS.items()))
    export.add_argument("--out", default=None, help="write to this file (default: print)")
    export.add_argument(
        "--batch-arg-name",
        default=None,
        help="lightning: the DataModule's batch size argument (default batch_size)",
    )
    export.add_argument(
        "--lr-attr-name", default=None, help="lightning: the LightningModule's learning rate argument (default lr)"
    )
    export.set_defaults(
        handler=run,
        flag_names={
            "format": "--format",
            "out": "--out",
            "batch_arg_name": "--batch-arg-name",
            "lr_attr_name": "--lr-attr-name",
        },
    )


def run(args: argparse.Namespace) -> int:
    from autobatch.errors import InvalidParameterError
    from autobatch.integrations import load_recommendation

    if args.format not in FORMATS:
        raise InvalidParameterError("format", args.format, f"one of {', '.join(FORMATS)}")
    for name in ("batch_arg_name", "lr_attr_name"):
        if getattr(args, name) is not None and args.format != "lightning":
            raise InvalidParameterError(name, getattr(args, name), "given only with --format lightning")
    if not args.study_name:
        raise InvalidParameterError("study_name", args.study_name, "name the study to export")
    recommendation = load_recommendation(storage=args.storage, study_name=args.study_name)
    text = render(recommendation, args.format, args.batch_arg_name or "batch_size", args.lr_attr_name or "lr")
    if args.out is None:
        print(text, end="")
        return 0
    try:
        Path(args.out).write_text(text, encoding="utf-8")
    except OSError as error:
        raise InvalidParameterError("out", args.out, f"a file that can be written ({error.strerror})") from None
    print(
        f"autobatch export: wrote the {args.format} config of study {args.study_name!r} to {args.out}", file=sys.stderr
    )
    return 0


def render(recommendation, output_format: str, batch_arg_name: str = "batch_size", lr_attr_name: str = "lr") -> str:
    """The text of one format; all of it, before anything is written."""
    if output_format == "json":
        return _json(recommendation.to_dict())
    if output_format == "keras":
        return _json(recommendation.as_keras())
    if output_format == "hf":
        return _json(recommendation.as_huggingface())
    header = f"# autobatch: {recommendation.describe()}\n"
    if output_format == "lightning":
        header += "# use: python main.py fit --config your_config.yaml --config this_file.yaml\n"
        return header + _yaml(recommendation.as_lightning(batch_arg_name, lr_attr_name))
    return header + _yaml(recommendation.to_dict())


def _json(values: dict) -> str:
    return json.dumps(values, indent=2) + "\n"


def _yaml(values: dict) -> str:
    try:
        import yaml
    except ImportError:
        from autobatch.errors import AutobatchError

        raise AutobatchError("YAML output needs PyYAML: pip install pyyaml") from None
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
