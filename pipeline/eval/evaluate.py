"""Retrieval evaluation of a model on one split: embed, gather, rank in blocks, report.

    result = evaluate_model(model, cfg, split="test")       # every rank calls it (collectives)
    result["t2v"]["fused"]["R1"], result["v2t_dsl"]["semantic"]["MnR"], ...

1. Embed: every rank takes its slice of the split (`hiervl.data.loader.iter_eval`: each video once
   across ranks, padding slots flagged invalid) and encodes its videos and *all* their captions.
   Videos that failed to decode (valid=False) leave the gallery with their captions.
2. Gather: embeddings of all ranks, in rank order, on every rank (`hiervl.distributed`).
3. Rank (rank 0): text rows in blocks against every video, per level and fused, both
   directions, plain and DSL (`hiervl.eval.metrics.blocked_ranks`): never more than one block of
   `rows x videos` scores per matrix, so 100k x 100k runs in bounded memory. The result is
   broadcast, so every rank returns the same dict (the trainer keeps its best checkpoint by it).
4. Report: `eval.json` (everything), `eval.md` (the table; DSL rows marked), and the video
   embeddings as Parquet (key, level, vector) that `hiervl search` loads as its index.

Diagnostics (`diagnostics=True`, the default; pipeline/eval/metrics.py defines them): every video is
encoded a second time with its frames reversed in time, and each caption's similarity to its
own video forward and reversed gives the order sensitivity (per level and fused); on a dataset
whose manifest has a `group` column (related videos: the synthetic corpus's siblings) group
R@1 and sibling R@1 show whether the model finds the right group and, within it, the right
video. Both land in eval.json ("order", "groups") and in a second table.

Owns: embedding a split, gathering it, blocked ranking and the eval report files.
Must not touch: training state or the loader's resume position.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hiervl import distributed as dist
from hiervl.data.loader import DatasetIndex, iter_eval
from hiervl.data.manifest import MANIFEST_FILE
from hiervl.data.sampler import group_codes
from hiervl.errors import UserError
from hiervl.eval.metrics import (
    blocked_group_hits,
    blocked_ranks,
    group_chance,
    metrics_from_ranks,
    order_sensitivity,
    rows_for_budget,
)
from hiervl.eval.search import write_index
from hiervl.log import get_logger
from hiervl.storage import is_remote

log = get_logger(__name__)
DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")


@dataclass
class EmbeddedSplit:
    """Embeddings of a split (one rank's slice, or all ranks' after `gather_split`)."""

    keys: list[str]  # [Nv] video keys
    videos: dict[str, torch.Tensor]  # level -> [Nv, ...]
    texts: dict[str, torch.Tensor]  # level (and level_mask) -> [Nt, ...]
    caption_to_video: torch.Tensor  # [Nt] int64 index into keys
    captions: list[str] = field(default_factory=list)  # [Nt]
    skipped: list[str] = field(default_factory=list)  # keys of videos that failed to decode
    # level and "fused" -> [Nt, 2]: each caption's similarity to its own video played forward
    # (column 0) and with its frames reversed in time (column 1); empty without `reverse`
    order_pairs: dict[str, torch.Tensor] = field(default_factory=dict)


def _rows(emb: dict, i: int, j: int) -> dict:
    return {k: v[i:j] for k, v in emb.items()}


def _cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}


@torch.no_grad()
def embed_batches(model, batches, device: torch.device | str | None = None, progress: bool = False,
                  reverse: bool = False) -> EmbeddedSplit:
    """Encode the videos and every caption of eval batches (iter_eval's format) on this rank.

    With `reverse`, each video is also encoded with its frames in reverse order, and every
    caption's similarity to its own video both ways is kept (`order_pairs`); the reversed
    embeddings themselves are dropped (the order diagnostic needs only those pairs).
    """
    from tqdm import tqdm

    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    keys, vparts, tparts, c2v, captions, skipped, pairs = [], [], [], [], [], [], []
    for batch in tqdm(batches, desc="embed", unit="batch", disable=not progress):
        valid = batch["valid"].bool().cpu()  # [B]
        real = [k for k in batch["keys"] if k]  # padding slots have key ""
        skipped += [k for k, ok in zip(batch["keys"], valid.tolist()) if k and not ok]
        if not real or not valid.any():
            continue
        idx = valid.nonzero()[:, 0]  # slots kept
        video = batch["video"][idx.to(batch["video"].device)].to(device=device, dtype=param.dtype)
        v = model.encode_video(video)  # level -> [b, ...]
        vparts.append({k: x.float() if x.is_floating_point() else x for k, x in v.items()})
        slot_to_local = torch.full((len(valid),), -1, dtype=torch.long)
        slot_to_local[idx] = torch.arange(len(keys), len(keys) + len(idx))
        keys += [batch["keys"][i] for i in idx.tolist()]
        cap_slot = batch["caption_index"].cpu().long()  # [Nc] slot of each caption
        keep = valid[cap_slot]  # captions of decoded videos only
        if keep.any():
            ids = batch["caption_input_ids"].cpu()[keep].to(device)
            mask = batch["caption_attention_mask"].cpu()[keep].to(device)
            t = model.encode_text(ids, mask)  # level -> [nc, ...]
            tparts.append({k: x.float() if x.is_floating_point() else x for k, x in t.items()})
            if reverse:
                pos = torch.full((len(valid),), -1, dtype=torch.long)
                pos[idx] = torch.arange(len(idx))
                own = pos[cap_slot[keep]].to(device)[:, None]  # [nc, 1] each caption's video in this batch
                v_rev = model.encode_video(video.flip(1))  # frames reversed in time: [b, T, C, H, W] -> level -> [b, ...]
                fwd, back = model.similarity(t, v), model.similarity(t, v_rev)  # name -> [nc, b]
                pairs.append({n: torch.cat([fwd[n].gather(1, own), back[n].gather(1, own)], dim=1).float().cpu()
                              for n in fwd})  # name -> [nc, 2]
            c2v.append(slot_to_local[cap_slot[keep]])
            flat = [c for caps in batch["captions"] for c in caps]
            captions += [c for c, k in zip(flat, keep.tolist()) if k]
    return EmbeddedSplit(keys, _cat(vparts), _cat(tparts),
                         torch.cat(c2v) if c2v else torch.zeros(0, dtype=torch.long), captions, skipped, _cat(pairs))


def gather_rows(emb: dict, n: int, template: dict | None = None) -> dict:
    """All ranks' rows of `emb` {name: [n, ...]} concatenated in rank order (ranks may differ in n).

    `template` (one row per name, from any rank) supplies shapes/dtypes on a rank with no rows.
    """
    counts = [int(c) for c in dist.all_gather_object(n)]
    if dist.get_world_size() == 1:
        return emb
    width = max(counts)
    out = {}
    for name, ref in (template or emb).items():
        x = emb[name] if n else ref[:0]
        src_dtype = x.dtype
        if x.dtype == torch.bool:
            x = x.to(torch.uint8)  # gloo has no bool all_gather
        pad = x.new_zeros((width - x.shape[0],) + tuple(x.shape[1:]))
        full = dist.all_gather(torch.cat([x, pad]))  # [W*width, ...]
        out[name] = torch.cat([full[r * width:r * width + c] for r, c in enumerate(counts)]).to(src_dtype)
    return out


def gather_split(local: EmbeddedSplit, device: torch.device | str = "cpu") -> EmbeddedSplit:
    """Every rank's EmbeddedSplit concatenated in rank order (caption indices re-based)."""
    if dist.get_world_size() == 1:
        return local
    info = dist.all_gather_object({"keys": local.keys, "captions": local.captions, "skipped": local.skipped,
                                   "nt": len(local.caption_to_video),
                                   "tv": {k: (v[:1].cpu() if len(v) else None) for k, v in local.videos.items()},
                                   "tt": {k: (v[:1].cpu() if len(v) else None) for k, v in local.texts.items()},
                                   "op": sorted(local.order_pairs)})
    vt = next((i["tv"] for i in info if i["tv"] and all(x is not None for x in i["tv"].values())), None)
    tt = next((i["tt"] for i in info if i["tt"] and all(x is not None for x in i["tt"].values())), None)
    if vt is None or tt is None:
        raise UserError("no rank embedded any video with a caption: the split is empty or every video failed "
                        "to decode (see the loader's warnings)")
    vt = {k: v.to(device) for k, v in vt.items()}
    tt = {k: v.to(device) for k, v in tt.items()}
    videos = gather_rows({k: v.to(device) for k, v in local.videos.items()}, len(local.keys), vt)
    texts = gather_rows({k: v.to(device) for k, v in local.texts.items()}, len(local.caption_to_video), tt)
    offsets = np.cumsum([0] + [len(i["keys"]) for i in info])
    c2v_local = local.caption_to_video.to(device) + int(offsets[dist.get_rank()])
    c2v = gather_rows({"c2v": c2v_local}, len(c2v_local), {"c2v": torch.zeros(1, dtype=torch.long, device=device)})
    pair_names = next((i["op"] for i in info if i["op"]), [])  # ranks without captions have none
    pairs = gather_rows({k: v.to(device) for k, v in local.order_pairs.items()}, len(local.caption_to_video),
                        {k: torch.zeros(1, 2, device=device) for k in pair_names}) if pair_names else {}
    return EmbeddedSplit([k for i in info for k in i["keys"]], {k: v.cpu() for k, v in videos.items()},
                         {k: v.cpu() for k, v in texts.items()}, c2v["c2v"].cpu(),
                         [c for i in info for c in i["captions"]], [k for i in info for k in i["skipped"]],
                         {k: v.cpu() for k, v in pairs.items()})


def block_rows_for(num_videos: int, num_matrices: int, eval_cfg) -> int:
    """Text rows per block: eval.block_size, lowered until one block fits eval.block_mb."""
    return max(1, min(eval_cfg.block_size, rows_for_budget(num_videos, num_matrices, eval_cfg.block_mb)))


@torch.no_grad()
def rank_split(model, split: EmbeddedSplit, eval_cfg, device: torch.device | str = "cpu",
               progress: bool = False, groups: dict | None = None) -> dict:
    """Metrics of every level and fused, t2v and v2t, plain and (eval.dsl) DSL, in blocks.

    Diagnostics: "order" (per level and fused) when the split has `order_pairs`, and "groups"
    when `groups` ({video key: group name}) gives a group to at least one video (else None).
    """
    from tqdm import tqdm

    nt, nv = len(split.caption_to_video), len(split.keys)
    if nt == 0 or nv == 0:
        raise UserError(f"nothing to rank: {nv} videos and {nt} captions were embedded; the split has no "
                        "decodable videos with captions")
    videos = {k: v.to(device) for k, v in split.videos.items()}
    texts = {k: v.to(device) for k, v in split.texts.items()}
    names = list(model.levels) + ["fused"]
    rows = block_rows_for(nv, len(names), eval_cfg)
    dsl_scale = eval_cfg.dsl_scale if eval_cfg.dsl else None

    def score_rows(i: int, j: int) -> dict:
        return model.similarity(_rows(texts, i, j), videos)  # level -> [j-i, Nv]

    bar = tqdm(total=2 * nt, desc="rank", unit="caption", disable=not progress)
    ranks = blocked_ranks(score_rows, nt, nv, split.caption_to_video.numpy(), rows, dsl_scale=dsl_scale,
                          progress=bar.update)
    bar.close()
    result = {d: {} for d in DIRECTIONS if dsl_scale is not None or not d.endswith("_dsl")}
    for name in names:
        for direction, r in ranks[name].items():
            result[direction][name] = metrics_from_ranks(r.ranks, r.tied)
    if split.order_pairs:
        result["order"] = {name: order_sensitivity(split.order_pairs[name][:, 0].numpy(),
                                                   split.order_pairs[name][:, 1].numpy()) for name in names}
    result["groups"] = None
    gid = group_codes([(groups or {}).get(k) for k in split.keys])  # [Nv], -1 = no group
    if (gid >= 0).any():
        c2v = split.caption_to_video.numpy()
        _, hits = blocked_group_hits(score_rows, nt, c2v, gid, rows)  # a third pass over the row blocks
        chance = group_chance(c2v, gid)
        result["groups"] = {"queries": chance["queries"], "groups": chance["groups"],
                            "chance": {"group_R1": chance["group_R1"], "sibling_R1": chance["sibling_R1"]},
                            "levels": {name: {"group_R1": float(100.0 * hits[name]["group"].mean()),
                                              "sibling_R1": float(100.0 * hits[name]["sibling"].mean())}
                                       for name in names}}
    result.update(levels=names, num_videos=nv, num_captions=nt, block_rows=rows,
                  dsl_scale=dsl_scale, skipped=len(split.skipped), skipped_keys=split.skipped[:100])
    return result


def load_groups(data_path: str | Path, split: str, storage=None) -> dict[str, str]:
    """{key: group} of the samples of `split` that have a group (manifest column `group`).

    Empty when the dataset has no such column (prepared before it, or ungrouped data) or
    cannot be read here (e.g. tests that feed their own batches).
    """
    import pyarrow.parquet as pq


    if is_remote(str(data_path)):  # an object-store dataset (pipeline/storage.py): DatasetIndex reads its groups
        try:
            index = DatasetIndex(str(data_path), split, storage)
        except UserError:
            return {}
        try:
            return {k: g for k, g in zip(index.keys, index.groups) if g}
        finally:
            index.close()
    manifest = Path(data_path) / MANIFEST_FILE
    if not manifest.is_file():
        return {}
    try:
        index = DatasetIndex(data_path, split)
    except UserError:
        return {}
    try:
        groups = getattr(index, "groups", None)
        if groups is not None:
            return {k: g for k, g in zip(index.keys, groups) if g}
    finally:
        index.close()
    if "group" not in pq.read_schema(manifest).names:  # a DatasetIndex without `groups`: read the column
        return {}
    rows = pq.read_table(manifest, columns=["key", "split", "group"]).to_pylist()
    return {r["key"]: r["group"] for r in rows if r["split"] == split and r["group"]}


def evaluate_model(model, cfg, split: str | None = None, device: torch.device | str | None = None,
                   data_path: str | Path | None = None, out_dir: str | Path | None = None,
                   export: bool = False, meta: dict | None = None, batches=None, diagnostics: bool = True) -> dict:
    """Evaluate `model` on `split` (default eval.split) of `data_path` (default data.path).

    Collective: every rank calls it and gets the same result. With `out_dir`, rank 0 writes
    eval.json and eval.md there, and with `export` the video embeddings and index.json.
    `batches` replaces the loader (tests); `meta` is merged into the report (e.g. checkpoint).
    `diagnostics`: order sensitivity (a second, time-reversed encoding of every video: the
    embedding pass costs about 1.5-2x) and, on grouped data, group / sibling R@1.
    """

    split = split or cfg.eval.split
    if data_path is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data_path)))
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    rank, world = dist.get_rank(), dist.get_world_size()
    was_training = model.training
    model.eval()
    try:
        t0 = time.time()
        if batches is None:
            from hiervl.model.text_model import load_tokenizer

            batches = iter_eval(cfg, split=split, rank=rank, world_size=world, batch_size=cfg.eval.batch_size,
                                tokenizer=load_tokenizer(cfg.model.text.path))
        local = embed_batches(model, batches, device, progress=rank == 0, reverse=diagnostics)
        embed_s = time.time() - t0
        gathered = gather_split(local, device)
        result = None
        if rank == 0:
            t1 = time.time()
            groups = load_groups(cfg.data.path, split, getattr(cfg, "storage", None)) if diagnostics else None
            result = rank_split(model, gathered, cfg.eval, device, progress=True, groups=groups)
            result["seconds"] = {"embed": round(embed_s, 3), "rank": round(time.time() - t1, 3)}
            result["videos_per_s"] = round(len(gathered.keys) / max(embed_s, 1e-9), 2)
            result.update(split=split, data=str(cfg.data.path), world_size=world, **(meta or {}))
            if out_dir is not None:
                write_report(result, out_dir)
                if export:
                    from hiervl.eval.fingerprint import model_fingerprint

                    fp = model_fingerprint(model, (meta or {}).get("checkpoint_step"))  # checked by hiervl search
                    write_index(Path(out_dir), gathered.keys, gathered.videos,
                                {**(meta or {}), "model": fp, "split": split, "data": str(cfg.data.path)},
                                catalog=split_catalog(gathered, cfg.data.path))
            log.info("eval %s: %d videos, %d captions; t2v fused R@1 %.1f, v2t fused R@1 %.1f (%.1fs)", split,
                     result["num_videos"], result["num_captions"], result["t2v"]["fused"]["R1"],
                     result["v2t"]["fused"]["R1"], time.time() - t0)
        result = dist.broadcast_object(result)
    finally:
        model.train(was_training)
    return result


