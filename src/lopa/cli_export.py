"""``lopa export``: a prompt-tuning artifact to a PEFT adapter, or (``--from-peft``) a PEFT prompt-tuning
adapter to a lopa artifact.

Example::

    $ lopa export runs/rotten-tomatoes-prompt-tuning/best --out peft-adapter/
    $ lopa export peft-adapter/ --from-peft --out lopa-artifact/
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class ExportArgs:
    """Convert between lopa artifacts and PEFT prompt-tuning adapters (safetensors only, never pickles)."""

    source: str = field(default="", metadata={"positional": True})
    """the artifact directory (or, with --from-peft, the PEFT adapter directory)"""
    out: str = ""
    """where to write the result"""
    from_peft: bool = False
    """import a PEFT prompt-tuning adapter instead of exporting to one"""

    def __post_init__(self) -> None:
        if not self.source or not self.out:
            raise ValueError("give the SOURCE directory and --out")


def export_cli(args: ExportArgs) -> int:
    from .artifact import ArtifactError, export_peft, import_peft
    try:
        if args.from_peft:
            art = import_peft(args.source, out=args.out)
            print(json.dumps({"imported": args.source, "out": args.out, "method": art.config.method,
                              "num_virtual_tokens": art.config.num_virtual_tokens, "hidden_size": art.hidden_size}))
        else:
            export_peft(args.source, args.out)
            print(json.dumps({"exported": args.source, "out": args.out, "format": "peft PROMPT_TUNING"}))
    except ArtifactError as e:
        print(f"lopa export: error: {e}")
        return 2
    return 0
