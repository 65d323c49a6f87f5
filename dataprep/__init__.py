"""Shard preparation: videos + captions in, verified WebDataset shards out (on Ray).

- `synth`: the embedded synthetic corpus (`make_corpus`).
- `sample`: `Sample` and `Refusal`, what every reader produces.
- `sources`, `benchmarks`: manifests (CSV/JSONL/Parquet) and benchmark annotation files
  (msrvtt, msvd, lsmdc, didemo, activitynet) into `Sample`s; input-stage checks, safe keys.
  MSRVTT_data.json, MSVD captions and LSMDC are parsed from their published descriptions
  (no copy of those files could be had); the others from the real public files.
- `transcode`: probe, validate, decode, resample, resize, encode (PyAV), reproducibly.
- `plan`: sample-to-shard assignment, a pure function of the input and the config.
- `shard_writer`: reproducible tars and their DALI index (the `wds2idx` format), atomically.
- `worker`: one shard's work (a Ray task); `driver`: `prepare(...)`; `verify`: `--verify`.
- `out_lock`: one prep at a time per output folder; `dataset_inputs`: which input made which
  split of a folder, and when a run must refuse (or `--overwrite`).
The dataset files' schema is `pipeline/data/manifest.py`'s; dataprep imports no training code.
"""

if __name__ != "hiervl.dataprep":  # imported as a top-level `dataprep` from the repository root
    raise ImportError(f"this folder is the package `hiervl.dataprep`, not `{__name__}`: `import hiervl.dataprep`")