# ---------------------------------------------------------------------------- reports


def format_table(result: dict) -> str:
    """A Markdown table: one row per direction and level; DSL rows are marked `(DSL)`."""
    head = "| direction | level | R@1 | R@5 | R@10 | MdR | MnR | tied queries |\n|---|---|---|---|---|---|---|---|\n"
    lines = []
    for direction in DIRECTIONS:
        for name, m in result.get(direction, {}).items():
            label = direction.replace("_dsl", " (DSL)")
            lines.append(f"| {label} | {name} | {m['R1']:.1f} | {m['R5']:.1f} | {m['R10']:.1f} | {m['MdR']:.1f} | "
                         f"{m['MnR']:.1f} | {m['tied_queries']} |")
    return head + "\n".join(lines) + "\n"


def format_diagnostics(result: dict) -> str:
    """A Markdown table of the diagnostics: order sensitivity and group / sibling R@1 per level,
    with the chance row; empty when the result has neither."""
    order, groups = result.get("order") or {}, result.get("groups")
    if not order and not groups:
        return ""
    names = list(order) or list(groups["levels"])
    names = ["fused"] + [n for n in names if n != "fused"] if "fused" in names else names
    head = ("| level | order % (ties) | group R@1 | sibling R@1 |\n"
            "|---|---|---|---|\n")
    lines = []
    for name in names:
        o = order.get(name)
        g = groups["levels"].get(name) if groups else None
        lines.append(f"| {name} | " + (f"{o['order']:.1f} ({o['ties']})" if o else "-") + " | "
                     + (f"{g['group_R1']:.1f} | {g['sibling_R1']:.1f}" if g else "- | -") + " |")
    ch = groups["chance"] if groups else None
    lines.append("| *chance* | *50* | " + (f"*{ch['group_R1']:.1f}* | *{ch['sibling_R1']:.1f}*" if ch else "- | -")
                 + " |")
    return head + "\n".join(lines) + "\n"


