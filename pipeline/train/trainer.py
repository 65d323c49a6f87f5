"""The training loop, top to bottom in one `Trainer`.

data -> forward -> losses -> backward/step -> momentum update -> enqueue -> log -> checkpoint

Run one process per rank (DeepSpeed's launcher, SLURM or a single `python -m hiervl.launch.train`).
Resume is automatic: a run pointed at an out_dir with checkpoints continues from the newest
complete one: the same step, LR, optimizer state, queues and data position, also at another
world size (through DeepSpeed universal checkpoints). SIGTERM/SIGUSR1 finish the current step,
write a checkpoint and exit 0. With `train.global_batch` the per-rank micro-batch and accumulation
come from the world size (pipeline/train/global_batch.py); with `train.accum_mode=contrastive` a
step's micro-batches form one contrastive batch (pipeline/train/grad_cache.py). Samples that hang or
kill a decode worker go into the run's crash ledger and are skipped from then on (crash_ledger.py).

Owns: the `Trainer` loop, its logs and signals, and `run`.
Must not touch: process launching (launch/) or the checkpoint format (checkpoint.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from hiervl import distributed as dist
from hiervl import faults, run_dir
from hiervl.atomic_write import write_atomic
from hiervl.config import Config, to_dict, to_yaml
from hiervl.errors import UserError
from hiervl.log import get_logger, setup_logging
from hiervl.train import checkpoint as ckpt
from hiervl.train.checkpoint import (
    BAD_TOTAL,
    BEST,
    CONFIG,
    EPOCH,
    LOADER,
    MOMENTUM,
    MOMENTUM_UPDATES,
    QUEUES,
    RNG,
    SAMPLES_SEEN,
    STEP,
    WORLD_SIZE,
)
from hiervl.train.checkpoint_remote import RemoteCheckpoints, converts_here, fetch_on_every_node
from hiervl.train.deepspeed_config import build_deepspeed_config, build_optimizer, use_bf16, write_deepspeed_config
from hiervl.train.global_batch import for_world, hold_global_batch

log = get_logger(__name__)

EXIT_OK, EXIT_BAD_STEPS, EXIT_NO_DATA = 0, 3, 4


class NoReadableSamples(RuntimeError):
    """`train.max_bad_steps` global batches in a row without one readable sample: training on nothing."""


class TooManyBadSteps(RuntimeError):
    pass


class PeerLost(UserError):
    """A collective failed or timed out mid-run: a node or the network to it is gone. The process
    group is broken, so the rank exits without tearing it down (that would wait on the lost peer)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    """One rank's training. `evaluate(model, cfg, split, device, diagnostics)` -> the result dict of
    `hiervl.eval.evaluate.evaluate_model` is what `eval.every_steps` calls (launch/train.py hands it
    in: train/ does not import eval/)."""

    def __init__(self, cfg: Config, evaluate: Callable | None = None):
        import deepspeed
        from hiervl.data.loader import VideoTextLoader
        from hiervl.model.hierarchical import build_model, compile_towers, set_matmul_precision
        from hiervl.model.text_model import load_tokenizer

        self.out = Path(cfg.train.out_dir)
        # checkpoint.dir=s3://...: checkpoints in an object store, the run folder may be each node's own
        self.remote = RemoteCheckpoints(cfg.checkpoint.dir, cfg.storage) if cfg.checkpoint.dir else None
        if cfg.eval.every_steps and evaluate is None:
            raise ValueError("eval.every_steps is set but the Trainer was given no evaluate function")
        self.evaluate_fn = evaluate
        info = dist.init(use_deepspeed=True, socket_ifname_setting=cfg.launch.socket_ifname)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        setup_logging(self.rank, self.out / run_dir.LOGS)
        self.peers = self._meet_peers()
        self._check_shared_out_dir()
        # the trainer owns device and precision: the loader delivers video in `self.dtype` on its device
        self.device = dist.resolve_device("auto", info.local_rank)
        self.dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32

        plan = ckpt.plan_resume_on_main(cfg.train.resume, self.out, self.world, cfg.train.zero_stage, remote=self.remote)
        if plan and plan.get("remote"):  # every node downloads it into its own cache
            plan = fetch_on_every_node(plan, self.remote, self.out, self.peers)
        # the run's config (written to config.yaml and checkpoints) and the one these ranks run: with
        # train.global_batch, data.batch_size and train.grad_accum derived for this world size
        self.run_cfg = cfg = hold_global_batch(cfg, ((plan or {}).get("meta") or {}).get("config"))
        self.cfg = cfg = for_world(cfg, self.world)
        if cfg.train.global_batch and self.rank == 0:
            log.info("train.global_batch=%d on %d ranks: %d micro-batches of %d per rank per step (%s accumulation)",
                     cfg.train.global_batch, self.world, cfg.train.grad_accum, cfg.data.batch_size, cfg.train.accum_mode)
        t0 = time.time()
        ckpt.ensure_universal(plan, converter=converts_here(self.peers) if plan and plan.get("remote") else None)
        self.convert_seconds = round(time.time() - t0, 3) if plan and plan["universal"] else None

        seed_everything(cfg.train.seed)  # same initial weights on every rank and every run
        model = build_model(cfg)
        set_matmul_precision(cfg, self.device)  # train.tf32
        if cfg.train.compile:
            log.info("train.compile: torch.compile of %s (compiled at the first steps)", ", ".join(compile_towers(model)))
        ds_config = build_deepspeed_config(cfg, self.world)
        if plan and plan["universal"]:
            ds_config["checkpoint"] = {"load_universal": True}
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            write_deepspeed_config(ds_config, self.out / run_dir.DS_CONFIG)
            self._write_run_config()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg, self.device, ds_config)  # PyTorch AdamW: no JIT build
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, model_parameters=params,
                                                                 optimizer=optimizer, config=ds_config)
        self.model = self.engine.module

        from hiervl.data.crash_ledger import CrashLedger

        # samples that hung or killed a decode worker, in this run folder: skipped, never met again
        self.ledger = CrashLedger(self.out, self.rank)
        if self.ledger.entries and self.rank == 0:
            log.info("crash ledger: %d samples are skipped (%s)", len(self.ledger.entries), self.ledger.folder)
        self.loader = VideoTextLoader(cfg, split=cfg.data.split, train=True, rank=self.rank, world_size=self.world,
                                      dtype=self.dtype, ledger=self.ledger,
                                      tokenizer=load_tokenizer(cfg.model.text.path))
        if len(self.loader) == 0:
            raise UserError(f"dataset {cfg.data.path} split '{cfg.data.split}' has fewer samples than one global "
                            f"batch ({cfg.data.batch_size} x {self.world} ranks); lower data.batch_size")
        self.step, self.epoch, self.bad_steps, self.bad_total = 0, 0, 0, 0
        self.empty_steps = 0  # global micro-batches in a row in which every sample was unreadable
        self.samples_seen = 0
        self.momentum_updates = 0  # key-encoder EMA updates: one per optimizer step
        self.best = None
        self.stop_signal = None
        self.engine_grad_norm = None  # does DeepSpeed's optimizer report the grad norm? (known after a step)
        self.resume_seconds, self.save_seconds = None, None  # for status.json (bench/train.py reads them)
        self.saved_step = None  # the step of the newest checkpoint on disk (so a finished run never rewrites it)
        self.pending_save = None  # the background save in flight (checkpoint.async_save), finished by finish_save
        if plan:
            t0 = time.time()
            self._resume(plan)
            self.resume_seconds = round(time.time() - t0, 3)
            self.saved_step = self.step
        else:
            self.loader.set_epoch(0)
        self._truncate_logs_after(self.step)

    def _write_run_config(self) -> None:
        """config.yaml is the launcher's (`hiervl train` writes it once, the global batch already held);
        rank 0 writes it only where it is missing (a Trainer started in-process) or says otherwise (a
        `hiervl submit` launcher could not see the checkpoint whose global batch this resume holds)."""
        path, text = self.out / run_dir.CONFIG, to_yaml(self.run_cfg)
        try:
            if path.read_text() == text:
                return
        except OSError:
            pass
        write_atomic(path, text)

    def _meet_peers(self) -> list[dict]:
        """Every rank's host, address and socket interface (rank order), logged by each rank in its
        own log: who trained where, and whom to name when a collective fails."""
        import socket

        addr, ifname = "127.0.0.1", os.environ.get("GLOO_SOCKET_IFNAME")
        master = os.environ.get("MASTER_ADDR")
        if self.world > 1 and master:
            try:
                addr, found = dist.route_to(master)
            except OSError:
                found = None
            ifname = ifname or found
            addr = dist.interface_addr(ifname) or addr if ifname else addr
        me = {"rank": self.rank, "host": socket.gethostname(), "addr": addr, "ifname": ifname}
        peers = dist.all_gather_object(me)
        log.info("rank %d of %d on host %s (%s, interface %s); world: %s; %d torch threads", self.rank, self.world,
                 me["host"], addr, ifname or "-", " ".join(f"{p['rank']}@{p['host']}" for p in peers),
                 torch.get_num_threads())
        return peers

    def _check_shared_out_dir(self) -> None:
        """On more than one host, every rank must see the run folder rank 0 sees: checkpoints are
        written there by every rank and resumed from by any. A folder local to each node (not a
        shared filesystem) is refused here, before any step, in one line naming the hosts."""
        hosts = sorted({p["host"] for p in self.peers})
        if len(hosts) < 2 or self.remote is not None:  # checkpoints in an object store: nothing shared here
            return
        probe = self.out / f".shared-check-{dist.broadcast_object(os.urandom(6).hex())}"
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            probe.write_text(self.peers[0]["host"] + "\n")
        dist.barrier()
        seen = dist.all_gather_object(probe.is_file())
        dist.barrier()
        if self.rank == 0:
            probe.unlink(missing_ok=True)
        blind = sorted({p["host"] for p, ok in zip(self.peers, seen) if not ok})
        if blind:
            err = UserError(f"train.out_dir {self.out} is not shared between the nodes: {', '.join(blind)} cannot see "
                            f"the file {self.peers[0]['host']} wrote there; every rank writes its part of each checkpoint "
                            "there: set checkpoint.dir=s3://BUCKET/PREFIX, or use a folder every node sees")
            err.same_on_every_rank = True
            raise err

    # ---------------------------------------------------------------- state

    def _client_state(self) -> dict:
        return {
            STEP: self.step, EPOCH: self.epoch, SAMPLES_SEEN: self.samples_seen,
            MOMENTUM_UPDATES: self.momentum_updates,
            LOADER: self.loader.state_dict(), QUEUES: ckpt.queue_state(self.model),
            MOMENTUM: self.model.momentum_state(),  # fp32 shadows of bf16 key weights (momentum_update)
            BAD_TOTAL: self.bad_total, BEST: self.best, CONFIG: to_dict(self.run_cfg),
            WORLD_SIZE: self.world, "universal_checkpoint_info": {},  # DeepSpeed's own key
        }

    def _resume(self, plan: dict) -> None:
        client, rank_state = ckpt.load(self.engine, plan)
        self.step, self.epoch = client[STEP], client[EPOCH]
        self.samples_seen, self.bad_total, self.best = client[SAMPLES_SEEN], client[BAD_TOTAL], client[BEST]
        self.momentum_updates = client.get(MOMENTUM_UPDATES, self.step)
        ckpt.load_queue_state(self.model, client[QUEUES])
        if client.get(MOMENTUM):
            self.model.load_momentum_state(client[MOMENTUM])
        self.loader.load_state_dict(client[LOADER])
        if rank_state is not None:
            ckpt.set_rng_state(rank_state[RNG])
        else:  # another world size: per-rank RNG streams cannot carry over; derive fresh ones
            seed_everything(self.cfg.train.seed + 1000 * self.step + self.rank)
        log.info("resumed from %s/%s at step %d (epoch %d, position %d, lr %.3g)%s", plan["dir"], plan["tag"],
                 self.step, self.epoch, client[LOADER].get("position", -1), self._lr(),
                 f" via universal checkpoint ({plan['meta']['world_size']} -> {self.world} ranks)" if plan["universal"] else "")

    def save(self, sync: bool = False) -> str:
        """Checkpoint this step. With checkpoint.async_save a periodic save returns once the state is
        in host memory and its files are written in the background; the save in flight is finished
        (a collective) before the next one and before the final one, which is synchronous (`sync`): a run
        that stops (SIGTERM, its last step) leaves every checkpoint it started complete. The best
        checkpoint's save is synchronous too, so best.json never names an uncommitted one."""
        self.finish_save()
        meta = {"world_size": self.world, "zero_stage": self.cfg.train.zero_stage, "epoch": self.epoch,
                "config": to_dict(self.run_cfg), "samples_seen": self.samples_seen}
        protect = (self.best["tag"],) if self.best else ()
        rank_state = {RNG: ckpt.rng_state(), LOADER: self.loader.state_dict()}
        background = self.cfg.checkpoint.async_save and not sync
        t0 = time.time()
        result = ckpt.save(self.engine, self.out, self.step, self._client_state(), rank_state, meta,
                           keep=self.cfg.checkpoint.keep, protect=protect, background=background,
                           wait_s=self.cfg.train.dist_timeout_s, remote=self.remote)
        self.save_seconds, self.saved_step = round(time.time() - t0, 3), self.step
        if background:
            self.pending_save = result
            log.info("checkpoint %s copied to host memory in %.2fs; written in the background", result.tag,
                     self.save_seconds)
            return result.tag
        log.info("checkpoint %s written in %.1fs", result, self.save_seconds)
        return result

    def finish_save(self) -> None:
        """Wait for the background save in flight, if any, on every rank (raises if it failed)."""
        job, self.pending_save = self.pending_save, None
        if job is not None and ckpt.finish(job):
            log.info("checkpoint %s written in the background in %.1fs", job.tag, job.write_seconds or 0.0)

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0]) if self.engine.get_lr() else self.cfg.train.lr

    # ---------------------------------------------------------------- logging

    def _truncate_logs_after(self, step: int) -> None:
        """After a resume, drop log lines a killed run wrote past the checkpoint (no duplicates)."""
        files = [self.out / run_dir.METRICS] if self.rank == 0 else []
        files += [self.out / run_dir.SAMPLES / f"rank{self.rank}.jsonl"]
        for path in files:
            if path.is_file():
                kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
                path.write_text("".join(line + "\n" for line in kept))
        dist.barrier()

    def _append_jsonl(self, path: Path, record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------- signals

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, handler)

    # ---------------------------------------------------------------- the loop

    def _to_device(self, batch: dict) -> dict:
        """Tensors to the training device; floating ones (the video) in the training dtype."""
        out = {}
        for key, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                if value.is_floating_point() and value.dtype != self.dtype:
                    value = value.to(self.dtype)
            out[key] = value
        return out

    def _next_batch(self):
        while True:
            try:
                return next(self._iter)
            except StopIteration:
                self.epoch += 1
                self.loader.set_epoch(self.epoch)
                self._iter = iter(self.loader)

    def _micro_step(self, window: dict) -> tuple[dict, dict] | None:
        """One micro-batch: data, forward, and (if finite on every rank) backward + engine.step().

        The only host sync of a step: one all-reduce of [non-finite?, stop signal?] read by the
        host, because skipping a bad micro-batch and stopping together must be decided alike on
        every rank. Losses stay on the device until a log step. Returns (the forward's output, whose
        keys are enqueued at the optimizer step, and the batch), or None when it was skipped.
        """
        t0 = time.perf_counter()
        batch = self._next_batch()
        window["data_s"] += time.perf_counter() - t0
        out = self.engine(self._to_device(batch))
        loss = out["loss"]
        self.samples_seen += self.cfg.data.batch_size * self.world
        if self._step_flags(loss, batch["valid"]):  # the step's one host sync
            return None
        self._backward_and_step(loss, window)
        self._add_losses(window, loss, out["losses"])
        return out, batch

    def _backward_and_step(self, loss: torch.Tensor, window: dict, scale_wrt_gas: bool = True) -> None:
        """engine.backward + engine.step for one micro-batch (DeepSpeed steps the optimizer on the last)."""
        self.engine.backward(loss, scale_wrt_gas=scale_wrt_gas)
        # grad norm, on the last micro-batch of a log step only: DeepSpeed's ZeRO and bf16 optimizers
        # compute it in step() (get_global_grad_norm); otherwise (plain AdamW, ZeRO-0 fp32) one fused
        # norm of the averaged gradients before step() frees them, left on the device until the log
        log_norm = self._logs_this_step() and self.engine.is_gradient_accumulation_boundary()
        if log_norm and self.engine_grad_norm is not True:
            window["grad_norm"] = self._local_grad_norm()
        self.engine.step()  # DeepSpeed steps the optimizer (and LR) on the last micro-batch of a step
        if log_norm and self.engine_grad_norm is not False:
            norm = self.engine.get_global_grad_norm()
            self.engine_grad_norm = norm is not None  # decided at the first log step
            if norm is not None:
                window["grad_norm"] = norm

    @staticmethod
    def _add_losses(window: dict, loss: torch.Tensor, losses: dict) -> None:
        window["loss"] = window["loss"] + loss.detach().float()
        for name, value in losses.items():
            window["losses"][name] = window["losses"].get(name, 0.0) + value.detach().float()
        window["micro"] += 1

    def _step_flags(self, loss: torch.Tensor, valid: torch.Tensor) -> bool:
        """The step's one host sync: [non-finite loss on any rank?, stop signal on any rank?, readable
        samples over all ranks]; True if the micro-batch (contrastive: the step) is skipped."""
        if faults.injected("nan-loss"):
            loss = loss * float("nan")
        flags = torch.stack([(~torch.isfinite(loss.detach().float())).float(),
                             torch.tensor(1.0 if self.stop_signal else 0.0, device=loss.device),
                             valid.to(loss.device).sum().float()])
        bad, stop, readable = dist.all_reduce_sum(flags).tolist()
        self.stop_requested = self.stop_requested or stop > 0
        if readable == 0:  # every sample of the global batch unreadable: nothing to learn from, no step
            self.empty_steps += 1
            log.warning("no readable sample in the global batch at step %d (%d in a row)", self.step + 1,
                        self.empty_steps)
            if self.empty_steps >= self.cfg.train.max_bad_steps:
                raise NoReadableSamples()
            return True
        self.empty_steps = 0
        if bad > 0:
            self.bad_steps += 1
            self.bad_total += 1
            log.warning("non-finite loss at step %d (%d in a row); skipped", self.step + 1, self.bad_steps)
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise TooManyBadSteps()
            return True
        self.bad_steps = 0
        return False

    def _contrastive_step(self, window: dict) -> tuple[list[tuple[dict, dict]], list[dict]]:
        """`train.accum_mode=contrastive`: the step's k micro-batches as one contrastive batch
        (pipeline/train/grad_cache.py): features cached, one loss over all of them and all ranks, then
        each micro-batch replayed with gradient. A non-finite loss skips the whole step's samples.
        Returns ([(the step's objective output, its last batch)], the step's batches); the output's keys are
        all micro-batches' keys of all ranks, in the sampler's order."""
        from hiervl.train import grad_cache

        while True:
            t0 = time.perf_counter()
            batches = [self._next_batch() for _ in range(self.cfg.train.grad_accum)]
            window["data_s"] += time.perf_counter() - t0
            on_device = [self._to_device(b) for b in batches]
            learn_scale = isinstance(self.model.logit_scale, torch.nn.Parameter)
            cache = grad_cache.embed_step(self.engine, on_device, self.model.objective, self.rank, self.world,
                                          learn_scale=learn_scale)
            self.samples_seen += self.cfg.data.batch_size * self.world * len(batches)
            if self._step_flags(cache.out["loss"], torch.cat([b["valid"].reshape(-1) for b in batches])):
                continue
            for m, batch in enumerate(on_device):
                # the k backwards sum to the step's gradient: no division by k
                self._backward_and_step(grad_cache.replay(self.engine, batch, cache, m), window, scale_wrt_gas=False)
            self._add_losses(window, cache.out["loss"], cache.out["losses"])
            return [(cache.out, batches[-1])], batches

    def _optimizer_step(self, window: dict) -> None:
        """`train.grad_accum` finite micro-batches, then one momentum update and one enqueue of all
        of their keys (in micro-batch order): a step is an optimizer step for every counter."""
        done = []  # (out, batch) of the step's finite micro-batches
        if self.cfg.train.accum_mode == "contrastive":
            done, batches = self._contrastive_step(window)
        else:
            while len(done) < self.cfg.train.grad_accum:
                result = self._micro_step(window)
                if result is not None:
                    done.append(result)
            batches = [b for _, b in done]
        with torch.no_grad():
            self.model.momentum_update()
            for out, _ in done:
                self.model.enqueue(out)
        self.momentum_updates += 1
        self.step += 1
        if self.cfg.train.log_samples:
            self._append_jsonl(self.out / run_dir.SAMPLES / f"rank{self.rank}.jsonl",
                               {"step": self.step, "epoch": batches[-1]["epoch"],
                                "keys": [k for b in batches for k in b["keys"]],
                                "valid": [bool(v) for b in batches for v in b["valid"].tolist()]})

    def _new_window(self) -> dict:
        """Accumulators between two log steps (device tensors: no sync until they are logged)."""
        return {"start": time.perf_counter(), "steps": 0, "micro": 0, "data_s": 0.0, "paused_s": 0.0,
                "loss": torch.zeros((), device=self.device), "losses": {}, "cpu": self.loader.cpu_seconds()}

    def _eval_due(self) -> bool:
        return bool(self.cfg.eval.every_steps) and self.step % self.cfg.eval.every_steps == 0

    def _logs_this_step(self, done: bool = False) -> bool:
        """Whether the optimizer step under way (or, `done`, just taken) ends with a log line."""
        step = self.step if done else self.step + 1
        every = self.cfg.eval.every_steps
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps or bool(every and step % every == 0)

    def _local_grad_norm(self) -> torch.Tensor:
        """The L2 norm of all gradients (before clipping), on the device: one fused norm, no host sync.
        With ZeRO-0 every rank holds the averaged full gradients after the boundary backward."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())

    def fit(self) -> int:
        """Steps until train.steps, a signal, or too many non-finite losses; then a final checkpoint.

        Each iteration: one optimizer step, then the periodic actions (log, eval, checkpoint, stop).
        """
        cfg = self.cfg
        self.stop_requested = False
        self._install_signal_handlers()
        self._iter = iter(self.loader)
        monitor, bar = self._open_outputs()
        exit_code, reason = EXIT_OK, "finished"
        window = self._new_window()
        dist.set_timeout(cfg.train.dist_timeout_s)  # start-up is over: a lost node now stops the run quickly
        try:
            while self.step < cfg.train.steps:
                self._optimizer_step(window)
                window["steps"] += 1
                if faults.injected("stop-after-step", self.step + 1):  # a preemption at an exact step (tests)
                    self.stop_requested, self.stop_signal = True, self.stop_signal or "the stop-after-step fault"
                if bar is not None:
                    bar.update(1)
                evaluation = None
                if self._eval_due():  # before the log line, which carries its R@k (its time is not counted)
                    t0 = time.perf_counter()
                    evaluation = self._evaluate()
                    window["paused_s"] += time.perf_counter() - t0
                if self._logs_this_step(done=True) or self.stop_requested:
                    self._log_window(monitor, bar, window, evaluation)
                    window = self._new_window()
                if (cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
                        and self.step < cfg.train.steps and self.saved_step != self.step):  # eval may have saved it
                    self.save()
                if self.stop_requested:
                    reason = f"stopped by {self.stop_signal or 'a signal on another rank'}"
                    break
        except NoReadableSamples:
            exit_code = EXIT_NO_DATA
            reasons = self.loader.stats.get("skipped_reasons") or {}
            example = next(iter(reasons.items()), None)
            reason = (f"no readable sample in {self.empty_steps} global batches in a row at step {self.step} "
                      f"({int(self.loader.stats.get('skipped', 0))} skipped on rank {self.rank}"
                      + (f", e.g. {example[0]}: {example[1]}" if example else "") + f"): check data.path={cfg.data.path}")
            if self.rank == 0:
                log.error("training on nothing: %s", reason)
        except TooManyBadSteps:
            exit_code = EXIT_BAD_STEPS
            reason = (f"{cfg.train.max_bad_steps} non-finite losses in a row at step {self.step}: lower train.lr, "
                      "check the data, or raise train.max_bad_steps")
        except RuntimeError as exc:  # a collective that timed out or lost its peer: one line naming it
            line = dist.failed_peer_line(exc, self.peers, cfg.train.dist_timeout_s, self.step + 1)
            if line is None:
                raise
            raise PeerLost(line) from None
        finally:
            if bar is not None:
                bar.close()
        # the final checkpoint, unless this step's is already on disk (a rerun of a finished run)
        if exit_code == EXIT_NO_DATA and self.step == 0:
            tag = None  # nothing was learnt: no checkpoint of the initial weights
        else:
            tag = self.save(sync=True) if self.saved_step != self.step else ckpt.tag_for(self.step)
        self.finish_save()  # a background save of this very step (eval's or the last periodic one)
        if monitor is not None:
            monitor.close()
        self._write_status(reason, tag, exit_code)
        return exit_code

    def _open_outputs(self):
        """The monitor (metrics.jsonl, TensorBoard, W&B) and progress bar (rank 0 only)."""
        if self.rank != 0:
            return None, None
        from hiervl.train.monitor import Monitor
        from tqdm import tqdm

        monitor = Monitor.open(self.cfg, self.out)
        bar = tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True, mininterval=2)
        return monitor, bar

    def _log_window(self, monitor, bar, window: dict, evaluation: dict | None = None) -> None:
        """Reduce the window's losses over ranks (the log step's sync) and write one metrics record:
        losses are means over the window's micro-batches; samples/s and data-wait share over its wall
        time (an evaluation's excluded); the grad norm and temperatures of this step; and, when this
        step evaluated, eval R@1/5/10, MdR, MnR per level and fused, both directions."""
        micro = max(window["micro"], 1)
        names = sorted(window["losses"])
        local = torch.stack([window["loss"].reshape(())] + [window["losses"][n].reshape(()) for n in names]) / micro
        # the loader's CPU seconds and its process tree's (this rank + its decode workers) over the window,
        # meaned over ranks in the same collective: their ratio is every rank's loader CPU share
        cpu = [now - then for now, then in zip(self.loader.cpu_seconds(), window["cpu"])]
        values = dist.all_reduce_mean(torch.cat([local, torch.tensor(cpu, device=local.device)])).tolist()
        total, losses = values[0], dict(zip(names, values[1:1 + len(names)]))
        loader_cpu, tree_cpu = values[-2:]
        if self.rank != 0:
            return
        elapsed = max(time.perf_counter() - window["start"] - window["paused_s"], 1e-9)
        lr = self._lr()
        samples = window["steps"] * self.cfg.data.batch_size * self.world * self.cfg.train.grad_accum
        grad_norm = window.get("grad_norm")
        temperature = (1.0 / self.model.logit_scale.detach().float().exp()).tolist()  # [n_levels]; hinge: unused
        record = {
            "step": self.step, "epoch": self.epoch, "samples_seen": self.samples_seen, "loss": total,
            "losses": losses, "lr": lr, "samples_per_s": samples / elapsed,
            "data_wait_share": min(window["data_s"] / elapsed, 1.0),
            # of the CPU the ranks (and their decode workers) used, the share the loader took (all ranks)
            "loader_cpu_share": min(loader_cpu / tree_cpu, 1.0) if tree_cpu > 0 else 0.0,
            # CPU seconds (all ranks and their decode workers) per sample: the cost a loaded machine's
            # wall-clock figures hide (samples/s on dedicated cores ~ cores / this)
            "cpu_s_per_sample": tree_cpu * self.world / samples if samples else None,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "temperature": dict(zip(self.model.levels, temperature)) if self.cfg.model.loss == "infonce" else {},
            "skipped_samples": int(self.loader.stats.get("skipped", 0)), "bad_steps": self.bad_total, "time": time.time(),
        }
        if evaluation is not None:
            record["eval"] = {d: {name: {m: evaluation[d][name][m] for m in ("R1", "R5", "R10", "MdR", "MnR")}
                                  for name in evaluation[d]} for d in ("t2v", "v2t")}
        monitor.log(record)
        if bar is not None:
            bar.set_postfix(loss=f"{total:.3f}", sps=f"{record['samples_per_s']:.0f}", lr=f"{lr:.2e}", refresh=False)

    def _evaluate(self) -> dict:
        """Evaluation hook: R@1/5/10 on eval.split; the best checkpoint (by R@sum) is kept. Returns the result."""
        self.model.eval()
        result = self.evaluate_fn(self.model, self.cfg, split=self.cfg.eval.split, device=self.device, diagnostics=False)
        self.model.train()
        t2v = result["t2v"]["fused"]
        rsum = t2v["R1"] + t2v["R5"] + t2v["R10"]
        if self.rank == 0:
            self._append_jsonl(self.out / run_dir.EVAL_LOG, {"step": self.step, "t2v": t2v, "rsum": rsum})
            log.info("eval step %d: t2v R@1 %.1f R@5 %.1f R@10 %.1f", self.step, t2v["R1"], t2v["R5"], t2v["R10"])
        if self.best is None or rsum > self.best["rsum"]:
            self.best = {"step": self.step, "rsum": rsum, "tag": ckpt.tag_for(self.step)}
            self.save(sync=True)
            if self.rank == 0:
                (self.out / run_dir.BEST).write_text(json.dumps(self.best, indent=2) + "\n")
        return result

    def _write_status(self, reason: str, tag: str, exit_code: int) -> None:
        ledger = {}
        for part in dist.all_gather_object(self.ledger.summary()):  # every rank's entries, also this run's
            ledger.update(part)
        if self.rank == 0:
            status = {"state": "preempted" if reason.startswith("stopped") else ("failed" if exit_code else "finished"),
                      "reason": reason, "step": self.step, "checkpoint": tag, "exit_code": exit_code,
                      "skipped_samples": int(self.loader.stats.get("skipped", 0)), "bad_steps": self.bad_total,
                      "world_size": self.world, "grad_accum": self.cfg.train.grad_accum,
                      "micro_batch": self.cfg.data.batch_size, "accum_mode": self.cfg.train.accum_mode,
                      "global_batch": self.cfg.data.batch_size * self.cfg.train.grad_accum * self.world,
                      "momentum_updates": self.momentum_updates, "checkpoint_save_seconds": self.save_seconds,
                      "resume_seconds": self.resume_seconds, "universal_conversion_seconds": self.convert_seconds,
                      "crash_ledger": ledger}
            (self.out / run_dir.STATUS).write_text(json.dumps(status, indent=2) + "\n")
            log.info("%s at step %d; checkpoint %s; skipped samples %d; non-finite steps %d", reason, self.step,
                     tag, status["skipped_samples"], self.bad_total)


def run(cfg: Config, evaluate: Callable | None = None, started: Callable[[], None] | None = None) -> int:
    """Train with `cfg` in this process (one rank); the entry point of `python -m hiervl.launch.train`.
    `evaluate`: the periodic evaluation (`hiervl.eval.evaluate.evaluate_model`), see `Trainer`.
    `started`: called once the trainer is built (model, DeepSpeed engine, loader), before the first
    step: the rank's entry point turns its garbage collector back on there (launch/quiet_gc.py)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(dist.cpu_threads_per_rank())  # never more compute threads than cores
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        # a single process without a launcher: DeepSpeed still makes a 1-rank group; avoid port clashes
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sock.getsockname()[1]))
    trainer = Trainer(cfg, evaluate)
    if started is not None:
        started()
    try:
        code = trainer.fit()
    except PeerLost:
        raise  # no teardown of a broken group
    except BaseException:
        dist.destroy()
        raise
    dist.destroy()
    return code

