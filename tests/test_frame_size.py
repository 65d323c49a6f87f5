"""Issue 25 (hidden class: decode memory on extreme frame sizes outside prep): the API and `hiervl
search index` decode each wanted frame whole as RGB; a frame above 8K (MAX_PIXELS) is refused from
its header in one line naming the file and the fix, before any frame is decoded. Prep (which scales
frames as it streams them) is not limited."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from test_evaluate import SMALL, TINY, make_model

BIG = (4336, 7696)  # height, width: just above 8K UHD (7680 x 4320)


def _one_frame(height: int, width: int) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8, options={"preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("frame_size") / "huge.mp4"
    path.write_bytes(_one_frame(*BIG))
    return path


def test_an_above_8k_video_is_refused_before_decoding(big_video, monkeypatch):
    import hiervl.data.decode as decode
    from hiervl.api import HierVLModel
    from hiervl.config import load_config
    from hiervl.data.video_file import MAX_PIXELS, probe_video_file
    from hiervl.errors import UserError

    assert BIG[0] * BIG[1] > MAX_PIXELS >= 7680 * 4320  # an 8K UHD frame still passes
    cfg = load_config(TINY, SMALL + ["model.preset=flat", "data.decoder=pyav"])
    api = HierVLModel(make_model(cfg), cfg, __import__("torch").device("cpu"))

    def never(*args, **kwargs):
        raise AssertionError("a frame was decoded")

    monkeypatch.setattr(decode, "decode_pyav", never)
    for call in (lambda: probe_video_file(big_video.read_bytes(), str(big_video)),
                 lambda: api.encode_video(big_video)):
        with pytest.raises(UserError) as e:
            call()
        text = str(e.value)
        assert "\n" not in text and str(big_video) in text and "7696x4336 frames" in text, text
        assert "scale it down" in text and "hiervl prep" in text, text


def test_search_index_skips_it_with_that_reason(big_video, tmp_path):
    from fixtures import write_shards
    from hiervl.config import load_config
    from hiervl.eval.search import build_video_index
    from test_api import extract_videos

    data = write_shards(tmp_path / "shards", 2, "vp9", split="test", per_shard=2)
    videos = tmp_path / "videos"
    extract_videos(data, videos)
    (videos / "huge.mp4").write_bytes(big_video.read_bytes())
    cfg = load_config(TINY, SMALL + ["model.preset=flat", "data.decoder=pyav"])
    summary = build_video_index(tmp_path / "nockpt", tmp_path / "idx", videos=videos, model=make_model(cfg))
    assert summary["count"] == 2 and summary["skipped"] == 1
    (key, reason), = summary["skipped_videos"]
    assert key == "huge" and "7696x4336 frames" in reason and "above the 33 Mpx (8K)" in reason, reason
