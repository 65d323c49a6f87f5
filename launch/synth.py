"""`hiervl synth`: write the embedded synthetic corpus (real videos + manifest.csv).

Owns: `hiervl synth` arguments.
Must not touch: the corpus (dataprep/synth.py).
"""

from __future__ import annotations

import time

from hiervl.errors import UserError

HELP = "write the synthetic corpus: tiny videos of moving shapes with ordered, paraphrased captions"
DESCRIPTION = """Write real video files of coloured shapes doing things in order, each with several
paraphrased captions, plus DIR/manifest.csv (video, caption, key, split, group) for `hiervl prep`.
Videos come in groups of four (the `group` column) that share objects but differ in event order
or direction, so retrieval needs order and detail. The same seed gives the same bytes.

Two kinds (--kind):
  pairs   (default) two objects, two events, 2 s; every caption names both events in order
          ("a red circle slides left, then a blue square drops").
  events  three objects, 3-5 events (one object moves one way per event), 3 s (24 frames at
          8 fps); each caption names only SOME events, DiDeMo / ActivityNet style: one event
          anchored in time ("in the end the red circle drops"), two or three events in order, or
          every event as a paragraph ("First ... Then ... Finally ..."). Every caption is true of
          its own video and false of its three siblings.

Examples:
  hiervl synth --out runs/demo/corpus --num-videos 600 --seed 0
  hiervl synth --kind events --out runs/events/corpus --num-videos 600"""


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (videos/ and manifest.csv)")
    parser.add_argument("--num-videos", type=int, default=600, metavar="N", help="number of videos (default 600)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--codec", choices=("vp9", "h264"), default="vp9", help="vp9 (webm, default) or h264 (mp4)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (default 64)")
    parser.add_argument("--fps", type=int, default=8, help="frames per second (default 8)")
    parser.add_argument("--kind", choices=("pairs", "events"), default="pairs",
                        help="pairs (two events, captions name both; default) or events (3-5 events, captions "
                             "name some of them)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="video length (default 2.0 for pairs, 3.0 for events)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of videos in the test split")


def main(args, cfg) -> int:
    from hiervl.dataprep.synth import make_corpus

    if args.num_videos < 1:
        raise UserError(f"--num-videos {args.num_videos}: need at least 1")
    if args.size < 16 or args.size % 2:
        raise UserError(f"--size {args.size}: need an even number >= 16")
    if not 0.0 <= args.test_fraction < 1.0:
        raise UserError(f"--test-fraction {args.test_fraction}: need a value in [0, 1)")
    if args.seconds is not None and args.seconds <= 0:
        raise UserError(f"--seconds {args.seconds}: need a positive length")
    if args.fps < 1:
        raise UserError(f"--fps {args.fps}: need at least 1")
    t0 = time.time()
    manifest = make_corpus(args.out, args.num_videos, seed=args.seed, codec=args.codec, size=args.size,
                           fps=args.fps, seconds=args.seconds, test_fraction=args.test_fraction, progress=True,
                           kind=args.kind)
    dt = time.time() - t0
    print(f"synth: {args.num_videos} {args.kind} videos ({args.codec}) in {dt:.1f}s ({args.num_videos / dt:.1f} videos/s) "
          f"-> {manifest}")
    return 0
