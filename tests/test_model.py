"""HierarchicalModel on the tiny config: every preset trains, overfits, encodes, and masks correctly."""

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hiervl.config import load_config
from hiervl.errors import UserError
from hiervl.model.hierarchical import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = ["data.num_frames=4", "data.max_words=12", "queue.size=64", "model.text.num_layers=1",
         "model.vision.layers=1"]  # MiniLM and the frame ViT cut to 1 layer: what these check does not need 2
PRESETS = ["hit", "hcmi", "hanet", "flat"]


def _cfg(preset, extra=()):
    # HiT's momentum recipe with its queues, whatever tiny.yaml picks (tests below override it)
    return load_config(TINY, [f"model.preset={preset}", *SMALL, "queue.objective=momentum", "queue.enabled=true",
                              *extra])


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 12, dtype=torch.long)
    for i in range(n):
        mask[i, : 4 + (i * 3) % 8] = 1
    return {"video": torch.randn(n, 4, 3, 32, 32, generator=g),
            "input_ids": torch.randint(1000, 3000, (n, 12), generator=g) * mask, "attention_mask": mask,
            "video_ids": torch.arange(n), "valid": torch.ones(n, dtype=torch.bool)}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("objective", ["momentum", "symmetric"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_every_parameter_and_overfits_a_small_batch(preset, objective):
    torch.manual_seed(0)
    cfg = _cfg(preset, [f"queue.objective={objective}"])
    model = build_model(cfg)
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, foreach=True)  # CPU default: a loop over ~200 tensors
    losses = []
    hinge = cfg.model.loss == "hinge"  # hanet's default: VSE++'s hardest-negative hinge learns more slowly
    for step in range(60 if hinge else 25):
        out = model(batch)
        # hanet trains HANet's one loss on the fused score by default (presets.PRESET_LOSS)
        assert set(out["losses"]) == ({"fused"} if cfg.model.loss_on == "fused" else set(model.levels))
        out["loss"].backward()
        if step == 0:  # every trainable parameter is reached (ZeRO needs no unused parameters)
            missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, missing
        opt.step()
        opt.zero_grad()
        model.momentum_update()
        model.enqueue(out)
        losses.append(out["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < (0.7 if hinge else 0.5) * losses[0], losses
    if hinge:  # a hinge can stay above 0 with the ranking right: the batch must be retrieved
        model.eval()
        with torch.no_grad():
            sim = model.similarity(model.encode_text(batch["input_ids"], batch["attention_mask"]),
                                   model.encode_video(batch["video"]))["fused"]  # [8 texts, 8 videos]
        assert sim.argmax(dim=1).tolist() == list(range(8))


def test_levels_per_preset_and_key_encoders_are_frozen():
    expected = {"hit": ["feature", "semantic"], "hcmi": ["frame_word", "clip_phrase", "video_sentence"],
                "hanet": ["individual", "local", "global"], "flat": ["global"]}
    model = build_model(_cfg("hcmi"))
    assert model.levels == expected["hcmi"]
    assert not any(p.requires_grad for p in model.video_key.parameters())
    assert not any(p.requires_grad for p in model.text_key.parameters())
    assert model.logit_scale.requires_grad  # learnable temperature in hcmi
    assert set(model.queues) == {f"{lv}_{m}" for lv in expected["hcmi"] for m in ("video", "text")}
    state = model.state_dict()  # the queues are the objective's (pipeline/model/objective.py), in every checkpoint
    assert "objective.queues.frame_word_text.emb" in state and "objective.queues.frame_word_text.ptr" in state
    for preset in ("hit", "hanet", "flat"):
        assert [lv.name for lv in __import__("hiervl.model.levels").model.levels.preset_levels(preset)] == expected[preset]


def test_momentum_update_matches_hand_computation():
    model = build_model(_cfg("flat", ["queue.momentum=0.9"]))
    with torch.no_grad():
        for p in model.video.parameters():
            p.add_(torch.randn_like(p))
    q = {n: p.detach().clone() for n, p in model.video.named_parameters()}
    k = {n: p.detach().clone() for n, p in model.video_key.named_parameters()}
    model.momentum_update()
    for n, p in model.video_key.named_parameters():
        torch.testing.assert_close(p, 0.9 * k[n] + 0.1 * q[n])
    assert any(not torch.equal(k[n], q[n]) for n in q)


def test_enqueue_drops_padded_samples_and_keeps_order():
    model = build_model(_cfg("hit", ["queue.size=5"]))
    batch = _batch(4)
    batch["video_ids"] = torch.tensor([11, 12, 13, 14])
    batch["valid"] = torch.tensor([True, False, True, True])
    with torch.no_grad():
        out = model(batch)
    model.enqueue(out)
    q = model.queues["semantic_video"]
    assert q.video_ids.tolist()[:3] == [11, 13, 14] and q.valid.tolist() == [True] * 3 + [False] * 2
    with torch.no_grad():
        k = model.video_key(batch["video"])["semantic"]
    torch.testing.assert_close(q.emb[:3], k[[0, 2, 3]])
    model.enqueue(out)  # 3 more into 5 slots: wraps
    assert q.video_ids.tolist() == [14, 13, 14, 11, 13] and int(q.ptr) == 1


def test_same_video_and_empty_queue_entries_are_not_negatives():
    model = build_model(_cfg("flat", ["queue.size=4", "queue.batch_negatives=false"]))
    batch = _batch(2)
    batch["video_ids"] = torch.tensor([5, 6])
    batch["valid"] = torch.tensor([True, False])  # the loss is sample 0's alone
    q = model.queues["global_text"]
    emb = torch.nn.functional.normalize(torch.randn(2, q.emb.shape[1]), dim=-1)
    q.push({"emb": emb}, torch.tensor([5, 99]))  # slot 0: sample 0's own video; slot 1: another video

    def loss_of_sample0():
        with torch.no_grad():
            return model(batch)["losses"]["global"].item()

    base = loss_of_sample0()
    q.emb[0] = -q.emb[0]  # same video as query 0: masked
    q.emb[2] = torch.ones_like(q.emb[2])  # a never-filled slot: never a negative
    assert loss_of_sample0() == pytest.approx(base, abs=1e-6)
    q.emb[1] = -q.emb[1]  # a real negative: the loss changes
    assert loss_of_sample0() != pytest.approx(base, abs=1e-4)


def test_frame_order_matters():
    # the plain tower (frame differences would carry the order too: tests/test_encoders.py checks them)
    model = build_model(_cfg("flat", ["model.vision.frame_diff=false", "model.vision.space_time=none"]))
    video = _batch(2)["video"]
    with torch.no_grad():
        a = model.encode_video(video)["global"]
        b = model.encode_video(video.flip(1))["global"]
    assert (a - b).abs().max() > 1e-5
    with torch.no_grad():  # the learned temporal position embedding is what carries the order
        model.video.encoder.temporal_pos.zero_()
        a = model.encode_video(video)["global"]
        b = model.encode_video(video.flip(1))["global"]
    assert (a - b).abs().max() < 1e-6


def test_similarity_levels_and_weighted_fusion():
    model = build_model(_cfg("hit", ["model.level_weights={feature: 1.0, semantic: 3.0}"]))
    batch = _batch(3)
    with torch.no_grad():
        v = model.encode_video(batch["video"])
        t = model.encode_text(batch["input_ids"], batch["attention_mask"])
        sims = model.similarity(t, {k: x[:2] for k, x in v.items()})  # embeddings slice on dim 0
    assert v["feature"].shape == (3, 4, 128) and t["feature"].shape == (3, 12, 128) and t["feature_mask"].shape == (3, 12)
    assert sims["feature"].shape == (3, 2)
    torch.testing.assert_close(sims["fused"], 0.25 * sims["feature"] + 0.75 * sims["semantic"])
    torch.testing.assert_close(sims["semantic"], t["semantic"] @ v["semantic"][:2].T)
    with pytest.raises(UserError, match="level_weights"):
        build_model(_cfg("hit", ["model.level_weights={frame_word: 1.0}"]))


def test_feature_layer_out_of_range_is_a_user_error():
    with pytest.raises(UserError, match="feature_layer"):
        build_model(_cfg("hit", ["model.feature_layer=5"]))


def test_clip_vision_checkpoint_loads_from_a_local_directory(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ref = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8))
    ref.save_pretrained(tmp_path / "clip")
    # RGB only, so every tensor loads as saved (with frame_diff: tests/test_encoders.py)
    model = build_model(_cfg("flat", [f"model.vision.clip_path={tmp_path / 'clip'}", "model.vision.frame_diff=false"]))
    loaded = model.video.encoder.vit.state_dict()
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(loaded[name], value)
    with torch.no_grad():
        assert model.encode_video(_batch(2)["video"])["global"].shape == (2, 128)
    with pytest.raises(UserError, match="clip_path"):
        build_model(_cfg("flat", [f"model.vision.clip_path={tmp_path / 'missing'}"]))


OFFLINE_SCRIPT = r"""
import socket
def refuse(*a, **k):
    raise OSError("network access attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
import torch
from safetensors.torch import load_file
from hiervl.model.text_model import load_text_model, load_tokenizer, resolve_text_model_path
model = load_text_model("default", pretrained=True, num_layers=2)
tok = load_tokenizer("default")
ref = load_file(str(resolve_text_model_path("default") / "model.safetensors"))
key = next(k for k in ref if k.endswith("word_embeddings.weight"))
assert torch.equal(model.embeddings.word_embeddings.weight, ref[key])
assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2
random = load_text_model("default", pretrained=False, num_layers=1)
assert not torch.equal(random.embeddings.word_embeddings.weight, ref[key])
ids = tok(["a man plays guitar"], return_tensors="pt")
print("OK", model(**ids).last_hidden_state.shape[-1])
"""


def test_default_text_encoder_loads_without_network():
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK 384" in proc.stdout


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_embeddings_keeps_the_word_table_fixed_and_trains_the_rest(freeze):
    torch.manual_seed(0)
    model = build_model(_cfg("flat", [f"model.text.freeze_embeddings={str(freeze).lower()}"]))
    bert = model.text.encoder.model  # the transformers model inside the query text tower
    table, query = bert.get_input_embeddings().weight, bert.encoder.layer[0].attention.self.query.weight
    before, query_before = table.detach().clone(), query.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(_batch())["loss"].backward()
    opt.step()
    assert table.requires_grad is not freeze
    assert torch.equal(table, before) is freeze  # AdamW moves every row it has a gradient for
    assert not torch.equal(query, query_before)


def test_checkpoints_with_the_queues_under_their_old_names_still_load():
    model = build_model(_cfg("flat", ["queue.size=4"]))
    model.enqueue(model(_batch(3)))
    old = {k.replace("objective.queues.", "queues."): v.clone() for k, v in model.state_dict().items()}
    assert "queues.global_text.emb" in old  # the layout before the objective module
    fresh = build_model(_cfg("flat", ["queue.size=4"]))
    fresh.load_state_dict(old)  # strict
    for name, q in model.queues.items():
        for buf, value in q.state_dict().items():
            assert torch.equal(fresh.queues[name].state_dict()[buf], value)
    assert int(fresh.queues["global_video"].ptr) == 3


@pytest.mark.parametrize("objective", ["momentum", "symmetric"])
def test_each_direction_reaches_both_towers_only_in_the_symmetric_recipe(objective):
    """symmetric: text->video alone trains the video tower too (its queries are the columns), and
    video->text the text tower; momentum: a direction reaches only its query tower (keys are detached)."""
    torch.manual_seed(0)
    model = build_model(_cfg("hit", [f"queue.objective={objective}"]))
    batch = _batch(4)

    def grad_norms(direction):
        model.zero_grad()
        q_v, q_t = model.video(batch["video"]), model.text(batch["input_ids"], batch["attention_mask"])
        with torch.no_grad():
            k_v, k_t = model.video_key(batch["video"]), model.text_key(batch["input_ids"], batch["attention_mask"])
        per, _, _ = model.objective.direction_losses(q_v, q_t, k_v, k_t, batch["video_ids"], batch["valid"],
                                                     model.logit_scale, rank=0, world_size=1)
        sum(terms[direction].sum() for terms in per.values()).backward()
        norm = lambda tower: sum(float(p.grad.abs().sum()) for p in tower.parameters() if p.grad is not None)  # noqa: E731
        return norm(model.video), norm(model.text)

    v2t_video, v2t_text = grad_norms(0)
    t2v_video, t2v_text = grad_norms(1)
    assert v2t_video > 0 and t2v_text > 0  # the query tower of each direction, in both recipes
    if objective == "symmetric":
        assert t2v_video > 0 and v2t_text > 0
    else:
        assert t2v_video == 0 and v2t_text == 0


@pytest.mark.parametrize("recipe", [["queue.objective=symmetric"],
                                    ["queue.objective=momentum", "queue.gather_batch_with_grad=true"]])
def test_no_queue_no_momentum_high_lr_trains_instead_of_collapsing(recipe):
    """The reported collapse: queue.enabled=false queue.momentum=0 queue.gather_batch_with_grad=true
    train.lr=1e-3. Scoring the in-batch queries only as negatives against a key positive sent every
    video and every caption to two antipodal points: all similarities -1, the loss stuck at
    log(2N-1) (2.71 here, from step 3 on). Both recipes that score the queries with gradient on
    both sides of the pair train: the loss falls well below log(N)."""
    torch.manual_seed(0)
    model = build_model(_cfg("flat", ["queue.enabled=false", "queue.momentum=0", *recipe]))
    batch = _batch(8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0, foreach=True)
    losses = []
    for _ in range(40):
        out = model(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
        model.momentum_update()
        model.enqueue(out)
        losses.append(out["loss"].item())
    assert sum(losses[-5:]) / 5 < 0.5 * math.log(8), losses
    with torch.no_grad():
        v = model.encode_video(batch["video"])["global"]
    assert (v @ v.T - torch.eye(8)).max() < 0.9  # the videos did not collapse to one point


def test_queue_objective_settings_are_validated():
    from hiervl.config import ConfigError

    with pytest.raises(ConfigError, match="queue.objective='clip' is not allowed; choose one of momentum, symmetric"):
        _cfg("flat", ["queue.objective=clip"])
    with pytest.raises(ConfigError, match="gather_batch_with_grad=true applies to queue.objective=momentum only"):
        _cfg("flat", ["queue.objective=symmetric", "queue.gather_batch_with_grad=true"])
    with pytest.raises(ConfigError, match="leaves no negatives"):
        _cfg("flat", ["queue.enabled=false", "queue.batch_negatives=false"])


def test_symmetric_without_a_queue_has_no_key_encoders_and_loses_nothing():
    """No key is scored or kept: the key encoders do not exist (not built, run, updated nor saved),
    and the loss is the one the same weights give with key encoders running beside them."""
    cfg = _cfg("hit", ["queue.objective=symmetric", "queue.enabled=false"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not model.uses_keys and model.video_key is None and model.text_key is None
    assert not any(k.startswith(("video_key.", "text_key.")) for k in model.state_dict())
    with_keys = _cfg("hit", ["queue.objective=momentum", "queue.enabled=false"])
    assert sum(p.numel() for p in build_model(with_keys).parameters()) > 1.9 * sum(
        p.numel() for p in model.parameters())  # the copies were half the parameters
    batch = _batch(4)
    with torch.no_grad():
        skipped = model(batch)["loss"]
    model.momentum_update()  # nothing to update: no error
    # the same weights in a model that builds and runs key encoders (loss symmetric: nothing reads them)
    torch.manual_seed(0)
    ran_model = build_model(cfg)
    ran_model.uses_keys = True
    ran_model.video_key, ran_model.text_key = copy.deepcopy(ran_model.video), copy.deepcopy(ran_model.text)
    ran_model.load_state_dict(model.state_dict())  # key encoders start as copies of the query towers
    calls = []
    ran_model.video_key.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ran = ran_model(batch)["loss"]
    assert calls == [1]
    torch.testing.assert_close(skipped, ran)


def test_a_checkpoint_of_the_other_objective_loads_strictly_both_ways():
    """A symmetric model loads a momentum run's state (its copies dropped); a momentum model loads a
    symmetric run's (its copies start as the query towers, as at build)."""
    torch.manual_seed(0)
    momentum = build_model(_cfg("hit", ["queue.objective=momentum", "queue.enabled=false"]))
    symmetric = build_model(_cfg("hit", ["queue.objective=symmetric", "queue.enabled=false"]))
    symmetric.load_state_dict(momentum.state_dict())  # strict: video_key.* / text_key.* dropped
    with torch.no_grad():
        for p in symmetric.video.parameters():
            p.add_(0.5)
    momentum.load_state_dict(symmetric.state_dict())  # strict: the copies are filled in
    for (n, k), q in zip(momentum.video_key.named_parameters(), momentum.video.parameters()):
        assert torch.equal(k, q), n
