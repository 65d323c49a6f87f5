"""Files written by an older hiervl that this one still reads: every old-format migration in one place.

Each function takes what an older version wrote and returns it in today's form; the readers call
it and know nothing of the old form. Kept because runs and checkpoints made before each change are
still resumed, exported and evaluated (`SCHEMA_VERSION` 1 covers them all); when a format is
dropped, its function goes and its reader refuses the file in one line naming the fix.

Migrations (here):
- `rename_old_queue_keys`: model state dicts from before the objective module held the queues
  (`queues.<name>.*` -> `objective.queues.<name>.*`; a load_state_dict pre-hook of the model).
- `queue_state_names`: the same rename for a checkpoint's queue state (train/checkpoint.py).
- `own_cuda_rng_state`: checkpoints whose RNG state held every visible GPU's CUDA state (a list),
  not this rank's own.
- `loader_state`: loader states from before `data.block_window` / `data.group_chunk` were recorded
  (they default to the config's, what those runs used).

Old forms that are one condition where they are read, not a conversion (listed so this page is the
whole inventory):
- a checkpoint without a file manifest passes the integrity check (run_dir.verify);
- a manifest without the `group` column loads with no groups (data/manifest.OPTIONAL_COLUMNS);
- a search index without a model fingerprint is searched with a warning that it cannot be checked
  (eval/fingerprint.check_fingerprint);
- relative paths recorded by older runs and indexes resolve from the folder that recorded them
  (run_dir.find_recorded; eval/search.py's index.json reader);
- an eval.json from before diagnostics renders without them (eval/report.py);
- a dataset folder from before the input records is adopted by a rerun that remakes all its splits
  with the same config (dataprep/dataset_inputs.py).

Owns: converting old forms to today's. Must not touch: today's formats (their writers own them).
"""

from __future__ import annotations

OLD_QUEUES, NEW_QUEUES = "queues.", "objective.queues."


def rename_old_queue_keys(module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: `<prefix>queues.*` -> `<prefix>objective.queues.*`, in place."""
    old = prefix + OLD_QUEUES
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "objective." + key[len(prefix):]] = state_dict.pop(key)


def queue_state_names(state: dict, queue_names) -> dict:
    """A checkpoint's {queue module name: state} with the old names (`queues.<name>`) renamed to the
    model's (`objective.queues.<name>`) where only the new one exists."""
    names = set(queue_names)
    return {name if name in names or f"objective.{name}" not in names else f"objective.{name}": value
            for name, value in state.items()}


def own_cuda_rng_state(cuda, device: int):
    """This rank's CUDA RNG state: as saved (a tensor), or from the old list of every visible device's
    state, the entry of `device` (None when that list is shorter)."""
    if isinstance(cuda, (list, tuple)):
        return cuda[device] if device < len(cuda) else None
    return cuda


def loader_state(state: dict, block_window: int, group_chunk: int) -> dict:
    """A loader state with the order parameters it may lack filled in from the config."""
    return {"block_window": block_window, "group_chunk": group_chunk, **state}
