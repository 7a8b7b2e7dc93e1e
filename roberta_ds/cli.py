"""`roberta-ds <subcommand>`: one entry point for every tool; each subcommand lives in its own module.

Each target is `module:function`, imported only when its subcommand runs (so `roberta-ds plan`
does not pay for importing DeepSpeed). Every function takes `argv: list[str]` and returns an exit
code. A `UserError` prints its message (it names the file, field or flag and the fix) and exits 1.
"""

from __future__ import annotations

import importlib
import sys

from roberta_ds.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("roberta_ds.quickstart.pipeline:main", "the whole pipeline on the built-in corpus"),
    "tokenizer": ("data_tools.train_tokenizer:main", "train a byte-level BPE tokenizer (or adopt a tokenizer.json)"),
    "build-shards": ("data_tools.build_shards:main", "tokenize text/JSONL/gz into .bin/.idx shards + manifest"),
    "inspect": ("data_tools.inspect_shards:inspect_main", "counts, length histogram, decode sequence i"),
    "verify": ("data_tools.inspect_shards:verify_main", "full integrity check of a shard set"),
    "merge": ("data_tools.merge_shards:main", "concatenate shard sets made with the same tokenizer"),
    "adopt-shards": ("data_tools.adopt_shards:main", "verify Megatron-written .bin/.idx and write our manifest"),
    "build-shards-parallel": ("data_tools.build_shards_parallel:main",
                              "one task of an N-way build-shards (a SLURM array), or their merge"),
    "train": ("roberta_ds.train:main", "pretrain under DeepSpeed (run it through a launcher)"),
    "export-hf": ("roberta_ds.hf.convert:export_main", "checkpoint -> Hugging Face RobertaForMaskedLM"),
    "import-hf": ("roberta_ds.hf.convert:import_main", "Hugging Face RoBERTa -> our state dict"),
    "plan": ("roberta_ds.plan.cli:main", "memory, micro batch and time plan for a cluster job"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: roberta-ds <command> [options]   (roberta-ds <command> --help for its options)", ""]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"roberta-ds: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except UserError as e:
        print(f"roberta-ds {name}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
