"""Decoding (pipeline/data/decode.py): DALI vs PyAV agree, PyAV's GOP seeking is exact, the transform."""

import io

import av
import numpy as np
import pytest
import torch
from fixtures import encode_clip
from hiervl.data.decode import DaliVideoDecoder, choose_backend, dali_available, decode_pyav, transform_clip

needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


@pytest.fixture(scope="module")
def clips():
    return {"vp9": encode_clip(23, 1, "vp9", gop=5), "h264": encode_clip(23, 2, "h264", gop=5)}


def decode_all(data: bytes) -> np.ndarray:
    """Reference: every frame, decoded front to back."""
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("codec", ["vp9", "h264"])
def test_pyav_seeking_decode_returns_exactly_the_requested_frames(clips, codec):
    ref = decode_all(clips[codec])
    assert len(ref) == 23
    for frames in ([0, 7, 14, 22], [22, 3, 3, 11, 0], [5, 6, 10, 20], list(range(23))):
        got = decode_pyav(clips[codec], np.array(frames))
        assert got.shape == (len(frames), 32, 40, 3)
        assert np.array_equal(got, ref[frames])  # bit-exact: same decoder, GOP seeking must not shift frames
    assert np.array_equal(decode_pyav(clips[codec], np.array([99])), ref[[22]])  # out of range: clamped


def test_pyav_refuses_garbage():
    with pytest.raises(Exception):
        decode_pyav(b"\x00not a video" * 20, np.array([0]))


@needs_dali
@pytest.mark.integration
def test_dali_and_pyav_give_the_same_frames_for_the_same_vp9_clip(clips):
    frames = np.array([1, 6, 12, 21], dtype=np.int32)
    dec = DaliVideoDecoder(max_batch=2, num_threads=1)
    dali, other = dec.decode([clips["vp9"], clips["vp9"]], [frames, frames[::-1].copy()])
    pyav = decode_pyav(clips["vp9"], frames)
    assert dali.shape == pyav.shape == (4, 32, 40, 3)
    diff = np.abs(dali.astype(np.int16) - pyav)
    assert diff.mean() < 2.0  # only the YUV->RGB conversion differs (chroma upsampling)
    assert np.array_equal(other, dali[::-1])
    # frames really differ from each other, so matching the index matters
    assert np.abs(dali[0].astype(np.int16) - pyav[1]).mean() > 5 * diff.mean()
    a = transform_clip(dali, 20, 16, mean=[0.5] * 3, std=[0.25] * 3)
    b = transform_clip(pyav, 20, 16, mean=[0.5] * 3, std=[0.25] * 3)
    assert (a - b).abs().mean() < 0.03  # after resize/crop/normalise: same tensors within tolerance


@needs_dali
@pytest.mark.integration
def test_dali_names_the_bad_sample_and_keeps_decoding(clips):
    dec = DaliVideoDecoder(max_batch=3, num_threads=1)
    frames = [np.array([0, 5], np.int32)] * 3
    out = dec.decode([clips["vp9"], b"\x1a\x45garbage" * 30, clips["vp9"]], frames)
    assert isinstance(out[1], Exception) and not isinstance(out[0], Exception)
    assert np.array_equal(out[0], out[2])
    again = dec.decode([clips["vp9"]], frames[:1])  # the pipeline was rebuilt after the error
    assert np.array_equal(again[0], out[0])


def test_backend_choice():
    assert choose_backend("auto", "vp9", "cpu", has_dali=True) == "dali"
    assert choose_backend("auto", "h264", "cpu", has_dali=True) == "pyav"  # DALI's CPU backend lacks H.264
    assert choose_backend("auto", "h264", "gpu", has_dali=True) == "dali"  # NVDEC does
    assert choose_backend("auto", "vp9", "cpu", has_dali=False) == "pyav"
    assert choose_backend("pyav", "vp9", "cpu", has_dali=True) == "pyav"
    # with decode workers on a CPU machine, auto gives them every sample (DALI CPU measured no cheaper)
    assert choose_backend("auto", "vp9", "cpu", has_dali=True, workers=1) == "pyav"
    assert choose_backend("dali", "vp9", "cpu", has_dali=True, workers=1) == "dali"  # asked for: kept
    assert choose_backend("auto", "h264", "gpu", has_dali=True, workers=4) == "dali"  # NVDEC beside the workers


