"""One input sample and one refusal: what every input reader (sources, benchmarks) produces.

Owns: `Sample` (a video or clip with its captions, as the plan and the shard worker see it) and
`Refusal` (an input refused before processing: a quarantine row, pipeline/data/manifest.py).
Must not touch: reading files or planning shards; readers build these, the plan consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hiervl.data.manifest import quarantine_row


@dataclass
class Sample:
    """One input: a video (or a clip of one) with its captions. `video` is a local path or an s3://, gs://, http(s):// URL."""

    key: str
    video: str
    captions: list
    split: str = "train"
    start: float | None = None
    end: float | None = None
    video_id: str | None = None  # clips of one source video share it; default: the key
    orig_key: str | None = None
    sentences: list | None = None  # paragraph entries: the sentences joined into the caption, in order
    extra: dict = field(default_factory=dict)  # metadata copied into the sample's JSON
    group: str | None = None  # related samples (hard negatives) share it; None = no group
    invalid: str | None = None  # why its manifest row is refused (a bad cell); never planned, not in to_dict

    def to_dict(self) -> dict:
        d = {"key": self.key, "video": self.video, "captions": list(self.captions), "split": self.split,
             "start": self.start, "end": self.end, "video_id": self.video_id, "orig_key": self.orig_key,
             "sentences": self.sentences, "extra": self.extra}
        if self.group is not None:  # only when set: shard fingerprints of ungrouped inputs stay as they were
            d["group"] = self.group
        return d


@dataclass
class Refusal:
    """An input refused before or during processing: a row of quarantine.parquet."""

    source: str
    key: str
    stage: str  # input | probe | validate | decode | transcode
    reason: str

    def to_dict(self) -> dict:
        return quarantine_row(self.source, self.key, self.stage, self.reason)
