"""Transcribe audio files: ``python -m asr.transcribe MODEL AUDIO [AUDIO ...] [key=value ...] [--json]``.

MODEL is a Lightning checkpoint of ``asr.train`` or a folder written by ``asr.export``. AUDIO: any file soundfile
reads (FLAC, WAV, OGG, MP3, ...), at any sample rate (resampled) and with any number of channels (mixed down), of any
length (run in overlapping chunks, so memory stays bounded; asr/inference.py). Prints ``path<TAB>text`` per file, or
a JSON object per line with ``--json`` ({"path", "text", "seconds"}). The decoder is the training config's,
``decoder=greedy`` unless overridden (``decoder=beam decoder.beam_size=50``, ...; the overrides compose the train
config, as for ``asr.evaluate``). A file that cannot be read is named on stderr and the others are still transcribed;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from hydra.errors import HydraException

from asr.builders import build_decoder
from asr.checkpoint import load_trained
from asr.config import compose
from asr.inference import AudioError, Transcriber

_OVERRIDE = re.compile(r"^[~+]{0,2}[\w.@/-]+=")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m asr.transcribe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Lightning checkpoint (.ckpt) of asr.train, or a folder of asr.export")
    parser.add_argument("inputs", nargs="+", metavar="AUDIO", help="audio files, and key=value overrides")
    parser.add_argument("--json", action="store_true", help="a JSON object per line instead of path<TAB>text")
    parser.add_argument("--chunk-seconds", type=float, default=30.0, help="longest audio per forward pass")
    parser.add_argument("--overlap-seconds", type=float, default=6.0, help="overlap of consecutive chunks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_intermixed_args(argv)
    # key=value is an override, unless it is a file.
    args.overrides = [a for a in args.inputs if _OVERRIDE.match(a) and not Path(a).exists()]
    args.files = [a for a in args.inputs if a not in args.overrides]
    if not args.files:
        parser.error("no audio files given")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = compose("train", args.overrides)
    except HydraException as err:
        raise SystemExit(f"asr.transcribe: {err}") from err
    model = load_trained(args.model)
    decoder = build_decoder(cfg, model.tokenizer)
    try:
        transcriber = Transcriber(model, decoder, args.chunk_seconds, args.overlap_seconds, args.device)
    except ValueError as err:
        raise SystemExit(f"asr.transcribe: {err}") from err
    failed = 0
    for path in args.files:
        try:
            result = transcriber(path)
        except AudioError as err:
            failed += 1
            print(f"asr.transcribe: {err}", file=sys.stderr, flush=True)
            continue
        if args.json:
            line = json.dumps({"path": result.path, "text": result.text, "seconds": round(result.seconds, 3)})
        else:
            line = f"{result.path}\t{result.text}"
        print(line, flush=True)
    if failed:
        print(f"asr.transcribe: {failed} of {len(args.files)} files failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