def diagnostics_note(result: dict) -> str:
    """One paragraph saying what the diagnostics table's columns mean (for eval.md and the report)."""
    groups = result.get("groups")
    text = ("Order: share of captions whose own video scores strictly higher played forward than with its "
            "frames reversed (ties fail; 50 = no preference, 100 = always the true order). "
            if result.get("order") else "")
    if groups:
        text += (f"Groups: {groups['groups']} groups of related videos, {groups['queries']} captions; group R@1 = "
                 "the top video is in the caption's group, sibling R@1 = within its group, its own video scores "
                 "highest (ties fail).")
    else:
        text += "Group and sibling R@1 need a `group` column in the dataset's manifest; this one has none."
    return text + "\n"


def write_report(result: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    dsl = (f"DSL rows (marked) re-weight with softmax(sim x {result['dsl_scale']:g}) over all queries: an "
           "inference-time trick that needs the whole query set; compare them only with DSL numbers.\n"
           if result.get("dsl_scale") else "")
    text = (f"# Retrieval on split `{result.get('split')}`\n\n{result['num_videos']} videos, "
            f"{result['num_captions']} captions ({result['skipped']} videos skipped: undecodable). Ranks are "
            "pessimistic on ties (rank = items scoring >= the ground truth, minus one); text-to-video ranks "
            "every caption; video-to-text takes each video's best caption.\n" + dsl + "\n" + format_table(result))
    diag = format_diagnostics(result)
    if diag:
        text += "\n## Diagnostics\n\n" + diagnostics_note(result) + "\n" + diag
    (out / "eval.md").write_text(text)


def split_catalog(split: EmbeddedSplit, data_path: str | Path) -> list[dict]:
    """{key, path, captions} per embedded video: captions from the split, path = the manifest's source."""
    import pyarrow.parquet as pq

    caps: dict[str, list] = {k: [] for k in split.keys}
    for c, v in zip(split.captions, split.caption_to_video.tolist()):
        caps[split.keys[v]].append(c)
    sources = {}
    manifest = Path(data_path) / MANIFEST_FILE
    if manifest.is_file() and "source" in pq.read_schema(manifest).names:
        sources = dict(zip(*pq.read_table(manifest, columns=["key", "source"]).to_pydict().values()))
    return [{"key": k, "path": sources.get(k), "captions": caps[k]} for k in split.keys]