def test_auto_decode_workers_are_the_cores_left_after_the_ranks():
    from hiervl.data.decode_pool import resolve_decode_workers

    assert resolve_decode_workers(3, "cpu", 2) == 3  # a number is kept
    assert resolve_decode_workers("auto", "cpu", 2, cores=2, local_ranks=2) == 1  # none left: still 1 on CPU
    assert resolve_decode_workers("auto", "cpu", 2, cores=16, local_ranks=2) == 7  # (16 - 2) / 2
    assert resolve_decode_workers("auto", "cpu", 1, cores=64) == 8  # capped
    assert resolve_decode_workers("auto", "gpu", 8, cores=8, local_ranks=8) == 0  # DALI mixed alone
    assert resolve_decode_workers("auto", "gpu", 16, cores=80, local_ranks=8) == 8  # (80 - 8) / 8 = 9, capped at 8
    with pytest.raises(RuntimeError, match="not installed"):
        choose_backend("dali", "vp9", "cpu", has_dali=False)


def test_transform_resizes_crops_flips_and_normalises():
    frames = np.zeros((2, 30, 60, 3), np.uint8)
    frames[:, :, :30] = 255  # left half white
    out = transform_clip(frames, short_side=10, size=10, crop=(0.5, 0.0), mean=[0.5] * 3, std=[0.5] * 3)
    assert out.shape == (2, 3, 10, 10) and out.dtype == torch.float32
    assert torch.allclose(out[..., :4], torch.ones(1))  # left crop: white -> (1 - .5) / .5 = 1
    right = transform_clip(frames, 10, 10, crop=(0.5, 1.0), mean=[0.5] * 3, std=[0.5] * 3)
    assert torch.allclose(right[..., 2:], -torch.ones(1))  # right crop: black -> -1 (away from the blurred edge)
    flipped = transform_clip(frames, 10, 10, crop=(0.5, 0.0), flip=True, mean=[0.5] * 3, std=[0.5] * 3)
    assert torch.equal(flipped, out.flip(-1))
    assert transform_clip(frames, 10, 10, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_uint8_resize_is_the_float_resize_to_rounding_and_one_arithmetic_for_every_path():
    """CPU frames are resized once in uint8 (no float copy of the full frames): within one grey level
    of the float resize, and the pool's split (resize in the worker, normalise into the batch slot)
    gives exactly what transform_clip gives."""
    from hiervl.data.decode import normalize_clip, resize_crop_uint8

    rng = np.random.default_rng(0)
    for shape in ((8, 64, 80, 3), (4, 16, 20, 3)):  # shrink (antialiased) and enlarge
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        frames[:, :, : shape[2] // 2] //= 4  # structure, not only noise
        u8 = resize_crop_uint8(frames, 36, 32, (0.25, 0.75), True)
        assert u8.dtype == torch.uint8 and u8.shape == (shape[0], 3, 32, 32) and u8.is_contiguous()
        ref = transform_clip(torch.as_tensor(frames).float(), 36, 32, (0.25, 0.75), True)  # the float path
        assert (u8.float() - ref * 255).abs().max() <= 1.0 + 1e-3  # fixed-point uint8 kernel: within a grey level
        want = transform_clip(frames, 36, 32, (0.25, 0.75), True, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4])
        slot = torch.empty(shape[0], 3, 32, 32)
        normalize_clip(u8, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4], out=slot)
        assert torch.equal(slot, want)
    with pytest.raises(TypeError, match="uint8 CPU frames"):
        resize_crop_uint8(np.zeros((1, 4, 4, 3), np.float32), 4, 4)
